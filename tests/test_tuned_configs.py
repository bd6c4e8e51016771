"""Tuned launch configs (kernels/_tuned.py): the file format and its checks,
which file applies, launchers taking a file's config for the shapes it names (and only
those), the benchmark writing one from its sweeps, and the engine refusing a bad one at
start. Kernels run in the Triton interpreter on tiny shapes."""
import io
import json

import pytest
import torch

from pyengine import ops as ref_ops
from pyengine.bench import kernels as kb
from pyengine.kernels import _tuned


def _write(tmp_path, ops, name="configs.json", **extra):
    path = tmp_path / name
    path.write_text(json.dumps({"format": 1, "device": "test", "ops": ops, **extra}))
    return path


def _entry(config):
    return {"config": config, "ms": 1.0, "default_ms": 2.0, "case": "test"}


@pytest.fixture(autouse=True)
def _fresh_state():
    """The environment is read once per process until reset: each test starts and ends
    with it unread, so no other test sees a file set here."""
    _tuned.reset()
    yield
    _tuned.reset()


def _setenv(monkeypatch, value):
    monkeypatch.setenv(_tuned.ENV, str(value))
    _tuned.reset()


@pytest.fixture
def configs_env(tmp_path, monkeypatch):
    """configs_env(ops) -> path: a configs file that PYENGINE_KERNEL_CONFIGS points at."""
    def make(ops):
        path = _write(tmp_path, ops, name=f"c{len(list(tmp_path.iterdir()))}.json")
        _setenv(monkeypatch, path)
        return path
    return make


def _spy_lookups(monkeypatch):
    """Every _tuned.lookup call as (op, key, config found)."""
    calls, real = [], _tuned.lookup

    def spy(device, op, key):
        found = real(device, op, key)
        calls.append((op, key() if callable(key) else key, found))
        return found
    monkeypatch.setattr(_tuned, "lookup", spy)
    return calls


def test_device_file_name_and_keys():
    assert _tuned.device_file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert _tuned.device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert _tuned.attention_key(torch.bfloat16, 128, True, 2, False, 0.0) == "bfloat16/d128/causal/r2"
    assert _tuned.attention_key(torch.float16, 72, False, 1, True, 50.0) == "float16/d72/bidir/r1/window/softcap"
    # the hidden size is padded to the tile width: BERT-base's 768 shares 1024's entry
    assert _tuned.pooled_key(torch.bfloat16, 768, "mean", "layer") == "bfloat16/h1024/mean/layer"
    assert _tuned.pooled_key(torch.float32, 1024, "last", "rms", True) == "float32/h1024/last/rms/residual"


@pytest.mark.parametrize("content,match", [
    ("{not json", "unreadable"),
    (json.dumps({"format": 2, "ops": {}}), '"format": 1'),
    (json.dumps([1, 2]), '"format": 1'),
    (json.dumps({"format": 1, "ops": []}), '"ops" must be an object'),
    (json.dumps({"format": 1, "ops": {"varlen_attention": {}}}), 'named "backend/op"'),
    (json.dumps({"format": 1, "ops": {"triton/gated_act": {"k": {"ms": 1.0}}}}), "triton/gated_act k: expected"),
    (json.dumps({"format": 1, "ops": {"triton/varlen_attention": {"k": {"config": [64, 0, 4, 3]}}}}),
     "positive ints"),
    (json.dumps({"format": 1, "ops": {"triton/gated_act": {"k": {"config": {"block": 1.5}}}}}), "expected"),
    # an op or a key typed wrong would be read and never used
    (json.dumps({"format": 1, "ops": {"triton/varlen_atention": {"float32/d16/bidir/r1": {"config": [16, 16, 2, 1]}}}}),
     "unknown op 'triton/varlen_atention'"),
    (json.dumps({"format": 1, "ops": {"triton/gated_act": {"fp32/i8/silu": {"config": {"block": 4}}}}}),
     "'fp32/i8/silu': a shape key starts with the dtype"),
    # a config against its op's own rules would fail mid-run (a compile error on a GPU)
    (json.dumps({"format": 1, "ops": {"triton/varlen_attention": {"float32/d16/bidir/r1": {"config": [24, 16, 2, 1]}}}}),
     r"float32/d16/bidir/r1: varlen_attention: config BLOCK_M=24 must be a power of two"),
    (json.dumps({"format": 1, "ops": {"triton/gated_act": {"float32/i8/silu": {"config": {"blocks": 4}}}}}),
     r"gated_act: unknown config key\(s\) \['blocks'\]"),
    (json.dumps({"format": 1, "ops": {"cuda/pooled_norm": {"bfloat16/h1024/mean/layer": {"config": {"variant": "x"}}}}}),
     "config variant must be"),
])
def test_bad_file_is_refused_naming_it(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"tuned kernel configs {path}: .*{match}"):
        _tuned.load(path)


def test_an_engine_refuses_a_bad_file_when_it_starts(configs_env, tmp_path):
    # README: an engine reads and checks the file when it starts, before any work.
    from transformers import BertConfig

    from pyengine import LLM
    from tiny import save_tiny

    save_tiny(tmp_path / "m", BertConfig(vocab_size=160, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, num_labels=2), tokenizer=None)
    path = configs_env({"triton/varlen_attention": {"float32/d16/bidir/r1": _entry([16, 16, 2, 1, 3])}})
    with pytest.raises(ValueError, match=rf"tuned kernel configs {path}: .*GROUP=3 heads per program must be"):
        LLM(str(tmp_path / "m"), kernel_backend="triton")


def test_which_file_applies(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(_tuned.ENV, raising=False)
    assert _tuned.source(cpu) is None  # bundled files are per GPU model
    path = _write(tmp_path, {"triton/gated_act": {"float32/i8/silu": _entry({"block": 4})}})
    monkeypatch.setenv(_tuned.ENV, str(path))
    assert _tuned.source(cpu) is None  # read once: a change takes effect after reset()
    _tuned.reset()
    assert _tuned.source(cpu) == path
    assert _tuned.lookup(cpu, "triton/gated_act", "float32/i8/silu") == {"block": 4}
    assert _tuned.lookup(cpu, "triton/gated_act", lambda: "float32/i8/gelu") is None
    assert _tuned.lookup(cpu, "triton/pooled_norm", "float32/i8/silu") is None
    with _tuned.disabled():
        assert _tuned.lookup(cpu, "triton/gated_act", "float32/i8/silu") is None
    assert _tuned.lookup(cpu, "triton/gated_act", "float32/i8/silu") == {"block": 4}
    for off in ("off", "none", "0", ""):
        _setenv(monkeypatch, off)
        assert _tuned.source(cpu) is None and _tuned.table(cpu, "triton/gated_act") == {}
    monkeypatch.setenv(_tuned.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json: no such file"):
        _tuned.check(cpu)  # an engine's start reads the environment afresh


def _stub_kernel(monkeypatch, mod, name):
    """Replace mod.name (a @triton.jit kernel) by a recorder of its launches' keywords."""
    launches = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, kw))
    monkeypatch.setattr(mod, name, Stub())
    return launches


def test_launchers_take_the_config_of_their_shape(configs_env, monkeypatch):
    # Each launcher, given no config, takes the file's entry for its shape key, and its
    # built-in choice for any other shape.
    from pyengine.kernels import gated_act, pooled_norm, varlen_attention

    configs_env({"triton/gated_act": {"float32/i8/silu": _entry({"block": 4, "num_warps": 2})},
                 "triton/pooled_norm": {"float32/h16/mean/layer": _entry({"block_t": 2, "splits": 3})},
                 "triton/varlen_attention": {"float32/d16/causal/r2": _entry([16, 16, 2, 1])}})
    acts = _stub_kernel(monkeypatch, gated_act, "_gated_act_kernel")
    gated_act._launch(torch.randn(5, 16), "silu")
    gated_act._launch(torch.randn(5, 16), "gelu")                 # another key: built in
    assert [(kw["BLOCK"], kw["num_warps"]) for _, kw in acts] == [(4, 2), (8, 4)]

    norms = _stub_kernel(monkeypatch, pooled_norm, "_pooled_norm_kernel")
    _stub_kernel(monkeypatch, pooled_norm, "_mean_finish_kernel")
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    pooled_norm._launch(torch.randn(7, 16), cu, "mean", "layer", torch.ones(16), None, 1e-6)
    pooled_norm._launch(torch.randn(7, 16), cu, "mean", "rms", torch.ones(16), None, 1e-6)
    assert [(grid, kw["BLOCK_T"]) for grid, kw in norms] == [((2, 3), 2), ((2, 1), 256)]

    attn = _stub_kernel(monkeypatch, varlen_attention, "_varlen_attention_kernel")
    monkeypatch.setattr(varlen_attention, "tile_map", lambda cu, T, bm: (None, None, 1))
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    varlen_attention._launch(q, k, k, cu, 4, True)
    varlen_attention._launch(q, k, k, cu, 4, False)               # bidirectional: built in
    varlen_attention._launch(q, k, k, cu, 4, True, window=(2, 0))  # windowed: built in
    varlen_attention._launch(q, k, k, cu, 4, True, block_m=32)    # a test override wins
    built_in = varlen_attention.config_for(torch.float32, 16)
    assert [(kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"]) for _, kw in attn] == [
        (16, 16, 2), built_in[:2] + built_in[2:3], built_in[:2] + built_in[2:3], (32,) + built_in[1:3]]


def test_keys_tell_apart_launches_a_config_was_not_measured_on(configs_env):
    """pooled_norm with and without a residual, gather_pooled per pooling, qk_norm_rotary
    per rotary width (not its head dim): the documented key format of each."""
    from pyengine.kernels import gather_pooled, pooled_norm, qk_norm_rotary

    h, cu, w = torch.randn(7, 16), torch.tensor([0, 3, 7], dtype=torch.int32), torch.ones(16)
    assert pooled_norm.tune_key(h, cu, "last", "rms", w, None, 1e-6, 0.0, h) == "float32/h16/last/rms/residual"
    assert pooled_norm.tune_key(h, cu, "last", "rms", w, None, 1e-6) == "float32/h16/last/rms"
    assert [gather_pooled.tune_key(h, cu, p) for p in ("cls", "last", "mean")] == [
        "float32/h16/cls", "float32/h16/last", "float32/h16/mean"]
    q, k = torch.randn(7, 4, 16).half(), torch.randn(7, 2, 16).half()
    cos_sin = torch.randn(20, 8)  # partial rotary: 8 of the 16 dims
    assert qk_norm_rotary.tune_key(q, k, w, w, torch.zeros(7, dtype=torch.long), cos_sin) == \
        "float16/hq4/hk2/d16/r8"
    # A mean-only entry is for mean launches: cls keeps its built-in config, and both work.
    configs_env({"triton/gather_pooled": {"float32/h16/mean": _entry({"block_t": 2, "stages": 2})}})
    torch.testing.assert_close(gather_pooled.gather_pooled(h, cu, "cls"), h[[0, 3]])
    torch.testing.assert_close(gather_pooled.gather_pooled(h, cu, "mean"), torch.stack([h[:3].mean(0),
                                                                                        h[3:].mean(0)]))


def test_expert_matmul_takes_the_config_of_its_expert_shape(configs_env, monkeypatch):
    # Keyed by the dtype and the expert weight's (N, K): any batch of tokens takes it.
    from pyengine.kernels import expert_matmul

    configs_env({"triton/expert_matmul": {"float32/n32/k16": _entry({"block_m": 16, "block_n": 32,
                                                                      "num_stages": 2})}})
    launches = _stub_kernel(monkeypatch, expert_matmul, "_expert_matmul_kernel")
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    for T in (3, 2):
        expert_matmul._launch(torch.randn(T, 16), torch.randn(2, 32, 16), experts[:T])
    expert_matmul._launch(torch.randn(3, 16), torch.randn(2, 24, 16), experts)  # another N: built in
    assert [(kw["BLOCK_M"], kw["BLOCK_N"], kw["num_stages"]) for _, kw in launches] == [
        (16, 32, 2), (16, 32, 2), (64, 64, 3)]


@pytest.mark.parametrize("ops,call,match", [
    ({"triton/gated_act": {"float32/i8/silu": _entry({"block": 6})}},
     lambda: __import__("pyengine.kernels.gated_act", fromlist=["x"])._launch(torch.randn(2, 16), "silu"),
     "gated_act: config.*power of two"),
    ({"triton/varlen_attention": {"float32/d16/bidir/r1": _entry([16, 16])}},
     lambda: __import__("pyengine.kernels.varlen_attention", fromlist=["x"])._launch(
         torch.randn(3, 1, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16),
         torch.tensor([0, 3], dtype=torch.int32), 3), "varlen_attention: config must be"),
])
def test_bad_tuned_config_fails_like_a_bad_argument(configs_env, ops, call, match):
    # The file's structure is checked on load; a config's values by the launcher, before it launches.
    configs_env(ops)
    with pytest.raises(ValueError, match=match):
        call()


# fp32 in the interpreter; tuned configs change tiling, not the math: each result is
# within float tolerance of the float64 reference.
@pytest.mark.parametrize("lens", [
    [1, 17, 9],   # a one-token sequence and two that span several 16-row blocks
    [5],          # one sequence
])
def test_tuned_configs_compute_the_same_results(configs_env, lens):
    from pyengine.kernels import pooled_norm, varlen_attention

    torch.manual_seed(len(lens))
    T, H, D = sum(lens), 16, 16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    configs_env({"triton/pooled_norm": {"float32/h16/mean/layer": _entry({"block_t": 2, "splits": 2, "stages": 2})},
                 "triton/varlen_attention": {"float32/d16/causal/r2": _entry([16, 16, 2, 1, 2])}})
    h, w, b = torch.randn(T, H), torch.randn(H), torch.randn(H)
    got = pooled_norm._launch(h, cu, "mean", "layer", w, b, 1e-6)
    want = ref_ops.pooled_norm(h.double(), cu, "mean", "layer", w.double(), b.double(), 1e-6).double()
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), (got.double() - want).abs().max()
    q, k, v = torch.randn(T, 4, D), torch.randn(T, 2, D), torch.randn(T, 2, D)
    got = varlen_attention._launch(q, k, v, cu, max(lens), True)
    want = ref_ops.varlen_attention(q.double(), k.double(), v.double(), cu, max(lens), True)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), (got.double() - want).abs().max()


def test_cuda_pooled_norm_takes_its_entry(configs_env):
    # Its config is checked before the device: on meta tensors a bad tuned entry fails on
    # the config, and a shape with no entry (or a good entry) gets as far as the device check.
    from pyengine import cuda_ops

    h = torch.empty(7, 1024, dtype=torch.bfloat16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    w = torch.empty(1024, dtype=torch.bfloat16, device="meta")
    # A bad entry fails when the file is read, naming the file, the op and the key.
    configs_env({"cuda/pooled_norm": {"bfloat16/h1024/mean/layer": _entry({"variant": "nope"})}})
    with pytest.raises(ValueError, match=r"tuned kernel configs .*cuda/pooled_norm bfloat16/h1024/mean/layer: "
                                         r".*config variant must be"):
        cuda_ops.pooled_norm(h, cu, "mean", "layer", w, None, 1e-6)
    configs_env({"cuda/pooled_norm": {"bfloat16/h1024/mean/layer": _entry({"variant": "slices", "slice_rows": 64})}})
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda_ops.pooled_norm(h, cu, "mean", "layer", w, None, 1e-6)
    assert cuda_ops.TUNE_KEYS["pooled_norm"](h, cu, "mean", "layer", w, None, 1e-6) == "bfloat16/h1024/mean/layer"


def _row(op, key, config, ms, impl="triton", case="c"):
    return {"sweep": "op", "op": op, "case": case, "impl": impl, "tune_key": key, "config": config,
            "default": config is None, "ms": ms}


def test_sweep_verdicts_keep_only_clear_winners():
    rows = [_row("gated_act", "k1", None, 1.00), _row("gated_act", "k1", {"block": 4}, 0.90),
            _row("gated_act", "k1", {"block": 8}, 0.95),
            _row("gated_act", "k2", None, 1.00), _row("gated_act", "k2", {"block": 4}, 0.985),  # within the margin
            _row("gated_act", "k3", None, 1.00), _row("gated_act", "k3", {"block": 4}, 1.20),
            _row("gated_act", "k4", {"block": 4}, 0.5),                                        # no default timed
            _row("gated_act", "k5", None, 1.00), _row("gated_act", "k5", {"block": 4}, None),   # failed candidate
            _row("pooled_norm", "k1", None, 1.0, impl="cuda"), _row("pooled_norm", "k1", {"v": 1}, 0.5, impl="cuda")]
    v = kb.tuned_entries(rows, margin=0.03)
    assert v == {("triton/gated_act", "k1"): {"config": {"block": 4}, "ms": 0.9, "default_ms": 1.0, "case": "c"},
                 ("triton/gated_act", "k2"): None, ("triton/gated_act", "k3"): None,
                 ("triton/gated_act", "k5"): None,
                 ("cuda/pooled_norm", "k1"): {"config": {"v": 1}, "ms": 0.5, "default_ms": 1.0, "case": "c"}}


def test_write_configs_merges_and_round_trips(tmp_path):
    path = tmp_path / "out" / "NVIDIA_TEST.json"
    first = [_row("gated_act", "float32/k1", None, 1.0), _row("gated_act", "float32/k1", {"block": 4}, 0.5),
             _row("gated_act", "float32/k2", None, 1.0), _row("gated_act", "float32/k2", {"block": 8}, 0.5)]
    kb.write_configs(str(path), first, "cpu", out=io.StringIO())
    assert _tuned.load(path) == {"triton/gated_act": {"float32/k1": {"block": 4}, "float32/k2": {"block": 8}}}
    # A later sweep of k2 alone where the built-in choice won: k2 goes, k1 stays.
    out = io.StringIO()
    data = kb.write_configs(str(path), [_row("gated_act", "float32/k2", None, 1.0), _row("gated_act", "float32/k2", {"b": 8}, 1.1)],
                            "cpu", out=out)
    assert _tuned.load(path) == {"triton/gated_act": {"float32/k1": {"block": 4}}}
    assert data["measured"]["torch"] == torch.__version__ and "built-in choice kept" in out.getvalue()
    path.write_text("[]")
    with pytest.raises(ValueError, match="format"):
        kb.write_configs(str(path), first, "cpu", out=io.StringIO())  # a bad file is not overwritten
    assert path.read_text() == "[]"
    # A file measured on another GPU is not merged into, and nothing is left half-written.
    path.write_text(json.dumps({"format": 1, "device": "NVIDIA OTHER", "ops": {}}))
    with pytest.raises(ValueError, match="measured on 'NVIDIA OTHER', not on this 'cpu'"):
        kb.write_configs(str(path), first, "cpu", out=io.StringIO())
    path.write_text(json.dumps({"format": 1}))  # no "ops" yet: merged into all the same
    kb.write_configs(str(path), first, "cpu", out=io.StringIO())
    assert _tuned.load(path) == {"triton/gated_act": {"float32/k1": {"block": 4}, "float32/k2": {"block": 8}}}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_sweep_to_file_to_launcher(tmp_path, monkeypatch):
    # The whole loop on CPU: an op sweep in the interpreter, its verdicts written, and the
    # launcher then taking the file's config for that shape. One candidate made
    # artificially slow and one fast keeps the verdict independent of timing noise.
    from pyengine.kernels import gated_act

    monkeypatch.setattr(gated_act, "SWEEP_CONFIGS", [{"block": 16}, {"block": 32}])
    monkeypatch.setattr(kb, "SWEEP_CASES", {"gated_act": ("silu",)})
    monkeypatch.setattr(kb, "cases", lambda device, quick=False: [
        kb.Case("gated_act", "silu", "T=4", lambda: (torch.randn(4, 64), "silu"), bytes=4 * 96 * 4)])
    fake_ms = {None: 2.0, 16: 1.0, 32: 3.0}
    launched = []

    def fake_time(call, device, **kw):
        call()
        return fake_ms[launched[-1]]
    real_launch = gated_act._launch

    def recording_launch(x, kind, config=None):
        launched.append(config and config["block"])
        return real_launch(x, kind, config=config)
    monkeypatch.setattr(gated_act, "_launch", recording_launch)
    monkeypatch.setattr(kb, "time_call", fake_time)
    rows = kb.op_sweep("cpu", repeats=1, out=io.StringIO())
    assert {r["tune_key"] for r in rows} == {"float32/i32/silu"}
    path = tmp_path / "tuned.json"
    kb.write_configs(str(path), rows, "cpu", out=io.StringIO())
    assert _tuned.load(path) == {"triton/gated_act": {"float32/i32/silu": {"block": 16}}}
    monkeypatch.setattr(gated_act, "_launch", real_launch)
    _setenv(monkeypatch, path)
    launches = _stub_kernel(monkeypatch, gated_act, "_gated_act_kernel")
    gated_act.gated_act(torch.randn(4, 64), "silu")
    assert [kw["BLOCK"] for _, kw in launches] == [16]


def test_write_configs_needs_a_sweep(capsys):
    with pytest.raises(SystemExit) as exc:
        kb.main(["--write-configs", "x.json"])
    assert exc.value.code == 2
    assert "--write-configs needs --attn-sweep and/or --op-sweep" in capsys.readouterr().err


def test_engine_uses_and_checks_the_file(tmp_path, configs_env, monkeypatch):
    # A BERT engine on the Triton kernels with a configs file for its attention shape:
    # it matches transformers, and its attention launches took the file's config.
    from pyengine import LLM

    from test_engine import FAMILIES, hf_probs, report
    from tiny import save_tiny

    factory, _ = FAMILIES["bert"]
    cfg = factory(num_labels=3)
    model, tok = save_tiny(tmp_path / "m", cfg, seed=8)
    D = cfg.hidden_size // cfg.num_attention_heads
    key = f"float32/d{D}/bidir/r1"
    configs_env({"triton/varlen_attention": {key: _entry([16, 16, 2, 1])}})
    calls = _spy_lookups(monkeypatch)
    llm = LLM(str(tmp_path / "m"), kernel_backend="triton")
    texts = ["the cat", "a dog sat on the mat and was there", "why"]
    got = torch.tensor([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)])
    ref = hf_probs(model, tok, texts, "softmax")
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), report(got, ref)
    assert ("triton/varlen_attention", key, [16, 16, 2, 1]) in calls
    configs_env({})
    monkeypatch.setenv(_tuned.ENV, str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="absent.json: no such file"):
        LLM(str(tmp_path / "m"), kernel_backend="triton")
    LLM(str(tmp_path / "m"), kernel_backend="torch")  # no kernel reads the file
