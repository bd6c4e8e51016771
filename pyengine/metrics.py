"""Server metrics in the Prometheus text exposition format (written by hand, so the
server needs no metrics library)."""
from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def _labels(names, values) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


def _fmt(x) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class Histogram:
    """Cumulative-bucket histogram keyed by a tuple of label values."""

    def __init__(self, name, help_, buckets, label_names=()):
        self.name, self.help, self.buckets, self.label_names = name, help_, tuple(buckets), tuple(label_names)
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value, labels=()):
        s = self.series.setdefault(tuple(labels), [0] * len(self.buckets) + [0.0, 0])
        i = bisect.bisect_left(self.buckets, value)  # the first bucket with value <= le
        if i < len(self.buckets):  # larger values live only in +Inf (the count)
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def render(self, out):
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} histogram")
        for labels, s in sorted(self.series.items()):
            acc = 0
            for b, c in zip(self.buckets, s):
                acc += c
                out.append(f"{self.name}_bucket{_labels(self.label_names + ('le',), labels + (_fmt(b),))} {acc}")
            out.append(f"{self.name}_bucket{_labels(self.label_names + ('le',), labels + ('+Inf',))} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_fmt(float(s[-2]))}")
            out.append(f"{self.name}_count{_labels(self.label_names, labels)} {s[-1]}")


class Metrics:
    """Everything /metrics reports. Updated from the event loop and the engine thread,
    so every update takes the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple, int] = {}  # (route, status) -> count
        self.prompt_tokens = 0
        self.inputs = 0
        self.aborted = 0
        self.in_flight = 0
        self.latency = Histogram("pyengine_request_latency_seconds", "End-to-end request latency by route.",
                                 LATENCY_BUCKETS, ("route",))
        self.batch_seqs = Histogram("pyengine_batch_size_sequences", "Sequences in each engine batch.",
                                    SEQ_BUCKETS)
        self.batch_tokens = Histogram("pyengine_batch_size_tokens", "Tokens in each engine batch.", TOKEN_BUCKETS)
        self.step_time = Histogram("pyengine_batch_seconds", "Wall time of each engine batch.", STEP_BUCKETS)

    def request_started(self):
        with self.lock:
            self.in_flight += 1

    def request_done(self, route, status, seconds, prompt_tokens=0, inputs=0, aborted=False):
        with self.lock:
            self.in_flight -= 1
            key = (route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.inputs += inputs
            self.aborted += int(aborted)
            self.latency.observe(seconds, (route,))

    def step_done(self, num_seqs, num_tokens, seconds):
        with self.lock:
            self.batch_seqs.observe(num_seqs)
            self.batch_tokens.observe(num_tokens)
            self.step_time.observe(seconds)

    def render(self, queue_depth: int) -> str:
        out = []

        def scalar(name, kind, help_, value):
            out.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"))

        with self.lock:
            out += ["# HELP pyengine_http_requests_total HTTP requests by route and status code.",
                    "# TYPE pyengine_http_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                out.append(f"pyengine_http_requests_total{_labels(('route', 'status'), (route, status))} {n}")
            scalar("pyengine_prompt_tokens_total", "counter", "Prompt tokens of successful requests.",
                   self.prompt_tokens)
            scalar("pyengine_inputs_total", "counter", "Sequences (inputs or pairs) of successful requests.",
                   self.inputs)
            scalar("pyengine_requests_aborted_total", "counter",
                   "Requests whose client went away before they finished.", self.aborted)
            scalar("pyengine_requests_in_flight", "gauge", "HTTP requests being handled.", self.in_flight)
            scalar("pyengine_queue_depth", "gauge", "Sequences waiting in the engine queue.", queue_depth)
            for h in (self.latency, self.batch_seqs, self.batch_tokens, self.step_time):
                h.render(out)
        return "\n".join(out) + "\n"
