"""LServe vs dense decode on the CPU with the bundled SmolLM2 GGUF (docs/PERF.md, "LServe mode on the CPU"): one
engine per run (fp16 KV unless `--kv-dtype`, LServe's default knobs), a prompt of `--context` random token ids (seed 0), greedy
decode of `--steps` steps, each `engine.step()` timed. Prints one JSON line: prefill seconds (to the first token),
the median and the mean decode step in ms (the selector runs on one step in select_interval: the mean counts it),
the page selector's ms a decode step, the 1-minute load average, the tokens.

    python3 tools/bench_cpu_lserve.py --mode dense|lserve [--selector numba|ref] [--context 4000] [--steps 29]
        [--kv-dtype fp16|fp32|int8|int4|fp8]

`--selector ref` runs the NumPy reference selector (select_pages_ref; LSERVE_CPU_SELECTOR=ref), as the engine did before
2026-12-04's Numba selector: run both in alternation on a noisy host. The selector's time comes from
CpuOps.select_seconds."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from lserve_lite.config import KV_DTYPES
from lserve_lite.engine_args import bounded_int
from lserve_lite.errors import exit_status

MAX_LEN = 8192  # the engine's context limit here (SmolLM2's)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["dense", "lserve"], required=True)
    ap.add_argument("--selector", choices=["numba", "ref"], default="numba")
    ap.add_argument(
        "--context", type=bounded_int(16, MAX_LEN - 3), default=4000, help="prompt tokens (random ids)"
    )  # checked before the prompt is built: room for two decode steps in the engine's context
    ap.add_argument(
        "--steps", type=bounded_int(2, MAX_LEN), default=29, help="decode steps (fewer at the context limit)"
    )
    ap.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto")
    args = ap.parse_args()

    from lserve_lite import LLM, EngineConfig, SamplingParams, SparseConfig

    os.environ["LSERVE_CPU_SELECTOR"] = args.selector  # read by CpuOps at construction
    sparse = SparseConfig(enabled=args.mode == "lserve")
    llm = LLM(
        backend="cpu", config=EngineConfig(max_model_len=MAX_LEN, sparse=sparse, kv_dtype=args.kv_dtype)
    )
    ids = [int(t) for t in np.random.default_rng(0).integers(100, llm.engine.cfg.vocab_size, args.context)]
    eng = llm.engine
    eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=args.steps + 1))
    ops = eng.ops
    t0, times, sel, tokens, prefill = time.perf_counter(), [], [], [], None
    while eng.has_unfinished():
        t, spent = time.perf_counter(), ops.select_seconds
        outs = eng.step()
        dt = time.perf_counter() - t
        new = [x for o in outs for x in o.token_ids]
        if new and prefill is None:
            prefill = time.perf_counter() - t0
        elif new:
            times.append(dt)
            sel.append(ops.select_seconds - spent)
        tokens += new
    ms = lambda x: round(1e3 * float(x), 2)  # noqa: E731
    # means leave out the first decode step: it loads the decode kernels (and the selector) from Numba's cache
    row = dict(mode=args.mode, kv=args.kv_dtype, selector=args.selector if args.mode == "lserve" else "-", context=args.context,
               prefill_s=round(prefill, 2), decode_ms=ms(np.median(times)), decode_mean_ms=ms(np.mean(times[1:])),
               select_ms=ms(np.mean(sel[1:])), steps=len(times), load=round(os.getloadavg()[0], 2), tokens=tokens)  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
