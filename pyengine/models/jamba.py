"""Jamba (attention + Mamba layers, MoE feed-forwards) over packed tokens.

Reward models such as Jamba-tiny-reward-dev are JambaForSequenceClassification: a
score head on the true last token. The Mamba mixer runs on the packed tokens with
per-sequence state: its causal convolution reads no token before its sequence's start
(``ops.causal_conv1d`` masks taps by position) and the selective scan starts every
sequence from a zero state (``ops.selective_scan``). Attention layers have no
positional encoding (Mamba layers carry order), GQA, causal masks. Every layer is
pre-norm RMSNorm; feed-forwards are SwiGLU MLPs or top-k MoE blocks (softmax router,
weights not renormalised, as transformers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loader import WeightSink


def _p(*shape, dtype, device):
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class JambaForSequenceClassification(nn.Module):
    """forward(batch) -> (B, num_labels) fp32 logits of the pooled rows."""

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        super().__init__()
        self.config, self.arch, self.ops = config, arch, ops
        H, I = config.hidden_size, config.intermediate_size
        nh, nkv = config.num_attention_heads, config.num_key_value_heads
        hd = getattr(config, "head_dim", None) or H // nh
        if nh % nkv:
            raise ValueError(f"{arch}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"{arch}: hidden_act={config.hidden_act!r} is not supported (only 'silu')")
        if getattr(config, "classifier_from_token", None) is not None:
            raise ValueError(f"{arch}: classifier_from_token is not supported for Jamba")
        self.nh, self.nkv, self.hd, self.eps = nh, nkv, hd, config.rms_norm_eps
        self.Ci, self.N, self.R = config.mamba_expand * H, config.mamba_d_state, config.mamba_dt_rank
        K = config.mamba_d_conv
        self.kinds = list(config.layers_block_type)
        self.experts = list(config.layers_num_experts)
        self.top_k = config.num_experts_per_tok
        self.num_labels, self.vocab_size = config.num_labels, config.vocab_size
        self.max_model_len = config.max_position_embeddings
        self.type_vocab = 0
        if pooling not in (None, "last", "cls", "mean"):
            raise ValueError(f"{arch}: pooling {pooling!r} is not one of cls, last, mean")
        self.pooling = pooling or "last"
        kw = dict(dtype=dtype, device=device)
        pb, cb = bool(config.mamba_proj_bias), bool(config.mamba_conv_bias)
        Ci, N, R = self.Ci, self.N, self.R
        self.embed = _p(config.vocab_size, H, **kw)
        self.layers = nn.ModuleList()
        for kind, n_exp in zip(self.kinds, self.experts):
            m = nn.Module()
            m.ln1_w, m.ln2_w = _p(H, **kw), _p(H, **kw)
            if kind == "attention":
                m.qkv_w, m.o_w = _p((nh + 2 * nkv) * hd, H, **kw), _p(H, nh * hd, **kw)
            elif kind == "mamba":
                m.in_w, m.in_b = _p(2 * Ci, H, **kw), (_p(2 * Ci, **kw) if pb else None)
                m.conv_w, m.conv_b = _p(Ci, K, **kw), (_p(Ci, **kw) if cb else None)
                m.x_w, m.dt_w, m.dt_b = _p(R + 2 * N, Ci, **kw), _p(Ci, R, **kw), _p(Ci, **kw)
                m.A_log, m.D = _p(Ci, N, dtype=torch.float32, device=device), _p(Ci, **kw)
                m.out_w, m.out_b = _p(H, Ci, **kw), (_p(H, **kw) if pb else None)
                m.dt_ln, m.b_ln, m.c_ln = _p(R, **kw), _p(N, **kw), _p(N, **kw)
            else:
                raise ValueError(f"{arch}: unknown layer type {kind!r}")
            if n_exp > 1:
                m.router_w = _p(n_exp, H, **kw)
                m.experts = nn.ModuleList()
                for _ in range(n_exp):
                    e = nn.Module()
                    e.gate_up_w, e.down_w = _p(2 * I, H, **kw), _p(H, I, **kw)
                    m.experts.append(e)
            else:
                m.gate_up_w, m.down_w = _p(2 * I, H, **kw), _p(H, I, **kw)
            self.layers.append(m)
        f32 = dict(dtype=torch.float32, device=device)
        self.norm_w = _p(H, **f32)
        self.score_w = _p(self.num_labels, H, **f32)

    @property
    def default_pooling(self):
        return self.pooling

    # ------------------------------------------------------------------ forward
    def _attention(self, layer, h, batch, rows):
        nh, nkv, hd = self.nh, self.nkv, self.hd
        q, k, v = F.linear(h, layer.qkv_w).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(-1, nh, hd), k.view(-1, nkv, hd), v.view(-1, nkv, hd)
        if rows is None:
            out = self.ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, causal=True,
                                            scale=hd ** -0.5)
        else:
            out = self.ops.pooled_query_attention(q[rows], k, v, batch.cu_seqlens, batch.max_seqlen,
                                                  batch.positions[rows], causal=True, scale=hd ** -0.5)
        return F.linear(out.reshape(out.shape[0], nh * hd), layer.o_w)

    def _mamba(self, layer, h, batch, rows):
        ops, N, R = self.ops, self.N, self.R
        xs, z = F.linear(h, layer.in_w, layer.in_b).chunk(2, dim=-1)
        xs = ops.causal_conv1d(xs, layer.conv_w, layer.conv_b, batch.positions, "silu")
        dt, B, C = F.linear(xs, layer.x_w).split([R, N, N], dim=-1)
        dt = ops.add_rms_norm(dt, None, layer.dt_ln, self.eps)[0]
        B = ops.add_rms_norm(B, None, layer.b_ln, self.eps)[0]
        C = ops.add_rms_norm(C, None, layer.c_ln, self.eps)[0]
        y = ops.selective_scan(xs, F.linear(dt, layer.dt_w), -torch.exp(layer.A_log), B, C, layer.D, z,
                               layer.dt_b, batch.cu_seqlens, batch.max_seqlen)
        if rows is not None:  # the scan needs every token; the projection only the pooled ones
            y = y[rows]
        return F.linear(y, layer.out_w, layer.out_b)

    def _ffn(self, layer, h):
        if not hasattr(layer, "experts"):
            return F.linear(self.ops.gated_act(F.linear(h, layer.gate_up_w), "silu"), layer.down_w)
        probs = torch.softmax(F.linear(h, layer.router_w).float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = weights.to(h.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(layer.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            y = F.linear(self.ops.gated_act(F.linear(h[tok], expert.gate_up_w), "silu"), expert.down_w)
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out

    def forward(self, batch):
        cu = batch.cu_seqlens.long()
        rows = {"last": cu[1:] - 1, "cls": cu[:-1]}.get(self.pooling)
        pool_cu, pooling = batch.cu_seqlens, self.pooling
        if rows is not None:  # the last layer's outputs exist for the pooled rows only
            pool_cu, pooling = torch.arange(rows.numel() + 1, dtype=torch.int32, device=rows.device), "cls"
        x = F.embedding(batch.input_ids, self.embed)
        h, res = self.ops.add_rms_norm(x, None, self.layers[0].ln1_w, self.eps)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            r = rows if i == last else None
            mix = self._attention if self.kinds[i] == "attention" else self._mamba
            a = mix(layer, h, batch, r)
            if r is not None:
                res = res[r]
            h, res = self.ops.add_rms_norm(a, res, layer.ln2_w, self.eps)
            m = self._ffn(layer, h)
            if i < last:
                h, res = self.ops.add_rms_norm(m, res, self.layers[i + 1].ln1_w, self.eps)
        pooled = self.ops.pooled_norm(m, pool_cu, pooling, "rms", self.norm_w, None, self.eps, residual=res)
        return F.linear(pooled, self.score_w)

    # ------------------------------------------------------------------ weights
    def _targets(self, name, t):
        """Checkpoint name -> list of (param, rows, tensor)."""
        if name == "score.weight":
            return [("score_w", None, t)]
        if not name.startswith("model."):
            return []
        rest = name[len("model."):]
        if rest == "embed_tokens.weight":
            return [("embed", None, t)]
        if rest == "final_layernorm.weight":
            return [("norm_w", None, t)]
        parts = rest.split(".")
        if parts[0] != "layers":
            return []
        i, key = int(parts[1]), ".".join(parts[2:])
        p = f"layers.{i}."
        nh, nkv, hd, I = self.nh, self.nkv, self.hd, self.config.intermediate_size
        qkv = {"q": slice(0, nh * hd), "k": slice(nh * hd, (nh + nkv) * hd),
               "v": slice((nh + nkv) * hd, (nh + 2 * nkv) * hd)}
        gu = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I)}
        if key.startswith("self_attn.") and key[10] in qkv and key.endswith("_proj.weight"):
            return [(p + "qkv_w", qkv[key[10]], t)]
        simple = {"input_layernorm.weight": "ln1_w", "pre_ff_layernorm.weight": "ln2_w", "self_attn.o_proj.weight": "o_w",
                  "mamba.in_proj.weight": "in_w", "mamba.in_proj.bias": "in_b", "mamba.conv1d.bias": "conv_b",
                  "mamba.x_proj.weight": "x_w", "mamba.dt_proj.weight": "dt_w", "mamba.dt_proj.bias": "dt_b",
                  "mamba.A_log": "A_log", "mamba.D": "D", "mamba.out_proj.weight": "out_w",
                  "mamba.out_proj.bias": "out_b", "mamba.dt_layernorm.weight": "dt_ln",
                  "mamba.b_layernorm.weight": "b_ln", "mamba.c_layernorm.weight": "c_ln",
                  "feed_forward.router.weight": "router_w", "feed_forward.down_proj.weight": "down_w"}
        if key in simple:
            return [(p + simple[key], None, t)]
        if key == "mamba.conv1d.weight":  # (C, 1, K)
            return [(p + "conv_w", None, t.reshape(t.shape[0], -1))]
        ff = key.split(".")
        if len(ff) == 3 and ff[0] == "feed_forward" and ff[1] in gu:
            return [(p + "gate_up_w", gu[ff[1]], t)]
        if len(ff) == 5 and ff[:2] == ["feed_forward", "experts"]:
            e = f"{p}experts.{ff[2]}."
            return [(e + "gate_up_w", gu[ff[3]], t)] if ff[3] in gu else [(e + "down_w", None, t)]
        if key == "feed_forward.experts.gate_up_proj":  # stacked (E, 2I, H), [gate | up]
            return [(f"{p}experts.{e}.gate_up_w", None, t[e]) for e in range(t.shape[0])]
        if key == "feed_forward.experts.down_proj":
            return [(f"{p}experts.{e}.down_w", None, t[e]) for e in range(t.shape[0])]
        return []

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        sink = WeightSink(params, f"{self.arch} ({type(self).__name__})")
        for name, t in weights:
            for target, rows, src in self._targets(name, t):
                if target not in params:
                    raise ValueError(f"{self.arch}: checkpoint weight {name!r} does not fit the config "
                                     f"(no parameter {target!r})")
                sink.put(target, src, rows=rows)
        if "score_w" not in sink.seen:
            raise ValueError(f"{self.arch}: the checkpoint has no classifier head (score.weight)")
        I, nh, nkv, hd = self.config.intermediate_size, self.nh, self.nkv, self.hd
        split = {"qkv_w": [slice(0, nh * hd), slice(nh * hd, (nh + nkv) * hd),
                           slice((nh + nkv) * hd, (nh + 2 * nkv) * hd)],
                 "gate_up_w": [slice(0, I), slice(I, 2 * I)]}
        expected = []
        for n in params:
            leaf = n.rsplit(".", 1)[-1]
            if leaf in split and n not in sink.seen:  # filled piece by piece
                expected += [f"{n}[{s}]" for s in split[leaf]]
            else:
                expected.append(n)
        sink.check(expected)
