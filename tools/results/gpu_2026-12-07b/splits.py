"""Decode attention at batch 1: the default split count (with its combine launch) against fixed counts (1: no
combine, the kernel writes the output), per context, for SmolLM2's heads (9 / 3 of 64) and Llama-3-8B's (32 / 8 of
128), fp16 KV, page 64. Graphs of 10 launches, median us a launch; outputs compared with the default's.
Usage: python3 tools/results/gpu_2026-12-07b/splits.py OUT.json"""

import json
import sys

import cupy as cp
import numpy as np

from lserve_lite.backends.cuda_attention import CudaPlan, decode_splits, paged_attention
from lserve_lite.sparse.plan import BatchLayout, build_plan

PAGE = 64


def median_us(fn, stream, per_graph=10) -> float:
    with stream:
        fn()
        stream.begin_capture()
        for _ in range(per_graph):
            fn()
        graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream)
        times = []
        for _ in range(30):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            graph.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times)) * 1e3 / per_graph


def case(hq: int, hkv: int, d: int, ctx: int, stream) -> dict:
    npages = -(-ctx // PAGE)
    rng = np.random.default_rng(ctx)
    table = [int(x) for x in rng.permutation(npages)]
    plan = CudaPlan.from_plan(build_plan(BatchLayout([1], [ctx], [table]), PAGE, 64))
    g = cp.random.default_rng(ctx)
    q = g.standard_normal((1, hq, d), dtype=np.float32).astype(np.float16)
    k = g.standard_normal((npages, hkv, PAGE, d), dtype=np.float32).astype(np.float16)
    v = g.standard_normal((npages, hkv, PAGE, d), dtype=np.float32).astype(np.float16)
    hc = cp.zeros(hkv, np.int32)
    cp.cuda.Device().synchronize()
    row = {"hq": hq, "hkv": hkv, "d": d, "ctx": ctx, "default_splits": decode_splits(plan, hkv, 1, d)}
    ref = cp.empty((1, hq * d), np.float16)
    row["default_us"] = median_us(lambda: paged_attention(q, k, v, plan, hc, out=ref, decode=True), stream)
    for s in (1, 2, 4):
        out = cp.empty((1, hq * d), np.float16)
        row[f"s{s}_us"] = median_us(
            lambda s=s, out=out: paged_attention(q, k, v, plan, hc, out=out, decode=True, num_splits=s),
            stream,
        )
        stream.synchronize()
        row[f"s{s}_maxdiff"] = float(cp.abs(out.astype(np.float32) - ref.astype(np.float32)).max())
    return row


def main() -> None:
    stream = cp.cuda.Stream(non_blocking=True)
    rows = []
    for hq, hkv, d in ((9, 3, 64), (32, 8, 128)):
        for ctx in (256, 512, 1024, 2048, 4096):
            r = case(hq, hkv, d, ctx, stream)
            rows.append(r)
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True
            )
    json.dump(rows, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
