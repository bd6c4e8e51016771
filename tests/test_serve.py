"""The HTTP server against the offline LLM on the same weights, over real loopback HTTP."""
import base64
import http.client
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import torch
from transformers import BertConfig

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pyengine import LLM  # noqa: E402
from pyengine.config import EngineConfig  # noqa: E402
from pyengine.engine import EngineCore  # noqa: E402
from pyengine.serve import Server, serve_in_thread  # noqa: E402
from tiny import WORDS, save_tiny  # noqa: E402

ATOL = 1e-5  # DESIGN: a result does not depend on its batch, fp32 within 1e-5
MAX_INPUTS = 8
TEMPLATE = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}yes{% endif %}"


def _config(num_labels):
    return BertConfig(vocab_size=160, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=num_labels)


class Gate:
    """Wraps a core's launch_batch: records batch sizes, and can hold batches back so a
    test can line requests up in the queue deterministically."""

    def __init__(self, core):
        self.open, self.entered, self.sizes = threading.Event(), threading.Event(), []
        self.open.set()
        self.fail_next = False
        run = core.launch_batch

        def gated(prompts, activations, lora=None):
            self.sizes.append(len(prompts))
            self.entered.set()
            self.open.wait(60)
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("injected model fault")
            return run(prompts, activations, lora)
        core.launch_batch = gated

    def close(self):
        self.sizes.clear()
        self.entered.clear()
        self.open.clear()


class Client:
    def __init__(self, url, server):
        self.host, self.port = urlsplit(url).hostname, urlsplit(url).port
        self.server = server

    def request(self, method, path, body=None, raw=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            text = resp.read().decode()
            ctype = resp.getheader("content-type") or ""
            return resp.status, (json.loads(text) if "json" in ctype else text)
        finally:
            conn.close()

    def post(self, path, body=None, raw=None, headers=None):
        return self.request("POST", path, body, raw, headers)

    def post_binary(self, path, body):
        """POST a JSON body; (status, headers, body bytes) undecoded."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def metric(self, name):
        _, text = self.request("GET", "/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")


def wait_for(pred, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _start(path, names, trust=False):
    core = EngineCore(EngineConfig(model=str(path), max_num_seqs=32))
    gate = Gate(core)
    server = Server(core, names, max_inputs=MAX_INPUTS, trust_request_chat_template=trust)
    url, stop = serve_in_thread(server.build_app())
    return Client(url, server), gate, stop


@pytest.fixture(scope="module")
def cls_env(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_cls")
    _, tok = save_tiny(path, _config(3), seed=5)
    client, gate, stop = _start(path, ["tiny-cls", "alias"], trust=True)
    yield client, gate, LLM(str(path)), tok
    stop()


@pytest.fixture(scope="module")
def ce_env(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_ce")
    save_tiny(path, _config(1), seed=6)
    client, gate, stop = _start(path, ["tiny-ce"])
    yield client, gate, LLM(str(path))
    stop()


def texts(n, seed, max_words=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def close(a, b):
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=ATOL, rtol=0)


def probs(outs):
    return [o.outputs.probs for o in outs]


# ---------------------------------------------------------------------- routes vs offline
def test_classify_matches_offline(cls_env):
    client, _, llm, _ = cls_env
    labels = llm.engine.hf_config.id2label
    ids = [[2, 10, 11, 12, 3], [2, 40, 3]]
    cases = [(texts(6, 0), None), (ids, [{"prompt_token_ids": x} for x in ids]), (ids[0], [{"prompt_token_ids": ids[0]}])]
    for body_input, offline_input in cases:
        # cache_salt and empty per-request processor settings are taken, as vLLM takes them
        status, r = client.post("/classify", {"model": "tiny-cls", "input": body_input, "request_id": "abc",
                                              "cache_salt": "s" * 43, "mm_processor_kwargs": {}})
        assert status == 200, r
        offline = llm.classify(offline_input or body_input, use_tqdm=False)
        assert r["id"] == "classify-abc" and r["object"] == "list" and r["model"] == "tiny-cls"
        # vLLM's X-Request-Id header wins over the body's request_id; an empty model name is the served model
        status, r = client.post("/classify", {"model": "", "input": body_input, "request_id": "abc"},
                                headers={"X-Request-Id": "hdr-7"})
        assert status == 200 and r["id"] == "classify-hdr-7" and r["model"] == "tiny-cls", r
        assert len(r["data"]) == len(offline)
        for i, (d, o) in enumerate(zip(r["data"], offline)):
            assert d["index"] == i and d["num_classes"] == 3
            assert close(d["probs"], o.outputs.probs), (i, d["probs"], o.outputs.probs)
            assert d["label"] == labels[max(range(3), key=o.outputs.probs.__getitem__)]
        ntok = sum(len(o.prompt_token_ids) for o in offline)
        assert r["usage"] == {"prompt_tokens": ntok, "total_tokens": ntok, "completion_tokens": 0,
                              "prompt_tokens_details": None}
    # One string, the served alias, truncation and raw logits, each as the offline call.
    long_text = " ".join(WORDS)
    status, r = client.post("/classify", {"model": "alias", "input": long_text, "truncate_prompt_tokens": 7,
                                          "truncation_side": "right", "use_activation": False})
    assert status == 200, r
    (o,) = llm.classify(long_text, truncate_prompt_tokens=7, truncation_side="right", use_activation=False,
                        use_tqdm=False)
    assert len(r["data"]) == 1 and close(r["data"][0]["probs"], o.outputs.probs)
    assert r["usage"]["prompt_tokens"] == 7 and r["model"] == "tiny-cls"


def test_classify_messages_use_the_chat_template(cls_env):
    client, _, llm, tok = cls_env
    msgs = [{"role": "user", "content": "the cat sat"},
            {"role": "assistant", "content": [{"type": "text", "text": "on a mat"}]}]
    status, r = client.post("/classify", {"messages": msgs, "chat_template": TEMPLATE, "add_generation_prompt": True})
    assert status == 200, r
    rendered = "user the cat sat assistant on a mat yes"
    ids = tok(rendered, add_special_tokens=False)["input_ids"]  # messages default to no added specials
    (o,) = llm.classify({"prompt_token_ids": ids}, use_tqdm=False)
    assert close(r["data"][0]["probs"], o.outputs.probs) and r["usage"]["prompt_tokens"] == len(ids)
    status, r = client.post("/classify", {"messages": msgs, "chat_template": TEMPLATE, "add_special_tokens": True,
                                          "chat_template_kwargs": {"unused": 1}})
    assert status == 200, r
    (o,) = llm.classify("user the cat sat assistant on a mat", use_tqdm=False)
    assert close(r["data"][0]["probs"], o.outputs.probs)
    # apply_chat_template's own tools / documents / add_generation_prompt may come through
    # chat_template_kwargs, as vLLM passes them (overriding the request's own field)
    extra = ("{% for d in documents %}doc {{ d.text }} {% endfor %}{% for t in tools %}tool {{ t.name }} "
             "{% endfor %}" + TEMPLATE)
    kwargs = {"documents": [{"text": "mat"}], "tools": [{"name": "cat"}], "add_generation_prompt": True}
    status, r = client.post("/tokenize", {"messages": msgs[:1], "chat_template": extra, "add_generation_prompt": False,
                                          "chat_template_kwargs": kwargs})
    assert status == 200, r
    assert r["tokens"] == tok("doc mat tool cat user the cat sat yes", add_special_tokens=False)["input_ids"], r


def test_older_activation_names_and_normalize(ce_env):
    # vLLM still reads 'activation' and 'softmax' as use_activation; 'normalize' is an
    # embedding option, refused rather than ignored.
    client, _, llm = ce_env
    raw = llm.score("the cat", "a dog", use_activation=False, use_tqdm=False)[0].outputs.score
    act = llm.score("the cat", "a dog", use_tqdm=False)[0].outputs.score
    for body, want in (({"activation": False}, raw), ({"softmax": False}, raw), ({"activation": True}, act),
                       ({"use_activation": True, "activation": False}, act)):
        status, r = client.post("/score", {"text_1": "the cat", "text_2": "a dog", **body})
        assert status == 200 and abs(r["data"][0]["score"] - want) < ATOL, (body, r)
    status, r = client.post("/classify", {"input": "the cat", "softmax": False})
    logit = llm.classify("the cat", use_activation=False, use_tqdm=False)[0].outputs.probs
    assert status == 200 and close(r["data"][0]["probs"], logit), r
    status, r = client.post("/pooling", {"input": "the cat", "normalize": True})
    assert status == 400 and "normalize" in r["error"]["message"], r


def test_request_chat_template_needs_trust(ce_env):
    """Without --trust-request-chat-template a request's own template is refused before
    it is rendered (a template is code, run on the thread every request goes through);
    a template that would loop for minutes is answered at once."""
    client, _, _ = ce_env
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"
    msgs = [{"role": "user", "content": "the cat"}]
    for path, body in (("/classify", {"messages": msgs, "chat_template": slow}),
                       ("/pooling", {"messages": msgs, "chat_template": slow}),
                       ("/tokenize", {"messages": msgs, "chat_template": slow})):
        status, r = client.post(path, body)
        assert status == 400 and "--trust-request-chat-template" in r["error"]["message"], (path, r)
    assert client.post("/classify", {"input": "the cat"})[0] == 200


def test_pooling_matches_encode(cls_env):
    client, _, llm, _ = cls_env
    prompts = texts(3, 1)
    offline = llm.encode(prompts, pooling_task="classify", use_tqdm=False)
    status, r = client.post("/pooling", {"input": prompts, "task": "classify"})
    assert status == 200, r
    assert r["id"].startswith("pool-") and r["object"] == "list"
    for i, (d, o) in enumerate(zip(r["data"], offline)):
        assert d["index"] == i and d["object"] == "pooling" and close(d["data"], o.outputs.data.tolist())
    status, r = client.post("/pooling", {"input": prompts, "encoding_format": "base64", "use_activation": False})
    assert status == 200, r
    raw = llm.encode(prompts, pooling_task="classify", use_activation=False, use_tqdm=False)
    for d, o in zip(r["data"], raw):
        got = torch.frombuffer(bytearray(base64.b64decode(d["data"])), dtype=torch.float32)
        assert torch.allclose(got, o.outputs.data, atol=ATOL, rtol=0)
    # vLLM's other embed dtypes and byte orders: the values rounded to the dtype, its bytes
    for dtype, tdt in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("fp8_e4m3", torch.float8_e4m3fn),
                       ("fp8_e5m2", torch.float8_e5m2)):
        for order in ("little", "big"):
            status, r = client.post("/pooling", {"input": prompts, "encoding_format": "base64", "embed_dtype": dtype,
                                                 "endianness": order, "use_activation": False})
            assert status == 200, r
            for d, o in zip(r["data"], raw):
                got = _from_bytes(base64.b64decode(d["data"]), tdt, order)
                assert torch.equal(got.float(), o.outputs.data.to(tdt).float()), (dtype, order)


def _from_bytes(data, tdt, order):
    """Values of tdt from raw bytes in the given byte order (big: each value's bytes reversed)."""
    data = bytearray(data)
    if order == "big" and tdt.itemsize > 1:
        data = b"".join(data[i:i + tdt.itemsize][::-1] for i in range(0, len(data), tdt.itemsize))
    return torch.frombuffer(bytearray(data), dtype=tdt)


@pytest.mark.parametrize("dtype,tdt,order", [
    ("float32", torch.float32, "native"),     # the default: fp32 as this machine stores it
    ("bfloat16", torch.bfloat16, "big"),      # a 2-byte dtype, bytes swapped
    ("fp8_e4m3", torch.float8_e4m3fn, "little"),  # 1 byte: no order to apply
])
def test_pooling_bytes_format(cls_env, dtype, tdt, order):
    """vLLM's encoding_format "bytes": every row's bytes in the body, where each lies and its
    shape in the JSON "metadata" header; "bytes_only": the same body, no header."""
    client, _, llm, _ = cls_env
    prompts = texts(3, 4)
    raw = llm.encode(prompts, pooling_task="classify", use_activation=False, use_tqdm=False)
    req = {"input": prompts, "encoding_format": "bytes", "embed_dtype": dtype, "endianness": order,
           "use_activation": False, "request_id": "r1"}
    status, headers, body = client.post_binary("/pooling", req)
    assert status == 200, body
    assert headers["content-type"] == "application/octet-stream"
    meta = json.loads(headers["metadata"])
    assert meta["id"] == "pool-r1" and meta["model"] == "tiny-cls" and isinstance(meta["created"], int)
    assert meta["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in raw)
    assert [d["index"] for d in meta["data"]] == [0, 1, 2]
    assert meta["data"][-1]["end"] == len(body)
    n = raw[0].outputs.data.numel()
    for d, o in zip(meta["data"], raw):
        assert (d["embed_dtype"], d["endianness"], d["shape"]) == (dtype, order, [n])
        assert d["end"] - d["start"] == n * tdt.itemsize
        got = _from_bytes(body[d["start"]:d["end"]], tdt, order).float()
        want = o.outputs.data.to(tdt).float()
        # fp32: the offline run's values within the batch bar; rounded dtypes: the same values
        assert torch.allclose(got, want, atol=ATOL if tdt == torch.float32 else 0, rtol=0), (dtype, order, got, want)
    status, headers_only, body_only = client.post_binary("/pooling", {**req, "encoding_format": "bytes_only"})
    assert status == 200 and body_only == body and "metadata" not in headers_only


@pytest.mark.parametrize("names", [("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents")])
def test_score_matches_offline(ce_env, names):
    client, _, llm = ce_env
    q, docs = texts(3, 2), texts(3, 3)
    for a, b in [(q[0], docs[0]), (q[0], docs), (q, docs)]:  # 1:1, 1:N, N:N
        status, r = client.post("/score", {names[0]: a, names[1]: b})
        assert status == 200, r
        offline = llm.score(a, b, use_tqdm=False)
        assert len(r["data"]) == len(offline) and r["id"].startswith("score-")
        for i, (d, o) in enumerate(zip(r["data"], offline)):
            assert d == {"index": i, "object": "score", "score": pytest.approx(o.outputs.score, abs=ATOL)}
        assert r["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in offline)
    status, r = client.post("/v1/score", {"text_1": q[1], "text_2": docs[1], "use_activation": False})
    assert status == 200, r
    (o,) = llm.score(q[1], docs[1], use_activation=False, use_tqdm=False)
    assert r["data"][0]["score"] == pytest.approx(o.outputs.score, abs=ATOL)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_sorted_like_offline(ce_env, path):
    client, _, llm = ce_env
    query, docs = "who sat on the mat", texts(6, 4)
    scores = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    status, r = client.post(path, {"model": "tiny-ce", "query": query, "documents": docs, "top_n": 4})
    assert status == 200, r
    want = sorted(range(len(docs)), key=lambda i: -scores[i])[:4]
    assert [x["index"] for x in r["results"]] == want
    for x in r["results"]:
        assert x["document"] == {"text": docs[x["index"]], "multi_modal": None}  # vLLM's RerankDocument
        assert x["relevance_score"] == pytest.approx(scores[x["index"]], abs=ATOL)
    assert r["model"] == "tiny-ce" and r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] > 0
    for top_n in ({}, {"top_n": 0}, {"top_n": -1}):  # absent, 0 or negative: every document, as vLLM
        status, r = client.post(path, {"query": query, "documents": docs, **top_n}, headers={"X-Request-Id": "h1"})
        assert status == 200 and len(r["results"]) == len(docs) and r["id"] == "rerank-h1", (top_n, r)


def test_models_health_metrics(cls_env):
    client, _, _, _ = cls_env
    status, r = client.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in r["data"]] == ["tiny-cls", "alias"]
    assert r["data"][0]["max_model_len"] == 64
    assert client.request("GET", "/health")[0] == 200
    before = client.metric("pyengine_prompt_tokens_total")
    status, r = client.post("/classify", {"input": "the cat"})
    assert status == 200
    assert client.metric("pyengine_prompt_tokens_total") == before + r["usage"]["prompt_tokens"]
    _, text = client.request("GET", "/metrics")
    for name in ('pyengine_http_requests_total{route="/classify",status="200"}', "pyengine_queue_depth 0",
                 "pyengine_batch_size_sequences_count", 'pyengine_request_latency_seconds_bucket{route="/classify"'):
        assert name in text, name


def test_tokenize_detokenize_version_ping(cls_env):
    """/tokenize gives the ids /classify runs (a prompt with special tokens, messages
    through the chat template, both as the tokenizer encodes them), also for a prompt
    over max_model_len, which it reports beside the count; /detokenize inverts it."""
    client, _, llm, tok = cls_env
    text = "the cat sat on the mat"
    status, r = client.post("/tokenize", {"prompt": text, "return_token_strs": True})
    assert status == 200, r
    assert r["tokens"] == tok(text)["input_ids"] == llm.classify(text, use_tqdm=False)[0].prompt_token_ids
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 64
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    status, r = client.post("/tokenize", {"prompt": text, "add_special_tokens": False})
    assert r["tokens"] == tok(text, add_special_tokens=False)["input_ids"] and r["token_strs"] is None
    msgs = [{"role": "user", "content": "the cat"}]
    status, r = client.post("/tokenize", {"messages": msgs, "chat_template": TEMPLATE})
    assert status == 200, r
    assert r["tokens"] == tok("user the cat yes", add_special_tokens=False)["input_ids"]
    # An empty prompt counts as what the tokenizer makes of it (vLLM's /tokenize).
    status, r = client.post("/tokenize", {"prompt": ""})
    assert status == 200 and r["tokens"] == tok("")["input_ids"] and r["count"] == 2, r
    status, r = client.post("/tokenize", {"prompt": "the cat " * 40})
    assert status == 200 and r["count"] > r["max_model_len"], r
    status, r = client.post("/detokenize", {"tokens": tok(text, add_special_tokens=False)["input_ids"]})
    assert status == 200 and r["prompt"] == text, r
    for path, body, needle in (("/detokenize", {"tokens": [3, 999]}, "token id 999 is outside the vocabulary"),
                               ("/detokenize", {"tokens": "abc"}, "tokens"),
                               ("/tokenize", {}, "exactly one of 'prompt' and 'messages'"),
                               ("/tokenize", {"prompt": "x", "model": "other"}, "does not exist")):
        status, r = client.post(path, body)
        assert status in (400, 404) and needle in r["error"]["message"], (path, r)
    status, r = client.request("GET", "/version")
    assert status == 200 and r["version"] == __import__("pyengine").__version__
    assert client.request("GET", "/ping")[0] == 200 and client.post("/ping")[0] == 200


def test_api_key_and_https(tmp_path):
    """With api_keys every route but the probes needs 'Authorization: Bearer KEY' (401
    otherwise, in the usual error shape); over HTTPS (a self-signed certificate) the
    same requests work. The command line refuses a key file without a certificate."""
    import shutil
    import ssl
    import subprocess

    from pyengine.serve import main

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    path = tmp_path / "m"
    save_tiny(path, _config(3), seed=9)
    server = Server(EngineCore(EngineConfig(model=str(path))), ["m"], api_keys=["k1", "k2"])
    url, stop = serve_in_thread(server.build_app(), ssl_keyfile=str(key), ssl_certfile=str(cert))
    assert url.startswith("https://")
    host, port = urlsplit(url).hostname, urlsplit(url).port
    unverified = ssl._create_unverified_context()

    def call(method, route, body=None, auth=None):
        conn = http.client.HTTPSConnection(host, port, timeout=60, context=unverified)
        try:
            headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
            conn.request(method, route, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    try:
        for route in ("/health", "/ping", "/version", "/metrics"):
            assert call("GET", route)[0] == 200, route
        for auth in (None, "Bearer nope", "Basic k1", "Bearer k1x"):
            status, text = call("POST", "/classify", {"input": "the cat"}, auth)
            assert status == 401 and "API key" in json.loads(text)["error"]["message"], (auth, text)
        assert call("GET", "/v1/models")[0] == 401
        for key in ("k1", "k2"):
            status, text = call("POST", "/classify", {"input": "the cat"}, f"Bearer {key}")
            assert status == 200 and json.loads(text)["data"][0]["num_classes"] == 3, text
        assert call("GET", "/v1/models", auth="Bearer k2")[0] == 200
    finally:
        stop()
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--ssl-keyfile", str(key)])
    with pytest.raises(ValueError, match="non-empty strings"):
        Server(server.core, ["m"], api_keys=[""])


# ---------------------------------------------------------------------- bad input
BAD = [
    ("/classify", None, b"{not json", 400, "malformed JSON"),
    ("/classify", None, b'{"input": ' + b"[" * 100000, 400, "nested too deeply"),
    ("/classify", [1, 2], None, 400, "JSON object"),
    ("/classify", {"input": 5}, None, 400, "input must be"),
    ("/classify", {"input": ["a", [1, 2]]}, None, 400, "input must be"),
    ("/classify", {"input": []}, None, 400, "empty"),
    ("/classify", {"input": "the", "use_activation": "yes"}, None, 400, "use_activation"),
    ("/classify", {"input": "the", "model": "other"}, None, 404, "does not exist"),
    ("/classify", {"input": "the cat " * 40}, None, 400, "max_model_len"),
    ("/classify", {"input": ["a"] * (MAX_INPUTS + 1)}, None, 413, "limit"),
    ("/classify", {"input": "the", "priority": 3}, None, 400, "priority"),
    ("/classify", {"input": "the", "cache_salt": ""}, None, 400, "cache_salt"),  # vLLM: a non-empty string
    ("/classify", {"messages": [{"role": "user", "content": "x"}], "chat_template": TEMPLATE,
                   "chat_template_kwargs": {"return_dict": True}}, None, 400, "chat_template_kwargs"),
    ("/classify", {"input": "the", "mm_processor_kwargs": {"max_pixels": 9}}, None, 400,
     "mm_processor_kwargs per request is not supported; set them for the whole server"),
    ("/score", {"text_1": "a", "text_2": "b", "media_io_kwargs": {"image": {}}}, None, 400,
     "media_io_kwargs per request"),
    ("/classify", {"input": [[2, 999, 3]]}, None, 400, "outside the vocabulary"),
    ("/classify", {"input": "the", "truncation_side": "middle"}, None, 400, "truncation_side"),
    ("/classify", {"input": ["the", "a \ud800 b"]}, None, 400, "input[1] is not valid Unicode"),
    ("/classify", {"input": "the", "truncate_prompt_tokens": 0}, None, 400, "truncate_prompt_tokens"),
    ("/classify", {"input": "the", "truncate_prompt_tokens": 100}, None, 400, "truncate_prompt_tokens"),
    ("/classify", {"input": "the cat sat", "truncate_prompt_tokens": 1}, None, 400,
     "input[0]: truncate_prompt_tokens=1 keeps fewer tokens than the 2 special tokens"),
    ("/classify", {"input": "the", "messages": [{"role": "user", "content": "x"}]}, None, 400, "exactly one"),
    ("/classify", {"messages": [{"role": "user", "content": "x"}]}, None, 400, "chat template"),
    ("/classify", {"messages": [{"role": "user", "content": "x"}], "chat_template": TEMPLATE,
                   "chat_template_kwargs": {"tokenize": True}}, None, 400, "chat_template_kwargs"),
    ("/classify", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "chat_template": TEMPLATE},
     None, 400, "text"),
    ("/pooling", {"input": "the", "task": "embed"}, None, 400, "task"),
    ("/score", {"text_1": "a", "text_2": "b"}, None, 400, "cross-encoder"),
    ("/rerank", {"query": "a", "documents": ["b"]}, None, 400, "cross-encoder"),
    ("/nowhere", {"input": "a"}, None, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,raw,status,needle", BAD, ids=[f"{i}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_clear_error(cls_env, path, body, raw, status, needle):
    client, _, _, _ = cls_env
    got, r = client.post(path, body, raw)
    assert got == status, r
    assert r["error"]["code"] == status and needle in r["error"]["message"], r
    assert client.post("/classify", {"input": "the cat"})[0] == 200  # and the server stays up


def test_oversized_body_is_413(cls_env):
    client, _, _, _ = cls_env
    limit, client.server.max_request_bytes = client.server.max_request_bytes, 200
    try:
        status, r = client.post("/classify", {"input": ["the cat sat"] * 20})
    finally:
        client.server.max_request_bytes = limit
    assert status == 413 and "limit" in r["error"]["message"], r


@pytest.mark.parametrize("body,status,needle", [
    ({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "1:N"),
    ({"text_1": "a"}, 400, "text_2"),
    ({"text_1": "a", "text_2": ["b"] * (MAX_INPUTS + 1)}, 413, "limit"),
    ({"text_1": "a", "text_2": ["b", ""]}, 400, "text_2[1] is empty"),  # errors name the client's fields
    ({"queries": ["a", "b"], "documents": ["c", "d", "e"]}, 400, "2 items in queries and 3 in documents"),
])
def test_bad_score_input(ce_env, body, status, needle):
    client, _, _ = ce_env
    got, r = client.post("/score", body)
    assert got == status and needle in r["error"]["message"], r


@pytest.mark.parametrize("body,needle", [({"query": "a", "documents": ["b"], "top_n": 1.5}, "top_n"),
                                         ({"query": "a", "documents": []}, "empty list for documents"),
                                         ({"query": "", "documents": ["b"]}, "query[0] is empty"),
                                         ({"query": "a", "documents": ["b", ""]}, "documents[1] is empty")])
def test_bad_rerank_input(ce_env, body, needle):
    client, _, _ = ce_env
    got, r = client.post("/rerank", body)
    assert got == 400 and needle in r["error"]["message"], r


def test_model_fault_is_a_500_and_the_server_stays_up(cls_env):
    client, gate, llm, _ = cls_env
    gate.fail_next = True
    status, r = client.post("/classify", {"input": "the cat"})
    assert status == 500 and "injected model fault" in r["error"]["message"], r
    status, r = client.post("/classify", {"input": "the cat"})
    (o,) = llm.classify("the cat", use_tqdm=False)
    assert status == 200 and close(r["data"][0]["probs"], o.outputs.probs)
    assert client.request("GET", "/health")[0] == 200


# ---------------------------------------------------------------------- batching and concurrency
def _hold_first_then_queue(client, gate, prompts, fail_first=False):
    """Hold the first request's batch until the others are queued behind it, then let
    it go (failing it when asked). Returns the (status, body) of every request."""
    gate.close()
    with ThreadPoolExecutor(len(prompts)) as pool:
        try:
            first = pool.submit(client.post, "/classify", {"input": prompts[0]})
            assert gate.entered.wait(20)
            rest = [pool.submit(client.post, "/classify", {"input": p}) for p in prompts[1:]]
            # The held sequence counts as waiting until its batch returns.
            wait_for(lambda: client.server.engine.num_waiting() == len(prompts),
                     f"{len(prompts) - 1} more queued sequences")
            gate.fail_next = fail_first
        finally:
            gate.open.set()
        return [first.result(60)] + [f.result(60) for f in rest]


def test_waiting_requests_share_one_batch(cls_env):
    # Hold the first batch so the next seven requests queue up; they must then run together.
    client, gate, llm, _ = cls_env
    prompts = texts(8, 5)
    results = _hold_first_then_queue(client, gate, prompts)
    assert gate.sizes == [1, 7]
    for (status, r), o in zip(results, llm.classify(prompts, use_tqdm=False)):
        assert status == 200 and close(r["data"][0]["probs"], o.outputs.probs)


def test_model_fault_fails_only_the_requests_in_that_batch(cls_env):
    # The held first batch fails; the seven requests queued behind it still succeed.
    client, gate, llm, _ = cls_env
    prompts = texts(8, 9)
    (status, r), *results = _hold_first_then_queue(client, gate, prompts, fail_first=True)
    assert status == 500 and "injected model fault" in r["error"]["message"], r
    assert gate.sizes == [1, 7]
    for (status, r), o in zip(results, llm.classify(prompts[1:], use_tqdm=False)):
        assert status == 200 and close(r["data"][0]["probs"], o.outputs.probs), r

def test_disconnected_client_work_is_dropped(cls_env):
    client, gate, llm, _ = cls_env
    aborted = client.metric("pyengine_requests_aborted_total")
    gate.close()
    with ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(client.post, "/classify", {"input": "the cat"})
            assert gate.entered.wait(20)
            body = json.dumps({"input": texts(3, 6)}).encode()
            sock = socket.create_connection((client.host, client.port), timeout=10)
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: client.server.engine.num_waiting() == 1 + 3, "the 3 sequences handed over")
            sock.close()
            # The handler sends the abort before it counts it, so once counted, the abort is
            # queued ahead of any later batch.
            wait_for(lambda: client.metric("pyengine_requests_aborted_total") == aborted + 1, "the abort")
        finally:
            gate.open.set()
        status, r = first.result(60)
    wait_for(lambda: client.server.engine.num_waiting() == 0, "an empty queue")
    assert status == 200 and gate.sizes == [1]  # the dropped request never ran
    (o,) = llm.classify("the cat", use_tqdm=False)
    assert close(r["data"][0]["probs"], o.outputs.probs)


def test_client_leaving_while_sending_is_an_abort(cls_env):
    """A body cut short by the client's disconnect counts as an aborted request (499), not
    as a server error."""
    client, _, _, _ = cls_env

    def count(status):
        _, text = client.request("GET", "/metrics")
        key = f'pyengine_http_requests_total{{route="/score",status="{status}"}} '
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))

    aborted, errors = client.metric("pyengine_requests_aborted_total"), count(500)
    sock = socket.create_connection((client.host, client.port), timeout=10)
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"text_1\": ")
    time.sleep(0.2)
    sock.close()
    wait_for(lambda: client.metric("pyengine_requests_aborted_total") == aborted + 1, "the abort")
    assert count(500) == errors and count(499) >= 1


def test_concurrent_clients_match_offline(cls_env, ce_env):
    # 64 clients for a bounded time, mixing routes, good and malformed requests.
    cls_client, _, cls_llm, _ = cls_env
    ce_client, _, ce_llm = ce_env
    pool_texts, queries, docs = texts(24, 7), texts(3, 8), texts(8, 9)
    want_probs = dict(zip(pool_texts, probs(cls_llm.classify(pool_texts, use_tqdm=False))))
    qq = [q for q in queries for _ in docs]
    pair_scores = [o.outputs.score for o in ce_llm.score(qq, docs * len(queries), use_tqdm=False)]
    want_score = {(q, d): pair_scores[i * len(docs) + j] for i, q in enumerate(queries) for j, d in enumerate(docs)}
    deadline = time.monotonic() + 4.0
    failures, counts = [], {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def one_client(seed):
        rng = random.Random(seed)
        for _ in range(25):  # bounded in count as well as time
            if time.monotonic() > deadline:
                return
            kind = rng.choice(["classify", "classify", "rerank", "bad"])
            if kind == "classify":
                batch = rng.sample(pool_texts, rng.randint(1, 4))
                status, r = cls_client.post("/classify", {"input": batch})
                ok = status == 200 and all(close(d["probs"], want_probs[t]) for d, t in zip(r["data"], batch))
            elif kind == "rerank":
                q, ds = rng.choice(queries), rng.sample(docs, rng.randint(1, 5))
                status, r = ce_client.post("/rerank", {"query": q, "documents": ds})
                ok = status == 200 and len(r["results"]) == len(ds) and all(
                    abs(x["relevance_score"] - want_score[(q, ds[x["index"]])]) <= ATOL for x in r["results"])
            else:
                status, r = cls_client.post("/classify", raw=b'{"input": ["the", 3]')
                ok = status == 400
            with lock:
                counts["bad" if kind == "bad" else "ok"] += 1
                if not ok:
                    failures.append((kind, status, r))

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one_client, range(64)))
    assert not failures, failures[:3]
    assert counts["ok"] >= 64 and counts["bad"] > 0


@pytest.mark.parametrize("argv, msg", [
    (["--request-timeout", "-1"], "--request-timeout must be positive"),
    (["--start-timeout", "0"], "--start-timeout must be positive"),
    (["--json", "/nonexistent/dir/r.json"], "--json"),
])
def test_bench_serve_bad_arguments_before_the_server_starts(argv, msg, capsys, monkeypatch):
    from pyengine.bench import serve as bench_serve

    monkeypatch.setattr(bench_serve, "_start_server", lambda *a, **k: pytest.fail("the server was started"))
    with pytest.raises(SystemExit) as e:
        bench_serve.main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_bench_serve_smoke(tmp_path):
    # The benchmark end to end (server subprocess, clients, report), briefly.
    from pyengine.bench import serve as bench_serve

    out = tmp_path / "report.json"
    rc = bench_serve.main(["--preset", "tiny", "--route", "rerank", "--inputs-per-request", "3", "--concurrency", "4",
                           "--duration", "3", "--warmup", "1", "--max-words", "12", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["errors"] == 0 and report["requests"] > 0, report
    assert report["sequences_per_s"] == pytest.approx(3 * report["requests_per_s"])


# ---------------------------------------------------------------------- LoRA adapters
@pytest.fixture(scope="module")
def lora_env(tmp_path_factory):
    from test_lora import make_adapter

    from pyengine import LoRARequest

    path = tmp_path_factory.mktemp("serve_lora")
    save_tiny(path, _config(1), seed=7)
    adapter = make_adapter(path, path / "adapter", seed=3, target_modules=["query", "value", "dense"])
    core = EngineCore(EngineConfig(model=str(path), enable_lora=True))
    server = Server(core, ["tiny-base"], max_inputs=MAX_INPUTS, lora_modules={"tiny-lora": str(adapter)},
                    allow_runtime_lora=True)
    url, stop = serve_in_thread(server.build_app())
    llm = LLM(str(path), enable_lora=True)
    yield Client(url, server), llm, LoRARequest("tiny-lora", 1, str(adapter)), adapter
    stop()


def test_lora_modules_are_served_as_model_names(lora_env):
    """An adapter's name in 'model' runs it (as the offline call with its LoRARequest does);
    the base name or none runs the base model; /v1/models lists the adapter under it."""
    client, llm, lora, adapter = lora_env
    status, r = client.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in r["data"]] == ["tiny-base", "tiny-lora"]
    assert r["data"][1]["parent"] == "tiny-base" and r["data"][1]["root"] == str(adapter)
    query, docs = "where is the cat", texts(5, 3)
    for model, req in (("tiny-lora", lora), ("tiny-base", None), (None, None)):
        body = {"query": query, "documents": docs, **({"model": model} if model else {})}
        status, r = client.post("/rerank", body)
        assert status == 200, r
        want = [o.outputs.score for o in llm.score(query, docs, lora_request=req, use_tqdm=False)]
        got = [0.0] * len(docs)
        for x in r["results"]:
            got[x["index"]] = x["relevance_score"]
        assert close(got, want), (model, got, want)
        assert r["model"] == (model or "tiny-base")
        status, r = client.post("/classify", {"input": docs[:2], **({"model": model} if model else {})})
        want = [o.outputs.probs for o in llm.classify(docs[:2], lora_request=req, use_tqdm=False)]
        assert status == 200 and close([d["probs"] for d in r["data"]], want) and r["model"] == (model or "tiny-base")
    base = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    with_lora = [o.outputs.score for o in llm.score(query, docs, lora_request=lora, use_tqdm=False)]
    assert not close(base, with_lora), "the adapter does not change the scores: a weak test"


def test_lora_command_line_and_bad_modules(lora_env, tmp_path):
    from pyengine.serve import main

    client, llm, _, adapter = lora_env
    path = llm.config.model
    for argv in (["--lora-modules", f"a={adapter}"], ["--allow-runtime-lora-updating"],
                 ["--enable-lora", "--lora-modules", "no-equals-sign"],
                 ["--enable-lora", "--lora-modules", f"a={adapter}", f"a={adapter}"]):
        with pytest.raises(SystemExit):
            main(["--model", path, *argv])
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        Server(EngineCore(EngineConfig(model=path)), ["m"], lora_modules={"a": str(adapter)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Server(EngineCore(EngineConfig(model=path, enable_lora=True)), ["m"],
               lora_modules={"a": str(tmp_path / "missing")})
    status, r = client.post("/classify", {"input": "the cat", "model": "tiny-other"})
    assert status == 404 and "tiny-lora" in r["error"]["message"]


def test_runtime_lora_loading_and_unloading(lora_env, cls_env, tmp_path):
    from test_lora import write_adapter

    from pyengine import LoRARequest

    client, llm, _, _ = lora_env
    path = llm.config.model
    adapter = write_adapter(path, tmp_path / "rt", ["query", "key"], seed=11)
    docs = texts(3, 12)
    status, r = client.post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(adapter)})
    assert status == 200, r
    assert "rt" in [m["id"] for m in client.request("GET", "/v1/models")[1]["data"]]
    status, r = client.post("/rerank", {"model": "rt", "query": "the cat", "documents": docs})
    want = [o.outputs.score for o in llm.score("the cat", docs, use_tqdm=False,
                                               lora_request=LoRARequest("rt", 9, str(adapter)))]
    assert status == 200 and close(sorted(x["relevance_score"] for x in r["results"]), sorted(want)), r
    for path_, body, code, needle in [
        ("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(adapter)}, 400, "already been loaded"),
        ("/v1/load_lora_adapter", {"lora_name": "tiny-base", "lora_path": str(adapter)}, 400, "already been loaded"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "missing")}, 400, "does not exist"),
        ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
        ("/v1/unload_lora_adapter", {"lora_name": "rt"}, 200, "removed"),
        ("/v1/unload_lora_adapter", {"lora_name": "rt"}, 404, "cannot be found"),
        ("/rerank", {"model": "rt", "query": "a", "documents": ["b"]}, 404, "does not exist"),
    ]:
        status, r = client.post(path_, body)
        assert status == code and needle in json.dumps(r), (path_, body, status, r)
    assert "x" not in [m["id"] for m in client.request("GET", "/v1/models")[1]["data"]]
    # Two loads of one name at once: the first holds the name while its adapter is read,
    # so the second is refused rather than reported loaded beside it.
    server = client.server
    read = server.core.lora_adapters

    def slow_read(*args):
        time.sleep(0.5)
        return read(*args)
    server.core.lora_adapters = slow_read
    try:
        second = write_adapter(path, tmp_path / "rt2", ["query"], seed=12)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: client.post("/v1/load_lora_adapter", {"lora_name": "twice", "lora_path": p}),
                                [str(adapter), str(second)]))
    finally:
        server.core.lora_adapters = read
    assert sorted(status for status, _ in got) == [200, 400], got
    assert "already been loaded" in json.dumps([r for status, r in got if status == 400])
    winner = [str(adapter), str(second)][[status for status, _ in got].index(200)]
    assert server.loras["twice"].lora_path == winner
    assert client.post("/v1/unload_lora_adapter", {"lora_name": "twice"})[0] == 200
    # a server started without the flag has no such routes
    assert cls_env[0].post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapter)})[0] == 404


def test_rerank_takes_one_document_as_a_string(ce_env):
    client, _, llm = ce_env
    status, r = client.post("/rerank", {"query": "the cat", "documents": "a dog"})
    want = llm.score("the cat", "a dog", use_tqdm=False)[0].outputs.score
    assert status == 200 and len(r["results"]) == 1 and abs(r["results"][0]["relevance_score"] - want) < ATOL, r
    assert r["results"][0]["document"] == {"text": "a dog", "multi_modal": None}


def test_instruction_reaches_the_score_template(ce_env):
    """/score and /rerank pass 'instruction' and chat_template_kwargs to the score
    template, as vLLM's (the Qwen3-Reranker template reads an instruction)."""
    _, _, llm = ce_env
    path = llm.config.model
    template = '{{ instruction | default("what is") }} {{ query }} {{ document }}'
    server = Server(EngineCore(EngineConfig(model=str(path))), ["tpl"], chat_template=template)
    url, stop = serve_in_thread(server.build_app())
    try:
        client = Client(url, server)
        docs = texts(3, 21)
        default = [o.outputs.score for o in llm.score("the cat", docs, chat_template=template, use_tqdm=False)]
        told = [o.outputs.score for o in llm.score("the cat", docs, use_tqdm=False,
                                                   chat_template=template.replace('default("what is")',
                                                                                  'default("big blue")'))]
        assert not close(default, told), "the instruction changes nothing: a weak test"
        for extra, want in (({}, default), ({"instruction": "big blue"}, told),
                            ({"chat_template_kwargs": {"instruction": "big blue"}}, told)):
            status, r = client.post("/rerank", {"query": "the cat", "documents": docs, **extra})
            assert status == 200, r
            got = [0.0] * len(docs)
            for x in r["results"]:
                got[x["index"]] = x["relevance_score"]
            assert close(got, want), (extra, got, want)
        status, r = client.post("/score", {"text_1": "the cat", "text_2": docs, "instruction": "big blue"})
        assert status == 200 and close([d["score"] for d in r["data"]], told), r
        status, r = client.post("/score", {"text_1": "a", "text_2": "b", "chat_template_kwargs": {"query": "x"}})
        assert status == 400 and "may not set ['query']" in r["error"]["message"], r
    finally:
        stop()


def test_request_score_template(ce_env):
    """/score and /rerank take a request's own chat_template as its score template where
    the server trusts request templates (refused otherwise, as on /classify); it must be
    Jinja source, never a path on the server's disk."""
    _, _, llm = ce_env
    template = "passage {{ document }} asks {{ query }}"
    docs = texts(3, 22)
    want = [o.outputs.score for o in llm.score("the cat", docs, chat_template=template, use_tqdm=False)]
    plain = [o.outputs.score for o in llm.score("the cat", docs, use_tqdm=False)]
    assert not close(plain, want), "the template changes nothing: a weak test"
    for trust in (True, False):
        server = Server(EngineCore(EngineConfig(model=str(llm.config.model))), ["tpl"],
                        trust_request_chat_template=trust)
        url, stop = serve_in_thread(server.build_app())
        try:
            client = Client(url, server)
            status, r = client.post("/score", {"text_1": "the cat", "text_2": docs, "chat_template": template})
            if not trust:
                assert status == 400 and "--trust-request-chat-template" in r["error"]["message"], r
                continue
            assert status == 200 and close([d["score"] for d in r["data"]], want), r
            status, r = client.post("/rerank", {"query": "the cat", "documents": docs, "chat_template": template})
            got = [0.0] * len(docs)
            for x in r["results"]:
                got[x["index"]] = x["relevance_score"]
            assert status == 200 and close(got, want), r
            status, r = client.post("/score", {"text_1": "a", "text_2": "b", "chat_template": str(llm.config.model)})
            assert status == 400 and "must be Jinja source" in r["error"]["message"], r
            status, r = client.post("/score", {"text_1": "a", "text_2": "b", "chat_template": "{{ query }}"})
            assert status == 400 and "'query' and 'document'" in r["error"]["message"], r
        finally:
            stop()


def test_chat_template_is_the_score_template(ce_env):
    """--chat-template with query and document (vLLM's score template form, read from
    messages): /rerank renders each pair with it, as LLM.score(chat_template=...) does, and
    /classify messages without a template of their own use it too."""
    _, _, llm = ce_env
    path = llm.config.model
    template = ('question: {{ (messages | selectattr("role", "eq", "query") | first).content }} '
                'passage: {{ (messages | selectattr("role", "eq", "document") | first).content }}')
    server = Server(EngineCore(EngineConfig(model=str(path))), ["tpl"], chat_template=template)
    url, stop = serve_in_thread(server.build_app())
    try:
        client = Client(url, server)
        docs = texts(4, 13)
        status, r = client.post("/rerank", {"query": "where is the cat", "documents": docs})
        assert status == 200, r
        want = [o.outputs.score for o in llm.score("where is the cat", docs, chat_template=template, use_tqdm=False)]
        got = [0.0] * len(docs)
        for x in r["results"]:
            got[x["index"]] = x["relevance_score"]
        assert close(got, want), (got, want)
        plain = [o.outputs.score for o in llm.score("where is the cat", docs, use_tqdm=False)]
        assert not close(plain, want), "the template changes nothing: a weak test"
        msgs = [{"role": "query", "content": "where is the cat"}, {"role": "document", "content": docs[0]}]
        # Messages add no special tokens unless asked (as vLLM); a score prompt gets them.
        status, r = client.post("/classify", {"messages": msgs, "add_special_tokens": True})
        assert status == 200 and close(r["data"][0]["probs"], [want[0]]), r
    finally:
        stop()
    with pytest.raises(FileNotFoundError, match="neither Jinja source"):
        Server(EngineCore(EngineConfig(model=str(path))), ["x"], chat_template="/no/such.jinja")


# ------------------------------------------------------------------ error mapping, activations
def test_a_type_error_in_the_input_checks_is_a_400(ce_env):
    """A query of the wrong shape fails a type check deep in the input handling: the
    request was bad, so 400, not a server fault."""
    client, _, _ = ce_env
    status, r = client.post("/rerank", {"query": {"content": [5]}, "documents": ["b"]})
    assert status == 400, (status, r)
    status, r = client.post("/rerank", {"query": "a", "documents": ["b"]})
    assert status == 200, (status, r)


def test_a_nan_output_is_a_500_not_the_clients_fault(ce_env, monkeypatch):
    from pyengine.engine import PendingBatch

    client, _, _ = ce_env
    core = client.server.core
    monkeypatch.setattr(core, "launch_batch",
                        lambda prompts, *a: PendingBatch(torch.full((len(prompts), 1), float("nan"))))
    status, r = client.post("/score", {"text_1": "a", "text_2": "b"})
    assert status == 500 and "the output cannot be sent as JSON" in r["error"]["message"], (status, r)


def test_pooler_config_use_activation_is_the_servers_default(tmp_path):
    save_tiny(tmp_path, _config(3), seed=2)
    core = EngineCore(EngineConfig(model=str(tmp_path), pooler_config={"use_activation": False}))
    url, stop = serve_in_thread(Server(core, ["m"]).build_app())
    try:
        client = Client(url, None)
        raw = LLM(str(tmp_path)).classify("the cat", use_activation=False, use_tqdm=False)[0].outputs.probs
        assert abs(sum(raw) - 1) > 1e-2  # raw logits, not probabilities
        status, r = client.post("/classify", {"input": "the cat"})
        assert status == 200 and r["data"][0]["probs"] == pytest.approx(raw, abs=ATOL), r
        status, r = client.post("/classify", {"input": "the cat", "use_activation": True})
        assert status == 200 and sum(r["data"][0]["probs"]) == pytest.approx(1, abs=1e-5), r
    finally:
        stop()


def test_score_takes_the_sentence_transformers_activation(tmp_path):
    cfg = _config(1)
    cfg.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}
    save_tiny(tmp_path, cfg, seed=6)
    client, _, stop = _start(tmp_path, ["m"])
    try:
        llm = LLM(str(tmp_path))
        want = [o.outputs.score for o in llm.score("the cat", ["a dog", "the mat"], use_tqdm=False)]
        raw = [o.outputs.score for o in llm.score("the cat", ["a dog", "the mat"], use_activation=False,
                                                  use_tqdm=False)]
        assert want == pytest.approx(raw, abs=1e-6)  # identity: the raw logits
        for route, body in (("/score", {"text_1": "the cat", "text_2": ["a dog", "the mat"]}),
                            ("/rerank", {"query": "the cat", "documents": ["a dog", "the mat"]})):
            status, r = client.post(route, body)
            assert status == 200, r
            got = ([d["score"] for d in r["data"]] if route == "/score"
                   else [d["relevance_score"] for d in sorted(r["results"], key=lambda d: d["index"])])
            assert got == pytest.approx(want, abs=ATOL), (route, got, want)
    finally:
        stop()
