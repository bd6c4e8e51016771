"""CUDA graphs of a model's forward, one per bucket of batch shapes.

A small encoder is host-bound on a fast GPU: BERT-base launches about 130 kernels per
batch, and with Python around each launch the host takes longer than the GPU's few
milliseconds of work. A graph replays the whole forward in one call. Graphs fix every
shape and address, so a batch is padded to a bucket (tokens, sequences) and its
indices copied into one static device buffer; the graph of that bucket is captured the
first time it is needed, right after that batch runs eagerly (which compiles the Triton
kernels for the shape and lets cuBLAS pick its kernels), and replayed from then on.

Padding stays inside the ragged-batch contract (see RaggedBatch.build_padded): the
spare sequences are short and come after the real ones, whose rows and results they
never touch. A batch whose sequences all run one LoRA adapter has graphs of its own, per
bucket and adapter: the adapter's weights are baked in, and its deltas cover the padding
rows too (their results are dropped), so the bounds are the bucket's. Its graphs are
dropped when the adapter is (GraphRunner.forget). Results are read from the graph's
static output, so they must be consumed (queued copies are enough) before the next
replay; replays and copies are ordered on the current stream.
"""
from __future__ import annotations

import bisect
import warnings

import torch

from .batch import RaggedBatch
from .lora import LoRABatch

# Below this many tokens, buckets are multiples of _FINE; above, multiples of _COARSE.
# At most _COARSE - 1 padding tokens on a full batch of 16k is 1.6% more work; finer
# steps would mean more graphs to capture.
_FINE, _COARSE, _SWITCH = 128, 256, 2048
# Sequence buckets: 1, 2, 4, 8, then multiples of 16. Each padding sequence is one
# more (tiny) attention tile per head, so coarser steps cost GPU time.
_SEQ_STEP = 16


def wanted(device, enforce_eager: bool, model, ops) -> bool:
    """Whether the engine runs ``model`` through graphs: on a CUDA device, unless
    enforce_eager, for a model that lists the ops its forward calls (``graph_ops``: it
    reads nothing back to the host itself) when none of those ops does either."""
    graph_ops = getattr(model, "graph_ops", None)
    return torch.device(device).type == "cuda" and not enforce_eager and bool(graph_ops) \
        and ops.capturable(graph_ops)


def token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts up to and including max_tokens, ascending."""
    out = list(range(_FINE, min(_SWITCH, max_tokens) + 1, _FINE))
    out += range(max(_SWITCH, _FINE) + _COARSE, max_tokens + 1, _COARSE)
    if not out or out[-1] != max_tokens:
        out.append(max_tokens)
    return out


def seq_buckets(max_seqs: int) -> list[int]:
    """Padded sequence counts up to and including max_seqs, ascending."""
    out = [b for b in (1, 2, 4, 8) if b < max_seqs]
    out += range(_SEQ_STEP, max_seqs, _SEQ_STEP)
    out.append(max_seqs)
    return sorted(set(out))


class GraphRunner:
    """Runs ``model(batch) -> (B, L)`` through a CUDA graph of the batch's bucket.

    model: the engine's model; max_tokens, max_seqs: the most tokens and sequences a
    batch holds; max_seqlen: the longest sequence a batch can hold (the bound every graph
    is captured with); max_graphs: captures stop there and later new buckets run eagerly.
    A batch always gets at least one padding sequence, so the buckets reach past
    max_tokens and max_seqs.
    """

    def __init__(self, model, max_tokens: int, max_seqs: int, max_seqlen: int, device, max_graphs: int = 128):
        self.model = model
        self.device = torch.device(device)
        self.max_seqlen = max_seqlen
        self.max_graphs = max_graphs
        self.tokens = token_buckets(max_tokens + max_seqs)
        # Room for the padding sequences of a full batch even when the model's positions
        # are few: up to _COARSE spare tokens at max_seqlen each.
        self.seqs = seq_buckets(max_seqs + 1 + -(-_COARSE // max_seqlen))
        nbytes = RaggedBatch.padded_nbytes(self.tokens[-1], self.seqs[-1])
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        # (padded tokens, padded sequences, adapter key or 0) -> (replay, static output,
        # the adapter, whose weights the graph reads: kept alive as long as the graph).
        self.graphs: dict[tuple[int, int, int], tuple[object, torch.Tensor, object]] = {}
        self.pool = None  # one memory pool for every graph: their replays never overlap
        self.eager_runs = 0  # batches run without a replay (a bucket's first, buckets past max_graphs)
        self.disabled: str | None = None  # why graphs were turned off, after a failed capture

    def bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int] | None:
        """(padded tokens, padded sequences) for a batch, or None when no bucket holds it.
        There is always at least one padding sequence (they take the spare tokens); each
        needs a token of its own and may hold at most max_seqlen (the model has no
        positions past that)."""
        for Bp in self.seqs[bisect.bisect_left(self.seqs, num_seqs + 1):]:
            spare = Bp - num_seqs
            j = bisect.bisect_left(self.tokens, num_tokens + spare)
            if j == len(self.tokens):
                return None  # more sequences would only need more tokens
            if self.tokens[j] - num_tokens <= spare * self.max_seqlen:
                return self.tokens[j], Bp
        return None

    def __call__(self, token_ids, token_type_ids=None, lora=None) -> torch.Tensor | None:
        """Forward one batch (the arguments of RaggedBatch.build; lora: None, or the one
        LoRAAdapter of all its sequences). Returns (B, L) on the device, a view of the
        graph's output valid until the next call; None when the batch fits no bucket or a
        capture failed (the caller runs it eagerly)."""
        if self.disabled:
            return None
        shape = self.bucket(sum(len(t) for t in token_ids), len(token_ids))
        if shape is None:
            return None
        T_b, B_b = shape
        batch = RaggedBatch.build_padded(token_ids, token_type_ids, T_b, B_b, min(T_b, self.max_seqlen),
                                         self.buffer)
        B = len(token_ids)
        key = (T_b, B_b, 0 if lora is None else lora.key)
        entry = self.graphs.get(key)
        if entry is not None:
            replay, out, _ = entry
            replay()
            return out[:B]
        lora_batch = None if lora is None else LoRABatch.whole(lora, B_b, T_b)
        # A new bucket runs eagerly first, on the current stream: Triton compiles for this
        # shape and cuBLAS creates its workspaces, neither of which may happen during a
        # capture. Its output is this batch's result (a capture runs nothing), and an
        # error here is this batch's, as without graphs.
        out = self._forward(batch, lora_batch)[:B]
        self.eager_runs += 1
        if len(self.graphs) < self.max_graphs:
            try:
                self.graphs[key] = (*self._capture(batch, lora_batch), lora)
            except Exception as e:
                # The eager path still works; one failed capture turns graphs off for good
                # rather than failing again on every new shape.
                self.disabled = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture failed, running eagerly from now on: {self.disabled}",
                              RuntimeWarning, stacklevel=2)
        return out

    def forget(self, adapter_key: int):
        """Drop the graphs of the adapter with this key (it was unloaded or evicted), so
        they no longer hold its weights."""
        for key in [k for k in self.graphs if k[2] == adapter_key]:
            del self.graphs[key]

    def _forward(self, batch, lora_batch):
        return self.model(batch) if lora_batch is None else self.model(batch, lora_batch)

    def _capture(self, batch, lora_batch):
        """Capture the forward of ``batch`` (with ``lora_batch``'s adapter, or none) after
        an eager run of the same shape. Returns (replay, static output)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server may touch CUDA from another thread meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(batch, lora_batch)
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, out
