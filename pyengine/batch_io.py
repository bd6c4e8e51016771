"""Sharded, resumable file I/O for ``python -m pyengine.batch``: JSONL or Parquet in and out.

A shard is ``shard_size`` consecutive input rows (in JSONL a row is a non-blank line).
Finished shards live in ``OUTPUT.parts/`` as ``part-00000.jsonl`` (or ``.parquet``), each
written to a ``.tmp`` name, fsynced and renamed, so a part file that exists is complete:
a run killed at any point loses at most the shards it had not yet renamed, and a rerun
redoes exactly those. ``manifest.json`` there names the job (input file, its size and
mtime, shard size, columns, model and options); a rerun whose job differs is refused
rather than mixed in. When every shard exists, the parts are joined in order into
``OUTPUT.tmp``, renamed to ``OUTPUT``, and the parts folder is removed. Output rows keep
the input order, each with every input column plus the output columns.
"""
from __future__ import annotations

import base64
import bisect
import fcntl
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

from .inputs import unicode_error

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def file_format(path: str, what: str) -> str:
    """'jsonl' or 'parquet' from the file's extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{what} {path!r}: unknown format {ext or '(no extension)'!r}; use one of {sorted(FORMATS)}")
    return FORMATS[ext]


def _bad_value(value, kind, vocab_size=None) -> str | None:
    """Why ``value`` cannot be a prompt of ``kind`` ('text' or 'ids'), or None.
    vocab_size: where known, token ids must lie in [0, vocab_size)."""
    if kind == "text":
        if not isinstance(value, str) or not value:
            return "expected a non-empty string"
        return unicode_error(value)
    ok = isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    if not ok:
        return "expected a non-empty list of token ids"
    if vocab_size is not None:
        bad = next((t for t in value if not 0 <= t < vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the model's vocabulary [0, {vocab_size})"
    return None



@dataclass
class InputPlan:
    """What a scan of the input learnt: its row count and where each shard starts."""
    path: str
    fmt: str
    num_rows: int
    shard_size: int
    offsets: list[int] | None = None  # JSONL: byte offset of each shard's first line
    group_starts: list[int] | None = None  # Parquet: first row of each row group, then num_rows
    schema: object = None  # JSONL to Parquet: the Arrow schema every shard is written with

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def shard_rows(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_rows)


def scan_input(path, shard_size, prompt_columns, kind, output_columns, file_column=None,
               file_root=None, vocab_size=None, output_format="jsonl") -> InputPlan:
    """Check every row's prompt columns (so a bad row fails the job before any shard is
    scored) and index the shards. ``kind``: 'text' or 'ids'. file_column: one of the
    prompt columns whose values are paths (relative ones under ``file_root``) of files
    that must exist, such as images. vocab_size: the bound token ids are checked against
    (None: not checked here). output_format 'parquet' with a JSONL input: every field
    must keep one type over the file (a Parquet column has one); the plan's schema holds it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    fmt = file_format(path, "input")
    files = _FileCheck(file_column, file_root)
    if fmt == "jsonl":
        return _scan_jsonl(path, shard_size, prompt_columns, kind, output_columns, files, vocab_size,
                           _SchemaScan(path) if output_format == "parquet" else None)
    return _scan_parquet(path, shard_size, prompt_columns, kind, output_columns, files, vocab_size)


class _FileCheck:
    """Raises for a row whose file column names no file."""

    def __init__(self, column, root):
        self.column, self.root = column, root

    def __call__(self, where, value):
        full = value if self.root is None or os.path.isabs(value) else os.path.join(self.root, value)
        if not os.path.isfile(full):
            raise ValueError(f"{where}, column {self.column!r}: file {full!r} not found")


def _scan_jsonl(path, shard_size, prompt_columns, kind, output_columns, files, vocab_size, schema):
    offsets, row, pos = [], 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            where = f"{path} line {lineno} (row {row})"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
            except RecursionError:
                raise ValueError(f"{where}: nests deeper than Python's JSON reader takes "
                                 f"({sys.getrecursionlimit()} levels)") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for c in prompt_columns:
                if c not in obj:
                    raise ValueError(f"{where} has no field {c!r}; its fields are {sorted(obj)}")
                why = _bad_value(obj[c], kind, vocab_size)
                if why:
                    raise ValueError(f"{where}, field {c!r}: {why}, got {obj[c]!r:.60}")
                if c == files.column:
                    files(where, obj[c])
            taken = [c for c in output_columns if c in obj]
            if taken:
                raise ValueError(f"{where} already has field(s) {taken}; pass --output-prefix to name the outputs")
            if schema is not None:
                schema.add(obj, lineno, row)
            if row % shard_size == 0:
                offsets.append(start)
            row += 1
    if row == 0:
        raise ValueError(f"input file {path!r} has no rows")
    return InputPlan(path, "jsonl", row, shard_size, offsets=offsets,
                     schema=None if schema is None else schema.finish())


class _SchemaScan:
    """The Arrow schema of a JSONL file's rows for a Parquet output, inferred a chunk of
    rows at a time and unified over the file (ints widen to floats, a field missing or
    null in some rows is nullable), so that a field whose type changes between rows, a
    value Parquet cannot hold or an empty object fails the job before any shard is
    scored, naming the field and line, instead of the write of some later shard."""

    CHUNK = 8192

    def __init__(self, path):
        self.path = path
        self.rows, self.lines = [], []  # the chunk being gathered: rows, (line, row) of each
        self.parts = []  # (schema, first line, last line) per chunk

    def add(self, obj, lineno, row):
        self.rows.append(obj)
        self.lines.append((lineno, row))
        if len(self.rows) == self.CHUNK:
            self._flush()

    def _flush(self):
        import pyarrow as pa

        if not self.rows:
            return
        try:
            # pa.array takes every row's keys (Table.from_pylist would take the first row's
            # only, and a field first seen later in the chunk would be dropped)
            schema = pa.schema(list(pa.array(self.rows).type))
        except (pa.ArrowException, OverflowError, UnicodeError):
            self._locate()
            raise
        self.parts.append((schema, self.lines[0][0], self.lines[-1][0]))
        self.rows, self.lines = [], []

    def _locate(self):
        """Raise ValueError naming the first row and field of the chunk that Arrow
        cannot take (a prefix of the chunk that fails stays failing as it grows)."""
        import pyarrow as pa

        for name in dict.fromkeys(k for r in self.rows for k in r):
            values = [r.get(name) for r in self.rows]
            try:
                pa.array(values)
                continue
            except (pa.ArrowException, OverflowError, UnicodeError):
                pass
            lo, hi = 1, len(values)  # the shortest failing prefix has hi values
            while lo < hi:
                mid = (lo + hi) // 2
                try:
                    pa.array(values[:mid])
                    lo = mid + 1
                except (pa.ArrowException, OverflowError, UnicodeError):
                    hi = mid
            try:
                pa.array(values[:hi])
                why = "cannot be stored"
            except (pa.ArrowException, OverflowError, UnicodeError) as e:
                why = str(e)
            line, row = self.lines[hi - 1]
            raise ValueError(f"{self.path} line {line} (row {row}), field {name!r}: a Parquet column holds one type "
                             f"of value and this one does not fit the rows before it ({why}); make the rows "
                             "agree, or write JSONL") from None

    def finish(self):
        import pyarrow as pa

        self._flush()
        try:
            schema = pa.unify_schemas([s for s, _, _ in self.parts], promote_options="permissive")
        except pa.ArrowException:
            schema = None
        if schema is None:
            self._conflict()
        for field in schema:
            if 1 + _parquet_levels(field.type) > 100:
                raise ValueError(f"{self.path}: field {field.name!r} nests deeper than Parquet readers take (100 "
                                 "levels; a list is 2, an object 1); flatten it, or write JSONL")
            if _has_empty_struct(field.type):
                line = next(a for s, a, _ in self.parts if field.name in s.names and _has_empty_struct(
                    s.field(field.name).type))
                raise ValueError(f"{self.path}: field {field.name!r} holds only empty objects ({{}}) from line "
                                 f"{line} on, which Parquet cannot store; drop the field or write JSONL")
        return schema

    def _conflict(self):
        import pyarrow as pa

        names = dict.fromkeys(n for s, _, _ in self.parts for n in s.names)
        for name in names:
            seen = []  # (type, first line, last line) of the chunks holding the field
            for s, a, b in self.parts:
                if name not in s.names:
                    continue
                t = s.field(name).type
                for u, a0, b0 in seen:
                    try:
                        pa.unify_schemas([pa.schema([(name, u)]), pa.schema([(name, t)])], promote_options="permissive")
                    except pa.ArrowException:
                        raise ValueError(f"{self.path}: field {name!r} holds {u} in lines {a0}..{b0} and {t} in lines "
                                         f"{a}..{b}; a Parquet column holds one type: make the rows agree, or write "
                                         "JSONL") from None
                seen.append((t, a, b))
        raise ValueError(f"{self.path}: the rows' fields do not share one Parquet schema; write JSONL")


def _parquet_levels(t) -> int:
    """Levels of Parquet schema that a column of Arrow type ``t`` takes (Arrow's Parquet
    reader refuses a file whose schema, root included, is deeper than 100)."""
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return 2 + _parquet_levels(t.value_type)
    if pa.types.is_map(t):
        return 2 + max(_parquet_levels(t.key_type), _parquet_levels(t.item_type))
    if pa.types.is_struct(t):
        return 1 + max((_parquet_levels(t.field(i).type) for i in range(t.num_fields)), default=0)
    return 1


def _has_empty_struct(t) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_has_empty_struct(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _has_empty_struct(t.value_type)
    return False


def _check_utf8(col, where):
    """Raise ValueError naming the first value of string column ``col`` that is not valid
    UTF-8 (Parquet does not check what writers put in a string column); ``where(i)`` names
    row i."""
    import pyarrow as pa

    try:
        col.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for i, v in enumerate(col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary())):
        raw = v.as_py()
        try:
            raw is None or raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where(i)}: not valid UTF-8 ({e.reason} at byte {e.start}), got {raw!r:.60}") from None


def _scan_parquet(path, shard_size, prompt_columns, kind, output_columns, files, vocab_size):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"input file {path!r} is not a readable Parquet file: {e}") from None
    schema = pf.schema_arrow
    for c in prompt_columns:
        if c not in schema.names:
            raise ValueError(f"{path} has no column {c!r}; its columns are {schema.names}")
        t = schema.field(c).type
        ok = (pa.types.is_string(t) or pa.types.is_large_string(t)) if kind == "text" else (
            (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type))
        if not ok:
            want = "a string column" if kind == "text" else "a list-of-integers column"
            raise ValueError(f"{path} column {c!r} has type {t}; expected {want}")
    taken = [c for c in output_columns if c in schema.names]
    if taken:
        raise ValueError(f"{path} already has column(s) {taken}; pass --output-prefix to name the outputs")
    base = 0
    for batch in pf.iter_batches(batch_size=65536, columns=list(prompt_columns)):
        for c in prompt_columns:
            col = batch.column(c)
            if kind == "text":
                _check_utf8(col, lambda i: f"{path} row {base + i}, column {c!r}")
            lengths = pc.utf8_length(col) if kind == "text" else pc.list_value_length(col)
            bad = pc.or_kleene(pc.is_null(col), pc.equal(lengths, 0)).fill_null(True)
            if kind == "ids":  # a null inside a list marks its row bad
                flat = pc.list_flatten(col)
                flat_null = pc.is_null(flat).to_numpy(zero_copy_only=False)
                if flat_null.any():
                    parents = pc.list_parent_indices(col).to_numpy()
                    i = int(parents[np.flatnonzero(flat_null)[0]])
                    raise ValueError(f"{path} row {base + i}, column {c!r}: a token id is null")
                ids = flat.to_numpy(zero_copy_only=False)
                out = np.flatnonzero((ids < 0) | (ids >= vocab_size)) if vocab_size is not None else ()
                if len(out):
                    i = int(pc.list_parent_indices(col).to_numpy()[out[0]])
                    raise ValueError(f"{path} row {base + i}, column {c!r}: token id {int(ids[out[0]])} is outside "
                                     f"the model's vocabulary [0, {vocab_size})")

            hits = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
            if hits.size:
                i = int(hits[0])
                why = _bad_value(col[i].as_py(), kind) or "null"
                raise ValueError(f"{path} row {base + i}, column {c!r}: {why}, got {col[i].as_py()!r:.60}")
            if c == files.column:
                for i, v in enumerate(col.to_pylist()):
                    files(f"{path} row {base + i}", v)
        base += batch.num_rows
    md = pf.metadata
    if md.num_rows == 0:
        raise ValueError(f"input file {path!r} has no rows")
    starts = [0]
    for g in range(md.num_row_groups):
        starts.append(starts[-1] + md.row_group(g).num_rows)
    return InputPlan(path, "parquet", md.num_rows, shard_size, group_starts=starts)


class ShardReader:
    """Random access to shards. JSONL seeks to the shard's offset; Parquet decodes the row
    groups that hold the shard and keeps the last one, so reading shards in order decodes
    each row group once even where a row group spans many shards."""

    def __init__(self, plan: InputPlan):
        self.plan = plan
        self._pf = None
        self._cached = (None, None)  # (key, table)

    def rows(self, k: int, columns=None):
        """Shard ``k``: a list of dicts (JSONL) or a pyarrow Table (Parquet)."""
        start, stop = self.plan.shard_rows(k)
        if self.plan.fmt == "jsonl":
            rows = []
            with open(self.plan.path, "rb") as f:
                f.seek(self.plan.offsets[k])
                for line in f:
                    if line.strip():
                        rows.append(json.loads(line))
                        if len(rows) == stop - start:
                            break
            return rows if columns is None else [{c: r[c] for c in columns} for r in rows]
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._pf is None:
            self._pf = pq.ParquetFile(self.plan.path)
        starts = self.plan.group_starts
        parts = []
        for g in range(bisect.bisect_right(starts, start) - 1, len(starts) - 1):
            if starts[g] >= stop:
                break
            key = (g, None if columns is None else tuple(columns))
            if self._cached[0] != key:
                self._cached = (key, self._pf.read_row_group(g, columns=columns))
            lo, hi = max(start, starts[g]), min(stop, starts[g + 1])
            parts.append(self._cached[1].slice(lo - starts[g], hi - lo))
        return pa.concat_tables(parts)

    def prompts(self, k: int, columns) -> dict[str, list]:
        """The prompt columns of shard ``k`` as Python lists."""
        rows = self.rows(k, columns)
        if isinstance(rows, list):
            return {c: [r[c] for r in rows] for c in columns}
        return {c: rows.column(c).to_pylist() for c in columns}


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


def _json_default(v):
    if hasattr(v, "tolist"):  # numpy values
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):  # Parquet binary: base64, which loses no byte
        return base64.b64encode(v).decode("ascii")
    return str(v)  # dates, decimals: as Parquet readers print them


def _table_from_rows(rows, schema=None):
    """JSONL rows as a Table: with ``schema`` (the scan's, over the whole file), in it."""
    import pyarrow as pa

    if schema is not None:
        # A field of ints and floats is a float column (the scan widened it); Arrow takes
        # an int into it only while exact (up to 2^53), so wider ones are converted here, as
        # the scan promised, instead of failing this shard's write.
        floats = [f.name for f in schema if pa.types.is_floating(f.type)]
        if floats:
            rows = [r if not any(type(r.get(n)) is int for n in floats) else
                    {**r, **{n: float(r[n]) for n in floats if type(r.get(n)) is int}} for r in rows]
        return pa.Table.from_pylist(rows, schema=schema)
    names = list(dict.fromkeys(k for r in rows for k in r))  # every key, in order of appearance
    return pa.table({n: [r.get(n) for r in rows] for n in names})


def _finite(v):
    """``v`` with every NaN or infinity (nested too) as None: JSON has no such numbers.
    A loop, not recursion: a JSON value may nest deeper than Python's recursion limit."""
    def fix(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            y = dict(x)
        elif isinstance(x, (list, tuple)):
            y = list(x)
        else:
            return x
        todo.append(y)
        return y

    todo = []
    root = fix(v)
    while todo:
        y = todo.pop()
        for key in (y.keys() if isinstance(y, dict) else range(len(y))):
            y[key] = fix(y[key])
    return root


def _column_values(col, name) -> list:
    """A Parquet column as Python values for a JSON line. Values Python cannot hold are
    kept as text instead of failing the shard: dates and times past year 9999 as Arrow
    prints them (else their integer count of units), and strings that are not valid UTF-8
    with each bad byte as a lone surrogate (written as "\\udcXX", which gives the byte back)."""
    import pyarrow as pa

    try:
        return col.to_pylist()
    except (OverflowError, ValueError, UnicodeDecodeError, pa.ArrowException) as e:
        failure = e
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        raw = col.cast(pa.large_binary()).to_pylist()
        return [None if b is None else b.decode("utf-8", "surrogateescape") for b in raw]
    if pa.types.is_temporal(t):
        out = []
        for x in col:
            try:
                out.append(x.as_py())
            except (OverflowError, ValueError):
                text = x.cast(pa.string()).as_py()
                if text.startswith("<"):  # beyond Arrow's calendar too
                    text = str(x.cast(pa.int64()).as_py())
                out.append(text)
        return out
    # a value nested inside a list or struct: name the column and what Arrow could not convert
    raise ValueError(f"column {name!r} ({t}) holds a value JSON output cannot take ({failure}); "
                     "write Parquet, or drop the column") from None


def _json_line(row) -> str:
    """One output row as a line of strict JSON: NaN and infinities as null, and a row
    holding a lone surrogate (not UTF-8) with its non-ASCII characters escaped."""
    try:
        line = json.dumps(row, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:  # NaN or infinity
        row = _finite(row)
        line = json.dumps(row, ensure_ascii=False, allow_nan=False, default=_json_default)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row, ensure_ascii=True, allow_nan=False, default=_json_default)
    return line


def _conform(table, schema):
    """``table`` with ``schema``'s columns, in its order and types (missing ones null)."""
    import pyarrow as pa

    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


class ShardStore:
    """The part files, manifest and lock of one output (see the module docstring)."""

    def __init__(self, output: str, identity: dict, num_shards: int, overwrite: bool = False, schema=None):
        """schema: the Arrow schema of JSONL input rows for a Parquet output (InputPlan.schema)."""
        self.output = os.path.abspath(output)
        self.schema = schema
        self.fmt = file_format(output, "output")
        self.dir = self.output + ".parts"
        self.num_shards = num_shards
        parent = os.path.dirname(self.output)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"output folder {parent!r} does not exist")
        if os.path.isdir(self.output):
            raise IsADirectoryError(f"output {self.output!r} is a folder; name a .jsonl or .parquet file")
        if not overwrite and os.path.exists(self.output) and not os.path.isdir(self.dir):
            raise FileExistsError(f"output {self.output!r} exists (a finished job); pass --overwrite to redo it")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = open(os.path.join(self.dir, ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another batch job is writing {self.output!r} (it holds {self.dir}/.lock)") from None
        if overwrite:  # only once the lock is ours: a running job's shards are not swept away
            for name in os.listdir(self.dir):
                if name != ".lock":
                    os.remove(os.path.join(self.dir, name))
        manifest = os.path.join(self.dir, "manifest.json")
        job = {**identity, "num_shards": num_shards, "output_format": self.fmt}
        if os.path.exists(manifest):
            with open(manifest) as f:
                old = json.load(f)
            diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            kept = [n for n in os.listdir(self.dir) if n.startswith("part-") and not n.endswith(".tmp")]
            if diff and not kept:  # that job finished no shard (it failed first): this one takes the folder
                self._atomic_write(manifest, json.dumps(job, indent=1, sort_keys=True).encode())
            elif diff:
                raise ValueError(f"{self.dir} holds shards of a different job (differs in {diff}); "
                                 "pass --overwrite to start over")
        elif any(n.startswith("part-") and not n.endswith(".tmp") for n in os.listdir(self.dir)):
            # shards whose job is unknown (its manifest was lost, say in a cleanup cut short)
            raise ValueError(f"{self.dir} holds shards but no manifest.json, so which job wrote them is "
                             "unknown; pass --overwrite to start over")
        else:
            self._atomic_write(manifest, json.dumps(job, indent=1, sort_keys=True).encode())

    def part(self, k: int) -> str:
        return os.path.join(self.dir, f"part-{k:05d}.{self.fmt}")

    def done(self) -> set[int]:
        return {k for k in range(self.num_shards) if os.path.exists(self.part(k))}

    @staticmethod
    def _atomic_write(path, data: bytes):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write(self, k: int, rows, outputs: dict):
        """Shard ``k``: its input rows (list of dicts or Table) plus the output columns."""
        if self.fmt == "jsonl":
            if not isinstance(rows, list):
                names = rows.column_names
                columns = [_column_values(c, n) for c, n in zip(rows.columns, names)]
                rows = [dict(zip(names, vals)) for vals in zip(*columns)]
            lines = []
            for i, row in enumerate(rows):
                row = {**row, **{name: _plain(vals[i]) for name, vals in outputs.items()}}
                lines.append(_json_line(row))
            self._atomic_write(self.part(k), ("\n".join(lines) + "\n").encode())
            return
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = _table_from_rows(rows, self.schema) if isinstance(rows, list) else rows
        for name, vals in outputs.items():
            if name.endswith("probs"):
                arr = pa.array([np.asarray(v, dtype=np.float32) for v in vals], type=pa.list_(pa.float32()))
            elif name.endswith("label"):
                arr = pa.array(list(vals), type=pa.string())
            else:
                arr = pa.array(np.asarray(vals, dtype=np.float32))
            table = table.append_column(name, arr)
        tmp = self.part(k) + ".tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.part(k))

    def assemble(self):
        """Join every part, in order, into the output; then drop the parts folder."""
        missing = sorted(set(range(self.num_shards)) - self.done())
        if missing:
            raise RuntimeError(f"cannot assemble {self.output}: shard(s) {missing[:10]} are missing")
        tmp = self.output + ".tmp"
        parts = [self.part(k) for k in range(self.num_shards)]
        if self.fmt == "jsonl":
            with open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out)
                out.flush()
                os.fsync(out.fileno())
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            # JSONL rows may give a column a type in one shard and null in another.
            schema = pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="permissive")
            with pq.ParquetWriter(tmp, schema) as w:
                for p in parts:
                    w.write_table(_conform(pq.read_table(p), schema))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, self.output)
        self.close()
        shutil.rmtree(self.dir)

    def close(self):
        if not self._lock.closed:
            self._lock.close()
