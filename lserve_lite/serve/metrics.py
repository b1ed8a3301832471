"""Prometheus text exposition (format 0.0.4) for the server, written by hand: counters, gauges, histograms."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc, strict=True)) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts, strict=True):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum!r}",
            f"{name}_count {self.count}",
        ]
        return out


class Metrics:
    """The server's counters and histograms; updated from the engine thread and the event loop."""

    PREFIX = "lserve"

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = defaultdict(int)  # finished requests by finish_reason
        # failed requests by HTTP status (a stream's error event too)
        self.errors: dict[int, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.tpot = Histogram()  # time between consecutive output tokens of one request
        self.e2e = Histogram()

    def first_token(self, ttft: float) -> None:
        with self.lock:
            self.ttft.observe(ttft)

    def next_token(self, gap: float) -> None:
        with self.lock:
            self.tpot.observe(gap)

    def finished(self, reason: str, prompt_tokens: int, output_tokens: int, latency: float) -> None:
        with self.lock:
            self.requests[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += output_tokens
            self.e2e.observe(latency)

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[status] += 1

    def render(
        self, gauges: dict[str, tuple[str, float]], counters: dict[str, tuple[str, float]] | None = None
    ) -> str:
        """The exposition text; `gauges` and `counters` (kept elsewhere) map a name to (help, value)."""
        p = self.PREFIX
        out: list[str] = []

        def head(name: str, kind: str, help_: str) -> str:
            out.extend([f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}"])
            return f"{p}_{name}"

        with self.lock:
            n = head("requests_total", "counter", "Finished requests by finish_reason (stop, length, abort).")
            for reason in sorted(set(self.requests) | {"stop", "length", "abort"}):
                out.append(f"{n}{_labels({'finish_reason': reason})} {self.requests[reason]}")
            n = head("request_errors_total", "counter",
                     "Requests answered with an error (a stream's error event too), by HTTP status.")  # fmt: skip
            out += [f"{n}{_labels({'status': str(s)})} {c}" for s, c in sorted(self.errors.items())]
            out.append(f"{head('prompt_tokens_total', 'counter', 'Prompt tokens of finished requests.')} "
                       f"{self.prompt_tokens}")  # fmt: skip
            out.append(f"{head('generation_tokens_total', 'counter', 'Generated tokens of finished requests.')} "
                       f"{self.generation_tokens}")  # fmt: skip
            for name, (help_, value) in (counters or {}).items():
                out.append(f"{head(name, 'counter', help_)} {_num(value)}")
            for name, (help_, value) in gauges.items():  # a name may carry labels: 'name{k="v"}'
                base, brace, labels = name.partition("{")
                out.append(f"{head(base, 'gauge', help_)}{brace}{labels} {_num(value)}")
            for name, hist, help_ in (
                ("time_to_first_token_seconds", self.ttft, "Time from arrival to the first output token."),
                ("time_per_output_token_seconds", self.tpot, "Time between consecutive output tokens."),
                ("e2e_request_latency_seconds", self.e2e, "Time from arrival to the end of a request."),
            ):
                out += hist.lines(head(name, "histogram", help_))
        return "\n".join(out) + "\n"
