"""Per-kernel GPU time of batch-1 decode steps under Nsight Compute: where a decode step's time goes.

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file prof.csv \
        python3 tools/profile_decode.py --model llama8b [--quantize int8] --context 4096 --steps 2
    python3 tools/profile_decode.py --summarize prof.csv --steps 2 [--replay-ms 4.93] [--out prof.json]

Random weights of the Llama-3-8B shape or SmolLM2-135M's shape (tools/bench_e2e.random_llama), a dense KV cache
prefilled to `--context`, then `--steps` decode forwards launched eagerly: the same kernels a decode graph
replays, one by one. ncu times each kernel alone, so launch gaps (and the overlap programmatic dependent launch
gives inside graphs) are not in these figures: their sum against the graph replay time shows what they cost.
The summary groups kernels by name (template arguments dropped) per decode step.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.config import MAX_MODEL_LEN  # noqa: E402
from lserve_lite.engine_args import bounded_int, existing_file, output_file  # noqa: E402
from lserve_lite.errors import InvalidRequestError, exit_status  # noqa: E402

UNITS_US = {
    "nsecond": 1e-3,
    "usecond": 1.0,
    "msecond": 1e3,
    "second": 1e6,
    "ns": 1e-3,
    "us": 1.0,
    "ms": 1e3,
    "s": 1e6,
}


def smollm2_config(max_len: int):
    from lserve_lite.config import ModelConfig

    return ModelConfig(
        "LlamaForCausalLM", 576, 1536, 30, 9, 3, 64, 49152, rms_norm_eps=1e-5, rope_theta=1e5,
        max_position_embeddings=max_len, tie_word_embeddings=True,
    )  # fmt: skip


def run(args) -> None:
    import cupy as cp
    from bench_e2e import llama3_8b_config, random_llama, sequence_forward

    from lserve_lite.backends.cuda import CudaOps

    ps, ctx = 64, args.context
    max_len = ctx + args.steps + ps
    cfg = (llama3_8b_config if args.model == "llama8b" else smollm2_config)(max_len)
    ops = CudaOps()
    model = random_llama(cfg, ops, max_len, quantize=args.quantize)
    pages = -(-max_len // ps)
    cache = ops.alloc_kv(cfg, ps, pages)
    table = list(range(pages))
    hc = [cp.zeros(cfg.num_kv_heads, cp.int32) for _ in range(cfg.num_layers)]
    rng = np.random.default_rng(0)

    def forward(start: int, n: int):
        return sequence_forward(model, cache, hc, table, ps, rng, start, n)

    for s in range(0, ctx, 8192):
        forward(s, min(8192, ctx - s))
    forward(ctx, 1)  # a warm-up decode: compiles, allocates
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.start()
    for i in range(args.steps):
        forward(ctx + 1 + i, 1)
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.stop()


def family(name: str) -> str:
    """A kernel's name without template arguments or parameter list (ncu prints demangled names)."""
    name = re.sub(r"^void ", "", name)
    return re.split(r"[<(]", name, maxsplit=1)[0].strip()


def summarize(path: Path, steps: int, replay_ms: float | None) -> dict:
    """Kernel time per decode step by family from an ncu --csv log; a file that is not one is an error naming it."""
    per: dict[str, list[float]] = defaultdict(list)
    with open(path, newline="", errors="replace") as f:
        rows = [r for r in csv.reader(f) if len(r) > 5]
    names = ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value")
    if not rows or not set(names) <= set(rows[0]):
        raise InvalidRequestError(
            f"{path}: not an ncu --csv log (no header with the columns {', '.join(names)})"
        )
    col = {k: rows[0].index(k) for k in names}
    for r in rows[1:]:
        if r[col["Metric Name"]] != "gpu__time_duration.sum":
            continue
        value, unit = r[col["Metric Value"]].replace(",", ""), r[col["Metric Unit"]]
        try:
            us = float(value) * UNITS_US[unit]
        except (ValueError, KeyError):
            raise InvalidRequestError(f"{path}: a kernel time of {value!r} {unit!r} is not a time") from None
        per[family(r[col["Kernel Name"]])].append(us)
    if not per:
        raise InvalidRequestError(
            f"{path}: no gpu__time_duration.sum rows (run ncu with --metrics gpu__time_duration.sum)"
        )
    table = sorted(
        ({"kernel": k, "per_step": len(v) / steps, "us_per_step": sum(v) / steps, "us_mean": sum(v) / len(v)}
         for k, v in per.items()), key=lambda d: -d["us_per_step"],
    )  # fmt: skip
    total = sum(d["us_per_step"] for d in table)
    print(f"{'kernel':40s} {'per step':>8s} {'us/step':>9s} {'us each':>8s}")
    for d in table:
        print(f"{d['kernel'][:40]:40s} {d['per_step']:8.1f} {d['us_per_step']:9.1f} {d['us_mean']:8.2f}")
    print(f"{'sum of kernel times':40s} {sum(d['per_step'] for d in table):8.1f} {total:9.1f}")
    if replay_ms:
        print(
            f"graph replay {replay_ms * 1e3:.1f} us: {replay_ms * 1e3 - total:.1f} us outside the kernels' own times"
        )
    return {"source": path.name, "steps": steps, "kernels": table, "sum_us": total, "replay_ms": replay_ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama8b", "smollm2"], default="llama8b")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None)
    ap.add_argument("--context", type=bounded_int(1, MAX_MODEL_LEN), default=4096)
    ap.add_argument("--steps", type=bounded_int(1, 1 << 16), default=2)
    ap.add_argument(
        "--summarize",
        type=lambda t: Path(existing_file(t)),
        default=None,
        help="an ncu --csv log of this script's run",
    )
    ap.add_argument("--replay-ms", type=float, default=None, help="the graph replay time of the same step")
    ap.add_argument("--out", type=lambda t: Path(output_file(t)), default=None)
    args = ap.parse_args(argv)
    if args.summarize is None:
        require_gpu("profile_decode.py")
        run(args)
        return 0
    result = summarize(args.summarize, args.steps, args.replay_ms)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
