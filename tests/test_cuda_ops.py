"""The CUDA extension (csrc/, pyengine._C) and its custom ops (pyengine.cuda_ops).

On a CPU machine: the extension built and imports where nvcc is present, it reports its
build, the ops validate their inputs with clear errors, and the fake (meta)
implementations give the right shapes and dtypes. On a GPU (``-m gpu``): every op
against its torch reference in pyengine.ops, over dtypes, ragged lengths including 1,
strided and misaligned inputs (the vectorised and the scalar paths), with the outputs'
memory poisoned beforehand.
"""
import itertools
import math
import os
import shutil
import sys

import pytest
import torch

import pyengine.cuda_ops as cuda_ops
import pyengine.ops as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (dtype, atol, rtol) for outputs in that dtype: about one rounding step of the dtype.
TOLS = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]
FP32_OUT = (1e-5, 1e-5)  # fp32 outputs (activation, pooled_norm) from any input dtype


def _nvcc_present():
    cands = [os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    cands += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH")
              if os.environ.get(v)]
    return any(c and os.path.isfile(c) for c in cands)


def _skip_build():
    return os.environ.get("PYENGINE_SKIP_CUDA_BUILD", "").strip().lower() in ("1", "true", "yes", "on")


needs_build = pytest.mark.skipif(
    _skip_build() or not _nvcc_present(),
    reason="the CUDA extension is only built where nvcc is present and PYENGINE_SKIP_CUDA_BUILD is unset")


# ----------------------------------------------------------------------------------------
# CPU: the build
# ----------------------------------------------------------------------------------------

@needs_build
def test_extension_built_and_imports():
    try:
        import pyengine._C as C
    except ImportError as e:
        pytest.fail("nvcc is present but pyengine._C is not built or does not import "
                    f"({e}). Build it with `pip install pybind11 cmake` then "
                    "`pip install --no-build-isolation -e .` (see docs/KERNELS.md)")
    info = C.build_info()
    assert info["cuda_archs"] and all(a.rstrip("afr").isdigit() for a in info["cuda_archs"]), info
    assert info["cuda_runtime_version"] >= 11000, info
    assert info["cudart"] in ("static", "shared"), info
    assert isinstance(info["driver_version"], int)
    # Every op cuda_ops exposes has its launcher in the module.
    for name in ("add_rms_norm", "add_layer_norm", "rotary", "gather_pooled", "pooled_norm",
                 "activation"):
        assert name in info["ops"] and hasattr(C, name), name


@needs_build
def test_extension_reports_cuda_errors_without_a_gpu():
    """With no usable GPU a launch raises a RuntimeError naming the op and the CUDA error,
    never a crash. (On a GPU machine this is covered by the device tests instead.)"""
    import pyengine._C as C
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"pyengine\._C\.activation: CUDA error \w+"):
        C.activation(0, 0, 1, 1, 2, 0, 0.0, 1.0, 0, 0, 0, 0, 0)


@needs_build
def test_extension_rejects_bad_pooled_norm_configs():
    """The launcher checks a config itself (a caller may skip pyengine.cuda_ops), before it
    touches the device: no GPU needed."""
    import pyengine._C as C
    # dtype bf16, no norm, a residual pointer: the mean path that takes a config
    args = (2, 2, 16, 8, 16, 8, 16, 1, 2, 0, 0, 0, 1e-5, 0.0, 16, 8, 0, 0)
    for kw, msg in (({"variant": 7}, r"config variant must be 0 .default., 1 .sliced., 2 .early affine. or 3 "
                                     r".async., got 7"),
                    ({"variant": 3, "rows_per_warp": 3}, "config rows_per_warp must be 1, 2 or 4, got 3"),
                    ({"variant": 1, "warps": 9}, r"config warps must be in \[1, 8\], got 9"),
                    ({"variant": 1, "rows_per_warp": 3}, "config rows_per_warp must be 1, 2 or 4"),
                    ({"variant": 1, "slice_rows": -1}, "config slice_rows must be >= 0")):
        with pytest.raises(ValueError, match=rf"pyengine\._C\.pooled_norm: {msg}"):
            C.pooled_norm(*args, **kw)


def test_cuda_ops_import_needs_no_extension(monkeypatch):
    import pyengine

    monkeypatch.setitem(sys.modules, "pyengine._C", None)  # import pyengine._C now fails
    monkeypatch.delattr(pyengine, "_C", raising=False)
    monkeypatch.setattr(cuda_ops, "_ext", None)
    with pytest.raises(RuntimeError, match="pyengine._C is not built"):
        cuda_ops.extension()
    assert cuda_ops.is_available() is False


def test_registry_names_resolve_to_cuda_ops():
    """Each op cuda_ops implements is found under the name the registry loads."""
    for name in ("add_rms_norm", "add_layer_norm", "rotary", "gather_pooled", "pooled_norm",
                 "activation"):
        assert name in ref.OP_NAMES
        assert ref._load(ref._CUDA[name]) is getattr(cuda_ops, name)


# ----------------------------------------------------------------------------------------
# CPU: validation
# ----------------------------------------------------------------------------------------

def _cu(lens, device="cpu"):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)


def _cpu_calls():
    x = torch.randn(4, 8)
    w = torch.ones(8)
    cu = _cu([1, 3])
    return {
        "add_rms_norm": lambda: cuda_ops.add_rms_norm(x, x, w, 1e-6),
        "add_layer_norm": lambda: cuda_ops.add_layer_norm(x, None, w, w, 1e-5),
        "rotary": lambda: cuda_ops.rotary(torch.randn(4, 2, 8), torch.randn(4, 1, 8),
                                          torch.arange(4), torch.randn(16, 8)),
        "gather_pooled": lambda: cuda_ops.gather_pooled(x, cu, "mean"),
        "pooled_norm": lambda: cuda_ops.pooled_norm(x, cu, "last", "rms", w, None, 1e-6),
        "activation": lambda: cuda_ops.activation(x, "softmax", 0.5, 2.0),
    }


@pytest.mark.parametrize("op", sorted(_cpu_calls()))
def test_cpu_tensors_are_rejected_with_the_op_and_device(op):
    with pytest.raises(ValueError, match=rf"pyengine\.cuda_ops\.{op}: .* must be a CUDA tensor, got device cpu"):
        _cpu_calls()[op]()


def test_dispatcher_path_validates_too():
    """torch.ops.pyengine.* (what torch.compile calls) runs the same checks."""
    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"pyengine\.cuda_ops\.add_rms_norm: x must be a CUDA tensor"):
        torch.ops.pyengine.rms_norm(x, w, 1e-6, 0.0)
    with pytest.raises(ValueError, match=r"pyengine\.cuda_ops\.rotary: q must be a CUDA tensor"):
        torch.ops.pyengine.rotary(torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(4),
                                  torch.randn(16, 8), True)


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


BAD_INPUTS = [
    ("add_rms_norm", lambda: cuda_ops.add_rms_norm(_meta(4, 8), None, _meta(7), 1e-6),
     r"weight must have shape \(8,\), got \(7,\)"),
    ("add_rms_norm", lambda: cuda_ops.add_rms_norm(_meta(4, 8), _meta(4, 8, dtype=torch.float32),
                                                   _meta(8), 1e-6),
     r"residual.dtype must be x's torch.float16"),
    ("add_rms_norm", lambda: cuda_ops.add_rms_norm(_meta(4, 8, dtype=torch.int32), None, _meta(8), 1e-6),
     r"x.dtype must be float32, float16 or bfloat16"),
    ("add_layer_norm", lambda: cuda_ops.add_layer_norm(_meta(8, 4).t(), None, _meta(8), None, 1e-5),
     r"x must be contiguous in its last dim"),
    ("add_layer_norm", lambda: cuda_ops.add_layer_norm(_meta(4, 8), _meta(4, 9), _meta(8), None, 1e-5),
     r"residual must match x's shape \(4, 8\)"),
    ("add_layer_norm", lambda: cuda_ops.add_layer_norm(_meta(4, 8), None, _meta(8, dtype=torch.bfloat16),
                                                       None, 1e-5),
     r"weight.dtype must be float32 or the input's torch.float16"),
    ("add_layer_norm", lambda: cuda_ops.add_layer_norm(_meta(4, 8), None, _meta(8, dtype=torch.float32),
                                                       _meta(8), 1e-5),
     r"bias.dtype must be weight's torch.float32, got torch.float16"),
    ("rotary", lambda: cuda_ops.rotary(_meta(4, 2, 8), _meta(4, 1, 8), _meta(4, dtype=torch.int32),
                                       _meta(16, 8, dtype=torch.float32)),
     r"positions.dtype must be int64"),
    ("rotary", lambda: cuda_ops.rotary(_meta(4, 2, 8), _meta(4, 1, 8), _meta(4, dtype=torch.int64),
                                       _meta(16, 10, dtype=torch.float32)),
     r"R=cos_sin.shape\[1\]=10 must be even, > 0 and <= head_dim=8"),
    ("rotary", lambda: cuda_ops.rotary(_meta(4, 2, 8), _meta(3, 1, 8), _meta(4, dtype=torch.int64),
                                       _meta(16, 8, dtype=torch.float32)),
     r"k must be \(T=4, heads, D=8\)"),
    ("rotary", lambda: cuda_ops.rotary(_meta(4, 16), _meta(4, 8), _meta(4, dtype=torch.int64),
                                       _meta(16, 8, dtype=torch.float32)),
     r"q and k must be 3-D"),
    ("rotary", lambda: cuda_ops.rotary(_meta(4, 2, 8), _meta(4, 1, 8), _meta(4, dtype=torch.int64),
                                       _meta(16, 8)),
     r"cos_sin must be a contiguous 2-D \(max_pos, R\) float32 tensor"),
    ("gather_pooled", lambda: cuda_ops.gather_pooled(_meta(4, 8), _meta(3, dtype=torch.int64), "cls"),
     r"cu_seqlens.dtype must be int32"),
    ("gather_pooled", lambda: cuda_ops.gather_pooled(_meta(4, 8), _meta(3, dtype=torch.int32), "max"),
     r"unknown pooling 'max'"),
    ("gather_pooled", lambda: cuda_ops.gather_pooled(_meta(4, 2, 8), _meta(3, dtype=torch.int32), "cls"),
     r"hidden must be 2-D \(T, H\)"),
    ("pooled_norm", lambda: cuda_ops.pooled_norm(_meta(4, 8), _meta(3, dtype=torch.int32), "cls",
                                                 "batch", _meta(8), None, 1e-5),
     r"unknown norm_kind 'batch'"),
    ("pooled_norm", lambda: cuda_ops.pooled_norm(_meta(4, 8), _meta(3, dtype=torch.int32), "cls",
                                                 "rms", None, None, 1e-5),
     r"norm_kind='rms' needs a weight"),
    ("pooled_norm", lambda: cuda_ops.pooled_norm(_meta(4, 8), _meta(3, dtype=torch.int32), "mean",
                                                 None, None, None, 1e-5, residual=_meta(4, 7)),
     r"residual must match hidden's shape \(4, 8\)"),
    ("activation", lambda: cuda_ops.activation(_meta(4, 3), "relu"),
     r"unknown activation 'relu'"),
    ("activation", lambda: cuda_ops.activation(_meta(4, 3), "softmax", _meta(2, dtype=torch.float32)),
     r"logit_bias must have 1 or L=3 elements"),
    ("activation", lambda: cuda_ops.activation(_meta(12), "sigmoid"),
     r"logits must be 2-D \(B, L\)"),
    # a positions vector shorter than T: the kernel would read past its end
    ("rotary", lambda: cuda_ops.rotary(_meta(4, 2, 8), _meta(4, 1, 8), _meta(3, dtype=torch.int64),
                                       _meta(16, 8, dtype=torch.float32)),
     r"positions must be 1-D of length T=4, got \(3,\)"),
    # rows past what the kernels cache in shared memory: refused, not a launch error
    ("add_rms_norm", lambda: cuda_ops.add_rms_norm(_meta(2, 32769), None, _meta(32769), 1e-6),
     r"H=32769 is past 32768, the widest row the kernel caches in shared memory"),
    ("pooled_norm", lambda: cuda_ops.pooled_norm(_meta(2, 16385), _meta(3, dtype=torch.int32), "last", "rms",
                                                 _meta(16385), None, 1e-6),
     r"H=16385 is past 16384, the widest row the kernel normalises in shared memory"),
    # a host tensor beside device logits: the kernel would take a host pointer
    ("activation", lambda: cuda_ops.activation(_meta(4, 3), "softmax", torch.zeros(3)),
     r"logit_bias is on cpu, expected the logits' device meta"),
]


@pytest.mark.parametrize("op,call,msg", BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_named(op, call, msg):
    with pytest.raises(ValueError, match=rf"pyengine\.cuda_ops\.{op}: .*{msg}"):
        call()


def test_non_tensors_raise_type_errors():
    with pytest.raises(TypeError, match=r"pyengine\.cuda_ops\.activation: logits must be a torch.Tensor"):
        cuda_ops.activation([[1.0, 2.0]], "softmax")
    with pytest.raises(TypeError, match=r"logit_bias must be None, a number or a tensor"):
        cuda_ops.activation(_meta(2, 3), "softmax", "0.5")


BAD_PN_CONFIGS = [
    ({"variant": "fast"}, ValueError,
     r"config variant must be 'default' or one of \['async', 'early_affine', 'slices'\], got 'fast'"),
    ({"slice_rows": 64}, ValueError, r"config variant must be 'default' or one of"),
    ({"variant": "slices", "rows": 2}, ValueError, r"config has unknown keys \['rows'\]"),
    ({"variant": "default", "warps": 4}, ValueError, r"config \{'variant': 'default'\} takes no parameters"),
    ({"variant": "slices", "warps": 0}, ValueError, r"config warps must be in \[1, 8\], got 0"),
    ({"variant": "slices", "warps": 16}, ValueError, r"config warps must be in \[1, 8\], got 16"),
    ({"variant": "slices", "rows_per_warp": 3}, ValueError, r"config rows_per_warp must be 1, 2 or 4, got 3"),
    ({"variant": "async", "rows_per_warp": 8}, ValueError, r"config rows_per_warp must be 1, 2 or 4, got 8"),
    ({"variant": "slices", "slice_rows": -8}, ValueError, r"config slice_rows must be >= 0"),
    ({"variant": "slices", "slice_rows": 64.0}, ValueError, r"config slice_rows must be an int, got 64.0"),
    ({"variant": "slices", "warps": True}, ValueError, r"config warps must be an int, got True"),
    ({"variant": "slices", "blocks_per_sm": -1}, ValueError, r"config blocks_per_sm must be in \[0, 64\]"),
    ([1, 64, 8, 2], ValueError, r"config as a sequence must be 5 ints"),
    ([0, 64, 8, 2, 0], ValueError, r"config variant id must be one of \[1, 2, 3\]"),
    ("slices", TypeError, r"config must be None, a dict or a sequence of 5 ints, got str"),
]


@pytest.mark.parametrize("config,exc,msg", BAD_PN_CONFIGS, ids=[f"cfg-{i}" for i in range(len(BAD_PN_CONFIGS))])
def test_bad_pooled_norm_configs_are_named_before_any_launch(monkeypatch, config, exc, msg):
    """A bad config is named before the tensors are looked at (these are CPU tensors, which
    would fail later) and before the extension is touched."""
    class NoExtension:
        def __getattr__(self, name):
            raise AssertionError(f"pyengine._C.{name} reached with a bad config")

    monkeypatch.setattr(cuda_ops, "_ext", NoExtension())
    x, w = torch.randn(6, 8), torch.ones(8)
    with pytest.raises(exc, match=rf"pyengine\.cuda_ops\.pooled_norm: {msg}"):
        cuda_ops.pooled_norm(x, _cu([2, 4]), "mean", "layer", w, None, 1e-5, config=config)
    with pytest.raises(exc, match=rf"pyengine\.cuda_ops\.pooled_norm: {msg}"):
        cuda_ops.pooled_norm(_meta(6, 8), _meta(3, dtype=torch.int32), "mean", "layer", _meta(8), None,
                             1e-5, config=config)


def test_pooled_norm_sweep_configs_are_valid():
    """Every SWEEP_CONFIGS entry passes validation, as do the same configs as 5 ints (the
    form the custom op carries); {"variant": "default"} is the default kernel (None)."""
    configs = cuda_ops.SWEEP_CONFIGS["pooled_norm"]
    assert configs
    assert cuda_ops._pooled_norm_config({"variant": "default"}) is None
    assert cuda_ops._pooled_norm_config(None) is None
    seen = set()
    for cfg in configs:
        ints = cuda_ops._pooled_norm_config(cfg)
        assert len(ints) == 5 and all(type(v) is int for v in ints), (cfg, ints)
        assert cuda_ops._pooled_norm_config(ints) == ints
        assert tuple(ints) not in seen, f"duplicate sweep entry {cfg}"
        seen.add(tuple(ints))
    assert "config" in str(torch.ops.pyengine.pooled_norm.default._schema)


# ----------------------------------------------------------------------------------------
# CPU: fake implementations (torch.compile / FakeTensorMode)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_impls_give_shapes_and_dtypes(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, H, B = 11, 64, 3
    with FakeTensorMode():
        dev = "cuda"  # fake CUDA tensors need no GPU
        x = torch.empty(T, H, dtype=dtype, device=dev)
        w = torch.empty(H, dtype=torch.float32, device=dev)
        cu = torch.empty(B + 1, dtype=torch.int32, device=dev)

        y, s = cuda_ops.add_rms_norm(x, x, w, 1e-6, 1.0)
        assert (y.shape, y.dtype, s.shape, s.dtype) == (x.shape, dtype, x.shape, dtype)
        assert y.device.type == "cuda"
        y, s = cuda_ops.add_rms_norm(x, None, w, 1e-6)
        assert y.shape == x.shape and y.dtype == dtype and s is x
        y, s = cuda_ops.add_layer_norm(x, x, w, w, 1e-5)
        assert (y.shape, y.dtype, s.shape, s.dtype) == (x.shape, dtype, x.shape, dtype)
        x3 = torch.empty(2, 5, H, dtype=dtype, device=dev)
        assert cuda_ops.add_layer_norm(x3, None, w, None, 1e-5)[0].shape == (2, 5, H)

        q = torch.empty(T, 4, 32, dtype=dtype, device=dev)
        k = torch.empty(T, 2, 32, dtype=dtype, device=dev)
        pos = torch.empty(T, dtype=torch.int64, device=dev)
        cs = torch.empty(128, 16, dtype=torch.float32, device=dev)
        rq, rk = cuda_ops.rotary(q, k, pos, cs, False)
        assert rq is q and rk is k

        for pooling in ("cls", "last", "mean"):
            g = cuda_ops.gather_pooled(x, cu, pooling)
            assert (g.shape, g.dtype) == ((B, H), dtype)
            p = cuda_ops.pooled_norm(x, cu, pooling, "layer", w, None, 1e-5, residual=x)
            assert (p.shape, p.dtype) == ((B, H), torch.float32)
            for cfg in cuda_ops.SWEEP_CONFIGS["pooled_norm"]:
                p = cuda_ops.pooled_norm(x, cu, pooling, "rms", w, None, 1e-5, residual=x, config=cfg)
                assert (p.shape, p.dtype) == ((B, H), torch.float32)
                p = torch.ops.pyengine.pooled_norm(x, cu, pooling, "rms", w, None, 1e-5, 0.0, None,
                                                   cuda_ops._pooled_norm_config(cfg))
                assert (p.shape, p.dtype) == ((B, H), torch.float32)
        logits = torch.empty(B, 5, dtype=dtype, device=dev)
        a = cuda_ops.activation(logits, "softmax", torch.empty(5, device=dev), 2.0)
        assert (a.shape, a.dtype) == ((B, 5), torch.float32)


def test_ops_are_registered_in_the_pyengine_namespace():
    for name in ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "rotary",
                 "gather_pooled", "pooled_norm", "activation"):
        assert hasattr(torch.ops.pyengine, name), name
    schema = str(torch.ops.pyengine.rotary.default._schema)
    assert "!) q" in schema and "!) k" in schema and "!) positions" not in schema, schema


# ----------------------------------------------------------------------------------------
# GPU: each op against its torch reference
# ----------------------------------------------------------------------------------------

def _poison():
    """Fill the caching allocator's free blocks with NaN, so an output element the kernel
    fails to write shows up (outputs come from torch.empty)."""
    big = torch.full((16 << 20,), float("nan"), device="cuda")  # 64 MB, large pool
    small = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(16)]  # 1 MB each
    del big, small


def _close(got, want, dtype, what, tol=None):
    atol, rtol = tol or next((a, r) for d, a, r in TOLS if d == dtype)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    assert not got.isnan().any() or want.isnan().any(), f"{what}: NaN in the output (unwritten?)"
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _rows(rows, H, dtype, layout, gen):
    """(rows, H) input: contiguous, with a padded row stride, or misaligned by one
    element (forces the scalar path)."""
    if layout == "contiguous":
        return torch.randn(rows, H, dtype=dtype, device="cuda", generator=gen)
    pad = 8 if layout == "strided" else 1
    base = torch.randn(rows, H + pad, dtype=dtype, device="cuda", generator=gen)
    return base[:, :H] if layout == "strided" else base[:, 1:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [384, 1536, 4096, 13, 16384])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
def test_norms_match_reference(dtype, H, layout):
    gen = torch.Generator(device="cuda").manual_seed(H)
    for rows in (1, 7, 300):
        x = _rows(rows, H, dtype, layout, gen)
        r = torch.randn(rows, H, dtype=dtype, device="cuda", generator=gen)
        for wdt in (dtype, torch.float32):
            w = torch.randn(H, dtype=wdt, device="cuda", generator=gen)
            b = torch.randn(H, dtype=wdt, device="cuda", generator=gen)
            for res in (None, r):
                tag = f"rows={rows} w={wdt} res={res is not None}"
                for offset in (0.0, 1.0):
                    _poison()
                    y, s = cuda_ops.add_rms_norm(x, res, w, 1e-6, offset)
                    ey, es = ref.add_rms_norm(x, res, w, 1e-6, offset)
                    _close(y, ey, dtype, f"add_rms_norm {tag} offset={offset}")
                    assert torch.equal(s, es), f"add_rms_norm summed {tag}"
                    if res is None:
                        assert s is x
                for bias in (b, None):
                    _poison()
                    y, s = cuda_ops.add_layer_norm(x, res, w, bias, 1e-5)
                    ey, es = ref.add_layer_norm(x, res, w, bias, 1e-5)
                    _close(y, ey, dtype, f"add_layer_norm {tag} bias={bias is not None}")
                    assert torch.equal(s, es), f"add_layer_norm summed {tag}"


@pytest.mark.gpu
def test_norm_of_3d_and_empty_inputs():
    x = torch.randn(2, 5, 3, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    _close(cuda_ops.add_rms_norm(x, None, w, 1e-6)[0], ref.add_rms_norm(x, None, w, 1e-6)[0],
           torch.bfloat16, "3-D rms")
    xt = x.transpose(0, 1)  # not contiguous: copied
    _close(cuda_ops.add_rms_norm(xt, None, w, 1e-6)[0], ref.add_rms_norm(xt, None, w, 1e-6)[0],
           torch.bfloat16, "3-D transposed rms")
    e = torch.empty(0, 64, device="cuda", dtype=torch.float16)
    assert cuda_ops.add_layer_norm(e, e, w.half(), None, 1e-5)[0].shape == (0, 64)


def _cos_sin(max_pos, R, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat((ang.cos(), ang.sin()), dim=-1).cuda()


def _positions(lens):
    return torch.cat([torch.arange(n) for n in lens]).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("D,R", [(64, 64), (128, 128), (128, 32), (80, 40), (96, 48), (64, 6)])
@pytest.mark.parametrize("fused", [False, True])
def test_rotary_matches_reference(dtype, neox, D, R, fused):
    gen = torch.Generator(device="cuda").manual_seed(D * 1000 + R)
    lens = [1, 17, 3, 130, 1]
    T, Hq, Hk = sum(lens), 8, 2
    pos = _positions(lens)
    cs = _cos_sin(256, R)
    if fused:  # q, k as strided views of one qkv buffer, as models produce them
        qkv = torch.randn(T, Hq + 2 * Hk, D, dtype=dtype, device="cuda", generator=gen)
        q, k = qkv[:, :Hq], qkv[:, Hq:Hq + Hk]
        v_before = qkv[:, Hq + Hk:].clone()
    else:
        q = torch.randn(T, Hq, D, dtype=dtype, device="cuda", generator=gen)
        k = torch.randn(T, Hk, D, dtype=dtype, device="cuda", generator=gen)
    q_ref, k_ref = q.clone(), k.clone()
    ref.rotary(q_ref, k_ref, pos, cs, neox)
    rq, rk = cuda_ops.rotary(q, k, pos, cs, neox)
    assert rq is q and rk is k
    _close(q, q_ref, dtype, f"rotary q neox={neox}")
    _close(k, k_ref, dtype, f"rotary k neox={neox}")
    if fused:
        assert torch.equal(qkv[:, Hq + Hk:], v_before), "rotary touched v"
    assert torch.equal(q[..., R:], q_ref[..., R:]), "rotary changed the unrotated columns"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [384, 1000, 2048])
@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
def test_gather_pooled_matches_reference(dtype, H, pooling, layout):
    gen = torch.Generator(device="cuda").manual_seed(H)
    for lens in ([1], [1, 7, 300, 1, 64], [512] * 3 + [1] * 5):
        cu = _cu(lens, "cuda")
        hidden = _rows(sum(lens), H, dtype, layout, gen)
        _poison()
        got = cuda_ops.gather_pooled(hidden, cu, pooling)
        want = ref.gather_pooled(hidden, cu, pooling)
        if pooling == "mean":
            _close(got, want, dtype, f"gather_pooled mean lens={lens}")
        else:
            assert torch.equal(got, want), f"gather_pooled {pooling} lens={lens}"


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gather_pooled", "pooled_norm"])
@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
@pytest.mark.parametrize("H", [256, 8192])  # the warp kernels, and pooled_norm's block kernel
def test_empty_sequences_pool_to_nan(op, pooling, H):
    """Empty first, middle and last sequences give NaN rows whatever the pooling (mean's
    0 / 0; cls / last read no row out of bounds), the others as the reference."""
    gen = torch.Generator(device="cuda").manual_seed(41)
    lens = [0, 3, 0, 2, 0]
    cu = _cu(lens, "cuda")
    hidden = torch.randn(sum(lens), H, device="cuda", generator=gen).to(torch.bfloat16)
    w = torch.randn(H, device="cuda", generator=gen)
    _poison()
    if op == "gather_pooled":
        got, want = cuda_ops.gather_pooled(hidden, cu, pooling), ref.gather_pooled(hidden, cu, pooling)
    else:
        got = cuda_ops.pooled_norm(hidden, cu, pooling, "rms", w, None, 1e-6)
        want = ref.pooled_norm(hidden, cu, pooling, "rms", w, None, 1e-6)
    empty = torch.tensor([n == 0 for n in lens], device="cuda")
    assert got[empty].float().isnan().all() and want[empty].float().isnan().all(), got[:, :4]
    _close(got[~empty], want[~empty], torch.bfloat16, f"{op} {pooling} beside empty sequences")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
@pytest.mark.parametrize("norm_kind", [None, "layer", "rms"])
# 64: one pack per lane with most lanes masked; 1000: a partly masked last pack; 4096: the
# largest warp-per-row mean for 16-bit rows without a residual (fp32, or with a residual:
# the block kernel); 8192: the block kernel for every dtype.
@pytest.mark.parametrize("H", [64, 384, 1000, 4096, 8192])
def test_pooled_norm_matches_reference(dtype, pooling, norm_kind, H):
    gen = torch.Generator(device="cuda").manual_seed(H + 7)
    lens = [1, 9, 200, 1, 33]
    cu = _cu(lens, "cuda")
    T = sum(lens)
    for layout in ("contiguous", "misaligned"):
        hidden = _rows(T, H, dtype, layout, gen)
        res = torch.randn(T, H, dtype=dtype, device="cuda", generator=gen)
        for wdt, residual in ((dtype, None), (torch.float32, res), (dtype, res)):
            w = torch.randn(H, dtype=wdt, device="cuda", generator=gen)
            b = torch.randn(H, dtype=wdt, device="cuda", generator=gen)
            offset = 1.0 if norm_kind == "rms" else 0.0
            for bias in ((b, None) if norm_kind == "layer" else (None,)):
                _poison()
                got = cuda_ops.pooled_norm(hidden, cu, pooling, norm_kind, w, bias, 1e-6, offset, residual)
                want = ref.pooled_norm(hidden, cu, pooling, norm_kind, w, bias, 1e-6, offset, residual)
                # fp32 out; inputs rounded in dtype first, so bf16/fp16 only differ in fp32 math
                _close(got, want, dtype, f"pooled_norm {layout} w={wdt} res={residual is not None} "
                       f"bias={bias is not None}", tol=(2e-5, 2e-5) if norm_kind else FP32_OUT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_kind", [None, "layer", "rms"])
@pytest.mark.parametrize("H", [1024, 4096, 1000 + 3])
def test_pooled_mean_empty_sequence_and_determinism(dtype, norm_kind, H):
    """An empty sequence pools to a NaN row (0 / 0, as the reference) without touching its
    neighbours, and mean pooling gives bitwise the same result on every call."""
    gen = torch.Generator(device="cuda").manual_seed(H + 11)
    lens = [3, 0, 700, 1, 0, 64]
    cu = _cu(lens, "cuda")
    hidden = torch.randn(sum(lens), H, dtype=dtype, device="cuda", generator=gen)
    w = torch.randn(H, dtype=dtype, device="cuda", generator=gen)
    b = torch.randn(H, dtype=dtype, device="cuda", generator=gen)
    bias = b if norm_kind == "layer" else None
    empty = torch.tensor([n == 0 for n in lens], device="cuda")
    for residual in (None, hidden):
        _poison()
        got = cuda_ops.pooled_norm(hidden, cu, "mean", norm_kind, w, bias, 1e-6, 0.0, residual)
        want = ref.pooled_norm(hidden, cu, "mean", norm_kind, w, bias, 1e-6, 0.0, residual)
        what = f"pooled_norm mean {norm_kind} res={residual is not None}"
        assert got[empty].isnan().all(), f"{what}: an empty sequence must pool to NaN"
        _close(got[~empty], want[~empty], dtype, what, tol=(2e-5, 2e-5))
        again = cuda_ops.pooled_norm(hidden, cu, "mean", norm_kind, w, bias, 1e-6, 0.0, residual)
        assert torch.equal(got[~empty], again[~empty]), f"{what}: not deterministic"
    g = cuda_ops.gather_pooled(hidden, cu, "mean")
    assert g[empty].isnan().all()
    _close(g[~empty], ref.gather_pooled(hidden, cu, "mean")[~empty], dtype, "gather_pooled mean")
    assert torch.equal(g[~empty], cuda_ops.gather_pooled(hidden, cu, "mean")[~empty])


def _cfg_id(cfg):
    return "default" if cfg is None else "-".join(str(v) for v in cfg.values())


PN_CONFIGS = [None] + cuda_ops.SWEEP_CONFIGS["pooled_norm"]  # the default kernel, then the sweep


@pytest.mark.gpu
@pytest.mark.parametrize("config", PN_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", DTYPES)
# 64: one pack per lane, most lanes masked; 1000: a partly masked last pack; 1024: the
# benchmark's width (4 packs of bf16, rows per warp up to 4); 2048: 8 packs (rows per warp
# lowered; with a residual, one row); 4096: 16 packs of 16-bit rows, and the block kernel
# (config ignored) for fp32 and for residual rows.
@pytest.mark.parametrize("H", [64, 1000, 1024, 2048, 4096])
def test_pooled_norm_configs_match_reference(config, dtype, H):
    """Each SWEEP_CONFIGS entry against the reference: lengths 1, empty (NaN), one more than
    a multiple of every sweep slice, and longer than the longest; deterministic."""
    gen = torch.Generator(device="cuda").manual_seed(H + 13)
    lens = [1, 0, 9, 513, 1, 64, 65, 129, 257, 300, 2]
    cu = _cu(lens, "cuda")
    T = sum(lens)
    empty = torch.tensor([n == 0 for n in lens], device="cuda")
    hidden = torch.randn(T, H, dtype=dtype, device="cuda", generator=gen) * 2 + 0.5
    res = torch.randn(T, H, dtype=dtype, device="cuda", generator=gen)
    for norm_kind in (None, "layer", "rms"):
        for wdt, residual in ((dtype, None), (torch.float32, res)):
            w = torch.randn(H, dtype=wdt, device="cuda", generator=gen)
            b = torch.randn(H, dtype=wdt, device="cuda", generator=gen)
            offset = 1.0 if norm_kind == "rms" else 0.0
            for bias in ((b, None) if norm_kind == "layer" else (None,)):
                what = (f"pooled_norm config={config} {norm_kind} w={wdt} res={residual is not None} "
                        f"bias={bias is not None}")
                _poison()
                got = cuda_ops.pooled_norm(hidden, cu, "mean", norm_kind, w, bias, 1e-6, offset,
                                           residual, config=config)
                want = ref.pooled_norm(hidden, cu, "mean", norm_kind, w, bias, 1e-6, offset, residual)
                assert got[empty].isnan().all(), f"{what}: an empty sequence must pool to NaN"
                _close(got[~empty], want[~empty], dtype, what,
                       tol=(2e-5, 2e-5) if norm_kind else FP32_OUT)
                again = cuda_ops.pooled_norm(hidden, cu, "mean", norm_kind, w, bias, 1e-6, offset,
                                             residual, config=config)
                assert torch.equal(got[~empty], again[~empty]), f"{what}: not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("config", PN_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_norm_configs_are_batch_invariant(config, dtype):
    """A sequence's pooled row is bitwise the same alone, in a batch, and after a sequence
    of another length (DESIGN: batch-invariant, 1e-5 in fp32; the kernels give 0)."""
    gen = torch.Generator(device="cuda").manual_seed(29)
    H = 1024
    lens = [37, 300, 5, 129, 1, 513]
    starts = [0] + list(itertools.accumulate(lens))
    hidden = torch.randn(starts[-1], H, dtype=dtype, device="cuda", generator=gen)
    res = torch.randn(starts[-1], H, dtype=dtype, device="cuda", generator=gen)
    lead = torch.randn(77, H, dtype=dtype, device="cuda", generator=gen)
    w = torch.randn(H, device="cuda", generator=gen)
    b = torch.randn(H, device="cuda", generator=gen)
    for norm_kind, residual in (("layer", None), ("rms", res)):
        def run(rows, lens_, extra=None):
            h, r = hidden[rows], None if residual is None else residual[rows]
            if extra is not None:
                h = torch.cat([extra, h])
                r = None if r is None else torch.cat([extra, r])
            return cuda_ops.pooled_norm(h, _cu(lens_, "cuda"), "mean", norm_kind, w, b, 1e-6, 0.0, r,
                                        config=config)

        batch = run(slice(None), lens)
        for i in (1, 3, 4, 5):
            rows = slice(starts[i], starts[i + 1])
            alone = run(rows, [lens[i]])
            shifted = run(rows, [77, lens[i]], extra=lead)
            what = f"config={config} {norm_kind} sequence {i} (length {lens[i]})"
            assert torch.equal(batch[i], alone[0]), f"{what}: differs alone and in its batch"
            assert torch.equal(batch[i], shifted[1]), f"{what}: differs after another sequence"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "identity"])
@pytest.mark.parametrize("B,L", [(1, 1), (33, 1), (7, 2), (5, 5), (3, 100)])
def test_activation_matches_reference(dtype, kind, B, L):
    gen = torch.Generator(device="cuda").manual_seed(B * 100 + L)
    logits = (torch.randn(B, L, device="cuda", generator=gen) * 8).to(dtype)
    vec = torch.randn(L, device="cuda", generator=gen)
    for bias, scale in ((None, None), (0.5, None), (None, 2.5), (-1.25, 0.5),
                        (torch.tensor(0.3, device="cuda"), vec), (vec, torch.tensor([3.0], device="cuda"))):
        _poison()
        got = cuda_ops.activation(logits, kind, bias, scale)
        want = ref.activation(logits, kind, bias, scale)
        _close(got, want, torch.float32, f"activation {kind} bias={bias} scale={scale}", tol=FP32_OUT)
    wide = torch.randn(B, L + 3, device="cuda", generator=gen).to(dtype)[:, :L]  # row stride
    _close(cuda_ops.activation(wide, kind), ref.activation(wide, kind), torch.float32,
           f"activation {kind} strided", tol=FP32_OUT)


@pytest.mark.gpu
def test_ops_run_on_the_current_stream():
    """Work is queued on torch's current stream, not the legacy default one."""
    s = torch.cuda.Stream()
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        for _ in range(3):
            y, _ = cuda_ops.add_rms_norm(x, x, w, 1e-6)
    s.synchronize()
    _close(y, ref.add_rms_norm(x, x, w, 1e-6)[0], torch.bfloat16, "rms on a side stream")


@pytest.mark.gpu
def test_opcheck():
    """torch.library.opcheck: schema, fake impls and mutation declarations agree with the
    real kernels."""
    dt = torch.float16
    x = torch.randn(9, 64, device="cuda", dtype=dt)
    w = torch.randn(64, device="cuda", dtype=dt)
    cu = _cu([1, 3, 5], "cuda")
    q = torch.randn(9, 4, 64, device="cuda", dtype=dt)
    k = torch.randn(9, 2, 64, device="cuda", dtype=dt)
    pos = _positions([1, 3, 5])
    cs = _cos_sin(16, 64)
    P = torch.ops.pyengine
    cases = [
        (P.rms_norm, (x, w, 1e-6, 0.0)),
        (P.add_rms_norm, (x, x, w, 1e-6, 1.0)),
        (P.layer_norm, (x, w, w, 1e-5)),
        (P.add_layer_norm, (x, x, w, None, 1e-5)),
        (P.rotary, (q, k, pos, cs, True)),
        (P.gather_pooled, (x, cu, "mean")),
        (P.pooled_norm, (x, cu, "last", "rms", w, None, 1e-6, 1.0, x)),
        (P.pooled_norm, (x, cu, "mean", "layer", w, None, 1e-6, 0.0, x, [1, 2, 2, 2, 0])),
        (P.activation, (x.float(), "softmax", 0.5, 2.0, None, None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_registry_picks_cuda_ops_on_gpu():
    ops = ref.resolve_ops("cuda", "cuda")
    for name in ("add_rms_norm", "add_layer_norm", "rotary", "gather_pooled", "pooled_norm",
                 "activation"):
        assert ops.chosen[name] == "cuda", ops.describe()


@pytest.mark.gpu
def test_cuda_errors_name_the_op():
    """A launch the GPU refuses (too much shared memory for one row) comes back as a
    RuntimeError naming the op and the CUDA error."""
    H = 1 << 17  # 512 KB of fp32 row in shared memory: over any GPU's limit
    x = torch.randn(2, H, device="cuda")
    with pytest.raises(RuntimeError, match=r"pyengine\._C\.add_rms_norm: CUDA error \w+"):
        cuda_ops.add_rms_norm(x, None, torch.ones(H, device="cuda"), 1e-6)
    torch.cuda.synchronize()  # the context is still usable
    assert math.isfinite(float(torch.ones(1, device="cuda").sum()))
