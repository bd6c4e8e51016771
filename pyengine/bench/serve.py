"""`python -m pyengine.bench serve`: the HTTP server under a fixed number of clients.

Starts ``python -m pyengine.serve`` in a subprocess on loopback (so the clients do not
share its interpreter), with ``--model DIR`` or a random-weight checkpoint built here
from a preset, then keeps ``--concurrency`` clients busy for ``--duration`` seconds
(each sends its next request as soon as the last is answered, over a keep-alive
connection) and reports requests/s, sequences/s, tokens/s, latency percentiles and the
server's mean batch size. Everything is bounded: server start, each request, the run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

WORDS = ("the a cat dog sat on mat and was there who what where when why how query document red blue green "
         "fast slow big small good bad yes no very not is are be to of in it model server batch token").split()

# name -> BertConfig fields (random weights; num_labels=1 so every route works)
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def build_parser():
    p = argparse.ArgumentParser(prog="python -m pyengine.bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: a random-weight --preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="minilm")
    p.add_argument("--route", choices=["classify", "score", "rerank"], default="classify")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    p.add_argument("--inputs-per-request", type=int, default=1, help="inputs (or documents) per request")
    p.add_argument("--min-words", type=int, default=8)
    p.add_argument("--max-words", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--server-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the server (torch's intra-op threads); default: torch's own")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for pyengine.serve (repeat), e.g. --server-arg=--max-num-seqs=64")
    return p


def _check(args, parser):
    if args.server_threads is not None and args.server_threads < 1:
        parser.error("--server-threads must be at least 1")
    for name in ("concurrency", "inputs_per_request", "min_words"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_words < args.min_words:
        parser.error("--max-words must be at least --min-words")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r} is not a directory")
    for name in ("request_timeout", "start_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.json is not None:
        from .report import output_path_error

        why = output_path_error(args.json)
        if why:
            parser.error(f"--json {why}")


def build_checkpoint(preset: str, path: str) -> str:
    """A random-weight BERT cross-encoder and a WordPiece tokenizer over WORDS."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    vocab += [chr(c) for c in range(97, 123)] + ["##" + chr(c) for c in range(97, 123)]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), max_position_embeddings=512, num_labels=1, **PRESETS[preset])
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def _text(rng, args):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(args.min_words, args.max_words)))


def _body(rng, args):
    n = args.inputs_per_request
    if args.route == "classify":
        return "/classify", {"input": [_text(rng, args) for _ in range(n)]}
    docs = [_text(rng, args) for _ in range(n)]
    if args.route == "score":
        return "/score", {"text_1": _text(rng, args), "text_2": docs}
    return "/rerank", {"query": _text(rng, args), "documents": docs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _start_server(model, port, extra, timeout, threads=None):
    cmd = [sys.executable, "-m", "pyengine.serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--log-level", "warning", *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            if _get(port, "/health", 1.0)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    _stop(proc)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _batch_stats(port):
    """Mean sequences per engine batch, from the server's /metrics."""
    _, text = _get(port, "/metrics")
    vals = {}
    for line in text.splitlines():
        for key in ("pyengine_batch_size_sequences_sum", "pyengine_batch_size_sequences_count"):
            if line.startswith(key + " "):
                vals[key] = float(line.split()[1])
    count = vals.get("pyengine_batch_size_sequences_count", 0)
    return vals.get("pyengine_batch_size_sequences_sum", 0) / count if count else None


def _client(port, args, seed, start, stop, records, errors):
    """Closed loop: the next request goes out when the last is answered. A request is
    counted when it completes inside [start, stop], so the window sees steady state
    whatever the latency; answers after stop are dropped."""
    rng = random.Random(seed)
    conn = None
    while time.monotonic() < stop:
        path, body = _body(rng, args)
        data = json.dumps(body).encode()
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException) as e:
            ok, payload = False, str(e).encode()
            if conn is not None:
                conn.close()
            conn = None
        t1 = time.monotonic()
        if not start <= t1 <= stop:
            continue
        if ok:
            usage = json.loads(payload)["usage"]
            records.append((t1 - t0, args.inputs_per_request, usage["prompt_tokens"]))
        else:
            errors.append(payload[:200].decode(errors="replace"))
    if conn is not None:
        conn.close()


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="pyengine-bench-serve-") as tmp:
        model = args.model or build_checkpoint(args.preset, tmp)
        port = _free_port()
        proc = _start_server(model, port, args.server_arg, args.start_timeout, args.server_threads)
        try:
            records, errors = [], []
            start = time.monotonic() + args.warmup
            stop = start + args.duration
            threads = [threading.Thread(target=_client, args=(port, args, args.seed * 1000 + i, start, stop,
                                                              records, errors), daemon=True)
                       for i in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, stop - time.monotonic()) + args.request_timeout + 5)
            elapsed = args.duration
            mean_batch = _batch_stats(port)
        finally:
            _stop(proc)
    lat = [r[0] for r in records]
    return {
        "model": args.model or f"random {args.preset} (BERT, num_labels=1)", "route": args.route,
        "concurrency": args.concurrency, "inputs_per_request": args.inputs_per_request,
        "server_threads": args.server_threads,
        "duration_s": round(elapsed, 2), "requests": len(records), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "requests_per_s": len(records) / elapsed, "sequences_per_s": sum(r[1] for r in records) / elapsed,
        "tokens_per_s": sum(r[2] for r in records) / elapsed,
        "latency_p50_ms": 1e3 * _pct(lat, 50), "latency_p90_ms": 1e3 * _pct(lat, 90),
        "latency_p99_ms": 1e3 * _pct(lat, 99), "mean_batch_sequences": mean_batch,
    }


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    report = run(args)
    print(f"serve bench: {report['model']}, route /{report['route']}, {report['concurrency']} clients, "
          f"{report['inputs_per_request']} input(s)/request, {report['duration_s']} s")
    print(f"  requests/s {report['requests_per_s']:.1f}   sequences/s {report['sequences_per_s']:.1f}   "
          f"tokens/s {report['tokens_per_s']:.0f}")
    print(f"  latency p50 {report['latency_p50_ms']:.1f} ms   p90 {report['latency_p90_ms']:.1f} ms   "
          f"p99 {report['latency_p99_ms']:.1f} ms")
    mb = report["mean_batch_sequences"]
    print(f"  requests {report['requests']}, errors {report['errors']}, mean batch "
          f"{'n/a' if mb is None else f'{mb:.1f}'} sequences (includes warm-up)")
    if not report["requests"]:
        print("  no request completed inside the window: raise --duration (or --warmup)")
    if report["first_error"]:
        print(f"  first error: {report['first_error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["errors"] or not report["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
