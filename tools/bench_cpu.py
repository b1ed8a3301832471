"""CPU benchmark of the default model: prefill tokens/s (512, 2048 prompt tokens) and batch-1 decode tokens/s.

Prints a table and writes JSON. Also reports the decode floor set by reading the float32 weights once per
token at the machine's measured copy bandwidth. Usage: python tools/bench_cpu.py [--out tools/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from lserve_lite import LLM, SamplingParams


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(ts)


def bench_prefill(llm: LLM, n: int, reps: int) -> float:
    ids = [int(t) for t in np.random.default_rng(n).integers(100, 40000, n)]
    llm.logits(ids[:64])
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        llm.logits(ids)
        ts.append(time.perf_counter() - t)
    return n / statistics.median(ts)


def bench_decode(llm: LLM, ctx: int, steps: int) -> float:
    ids = [int(t) for t in np.random.default_rng(ctx).integers(100, 40000, ctx)]
    params = SamplingParams(temperature=0, max_new_tokens=steps + 1, ignore_eos=True)
    stamps = [time.perf_counter() for _ in llm.stream_outputs(ids, params)]
    gaps = np.diff(stamps[1:])  # the first output comes after the prefill
    return 1.0 / float(np.median(gaps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="tools/results")
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    llm = LLM(args.model, backend="cpu")
    cfg = llm.engine.cfg
    weight_bytes = sum(
        a.nbytes for a in [llm.engine.runner.model.embed, *[
            x for layer in llm.engine.runner.model.layers for x in vars(layer).values() if x is not None
        ]]
    )  # fmt: skip
    bw = copy_bandwidth()
    rows = {
        "prefill_512_tok_s": bench_prefill(llm, 512, 3),
        "prefill_2048_tok_s": bench_prefill(llm, 2048, 2),
        "decode_ctx512_tok_s": bench_decode(llm, 512, args.steps),
        "decode_ctx2048_tok_s": bench_decode(llm, 2048, args.steps),
    }
    floor = bw / weight_bytes
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": str(llm.engine.model_dir.name),
        "layers": cfg.num_layers,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "weight_bytes": weight_bytes,
        "copy_bandwidth_GBs": bw / 1e9,
        "decode_floor_tok_s": floor,
        **rows,
        "llama_cpp_reference": {"prefill_512": 311, "prefill_2048": 211, "decode": 100},
    }
    print(f"{'metric':<24}{'lserve-lite':>14}{'llama.cpp Q4_1 (DESIGN.md)':>30}")
    ref = {
        "prefill_512_tok_s": 311,
        "prefill_2048_tok_s": 211,
        "decode_ctx512_tok_s": 100,
        "decode_ctx2048_tok_s": 100,
    }
    for k, v in rows.items():
        print(f"{k:<24}{v:>14.1f}{ref[k]:>30}")
    print(
        f"weight-read floor for f32 decode: {floor:.1f} tok/s ({weight_bytes / 1e6:.0f} MB at {bw / 1e9:.1f} GB/s)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
