"""The model benchmark (`python -m pyengine.bench`) on CPU: workloads, FLOP counts,
an end-to-end run on a one-layer tiny preset, a dataset run, and argument errors."""
import json
import math
import os
import re
import tempfile
from types import SimpleNamespace

import pytest
import torch

from pyengine.bench import __main__ as bench_main
from pyengine.bench import model as bench_model
from pyengine.bench import presets as P
from pyengine.bench import vision as bench_vision
from pyengine.bench.workloads import mixed_lengths, parse_workload, read_dataset, synthetic
from tiny import save_tiny


def test_mixed_lengths_are_seeded_with_the_design_statistics():
    a = mixed_lengths(2048, seed=0)
    assert a == mixed_lengths(2048, seed=0)
    assert a != mixed_lengths(2048, seed=1)
    assert min(a) >= 8 and max(a) <= 512
    assert 150 <= sum(a) / len(a) <= 168  # DESIGN: mean about 159
    # the median of round(exp(N(ln 120, 0.8))) is 120
    assert 110 <= sorted(a)[1024] <= 130
    assert max(mixed_lengths(2048, seed=0, max_len=300)) == 300


def test_synthetic_prompts_are_identical_and_avoid_special_ids():
    w = synthetic("mixed", 64, 3, vocab_size=30522, ends=(101, 102))
    assert w.prompts == synthetic("mixed", 64, 3, vocab_size=30522, ends=(101, 102)).prompts
    assert w.lengths == mixed_lengths(64, 3)
    for p in w.prompts:
        assert p[0] == 101 and p[-1] == 102
        assert all(1000 <= t < 30522 for t in p[1:-1])
    w = synthetic("fixed:40", 5, 0, vocab_size=151936, special_ids=[151643, 151645])
    assert w.lengths == [40] * 5
    assert all(1000 <= t < 151643 for p in w.prompts for t in p)
    s = w.summary()
    assert (s["num_prompts"], s["num_tokens"], s["min_len"], s["max_len"]) == (5, 200, 40, 40)


@pytest.mark.parametrize("spec,msg", [("fixed:x", "integer N"), ("fixed:1", "N >= 2"), ("zipf", "unknown workload")])
def test_bad_workload_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_workload(spec)


def test_workload_limits():
    with pytest.raises(ValueError, match="exceed the model's maximum of 512"):
        synthetic("fixed:600", 2, 0, vocab_size=30522)
    with pytest.raises(ValueError, match="positive int"):
        synthetic("mixed", 0, 0, vocab_size=30522)


def test_flop_count_matches_a_hand_count():
    cfg = P.preset_config("tiny", layers=1)
    H, inter = 256, 1024
    assert P.linear_params(cfg) == 4 * H * H + 2 * H * inter  # q, k, v, o, up, down; no head
    lengths = [10, 20]
    attn = 4 * (10 ** 2 + 20 ** 2) * 4 * 64  # QK^T + PV, 4 heads of 64
    assert P.workload_flops(cfg, lengths) == 2 * (4 * H * H + 2 * H * inter) * 30 + attn
    qcfg = P.preset_config("qwen3-0.6b", layers=2)
    f = P.model_facts(qcfg)
    assert (f["encoder"], f["ends"], f["head_dim"], f["heads"]) == (False, None, 128, 16)
    assert P.workload_flops(qcfg, [8]) == 2 * P.linear_params(qcfg) * 8 + 4 * 64 * 16 * 128 * 2 / 2


@pytest.mark.parametrize("model_type, experts", [("qwen3_moe", "num_experts"), ("mixtral", "num_local_experts")])
def test_flop_count_of_a_mixture_of_experts(model_type, experts):
    """A token goes through its top 2 of 8 experts (fused 3-D weights in transformers 5)
    and the router; counting every expert, or none, is 4x off either way."""
    from transformers import AutoConfig

    H, I, kv = 64, 48, 32
    cfg = AutoConfig.for_model(model_type, hidden_size=H, intermediate_size=I, moe_intermediate_size=I,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               vocab_size=100, num_experts_per_tok=2, **{experts: 8})
    attention = H * H + 2 * kv * H + H * H
    per_expert = 3 * H * I  # gate, up, down
    assert P.linear_params(cfg) == attention + 2 * per_expert + 8 * H  # + the router


def _run(argv, capsys):
    rc = bench_main.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _printed_before_json(module, capsys, monkeypatch):
    """What the benchmark had printed when it wrote its JSON (the list fills then)."""
    printed = []

    def dump(obj, f, **kw):
        printed.append(capsys.readouterr().out)
        json.dump(obj, f, **kw)
    monkeypatch.setattr(module, "json", SimpleNamespace(dump=dump))
    return printed


def test_end_to_end_on_the_tiny_preset(tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.json"
    printed = _printed_before_json(bench_model, capsys, monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the LoRA provider writes its adapter
    rc, out, err = _run(["--preset", "tiny", "--layers", "1", "--num-prompts", "8", "--repeats", "1",
                         "--single-sample", "3", "--cache-dir", str(tmp_path / "cache"), "--json", str(path),
                         "--no-progress"], capsys)
    assert rc == 0, err
    # The table is printed before the JSON is written: a failing write cannot lose it.
    assert len(printed) == 1 and "environment:" in printed[0].splitlines()[-1]
    out = printed[0] + out
    assert not [f for f in os.listdir(tmp_path) if f.startswith("pyengine-bench-lora-")]  # adapter removed
    rep = json.loads(path.read_text())
    assert set(rep) >= {"env", "peak", "args", "results"}
    assert set(rep["env"]) >= {"device", "device_name", "torch", "triton", "transformers", "date"}
    assert rep["peak"]["flops_per_s"] > 0 and "fp32" in rep["peak"]["label"]
    (res,) = rep["results"]
    assert res["status"] == "ok" and res["layers"] == 1 and res["dtype"] == "float32"
    assert res["workload"]["num_prompts"] == 8
    assert res["workload"]["num_tokens"] == sum(mixed_lengths(8, 0))
    by = {p["name"]: p for p in res["providers"]}
    assert set(by) == {"hf-b32", "hf-sorted-b64", "hf-sorted-b256", "hf-single", "pyengine-torch",
                       "pyengine-triton", "pyengine-cuda", "pyengine-eager", "pyengine-lora"}
    assert by["pyengine-triton"]["status"] == "skipped" and "interpreter" in by["pyengine-triton"]["reason"]
    assert by["pyengine-cuda"]["status"] == "skipped"
    assert by["pyengine-eager"]["status"] == "skipped" and "CUDA graphs" in by["pyengine-eager"]["reason"]
    assert res["reference"] == "hf-single" and by["hf-single"]["num_prompts"] == 3
    # The adapter's B is zero: its matmuls run, its outputs are the base model's.
    assert by["pyengine-lora"]["status"] == "ok" and "LoRA rank 16" in by["pyengine-lora"]["ops"]
    assert by["pyengine-lora"]["max_abs_dprob"] < 1e-4
    for name in ("hf-b32", "hf-sorted-b64", "hf-sorted-b256", "hf-single", "pyengine-torch", "pyengine-lora"):
        p = by[name]
        assert p["status"] == "ok"
        for key in ("seq_per_s", "tok_per_s", "median_s", "frac_peak"):
            assert p[key] > 0 and math.isfinite(p[key])
        assert p["peak_mem_bytes"] is None  # CPU
        assert math.isclose(p["seq_per_s"], p["num_prompts"] / p["median_s"])
        if name != "hf-single":
            assert p["max_abs_dprob"] < 1e-4 and p["argmax_agree"] == 1.0  # DESIGN's fp32 bar
    t = by["pyengine-torch"]["median_s"]
    assert math.isclose(by["pyengine-torch"]["frac_peak"], res["flops_per_pass"] / t / rep["peak"]["flops_per_s"])
    ratios = res["ratios"]["pyengine-torch"]
    assert set(ratios) == {"hf-b32", "hf-sorted-b64", "hf-sorted-b256", "hf-single"}
    assert math.isclose(ratios["hf-b32"], by["pyengine-torch"]["seq_per_s"] / by["hf-b32"]["seq_per_s"])
    assert res["baseline_to_beat"] in ("hf-sorted-b64", "hf-sorted-b256")
    assert "pyengine speed-up" in out and "environment:" in out.splitlines()[-1]
    assert "sampled" in out
    assert "threads busy" in out and res["torch_threads"] >= 1
    assert all(p["cpu_s"] > 0 for p in by.values() if p["status"] == "ok")
    assert len(rep["peak"]["measured"]) == 2


def test_dataset_workload_with_a_local_model(tmp_path, capsys):
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=1,
                     architectures=["BertForSequenceClassification"])
    model_dir = tmp_path / "m"
    _, tok = save_tiny(str(model_dir), cfg)
    data = tmp_path / "d.jsonl"
    rows = [{"text": "the cat sat on a mat"}, {"text": "what is red", "text_pair": "the dog is red"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = read_dataset(str(data), tok, 64)
    assert w.prompts == [tok("the cat sat on a mat")["input_ids"], tok("what is red", "the dog is red")["input_ids"]]
    txt = tmp_path / "d.txt"
    txt.write_text("the cat\n\nyes no very\n")
    assert read_dataset(str(txt), tok, 64, num_prompts=1).prompts == [tok("the cat")["input_ids"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match="line 2: expected an object with a string 'text'"):
        read_dataset(str(bad), tok, 64)
    path = tmp_path / "r.json"
    rc, out, err = _run(["--model", str(model_dir), "--dataset", str(data), "--repeats", "1", "--providers",
                         "hf-sorted-b64,pyengine", "--json", str(path), "--no-progress"], capsys)
    assert rc == 0, err
    (res,) = json.loads(path.read_text())["results"]
    assert res["workload"]["name"] == "dataset:d.jsonl" and res["workload"]["num_prompts"] == 2
    by = {p["name"]: p for p in res["providers"]}
    assert res["reference"] == "hf-sorted-b64" and by["pyengine-torch"]["max_abs_dprob"] < 1e-4


def test_an_unregistered_architecture_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "architecture_missing", lambda cfg: "unknown architecture ['X']")
    rc, out, err = _run(["--preset", "tiny", "--cache-dir", str(tmp_path), "--no-progress"], capsys)
    assert rc == 1
    assert "tiny: skipped: pyengine cannot run it yet: unknown architecture" in out
    assert "every preset was skipped" in err
    assert not os.listdir(tmp_path)  # nothing was built


@pytest.mark.parametrize("argv,msg", [
    (["--num-prompts", "0"], "--num-prompts must be a positive integer"),
    (["--repeats", "-1"], "--repeats must be a positive integer"),
    (["--preset", "tiny,nope"], "unknown preset nope"),
    (["--workload", "fixed:abc"], "fixed:N needs an integer N"),
    (["--dataset", "x.txt"], "--dataset needs --model DIR"),
    (["--model", "/nonexistent/dir"], "not a checkpoint directory"),
    (["--providers", "hf-b32,vllm"], "unknown provider 'vllm'"),
    (["--dtype", "int8"], "--dtype 'int8'"),
    (["--device", "tpu"], "is not a device"), (["--device", "meta"], "only cpu and cuda"),
    (["--json", "/nonexistent/dir/r.json"], "does not exist"),
    (["--json", os.path.dirname(os.path.abspath(__file__))], "is a directory, not a file"),
    (["--preset", "tiny", "--workload", "fixed:600"], "600 tokens per prompt exceed the maximum length of preset "
                                                      "tiny, 512 tokens"),
    (["--preset", "tiny", "--workload", "fixed:300", "--max-num-batched-tokens", "256"],
     "300 tokens per prompt exceed --max-num-batched-tokens 256"),
    (["--single-sample", "-3"], "--single-sample must be >= 0"),
    (["--threads", "0"], "--threads must be a positive integer"),
    # below the 2 special tokens around every encoder prompt (and the workloads' shortest prompt)
    (["--preset", "tiny", "--max-num-batched-tokens", "4"], "--max-num-batched-tokens must be at least 8"),
    (["--preset", "tiny", "--cache-dir", "/proc/no-such-dir"], "--cache-dir '/proc/no-such-dir' cannot be created"),
])
def test_bad_arguments_are_clear_errors(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr(bench_model, "matmul_peak", _never_called)  # refused before any work
    with pytest.raises(SystemExit) as e:
        bench_model.main(argv)
    assert e.value.code == 2
    assert msg in " ".join(capsys.readouterr().err.split())


def test_model_dirs_that_cannot_serve_the_run_are_refused_first(tmp_path, capsys, monkeypatch):
    """A --model without weights, and --dataset over a --model without tokenizer files (its
    texts would become unknown tokens), fail before any work, as the engine refuses them."""
    from transformers import BertConfig

    monkeypatch.setattr(bench_model, "matmul_peak", _never_called)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=1)
    save_tiny(str(tmp_path / "ids_only"), cfg, tokenizer=None)
    (tmp_path / "no_weights").mkdir()
    cfg.save_pretrained(tmp_path / "no_weights")
    (tmp_path / "d.txt").write_text("the cat\n")
    for argv, msg in [(["--model", str(tmp_path / "no_weights")], "--model: no weights in"),
                      (["--model", str(tmp_path / "ids_only"), "--dataset", str(tmp_path / "d.txt")],
                       "--dataset needs a tokenizer: --model .* has no tokenizer files")]:
        with pytest.raises(SystemExit) as e:
            bench_model.main(argv)
        assert e.value.code == 2 and re.search(msg, " ".join(capsys.readouterr().err.split())), argv


def _never_called(*args, **kwargs):
    raise AssertionError("work started despite a bad argument")


@pytest.mark.no_gpu  # checks the no-GPU message
def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        bench_model.main(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err
    # Providers that cannot run here, and nothing else: refused before any work.
    monkeypatch.setattr(bench_model, "matmul_peak", _never_called)
    with pytest.raises(SystemExit) as e:
        bench_model.main(["--providers", "pyengine-triton,pyengine-eager"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no selected provider can run on cpu: pyengine-triton: on CPU Triton runs only in its interpreter" in err
    assert "pyengine-eager: CUDA graphs need a CUDA device" in err


def test_a_run_that_measures_nothing_fails_and_removes_the_adapter(tmp_path, capsys, monkeypatch):
    # The LoRA provider's one row fails while classifying: a non-zero exit that says nothing
    # was measured, and the adapter folder is gone all the same.
    from pyengine.llm import LLM

    def broken(self, *args, **kwargs):
        assert [f for f in os.listdir(tmp_path) if f.startswith("pyengine-bench-lora-")]  # in use now
        raise RuntimeError("classify broke")
    monkeypatch.setattr(LLM, "classify", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc, out, err = _run(["--preset", "tiny", "--layers", "1", "--num-prompts", "4", "--providers", "pyengine-lora",
                         "--cache-dir", str(tmp_path / "cache"), "--no-progress"], capsys)
    assert rc == 1
    assert "failed providers: tiny/pyengine-lora" in err
    assert "nothing was benchmarked: no provider row was measured" in err
    assert "RuntimeError: classify broke" in out
    assert not [f for f in os.listdir(tmp_path) if f.startswith("pyengine-bench-lora-")]


def test_the_token_budget_caps_the_workload_with_a_note(tmp_path, capsys):
    # A budget below the model's limit cuts the mixed prompts for every provider, and says so.
    path = tmp_path / "r.json"
    rc, out, err = _run(["--preset", "tiny", "--layers", "1", "--num-prompts", "8", "--repeats", "1",
                         "--providers", "hf-b32,pyengine-torch", "--max-num-batched-tokens", "64",
                         "--cache-dir", str(tmp_path / "cache"), "--json", str(path), "--no-progress"], capsys)
    assert rc == 0, err
    capped = sum(n >= 64 for n in mixed_lengths(8, 0))
    assert capped > 0
    assert (f"[tiny] note: --max-num-batched-tokens 64 is below the model's limit of 512 tokens: every provider's "
            f"prompts are capped at 64 ({capped} of 8 reach it)") in err
    (res,) = json.loads(path.read_text())["results"]
    assert res["workload"]["max_len"] == 64
    assert res["workload"]["num_tokens"] == sum(min(n, 64) for n in mixed_lengths(8, 0))
    assert all(p["num_prompts"] == 8 for p in res["providers"])
    with pytest.raises(SystemExit):
        bench_model.main(["--help"])
    assert "also caps the prompts' length, for every provider" in " ".join(capsys.readouterr().out.split())


def test_subcommands_dispatch_lazily(capsys, monkeypatch):
    assert bench_main.main(["nope"]) == 2
    assert "unknown subcommand 'nope'" in capsys.readouterr().err
    monkeypatch.setitem(bench_main.SUBCOMMANDS, "serve", "pyengine.bench._absent_module")
    assert bench_main.main(["serve"]) == 2
    assert "not available in this build" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(bench_model, "main", lambda argv: seen.append(argv) or 0)
    assert bench_main.main(["--repeats", "2"]) == 0 and bench_main.main(["model", "-h"]) == 0
    assert seen == [["--repeats", "2"], ["-h"]]


def test_decoder_model_dir_with_padded_baselines(tmp_path, capsys):
    # Decoders pool the last token: the right-padded transformers batches must agree
    # with pyengine's packed ones on a synthetic workload.
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=256,
                      num_labels=2, pad_token_id=0, eos_token_id=0, architectures=["Qwen3ForSequenceClassification"])
    model_dir = tmp_path / "q"
    save_tiny(str(model_dir), cfg, tokenizer="decoder")
    path = tmp_path / "r.json"
    rc, out, err = _run(["--model", str(model_dir), "--num-prompts", "6", "--repeats", "1", "--providers",
                         "hf-b32,hf-single,pyengine-torch", "--json", str(path), "--no-progress"], capsys)
    assert rc == 0, err
    (res,) = json.loads(path.read_text())["results"]
    assert res["workload"]["max_len"] <= 256 and res["workload"]["min_len"] >= 8
    by = {p["name"]: p for p in res["providers"]}
    assert by["hf-b32"]["max_abs_dprob"] < 1e-4 and by["pyengine-torch"]["max_abs_dprob"] < 1e-4


@pytest.mark.gpu
def test_end_to_end_on_a_gpu_in_bf16(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc, out, err = _run(["--preset", "tiny,qwen3-0.6b", "--layers", "2", "--num-prompts", "64", "--repeats", "2",
                         "--single-sample", "16", "--cache-dir", str(tmp_path / "cache"), "--json", str(path),
                         "--no-progress"], capsys)
    assert rc == 0, err
    rep = json.loads(path.read_text())
    assert "bf16" in rep["peak"]["label"] and rep["env"]["device_name"] in out
    for res in rep["results"]:
        assert res["status"] == "ok" and res["dtype"] == "bfloat16"
        by = {p["name"]: p for p in res["providers"]}
        assert by["pyengine-torch"]["status"] == "ok" and by["pyengine-eager"]["status"] == "ok"
        if by["pyengine-triton"]["status"] == "skipped":
            assert "not installed" in by["pyengine-triton"]["reason"] or "no op" in by["pyengine-triton"]["reason"]
        for p in by.values():
            assert p["status"] in ("ok", "skipped"), p
            if p["status"] == "ok":
                assert p["peak_mem_bytes"] > 0 and 0 < p["frac_peak"] < 1
                if p["kind"] == "pyengine":  # DESIGN's bf16 bar; on 16 prompts one near-tie may flip
                    assert p["max_abs_dprob"] < 2e-2 and p["argmax_agree"] >= 0.9


@pytest.mark.parametrize("preset", [
    None,                # the CPU default, qwen2.5-vl-tiny
    "nemotron-vl-tiny",  # tiles through SigLIP; transformers' parts assembled as the baseline
])
def test_vision_benchmark_on_the_tiny_preset(preset, tmp_path, capsys, monkeypatch):
    """`python -m pyengine.bench vision`: pyengine against transformers' padded batches
    and single prompts on prompts with one image each; the same probabilities."""
    out = tmp_path / "vision.json"
    printed = _printed_before_json(bench_vision, capsys, monkeypatch)
    assert bench_main.main(["vision", "--num-prompts", "6", "--single-sample", "2", "--cache-dir",
                            str(tmp_path / "cache"), "--json", str(out)] + (["--preset", preset] if preset else [])) == 0
    report = json.loads(out.read_text())
    assert [r["provider"] for r in report["rows"]] == ["pyengine", "hf-sorted-b16", "hf-single"]
    assert [r["prompts"] for r in report["rows"]] == [6, 6, 2]
    assert report["max_abs_diff_vs_hf"] < 1e-4
    assert all(r["seq_per_s"] > 0 for r in report["rows"])
    assert "pyengine" in printed[0].splitlines()[-3]  # the table, printed before the JSON was written
    with pytest.raises(SystemExit):
        bench_main.main(["vision", "--preset", "nope"])
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before the checkpoint is built
        bench_main.main(["vision", "--cache-dir", str(tmp_path / "none"), "--json", str(tmp_path)])
    assert "is a directory, not a file" in capsys.readouterr().err and not os.path.exists(tmp_path / "none")


@pytest.mark.parametrize("preset", ["qwen2.5-vl-tiny", "nemotron-vl-tiny"])
def test_vision_checkpoint_is_built_atomically(preset, tmp_path, monkeypatch):
    # A build stopped before its last write leaves nothing under the cache that a later run
    # would take for a finished checkpoint; the next build completes it.
    import safetensors.torch
    from safetensors import safe_open

    cache = tmp_path / "cache"
    real = safetensors.torch.save_file

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench_vision._checkpoint(preset, torch.float32, torch.device("cpu"), str(cache), 0)
    assert os.listdir(cache) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    path, _ = bench_vision._checkpoint(preset, torch.float32, torch.device("cpu"), str(cache), 0)
    assert os.listdir(cache) == [os.path.basename(path)]
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert "score.weight" in f.keys()


def test_vision_benchmark_with_videos(tmp_path, capsys):
    """--video-frames: a video per prompt (three frames: one padded), transformers given
    the same pixels and positions; the same probabilities."""
    out = tmp_path / "video.json"
    assert bench_main.main(["vision", "--num-prompts", "4", "--single-sample", "1", "--video-frames", "3",
                            "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["videos"], report["images"], report["video_frames"]) == (4, 0, 3)
    assert report["max_abs_diff_vs_hf"] < 1e-4
    assert "a video of 3 frames each" in capsys.readouterr().out
    for bad in (["--video-frames", "-1"], ["--video-frames", "2", "--preset", "nemotron-vl-tiny"]):
        with pytest.raises(SystemExit):
            bench_main.main(["vision", "--cache-dir", str(tmp_path / "cache")] + bad)
        assert "--video-frames takes a positive frame count" in capsys.readouterr().err


@pytest.mark.parametrize("device,msg", [("foo", "--device 'foo' is not a device"),
                                        ("meta", "--device 'meta': only cpu and cuda")])
def test_vision_bad_device_is_a_clear_error(device, msg, capsys):
    with pytest.raises(SystemExit) as e:
        bench_vision.main(["--device", device])
    assert e.value.code == 2 and msg in capsys.readouterr().err
