"""Speed of GPU token sampling (kernels/sampling.cu) at a 128k vocabulary, beside torch in the same run.

Rows of random float32 logits (normal, sigma 3), batch 1 / 8 / 64, per setting (greedy; temperature alone;
top-k + top-p; top-p): our `argmax_rows` (greedy) or `sample_rows` on its histogram path (the default) and on the
radix path it falls back to (`--radix`), and torch's usual GPU sampler (what engines without a sampling kernel
run: logits / T, sort descending, softmax, cumulative sum, top-k / top-p masks, `torch.multinomial`; argmax for
greedy) when torch with CUDA is importable; and the top logprobs (`logprob_rows`, k 5 and 20) beside torch's
log_softmax + topk. Each call timed alone with CUDA events (a warm-up first), median (ours: the kernels and, for
logprobs, the copy of the k ids and values to the host).

    python3 tools/bench_sampling.py --out tools/results/bench_sampling.json [--radix] [--batches 1 8 64]

Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.engine_args import bounded_int, output_file  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402

SETTINGS = [  # (name, temperature, top_k, top_p)
    ("greedy", 0.0, 0, 1.0),
    ("T1", 1.0, 0, 1.0),
    ("T0.7 k50 p0.9", 0.7, 50, 0.9),
    ("T1 p0.95", 1.0, 0, 0.95),
]


def median_us(fn, reps: int) -> float:
    """Median of `reps` single launches of `fn`, each between two CUDA events, after 3 warm-up calls."""
    import cupy as cp

    for _ in range(3):
        fn()
    events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    cp.cuda.Device().synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in events]) * 1000.0)


def torch_sampler(logits, temp: float, k: int, p: float):
    """torch's common GPU sampling: sort, softmax, cumsum, masks, multinomial (argmax when greedy)."""
    import torch

    if temp == 0.0:
        return logits.argmax(-1)
    x = logits / temp
    vals, idx = x.sort(dim=-1, descending=True)
    if k > 0:
        vals[:, k:] = -float("inf")
    probs = vals.softmax(-1)
    if p < 1.0:
        cum = probs.cumsum(-1)
        probs = probs.masked_fill(cum - probs > p, 0.0)
    pick = torch.multinomial(probs, 1)
    return idx.gather(-1, pick).squeeze(-1)


def time_setting(sampler, x, tx, params, setting: tuple[float, int, float], args) -> dict:
    """Our kernel (and its radix path, torch) on logits `x` (torch's copy `tx`, None: no torch)."""
    import cupy as cp

    temp, k, p = setting
    out, row = cp.empty(x.shape[0], cp.int64), {}
    if temp == 0.0:
        row["ours_us"] = median_us(lambda: sampler.argmax(x, out), args.reps)
    else:
        row["ours_us"] = median_us(lambda: sampler.sample_rows(x, params, out), args.reps)
        if args.radix:
            row["radix_us"] = median_us(lambda: sampler.sample_rows(x, params, out, radix=True), 5)
    if tx is not None:
        row["torch_us"] = median_us(lambda: torch_sampler(tx, temp, k, p), args.reps)
    return row


def time_logprobs(sampler, x, tx, k: int, args) -> dict:
    """Our logprob_rows (chosen ids 0) beside torch's log_softmax + topk (None: no torch)."""
    chosen = np.zeros(x.shape[0], np.int64)
    row = {"ours_us": median_us(lambda: sampler.logprobs(x, chosen, k), args.reps)}
    if tx is not None:
        row["torch_us"] = median_us(lambda: tx.log_softmax(-1).topk(k, -1), args.reps)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=output_file, default="tools/results/bench_sampling.json")
    ap.add_argument("--vocab", type=bounded_int(2, 1 << 20), default=128256)
    ap.add_argument("--batches", type=bounded_int(1, 4096), nargs="+", default=[1, 8, 64])
    ap.add_argument("--radix", action="store_true", help="also time sample_rows' radix path (~2 ms a row)")
    ap.add_argument("--reps", type=bounded_int(1, 100_000), default=30)
    args = ap.parse_args()
    require_gpu("bench_sampling.py")

    import cupy as cp

    from lserve_lite.backends.cuda_sampling import GpuSampler

    try:
        import torch

        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    sampler, rng, rows = GpuSampler(), np.random.default_rng(0), []
    for b in args.batches:
        host = (rng.standard_normal((b, args.vocab)) * 3).astype(np.float32)
        x = cp.asarray(host)
        tx = torch.as_tensor(host, device="cuda") if has_torch else None
        for name, temp, k, p in SETTINGS:
            params = cp.asarray(np.array([[temp] * b, [k] * b, [p] * b, rng.random(b)], np.float64))
            row = {"batch": b, "setting": name, **time_setting(sampler, x, tx, params, (temp, k, p), args)}
            rows.append(row)
            print(row, flush=True)
        for k in (5, 20):  # the OpenAI API's top_logprobs: log-softmax of the raw logits and the k best ids
            row = {"batch": b, "setting": f"logprobs k{k}", **time_logprobs(sampler, x, tx, k, args)}
            rows.append(row)
            print(row, flush=True)
    print("\n| batch | setting | ours us | radix path us | torch sort + multinomial us (same run) |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[key]:.1f}" if key in r else "-" for key in ("ours_us", "radix_us", "torch_us")]
        print(f"| {r['batch']} | {r['setting']} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"vocab": args.vocab, "logits": "normal, sigma 3", "timing": "CUDA events per launch, median"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
