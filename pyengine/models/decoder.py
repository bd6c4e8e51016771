"""Decoder-only transformers over packed tokens, one implementation for many families.

Llama, Mistral, Qwen2, Qwen3 (q/k RMSNorm), Gemma (embedding scale, (1 + w) RMSNorm,
GELU-tanh gate) and GPT-2 (learned positions, LayerNorm, Conv1D weights) are pre-norm
causal stacks that differ only in the options of :class:`Family`. Two bidirectional
relatives ride on the same code: LlamaBidirectional (Llama without the causal mask,
pooled as its config's ``pooling`` names) and mGTE's GteNew (a post-norm rotary
encoder with a GeGLU MLP, [CLS] pooler and classifier).

For last-token and [CLS] pooling the last layer runs for the pooled rows only: their
queries attend to every key of their sequence, and only those B rows go through the
last o_proj, MLP and final norm (in fp32, on the gathered rows), then the fp32 head.

Pooling takes the true last token (``cu_seqlens[1:] - 1``), even when a prompt ends
with the pad token. transformers' ``*ForSequenceClassification`` instead pools the
rightmost token that is not ``pad_token_id``, so for a prompt ending in pad (often
pad == eos) it pools the token before the trailing pads; feed such prompts without
the trailing pad to get its number.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import layer_deltas, linear, with_heads
from . import convert, rope
from .bert import _ACTS
from .loader import WeightSink


@dataclass(frozen=True)
class Family:
    prefix: str                      # weight prefix of the backbone ("model", "transformer", "new")
    layout: str = "llama"            # checkpoint naming: "llama" | "gpt2" | "gte"
    norm: str = "rms"                # "rms" | "layer"
    norm_offset: float = 0.0         # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: bool = False        # Gemma scales embeddings by sqrt(hidden_size)
    learned_pos: bool = False        # GPT-2's position table (else rotary)
    post_norm: bool = False          # GteNew: norm after each residual add
    causal: bool = True
    qk_norm: bool = False            # Qwen3: RMSNorm of q and k over head_dim
    qkv_bias: bool | None = None     # None: from config.qkv_bias, else attention_bias
    o_bias: bool | None = None
    mlp_bias: bool | None = None     # None: from config.mlp_bias
    gated: bool = True               # act(gate) * up, else act(up)
    head: str = "score"              # "score" (no bias) | "pooler" (dense + tanh, classifier)
    pooling: str = "last"
    sliding: str = "none"            # "none" | "global" (Mistral) | "layer_types" (Qwen2/3)
    partial_rotary: bool = False     # honours partial_rotary_factor (Phi-3)
    fused: bool = False              # the checkpoint packs qkv_proj and gate_up_proj (Phi-3)
    # The config keys naming the MLP activation, first set wins (as each family's modeling code reads them).
    act_keys: tuple = ("hidden_activation", "hidden_act", "activation_function")
    gelu_means_tanh: bool = False    # Gemma 1: its legacy "gelu" is the tanh form (its config class says so)


FAMILIES = {
    "Llama": Family("model"),
    "LlamaBidirectional": Family("model", causal=False, pooling="config"),
    "Mistral": Family("model", qkv_bias=False, o_bias=False, mlp_bias=False, sliding="global"),
    "Qwen2": Family("model", qkv_bias=True, o_bias=False, mlp_bias=False, sliding="layer_types"),
    "Qwen3": Family("model", qk_norm=True, mlp_bias=False, sliding="layer_types"),
    "Gemma": Family("model", norm_offset=1.0, embed_scale=True, mlp_bias=False, act_keys=("hidden_act",),
                    gelu_means_tanh=True),
    "Granite": Family("model"),  # pyengine.models.granite adds its multipliers
    "Phi3": Family("model", qkv_bias=False, o_bias=False, mlp_bias=False, sliding="global", partial_rotary=True,
                   fused=True),
    "GPT2": Family("transformer", layout="gpt2", norm="layer", learned_pos=True, qkv_bias=True, o_bias=True,
                   mlp_bias=True, gated=False),
    "GteNew": Family("new", layout="gte", norm="layer", post_norm=True, causal=False, qkv_bias=True,
                     o_bias=True, mlp_bias=False, head="pooler", pooling="cls"),
}
FAMILIES["New"] = FAMILIES["GteNew"]
# InternLM2 (remote code): Llama with its own weight names (pyengine.models.internlm2).
FAMILIES["InternLM2"] = Family("model", mlp_bias=False)
# Mixture-of-experts relatives (pyengine.models.moe adds their sparse layers). Qwen3-MoE's
# window, where use_sliding_window sets one, covers every layer (no max_window_layers).
FAMILIES["Qwen3Moe"] = replace(FAMILIES["Qwen3"], sliding="global")
# Qwen2-MoE's q/k/v bias is a config option (qkv_bias), always on in Qwen2.
FAMILIES["Qwen2Moe"], FAMILIES["Mixtral"] = replace(FAMILIES["Qwen2"], qkv_bias=None), FAMILIES["Mistral"]
# Gemma 2 and 3 (pyengine.models.gemma3 adds their sandwich norms, per-type rotary, soft-capping).
FAMILIES["Gemma2"] = Family("model", norm_offset=1.0, embed_scale=True, mlp_bias=False, sliding="layer_types",
                            act_keys=("hidden_activation",))
FAMILIES["Gemma3"] = FAMILIES["Gemma3Text"] = replace(FAMILIES["Gemma2"], qk_norm=True)
# ModernBERT's layer options (biases, windows, rotary tables, head) come from its config in
# pyengine.models.modernbert.
FAMILIES["ModernBert"] = Family("model", layout="modernbert", norm="layer", causal=False, head="modernbert",
                                pooling="config")
# The language models of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (pyengine.models.qwen_vl adds the vision tower).
FAMILIES["Qwen2VL"] = FAMILIES["Qwen2_5_VL"] = FAMILIES["JinaVL"] = FAMILIES["Qwen2"]
FAMILIES["Qwen3VL"] = FAMILIES["Qwen3"]
FAMILIES["Qwen3VLMoe"] = FAMILIES["Qwen3Moe"]
# The language model of the Llama-Nemotron VL rerankers (pyengine.models.nemotron_vl adds SigLIP).
FAMILIES["LlamaNemotronVL"] = FAMILIES["LlamaBidirectional"]
_SUFFIXES = ("ForSequenceClassification", "ForConditionalGeneration", "ForRanking", "ForRewardModel", "ForCausalLM",
             "LMHeadModel", "Model")
_GATED = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
          "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_CONFIG_POOLING = {"avg": "mean", "mean": "mean", "cls": "cls", "last": "last"}


def family_of(arch):
    for s in _SUFFIXES:
        if arch.endswith(s) and arch[: -len(s)] in FAMILIES:
            return FAMILIES[arch[: -len(s)]]
    raise ValueError(f"{arch} is not a decoder architecture")


class ConfigView:
    """A config with some attributes replaced, the rest read through (transformers 5's
    configs refuse values outside their fields' types, such as flat rope parameters
    where per-layer-type ones belong)."""

    def __init__(self, base, **replaced):
        self.__dict__.update(replaced, _base=base)

    def __getattr__(self, name):
        return getattr(self._base, name)


# What a multimodal wrapper's config says of the classifier itself (its head, labels and
# pad token), where its language model's config (text_config) says the rest.
_OUTER_ATTRS = ("num_labels", "id2label", "label2id", "problem_type", "classifier_from_token",
                "classifier_token_ids", "method", "tie_word_embeddings", "pad_token_id")


def language_config(config):
    """A multimodal wrapper's ``text_config`` with the wrapper's head settings; a text
    model's config as it is."""
    text = getattr(config, "text_config", None)
    if text is None:
        return config
    return ConfigView(text, **{a: getattr(config, a) for a in _OUTER_ATTRS if hasattr(config, a)})


def linear_patches(weights, suffix, width):
    """weights with the vision tower's patch convolution (stride = kernel, its name ending
    in ``suffix``) as the (width, C * kernel) matrix of the linear map it is on a patch."""
    for n, t in weights:
        yield n, (t.reshape(width, -1) if n.endswith(suffix) else t)


def _p(*shape, dtype, device):
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


class DecoderForSequenceClassification(nn.Module):
    """forward(batch) -> (B, num_labels) fp32 logits of the pooled rows.

    Weights: embed (V, H); per layer qkv_w ((Hq + 2 Hkv) * D, H) packed [q | k | v],
    o_w (H, Hq * D), gate_up_w (2I, H) packed [gate | up] (or up_w (I, H) for GPT-2),
    down_w (H, I), norms ln1/ln2; the final norm and the head in fp32.
    """

    # The ops the forward calls. It reads nothing back to the host itself, so with ops
    # that do not either, one CUDA graph per batch shape holds it (pyengine.cuda_graph).
    graph_ops = ("varlen_attention", "pooled_query_attention", "add_rms_norm", "add_layer_norm", "rotary",
                 "qk_norm_rotary", "gated_act", "pooled_norm")
    # What a LoRA adapter (pyengine.lora) may change: these weights of every layer, added
    # unmerged, and the fp32 head, merged.
    lora_weights = ("qkv_w", "o_w", "up_w", "down_w")
    head_params = ("pool_w", "pool_b", "score_w", "score_b")
    # The LM head's checkpoint names, for a head built from its rows (classifier_from_token).
    lm_head_names = ("lm_head.weight", "lm_head.decoder.weight")

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        super().__init__()
        fam = self.fam = family_of(arch)
        self.config, self.arch, self.ops = config, arch, ops
        H = config.hidden_size
        nh = config.num_attention_heads
        nkv = _cfg(config, "num_key_value_heads", default=nh)
        hd = _cfg(config, "head_dim", default=H // nh)
        if nh % nkv:
            raise ValueError(f"{arch}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
        self.I = _cfg(config, "intermediate_size", "n_inner", default=4 * H)
        self.nh, self.nkv, self.hd, self.H = nh, nkv, hd, H
        self.eps = _cfg(config, "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-6)
        if fam.layout == "gte":
            self._check_gte(config)
        norm_kind = fam.norm
        if fam.layout == "gte" and getattr(config, "layer_norm_type", "layer_norm") == "rms_norm":
            norm_kind = "rms"
        self.norm_kind = norm_kind
        act = _cfg(config, *fam.act_keys, default="gelu_pytorch_tanh" if fam.norm_offset else "silu")
        if fam.gelu_means_tanh and act == "gelu":
            act = "gelu_pytorch_tanh"
        if fam.gated and act not in _GATED:
            raise ValueError(f"{arch}: hidden_act={act!r} is not supported for a gated MLP; "
                             f"supported: {sorted(_GATED)}")
        if not fam.gated and act not in _ACTS:
            raise ValueError(f"{arch}: activation {act!r} is not supported; supported: {sorted(_ACTS)}")
        self.act = _GATED[act] if fam.gated else _ACTS[act]
        self.vocab_size = V = config.vocab_size
        self.max_model_len = max_pos = config.max_position_embeddings
        self.num_layers = L = config.num_hidden_layers
        if L < 1:
            raise ValueError(f"{arch}: num_hidden_layers must be at least 1, got {L}")
        self.type_vocab = _cfg(config, "type_vocab_size", default=0) if fam.layout == "gte" else 0
        self.pooling = self._pooling(config, pooling)
        self.temperature = float(_cfg(config, "temperature", default=1.0)) if fam.pooling == "config" else 1.0
        self.causal = fam.causal
        # transformers' sdpa path honours this flag on causal families (Gemma's embedding
        # variants); running them causal would give other numbers without a word.
        if fam.causal and getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{arch}: use_bidirectional_attention=True is not supported")
        self.windows = [self._window(config, i) for i in range(L)]
        self.softcap = None  # attention scores soft-capped as c * tanh(s / c) (Gemma 2)
        if fam.layout == "gpt2":
            self.scales = [(hd ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0)
                           / ((i + 1) if getattr(config, "scale_attn_by_inverse_layer_idx", False) else 1)
                           for i in range(L)]
        else:
            self.scales = [hd ** -0.5] * L

        qkv_bias = fam.qkv_bias if fam.qkv_bias is not None else bool(_cfg(config, "qkv_bias", "attention_bias",
                                                                           default=False))
        o_bias = fam.o_bias if fam.o_bias is not None else bool(getattr(config, "attention_bias", False))
        mlp_bias = fam.mlp_bias if fam.mlp_bias is not None else bool(getattr(config, "mlp_bias", False))
        kw = dict(dtype=dtype, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        nb = norm_kind == "layer"  # LayerNorm has a bias
        self.embed = _p(V, H, **kw)
        self.pos_embed = _p(max_pos, H, **kw) if fam.learned_pos else None
        self.type_embed = _p(self.type_vocab, H, **kw) if self.type_vocab else None
        # mGTE's embedding norm is a LayerNorm whatever layer_norm_type says.
        self.emb_ln_w = _p(H, **kw) if fam.layout == "gte" else None
        self.emb_ln_b = _p(H, **kw) if fam.layout == "gte" else None
        qkv_rows = (nh + 2 * nkv) * hd
        self.layers = nn.ModuleList()
        for _ in range(L):
            m = nn.Module()
            m.qkv_w = _p(qkv_rows, H, **kw)
            m.qkv_b = _p(qkv_rows, **kw) if qkv_bias else None
            m.o_w, m.o_b = _p(H, nh * hd, **kw), (_p(H, **kw) if o_bias else None)
            m.q_norm = _p(hd, **kw) if fam.qk_norm else None
            m.k_norm = _p(hd, **kw) if fam.qk_norm else None
            m.ln1_w, m.ln1_b = _p(H, **kw), (_p(H, **kw) if nb else None)
            m.ln2_w, m.ln2_b = _p(H, **kw), (_p(H, **kw) if nb else None)
            self._build_mlp(len(self.layers), m, mlp_bias, kw)
            self.layers.append(m)
        if not fam.post_norm:  # the final norm runs on the pooled rows in fp32
            self.norm_w, self.norm_b = _p(H, **f32), (_p(H, **f32) if nb else None)
        self.long_after = None  # LongRoPE: longer sequences take the table's second half
        if not fam.learned_pos:
            cs = rope.cos_sin_table(config, hd, max_pos, device, partial=fam.partial_rotary)
            self.register_buffer("cos_sin", cs, persistent=False)
            self.long_after = rope.long_context(config)
            self._long_rows = None  # (batch, positions) of the forward in progress
            if self.long_after is not None and type(self)._rope is not DecoderForSequenceClassification._rope:
                raise ValueError(f"{arch}: LongRoPE is supported for the plain decoders only")
        self.token_head = getattr(config, "classifier_from_token", None) is not None
        if self.token_head:
            ids = getattr(config, "classifier_token_ids", None)
            if ids is None:
                raise ValueError(f"{arch}: classifier_from_token={config.classifier_from_token} was not resolved "
                                 "to token ids (models.convert.resolve_token_ids)")
            self.token_ids = list(ids)
            self.method = config.method
        self.num_labels = config.num_labels
        if fam.head == "pooler":
            self.pool_w, self.pool_b = _p(H, H, **f32), _p(H, **f32)
            self.score_w, self.score_b = _p(self.num_labels, H, **f32), _p(self.num_labels, **f32)
        else:
            self.score_w, self.score_b = _p(self.num_labels, H, **f32), None

    def _build_mlp(self, i, m, bias, kw):
        """Layer i's feed-forward parameters on module m: the dense MLP, up_w (2I, H)
        packed [gate | up] (I rows without a gate), down_w (H, I)."""
        H, I = self.H, self.I
        up = 2 * I if self.fam.gated else I
        m.up_w, m.up_b = _p(up, H, **kw), (_p(up, **kw) if bias else None)
        m.down_w = _p(H, I, **kw)
        m.down_b = _p(H, **kw) if (bias or self.fam.layout == "gte") else None

    # ------------------------------------------------------------------ options
    @property
    def default_pooling(self):
        return self.pooling

    def _check_gte(self, config):
        pet = getattr(config, "position_embedding_type", "rope")
        if pet != "rope":
            raise ValueError(f"{self.arch}: position_embedding_type={pet!r} is not supported (only 'rope')")
        if getattr(config, "logn_attention_scale", False):
            raise ValueError(f"{self.arch}: logn_attention_scale=True is not supported")
        lnt = getattr(config, "layer_norm_type", "layer_norm")
        if lnt not in ("layer_norm", "rms_norm"):
            raise ValueError(f"{self.arch}: layer_norm_type={lnt!r} is not supported")

    def _pooling(self, config, pooling):
        if pooling is not None:
            if pooling not in ("cls", "last", "mean"):
                raise ValueError(f"{self.arch}: pooling {pooling!r} is not one of cls, last, mean")
            return pooling
        if self.fam.pooling != "config":
            return self.fam.pooling
        p = str(getattr(config, "pooling", "avg")).lower()
        if p not in _CONFIG_POOLING:
            raise ValueError(f"{self.arch}: config pooling={p!r} is not supported; "
                             f"supported: {sorted(_CONFIG_POOLING)}")
        return _CONFIG_POOLING[p]

    def _window(self, config, i):
        """(left, right) visible tokens for layer i, or None for full attention."""
        sw = getattr(config, "sliding_window", None)
        if self.fam.sliding == "none" or not sw:
            return None
        if self.fam.sliding == "layer_types":
            types = getattr(config, "layer_types", None)
            if types is not None:
                on = types[i] == "sliding_attention"
            else:  # configs written before layer_types existed
                on = bool(getattr(config, "use_sliding_window", False)) and \
                    i >= getattr(config, "max_window_layers", 0)
            if not on:
                return None
        # A query sees itself and the sliding_window - 1 tokens before it.
        return (int(sw) - 1, 0)

    # ------------------------------------------------------------------ forward
    def _norm(self, x, residual, w, b):
        if self.norm_kind == "rms":
            return self.ops.add_rms_norm(x, residual, w, self.eps, self.fam.norm_offset)
        return self.ops.add_layer_norm(x, residual, w, b, self.eps)

    def _attention(self, i, layer, h, batch, d, rows=None):
        """h: (T, H) -> attention output before o_proj, (T, Hq * D); d: the layer's LoRA
        deltas; with rows (B,) only those query rows attend (against every key), giving
        (B, Hq * D)."""
        ops, nh, nkv, hd = self.ops, self.nh, self.nkv, self.hd
        T = h.shape[0]
        qkv = linear(h, layer.qkv_w, layer.qkv_b, d.get("qkv_w"))
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd)
        if layer.q_norm is not None and not self.fam.learned_pos:
            # One in-place pass on the strided q/k views: no copy out of qkv for the norm,
            # and q/k are read and written once rather than by a norm and then a rotary.
            q, k = ops.qk_norm_rotary(q, k, layer.q_norm, layer.k_norm, *self._rope(batch, i), self.eps,
                                      self.fam.norm_offset)
        else:
            if layer.q_norm is not None:  # q/k norm without rotary (no family has this)
                q = ops.add_rms_norm(q.reshape(T * nh, hd), None, layer.q_norm, self.eps)[0].view(T, nh, hd)
                k = ops.add_rms_norm(k.reshape(T * nkv, hd), None, layer.k_norm, self.eps)[0].view(T, nkv, hd)
            if not self.fam.learned_pos:
                q, k = ops.rotary(q, k, *self._rope(batch, i))
        if rows is None:
            out = ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, causal=self.causal,
                                       scale=self.scales[i], window=self.windows[i], softcap=self.softcap)
        else:
            out = ops.pooled_query_attention(q[rows], k, v, batch.cu_seqlens, batch.max_seqlen,
                                             batch.positions[rows], causal=self.causal, scale=self.scales[i],
                                             window=self.windows[i], softcap=self.softcap)
        return out.reshape(out.shape[0], nh * hd)

    def _layer_out(self, i, m, batch):
        """Layer i's MLP output m before it joins the residual stream (a hook)."""
        return m

    def _attn_out(self, i, layer, o):
        """Layer i's attention output o (after o_proj) before it joins the residual stream
        (a hook)."""
        return o

    def _rope(self, batch, i):
        """(positions (T,), table (P, R)) for layer i's rotary ops: each token's row of the table."""
        if self.long_after is None:
            return batch.positions, self.cos_sin
        if self._long_rows is None or self._long_rows[0] is not batch:
            # A token of a sequence longer than the original context reads the long
            # factors' rows; found on the device (no sync), once per forward.
            cu = batch.cu_seqlens.long()
            seq = torch.searchsorted(cu[1:], torch.arange(batch.positions.shape[0], device=cu.device), right=True)
            long = (cu[1:] - cu[:-1])[seq] > self.long_after
            self._long_rows = (batch, batch.positions + long * (self.cos_sin.shape[0] // 2))
        return self._long_rows[1], self.cos_sin

    def _attend(self, i, layer, h, batch, d, rows, stream):
        """Layer i's attention and the residual stream it adds to: in the last layer with
        pooled rows (B,), those rows' queries only and the stream cut to them."""
        if i == self.num_layers - 1 and rows is not None:
            return self._attention(i, layer, h, batch, d, rows), stream[rows]
        return self._attention(i, layer, h, batch, d), stream

    def _mlp(self, layer, h, d):
        u = linear(h, layer.up_w, layer.up_b, d.get("up_w"))
        u = self.ops.gated_act(u, self.act) if self.fam.gated else self.act(u)
        return linear(u, layer.down_w, layer.down_b, d.get("down_w"))

    def _embed(self, batch):
        x = F.embedding(batch.input_ids, self.embed)
        if self.fam.embed_scale:
            # The scale is rounded to the model dtype first, as transformers does.
            x = x * torch.tensor(self.H ** 0.5, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + F.embedding(batch.positions, self.pos_embed)
        if self.type_embed is not None:
            x = x + F.embedding(batch.token_type_ids, self.type_embed)
        if self.emb_ln_w is not None:
            x = self.ops.add_layer_norm(x, None, self.emb_ln_w, self.emb_ln_b, self.eps)[0]
        return x

    def _rows(self, batch):
        """Indices of the pooled token rows, or None for mean pooling (needs every row)."""
        cu = batch.cu_seqlens.long()
        if self.pooling == "last":
            return cu[1:] - 1
        if self.pooling == "cls":
            return cu[:-1]
        return None

    def forward(self, batch, lora=None):
        """batch: RaggedBatch; lora: the batch's adapters (a LoRABatch), or None."""
        x = self._embed(batch)
        rows = self._rows(batch)
        cu, pooling = batch.cu_seqlens, self.pooling
        if rows is not None:
            # The last layer runs on the pooled rows only: one row per sequence.
            cu, pooling = torch.arange(rows.numel() + 1, dtype=torch.int32, device=rows.device), "cls"
        if self.fam.post_norm:
            for i, layer in enumerate(self.layers):
                d = layer_deltas(lora, i)
                a, x = self._attend(i, layer, x, batch, d, rows, x)
                x = self._norm(linear(a, layer.o_w, layer.o_b, d.get("o_w")), x, layer.ln1_w, layer.ln1_b)[0]
                x = self._norm(self._mlp(layer, x, d), x, layer.ln2_w, layer.ln2_b)[0]
            return self.head(self.ops.pooled_norm(x, cu, pooling, None, None, None, self.eps), lora)
        h, res = self._norm(x, None, self.layers[0].ln1_w, self.layers[0].ln1_b)
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            d = layer_deltas(lora, i)
            a, res = self._attend(i, layer, h, batch, d, rows, res)
            o = self._attn_out(i, layer, linear(a, layer.o_w, layer.o_b, d.get("o_w")))
            h, res = self._norm(o, res, layer.ln2_w, layer.ln2_b)
            m = self._layer_out(i, self._mlp(layer, h, d), batch)
            if i < last:
                nxt = self.layers[i + 1]
                h, res = self._norm(m, res, nxt.ln1_w, nxt.ln1_b)
        pooled = self.ops.pooled_norm(m, cu, pooling, self.norm_kind, self.norm_w, self.norm_b, self.eps,
                                      self.fam.norm_offset, residual=res)
        return self.head(pooled, lora)

    def head(self, pooled, lora=None):
        """pooled: (B, H) fp32 -> (B, num_labels) fp32; lora: a LoRABatch whose adapters'
        heads replace this one for their sequences, or None."""
        return with_heads(self._head, pooled, lora)

    def _head(self, pooled, p):
        """The head with the parameters in p (an adapter's) in place of the model's own."""
        if self.fam.head == "pooler":
            pooled = torch.tanh(F.linear(pooled, p.get("pool_w", self.pool_w), p.get("pool_b", self.pool_b)))
        logits = F.linear(pooled, p.get("score_w", self.score_w), p.get("score_b", self.score_b))
        return logits / self.temperature if self.temperature != 1.0 else logits

    # ------------------------------------------------------------------ weights
    def _targets(self, rest):
        """Checkpoint name (backbone prefix removed) -> list of (param, rows, transform)."""
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qkv = {"q": slice(0, nh * hd), "k": slice(nh * hd, (nh + nkv) * hd),
               "v": slice((nh + nkv) * hd, (nh + 2 * nkv) * hd)}
        parts = rest.split(".")
        lay = self.fam.layout
        if lay == "llama":
            top = {"embed_tokens.weight": "embed", "norm.weight": "norm_w"}
            if rest in top:
                return [(top[rest], None, None)]
            if parts[0] != "layers":
                return []
            i, key = parts[1], ".".join(parts[2:])
            p = f"layers.{i}."
            if key.startswith("self_attn.") and key[10:12] in ("q_", "k_", "v_") and "_proj." in key:
                if not key.endswith((".weight", ".bias")):
                    return []  # nothing else of a projection is a float weight here (scales are refused earlier)
                kind = "w" if key.endswith("weight") else "b"
                return [(p + f"qkv_{kind}", qkv[key[10]], None)]
            I = self.I
            sub = {"self_attn.o_proj.weight": ("o_w", None), "self_attn.o_proj.bias": ("o_b", None),
                   "self_attn.qkv_proj.weight": ("qkv_w", None), "mlp.gate_up_proj.weight": ("up_w", None),
                   "self_attn.q_norm.weight": ("q_norm", None), "self_attn.k_norm.weight": ("k_norm", None),
                   "input_layernorm.weight": ("ln1_w", None), "post_attention_layernorm.weight": ("ln2_w", None),
                   "mlp.gate_proj.weight": ("up_w", slice(0, I)), "mlp.up_proj.weight": ("up_w", slice(I, 2 * I)),
                   "mlp.gate_proj.bias": ("up_b", slice(0, I)), "mlp.up_proj.bias": ("up_b", slice(I, 2 * I)),
                   "mlp.down_proj.weight": ("down_w", None), "mlp.down_proj.bias": ("down_b", None)}
            if key in sub:
                return [(p + sub[key][0], sub[key][1], None)]
            return []
        if lay == "gpt2":
            top = {"wte.weight": "embed", "wpe.weight": "pos_embed", "ln_f.weight": "norm_w", "ln_f.bias": "norm_b"}
            if rest in top:
                return [(top[rest], None, None)]
            if parts[0] != "h":
                return []
            i, key = parts[1], ".".join(parts[2:])
            p = f"layers.{i}."
            T = "t"  # Conv1D stores (in, out)
            sub = {"ln_1.weight": ("ln1_w", None), "ln_1.bias": ("ln1_b", None),
                   "ln_2.weight": ("ln2_w", None), "ln_2.bias": ("ln2_b", None),
                   "attn.c_attn.weight": ("qkv_w", T), "attn.c_attn.bias": ("qkv_b", None),
                   "attn.c_proj.weight": ("o_w", T), "attn.c_proj.bias": ("o_b", None),
                   "mlp.c_fc.weight": ("up_w", T), "mlp.c_fc.bias": ("up_b", None),
                   "mlp.c_proj.weight": ("down_w", T), "mlp.c_proj.bias": ("down_b", None)}
            if key in sub:
                return [(p + sub[key][0], None, sub[key][1])]
            return []
        # gte
        top = {"embeddings.word_embeddings.weight": "embed", "embeddings.token_type_embeddings.weight": "type_embed",
               "embeddings.LayerNorm.weight": "emb_ln_w", "embeddings.LayerNorm.bias": "emb_ln_b",
               "pooler.dense.weight": "pool_w", "pooler.dense.bias": "pool_b"}
        if rest in top:
            return [(top[rest], None, None)] if getattr(self, top[rest], None) is not None else []
        if parts[:2] != ["encoder", "layer"]:
            return []
        i, key = parts[2], ".".join(parts[3:])
        p = f"layers.{i}."
        I = self.I
        if key.startswith("attention.") and key.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            if not key.endswith((".weight", ".bias")):
                return []
            kind = "w" if key.endswith("weight") else "b"
            return [(p + f"qkv_{kind}", qkv[key.split(".")[1][0]], None)]
        if key == "mlp.up_gate_proj.weight":  # stored [up | gate]; ours is [gate | up]
            return [(p + "up_w", slice(I, 2 * I), ("rows", slice(0, I))),
                    (p + "up_w", slice(0, I), ("rows", slice(I, 2 * I)))]
        sub = {"attention.qkv_proj.weight": "qkv_w", "attention.qkv_proj.bias": "qkv_b",
               "attention.o_proj.weight": "o_w", "attention.o_proj.bias": "o_b",
               "attn_ln.weight": "ln1_w", "attn_ln.bias": "ln1_b", "mlp_ln.weight": "ln2_w", "mlp_ln.bias": "ln2_b",
               "mlp.down_proj.weight": "down_w", "mlp.down_proj.bias": "down_b"}
        return [(p + sub[key], None, None)] if key in sub else []

    def param_targets(self, name):
        """Checkpoint name -> [(param, rows of dim 0 or None, how)]: where a weight of the
        transformers model lands here ([] for names this model does not use). how: None,
        "t" (a Conv1D weight, stored (in, out)), ("rows", s) (rows s of the weight) or a
        function of the weight."""
        if name in ("score.weight", "classifier.weight", "classifier.bias"):
            # A token head is built from the LM head instead (load_weights).
            return [] if self.token_head else [("score_w" if name.endswith("weight") else "score_b", None, None)]
        pre = self.fam.prefix + "."
        return self._targets(name[len(pre):] if name.startswith(pre) else name)

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        sink = WeightSink(params, f"{self.arch} ({type(self).__name__})")
        lm_rows = emb_rows = None
        for name, t in weights:
            if self.token_head and name in self.lm_head_names:
                lm_rows = t[self.token_ids].float()
                continue
            for target, rows, how in self.param_targets(name):
                src = t.t() if how == "t" else t[how[1]] if isinstance(how, tuple) else how(t) if callable(how) else t
                sink.put(target, src, rows=rows)
                if target == "embed" and self.token_head:
                    emb_rows = t[self.token_ids].float()
        if self.token_head:
            self._load_token_head(sink, lm_rows, emb_rows)
        elif "score_w" not in sink.seen:
            raise ValueError(f"{self.arch}: the checkpoint has no classifier head (score.weight); for a causal "
                             "LM pass hf_overrides classifier_from_token=[...] and method='from_2_way_softmax' "
                             "or 'no_post_processing' to build one from the LM head")
        sink.check(self._expected(params))

    def _load_token_head(self, sink, lm_rows, emb_rows):
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        rows = lm_rows if lm_rows is not None else (emb_rows if tied else None)
        if rows is None:
            raise ValueError(f"{self.arch}: classifier_from_token needs the LM head, but the checkpoint has no "
                             f"{self.lm_head_names[0]} and tie_word_embeddings is false")
        sink.put("score_w", convert.token_head(rows, self.method))

    def _expected(self, params):
        I = self.I
        nh, nkv, hd = self.nh, self.nkv, self.hd
        split = {}
        if (self.fam.layout == "llama" and not self.fam.fused) or \
                (self.fam.layout == "gte" and not getattr(self.config, "pack_qkv", True)):
            for k in ("qkv_w", "qkv_b"):
                split[k] = [slice(0, nh * hd), slice(nh * hd, (nh + nkv) * hd),
                            slice((nh + nkv) * hd, (nh + 2 * nkv) * hd)]
        if self.fam.gated and not self.fam.fused:
            split["up_w"] = split["up_b"] = [slice(0, I), slice(I, 2 * I)]
        out = []
        for n in params:
            leaf = n.rsplit(".", 1)[-1]
            if n.startswith("layers.") and leaf in split:
                out += [f"{n}[{s}]" for s in split[leaf]]
            else:
                out.append(n)
        return out


class ReluMLPHead:
    """A two-layer score head, relu(h W1^T + b1) W2^T + b2, in fp32, for a decoder class
    listed after this one (jina-reranker-m0, Qwen2.5-Math-RM). Its checkpoint names are an
    ``nn.Sequential``'s (score.0 / score.2) or vLLM's (score.dense / score.out_proj)."""

    head_params = ("dense_w", "dense_b", "score_w", "score_b")
    _MLP_HEAD = {"score.0.weight": "dense_w", "score.0.bias": "dense_b", "score.2.weight": "score_w",
                 "score.2.bias": "score_b", "score.dense.weight": "dense_w", "score.dense.bias": "dense_b",
                 "score.out_proj.weight": "score_w", "score.out_proj.bias": "score_b"}

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        if getattr(config, "classifier_from_token", None) is not None:
            raise ValueError(f"{arch} has a head of its own; classifier_from_token does not apply")
        super().__init__(config, arch, dtype, device, ops, pooling)
        f32 = dict(dtype=torch.float32, device=device)
        self.dense_w, self.dense_b = _p(self.H, self.H, **f32), _p(self.H, **f32)
        self.score_b = _p(self.num_labels, **f32)

    def _head(self, pooled, p):
        h = torch.relu(F.linear(pooled, p.get("dense_w", self.dense_w), p.get("dense_b", self.dense_b)))
        return F.linear(h, p.get("score_w", self.score_w), p.get("score_b", self.score_b))

    def param_targets(self, name):
        if name in self._MLP_HEAD:
            return [(self._MLP_HEAD[name], None, None)]
        return super().param_targets(name)


class Qwen2RewardModel(ReluMLPHead, DecoderForSequenceClassification):
    """``Qwen2ForRewardModel`` (Qwen2.5-Math-RM): the Qwen2 decoder with the two-layer head,
    read at the last token: the sequence's reward (``use_activation=False``) or its
    sigmoid. vLLM's pooling of this model returns every token's reward; a classifier
    keeps the last one, the one the model card reads."""

