"""Serving benchmark: N concurrent streaming clients on loopback, a bounded number of requests per level.

Reports requests/s, output tokens/s and p50/p99 time to first token (TTFT) and time per output token (TPOT,
per request: (last token - first token) / (tokens - 1)). Prints a table and writes JSON.

    python tools/bench_serve.py --backend cpu --concurrency 1 4 --num-requests 8 --input-len 32 --output-len 16
    python tools/bench_serve.py --url http://127.0.0.1:8000 --api-key KEY ...   # an already running server

Without --url it starts `lserve-lite serve` in a subprocess on a free loopback port (so the clients do not
share the server's interpreter) and stops it at the end.
Every request streams /v1/completions with ignore_eos, so each one produces exactly --output-len tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
import numpy as np

from lserve_lite.engine_args import bounded_int, output_file
from lserve_lite.errors import InvalidRequestError, exit_status

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain city music light garden ocean story").split()  # fmt: skip


MAX_WORDS = 1 << 20  # words in a prompt, at most: about 8 MiB of text, the server's body limit


def server_url(text: str) -> str:
    """An argparse type: the server's root URL; the `/v1` an OpenAI client's base_url ends in is dropped (the
    tool adds `/v1/...` itself: it asked for /v1/v1/models, a 404 read as a model list)."""
    return text.rstrip("/").removesuffix("/v1")


def served_model(url: str, headers: dict) -> str:
    """The id of the model the server at `url` serves; any other answer (no server, a refused key, not an OpenAI
    API) is one error line saying which."""
    try:
        r = httpx.get(url + "/v1/models", headers=headers)
    except httpx.HTTPError as e:
        raise InvalidRequestError(f"{url}: no OpenAI-compatible server answers there ({e})") from None
    if r.status_code != 200:
        key = " (--api-key)" if r.status_code == 401 else ""
        raise InvalidRequestError(f"{url}/v1/models answered HTTP {r.status_code}{key}: {r.text[:200]}")
    try:
        return str(r.json()["data"][0]["id"])
    except (ValueError, LookupError, TypeError):
        raise InvalidRequestError(f"{url}/v1/models: not an OpenAI model list: {r.text[:200]}") from None


def make_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one_request(c: httpx.AsyncClient, model: str, prompt: str, output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    t0 = time.perf_counter()
    first = last = None
    used = {}
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"error": ev["error"]["message"]}
            if ev.get("usage"):
                used = ev["usage"]
            if ev.get("choices") and ev["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    n = used.get("completion_tokens", 0)
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else None, "latency": last - t0,
            "prompt_tokens": used.get("prompt_tokens", 0), "output_tokens": n}  # fmt: skip


async def run_level(
    url: str, headers: dict, model: str, concurrency: int, prompts: list[str], output_len: int
):
    todo = list(prompts)
    results: list[dict] = []

    async def worker(c: httpx.AsyncClient):
        while todo:
            results.append(await one_request(c, model, todo.pop(), output_len))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = np.array([r["ttft"] for r in ok])
    tpot = np.array([r["tpot"] for r in ok if r["tpot"] is not None])
    out_tokens = sum(r["output_tokens"] for r in ok)

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if len(a) else None

    return {
        "concurrency": concurrency, "requests": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
        "wall_s": wall, "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
        "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in ok])) if ok else None,
        "output_tokens": out_tokens,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
    }  # fmt: skip


def free_port() -> int:
    """A loopback port free now (the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout_s: float | None = None, log: Path | None = None
) -> None:
    """Poll /health until it answers 200; the server's exit (with the tail of `log`) or `timeout_s` ends the wait."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while deadline is None or time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = f":\n{log.read_text()[-2000:]}" if log is not None else ""
            raise SystemExit(f"the server exited with status {proc.returncode}{tail}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not become healthy in {timeout_s:.0f} s")


@contextmanager
def spawned_server(args: argparse.Namespace) -> Iterator[str]:
    """`python -m lserve_lite.cli serve` on a free port; yields its URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "lserve_lite.cli", "serve", "--port", str(port), "--backend", args.backend,
           "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]  # fmt: skip
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    cmd += ["--api-key", args.api_key] if args.api_key else []
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def table(rows: list[dict]) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f}"

    head = "| clients | requests | errors | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | {ms(r['ttft_p50_s'])} | {ms(r['ttft_p99_s'])} | "
                     f"{ms(r['tpot_p50_s'])} | {ms(r['tpot_p99_s'])} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--url", type=server_url, default=None,
        help="a running server, with or without the /v1 of a client's base_url (default: start one)",
    )  # fmt: skip
    ap.add_argument("--api-key", default=None)
    ap.add_argument(
        "--model", default=None, help="model directory for the in-process server (default: SmolLM2)"
    )
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--concurrency", type=bounded_int(1, 4096), nargs="+", default=[1, 4])
    ap.add_argument("--num-requests", type=bounded_int(1), default=8, help="requests per concurrency level")
    ap.add_argument(
        "--input-len", type=bounded_int(1, MAX_WORDS), default=32,
        help="prompt length in words (about that many tokens)",
    )  # fmt: skip
    ap.add_argument("--output-len", type=bounded_int(1), default=16, help="output tokens per request")
    ap.add_argument(
        "--warmup", type=bounded_int(0, 1 << 16), default=1, help="requests before timing (JIT, caches)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=output_file, default="tools/results/bench_serve.json")
    args = ap.parse_args()

    server = nullcontext(args.url) if args.url else spawned_server(args)
    info = {} if args.url else {"backend": args.backend, "max_num_seqs": args.max_num_seqs}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    load_start = os.getloadavg()[0]
    with server as url:
        model = served_model(url, headers)
        warm = [make_prompt(rng, args.input_len) for _ in range(args.warmup)]
        if warm:
            asyncio.run(run_level(url, headers, model, 1, warm, args.output_len))
        rows = []
        for n in args.concurrency:
            prompts = [make_prompt(rng, args.input_len) for _ in range(args.num_requests)]
            rows.append(asyncio.run(run_level(url, headers, model, n, prompts, args.output_len)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    result = {
        "date": time.strftime("%Y-%m-%d"), "model": model, "url": args.url or "spawned on 127.0.0.1",
        "cpu": platform.machine(), "cores": os.cpu_count(), **info,
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # other work on the host: start, end
        "input_words": args.input_len, "output_len": args.output_len, "num_requests": args.num_requests,
        "levels": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not any(r["requests"] for r in rows):  # a file of failures is written (it says why), but is no result
        raise InvalidRequestError(f"every request failed; the first: {rows[0]['first_error']}")


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
