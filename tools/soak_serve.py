"""Soak test of `lserve-lite serve`: a mixed load for a bounded time, then checks that nothing leaked.

    python tools/soak_serve.py --seconds 240 --concurrency 8             # tiny random model (numpy-made)
    python tools/soak_serve.py --model default --seconds 60 --concurrency 4   # SmolLM2-135M-Instruct
    python tools/soak_serve.py --model DIR --seconds 60

It starts the server in a subprocess on a free 127.0.0.1 port, records a reference answer for each greedy
prompt (one request at a time), then N clients loop until the deadline over: streaming and non-streaming
completions and chats (greedy, short and long prompts), clients that close the connection mid-stream or
time out on a non-streamed request, and invalid requests (bad JSON, wrong types, too many stop strings,
prompts over the context). At the end it checks through /metrics and /health that no KV page is in use and
no request is running, waiting or in flight, that the server's RSS stayed within --rss-tolerance-mb of its
value after warm-up, that every valid request got the reference answer, every invalid one a 4xx, nothing a
5xx or a timeout. It prints a table and writes JSON; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from bench_serve import MAX_WORDS, free_port, wait_healthy  # tools/ is on the path when run as a script

from lserve_lite.engine_args import bounded_float, bounded_int, output_file
from lserve_lite.errors import exit_status

WORDS = ("the quick brown fox jumps over lazy dog hello world how are you today river mountain city music "
         "light garden ocean story 0123456789").split()  # fmt: skip
ABORTED = 'lserve_requests_total{finish_reason="abort"}'
TIMEOUT_S = 120.0  # a valid request that takes longer counts as stuck


# -- the tiny model ----------------------------------------------------------------------------------------
def write_tiny_model(path: Path, seed: int = 0, vocab: int = 320, hidden: int = 64, layers: int = 2) -> Path:
    """A random Llama (float32 safetensors, numpy only) with a small byte-level BPE tokenizer."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    heads, kv_heads, inter = 4, 2, 96
    d = hidden // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32),
         "lm_head.weight": w(vocab, hidden)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(heads * d, hidden), p + "self_attn.k_proj.weight": w(kv_heads * d, hidden),
              p + "self_attn.v_proj.weight": w(kv_heads * d, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * d),
              p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
              p + "mlp.down_proj.weight": w(hidden, inter), p + "input_layernorm.weight": np.ones(hidden, np.float32),
              p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)}  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "max_position_embeddings": 1024, "rope_theta": 10000.0,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1,
           "torch_dtype": "float32"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    _write_tokenizer(path, vocab)
    return path


def _write_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 2, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    tc = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(tc))


# -- the server ----------------------------------------------------------------------------------------------
@contextmanager
def spawned_server(
    args: argparse.Namespace, model: str | None, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m lserve_lite.cli serve` on a free loopback port, output to `log_path`; yields (url, process)
    once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "lserve_lite.cli", "serve", "--port", str(port), "--backend", "cpu",
           "--max-num-seqs", str(args.concurrency), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--max-model-len", str(args.max_model_len), "--log-level", "warning"]  # fmt: skip
    cmd += ["--model", model] if model else []
    cmd += ["--kv-pages", str(args.kv_pages)] if args.kv_pages else []
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=600, log=log_path)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def server_log_summary(text: str) -> dict[str, int]:
    """Counts of what the server logged: tracebacks and errors fail the soak; uvicorn's warnings about
    writes to a socket the client already closed (an aborted stream) do not."""
    return {"tracebacks": text.count("Traceback"), "error_lines": len(re.findall(r" (ERROR|CRITICAL) ", text)),
            "closed_socket_writes": text.count("socket.send() raised exception")}  # fmt: skip


def rss_mb(pid: int) -> float:
    """Resident set size of a process (Linux /proc), in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024


@contextmanager
def rss_sampler(pid: int, every_s: float = 5.0) -> Iterator[list[float]]:
    """RSS samples (MiB) every `every_s` seconds while the block runs."""
    series: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            series.append(round(rss_mb(pid), 1))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield series
    finally:
        stop.set()
        t.join()


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {k: float(v) for k, v in re.findall(r"^(lserve_\S+) (\S+)$", text, re.M)}


# -- the workload --------------------------------------------------------------------------------------------
def make_cases(rng: random.Random, n: int, long_words: int) -> list[dict]:
    """Greedy reference cases: (endpoint, prompt), short and long, completions and chats."""
    cases = []
    for i in range(n):
        words = rng.choice([4, 8, 16]) if i % 3 else long_words
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        chat = i % 2 == 1
        body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        cases.append({"chat": chat, "body": body | {"max_tokens": rng.choice([8, 16, 32]), "temperature": 0}})
    return cases


INVALID = [
    ("bad_json", b'{"prompt": "hi", "max_tokens": '),
    ("bool_max_tokens", {"prompt": "hi", "max_tokens": True}),
    ("bool_prompt", {"prompt": [True, False], "max_tokens": 4}),
    ("surrogate", b'{"prompt": "a\\ud800", "max_tokens": 4}'),
    ("too_many_stops", {"prompt": "hi", "max_tokens": 4, "stop": ["x"] * 100}),
    ("deep_json", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("unknown_model", {"model": "nope", "prompt": "hi", "max_tokens": 4}),
    ("context_exceeded", {"prompt": "hello " * 5000, "max_tokens": 4}),
    ("n_99", {"prompt": "hi", "max_tokens": 4, "n": 99}),
]


def _text_of(event: dict, chat: bool) -> str:
    if not event.get("choices"):
        return ""
    c = event["choices"][0]
    return (c["delta"].get("content") or "") if chat else c["text"]


async def valid(c: httpx.AsyncClient, case: dict, stream: bool) -> tuple[str, str | None]:
    """One greedy request; returns (text, error kind or None)."""
    path = "/v1/chat/completions" if case["chat"] else "/v1/completions"
    body = case["body"] | {"stream": stream}
    if not stream:
        r = await c.post(path, json=body)
        if r.status_code != 200:
            return r.text, f"HTTP {r.status_code}"
        ch = r.json()["choices"][0]
        return (ch["message"]["content"] if case["chat"] else ch["text"]), None
    parts = []
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return "", f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if "error" in ev:
                    return "", "stream error"
                parts.append(_text_of(ev, case["chat"]))
    return "".join(parts), None


async def abort_stream(c: httpx.AsyncClient, case: dict, events: int) -> str | None:
    path = "/v1/chat/completions" if case["chat"] else "/v1/completions"
    body = case["body"] | {"stream": True, "max_tokens": 64, "ignore_eos": True}
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= events:
                break  # leaving the block closes the connection mid-stream
    return None


async def abort_wait(url: str, case: dict) -> str | None:
    """A non-streamed request whose client gives up after 50 ms (the connection closes)."""
    path = "/v1/chat/completions" if case["chat"] else "/v1/completions"
    body = case["body"] | {"max_tokens": 64, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=0.05) as c:
        try:
            await c.post(path, json=body)
        except httpx.TimeoutException:
            pass
    return None


async def invalid(c: httpx.AsyncClient, rng: random.Random) -> tuple[str, str | None]:
    name, body = rng.choice(INVALID)
    chat = rng.random() < 0.5 and isinstance(body, dict) and "prompt" in body
    if chat:
        body = {k: v for k, v in body.items() if k != "prompt"} | {
            "messages": [{"role": "user", "content": body["prompt"]}]
        }
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = await (c.post(path, json=body) if isinstance(body, dict) else c.post(path, content=body))
    ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
    return f"invalid:{name}", None if ok else f"HTTP {r.status_code} for invalid"


async def client_loop(
    url: str, cases: list[dict], refs: list[str], seed: int, deadline: float, log: list[dict]
):
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as c:
        while time.monotonic() < deadline:
            i = rng.randrange(len(cases))
            kind = rng.choices(
                ["stream", "plain", "abort_stream", "abort_wait", "invalid"], [30, 30, 12, 8, 20]
            )[0]
            t0 = time.perf_counter()
            err = None
            try:
                if kind in ("stream", "plain"):
                    text, err = await valid(c, cases[i], kind == "stream")
                    if err is None and text != refs[i]:
                        err = "wrong answer"
                    kind = f"{'chat' if cases[i]['chat'] else 'completion'}_{kind}"
                elif kind == "abort_stream":
                    err = await abort_stream(c, cases[i], rng.randint(1, 4))
                elif kind == "abort_wait":
                    err = await abort_wait(url, cases[i])
                else:
                    kind, err = await invalid(c, rng)
            except httpx.TimeoutException:
                err = "timeout"
            except httpx.TransportError as e:
                err = f"transport: {type(e).__name__}"
            log.append({"kind": kind, "latency": time.perf_counter() - t0, "error": err})


async def reference(url: str, cases: list[dict]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        refs = []
        for case in cases:
            text, err = await valid(c, case, stream=False)
            if err:
                raise SystemExit(f"reference request failed: {err}: {text[:300]}")
            refs.append(text)
        return refs


# -- the report ------------------------------------------------------------------------------------------------
def summarize(log: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for e in log:
        by["invalid" if e["kind"].startswith("invalid:") else e["kind"]].append(e)
    rows = {}
    for kind, es in sorted(by.items()):
        lat = np.array([e["latency"] for e in es])
        errs: dict[str, int] = defaultdict(int)
        for e in es:
            if e["error"]:
                errs[e["error"]] += 1
        rows[kind] = {"requests": len(es), "errors": dict(errs), "p50_s": float(np.percentile(lat, 50)),
                      "p99_s": float(np.percentile(lat, 99)), "max_s": float(lat.max())}  # fmt: skip
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["| kind | requests | errors | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {kind} | {r['requests']} | {errs} | {1000 * r['p50_s']:.0f} | {1000 * r['p99_s']:.0f} | "
                     f"{1000 * r['max_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def settle(url: str, seconds: float = 30.0) -> dict[str, float]:
    """Gauges once the server is idle (aborts are applied at the next engine step), or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        g = gauges(url)
        busy = sum(g.get(f"lserve_{k}", 0) for k in ("kv_pages_used", "kv_stream_pages_used", "requests_running",
                                                    "requests_waiting", "requests_in_flight"))  # fmt: skip
        if busy == 0 or time.monotonic() > deadline:
            return g
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="tiny", help="'tiny' (random, written to a temp dir), 'default' (SmolLM2) or a dir"
    )
    ap.add_argument(
        "--seconds", type=bounded_float(0.001, 1e6), default=60.0, help="duration of the mixed load"
    )
    ap.add_argument(
        "--warmup-seconds", type=bounded_float(0, 1e6), default=10.0, help="load before the first RSS reading"
    )
    ap.add_argument(
        "--concurrency", type=bounded_int(1, 4096), default=8, help="concurrent clients (also --max-num-seqs)"
    )
    ap.add_argument("--cases", type=bounded_int(1, 10_000), default=12, help="distinct greedy prompts")
    ap.add_argument(
        "--long-words", type=bounded_int(1, MAX_WORDS), default=120, help="words in the long prompts"
    )
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=128)
    ap.add_argument("--kv-pages", type=int, default=1024,
                    help="KV pool pages (0: the engine's memory-sized pool, whose zeroed memory the FIFO free "
                         "list touches page by page, so RSS grows until the whole pool has been used once)")  # fmt: skip
    ap.add_argument("--rss-tolerance-mb", type=float, default=40.0, help="allowed RSS growth over the load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=output_file, default="tools/results/soak_serve.json")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    cases = make_cases(rng, args.cases, args.long_words)
    with tempfile.TemporaryDirectory() as tmp:
        model = {
            "tiny": lambda: str(write_tiny_model(Path(tmp) / "tiny-random-llama")),
            "default": lambda: None,
        }
        model_arg = model.get(args.model, lambda: args.model)()
        log_path = Path(tmp) / "server.log"
        with spawned_server(args, model_arg, log_path) as (url, proc):
            name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            refs = asyncio.run(reference(url, cases))
            warm: list[dict] = []
            asyncio.run(run_load(url, cases, refs, args, args.warmup_seconds, warm))
            rss0 = rss_mb(proc.pid)
            log: list[dict] = []
            t0 = time.monotonic()
            with rss_sampler(proc.pid) as series:
                asyncio.run(run_load(url, cases, refs, args, args.seconds, log))
            wall = time.monotonic() - t0
            g = settle(url)
            rss1 = rss_mb(proc.pid)
            healthy = httpx.get(url + "/health").status_code == 200
        server_log = server_log_summary(log_path.read_text(errors="replace"))
    rows = summarize(log)
    errors = sum(sum(r["errors"].values()) for r in rows.values())
    checks = {
        "no_errors": errors == 0 and not any(e["error"] for e in warm),
        "kv_pages_used_0": g.get("lserve_kv_pages_used") == 0 == g.get("lserve_kv_stream_pages_used", 0),
        "no_request_stuck": all(
            g.get(f"lserve_{k}") == 0 for k in ("requests_running", "requests_waiting", "requests_in_flight")
        ),  # fmt: skip
        "rss_flat": rss1 - rss0 <= args.rss_tolerance_mb,
        "healthy": healthy,
        "no_server_errors": server_log["tracebacks"] == 0 and server_log["error_lines"] == 0,
    }
    print(table(rows))
    print(f"\n{len(log)} requests in {wall:.0f} s, {errors} errors; RSS {rss0:.1f} -> {rss1:.1f} MiB; "
          f"aborted {g.get(ABORTED, '?')}")  # fmt: skip
    print("checks: " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items()))
    result = {
        "date": time.strftime("%Y-%m-%d"), "model": name, "cpu": platform.machine(), "cores": os.cpu_count(),
        "load_avg_1m_end": round(os.getloadavg()[0], 2), "seconds": wall, "warmup_seconds": args.warmup_seconds, "concurrency": args.concurrency,
        "max_model_len": args.max_model_len, "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_pages": g.get("lserve_kv_pages_total"),
        "cases": args.cases, "requests": len(log), "errors": errors, "rss_mb": [round(rss0, 1), round(rss1, 1)],
        "rss_samples_mb": series,
        "final_gauges": {k: v for k, v in g.items() if k.startswith("lserve_") and "bucket" not in k},
        "server_log": server_log, "checks": checks, "kinds": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


async def run_load(
    url: str, cases: list[dict], refs: list[str], args: argparse.Namespace, seconds: float, log: list
):
    deadline = time.monotonic() + seconds
    seeds = [args.seed * 1000 + i + int(seconds * 7) for i in range(args.concurrency)]
    await asyncio.gather(*(client_loop(url, cases, refs, s, deadline, log) for s in seeds))


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
