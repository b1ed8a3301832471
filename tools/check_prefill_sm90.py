"""Check and time the Hopper (wgmma, sm_90a) prefill kernels (plain, TMA, warp-specialized) against the mma.sync one.

(a) Accuracy: every prefill kernel against the float32 reference (reference/attention.paged_attention_ref) on a
    few small paged shapes (ragged blocks, chunked prefill over cached pages, GQA, streaming heads, 16-token
    pages, one- and two-warpgroup CTAs), NaN-poisoned outputs; prints max |error| and max |error| / max |ref|.
(b) Speed: dense causal prefill for Llama-3-8B heads (32 query heads, 8 KV heads, D = 128), batch 1, page 64,
    at 4k, 32k and 128k tokens (--seqs), with each kernel: CUDA events after warm-up, median; TFLOP/s with
    causal FLOPs = 4 * Hq * D * S^2 / 2. Also each Hopper kernel's largest difference from the mma.sync kernel's output there.

    python3 tools/check_prefill_sm90.py --out results.json [--seqs 4096,32768,131072] [--kernels wgmma,tma]

--kernels: cuda_attention.PREFILL_KERNEL values (default: every one this device runs; "mma" always runs first, the
reference of the speed rows); "bf16" times the wgmma kernel on the same inputs rounded to bf16 (its accuracy rows:
tests/test_gpu_bf16_prefill.py and the harness).

Writes the JSON to --out. On a device that is not compute capability 9.x only the mma.sync rows run.
About a minute on an H200 when the kernels are in CuPy's cache (the first compile adds some seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import events_median  # noqa: E402

from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.backends.cuda_attention import PREFILL_KERNELS  # noqa: E402
from lserve_lite.config import MAX_MODEL_LEN  # noqa: E402
from lserve_lite.engine_args import choice_list, int_list, output_file  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 64
Q_BLOCK = 64  # as tools/bench_attention.py (two heads of a GQA group share each CTA)

# name: (q_lens, prefix_lens, hq, hkv, d, page, q_block, sink, local, head_class)
ACCURACY_CASES = {
    "chunked_g4_d128_p64": ([700], [300], 8, 2, 128, 64, 128, 0, 0, None),
    "ragged_g1_d64_p16": ([37, 200, 5], [0, 333, 1000], 4, 4, 64, 16, 64, 0, 0, None),
    "streaming_mixed_d128_p16": ([300], [900], 8, 4, 128, 16, 64, 64, 256, [0, 1, 0, 1]),
    "one_warpgroup_d128_p32": ([50, 3], [70, 0], 2, 2, 128, 32, 64, 0, 0, None),
    "two_warpgroups_g3_d64_p64": ([129, 64], [1100, 200], 6, 2, 64, 64, 64, 128, 384, [1, 0]),
}


def _kernels() -> list[str]:
    import cupy as cp

    hopper = cp.cuda.Device().compute_capability.startswith("9")
    return ["mma", "wgmma", "tma", "ws"] if hopper else ["mma"]


def _run(kernel: str, q, k, v, cplan, hc, out):
    from lserve_lite.backends import cuda_attention as att
    from lserve_lite.harness.common import setting

    if kernel == "bf16":
        return att.paged_attention(q, k, v, cplan, hc, out=out, decode=False, kv="bf16")
    with setting(att, "PREFILL_KERNEL", kernel):
        return att.paged_attention(q, k, v, cplan, hc, out=out, decode=False)


def accuracy(kernels: list[str]) -> list[dict]:
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan
    from lserve_lite.backends.reference.attention import paged_attention_ref
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    rows = []
    for name, (q_lens, prefix, hq, hkv, d, ps, qb, sink, local, hc) in ACCURACY_CASES.items():
        rng = np.random.default_rng(len(rows))
        ctx = [a + b for a, b in zip(q_lens, prefix, strict=True)]
        need = [-(-c // ps) for c in ctx]
        perm = rng.permutation(sum(need) + 5)
        tables, o = [], 0
        for n in need:
            tables.append([int(x) for x in perm[o : o + n]])
            o += n
        plan = build_plan(BatchLayout(list(q_lens), ctx, tables), ps, qb, sink, local)
        k = rng.standard_normal((perm.size, hkv, ps, d)).astype(np.float16)
        v = rng.standard_normal((perm.size, hkv, ps, d)).astype(np.float16)
        q = rng.standard_normal((plan.num_tokens, hq, d)).astype(np.float16)
        hcl = np.zeros(hkv, np.int32) if hc is None else np.asarray(hc, np.int32)
        ref = paged_attention_ref(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), plan, hcl)
        cplan = CudaPlan.from_plan(plan)
        dq, dk, dv, dh = cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(hcl)
        row = {"case": name}
        for kern in kernels:
            out = cp.full((q.shape[0], hq * d), np.nan, np.float16)
            got = cp.asnumpy(_run(kern, dq, dk, dv, cplan, dh, out)).astype(np.float32)
            err = float(np.nanmax(np.abs(got - ref))) if not np.isnan(got).all() else float("inf")
            row[kern] = {
                "max_abs": err,
                "rel": err / float(np.abs(ref).max()),
                "nan": int(np.isnan(got).sum()),
                "ok": bool(np.isnan(got).sum() == 0 and np.allclose(got, ref, atol=2e-3, rtol=5e-3)),
            }
        rows.append(row)
        print("accuracy", json.dumps(row), flush=True)
    return rows


def timing(seq: int, kernels: list[str]) -> dict:
    """Dense causal prefill of one `seq`-token sequence (Llama-3-8B heads) with each kernel."""
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    npages = -(-seq // PAGE)
    table = [int(x) for x in np.random.default_rng(0).permutation(npages)]
    t0 = time.perf_counter()
    plan = build_plan(BatchLayout([seq], [seq], [table]), PAGE, Q_BLOCK)
    row: dict = {"seq": seq, "plan_build_s": time.perf_counter() - t0}
    cplan = CudaPlan.from_plan(plan)
    g = cp.random.default_rng(1)
    q = g.standard_normal((seq, HQ, D), dtype=np.float32).astype(np.float16)
    k = g.standard_normal((npages, HKV, PAGE, D), dtype=np.float32).astype(np.float16)
    v = g.standard_normal((npages, HKV, PAGE, D), dtype=np.float32).astype(np.float16)
    hc = cp.zeros(HKV, np.int32)
    flops = 4.0 * HQ * D * seq * seq / 2
    outs = {}
    from lserve_lite.harness.common import bf16_bits

    bq, bk, bv = (bf16_bits(x) for x in (q, k, v)) if "bf16" in kernels else (None, None, None)
    for kern in kernels:
        bf = kern == "bf16"
        out = cp.empty((seq, HQ * D), np.uint16 if bf else np.float16)
        args = (bq, bk, bv) if bf else (q, k, v)
        fn = lambda kern=kern, out=out, args=args: _run(kern, *args, cplan, hc, out)  # noqa: E731
        est = events_median(fn, 1, 1)
        reps = int(max(3, min(20, 300.0 / max(est, 0.01))))
        ms = events_median(fn, 1, reps)
        row[kern] = {"ms": ms, "tflops": flops / ms / 1e9, "reps": reps}
        outs[kern] = out
    for kern in kernels[1:]:
        if kern == "bf16":  # other inputs: only its speed is compared
            row["speedup_bf16"] = row["mma"]["ms"] / row[kern]["ms"]
            continue
        diff = cp.abs(outs[kern].astype(np.float32) - outs["mma"].astype(np.float32))
        row[f"max_diff_{kern}_vs_mma"] = float(cp.nan_to_num(diff, nan=np.inf).max())
        row[f"speedup_{kern}"] = row["mma"]["ms"] / row[kern]["ms"]
    print("timing", json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=output_file, required=True, help="JSON file to write")
    ap.add_argument("--seqs", type=int_list(1, MAX_MODEL_LEN), default=[4096, 32768, 131072],
                    help="prefill lengths to time")  # fmt: skip
    ap.add_argument("--kernels", type=choice_list((*PREFILL_KERNELS[1:], "bf16")), default=[],
                    help="comma-separated PREFILL_KERNEL values, or bf16 (default: all available)")  # fmt: skip
    args = ap.parse_args(argv)
    require_gpu("check_prefill_sm90.py")

    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    kernels = ["mma", *(k for k in args.kernels if k != "mma")] if args.kernels else _kernels()
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": name,
        "compute_capability": cp.cuda.Device().compute_capability,
        "kernels": kernels,
        "shapes": {"hq": HQ, "hkv": HKV, "head_dim": D, "page_size": PAGE, "q_block": Q_BLOCK, "batch": 1},
    }
    t0 = time.perf_counter()
    fp16_kernels = [k for k in kernels if k != "bf16"]
    res["accuracy"] = accuracy(fp16_kernels)
    res["timing"] = []
    for s in args.seqs:
        res["timing"].append(timing(s, kernels))
        cp.get_default_memory_pool().free_all_blocks()  # the previous length's buffers are gone by now
    res["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    bad = [r["case"] for r in res["accuracy"] for k in fp16_kernels if not r[k]["ok"]]
    print(f"wrote {args.out} ({res['wall_s']:.1f} s); accuracy failures: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
