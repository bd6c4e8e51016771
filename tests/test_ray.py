"""PyEngineClassifier (Ray Data) and serve_app (Ray Serve) against the offline LLM."""
import inspect
import json
import random
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from transformers import BertConfig

from pyengine import LLM, LoRARequest
from pyengine.integrations.ray import PyEngineClassifier
from test_lora import write_adapter
from tiny import WORDS, save_tiny

ATOL = 1e-5  # a prompt's result may not depend on its batch (DESIGN, fp32)


def _bert(num_labels):
    return BertConfig(vocab_size=160, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def texts(n, seed, max_words=8):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf")
    save_tiny(path, _bert(3), seed=1)
    return str(path)


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ce")
    save_tiny(path, _bert(1), seed=2)
    return str(path)


def reference(model, prompts):
    return np.array([o.outputs.probs for o in LLM(model).classify(prompts, use_tqdm=False)], dtype=np.float32)


def test_importing_pyengine_does_not_import_ray():
    code = ("import sys, pyengine, pyengine.batch_job, pyengine.integrations.ray; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "importing pyengine imported ray"


def test_classifier_batch_kinds_without_ray(clf_dir):
    # The callable is plain Python: every batch format Ray Data hands out gives the LLM's rows.
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    prompts = texts(40, seed=3)
    ref = reference(clf_dir, prompts)
    clf = PyEngineClassifier(clf_dir, text_column="t")
    labels = [f"LABEL_{i}" for i in ref.argmax(1)]
    ids = np.arange(len(prompts))
    for batch in ({"t": np.array(prompts, dtype=object), "id": ids}, pd.DataFrame({"t": prompts, "id": ids}),
                  pa.table({"t": prompts, "id": ids})):
        out = clf(batch)
        get = (lambda c: out.column(c).to_pylist()) if isinstance(out, pa.Table) else (lambda c: list(out[c]))
        np.testing.assert_allclose(np.array([list(p) for p in get("probs")]), ref, atol=ATOL, rtol=0)
        assert list(get("label")) == labels and list(get("id")) == ids.tolist() and list(get("t")) == prompts


def test_classifier_pairs_and_token_ids(clf_dir, ce_dir):
    q, d = texts(20, seed=4), texts(20, seed=5)
    ref = [o.outputs.score for o in LLM(ce_dir).score(q, d, use_tqdm=False)]
    out = PyEngineClassifier(ce_dir, text_column="q", pair_column="d")({"q": np.array(q), "d": np.array(d)})
    np.testing.assert_allclose(out["score"], ref, atol=ATOL, rtol=0)
    assert "probs" not in out

    tok = LLM(clf_dir).get_tokenizer()
    ids = [tok(t)["input_ids"] for t in q]
    col = np.empty(len(ids), dtype=object)
    col[:] = [np.array(x) for x in ids]  # ragged rows, as Ray Data hands them out
    out = PyEngineClassifier(clf_dir, token_ids_column="ids", output_prefix="p_")({"ids": col})
    np.testing.assert_allclose(np.stack(out["p_probs"]), reference(clf_dir, q), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs,batch,err,match", [
    ({"text_column": "t"}, {"x": np.array(["a"])}, ValueError, "no column 't'"),
    ({}, {"text": np.array(["the cat", ""], dtype=object)}, ValueError, "column 'text', row 1"),
    ({}, {"text": np.array(["a", None], dtype=object)}, ValueError, "row 1 .*non-empty string"),
    ({}, {"text": np.array(["a"]), "label": np.array(["x"])}, ValueError, "already has column.*label"),
    ({"token_ids_column": "ids"}, {"ids": np.array([[1.5, 2.0]])}, ValueError, "list of token ids"),
    # the engine's own checks, named by column and row as the ones above
    ({"token_ids_column": "ids"}, {"ids": [[2, 5, 3], [2, 999, 3]]}, ValueError,
     r"^column 'ids', row 1 of this batch: has token id 999 outside the vocabulary \[0, 160\)$"),
    ({}, {"text": np.array(["the cat", " ".join(["cat"] * 80)], dtype=object)}, ValueError,
     r"^column 'text', row 1 of this batch: has \d+ tokens, more than max_model_len=64"),
])
def test_classifier_bad_batches(clf_dir, kwargs, batch, err, match):
    with pytest.raises(err, match=match):
        PyEngineClassifier(clf_dir, **kwargs)(batch)


def test_classifier_bad_pair_names_both_columns(ce_dir):
    batch = {"q": np.array(["the cat", "a dog"], dtype=object),
             "d": np.array(["on a mat", " ".join(["mat"] * 80)], dtype=object)}
    with pytest.raises(ValueError, match=r"^columns 'q', 'd', row 1 of this batch: .*more than max_model_len=64"):
        PyEngineClassifier(ce_dir, text_column="q", pair_column="d")(batch)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"pair_column": "d"}, ValueError, "num_labels == 1"),
    ({"token_ids_column": "ids", "text_column": "t"}, ValueError, "token_ids_column alone"),
    ({"max_num_seq": 4}, TypeError, "unknown keyword.*max_num_seq"),
    ({"truncate_prompt_tokens": 0}, ValueError, "truncate_prompt_tokens"),
    # an input column named as an output would be overwritten by it
    ({"text_column": "label"}, ValueError, "input column 'label' is also an output column's name"),
])
def test_classifier_bad_arguments(clf_dir, kwargs, err, match):
    with pytest.raises(err, match=match):
        PyEngineClassifier(clf_dir, **kwargs)


def test_classifier_with_a_lora_adapter(clf_dir, tmp_path):
    adapter = write_adapter(clf_dir, tmp_path / "adapter", ["query", "dense"], seed=9)
    prompts = texts(40, seed=10)
    got = PyEngineClassifier(clf_dir, lora_path=str(adapter))({"text": np.array(prompts, dtype=object)})
    ref = LLM(clf_dir, enable_lora=True).classify(prompts, use_tqdm=False,
                                                  lora_request=LoRARequest("a", 1, str(adapter)))
    ref = np.array([o.outputs.probs for o in ref])
    np.testing.assert_allclose(np.stack(got["probs"]), ref, atol=ATOL, rtol=0)
    assert np.abs(ref - reference(clf_dir, prompts)).max() > 0.05, "the adapter changes nothing: a weak test"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PyEngineClassifier(clf_dir, lora_path=str(tmp_path / "missing"))


def test_served_names_from_the_command_line():
    # `serve run ... served_model_name=bge-reranker` passes one string (a number where it
    # reads as one): one name, not its characters.
    from pyengine.integrations.ray import served_names

    assert served_names("bge-reranker", "/m") == ["bge-reranker"]
    assert served_names(123, "/m") == ["123"]
    assert served_names(["a", "b"], "/m") == ["a", "b"]
    assert served_names(None, "/models/x") == ["/models/x"]
    with pytest.raises(ValueError, match="served_model_name must be a name or a list of non-empty names"):
        served_names(["a", ""], "/m")


def test_classifier_unreadable_image_names_the_row(tmp_path, monkeypatch):
    """An image PIL refuses as a decompression bomb is a bad row, named as a missing file is."""
    Image = pytest.importorskip("PIL.Image")
    from pyengine.integrations.ray import _images

    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL refuses past twice this: b's 1200 pixels
    with pytest.raises(ValueError, match=r"^column 'img', row 1 of this batch: cannot read image .*b.png.*exceeds"):
        _images(np.array(["a.png", "b.png"], dtype=object), "img", str(tmp_path))


def test_serve_app_checks_its_arguments_before_any_replica(clf_dir):
    """Bad engine or server values fail serve_app itself (not every replica, as a deploy
    that retries); a device the head node lacks is the replicas' to have; the caller's
    ray_actor_options are merged with num_gpus / num_cpus; build_app reads the text
    options as text."""
    pytest.importorskip("ray.serve")
    from pyengine.integrations.ray import build_app, serve_app

    for kwargs, err, match in [({"max_num_seqs": 0}, ValueError, "max_num_seqs must be a positive int"),
                               ({"dtype": "float99"}, ValueError, "dtype must be"),
                               ({"kernel_backend": "nope"}, ValueError, "unknown kernel backend 'nope'"),
                               ({"pooler_config": {"pooling": "CLS"}}, TypeError, "unexpected keyword"),
                               ({"seed": "x"}, TypeError, "seed must be an int"),
                               ({"device": "gpu:0"}, ValueError, "device 'gpu:0'"),
                               ({"max_request_bytes": -5}, ValueError, "max_request_bytes must be a positive int"),
                               ({"chat_template": 123}, TypeError, "chat_template must be Jinja source")]:
        with pytest.raises(err, match=match):
            serve_app(clf_dir, num_gpus=0, **kwargs)
    app = serve_app(clf_dir, num_gpus=1, num_cpus=4, device="cuda", seed=0,
                    deployment_options={"ray_actor_options": {"runtime_env": {"env_vars": {"A": "1"}}}})
    assert app._bound_deployment.ray_actor_options == {"num_gpus": 1, "num_cpus": 4,
                                                       "runtime_env": {"env_vars": {"A": "1"}}}
    app = build_app({"model": clf_dir, "num_gpus": "0", "num_cpus": "0.5", "served_model_name": "2.10",
                     "api_keys": "1e5", "device": "cpu"})
    dep = app._bound_deployment
    assert dep.ray_actor_options == {"num_gpus": 0, "num_cpus": 0.5}
    served = inspect.getclosurevars(dep.func_or_class.__mro__[1].__init__).nonlocals  # the replica's class
    assert served["names"] == ["2.10"] and served["api_keys"] == ["1e5"]
    assert build_app({"model": clf_dir, "num_gpus": "0", "served_model_name": '["a", "b"]'}) is not None


def test_ray_data_two_actors_match_llm(ray_cluster, clf_dir):
    ray = ray_cluster
    prompts = texts(2000, seed=6)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(prompts)], override_num_blocks=8)
    ds = ds.map_batches(PyEngineClassifier, fn_constructor_kwargs={"model": clf_dir},
                        compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1, batch_size=256)
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(prompts))), "rows were lost or duplicated"
    assert [r["text"] for r in rows] == prompts
    ref = reference(clf_dir, prompts)
    got = np.array([list(r["probs"]) for r in rows])
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert [r["label"] for r in rows] == [f"LABEL_{i}" for i in ref.argmax(1)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_runs_the_http_app(ray_cluster, ce_dir, tmp_path):
    pytest.importorskip("pyengine.serve", exc_type=ImportError)
    serve = pytest.importorskip("ray.serve")
    from pyengine.integrations.ray import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # As `serve run pyengine.integrations.ray:build_app model=... num_gpus=0 ...` passes them.
        adapter = write_adapter(ce_dir, tmp_path / "adapter", ["query", "value"], seed=8)
        template = "question: {{ query }} passage: {{ document }}"
        app = build_app({"model": ce_dir, "num_replicas": "1", "num_gpus": "0", "num_cpus": "0.5",
                         "served_model_name": '["ce"]', "lora_modules": json.dumps({"ce-lora": str(adapter)}),
                         "chat_template": template})
        serve.run(app, name="pyengine", route_prefix="/")
        q, d = "the cat sat", texts(5, seed=7)
        body = json.dumps({"model": "ce", "text_1": q, "text_2": d}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/score", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = json.load(resp)["data"]
        # Pairs rendered with the chat template, as LLM.score(chat_template=...) renders them.
        ref = [o.outputs.score for o in LLM(ce_dir).score(q, d, chat_template=template, use_tqdm=False)]
        np.testing.assert_allclose([x["score"] for x in data], ref, atol=ATOL, rtol=0)
        # the adapter, by its model name
        body = json.dumps({"model": "ce-lora", "text_1": q, "text_2": d}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/score", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = json.load(resp)["data"]
        ref = [o.outputs.score for o in LLM(ce_dir, enable_lora=True).score(
            q, d, use_tqdm=False, chat_template=template, lora_request=LoRARequest("ce-lora", 1, str(adapter)))]
        np.testing.assert_allclose([x["score"] for x in data], ref, atol=ATOL, rtol=0)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/score", b'{"text_1": "a"', {})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 400  # the server's own error mapping survives under Serve
    finally:
        serve.shutdown()
