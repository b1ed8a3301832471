"""Speed of the quantized-weight kernels (kernels/quant_gemv*.cu) at Llama-3-8B shapes, against the copy bandwidth.

Per format (q8_0, q4_0, q4_1, q4_k, q6_k, int8, int4) and shape (6144x4096 fused qkv, 4096x4096 attention output,
28672x4096 fused gate/up, 4096x14336 down, 128256x4096 lm_head), batch 1 and 8, for each decode GEMV kernel (path "gemv v1":
quant_gemv; "gemv v2": quant_gemv2; "gemv split": quant_gemv_split on the split layout, the default for every
format, with the engine's rows per warp or `--split-r`'s): the decode GEMV's time, its effective
bandwidth on the packed bytes (bytes / time), and the bandwidth of a device-to-device copy of the same
bytes in the same run (read + written bytes / time, as tools/bench_e2e.copy_bandwidth), so `x copy` = the
GEMV's bytes/s over the copy's (1.0 = the GEMV streams its weights as fast as a copy moves data). Beside it,
the same shape in fp16: cuBLAS and our fp16 GEMV (gemv_rows). With --prefill-rows N, also the prefill path
(dequantized fp16 tiles + cuBLAS) against fp16 cuBLAS at N rows.

Timing: each measurement is a CUDA Graph of `calls` launches that cycle through enough copies of the weight
(>= 256 MB) that no launch finds it in the 50 MB L2; median of `reps` replays, divided by `calls`.
Weights: random packed bytes with finite fp16 scales, generated on the GPU (speed does not depend on values).

    python3 tools/bench_quant_gpu.py --out tools/results/bench_quant_gpu.json [--formats q4_k int8] [--prefill-rows 2048]

Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.engine_args import bounded_int, output_file  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402

SHAPES = {
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
ROTATE_BYTES = 256 << 20
# byte offsets of the fp16 fields in a block (int8: its row scale, before the blocks)
F16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,), "int4": (0,)}


def random_device_quant(ops, fmt: str, m: int, k: int, seed: int = 0, split: bool | None = None):
    """A DeviceQuant of random packed bytes (never all zeros) whose fp16 fields hold finite scales of about
    1 / (sqrt(k) * qmax) (the k-quants' integer sub-scales in the split layout: 1), so that activations through
    many layers stay in range; made on the GPU in the layout
    an upload would choose under `ops`'s GEMV setting (or the split layout if `split` says so), and prepared as
    an upload would (kernels, shared memory, prefill scratch)."""
    import cupy as cp

    from lserve_lite.backends.cuda_quant import PAD, DeviceQuant, pick_variant
    from lserve_lite.backends.quant_split import SPLIT_FORMATS
    from lserve_lite.weights.qtensor import LAYOUTS

    if split is None:
        split = pick_variant(ops.quant.gemv_variant, fmt, 1) == "split"
    lay = LAYOUTS[fmt]
    rs = cp.random.RandomState(seed)
    qmax = 127 if fmt in ("q8_0", "int8", "q6_k") else 15

    def scales(groups: int):
        s = rs.uniform(0.5, 1.0, size=(m, groups), dtype=cp.float32) / (math.sqrt(k) * qmax)
        return s.astype(cp.float16)

    if split:
        f = SPLIT_FORMATS[fmt]
        q = rs.randint(0, 256, size=m * k * f.bits // 8 + PAD, dtype=cp.uint8)
        d = scales(f.groups(k))
        sub = cp.ones(m * k // 16, cp.int8) if f.sub else None
        dq = DeviceQuant(fmt, (m, k), q, f, d, scales(f.groups(k)) if f.has_min else None, sub)
        ops.quant.prepare(dq)
        return dq
    rb = lay.row_bytes(k)
    data = rs.randint(0, 256, size=m * rb + PAD, dtype=cp.uint8)
    bits = scales(max(1, k // lay.block)).view(cp.uint8).reshape(m, -1, 2)
    rows = data[: m * rb].reshape(m, rb)
    if fmt == "int8":
        rows[:, 0:2] = bits[:, 0]
    else:
        blocks = rows.reshape(m, k // lay.block, lay.block_bytes)
        for off in F16_FIELDS[fmt]:
            blocks[..., off : off + 2] = bits
    dq = DeviceQuant(fmt, (m, k), data)
    ops.quant.prepare(dq)
    return dq


def graph_time(calls: list, reps: int = 20) -> float:
    """Seconds per call: the calls captured once in a CUDA Graph, replayed `reps` times (median)."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for f in calls:  # warm-up outside the capture (module loads, cuBLAS heuristics)
            f()
        stream.synchronize()
        stream.begin_capture()
        try:
            for f in calls:
                f()
        finally:
            graph = stream.end_capture()
        times = []
        for _ in range(reps + 2):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            graph.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return float(np.median(times[2:])) / len(calls)


def copies_for(nbytes: int) -> int:
    return int(min(32, max(2, math.ceil(ROTATE_BYTES / nbytes))))


def copy_bandwidth(bufs: list, nbytes: int) -> float:
    """Bytes/s (read + written) of device-to-device copies of `nbytes` of each buffer in turn."""
    import cupy as cp

    dst = cp.empty(nbytes, cp.uint8)
    copy = [lambda b=b: cp.cuda.runtime.memcpyAsync(dst.data.ptr, b.data.ptr, nbytes, 3,
                                                    cp.cuda.get_current_stream().ptr)
            for b in bufs]  # fmt: skip
    return 2 * nbytes / graph_time(copy)


def bench_shape(
    ops, fmt: str, name: str, m: int, k: int, batches, prefill_rows: int, emit, variants=("v1", "v2", "split"),
    split_r=(None,),
) -> None:  # fmt: skip
    import cupy as cp

    from lserve_lite.backends.cuda_quant import PAD
    from lserve_lite.backends.quant_split import SPLIT_FORMATS

    variants = [v for v in variants if v != "split" or fmt in SPLIT_FORMATS]
    saved = ops.quant.gemv_variant, ops.quant.split_r
    for layout in sorted({v == "split" for v in variants}):
        probe = random_device_quant(ops, fmt, m, k, split=layout)
        copies = copies_for(probe.nbytes)
        ws = [probe] + [random_device_quant(ops, fmt, m, k, seed=i, split=layout) for i in range(1, copies)]
        nbytes = ws[0].nbytes
        copy_bw = copy_bandwidth([w.data for w in ws], int(ws[0].data.nbytes) - PAD)  # the integers' bytes
        for n in batches:
            x = cp.random.standard_normal((n, k), dtype=cp.float32).astype(cp.float16)
            y = cp.empty((n, m), cp.float16)
            for v in (v for v in variants if (v == "split") == layout):
                ops.quant.gemv_variant = "auto" if v == "split" else v
                for r in split_r if v == "split" else (None,):
                    ops.quant.split_r = r
                    t = graph_time([lambda w=w, x=x, y=y: ops.gemm(x, w, cp.float16, out=y) for w in ws])
                    path = f"gemv {v}" + (f" R{r}" if r else "")
                    emit(dict(format=fmt, shape=name, M=m, K=k, batch=n, path=path, us=t * 1e6, packed_bytes=nbytes,
                              GBps=nbytes / t / 1e9, copy_GBps=copy_bw / 1e9, x_copy=nbytes / t / copy_bw))  # fmt: skip
        ops.quant.gemv_variant, ops.quant.split_r = saved
        if prefill_rows:
            x = cp.random.standard_normal((prefill_rows, k), dtype=cp.float32).astype(cp.float16)
            y = cp.empty((prefill_rows, m), cp.float16)
            t = graph_time([lambda w=ws[0], x=x, y=y: ops.gemm(x, w, cp.float16, out=y)], reps=5)
            path = "dequant-split+cublas" if layout else "dequant+cublas"
            emit(dict(format=fmt, shape=name, M=m, K=k, batch=prefill_rows, path=path,
                      us=t * 1e6, packed_bytes=nbytes, TFLOPs=2 * prefill_rows * m * k / t / 1e12))  # fmt: skip
        del ws, probe
        cp.get_default_memory_pool().free_all_blocks()


def bench_fp16(ops, name: str, m: int, k: int, batches, prefill_rows: int, emit) -> None:
    """The same shape with fp16 weights: cuBLAS and our fp16 GEMV (CudaOps.small_gemv)."""
    import cupy as cp

    nbytes = 2 * m * k
    ws = [
        cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
        for _ in range(copies_for(nbytes))
    ]
    for n in batches:
        x = cp.random.standard_normal((n, k), dtype=cp.float32).astype(cp.float16)
        y = cp.empty((n, m), cp.float16)
        for small, path in ((True, "fp16 gemv_rows"), (False, "fp16 cublas")):
            ops.small_gemv = small
            t = graph_time([lambda w=w, x=x, y=y: ops.gemm(x, w, cp.float16, out=y) for w in ws])
            emit(dict(format="f16", shape=name, M=m, K=k, batch=n, path=path, us=t * 1e6, packed_bytes=nbytes,
                      GBps=nbytes / t / 1e9))  # fmt: skip
    ops.small_gemv = True
    if prefill_rows:
        x = cp.random.standard_normal((prefill_rows, k), dtype=cp.float32).astype(cp.float16)
        y = cp.empty((prefill_rows, m), cp.float16)
        t = graph_time([lambda: ops.gemm(x, ws[0], cp.float16, out=y)], reps=5)
        emit(dict(format="f16", shape=name, M=m, K=k, batch=prefill_rows, path="fp16 cublas", us=t * 1e6,
                  packed_bytes=nbytes, TFLOPs=2 * prefill_rows * m * k / t / 1e12))  # fmt: skip


def main(argv=None) -> int:
    from lserve_lite.weights.qtensor import FORMATS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=output_file, default="tools/results/bench_quant_gpu.json")
    ap.add_argument("--formats", nargs="*", choices=FORMATS, default=list(FORMATS), help="none: fp16 only")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--batches", type=bounded_int(1, 4096), nargs="+", default=[1, 8])
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=("v1", "v2", "split"),
        default=["v1", "v2", "split"],
        help="decode GEMV kernels to time (v1 quant_gemv, v2 quant_gemv2, split quant_gemv_split)",
    )
    ap.add_argument(
        "--split-r", type=int, nargs="+", choices=(1, 2, 4), help="rows per warp of the split GEMV to time "
        "(default: the engine's choice for each shape)",
    )  # fmt: skip
    ap.add_argument(
        "--prefill-rows",
        type=bounded_int(0, 1 << 20),
        default=0,
        help="also time the prefill path at this many rows",
    )
    args = ap.parse_args(argv)
    require_gpu("bench_quant_gpu.py")
    import cupy as cp

    from lserve_lite.backends.cuda import CudaOps

    ops = CudaOps()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    rows: list[dict] = []
    result = dict(date=time.strftime("%Y-%m-%d"), device=dev, rows=rows,
                  command=" ".join(["python3 tools/bench_quant_gpu.py", *(argv or sys.argv[1:])]))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{dev}\n{'format':6s} {'shape':8s} {'batch':>5s} {'path':16s} {'us':>9s} {'GB/s':>8s} {'copy GB/s':>9s} "
          f"{'x copy':>6s}")  # fmt: skip

    def emit(r: dict) -> None:
        rows.append(r)
        gb = f"{r['GBps']:8.0f}" if "GBps" in r else f"{r['TFLOPs']:6.0f}TF"
        cb = f"{r['copy_GBps']:9.0f} {r['x_copy']:6.2f}" if "copy_GBps" in r else ""
        print(
            f"{r['format']:6s} {r['shape']:8s} {r['batch']:5d} {r['path']:16s} {r['us']:9.1f} {gb} {cb}",
            flush=True,
        )
        out.write_text(json.dumps(result, indent=1) + "\n")

    for name in args.shapes:
        m, k = SHAPES[name]
        bench_fp16(ops, name, m, k, args.batches, args.prefill_rows, emit)
        for fmt in args.formats:
            bench_shape(ops, fmt, name, m, k, args.batches, args.prefill_rows, emit, args.variants,
                        tuple(args.split_r or (None,)))  # fmt: skip
            cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
