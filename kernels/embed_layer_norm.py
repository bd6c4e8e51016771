"""BERT-style embeddings in Triton: word + position + token type (+ extra row), then
LayerNorm, one program per token, the sum and the statistics in fp32."""
import functools

import torch
import triton
import triton.language as tl

from . import _validate as _v

_INDEX_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _embed_layer_norm_kernel(IDS, POS_IDS, TYPE_IDS, WORD, POS, TYPE, EXTRA, W, B, OUT,
                             stride_word, stride_pos, stride_type, stride_o, H, eps,
                             HAS_TYPE: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_H: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    wid = tl.load(IDS + tok).to(tl.int64)
    pid = tl.load(POS_IDS + tok).to(tl.int64)
    x = tl.load(WORD + wid * stride_word + offs, mask=ok, other=0.0).to(tl.float32)
    x += tl.load(POS + pid * stride_pos + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_TYPE:
        tid = tl.load(TYPE_IDS + tok).to(tl.int64)
        x += tl.load(TYPE + tid * stride_type + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_EXTRA:
        x += tl.load(EXTRA + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / H
    diff = tl.where(ok, x - mean, 0.0)
    var = tl.sum(diff * diff, 0) / H
    y = diff * tl.rsqrt(var + eps) * tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + tok * stride_o + offs, y.to(OUT.dtype.element_ty), mask=ok)


_check = functools.partial(_v.check, "embed_layer_norm")


def _launch(input_ids, positions, token_type_ids, word, pos, type_, weight, bias, eps, extra=None):
    _check(isinstance(word, torch.Tensor) and word.dim() == 2,
           lambda: f"word must be a 2-D table (V, H), got {getattr(word, 'shape', type(word))}")
    _check(word.dtype in _v.DTYPES, lambda: f"word.dtype must be float16, bfloat16 or float32, got {word.dtype}")
    H = word.shape[1]
    dev = word.device
    _v.hidden_size("embed_layer_norm", H)
    _check(isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1,
           lambda: f"input_ids must be a 1-D (T,) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    T = input_ids.shape[0]
    ids = [("input_ids", input_ids), ("positions", positions)]
    if type_ is not None:
        ids.append(("token_type_ids", token_type_ids))
    for name, t in ids:
        _check(isinstance(t, torch.Tensor) and t.shape == (T,),
               lambda: f"{name} must be ({T},) like input_ids, got {getattr(t, 'shape', type(t))}")
        _check(t.dtype in _INDEX_DTYPES, lambda: f"{name}.dtype must be int64 or int32, got {t.dtype}")
        _check(t.device == dev, lambda: f"{name} is on {t.device}, expected the tables' device {dev}")
        _check(t.is_contiguous(), lambda: f"{name} must be contiguous")
    tables = [("pos", pos, 2), ("weight", weight, 1)]
    if type_ is not None:
        tables.append(("type_", type_, 2))
    if bias is not None:
        tables.append(("bias", bias, 1))
    if extra is not None:
        tables.append(("extra", extra, 1))
    for name, t, dims in tables:
        want = "(rows, H)" if dims == 2 else f"({H},)"
        _check(isinstance(t, torch.Tensor) and t.dim() == dims and t.shape[-1] == H,
               lambda: f"{name} must be {want} with H={H}, got {getattr(t, 'shape', type(t))}")
        _check(t.dtype in _v.DTYPES, lambda: f"{name}.dtype must be a float type, got {t.dtype}")
        _check(t.device == dev, lambda: f"{name} is on {t.device}, expected word's device {dev}")
        _check(t.stride(-1) == 1, lambda: f"{name} must be contiguous in its last dim, got {tuple(t.stride())}")
    _check(word.stride(1) == 1, lambda: f"word must be contiguous in its last dim, got {tuple(word.stride())}")
    _v.check_index_range("embed_layer_norm", "input_ids", input_ids, word.shape[0], "word")
    _v.check_index_range("embed_layer_norm", "positions", positions, pos.shape[0], "pos")
    if type_ is not None:
        _v.check_index_range("embed_layer_norm", "token_type_ids", token_type_ids, type_.shape[0], "type_")
    out = torch.empty((T, H), dtype=word.dtype, device=dev)
    if T == 0:
        return out
    block_h = _v.next_pow2(H)
    _embed_layer_norm_kernel[(T,)](
        input_ids, positions, input_ids if type_ is None else token_type_ids,
        word, pos, word if type_ is None else type_, word if extra is None else extra,
        weight, weight if bias is None else bias, out,
        word.stride(0), pos.stride(0), 0 if type_ is None else type_.stride(0), out.stride(0), H,
        float(eps), HAS_TYPE=type_ is not None, HAS_EXTRA=extra is not None, HAS_BIAS=bias is not None,
        BLOCK_H=block_h, num_warps=4 if block_h <= 1024 else (8 if block_h <= 4096 else 16))
    return out


def embed_layer_norm(input_ids, positions, token_type_ids, word, pos, type_, weight, bias, eps,
                     extra=None):
    """LayerNorm(word[ids] + pos[positions] + type_[token_type_ids] (+ extra)).

    input_ids, positions, token_type_ids: (T,) int64 (or int32), each inside its table
    (token_type_ids may be None when type_ is None); word: (V, H); pos: (P, H);
    type_: (TT, H) or None; weight: (H,); bias: (H,) or None; extra: (H,) or None
    (Ernie's task-type row); eps: float. The sum is taken in fp32 (the reference rounds
    it to word's dtype first). Returns (T, H) in word's dtype.
    """
    return _launch(input_ids, positions, token_type_ids, word, pos, type_, weight, bias, eps, extra)
