"""Rotary embedding tables: one (max_pos, R) fp32 table of [cos | sin] per model.

Frequencies follow transformers' formulas in fp32 (inverse frequencies and the
position product both in fp32), so cos/sin agree bit for bit with the checkpoint's
own modeling code; ``ops.rotary`` then rotates the first R dims of each head at the
packed positions. YaRN and LongRoPE scale cos and sin by their attention factor;
LongRoPE's long factors serve the sequences longer than the original context (each
sequence on its own, as transformers does for one prompt). Dynamic NTK
scaling changes the frequencies only past ``max_position_embeddings``, which no
prompt reaches here (it is the length limit), so it takes the default frequencies.
"""
from __future__ import annotations

import math

import torch

SUPPORTED = ("default", "linear", "llama3", "ntk", "yarn", "dynamic", "longrope")


def rope_parameters(config):
    """The config's rope settings as one flat dict with rope_type, rope_theta and the
    type's own keys, from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` pair (remote-code configs keep the latter)."""
    rp = getattr(config, "rope_parameters", None)
    if rp and any(isinstance(v, dict) for v in rp.values()):
        raise ValueError(f"per-layer-type rope_parameters {sorted(rp)} are not supported")
    out = dict(getattr(config, "rope_scaling", None) or {})
    out.update(rp or {})
    out.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    if out["rope_type"] == "mrope":  # Qwen2-VL's older configs: default frequencies, per-axis sections
        out["rope_type"] = "default"
    if getattr(config, "partial_rotary_factor", None) is not None:
        out.setdefault("partial_rotary_factor", config.partial_rotary_factor)
    if getattr(config, "original_max_position_embeddings", None) is not None:  # Phi-3 keeps it at the top
        out.setdefault("original_max_position_embeddings", config.original_max_position_embeddings)
    return out


def layer_type_parameters(config, kind, theta_attr, default_theta):
    """One layer type's flat rope settings ("full_attention" / "sliding_attention") from
    transformers 5's per-type ``rope_parameters`` (a flat one applies to every type), or
    from older configs' ``theta_attr`` (e.g. ``local_rope_theta``) with the shared
    ``rope_scaling``."""
    rp = getattr(config, "rope_parameters", None) or {}
    if any(isinstance(v, dict) for v in rp.values()):
        params = rp.get(kind)
    else:  # one flat setting (or none) for every layer type
        params = rp or None
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {}) if kind == "full_attention" else {}
        params["rope_theta"] = getattr(config, theta_attr, None) or default_theta
    params = dict(params)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inv_freq(params, rotary_dim, max_position_embeddings, long=False):
    """(rotary_dim/2,) fp32 inverse frequencies for a rope_parameters dict (LongRoPE: its
    short factors, or with ``long`` its long ones)."""
    kind, base = params["rope_type"], float(params["rope_theta"])
    if kind not in SUPPORTED:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    factor = float(params.get("factor", 1.0) or 1.0)
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if kind == "ntk" and factor > 1:
        # Fixed / mixed NTK-aware scaling (mGTE's remote code): a larger base and a
        # per-frequency divisor, applied to every position.
        mixed_b = params.get("mixed_b")
        if mixed_b is None:
            return 1.0 / (base * factor) ** exps / factor ** (2 / rotary_dim)
        a = math.log(factor) / (rotary_dim / 2) ** mixed_b
        lam = (a * torch.arange(1, rotary_dim // 2 + 1).float() ** mixed_b).exp()
        return 1.0 / base ** exps / lam
    if kind == "longrope":
        name = "long_factor" if long else "short_factor"
        ext = params.get(name)
        if not isinstance(ext, (list, tuple)) or len(ext) != rotary_dim // 2:
            raise ValueError(f"longrope {name} must list {rotary_dim // 2} factors (rotary width / 2), got {ext!r}")
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * base ** exps)
    freqs = 1.0 / base ** exps
    if kind == "linear":
        return freqs / factor
    if kind == "yarn":
        return _yarn(params, freqs, rotary_dim, max_position_embeddings)
    if kind == "llama3":
        old = params.get("original_max_position_embeddings") or max_position_embeddings
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if params.get(k) is None]
        if missing:
            raise ValueError(f"rope type 'llama3' needs {', '.join(missing)} in its rope parameters")
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        if not 0 < low < high:
            raise ValueError(f"rope type 'llama3' needs 0 < low_freq_factor < high_freq_factor, got {low} and {high}")
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > old / low, freqs / factor, freqs)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)
    return freqs


def _original_max(params, max_position_embeddings):
    return params.get("original_max_position_embeddings") or max_position_embeddings


def _scale_factor(params, max_position_embeddings):
    """YaRN's / LongRoPE's factor: the given one, else max positions over the original context."""
    return params.get("factor") or max_position_embeddings / _original_max(params, max_position_embeddings)


def _yarn(params, freqs, dim, max_position_embeddings):
    """YaRN: interpolated (freqs / factor) below the low-rotation band, extrapolated
    (freqs) above the high one, a linear ramp between (beta_fast, beta_slow rotations
    over the original context)."""
    base = float(params["rope_theta"])
    old = _original_max(params, max_position_embeddings)
    factor = _scale_factor(params, max_position_embeddings)

    def at(rotations):
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = at(params.get("beta_fast") or 32), at(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the share of the unscaled frequency
    return freqs / factor * (1 - keep) + freqs * keep


def attention_factor(params, max_position_embeddings):
    """The scale YaRN and LongRoPE put on cos and sin (1 for the other types): the
    checkpoint's ``attention_factor``, else for YaRN 0.1 ln(factor) + 1 (or the mscale /
    mscale_all_dim ratio), for LongRoPE sqrt(1 + ln(factor) / ln(original context))."""
    if params["rope_type"] not in ("yarn", "longrope"):
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    old = _original_max(params, max_position_embeddings)
    factor = _scale_factor(params, max_position_embeddings)
    if params["rope_type"] == "longrope":
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))

    def m(scale, k=1.0):
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    mscale, all_dim = params.get("mscale"), params.get("mscale_all_dim")
    return float(m(factor, mscale) / m(factor, all_dim)) if mscale and all_dim else m(factor)


def rotary_dim(config, head_dim):
    """Rotated width R <= head_dim (partial rotary keeps the rest unrotated)."""
    factor = float(rope_parameters(config).get("partial_rotary_factor", 1.0) or 1.0)
    r = int(head_dim * factor)
    if r % 2 or not 0 < r <= head_dim:
        raise ValueError(f"partial_rotary_factor={factor} gives a rotary width {r} for head_dim {head_dim}; "
                         "it must be even and in (0, head_dim]")
    return r


def cos_sin_table(config, head_dim, max_pos, device, partial=True):
    """(max_pos, R) fp32 with cos in the first R/2 columns and sin in the last R/2
    (LongRoPE: (2 max_pos, R), the short factors' rows then the long ones').
    partial=False is for families whose transformers code rotates the whole head: a
    partial_rotary_factor in their config is then an error, not a silent difference."""
    params = rope_parameters(config)
    r = rotary_dim(config, head_dim)
    if r != head_dim and not partial:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported for this "
                         "architecture: its transformers implementation rotates the whole head")
    limit = getattr(config, "max_position_embeddings", max_pos)
    scale = attention_factor(params, limit)

    def table(f):
        ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * f[None, :]
        t = torch.cat((ang.cos(), ang.sin()), dim=-1)
        return t * scale if scale != 1.0 else t
    out = table(inv_freq(params, r, limit))
    if params["rope_type"] == "longrope":  # the long factors' rows after the short ones'
        out = torch.cat((out, table(inv_freq(params, r, limit, long=True))))
    return out.to(device)


def long_context(config):
    """LongRoPE's switch: a sequence longer than this many tokens takes the long factors
    (rows max_pos.. of :func:`cos_sin_table`), as transformers decides for one prompt;
    None for the other rope types."""
    params = rope_parameters(config)
    if params["rope_type"] != "longrope":
        return None
    return int(_original_max(params, getattr(config, "max_position_embeddings", None)))
