"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, ERNIE, ELECTRA, DistilBERT) over
packed tokens.

One implementation; the families differ in the weight names, how positions are
numbered (RoBERTa counts from padding_idx + 1), ERNIE's task-type row, ELECTRA's
embedding projection (when its embedding_size is not hidden_size), and the head on the
first token (BERT/ERNIE: pooler dense+tanh then classifier; RoBERTa: classifier.dense+tanh
then out_proj; ELECTRA: the same with GELU; DistilBERT: pre_classifier+ReLU then
classifier).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import layer_deltas, linear, with_heads
from .loader import WeightSink

_ACTS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

_FAMILY = {
    # architecture: (weight prefix, roberta-style positions, head kind)
    "BertForSequenceClassification": ("bert", False, "pooler"),
    "ErnieForSequenceClassification": ("ernie", False, "pooler"),
    "RobertaForSequenceClassification": ("roberta", True, "roberta"),
    "XLMRobertaForSequenceClassification": ("roberta", True, "roberta"),
    "CamembertForSequenceClassification": ("roberta", True, "roberta"),
    "ElectraForSequenceClassification": ("electra", False, "electra"),
    "DistilBertForSequenceClassification": ("distilbert", False, "distilbert"),
}
# The head's activation between its two linears.
_HEAD_ACT = {"pooler": torch.tanh, "roberta": torch.tanh, "electra": F.gelu, "distilbert": F.relu}
# Head weights by head kind ({prefix}: the family's weight prefix).
_HEAD = {"pooler": {"{prefix}.pooler.dense": "dense", "classifier": "out"},
         "roberta": {"classifier.dense": "dense", "classifier.out_proj": "out"},
         "electra": {"classifier.dense": "dense", "classifier.out_proj": "out"},
         "distilbert": {"pre_classifier": "dense", "classifier": "out"}}


# Checkpoint names (below "embeddings." and "encoder.layer.N.") -> parameters here.
_EMBEDDINGS = {"word_embeddings.weight": "word", "position_embeddings.weight": "pos",
               "token_type_embeddings.weight": "tok_type", "task_type_embeddings.weight": "task",
               "LayerNorm.weight": "emb_ln_w", "LayerNorm.bias": "emb_ln_b"}
_LAYER = {"attention.output.dense.weight": "o_w", "attention.output.dense.bias": "o_b",
          "attention.output.LayerNorm.weight": "ln1_w", "attention.output.LayerNorm.bias": "ln1_b",
          "intermediate.dense.weight": "up_w", "intermediate.dense.bias": "up_b",
          "output.dense.weight": "down_w", "output.dense.bias": "down_b",
          "output.LayerNorm.weight": "ln2_w", "output.LayerNorm.bias": "ln2_b"}
_QKV = {"query": 0, "key": 1, "value": 2}
# DistilBERT's names for the same weights (below "transformer.layer.N.").
_DISTIL_LAYER = {"attention.out_lin.weight": "o_w", "attention.out_lin.bias": "o_b",
                 "sa_layer_norm.weight": "ln1_w", "sa_layer_norm.bias": "ln1_b",
                 "ffn.lin1.weight": "up_w", "ffn.lin1.bias": "up_b", "ffn.lin2.weight": "down_w",
                 "ffn.lin2.bias": "down_b", "output_layer_norm.weight": "ln2_w", "output_layer_norm.bias": "ln2_b"}
_DISTIL_QKV = {"q_lin": 0, "k_lin": 1, "v_lin": 2}


def _p(*shape, dtype, device):
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def post_norm_layer(H, I, A, **kw):
    """One post-norm encoder layer's weights: qkv_w (3A, H) packed [q | k | v] (A = heads
    * head_dim), o_w (H, A), the attention and output LayerNorms, up_w (I, H), down_w (H, I);
    every linear with a bias."""
    layer = nn.Module()
    layer.qkv_w, layer.qkv_b = _p(3 * A, H, **kw), _p(3 * A, **kw)
    layer.o_w, layer.o_b = _p(H, A, **kw), _p(H, **kw)
    layer.ln1_w, layer.ln1_b = _p(H, **kw), _p(H, **kw)
    layer.up_w, layer.up_b = _p(I, H, **kw), _p(I, **kw)
    layer.down_w, layer.down_b = _p(H, I, **kw), _p(H, **kw)
    layer.ln2_w, layer.ln2_b = _p(H, **kw), _p(H, **kw)
    return layer


class BertForSequenceClassification(nn.Module):
    """forward(batch) -> (B, num_labels) fp32 logits of the pooled rows."""

    default_pooling = "cls"
    # The ops the forward calls. It reads nothing back to the host itself, so with ops
    # that do not either, one CUDA graph per batch shape holds it (pyengine.cuda_graph).
    graph_ops = ("embed_layer_norm", "varlen_attention", "pooled_query_attention", "add_layer_norm",
                 "gather_pooled")
    # What a LoRA adapter (pyengine.lora) may change: these weights of every layer, added
    # unmerged, and the fp32 head, merged.
    lora_weights = ("qkv_w", "o_w", "up_w", "down_w")
    head_params = ("dense_w", "dense_b", "out_w", "out_b")

    def __init__(self, config, arch, dtype, device, ops, pooling=None):
        super().__init__()
        self.config = config
        self.ops = ops
        self.prefix, self.roberta_positions, self.head_kind = _FAMILY[arch]
        self.pooling = pooling or self.default_pooling
        # transformers runs such a model with causal self-attention; this stack is bidirectional.
        if getattr(config, "is_decoder", False):
            raise ValueError(f"{arch}: is_decoder=True (causal self-attention) is not supported")
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(f"{arch}: position_embedding_type={config.position_embedding_type!r} "
                             "is not supported (only 'absolute')")
        # DistilBERT's config names the activation "activation" and the MLP width "hidden_dim".
        act = getattr(config, "hidden_act", None) or getattr(config, "activation", None)
        if act not in _ACTS:
            raise ValueError(f"{arch}: hidden_act={act!r} is not supported")
        self.act = _ACTS[act]
        H, V = config.hidden_size, config.vocab_size
        I = getattr(config, "intermediate_size", None) or config.hidden_dim
        E = getattr(config, "embedding_size", None) or H  # ELECTRA-small embeds narrower than it attends
        self.num_heads = config.num_attention_heads
        self.head_dim = H // self.num_heads
        self.eps = getattr(config, "layer_norm_eps", 1e-12)  # DistilBERT's LayerNorms: 1e-12, not in its config
        self.num_labels = config.num_labels
        self.vocab_size = V
        pad = getattr(config, "pad_token_id", None)
        if self.roberta_positions and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
            # RoBERTa's positions count from pad_token_id + 1: without one they are undefined
            raise ValueError(f"{arch}: pad_token_id must be a non-negative int (RoBERTa-style positions start "
                             f"after it), got {pad!r}")
        self.pad_offset = (pad + 1) if self.roberta_positions else 0
        self.max_model_len = config.max_position_embeddings - self.pad_offset
        kw = dict(dtype=dtype, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.word = _p(V, E, **kw)
        self.pos = _p(config.max_position_embeddings, E, **kw)
        self.type_vocab = getattr(config, "type_vocab_size", 0) or 0
        self.tok_type = _p(self.type_vocab, E, **kw) if self.type_vocab else None
        self.use_task_id = bool(getattr(config, "use_task_id", False))
        self.task = _p(config.task_type_vocab_size, E, **kw) if self.use_task_id else None
        self.emb_ln_w, self.emb_ln_b = _p(E, **kw), _p(E, **kw)
        self.proj_w, self.proj_b = (_p(H, E, **kw), _p(H, **kw)) if E != H else (None, None)
        self.layers = nn.ModuleList(post_norm_layer(H, I, H, **kw) for _ in range(config.num_hidden_layers))
        # The head runs in fp32 whatever the model dtype.
        self.dense_w, self.dense_b = _p(H, H, **f32), _p(H, **f32)
        self.out_w, self.out_b = _p(self.num_labels, H, **f32), _p(self.num_labels, **f32)

    # ------------------------------------------------------------------ forward
    def _roberta_positions(self, batch):
        """(T,) RoBERTa's position ids, as transformers counts them: pad + the count of
        non-pad tokens of the sequence so far, and pad itself at a pad token (a prompt
        without pads gets pad + 1 + its positions)."""
        pad = self.pad_offset - 1
        keep = (batch.input_ids != pad).long()
        seen = torch.cumsum(keep, 0)
        start = torch.arange(keep.shape[0], device=keep.device) - batch.positions  # each token's sequence start
        return (seen - seen[start] + keep[start]) * keep + pad

    def forward(self, batch, lora=None):
        """batch: RaggedBatch; lora: the batch's adapters (a LoRABatch), or None."""
        ops = self.ops
        T = batch.num_tokens
        positions = self._roberta_positions(batch) if self.pad_offset else batch.positions
        extra = self.task[0] if self.use_task_id else None  # task_type_ids default to 0
        x = ops.embed_layer_norm(batch.input_ids, positions, batch.token_type_ids, self.word, self.pos,
                                 self.tok_type, self.emb_ln_w, self.emb_ln_b, self.eps, extra)
        if self.proj_w is not None:
            x = F.linear(x, self.proj_w, self.proj_b)
        nh, hd = self.num_heads, self.head_dim
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            d = layer_deltas(lora, i)
            if i == last and self.pooling != "mean":
                return self.head(self._pooled_last_layer(x, layer, batch, d), lora)
            qkv = linear(x, layer.qkv_w, layer.qkv_b, d.get("qkv_w")).view(T, 3, nh, hd)
            attn = ops.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], batch.cu_seqlens, batch.max_seqlen,
                                        causal=False, scale=hd ** -0.5)
            x = self._finish_layer(layer, attn.reshape(T, nh * hd), x, d)
        pooled = ops.gather_pooled(x, batch.cu_seqlens, self.pooling).float()
        return self.head(pooled, lora)

    def _finish_layer(self, layer, attn, x, d):
        """Output projection, residual + LayerNorm, MLP, residual + LayerNorm; d: the
        layer's LoRA deltas."""
        h = linear(attn, layer.o_w, layer.o_b, d.get("o_w"))
        x, _ = self.ops.add_layer_norm(h, x, layer.ln1_w, layer.ln1_b, self.eps)
        h = self.act(linear(x, layer.up_w, layer.up_b, d.get("up_w")))
        h = linear(h, layer.down_w, layer.down_b, d.get("down_w"))
        return self.ops.add_layer_norm(h, x, layer.ln2_w, layer.ln2_b, self.eps)[0]

    def _pooled_last_layer(self, x, layer, batch, d):
        """The last layer for the pooled rows only: keys and values still come from every
        token, but the query, the attention output, the projection and the MLP are only
        computed where a row reaches the head. Returns (B, H) fp32."""
        nh, hd, H = self.num_heads, self.head_dim, self.config.hidden_size
        cu = batch.cu_seqlens
        first = cu[:-1].long()
        rows = first if self.pooling == "cls" else cu[1:].long() - 1
        kv = linear(x, layer.qkv_w, layer.qkv_b, d.get("qkv_w"), slice(H, None)).view(-1, 2, nh, hd)
        xr = x[rows]
        q = linear(xr, layer.qkv_w, layer.qkv_b, d.get("qkv_w"), slice(0, H)).view(-1, nh, hd)
        attn = self.ops.pooled_query_attention(q, kv[:, 0], kv[:, 1], cu, batch.max_seqlen, rows - first,
                                               causal=False, scale=hd ** -0.5)
        return self._finish_layer(layer, attn.reshape(-1, nh * hd), xr, d).float()

    def head(self, pooled, lora=None):
        """pooled: (B, H) fp32 -> (B, num_labels) fp32; lora: a LoRABatch whose adapters'
        heads replace this one for their sequences, or None."""
        return with_heads(self._head, pooled, lora)

    def _head(self, pooled, p):
        """The head with the parameters in p (an adapter's) in place of the model's own."""
        h = _HEAD_ACT[self.head_kind](F.linear(pooled, p.get("dense_w", self.dense_w),
                                               p.get("dense_b", self.dense_b)))
        return F.linear(h, p.get("out_w", self.out_w), p.get("out_b", self.out_b))

    # ------------------------------------------------------------------ weights
    def param_targets(self, name):
        """Checkpoint name -> [(param, rows of dim 0 or None, None)]: where a weight of the
        transformers model lands here ([] for names this model does not use)."""
        # Older checkpoints name LayerNorm parameters gamma/beta.
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        module, _, kind = name.rpartition(".")
        head = _HEAD[self.head_kind]
        for pattern, param in head.items():
            if module == pattern.format(prefix=self.prefix) and kind in ("weight", "bias"):
                return [(f"{param}_{kind[0]}", None, None)]
        if not name.startswith(self.prefix + "."):
            return []
        rest = name[len(self.prefix) + 1:]
        if rest.startswith("embeddings."):
            key = _EMBEDDINGS.get(rest[len("embeddings."):])
            return [(key, None, None)] if key and getattr(self, key, None) is not None else []
        if rest in ("embeddings_project.weight", "embeddings_project.bias") and self.proj_w is not None:
            return [("proj_" + rest.rsplit(".", 1)[1][0], None, None)]
        H = self.config.hidden_size
        if rest.startswith("transformer.layer."):  # DistilBERT
            idx, key = rest[len("transformer.layer."):].split(".", 1)
            which, _, kind = key.removeprefix("attention.").partition(".")
            if key.startswith("attention.") and which in _DISTIL_QKV:
                j = _DISTIL_QKV[which]
                return [(f"layers.{idx}.qkv_{kind[0]}", slice(j * H, (j + 1) * H), None)]
            return [(f"layers.{idx}.{_DISTIL_LAYER[key]}", None, None)] if key in _DISTIL_LAYER else []
        if not rest.startswith("encoder.layer."):
            return []
        idx, key = rest[len("encoder.layer."):].split(".", 1)
        if key.startswith("attention.self."):
            which, _, kind = key[len("attention.self."):].partition(".")
            if which not in _QKV or kind not in ("weight", "bias"):
                return []
            j = _QKV[which]
            return [(f"layers.{idx}.qkv_{kind[0]}", slice(j * H, (j + 1) * H), None)]
        return [(f"layers.{idx}.{_LAYER[key]}", None, None)] if key in _LAYER else []

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        sink = WeightSink(params, type(self).__name__)
        for name, t in weights:
            for target, rows, _ in self.param_targets(name):
                sink.put(target, t, rows=rows)
        H = self.config.hidden_size
        expected = [n for n in params if not n.startswith("layers.") or "qkv" not in n]
        expected += [f"layers.{i}.qkv_{k}[{slice(j * H, (j + 1) * H)}]"
                     for i in range(len(self.layers)) for k in "wb" for j in range(3)]
        sink.check(expected)
