"""DeBERTa-v2/v3 classifiers (``DebertaV2ForSequenceClassification``: DeBERTa-v3 and mDeBERTa
cross-encoders, NLI and reward models) over packed tokens.

A post-norm BERT-style encoder whose attention adds disentangled relative-position terms
to the content scores: with r = bucket(i - j) (log buckets beyond ``position_buckets``/2),
score(i, j) = (q_i.k_j + q_i.Kr[r] + k_j.Qr[-r]) / sqrt(3 d), where Kr, Qr are the
relative embeddings (LayerNormed once) through the key and query projections
(``share_att_key``) or their own ones. The relative terms depend only on i - j, so the
attention runs per group of like-length sequences, padded within the group (the keys past
each sequence masked), in torch: no fused kernel takes the two gathered bias terms, and
the per-group shapes keep the forward out of CUDA graphs. The head is the context pooler
(dense + ``pooler_hidden_act`` on the [CLS] row) and the classifier, in fp32.
Variants with a convolution layer (``conv_kernel_size``) are refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _length_groups
from .bert import _ACTS, _p, post_norm_layer
from .loader import WeightSink


def log_buckets(rel, buckets, max_position):
    """Relative positions -> DeBERTa's buckets: exact within +-buckets/2, logarithmic
    beyond, up to max_position. rel: int64 tensor. Returns int64."""
    mid = buckets // 2
    sign = torch.sign(rel)
    near = (rel < mid) & (rel > -mid)
    dist = torch.where(near, torch.full_like(rel, mid - 1), rel.abs()).double()
    far = torch.ceil(torch.log(dist / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return torch.where(dist <= mid, rel.double(), far * sign).long()


class DebertaV2ForSequenceClassification(nn.Module):
    """forward(batch) -> (B, num_labels) fp32 logits of the [CLS] rows."""

    default_pooling = "cls"
    # No graph_ops: the attention reads sequence lengths on the host (see the module doc).
    lora_weights = ()
    head_params = ("pool_w", "pool_b", "out_w", "out_b")

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        super().__init__()
        self.config, self.arch, self.ops = config, arch, ops
        if (pooling or "cls") != "cls":
            raise ValueError(f"{arch}: only [CLS] pooling is supported (its context pooler reads the first token)")
        self.pooling = "cls"
        if getattr(config, "conv_kernel_size", 0):
            raise ValueError(f"{arch}: conv_kernel_size={config.conv_kernel_size} (a convolution beside the first "
                             "layer) is not supported")
        for name, act in (("hidden_act", config.hidden_act), ("pooler_hidden_act",
                                                              getattr(config, "pooler_hidden_act", "gelu"))):
            if act not in _ACTS:
                raise ValueError(f"{arch}: {name}={act!r} is not supported")
        self.act = _ACTS[config.hidden_act]
        self.pool_act = _ACTS[getattr(config, "pooler_hidden_act", "gelu")]
        H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
        E = getattr(config, "embedding_size", None) or H
        self.H, self.nh = H, config.num_attention_heads
        self.hd = getattr(config, "attention_head_size", None) or H // self.nh
        self.eps = config.layer_norm_eps
        self.num_labels, self.vocab_size = config.num_labels, V
        self.max_model_len = config.max_position_embeddings
        self.type_vocab = getattr(config, "type_vocab_size", 0) or 0
        self.pos_types = [t for t in (getattr(config, "pos_att_type", None) or []) if t in ("c2p", "p2c")]
        if sorted(self.pos_types) != sorted(getattr(config, "pos_att_type", None) or []):
            raise ValueError(f"{arch}: pos_att_type={config.pos_att_type} has entries other than c2p and p2c")
        self.relative = bool(getattr(config, "relative_attention", False))
        self.share_att_key = bool(getattr(config, "share_att_key", False))
        buckets = getattr(config, "position_buckets", -1)
        max_rel = getattr(config, "max_relative_positions", -1)
        self.max_rel = max_rel if max_rel >= 1 else config.max_position_embeddings
        self.buckets = buckets
        self.span = buckets if buckets > 0 else self.max_rel
        # c2p and p2c widen the scale whether or not relative attention is on, as transformers does.
        self.scale = (self.hd * (1 + len(self.pos_types))) ** -0.5
        kw, f32 = dict(dtype=dtype, device=device), dict(dtype=torch.float32, device=device)
        self.word = _p(V, E, **kw)
        self.pos = _p(config.max_position_embeddings, E, **kw) if getattr(config, "position_biased_input", True) \
            else None
        self.tok_type = _p(self.type_vocab, E, **kw) if self.type_vocab else None
        self.proj_w = _p(H, E, **kw) if E != H else None
        self.emb_ln_w, self.emb_ln_b = _p(H, **kw), _p(H, **kw)
        A = self.nh * self.hd
        self.layers = nn.ModuleList()
        for _ in range(config.num_hidden_layers):
            m = post_norm_layer(H, I, A, **kw)
            separate = self.relative and not self.share_att_key
            m.pos_k_w, m.pos_k_b = ((_p(A, H, **kw), _p(A, **kw)) if separate and "c2p" in self.pos_types
                                    else (None, None))
            m.pos_q_w, m.pos_q_b = ((_p(A, H, **kw), _p(A, **kw)) if separate and "p2c" in self.pos_types
                                    else (None, None))
            self.layers.append(m)
        norm_rel = "layer_norm" in [s.strip() for s in str(getattr(config, "norm_rel_ebd", "none")).lower().split("|")]
        self.rel = _p(2 * self.span, H, **kw) if self.relative else None
        self.rel_ln_w, self.rel_ln_b = (_p(H, **kw), _p(H, **kw)) if self.relative and norm_rel else (None, None)
        P = getattr(config, "pooler_hidden_size", None) or H
        self.pool_w, self.pool_b = _p(P, H, **f32), _p(P, **f32)
        self.out_w, self.out_b = _p(self.num_labels, P, **f32), _p(self.num_labels, **f32)
        self._index = {}  # device -> (c2p, p2c) gather indices, (N, N) int64, N the longest built yet

    # ------------------------------------------------------------------ forward
    def _rel_index(self, L, device):
        """(c2p, p2c), each (L, L) int64 rows of the relative tables: c2p[i, j] is the Kr row
        query i reads against key j (bucket(i - j)); p2c[j, i] the Qr row key j reads
        against query i (bucket(i - j) negated: the key's view of the same distance). Both
        depend on i - j only, so every length takes views of one pair, built at the
        longest length seen yet (rounded up to a power of two): a pair per length would
        hold 16 L^2 bytes for each one met (hundreds of MB over a corpus)."""
        built = self._index.get(device)
        if built is None or built[0].shape[0] < L:
            n = 1 << max(L - 1, 1).bit_length()
            ar = torch.arange(n, device=device)
            rel = ar[:, None] - ar[None, :]
            if self.buckets > 0:
                rel = log_buckets(rel, self.buckets, self.max_rel)
            c2p = (rel + self.span).clamp(0, 2 * self.span - 1)
            p2c = (-rel + self.span).clamp(0, 2 * self.span - 1)
            built = self._index[device] = (c2p, p2c)
        return built[0][:L, :L], built[1][:L, :L]

    def _attention(self, layer, x, batch, rel):
        """x: (T, H) -> (T, nh * hd), each sequence attending within itself."""
        T, nh, hd, A = x.shape[0], self.nh, self.hd, self.nh * self.hd
        q, k, v = F.linear(x, layer.qkv_w, layer.qkv_b).view(T, 3, nh, hd).unbind(1)
        if self.relative:
            if self.share_att_key:
                pq = F.linear(rel, layer.qkv_w[:A], layer.qkv_b[:A])
                pk = F.linear(rel, layer.qkv_w[A:2 * A], layer.qkv_b[A:2 * A])
            else:
                pk = None if layer.pos_k_w is None else F.linear(rel, layer.pos_k_w, layer.pos_k_b)
                pq = None if layer.pos_q_w is None else F.linear(rel, layer.pos_q_w, layer.pos_q_b)
            pk = None if pk is None else pk.view(-1, nh, hd).transpose(0, 1).float()  # (nh, 2S, hd)
            pq = None if pq is None else pq.view(-1, nh, hd).transpose(0, 1).float()
        out = torch.empty(T, nh, hd, dtype=x.dtype, device=x.device)
        lens, starts = batch.seq_lens, [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        for group in _length_groups(lens):
            L = max(lens[i] for i in group)
            st = torch.tensor([starts[i] for i in group], device=x.device)
            gl = torch.tensor([lens[i] for i in group], device=x.device)
            ar = torch.arange(L, device=x.device)
            valid = ar[None] < gl[:, None]
            idx = torch.where(valid, st[:, None] + ar[None], 0)  # (n, L); padded slots read token 0
            qg, kg, vg = (t[idx].permute(0, 2, 1, 3).float() for t in (q, k, v))  # (n, nh, L, hd)
            s = qg @ kg.transpose(-1, -2)
            if self.relative:
                c2p, p2c = self._rel_index(L, x.device)
                n = len(group)
                if "c2p" in self.pos_types:
                    s = s + torch.gather(qg @ pk.transpose(-1, -2), -1, c2p.expand(n, nh, L, L))
                if "p2c" in self.pos_types:
                    # Gathered per key row j, then laid out [i, j].
                    s = s + torch.gather(kg @ pq.transpose(-1, -2), -1, p2c.expand(n, nh, L, L)).transpose(-1, -2)
            s = (s * self.scale).masked_fill(~valid[:, None, None, :], float("-inf"))
            o = torch.softmax(s, dim=-1) @ vg  # (n, nh, L, hd)
            out[idx[valid]] = o.permute(0, 2, 1, 3)[valid].to(x.dtype)
        return out.view(T, A)

    def forward(self, batch, lora=None):
        x = F.embedding(batch.input_ids, self.word)
        if self.pos is not None:
            x = x + F.embedding(batch.positions, self.pos)
        if self.tok_type is not None:
            x = x + F.embedding(batch.token_type_ids, self.tok_type)
        if self.proj_w is not None:
            x = F.linear(x, self.proj_w)
        x = self.ops.add_layer_norm(x, None, self.emb_ln_w, self.emb_ln_b, self.eps)[0]
        rel = None
        if self.relative:
            rel = self.rel if self.rel_ln_w is None else F.layer_norm(
                self.rel, (self.H,), self.rel_ln_w, self.rel_ln_b, self.eps)
        for layer in self.layers:
            h = F.linear(self._attention(layer, x, batch, rel), layer.o_w, layer.o_b)
            x = self.ops.add_layer_norm(h, x, layer.ln1_w, layer.ln1_b, self.eps)[0]
            h = F.linear(self.act(F.linear(x, layer.up_w, layer.up_b)), layer.down_w, layer.down_b)
            x = self.ops.add_layer_norm(h, x, layer.ln2_w, layer.ln2_b, self.eps)[0]
        cls = self.ops.gather_pooled(x, batch.cu_seqlens, "cls").float()
        return F.linear(self.pool_act(F.linear(cls, self.pool_w, self.pool_b)), self.out_w, self.out_b)

    # ------------------------------------------------------------------ weights
    _TOP = {"deberta.embeddings.word_embeddings.weight": "word",
            "deberta.embeddings.position_embeddings.weight": "pos",
            "deberta.embeddings.token_type_embeddings.weight": "tok_type",
            "deberta.embeddings.embed_proj.weight": "proj_w", "deberta.embeddings.LayerNorm.weight": "emb_ln_w",
            "deberta.embeddings.LayerNorm.bias": "emb_ln_b", "deberta.encoder.rel_embeddings.weight": "rel",
            "deberta.encoder.LayerNorm.weight": "rel_ln_w", "deberta.encoder.LayerNorm.bias": "rel_ln_b",
            "pooler.dense.weight": "pool_w", "pooler.dense.bias": "pool_b", "classifier.weight": "out_w",
            "classifier.bias": "out_b"}
    _LAYER = {"attention.self.pos_key_proj.weight": "pos_k_w", "attention.self.pos_key_proj.bias": "pos_k_b",
              "attention.self.pos_query_proj.weight": "pos_q_w", "attention.self.pos_query_proj.bias": "pos_q_b",
              "attention.output.dense.weight": "o_w", "attention.output.dense.bias": "o_b",
              "attention.output.LayerNorm.weight": "ln1_w", "attention.output.LayerNorm.bias": "ln1_b",
              "intermediate.dense.weight": "up_w", "intermediate.dense.bias": "up_b",
              "output.dense.weight": "down_w", "output.dense.bias": "down_b",
              "output.LayerNorm.weight": "ln2_w", "output.LayerNorm.bias": "ln2_b"}
    _QKV = {"query_proj": 0, "key_proj": 1, "value_proj": 2}

    def param_targets(self, name):
        """Checkpoint name -> [(param, rows of dim 0 or None, None)]."""
        if name in self._TOP:
            return [(self._TOP[name], None, None)] if getattr(self, self._TOP[name], None) is not None else []
        pre = "deberta.encoder.layer."
        if not name.startswith(pre):
            return []
        idx, key = name[len(pre):].split(".", 1)
        proj = key.removeprefix("attention.self.").split(".")[0]
        if key.startswith("attention.self.") and proj in self._QKV:
            A, j = self.nh * self.hd, self._QKV[proj]
            kind = "w" if key.endswith("weight") else "b"
            return [(f"layers.{idx}.qkv_{kind}", slice(j * A, (j + 1) * A), None)]
        if key in self._LAYER and getattr(self.layers[int(idx)], self._LAYER[key]) is not None:
            return [(f"layers.{idx}.{self._LAYER[key]}", None, None)]
        return []

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        sink = WeightSink(params, f"{self.arch} ({type(self).__name__})")
        for name, t in weights:
            if name.startswith("deberta.encoder.conv."):
                raise ValueError(f"{self.arch}: the checkpoint has a convolution layer ({name}), which is not "
                                 "supported")
            for target, rows, _ in self.param_targets(name):
                sink.put(target, t, rows=rows)
        A = self.nh * self.hd
        expected = [n for n in params if ".qkv_" not in n]
        expected += [f"layers.{i}.qkv_{k}[{slice(j * A, (j + 1) * A)}]"
                     for i in range(len(self.layers)) for k in "wb" for j in range(3)]
        sink.check(expected)
