"""`python -m pyengine.batch`: JSONL and Parquet, in one process and on Ray, resumed
after an interruption, against the offline LLM."""
import base64
import functools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from transformers import BertConfig

from pyengine import LLM
from pyengine.batch_io import InputPlan
from pyengine.batch_job import ShardCollector, build_parser, main, run
from tiny import WORDS, save_tiny

ATOL = 1e-5  # a prompt's result may not depend on its batch (DESIGN, fp32)
N = 300
SHARD = 64  # 5 shards, the last one short


def _bert(num_labels):
    return BertConfig(vocab_size=160, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny(root / "clf", _bert(3), seed=1)
    save_tiny(root / "ce", _bert(1), seed=2)
    return str(root / "clf"), str(root / "ce")


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    words = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))  # noqa: E731
    # "meta" is a nested field some rows lack: it must come out as it went in.
    return [{"id": i, "text": words(), "text_2": words(), **({"meta": {"k": i}} if i % 7 == 0 else {})}
            for i in range(N)]


@pytest.fixture(scope="module")
def expected(models, corpus):
    clf, ce = models
    probs = np.array([o.outputs.probs for o in LLM(clf).classify([r["text"] for r in corpus], use_tqdm=False)])
    scores = [o.outputs.score for o in LLM(ce).score([r["text"] for r in corpus], [r["text_2"] for r in corpus],
                                                     use_tqdm=False)]
    return probs, np.array(scores)


def write_input(rows, path):
    if str(path).endswith(".jsonl"):
        with open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.write("\n")  # a blank line is not a row
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Row groups of 100 rows: shards cross row-group boundaries.
        pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("id", "text", "text_2")} for r in rows]), path,
                       row_group_size=100)
    return str(path)


def read_output(path):
    if str(path).endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def job(model, inp, out, *extra, hook=None):
    args = build_parser().parse_args(["--model", model, "--input", inp, "--output", str(out),
                                      "--shard-size", str(SHARD), "--no-progress", *extra])
    return run(args, on_shard_done=hook)


def check(rows, corpus, expected, pairs=False):
    assert [r["id"] for r in rows] == list(range(N)), "rows lost, duplicated or out of order"
    assert [r["text"] for r in rows] == [r["text"] for r in corpus]
    probs, scores = expected
    if pairs:
        np.testing.assert_allclose([r["score"] for r in rows], scores, atol=ATOL, rtol=0)
    else:
        np.testing.assert_allclose(np.array([r["probs"] for r in rows]), probs, atol=ATOL, rtol=0)
        assert [r["label"] for r in rows] == [f"LABEL_{i}" for i in probs.argmax(1)]


class Stop(Exception):
    pass


def stop_after(n):
    done = []

    def hook(k):
        done.append(k)
        if len(done) == n:
            raise Stop()
    return hook, done


@pytest.mark.parametrize("src,dst", [("jsonl", "jsonl"), ("parquet", "parquet"), ("jsonl", "parquet"),
                                     ("parquet", "jsonl")])
def test_local_formats(tmp_path, models, corpus, expected, src, dst):
    if "parquet" in (src, dst):
        pytest.importorskip("pyarrow")
    inp = write_input(corpus, tmp_path / f"in.{src}")
    assert job(models[0], inp, tmp_path / f"out.{dst}") == N
    rows = read_output(tmp_path / f"out.{dst}")
    check(rows, corpus, expected)
    if src == dst == "jsonl":  # untouched fields survive, including absent ones
        assert [r.get("meta") for r in rows] == [r.get("meta") for r in corpus]
    assert not os.path.exists(f"{tmp_path}/out.{dst}.parts"), "the parts folder was left behind"


def test_local_pairs_and_token_ids(tmp_path, models, corpus, expected):
    inp = write_input(corpus, tmp_path / "in.jsonl")
    job(models[1], inp, tmp_path / "pairs.jsonl", "--pair-column", "text_2")
    check(read_output(tmp_path / "pairs.jsonl"), corpus, expected, pairs=True)

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tok = LLM(models[0]).get_tokenizer()
    ids = [tok(r["text"])["input_ids"] for r in corpus]
    pq.write_table(pa.table({"id": list(range(N)), "text": [r["text"] for r in corpus], "ids": ids}),
                   tmp_path / "ids.parquet")
    job(models[0], str(tmp_path / "ids.parquet"), tmp_path / "ids_out.parquet", "--token-ids-column", "ids")
    check(read_output(tmp_path / "ids_out.parquet"), corpus, expected)


def test_local_interrupted_run_resumes(tmp_path, models, corpus, expected):
    inp = write_input(corpus, tmp_path / "in.jsonl")
    job(models[0], inp, tmp_path / "whole.jsonl")
    out = tmp_path / "out.jsonl"
    hook, done = stop_after(2)
    with pytest.raises(Stop):
        job(models[0], inp, out, hook=hook)
    assert not out.exists()
    # A kill during a shard's write leaves a .tmp file: it is not a finished shard.
    (tmp_path / "out.jsonl.parts" / "part-00002.jsonl.tmp").write_text('{"half a line')
    resumed = []
    assert job(models[0], inp, out, hook=resumed.append) == N - 2 * SHARD
    assert sorted(resumed) == [2, 3, 4], "finished shards were redone, or pending ones skipped"
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    check(read_output(out), corpus, expected)


def test_refuses_to_mix_jobs_or_clobber(tmp_path, models, corpus):
    inp = write_input(corpus, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    hook, _ = stop_after(1)
    with pytest.raises(Stop):
        job(models[0], inp, out, hook=hook)
    with pytest.raises(ValueError, match="different job.*shard_size"):
        job(models[0], inp, out, "--shard-size", "32")
    job(models[0], inp, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        job(models[0], inp, out)
    assert job(models[0], inp, out, "--overwrite") == N


@pytest.mark.parametrize("rows,extra,match", [
    ([{"text": "a"}, {"txt": "b"}], [], "line 2 \\(row 1\\) has no field 'text'"),
    ([{"text": "a"}, {"text": ""}], [], "row 1.*field 'text': expected a non-empty string"),
    ([{"text": "a"}, {"text": 3}], [], "row 1.*non-empty string"),
    ([{"text": "a", "label": "x"}], [], "already has field.*label.*--output-prefix"),
    ([{"ids": [1, 2]}, {"ids": []}], ["--token-ids-column", "ids"], "row 1.*list of token ids"),
    ([{"text": "a"}], ["--pair-column", "text"], "num_labels == 1"),
    ([{"text": "a"}], ["--shard-size", "0"], "--shard-size must be positive"),
])
def test_bad_input_fails_before_any_work(tmp_path, models, rows, extra, match):
    inp = write_input(rows, tmp_path / "in.jsonl")
    with pytest.raises(ValueError, match=match):
        job(models[0], inp, tmp_path / "out.jsonl", *extra)
    assert not (tmp_path / "out.jsonl.parts").exists() and not (tmp_path / "out.jsonl").exists()


def test_collector_hands_each_shard_out_once():
    # Rows as Ray may deliver them: shards interleaved, out of order, some rows twice,
    # one even after its shard was complete.
    c = ShardCollector(InputPlan("x.jsonl", "jsonl", num_rows=5, shard_size=2))
    got = []
    for shards, rows in (([1, 0, 2], [1, 1, 0]), ([0, 1], [1, 1]), ([1, 0], [0, 0]), ([0, 1, 1], [0, 1, 0])):
        new, finished = c.add(shards, rows, {"score": [10 * k + i for k, i in zip(shards, rows)]})
        got += [(new, finished)]
    assert [n for n, _ in got] == [3, 0, 2, 0]
    assert got[0][1] == [(2, {"score": [20]})]
    assert got[2][1] == [(0, {"score": [0, 1]}), (1, {"score": [10, 11]})]
    assert got[1][1] == got[3][1] == [] and not c.partial and c.finished == {0, 1, 2}


def test_bad_parquet_input(tmp_path, models):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "in.parquet")
    with pytest.raises(ValueError, match="row 1, column 'text'"):
        job(models[0], str(tmp_path / "in.parquet"), tmp_path / "out.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="column 'text' has type int64"):
        job(models[0], str(tmp_path / "ints.parquet"), tmp_path / "out.parquet")


def test_python_dash_m(tmp_path, models, corpus, expected):
    inp = write_input(corpus, tmp_path / "in.jsonl")
    cmd = [sys.executable, "-m", "pyengine.batch", "--model", models[0], "--input", inp, "--no-progress"]
    p = subprocess.run(cmd + ["--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "RuntimeWarning" not in p.stderr and f"scored {N} rows" in p.stderr
    check(read_output(tmp_path / "out.jsonl"), corpus, expected)


def test_main_exit_code_and_message(tmp_path, models, capsys):
    assert main(["--model", models[0], "--input", str(tmp_path / "missing.jsonl"), "--output",
                 str(tmp_path / "x.csv")]) == 2
    assert "unknown format '.csv'" in capsys.readouterr().err


def test_ray_interrupted_and_resumed_both_ways(ray_cluster, tmp_path, models, corpus, expected):
    # Each run's finished shards are the other mode's to skip: Ray resumes a local run and
    # a local run resumes Ray's, over both formats in and out.
    on_ray = ["--ray-address", "local", "--num-replicas", "2", "--batch-size", "50"]
    # outputs named like the job's own bookkeeping columns ("__shard", "__i") are outputs all the same
    prefix = ["--output-prefix", "__"]
    for src, dst, first, then in (("jsonl", "parquet", on_ray, []), ("parquet", "jsonl", [], on_ray)):
        inp = write_input(corpus, tmp_path / f"in.{src}")
        out = tmp_path / f"out.{dst}"
        hook, done = stop_after(2)
        with pytest.raises(Stop):
            job(models[0], inp, out, *first, *prefix, hook=hook)
        resumed = []
        job(models[0], inp, out, *then, *prefix, hook=resumed.append)
        assert sorted(done + resumed) == [0, 1, 2, 3, 4], f"{src}->{dst}: a shard was redone or skipped"
        check([{**r, "probs": r["__probs"], "label": r["__label"]} for r in read_output(out)], corpus, expected)


def test_local_with_a_lora_adapter(tmp_path, models, corpus):
    """--lora: every row runs with the adapter, as LLM.classify with its LoRARequest."""
    pytest.importorskip("peft")
    from test_lora import make_adapter

    from pyengine import LoRARequest

    adapter = make_adapter(models[0], tmp_path / "adapter", seed=4, target_modules=["query", "dense"])
    inp = write_input(corpus, tmp_path / "in.jsonl")
    assert job(models[0], inp, tmp_path / "out.jsonl", "--lora", str(adapter), "--max-lora-rank", "4") == N
    want = LLM(models[0], enable_lora=True).classify([r["text"] for r in corpus], use_tqdm=False,
                                                     lora_request=LoRARequest("a", 1, str(adapter)))
    rows = read_output(tmp_path / "out.jsonl")
    np.testing.assert_allclose([r["probs"] for r in rows], [o.outputs.probs for o in want], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="over max_lora_rank=2"):
        job(models[0], inp, tmp_path / "out2.jsonl", "--lora", str(adapter), "--max-lora-rank", "2")


def test_local_pairs_with_a_score_template(tmp_path, models, corpus):
    """--score-template renders each pair (as LLM.score(score_template=...)); it needs
    --pair-column, and a bad template fails before any work."""
    template = tmp_path / "t.jinja"
    template.write_text("question: {{ query }} passage: {{ document }}")
    inp = write_input(corpus, tmp_path / "in.jsonl")
    job(models[1], inp, tmp_path / "out.jsonl", "--pair-column", "text_2", "--score-template", str(template))
    want = LLM(models[1]).score([r["text"] for r in corpus], [r["text_2"] for r in corpus],
                                score_template=str(template), use_tqdm=False)
    got = [r["score"] for r in read_output(tmp_path / "out.jsonl")]
    np.testing.assert_allclose(got, [o.outputs.score for o in want], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="needs --pair-column"):
        job(models[1], inp, tmp_path / "o2.jsonl", "--score-template", str(template))
    (tmp_path / "bad.jinja").write_text("{{ query }} {% if document %}")
    with pytest.raises(ValueError, match="Jinja syntax error"):
        job(models[1], inp, tmp_path / "o3.jsonl", "--pair-column", "text_2", "--score-template",
            str(tmp_path / "bad.jinja"))
    assert not os.path.exists(tmp_path / "o3.jsonl")


@pytest.mark.parametrize("rows,match", [
    # a field's type changes between two chunks of the scan (chunks of 64 rows here)
    ([{"text": "a b", "tag": i if i < 64 else f"t{i}"} for i in range(100)],
     r"field 'tag' holds int64 in lines 1\.\.64 and string in lines 65\.\.100"),
    # ... and inside one chunk: the first row that does not fit is named
    ([{"text": "a b", "tag": i if i < 10 else f"t{i}"} for i in range(20)], r"line 11 \(row 10\), field 'tag'"),
    ([{"text": "a b", "n": 1}, {"text": "c", "n": 2 ** 64}], r"line 2 \(row 1\), field 'n'"),
    ([{"text": "a b", "meta": {}}, {"text": "c", "meta": {}}], r"field 'meta' holds only empty objects"),
    ([{"text": "a b", "note": "ok"}, {"text": "c", "note": "cut \ud83d"}], r"line 2 \(row 1\), field 'note'"),
])
def test_jsonl_to_parquet_fields_keep_one_type(tmp_path, models, monkeypatch, rows, match):
    """A Parquet column holds one type: a JSONL field that changes type, or a value
    Parquet cannot hold, fails the job before any shard is scored, naming field and line."""
    pytest.importorskip("pyarrow")
    from pyengine import batch_io

    monkeypatch.setattr(batch_io._SchemaScan, "CHUNK", 64)
    inp = write_input(rows, tmp_path / "in.jsonl")
    with pytest.raises(ValueError, match=match):
        job(models[0], inp, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet.parts").exists()
    # JSONL keeps each value as it is
    assert job(models[0], inp, tmp_path / "out.jsonl") == len(rows)
    assert [{k: r[k] for k in rows[0]} for r in read_output(tmp_path / "out.jsonl")] == rows


def test_jsonl_to_parquet_widens_and_fills(tmp_path, models, monkeypatch):
    """Ints and floats of one field become one float column; a field some rows lack (or
    hold null) is null there; every shard is written with the file's one schema."""
    pytest.importorskip("pyarrow")
    from pyengine import batch_io

    monkeypatch.setattr(batch_io._SchemaScan, "CHUNK", 64)
    # extra from row 150 on (the middle of the third chunk); late only in row 70 (the middle
    # of the second): a field the first row of every chunk lacks is kept all the same
    rows = [{"text": f"a b {WORDS[i % len(WORDS)]}", "w": i if i % 3 else i + 0.5,
             **({"extra": [i, i + 1]} if i >= 150 else {}), **({"late": {"k": i}} if i == 70 else {})}
            for i in range(N)]
    # an int past 2^53 in a chunk of ints, in a field that later chunks make a float column
    for i in range(N):
        rows[i]["big"] = 2 ** 53 + 1 if i == 10 else (i if i < 64 else i + 0.25)
    assert N > 192
    inp = write_input(rows, tmp_path / "in.jsonl")
    assert job(models[0], inp, tmp_path / "out.parquet") == N
    got = read_output(tmp_path / "out.parquet")
    assert [r["w"] for r in got] == [float(r["w"]) for r in rows]
    assert [r["extra"] for r in got] == [r.get("extra") for r in rows]
    assert [r["late"] for r in got] == [r.get("late") for r in rows]
    assert [r["big"] for r in got] == [float(r["big"]) for r in rows]


def test_text_that_is_not_unicode_and_nan_values(tmp_path, models):
    """A lone surrogate in a prompt fails the scan; elsewhere JSONL output escapes it, and
    a NaN read from Parquet is written as null (strict JSON)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    inp = write_input([{"text": "a b"}, {"text": "c \udc80 d"}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"line 2 \(row 1\), field 'text': not valid Unicode"):
        job(models[0], inp, tmp_path / "bad_out.jsonl")
    inp = write_input([{"text": "a b", "note": "x \ud83d"}], tmp_path / "note.jsonl")
    job(models[0], inp, tmp_path / "note_out.jsonl")
    raw = (tmp_path / "note_out.jsonl").read_bytes()
    assert b"\\ud83d" in raw and json.loads(raw)["note"] == "x \ud83d"
    pq.write_table(pa.table({"text": ["a b", "c"], "w": [float("nan"), 1.5]}), tmp_path / "nan.parquet")
    job(models[0], str(tmp_path / "nan.parquet"), tmp_path / "nan_out.jsonl")

    def strict(s):
        raise ValueError(f"not JSON: {s}")
    got = [json.loads(line, parse_constant=strict) for line in open(tmp_path / "nan_out.jsonl")]
    assert [r["w"] for r in got] == [None, 1.5]


def test_token_ids_outside_the_vocabulary_fail_the_scan(tmp_path, models):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"ids": [2, 5, 3]} for _ in range(100)]
    rows[70] = {"ids": [2, 160, 3]}  # the tiny models' vocabulary is [0, 160)
    inp = write_input(rows, tmp_path / "in.jsonl")
    with pytest.raises(ValueError, match=r"line 71 \(row 70\), field 'ids': token id 160 is outside"):
        job(models[0], inp, tmp_path / "out.jsonl", "--token-ids-column", "ids")
    pq.write_table(pa.table({"ids": [r["ids"] for r in rows]}), tmp_path / "in.parquet", row_group_size=32)
    with pytest.raises(ValueError, match=r"row 70, column 'ids': token id 160 is outside"):
        job(models[0], str(tmp_path / "in.parquet"), tmp_path / "out.jsonl", "--token-ids-column", "ids")
    assert not (tmp_path / "out.jsonl.parts").exists()


def test_a_job_that_failed_before_any_shard_does_not_block_the_next(tmp_path, models, corpus):
    long = [{"id": i, "text": " ".join(["cat"] * (80 if i == 70 else 3))} for i in range(100)]
    inp = write_input(long, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    # Row 70 is over the 64-token limit: shard 1 fails, shard 0 stays.
    with pytest.raises(ValueError,
                       match=r"input row 70 \(shard 1\): column 'text': has 82 tokens, more than max_model_len=64"):
        job(models[0], inp, out)
    with pytest.raises(ValueError, match="different job.*truncate_prompt_tokens"):
        job(models[0], inp, out, "--truncate-prompt-tokens", "-1")
    # Failing in shard 0, nothing is kept: the corrected run takes the folder over.
    inp0 = write_input(long[70:], tmp_path / "in0.jsonl")
    with pytest.raises(ValueError, match=r"input row 0 \(shard 0\)"):
        job(models[0], inp0, tmp_path / "out0.jsonl")
    assert job(models[0], inp0, tmp_path / "out0.jsonl", "--truncate-prompt-tokens", "-1") == 30
    # With -1 the token budget may set the limit: a resumed run must keep it.
    hook, _ = stop_after(1)
    with pytest.raises(Stop):
        job(models[0], inp, tmp_path / "o2.jsonl", "--truncate-prompt-tokens", "-1", "--max-num-batched-tokens", "32",
            hook=hook)
    with pytest.raises(ValueError, match="different job.*max_num_batched_tokens"):
        job(models[0], inp, tmp_path / "o2.jsonl", "--truncate-prompt-tokens", "-1")


def test_ray_input_error_names_the_row(ray_cluster, tmp_path, models):
    rows = [{"text": " ".join(["cat"] * (80 if i == 70 else 3))} for i in range(100)]
    inp = write_input(rows, tmp_path / "in.jsonl")
    with pytest.raises(ValueError, match=r"^input row 70 \(shard 1\): column 'text': has 82 tokens"):
        job(models[0], inp, tmp_path / "out.jsonl", "--ray-address", "local", "--num-replicas", "1")


def test_row_errors_restated_for_the_input_file():
    """An engine or classifier error about a row of one call names the input row and shard
    instead (where(j) -> (shard, row)), keeping the columns it names."""
    from pyengine.batch_job import _name_row

    def where(j):
        return 2, 100 + j
    assert _name_row("prompts[3] has 9 tokens", where) == "input row 103 (shard 2): has 9 tokens"
    assert (_name_row("columns 'q', 'd', row 3 of this batch: has 9 tokens", where)
            == "input row 103 (shard 2): columns 'q', 'd': has 9 tokens")
    assert _name_row("column 'ids', row 0 of this batch: bad", where) == "input row 100 (shard 2): column 'ids': bad"
    assert _name_row("the model failed", where) == "the model failed"


def test_binary_columns_and_lost_manifests(tmp_path, models, corpus, expected):
    """Parquet binary values reach JSONL as base64 (no byte lost); shards left without their
    manifest (a cleanup cut short) are refused, not taken as this job's; an output path that
    is a folder is refused before any work."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    blobs = [bytes([i % 256, 255, 0, (7 * i) % 256]) for i in range(N)]
    pq.write_table(pa.table({"id": list(range(N)), "text": [r["text"] for r in corpus], "blob": blobs}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out.jsonl"
    hook, done = stop_after(2)
    with pytest.raises(Stop):
        job(models[0], str(tmp_path / "in.parquet"), out, hook=hook)
    os.remove(str(out) + ".parts/manifest.json")
    with pytest.raises(ValueError, match="holds shards but no manifest.json"):
        job(models[0], str(tmp_path / "in.parquet"), out, "--no-activation")
    job(models[0], str(tmp_path / "in.parquet"), out, "--overwrite")
    rows = read_output(out)
    check(rows, corpus, expected)
    assert [base64.b64decode(r["blob"]) for r in rows] == blobs
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        job(models[0], str(tmp_path / "in.parquet"), tmp_path / "dir.parquet", "--overwrite")


def _utf8_column(pa, raw):
    """A Parquet string column holding ``raw`` bytes as they are (writers need not check UTF-8)."""
    offsets = np.cumsum([0] + [len(b) for b in raw]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(raw), [None, pa.py_buffer(offsets.tobytes()),
                                                         pa.py_buffer(b"".join(raw))])


def test_values_json_or_parquet_cannot_take_plainly(tmp_path, models):
    """Values that used to fail a shard after scoring: Parquet dates past year 9999 and
    strings that are not UTF-8 reach JSONL as text (the bytes recoverable), a prompt that is
    not UTF-8 fails the scan naming its row, a NaN nested past Python's recursion limit is
    null, and a field nested deeper than Parquet readers take fails before any work."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [" ".join(random.Random(i).choice(WORDS) for _ in range(3)) for i in range(80)]
    days = [i * 50_000 for i in range(80)]  # from 1970 on; past year 9999 from row 59 (shard 0 has none)
    notes = [f"n{i}".encode() + (b"\xff\xfe" if i % 9 == 4 else b"") for i in range(80)]
    pq.write_table(pa.table({"text": texts, "d": pa.array(days, pa.date32()), "note": _utf8_column(pa, notes)}),
                   tmp_path / "in.parquet", row_group_size=32)
    job(models[0], str(tmp_path / "in.parquet"), tmp_path / "out.jsonl")
    got = read_output(tmp_path / "out.jsonl")
    assert [r["d"] for r in got] == pa.array(days, pa.date32()).cast(pa.string()).to_pylist()
    assert any(int(r["d"][:r["d"].index("-")]) > 9999 for r in got)
    assert [r["note"].encode("utf-8", "surrogateescape") for r in got] == notes
    want = np.array([o.outputs.probs for o in LLM(models[0]).classify(texts, use_tqdm=False)])
    np.testing.assert_allclose(np.array([r["probs"] for r in got]), want, atol=ATOL, rtol=0)

    bad = [t.encode() for t in texts]
    bad[45] = b"cat \xc3("  # a two-byte sequence cut short
    pq.write_table(pa.table({"text": _utf8_column(pa, bad)}), tmp_path / "bad.parquet", row_group_size=32)
    with pytest.raises(ValueError, match=r"row 45, column 'text': not valid UTF-8 \(invalid continuation byte"):
        job(models[0], str(tmp_path / "bad.parquet"), tmp_path / "bad.parquet.jsonl")
    assert not (tmp_path / "bad.parquet.jsonl.parts").exists()

    deep = "NaN"
    for _ in range(700):  # deeper than a recursive walk of the value could go
        deep = f"[{deep}, 1.5]"
    (tmp_path / "deep.jsonl").write_text('{"text": "a b", "x": %s}\n{"text": "c", "x": [2.5]}\n' % deep)
    job(models[0], str(tmp_path / "deep.jsonl"), tmp_path / "deep_out.jsonl")
    x = read_output(tmp_path / "deep_out.jsonl")[0]["x"]
    for _ in range(700):
        assert x[1] == 1.5
        x = x[0]
    assert x is None
    lists = json.dumps(functools.reduce(lambda v, _: [v], range(50), 2.5))  # 101 levels with the root
    (tmp_path / "deep.jsonl").write_text('{"text": "a b", "x": %s}\n{"text": "c"}\n' % lists)
    with pytest.raises(ValueError, match="field 'x' nests deeper than Parquet readers take"):
        job(models[0], str(tmp_path / "deep.jsonl"), tmp_path / "deep_out.parquet")
    assert not (tmp_path / "deep_out.parquet.parts").exists()


@pytest.mark.parametrize("wrap, n", [
    (lambda v: [v], 49), (lambda v: [v], 50),                      # lists: 2 levels each
    (lambda v: {"a": v}, 98), (lambda v: {"a": v}, 99),            # objects: 1 level each
    (lambda v: {"a": [v]}, 32), (lambda v: {"a": [v]}, 33),        # both
])
def test_parquet_depth_rule_matches_the_reader(tmp_path, wrap, n):
    """The scan's depth rule says a file is unreadable exactly when Arrow's reader refuses it."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from pyengine.batch_io import _parquet_levels

    table = pa.table({"x": [functools.reduce(lambda v, _: wrap(v), range(n), 1.5)]})
    pq.write_table(table, tmp_path / "t.parquet")
    try:
        pq.read_table(tmp_path / "t.parquet")
        readable = True
    except OSError as e:
        assert "too deeply nested" in str(e)
        readable = False
    assert (1 + _parquet_levels(table.schema.field("x").type) <= 100) == readable
