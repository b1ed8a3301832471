"""Harness rows of the quantized KV cache (`--kv-dtype` int8 / int4 / fp8; kernels/kv_quant.cuh inside
layers.cu and attention_*.cu), one per KV dtype the GPU offers (the others: a SKIP row), against the references of kv/quant.py and
backends/reference/: attention over the same quantized values (both pools, chunked prefill over cached pages,
selected pages), and the K/V write (values within half a quantization step of the float K/V, the selector
statistics of the unquantized keys). Decode rows run once per quantized-decode implementation
(`cuda_attention.KVQ_DECODE`: v1 shared-memory dequantization, v2 register-level), tagged with it; prefill rows
under the default prefill kernel choice and, where that is the wgmma kernel (compute capability 9.x), again under
the mma.sync kernel (`cuda_attention.PREFILL_KERNEL = "mma"`), tagged with the kernel that ran."""

from __future__ import annotations

import numpy as np

from ..backends.base import KVCache
from ..backends.reference.attention import paged_attention_ref, paged_attention_sparse_ref
from ..backends.reference.page_select import select_pages_ref
from ..kv.quant import FORMATS, KVFormat, quantize
from ..sparse.plan import BatchLayout, build_plan
from .attention import SPARSE_PREFILL, decode_setup
from .common import Ctx, Result, compare, setting, skipped
from .kv_write import DENSE_WRITES, SPARSE_DIMS, check_write, dense_case, sparse_case
from .sparse_batch import sparse_batch, sparse_cache

QUANT_KV = ("int8", "int4", "fp8")
DECODE_IMPLS = ("v1", "v2")  # cuda_attention.KVQ_DECODE_IMPLS


def kvq_decode(impl: str | None):
    """Run the quantized decode attention through implementation `impl` (None: leave cuda_attention.KVQ_DECODE)."""
    from ..backends import cuda_attention as CA

    return setting(CA, "KVQ_DECODE", impl)


def prefill_kernel(kernel: str | None):
    """Run prefill attention through `kernel` ("mma" / "wgmma"; None: leave cuda_attention.PREFILL_KERNEL)."""
    from ..backends import cuda_attention as CA

    return setting(CA, "PREFILL_KERNEL", kernel)


def prefill_kernels(c: Ctx) -> list[str | None]:
    """The prefill kernel settings to run the prefill rows under: the default (None), and "mma" too where the
    default picks the wgmma kernel for quantized caches (compute capability 9.x)."""
    from ..backends import cuda_attention as CA

    cc = c.cp.cuda.Device().compute_capability
    return [None] if CA.prefill_kernel_for(128, "int8", cc) == "mma" else [None, "mma"]


def _kernel_tag(c: Ctx, d: int, kv: str) -> str:
    """The prefill kernel the current setting runs for head dim d and format kv."""
    from ..backends import cuda_attention as CA

    return CA.prefill_kernel_for(d, kv, c.cp.cuda.Device().compute_capability)


def is_decode(name: str) -> bool:
    """Whether KV_ATTENTION[name] is a decode row (every query block one token)."""
    return all(n == 1 for n in KV_ATTENTION[name][4])


KV_ATTENTION = {
    # name: (Hq, Hkv, D, page, q_lens, ctx_lens, streaming heads, sink, local)
    "decode_d64": (9, 3, 64, 64, [1, 1, 1], [1, 700, 3000], 0, 0, 0),
    "decode_d128_p16": (32, 8, 128, 16, [1, 1], [4096, 33], 0, 0, 0),
    "chunked_prefill_d128": (32, 8, 128, 64, [129, 1], [2000, 77], 0, 0, 0),
    "prefill_stream_d64": (9, 3, 64, 32, [70, 5], [1000, 5], 2, 64, 256),
    # one 64-row warpgroup per CTA (q_len * group < 128), 16-token pages / streaming heads
    "chunked_prefill_d128_p16_1wg": (8, 8, 128, 16, [40, 3], [900, 3], 0, 0, 0),
    "prefill_stream_d64_1wg": (4, 4, 64, 64, [61, 2], [1500, 2], 2, 64, 256),
}


def kv_formats(c: Ctx) -> list[str]:
    """The quantized KV dtypes this GPU runs (fp8: sm_89 and newer)."""
    return [k for k in QUANT_KV if k in c.ops.kv_dtypes]


def _garbage(c: Ctx, shape, dtype):
    """Poisoned quantized values (random bytes) or scales (NaN), for outputs a kernel must overwrite."""
    if np.dtype(dtype).kind == "f":
        return c.poison(shape, dtype)
    return c.cp.asarray(c.rng.integers(0, 256, shape, dtype=np.uint8).view(dtype))


def _quantized(c: Ctx, x: np.ndarray, fmt: KVFormat) -> tuple[np.ndarray, np.ndarray, object, object]:
    """Host (values, fp16 scales) of x by the reference rule, and their device copies."""
    vals, sc = quantize(x, fmt, np.float16)
    return vals, sc, c.cp.asarray(vals), c.cp.asarray(sc)


def kv_attention_one(
    c: Ctx, name: str, kv: str, impl: str | None = None, prefill: str | None = None
) -> Result:
    """CudaOps.attention over a quantized dense-mode cache vs paged_attention_ref on the same values
    (`impl`: the quantized decode implementation, decode rows; `prefill`: the prefill kernel, prefill rows)."""
    hq, hkv, d, page, q_lens, ctx_lens, n_stream, sink, local = KV_ATTENTION[name]
    fmt = FORMATS[kv]
    need = [-(-t // page) for t in ctx_lens]
    num_pages = sum(need) + 3
    perm = list(c.rng.permutation(num_pages))
    tables = [[int(perm.pop()) for _ in range(k)] for k in need]
    kq, ks, kq_d, ks_d = _quantized(c, c.f16(num_pages, hkv, page, d), fmt)
    vq, vs, vq_d, vs_d = _quantized(c, c.f16(num_pages, hkv, page, d), fmt)
    q = c.f16(sum(q_lens), hq, d)
    hc = np.zeros(hkv, np.int32)
    hc[c.rng.permutation(hkv)[:n_stream]] = 1
    plan = build_plan(BatchLayout(list(q_lens), list(ctx_lens), tables), page, sink=sink, local=local)
    ref = paged_attention_ref(q, kq, vq, plan, hc, ks, vs, fmt)
    cache = KVCache([kq_d], [vq_d], page, num_pages, fmt=fmt, k_scale=[ks_d], v_scale=[vs_d])
    got = c.poison((sum(q_lens), hq * d), np.float16)
    kind = "decode" if all(n == 1 for n in q_lens) else "prefill"
    with kvq_decode(impl), prefill_kernel(prefill):
        o = c.ops.attention(c.dev16(q), cache, 0, c.ops.prepare_plan(plan), c.cp.asarray(hc), out=got)
        ran = _kernel_tag(c, d, kv) if kind == "prefill" else impl  # the tag: decode impl or prefill kernel
    tag = f"{kv} {name}" + (f" {ran}" if ran else "")
    return compare(f"kv_quant.attention.{kind}", tag, o.get(), ref, 4e-3, 2e-2)


def kv_sparse_one(c: Ctx, stage: str, kv: str, impl: str | None = None, prefill: str | None = None) -> Result:
    """LServe's two quantized pools: prefill (SPARSE_PREFILL mixed_two_seqs) or decode with fresh page
    selections from the unquantized keys' statistics (SPARSE_DECODE mixed_select) vs
    paged_attention_sparse_ref on the same values (`prefill`: the prefill kernel of the prefill stage)."""
    fmt, sel = FORMATS[kv], {}
    if stage == "prefill":
        q_lens, prefix, hq, pattern, d, ps, windows = SPARSE_PREFILL["mixed_two_seqs"]
        ctx = [a + b for a, b in zip(q_lens, prefix, strict=True)]
        b = sparse_batch(c, q_lens, ctx, hq, pattern, d, ps, windows)
    else:
        b, kmax, kmin, cap = decode_setup(c, "mixed_select")
        idx = np.full((b.num_slots, b.hc.size, cap), -1, np.int32)
        cnt = np.full((b.num_slots, b.hc.size), -1, np.int32)
        select_pages_ref(b.q, kmax, kmin, b.plan, b.hc, b.slot, idx, cnt)
        sel = dict(sel_idx=idx, sel_cnt=cnt)
    pools = [_quantized(c, a, f) for a, f in zip((b.kd, b.vd, b.ks, b.vs), (fmt,) * 4, strict=True)]
    ref = paged_attention_sparse_ref(
        b.q, *(p[0] for p in pools), b.plan, b.hc, b.slot, sel.get("sel_idx"), sel.get("sel_cnt"),
        scales=tuple(p[1] for p in pools), fmt=fmt,
    )  # fmt: skip
    cache = sparse_cache(c, b, **sel)
    cache.k, cache.v, cache.ks, cache.vs = ([p[2]] for p in pools)
    cache.k_scale, cache.v_scale, cache.ks_scale, cache.vs_scale = ([p[3]] for p in pools)
    cache.fmt = fmt
    n, hq, d = b.q.shape
    got = c.poison((n, hq * d), np.float16)
    with kvq_decode(impl), prefill_kernel(prefill):
        o = c.ops.attention(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan), cache.head_class[0], out=got)
        ran = _kernel_tag(c, d, kv) if stage == "prefill" else impl
    tag = f"{kv} two pools" + (f" {ran}" if ran else "")
    return compare(f"kv_quant.sparse_{stage}", tag, o.get(), ref, 4e-3, 2e-2)


def kv_write_one(c: Ctx, kv: str) -> list[Result]:
    """CudaOps.rope_write_kv into a quantized dense-mode cache (padding rows included; NaN rows once) vs rope_write_kv_ref
    (harness/kv_write.py: q within fp16 rounding, K/V within the step bound, scales as the reference rule; the
    float references in the format's basis: int4's and fp8's queries and keys Hadamard-rotated, kv/quant.rotates_keys)."""
    fmt, out = FORMATS[kv], []
    for dims, nan in [(dims, False) for dims in DENSE_WRITES] + [(DENSE_WRITES[0], True)]:
        case = dense_case(c, kv, *dims, nan=nan)
        dev = [_garbage(c, (*p.shape, fmt.packed_dim(case.d)), p.fmt.value_dtype) for p in case.pools]
        sc = [c.poison((*p.shape, p.fmt.scale_cols(case.d)), np.float16) for p in case.pools]
        cache = KVCache(
            dev[:1], dev[1:], case.page, case.pools[0].shape[0], fmt=fmt, k_scale=sc[:1], v_scale=sc[1:]
        )
        q = c.poison((case.pos.size, case.hq, case.d), np.float16)
        rope = (c.dev16(case.cos), c.dev16(case.sin))
        c.ops.rope_write_kv(c.dev16(case.qkv), c.cp.asarray(case.pos), c.cp.asarray(case.slots), cache, 0, rope,
                            out=q)  # fmt: skip
        out += check_write(
            case, "kv_quant.write", q.get(), [(v.get(), s.get()) for v, s in zip(dev, sc, strict=True)]
        )
    return out


def kv_write_fused_one(c: Ctx, kv: str) -> list[Result]:
    """CudaOps.qkv_rope at one row with the quantized write in the q/k/v GEMV's epilogue (rope_out.cuh; forced on,
    as LSERVE_CUDA_FUSE_ROPE_QUANT=1 does), fp16 and Q4_1 (split GEMV) weights, dense-mode cache: the rows the plain
    GEMV computes (rmsnorm_linear, the same sums: tests/test_gpu_qkv_rope.py checks them bit for bit) through
    rope_write_kv_ref, checked as kv_write_one's (harness/kv_write.check_write). LServe's pools: in that test."""
    from ..backends.cuda import CudaOps
    from .quant import random_quant

    fused, cp, out = CudaOps(fuse_rope=True, fuse_rope_quant=True), c.cp, []
    fmt = FORMATS[kv]
    for hq, hkv, d, page, _ in DENSE_WRITES:
        for wfmt in (None, "q4_1"):
            m, k = (hq + 2 * hkv) * d, 512
            w = c.f16(m, k, scale=k**-0.5) if wfmt is None else random_quant(wfmt, m, k, c.rng)
            dw = c.dev16(w) if wfmt is None else fused.upload(w)
            x, res, lnw = c.f16(1, k), c.f16(1, k), (c.f16(k, scale=0.3) + 1.0).astype(np.float16)
            # each call its own residual: both update it in place
            args = (c.dev16(x), cp.asarray(res), c.dev16(lnw), 1e-5, dw, None)
            qkv = c.ops.rmsnorm_linear(c.dev16(x), cp.asarray(res), *args[2:])[0].get().astype(np.float32)
            case = dense_case(c, kv, hq, hkv, d, page, 1, qkv=qkv)
            dev = [_garbage(c, (*p.shape, fmt.packed_dim(d)), p.fmt.value_dtype) for p in case.pools]
            sc = [c.poison((*p.shape, p.fmt.scale_cols(d)), np.float16) for p in case.pools]
            cache = KVCache(
                dev[:1], dev[1:], page, case.pools[0].shape[0], fmt=fmt, k_scale=sc[:1], v_scale=sc[1:]
            )
            rope = (c.dev16(case.cos), c.dev16(case.sin))
            pos, slots = cp.asarray(case.pos), cp.asarray(case.slots)
            case.tag += f" {wfmt or 'f16'} weights"
            if not fused.fuses_qkv_rope(args[0], dw, pos, slots, cache):  # Q4_1: where it is not split here
                if wfmt is None:
                    out.append(Result("kv_quant.write_fused", case.tag, 0.0, 0.0, False, "not fused"))
                else:
                    out.append(
                        skipped("kv_quant.write_fused", case.tag, "not fused here (not split on this GPU)")
                    )
                continue
            q, _ = fused.qkv_rope(*args, pos, slots, cache, 0, rope)
            pools = [(v.get(), s.get()) for v, s in zip(dev, sc, strict=True)]
            out += check_write(case, "kv_quant.write_fused", q.get(), pools)
    return out


def kv_write_sparse_one(c: Ctx, kv: str, d: int) -> list[Result]:
    """rope_write_kv_sparse into quantized pools (harness/kv_write.sparse_case: a chunk whose logical page holds
    earlier tokens, so the statistics merge, and a fresh prompt); K/V of both pools within the step bound,
    their scales as the reference rule, kmax/kmin = rope_write_kv_sparse_ref's (the unquantized keys' statistics)."""
    fmt, case = FORMATS[kv], sparse_case(c, kv, d)
    sp, cp = case.sparse, c.cp
    dev = [_garbage(c, (*p.shape, fmt.packed_dim(case.d)), p.fmt.value_dtype) for p in case.pools]
    dsc = [c.poison((*p.shape, p.fmt.scale_cols(case.d)), np.float16) for p in case.pools]
    stats = [c.dev16(sp["kmax"]), c.dev16(sp["kmin"])]
    cache = KVCache(
        k=dev[:1], v=dev[1:2], page_size=case.page, num_pages=case.pools[0].shape[0], ks=dev[2:3], vs=dev[3:],
        head_class=[cp.asarray(sp["hc"])], head_slot=[cp.asarray(sp["hs"])], kmax=stats[:1], kmin=stats[1:],
        fmt=fmt, k_scale=dsc[:1], v_scale=dsc[1:2], ks_scale=dsc[2:3], vs_scale=dsc[3:],
    )  # fmt: skip
    q = c.poison((case.pos.size, case.hq, case.d), np.float16)
    rope = (c.dev16(case.cos), c.dev16(case.sin))
    c.ops.rope_write_kv(
        c.dev16(case.qkv), cp.asarray(case.pos), cp.asarray(case.slots), cache, 0, rope, out=q
    )
    pools = [(v.get(), s.get()) for v, s in zip(dev, dsc, strict=True)]
    return check_write(case, "kv_quant.write_sparse", q.get(), pools, (stats[0].get(), stats[1].get()))


def case_kv_quant(c: Ctx) -> list[Result]:
    out = [skipped("kv_quant", kv, "kv_dtype not offered by this GPU (fp8: sm_89 and newer)")
           for kv in QUANT_KV if kv not in kv_formats(c)]  # fmt: skip
    for kv in kv_formats(c):
        for name in KV_ATTENTION:
            if is_decode(name):
                out += [kv_attention_one(c, name, kv, impl) for impl in DECODE_IMPLS]
            else:
                out += [kv_attention_one(c, name, kv, prefill=pk) for pk in prefill_kernels(c)]
        out += [kv_sparse_one(c, "prefill", kv, prefill=pk) for pk in prefill_kernels(c)]
        out += [kv_sparse_one(c, "decode", kv, impl) for impl in DECODE_IMPLS]
        out += kv_write_one(c, kv)
        out += kv_write_fused_one(c, kv)
        out += [r for d in SPARSE_DIMS for r in kv_write_sparse_one(c, kv, d)]
    return out
