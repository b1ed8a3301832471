"""Benchmark the paged attention kernels against torch SDPA (flash and cuDNN backends), same run, same GPU.

Llama-3-8B head shapes (32 query heads, 8 KV heads, head dim 128), fp16, batch 1 unless stated, page 64:
  prefill (dense causal plan) at 8k, 32k, 128k tokens; 50%-streaming-heads prefill (sink 128, local 4096
  and 8192) at 32k and 128k; decode at 32k, 128k, 256k of context (batch 1 and 8), replayed as CUDA Graphs.
Timing: CUDA events after warm-up, median. Rooflines: 750 TFLOP/s (fp16 tensor cores, cuBLAS) and
4.27 TB/s (device copy). Causal FLOPs = 2 * 2 * Hq * D * S^2 / 2. Decode bytes = K + V read once.

    python3 tools/bench_attention.py --out DIR [--quick] [--kv-dtypes fp16,int8,int4,fp8]
    python3 tools/bench_attention.py --sections chunked --kv-dtypes fp16,int8,int4,fp8 --prefill-kernels mma --no-peers --out DIR

`--prefill-kernels mma,wgmma`: our prefill rows also under each named prefill kernel (cuda_attention.PREFILL_KERNEL:
the mma.sync kernel, and the sm_90a wgmma kernel on compute capability 9.x), rows `ours_<kernel>`; the plain
`ours` row is the default choice ("auto").

`--kv-dtypes`: our kernels also over quantized KV caches (docs/KV_QUANT.md), rows `ours_<dtype>`; their
decode bandwidth counts the bytes actually read (values + fp16 scales). Decode also times the register-level
quantized decode (`cuda_attention.KVQ_DECODE = "v2"`), rows `ours_<dtype>_v2`, with its largest difference
from v1's output on the same inputs (`max_diff_vs_v1`).

`--sections chunked` (not in the default set): chunked prefill over cached context, the engine's prefill chunk
after the first: a 2048-token chunk over 32k and 128k cached tokens of one sequence (shuffled page table, the
chunk's own K/V in the cache), fp16 and each quantized dtype of `--kv-dtypes` under the default prefill kernel
(on compute capability 9.x the wgmma kernel, quantized caches included), and each of them again under each of
`--prefill-kernels` (rows `ours_<kernel>` for fp16, `ours_<dtype>_<kernel>`, e.g. `ours_int8_mma`), with the time
over fp16's (issue target: int8 within 1.1x). At 32k every variant's
output is first spot-checked against the CPU reference (reference/attention.paged_attention_ref, the GPU
tests' reference) on its first and last 64 rows, max error printed.

Prints a table, writes DIR/bench_attention.json and DIR/bench_attention.png (when matplotlib is there).
torch is imported only inside the peer functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.backends.cuda_attention import PREFILL_KERNELS  # noqa: E402
from lserve_lite.engine_args import choice_list, results_folder  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.evaluation.plotting import pyplot  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 64
CHUNK, CHUNK_CACHED = 2048, (32768, 131072)  # the chunked section: a prefill chunk over cached context
# its spot-check: rows at each end; |err| <= CHECK_ATOL max|ref| + CHECK_RTOL |ref| (outputs over tens of
# thousands of random keys are ~0.01, so an absolute tolerance would let a wrong kernel through)
CHECK_ROWS, CHECK_ATOL, CHECK_RTOL = 64, 1e-2, 2e-2
PEAK_TFLOPS, PEAK_TBS = 750.0, 4.27


def events_median(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() (on the current stream), CUDA events around each call."""
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def _reps(est_ms: float) -> int:
    return int(max(3, min(50, 400.0 / max(est_ms, 0.01))))


def _dense_layout(ctx_lens: list[int], q_lens: list[int]) -> tuple:
    """Page tables of randomly permuted pages (a fragmented pool), and the pages they use."""
    from lserve_lite.sparse.plan import BatchLayout

    rng = np.random.default_rng(0)
    need = [-(-c // PAGE) for c in ctx_lens]
    perm = rng.permutation(sum(need))
    tables, o = [], 0
    for n in need:
        tables.append([int(x) for x in perm[o : o + n]])
        o += n
    return BatchLayout(list(q_lens), list(ctx_lens), tables), sum(need)


def _rand(cp, shape, rng_seed):
    g = cp.random.default_rng(rng_seed)
    return g.standard_normal(shape, dtype=np.float32).astype(np.float16)


def _kv_pools(cp, npages: int, kv: str) -> tuple:
    """(k, v, attention kwargs) of a random cache in format `kv` (random_kv_values / random_kv_scales)."""
    from lserve_lite.kv.quant import FORMATS

    if kv == "fp16":
        return _rand(cp, (npages, HKV, PAGE, D), 2), _rand(cp, (npages, HKV, PAGE, D), 3), {}
    fmt = FORMATS[kv]
    g = cp.random.default_rng(4)
    shape = (npages, HKV, PAGE, fmt.packed_dim(D))
    k, v = (random_kv_values(g, shape, kv) for _ in "kv")
    scales = tuple(random_kv_scales(g, (npages, HKV, PAGE, fmt.scale_cols(D))) for _ in range(2))
    return k, v, {"scales": scales, "kv": kv}


def random_kv_values(g, shape: tuple, kv: str):
    """Stored K or V values of format `kv` from CuPy generator `g`: fp16 normals, or random quantized bytes
    (fp8: finite codes only)."""
    from lserve_lite.kv.quant import FORMATS

    if kv == "fp16":
        return g.standard_normal(shape, dtype=np.float32).astype(np.float16)
    vals = g.integers(0, 256, shape, dtype=np.int32).astype(np.uint8)
    if kv == "fp8":
        vals &= 0xFE  # codes 0x7f / 0xff (NaN) never occur
    return vals.view(FORMATS[kv].value_dtype)


def random_kv_scales(g, shape: tuple):
    """fp16 scales around 0.01 (int4: its mins drawn the same way): dequantized values of magnitude ~1."""
    return (0.005 + 0.01 * g.random(shape, dtype=np.float32)).astype(np.float16)


def _kv_bytes(tokens: int, kv: str) -> float:
    """K + V bytes of `tokens` tokens of all KV heads in format `kv`, scales included."""
    from lserve_lite.kv.quant import FORMATS

    return float(tokens * HKV * FORMATS[kv].kv_bytes(D, 2))


# ------------------------------------------------------------------------------------------------ ours


def ours_prefill(
    seq: int,
    q_block: int = 64,
    streaming_local: int = 0,
    sink: int = 128,
    kv: str = "fp16",
    kernel: str | None = None,
) -> dict:
    """`kernel`: cuda_attention.PREFILL_KERNEL for this row ("mma" / "wgmma"; None: leave it as it is)."""
    with prefill_kernel(kernel):
        return _ours_prefill(seq, q_block, streaming_local, sink, kv)


def _ours_prefill(seq: int, q_block: int, streaming_local: int, sink: int, kv: str) -> dict:
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention
    from lserve_lite.sparse.plan import build_plan

    layout, npages = _dense_layout([seq], [seq])
    t0 = time.perf_counter()
    plan = build_plan(layout, PAGE, q_block, sink if streaming_local else 0, streaming_local)
    plan_s = time.perf_counter() - t0
    cplan = CudaPlan.from_plan(plan)
    q = _rand(cp, (seq, HQ, D), 1)
    k, v, quant = _kv_pools(cp, npages, kv)
    hc = cp.asarray(np.array([0, 1] * (HKV // 2) if streaming_local else [0] * HKV, np.int32))
    out = cp.empty((seq, HQ * D), np.float16)
    fn = lambda: paged_attention(q, k, v, cplan, hc, out=out, **quant)  # noqa: E731
    t1 = events_median(fn, 1, 1)
    ms = events_median(fn, 1, _reps(t1))
    flops = 4.0 * HQ * D * seq * seq / 2
    res = {
        "ms": ms,
        "tflops": flops / ms / 1e9,
        "plan_build_s": plan_s,
        "pages_listed": int(plan.kv_page.size),
    }
    return res


def prefill_kernel(kernel: str | None):
    """cuda_attention.PREFILL_KERNEL set to `kernel` ("mma" / "wgmma") inside the block; None leaves it."""
    from lserve_lite.backends import cuda_attention
    from lserve_lite.harness.common import setting

    return setting(cuda_attention, "PREFILL_KERNEL", kernel)


def ours_chunked(cached: int, kv: str = "fp16", kernel: str | None = None, check: bool = False) -> dict:
    """One CHUNK-token prefill chunk of a sequence over its `cached` earlier tokens, as the engine runs chunked
    prefill: one plan over the sequence's shuffled pages (the chunk's own K/V among them) through
    paged_attention, CudaOps.attention's call on a dense-mode cache. `kernel` as in ours_prefill; `check`: the
    output against the CPU reference first."""
    with prefill_kernel(kernel):
        return _ours_chunked(cached, kv, check)


def _ours_chunked(cached: int, kv: str, check: bool) -> dict:
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention, prefill_kernel_for
    from lserve_lite.sparse.plan import build_plan

    layout, npages = _dense_layout([cached + CHUNK], [CHUNK])
    plan = CudaPlan.from_plan(build_plan(layout, PAGE))
    q = _rand(cp, (CHUNK, HQ, D), 1)
    k, v, quant = _kv_pools(cp, npages, kv)
    hc = cp.asarray(np.zeros(HKV, np.int32))
    out = cp.empty((CHUNK, HQ * D), np.float16)
    fn = lambda: paged_attention(q, k, v, plan, hc, out=out, **quant)  # noqa: E731
    res = {"kv": kv, "kernel": prefill_kernel_for(D, kv, cp.cuda.Device().compute_capability)}
    if check:
        fn()
        host = cp.asnumpy
        scales = tuple(host(a) for a in quant.get("scales", ()))
        res["check"] = check_chunked(host(q), host(k), host(v), scales, kv, layout, host(out))
    t1 = events_median(fn, 1, 1)
    ms = events_median(fn, 1, _reps(t1))
    pairs = CHUNK * cached + CHUNK * (CHUNK + 1) / 2  # (query, key) pairs under the causal mask
    res.update(ms=ms, tflops=4.0 * HQ * D * pairs / ms / 1e9)
    return res


def check_chunked(q, k, v, scales: tuple, kv: str, layout, out) -> dict:
    """The first and last CHECK_ROWS rows of a chunk's output `out` against paged_attention_ref over the same
    values (host arrays; `scales`: a quantized cache's K and V scales); the rows' own plan is two query blocks
    over the sequence's page table, ending where those rows end."""
    from lserve_lite.backends.reference.attention import paged_attention_ref
    from lserve_lite.harness.common import compare
    from lserve_lite.kv.quant import FORMATS
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    n, ctx, table = layout.q_lens[0], layout.ctx_lens[0], layout.page_tables[0]
    rows = np.r_[0:CHECK_ROWS, n - CHECK_ROWS : n]
    sub = BatchLayout([CHECK_ROWS] * 2, [ctx - n + CHECK_ROWS, ctx], [table, table])
    fmt = FORMATS[kv] if scales else None
    hc = np.zeros(k.shape[1], np.int32)
    ref = paged_attention_ref(
        q[rows].astype(np.float32), k, v, build_plan(sub, k.shape[2]), hc, *scales, fmt=fmt
    )
    r = compare(
        "chunked", f"{len(rows)} rows", out[rows], ref, CHECK_ATOL * float(np.abs(ref).max()), CHECK_RTOL
    )
    return {"rows": len(rows), "max_abs_err": r.max_abs, "rel_err": r.rel, "ok": r.ok}


def ours_decode(ctx: int, batch: int = 1, kv: str = "fp16", impl: str = "v1") -> dict:
    """Decode over `batch` sequences of `ctx` tokens; `impl`: the quantized decode (cuda_attention.KVQ_DECODE)."""
    from lserve_lite.backends import cuda_attention as ca

    old_impl, ca.KVQ_DECODE = ca.KVQ_DECODE, impl
    try:
        return _ours_decode(ctx, batch, kv, impl)
    finally:
        ca.KVQ_DECODE = old_impl


def _ours_decode(ctx: int, batch: int, kv: str, impl: str) -> dict:
    import cupy as cp

    from lserve_lite.backends import cuda_attention as ca
    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention
    from lserve_lite.sparse.plan import build_plan

    layout, npages = _dense_layout([ctx] * batch, [1] * batch)
    plan = build_plan(layout, PAGE, 64)
    cplan = CudaPlan.from_plan(plan)
    q = _rand(cp, (batch, HQ, D), 1)
    k, v, quant = _kv_pools(cp, npages, kv)
    hc = cp.asarray(np.zeros(HKV, np.int32))
    out = cp.empty((batch, HQ * D), np.float16)
    cp.cuda.Device().synchronize()  # inputs were made on the null stream; the graph runs on another
    stream = cp.cuda.Stream(non_blocking=True)
    per_graph = 10
    step = lambda: paged_attention(q, k, v, cplan, hc, out=out, decode=True, **quant)  # noqa: E731
    with stream:
        step()
        eager_ms = events_median(step, 3, 20)
        stream.begin_capture()
        for _ in range(per_graph):
            step()
        graph = stream.end_capture()
        ms = events_median(lambda: graph.launch(stream), 2, 20) / per_graph
        stream.synchronize()
        res = {
            "ms": ms,
            "eager_us": eager_ms * 1e3,
            "tbs": _kv_bytes(batch * ctx, kv) / ms / 1e9,
            "us": ms * 1e3,
        }
        if impl != "v1" and kv != "fp16":  # the same inputs through v1: the outputs must agree
            got = out.astype(np.float32)
            ca.KVQ_DECODE = "v1"
            want = paged_attention(q, k, v, cplan, hc, decode=True, **quant).astype(np.float32)
            stream.synchronize()
            res["max_diff_vs_v1"] = float(cp.abs(got - want).max())
            res["max_abs_v1"] = float(cp.abs(want).max())
    return res


def check_vs_torch(seq: int = 4096) -> dict:
    """Our dense causal prefill and decode against torch SDPA (fp16) on the same random inputs."""
    import cupy as cp
    import torch
    import torch.nn.functional as F

    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention
    from lserve_lite.sparse.plan import build_plan

    layout, npages = _dense_layout([seq], [seq])
    plan = build_plan(layout, PAGE, 64)
    q = _rand(cp, (seq, HQ, D), 11)
    kd = _rand(cp, (seq, HKV, D), 12)
    vd = _rand(cp, (seq, HKV, D), 13)
    table = cp.asarray(np.asarray(layout.page_tables[0], np.int64))
    k = cp.empty((npages, HKV, PAGE, D), np.float16)
    v = cp.empty_like(k)
    k[table] = kd.reshape(npages, PAGE, HKV, D).transpose(0, 2, 1, 3)
    v[table] = vd.reshape(npages, PAGE, HKV, D).transpose(0, 2, 1, 3)
    out = paged_attention(q, k, v, CudaPlan.from_plan(plan), cp.zeros(HKV, np.int32))
    tq = torch.as_tensor(q, device="cuda").transpose(0, 1)[None]
    tk = torch.as_tensor(kd, device="cuda").transpose(0, 1)[None].repeat_interleave(HQ // HKV, dim=1)
    tv = torch.as_tensor(vd, device="cuda").transpose(0, 1)[None].repeat_interleave(HQ // HKV, dim=1)
    ref = F.scaled_dot_product_attention(tq.float(), tk.float(), tv.float(), is_causal=True)
    ref = ref[0].transpose(0, 1).reshape(seq, HQ * D)
    ours = torch.as_tensor(out, device="cuda").float()
    err = (ours - ref).abs().max().item()
    rel = ((ours - ref).norm() / ref.norm()).item()
    return {"seq": seq, "max_abs_err_vs_torch_fp32": err, "rel_err": rel}


# ------------------------------------------------------------------------------------------------ peers


def torch_prefill(seq: int, backend: str) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, seq, D, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(1, HKV, seq, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(1, HKV, seq, D, device="cuda", dtype=torch.float16, generator=g)
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    with sdpa_kernel(be):
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        ms = _torch_median(fn)
    flops = 4.0 * HQ * D * seq * seq / 2
    return {"ms": ms, "tflops": flops / ms / 1e9}


def torch_decode(ctx: int, backend: str, batch: int = 1) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.float16, generator=g)
    note = "enable_gqa"
    with sdpa_kernel(be):
        try:
            fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            fn()
        except RuntimeError:
            ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
            fn = lambda: F.scaled_dot_product_attention(q, ke, ve)  # noqa: E731
            note = "kv expanded"
        ms = _torch_median(fn)
    kv_bytes = 2.0 * batch * ctx * HKV * D * 2
    return {"ms": ms, "us": ms * 1e3, "tbs": kv_bytes / ms / 1e9, "note": note}


def _torch_median(fn) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    est = a.elapsed_time(b)
    times = []
    for _ in range(_reps(est)):
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def _peer(fn, *args, **kw) -> dict:
    try:
        return fn(*args, **kw)
    except Exception as e:  # a backend missing on this build must not stop the run
        return {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    finally:
        _free_memory()


def _free_memory() -> None:
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ main


SECTIONS = ("prefill", "streaming", "decode", "chunked")
GPU_KV = ("fp16", "int8", "int4", "fp8")  # the KV formats of the CUDA kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/results", type=results_folder, help="folder for the results")
    ap.add_argument("--quick", action="store_true", help="8k/32k prefill and 32k/128k decode only")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also time the compiled kernel variants")
    ap.add_argument("--sections", type=choice_list(SECTIONS), default="prefill,streaming,decode",
                    help="comma-separated subset of prefill,streaming,decode,chunked to run")  # fmt: skip
    ap.add_argument("--kv-dtypes", type=choice_list(GPU_KV), default="fp16",
                    help="KV formats of our kernels, e.g. fp16,int8,int4,fp8")  # fmt: skip
    ap.add_argument("--prefill-kernels", type=choice_list(PREFILL_KERNELS[1:]), default=[],
                    help="also time these prefill kernels, e.g. mma,wgmma")  # fmt: skip
    args = ap.parse_args(argv)
    require_gpu("bench_attention.py")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import cupy as cp

    dev = cp.cuda.runtime.getDeviceProperties(0)
    prefill_seqs = [8192, 32768] if args.quick else [8192, 32768, 131072]
    decode_ctx = [32768, 131072] if args.quick else [32768, 131072, 262144]
    quant_kvs = [kv for kv in args.kv_dtypes if kv != "fp16"]
    prefill_kernels = args.prefill_kernels
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": dev["name"].decode() if isinstance(dev["name"], bytes) else str(dev["name"]),
        "shapes": {"hq": HQ, "hkv": HKV, "head_dim": D, "page_size": PAGE, "dtype": "fp16"},
        "roofline": {"tflops": PEAK_TFLOPS, "tbs": PEAK_TBS},
        "prefill": [],
        "streaming_prefill": [],
        "decode": [],
        "chunked": [],
    }
    if not args.no_peers:
        res["check_vs_torch"] = _peer(check_vs_torch)
        print("check vs torch:", res["check_vs_torch"], flush=True)
    sections = set(args.sections)
    for s in prefill_seqs if "prefill" in sections else []:
        row = {"seq": s, "ours": _peer(ours_prefill, s)}
        row.update({f"ours_{kv}": _peer(ours_prefill, s, kv=kv) for kv in quant_kvs})
        row.update({f"ours_{pk}": _peer(ours_prefill, s, kernel=pk) for pk in prefill_kernels})
        if s == 32768:
            row["ours_qblock128"] = _peer(ours_prefill, s, q_block=128)
        if not args.no_peers:
            row["sdpa_flash"] = _peer(torch_prefill, s, "flash")
            row["sdpa_cudnn"] = _peer(torch_prefill, s, "cudnn")
        row["roofline_ms"] = 4.0 * HQ * D * s * s / 2 / PEAK_TFLOPS / 1e9
        res["prefill"].append(row)
        print("prefill", row, flush=True)
    for s in [x for x in prefill_seqs if x >= 32768 and "streaming" in sections]:
        for local in (4096, 8192):
            row = {
                "seq": s,
                "sink": 128,
                "local": local,
                "ours": _peer(ours_prefill, s, streaming_local=local),
            }
            res["streaming_prefill"].append(row)
            print("streaming prefill", row, flush=True)
    for c in CHUNK_CACHED if "chunked" in sections else ():
        check = c == CHUNK_CACHED[0]
        row = {"cached": c, "chunk": CHUNK, "ours": _peer(ours_chunked, c, check=check)}
        row.update({f"ours_{kv}": _peer(ours_chunked, c, kv, check=check) for kv in quant_kvs})
        row.update({f"ours_{pk}": _peer(ours_chunked, c, kernel=pk, check=check) for pk in prefill_kernels})
        for kv in quant_kvs:
            row.update({f"ours_{kv}_{pk}": _peer(ours_chunked, c, kv, pk, check) for pk in prefill_kernels})
        res["chunked"].append(with_fp16_ratios(row))
        print("chunked prefill", row, flush=True)
    for batch in (1, 8) if "decode" in sections else ():
        for c in decode_ctx:
            if batch == 8 and c > 131072:
                continue
            row = {"ctx": c, "batch": batch, "ours": _peer(ours_decode, c, batch)}
            row.update({f"ours_{kv}": _peer(ours_decode, c, batch, kv) for kv in quant_kvs})
            row.update({f"ours_{kv}_v2": _peer(ours_decode, c, batch, kv, "v2") for kv in quant_kvs})
            if not args.no_peers:
                row["sdpa_flash"] = _peer(torch_decode, c, "flash", batch)
                row["sdpa_cudnn"] = _peer(torch_decode, c, "cudnn", batch)
            row["roofline_us"] = 2.0 * batch * c * HKV * D * 2 / PEAK_TBS / 1e6
            res["decode"].append(row)
            print("decode", row, flush=True)

    if args.variants:
        res["variants"] = run_variants()
        print("variants", res["variants"], flush=True)
    (out_dir / "bench_attention.json").write_text(json.dumps(res, indent=1))
    table = format_table(res)
    (out_dir / "bench_attention.md").write_text(table + "\n")
    try:
        _plot(res, out_dir / "bench_attention.png")
    except Exception as e:  # the JSON and table are written already; a figure must not fail the run
        print(f"plot skipped: {type(e).__name__}: {e}", flush=True)
    print(table)
    return 0


def run_variants() -> dict:
    """Prefill key tile 32 vs 64 (32k, dense, the mma.sync kernel), the wgmma prefill's ring depth 2 vs 3 (32k,
    on 9.x) and decode ring depth 2/3/4 (128k, batch 1)."""
    import cupy as cp

    from lserve_lite.backends import cuda_attention as ca

    out: dict = {}
    default_bn, default_stages = ca.PREFILL_BN[(128, 2)], ca.DECODE_STAGES[128]
    for bn in (32, 64):
        ca.PREFILL_BN[(128, 2)] = bn
        out[f"prefill_32k_bn{bn}"] = _peer(ours_prefill, 32768, kernel="mma")
    ca.PREFILL_BN[(128, 2)] = default_bn
    if cp.cuda.Device().compute_capability.startswith("9"):
        default_sm90 = ca.PREFILL_SM90_STAGES[(128, 2, "fp16")]
        for st in (2, 3):  # both instantiated in attention_prefill_sm90.cu
            ca.PREFILL_SM90_STAGES[(128, 2, "fp16")] = st
            out[f"prefill_32k_wgmma_stages{st}"] = _peer(ours_prefill, 32768, kernel="wgmma")
        ca.PREFILL_SM90_STAGES[(128, 2, "fp16")] = default_sm90
    for st in (2, 3, 4):
        ca.DECODE_STAGES[128] = st
        out[f"decode_128k_stages{st}"] = _peer(ours_decode, 131072)
        out[f"decode_32k_x8_stages{st}"] = _peer(ours_decode, 32768, 8)
    ca.DECODE_STAGES[128] = default_stages
    return out


def with_fp16_ratios(row: dict) -> dict:
    """`row` with each variant's time over fp16's, the engine's default kernel (`x_fp16`) and, when it ran, fp16's
    on the mma.sync kernel (`x_fp16_mma`)."""
    base = {k: row[k].get("ms") for k in ("ours", "ours_mma") if isinstance(row.get(k), dict)}
    for key, o in row.items():
        for ref, name in (("ours", "x_fp16"), ("ours_mma", "x_fp16_mma")):
            if key.startswith("ours_") and key != ref and "ms" in o and base.get(ref):
                o[name] = o["ms"] / base[ref]
    return row


def format_chunked(rows: list[dict]) -> list[str]:
    """Table lines of the chunked section: per cached context, each KV dtype's time and ratios to fp16."""
    lines = [
        "",
        "| chunked prefill | KV | kernel | ms | TFLOP/s | x fp16 | x fp16 mma | spot-check max err (rel) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key in [k for k in r if k.startswith("ours")]:
            o = r[key]
            x = [f"{o[name]:.3f}" if name in o else "-" for name in ("x_fp16", "x_fp16_mma")]
            lines.append(
                f"| {r['chunk']} new over {r['cached'] // 1024}k | {o.get('kv', key)} | {o.get('kernel', 'n/a')} | "
                f"{_fmt(o, 'ms')} | {_fmt(o, 'tflops')} | {x[0]} | {x[1]} | {_check_cell(o.get('check'))} |"
            )
    return lines


def _check_cell(ck: dict | None) -> str:
    return "" if not ck else f"{ck['max_abs_err']:.3g} ({ck['rel_err']:.2g}){'' if ck['ok'] else ' FAIL'}"


def _fmt(d: dict, key: str, unit: str = "") -> str:
    if not d:
        return "-"
    if "error" in d:
        return "n/a"
    return f"{d[key]:.3g}{unit}"


def format_table(res: dict) -> str:
    lines = [
        f"{res['device']}, {res['date']}; Llama-3-8B heads 32/8/128 fp16, page 64, batch 1 unless noted",
        "",
        "| prefill (causal) | ours ms | ours TFLOP/s | SDPA flash ms | SDPA cuDNN ms | roofline ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["prefill"]:
        lines.append(
            f"| {r['seq'] // 1024}k | {_fmt(r['ours'], 'ms')} | {_fmt(r['ours'], 'tflops')} | "
            f"{_fmt(r.get('sdpa_flash'), 'ms')} ({_fmt(r.get('sdpa_flash'), 'tflops')} TF/s) | "
            f"{_fmt(r.get('sdpa_cudnn'), 'ms')} ({_fmt(r.get('sdpa_cudnn'), 'tflops')} TF/s) | "
            f"{r['roofline_ms']:.3g} |"
        )
        if "ours_qblock128" in r:
            lines.append(
                f"| {r['seq'] // 1024}k, q_block 128 | {_fmt(r['ours_qblock128'], 'ms')} | "
                f"{_fmt(r['ours_qblock128'], 'tflops')} | | | |"
            )
    if res["streaming_prefill"]:
        lines += [
            "",
            "| prefill, half heads streaming | ours ms | dense-equivalent TFLOP/s |",
            "|---|---|---|",
        ]
        for r in res["streaming_prefill"]:
            lines.append(
                f"| {r['seq'] // 1024}k sink {r['sink']} local {r['local']} | {_fmt(r['ours'], 'ms')} | "
                f"{_fmt(r['ours'], 'tflops')} |"
            )
    lines += [
        "",
        "| decode | ours us (graph) | ours TB/s | ours eager us | SDPA flash us | SDPA cuDNN us | "
        "roofline us |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["decode"]:
        o = r["ours"]
        lines.append(
            f"| {r['ctx'] // 1024}k x{r['batch']} | {_fmt(o, 'us')} | {_fmt(o, 'tbs')} | "
            f"{_fmt(o, 'eager_us')} | {_fmt(r.get('sdpa_flash'), 'us')} | "
            f"{_fmt(r.get('sdpa_cudnn'), 'us')} | {r['roofline_us']:.4g} |"
        )
    if res.get("chunked"):
        lines += format_chunked(res["chunked"])
    quant = sorted({k for r in res["decode"] for k in r if k.startswith("ours_")}, key=_kv_order)
    if quant:
        lines += [
            "",
            "| decode, quantized KV | ours us (graph) | bytes-read TB/s | x fp16 time | max diff vs v1 (max abs) |",
            "|---|---|---|---|---|",
        ]
        for r in res["decode"]:
            base = r["ours"].get("us") if r["ours"] and "error" not in r["ours"] else None
            for key in quant:
                o = r.get(key) or {}
                ratio = f"{o['us'] / base:.3f}" if base and "us" in o else "-"
                diff = f"{o['max_diff_vs_v1']:.3g} ({o['max_abs_v1']:.3g})" if "max_diff_vs_v1" in o else ""
                lines.append(
                    f"| {r['ctx'] // 1024}k x{r['batch']} {key[5:]} | {_fmt(o, 'us')} | {_fmt(o, 'tbs')} | "
                    f"{ratio} | {diff} |"
                )
    return "\n".join(lines)


def _kv_order(key: str) -> tuple:
    kv, _, impl = key[5:].partition("_")
    return (impl, ("int8", "int4", "fp8").index(kv) if kv in ("int8", "int4", "fp8") else 9, kv)


def _plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    # Only the sections that ran: an empty panel with log axes makes matplotlib raise.
    panels = [name for name in ("prefill", "decode") if res.get(name)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    ax = dict(zip(panels, axes[0], strict=True))
    if "prefill" in ax:
        a1 = ax["prefill"]
        seqs = [r["seq"] for r in res["prefill"]]
        for key, label in (
            ("ours", "lserve-lite"),
            ("sdpa_flash", "SDPA flash"),
            ("sdpa_cudnn", "SDPA cuDNN"),
        ):
            ys = [(r.get(key) or {}).get("tflops", np.nan) for r in res["prefill"]]
            a1.plot(seqs, ys, "o-", label=label)
        a1.axhline(PEAK_TFLOPS, ls="--", c="gray", label="fp16 roofline")
        a1.set(xscale="log", xlabel="tokens", ylabel="TFLOP/s", title="causal prefill")
        a1.legend()
    if "decode" not in ax:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    a2 = ax["decode"]
    for b in (1, 8):
        rows = [r for r in res["decode"] if r["batch"] == b]
        if rows:
            a2.plot(
                [r["ctx"] for r in rows],
                [(r["ours"] or {}).get("tbs", np.nan) for r in rows],
                "o-",
                label=f"lserve-lite x{b}",
            )
            a2.plot(
                [r["ctx"] for r in rows],
                [(r.get("sdpa_flash") or {}).get("tbs", np.nan) for r in rows],
                "s--",
                label=f"SDPA flash x{b}",
            )
    a2.axhline(PEAK_TBS, ls="--", c="gray", label="copy roofline")
    a2.set(xscale="log", xlabel="context", ylabel="TB/s", title="decode")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
