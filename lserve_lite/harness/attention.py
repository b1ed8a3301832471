"""Harness rows of kernels/attention_prefill.cu and kernels/attention_decode.cu (dense mode, and LServe's two
pools with windows and page selections: prefill, decode, mixed steps) against backends/reference/attention.py.
`case_prefill_kernels`: the prefill rows again under each prefill kernel the device has (mma.sync, and the
wgmma one of kernels/attention_prefill_sm90.cu and its TMA path on compute capability 9.x), forced through
cuda_attention.PREFILL_KERNEL, and in bf16 on 9.x."""

from __future__ import annotations

import numpy as np

from ..backends import cuda_attention
from ..backends.base import KVCache
from ..backends.reference.attention import paged_attention_ref, paged_attention_sparse_ref
from ..backends.reference.page_select import select_pages_ref
from ..backends.reference.page_stats import update_page_stats
from ..sparse.plan import BatchLayout, build_plan
from .common import BF16_NAN, Ctx, Result, bf16_bits, bf16_values, compare, setting, skipped
from .sparse_batch import SparseBatch, sparse_batch, sparse_cache


def _attention_case(c: Ctx, hq, hkv, d, page, q_lens, ctx_lens, sink=0, local=0, n_stream=0) -> Result:
    need = [-(-t // page) for t in ctx_lens]
    num_pages = sum(need) + 3
    perm = list(c.rng.permutation(num_pages))
    tables = [[int(perm.pop()) for _ in range(k)] for k in need]
    k_cache = c.f16(num_pages, hkv, page, d)
    v_cache = c.f16(num_pages, hkv, page, d)
    q = c.f16(sum(q_lens), hq, d)
    head_class = np.zeros(hkv, np.int32)
    head_class[c.rng.permutation(hkv)[:n_stream]] = 1
    plan = build_plan(BatchLayout(list(q_lens), list(ctx_lens), tables), page, sink=sink, local=local)
    ref = paged_attention_ref(q, k_cache, v_cache, plan, head_class)
    cache = KVCache([c.dev16(k_cache)], [c.dev16(v_cache)], page, num_pages)
    got = c.poison((sum(q_lens), hq * d), np.float16)
    dplan = c.ops.prepare_plan(plan)
    o = c.ops.attention(c.dev16(q), cache, 0, dplan, c.cp.asarray(head_class), out=got)
    kind = "decode" if all(n == 1 for n in q_lens) else "prefill"
    tag = f"Hq{hq}/{hkv} D{d} p{page} q{list(q_lens)[:4]} ctx{list(ctx_lens)[:4]}" + (
        f" stream{n_stream} {sink}/{local}" if n_stream else ""
    )
    return compare(f"attention.{kind}", tag, o.get(), ref, 2e-3, 1e-2)


ATTENTION_CASES = [
    dict(hq=9, hkv=3, d=64, page=64, q_lens=[1, 1, 1, 1, 1], ctx_lens=[1, 63, 64, 65, 3000]),
    dict(hq=32, hkv=8, d=128, page=64, q_lens=[1, 1, 1], ctx_lens=[4096, 17, 200]),
    dict(hq=32, hkv=8, d=128, page=16, q_lens=[1], ctx_lens=[32768]),
    dict(hq=9, hkv=3, d=64, page=64, q_lens=[5, 70, 1], ctx_lens=[5, 200, 1000]),
    dict(hq=32, hkv=8, d=128, page=64, q_lens=[300], ctx_lens=[300]),
    dict(hq=32, hkv=8, d=128, page=64, q_lens=[129, 1], ctx_lens=[2000, 77]),
    dict(
        hq=8,
        hkv=8,
        d=64,
        page=32,
        q_lens=[33, 1, 1],
        ctx_lens=[33, 500, 1],
    ),
    dict(hq=9, hkv=3, d=64, page=64, q_lens=[1, 1], ctx_lens=[1500, 700], sink=64, local=256, n_stream=2),
    dict(hq=32, hkv=8, d=128, page=64, q_lens=[200], ctx_lens=[1200], sink=128, local=256, n_stream=4),
]


def case_attention(c: Ctx) -> list[Result]:
    return [_attention_case(c, **kw) for kw in ATTENTION_CASES]


# Prefill-only rows for the kernel comparison: ATTENTION_CASES' prefill rows plus shapes that exercise the wgmma
# kernel's two tile shapes (one / two warpgroups), deep tile loops and 16 / 32-token pages.
PREFILL_KERNEL_CASES = [kw for kw in ATTENTION_CASES if any(n > 1 for n in kw["q_lens"])] + [
    dict(hq=32, hkv=8, d=128, page=64, q_lens=[1000], ctx_lens=[3100]),
    dict(hq=4, hkv=4, d=128, page=16, q_lens=[33, 64, 7], ctx_lens=[33, 900, 7]),
    dict(hq=12, hkv=4, d=64, page=32, q_lens=[257, 2], ctx_lens=[700, 2]),
    dict(hq=8, hkv=2, d=64, page=16, q_lens=[500], ctx_lens=[2000], sink=16, local=100, n_stream=1),
]


def prefill_kernels_available() -> list[str]:
    """The prefill kernels this device runs: "mma" everywhere, "wgmma" and its TMA path on compute capability 9.x."""
    import cupy as cp

    return ["mma", "wgmma", "tma"] if cp.cuda.Device().compute_capability.startswith("9") else ["mma"]


def case_prefill_kernels(c: Ctx) -> list[Result]:
    """Every prefill row (dense mode, and the LServe two-pool setups) under each available prefill kernel; on 9.x
    the dense rows again with bf16 queries, caches and output (the wgmma kernel's bf16 instantiation)."""
    out, available = [], prefill_kernels_available()
    for impl in available:
        with setting(cuda_attention, "PREFILL_KERNEL", impl):
            rows = [_attention_case(c, **kw) for kw in PREFILL_KERNEL_CASES]
            rows += [sparse_prefill_one(c, name) for name in SPARSE_PREFILL]
        for r in rows:
            r.kernel = f"{r.kernel}[{impl}]"
        out += rows
    if "wgmma" in available:
        out += [bf16_prefill_case(c, **kw) for kw in PREFILL_KERNEL_CASES]
    else:
        sm90 = "needs compute capability 9.x"
        out += [skipped(f"attention.prefill[{k}]", "-", sm90) for k in ("wgmma", "tma", "wgmma bf16")]
    return out


def bf16_prefill_case(c: Ctx, hq, hkv, d, page, q_lens, ctx_lens, sink=0, local=0, n_stream=0) -> Result:
    """One dense-mode prefill row in bf16 (cuda_attention.paged_attention with kv="bf16") against the float32
    reference over the same bf16-rounded inputs; P and the output are rounded to bf16 (8 significant bits)."""
    cp = c.cp
    need = [-(-t // page) for t in ctx_lens]
    num_pages = sum(need) + 3
    perm = list(c.rng.permutation(num_pages))
    tables = [[int(perm.pop()) for _ in range(k)] for k in need]
    k_bits = bf16_bits(c.rng.standard_normal((num_pages, hkv, page, d)))
    v_bits = bf16_bits(c.rng.standard_normal((num_pages, hkv, page, d)))
    q_bits = bf16_bits(c.rng.standard_normal((sum(q_lens), hq, d)))
    head_class = np.zeros(hkv, np.int32)
    head_class[c.rng.permutation(hkv)[:n_stream]] = 1
    plan = build_plan(BatchLayout(list(q_lens), list(ctx_lens), tables), page, sink=sink, local=local)
    ref = paged_attention_ref(bf16_values(q_bits), bf16_values(k_bits), bf16_values(v_bits), plan, head_class)
    got = cp.full((sum(q_lens), hq * d), BF16_NAN, np.uint16)
    cuda_attention.paged_attention(
        cp.asarray(q_bits), cp.asarray(k_bits), cp.asarray(v_bits), cuda_attention.CudaPlan.from_plan(plan),
        cp.asarray(head_class), out=got, decode=False, kv="bf16",
    )  # fmt: skip
    tag = f"Hq{hq}/{hkv} D{d} p{page} q{list(q_lens)[:4]} ctx{list(ctx_lens)[:4]}" + (
        f" stream{n_stream} {sink}/{local}" if n_stream else ""
    )
    return compare("attention.prefill[wgmma bf16]", tag, bf16_values(got.get()), ref, 1e-2, 1.6e-2)


# -- LServe sparse kernels: two KV pools, per-query-block windows, page selection, page statistics -------
# The setups below also back tests/test_gpu_sparse.py (one test per named setup).

SPARSE_PREFILL = {
    # name: (q_lens, prefix_lens, Hq, head classes, D, page, (sink, local) per sequence)
    "mixed_two_seqs": ([300, 77], [0, 450], 8, "0110", 128, 64, [(128, 256), (64, 128)]),
    "all_streaming": ([129], [700], 8, "11", 64, 16, [(32, 160)]),
    "all_dense": ([200, 5], [33, 0], 12, "000", 64, 32, [(0, 0), (0, 0)]),
    "gqa4_ragged": ([65, 1, 190], [1000, 37, 3], 16, "1010", 128, 64, [(64, 192), (64, 64), (128, 512)]),
    "gqa2_odd_no_sink": ([97, 3, 33], [211, 500, 0], 6, "011", 64, 16, [(0, 48), (16, 32), (48, 16)]),
}


def sparse_prefill_one(c: Ctx, name: str) -> Result:
    """CudaOps.attention (prefill kernel, two pools, per-block windows) vs paged_attention_sparse_ref."""
    q_lens, prefix, hq, pattern, d, ps, windows = SPARSE_PREFILL[name]
    ctx = [a + b for a, b in zip(q_lens, prefix, strict=True)]
    b = sparse_batch(c, q_lens, ctx, hq, pattern, d, ps, windows)
    ref = paged_attention_sparse_ref(b.q, b.kd, b.vd, b.ks, b.vs, b.plan, b.hc, b.slot)
    cache = sparse_cache(c, b)
    got = c.poison((b.q.shape[0], hq * d), np.float16)
    o = c.ops.attention(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan), cache.head_class[0], out=got)
    tag = f"{name} {pattern} Hq{hq} D{d} p{ps}"
    return compare("attention.sparse_prefill", tag, o.get(), ref, 4e-3, 2e-2)


# fmt: off

SPARSE_DECODE = {
    # name: (contexts, Hq, head classes, D, page, sub_pages, budget in pages per sequence (0: no selection),
    #        (sink, local) per sequence, refresh per sequence (None: all; 0: reuse a selection made before))
    "mixed_select": ([3000, 700, 64 * 9], 8, "0110", 128, 64, 4, [8, 8, 9], [(128, 256)] * 3, None),
    "fits_budget": ([500, 1000], 8, "01", 64, 16, 4, [40, 63], [(32, 64)] * 2, None),
    "all_dense_small_pages": ([2500], 12, "000", 64, 16, 2, [20], [(0, 0)], None),
    "all_streaming": ([4000, 90], 8, "11", 128, 64, 4, [8, 8], [(128, 256)] * 2, None),
    "gqa8_long": ([20000], 32, "01010101", 128, 64, 4, [64], [(128, 256)], None),
    "many_pages_sub8": ([9001, 40, 777], 8, "0011", 64, 16, 8, [100, 100, 7],
                        [(32, 64), (0, 32), (16, 48)], None),
    "reused_and_unselected": ([64 * 40 + 1, 64 * 10 + 5, 333, 1234], 8, "0100", 128, 64, 4, [6, 200, 0, 5],
                              [(128, 256)] * 4, [0, 0, 1, 1]),
}

def decode_setup(c: Ctx, name: str, spec: tuple | None = None):
    """The batch of SPARSE_DECODE[name] (or of `spec`, in its format), its dense-pool key statistics and
    the selection capacity."""
    ctx, hq, pattern, d, ps, sub, keep, windows, refresh = spec or SPARSE_DECODE[name]
    b = sparse_batch(c, [1] * len(ctx), ctx, hq, pattern, d, ps, windows, keep=keep, refresh=refresh)
    shape = (b.kd.shape[0], b.kd.shape[1], sub, d)
    x, y = c.f16(*shape), c.f16(*shape)
    kmax, kmin = np.maximum(x, y), np.minimum(x, y)  # what pages outside the contexts hold (never scored)
    if b.kd.shape[1]:
        tok = [np.arange(n) for n in ctx]
        slots = np.concatenate(
            [np.asarray(t)[p // ps] * ps + p % ps for t, p in zip(b.tables, tok, strict=True)]
        )
        update_page_stats(kmax, kmin, b.kd, slots)
    return b, kmax, kmin, max(keep) + 1

def _stale_selection(c: Ctx, b: SparseBatch, sel: np.ndarray, cnt: np.ndarray) -> None:
    """For decode blocks that reuse a selection (qb_refresh 0): what the selector stored when the context
    was a token shorter (so the newest page is missing when that token opened it)."""
    plan, ps = b.plan, b.plan.page_size
    for qb in range(plan.num_qblocks):
        keep = int(plan.qb_keep[qb])
        if keep == 0 or plan.qb_refresh[qb]:
            continue
        ctx = int(plan.qb_pos[qb]) + 1
        prev = -(-(ctx - 1) // ps) if ctx > 1 else 1  # pages one token ago
        s = int(plan.qb_slot[qb])
        for g in np.nonzero(b.hc == 0)[0]:
            if prev <= keep:
                pick = np.arange(prev)
            else:
                pick = np.r_[np.sort(c.rng.choice(prev - 1, keep - 1, replace=False)), prev - 1]
            sel[s, g, : pick.size] = pick
            cnt[s, g] = pick.size

def sparse_decode_one(c: Ctx, name: str) -> Result:
    """CudaOps.attention (decode kernel) with page selections (fresh from select_pages_ref, or reused from an
    earlier step) uploaded into the cache vs paged_attention_sparse_ref given the same selections."""
    b, kmax, kmin, cap = decode_setup(c, name)
    hkv = b.hc.size
    sel = np.full((b.num_slots, hkv, cap), -1, np.int32)
    cnt = np.full((b.num_slots, hkv), -1, np.int32)
    _stale_selection(c, b, sel, cnt)
    select_pages_ref(b.q, kmax, kmin, b.plan, b.hc, b.slot, sel, cnt)
    ref = paged_attention_sparse_ref(b.q, b.kd, b.vd, b.ks, b.vs, b.plan, b.hc, b.slot, sel, cnt)
    cache = sparse_cache(c, b, sel_idx=sel, sel_cnt=cnt)
    n, hq, d = b.q.shape
    got = c.poison((n, hq * d), np.float16)
    o = c.ops.attention(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan), cache.head_class[0], out=got)
    pattern = "".join(str(int(x)) for x in b.hc)
    tag = f"{name} {pattern} Hq{hq} D{d} p{b.plan.page_size}"
    return compare("attention.sparse_decode", tag, o.get(), ref, 4e-3, 2e-2)

def sparse_mixed_one(c: Ctx) -> Result:
    """A step that mixes a prefill chunk with selecting decode rows (CudaOps.attention runs the prefill
    kernel, then the decode kernel on the decode rows' sub-plan) vs paged_attention_sparse_ref."""
    ctx, q_lens, ps, d = [3000, 500, 64 * 9 + 1], [1, 70, 1], 64, 128
    b = sparse_batch(c, q_lens, ctx, 8, "0110", d, ps, [(128, 256), (128, 512), (64, 256)], keep=[8, 8, 5])
    shape = (b.kd.shape[0], b.kd.shape[1], 4, d)
    x, y = c.f16(*shape), c.f16(*shape)
    kmax, kmin = np.maximum(x, y), np.minimum(x, y)
    slots = np.concatenate(
        [np.asarray(t)[np.arange(n) // ps] * ps + np.arange(n) % ps for t, n in zip(b.tables, ctx)]
    )
    update_page_stats(kmax, kmin, b.kd, slots)
    sel = np.full((b.num_slots, b.hc.size, 9), -1, np.int32)
    cnt = np.full((b.num_slots, b.hc.size), -1, np.int32)
    select_pages_ref(b.q, kmax, kmin, b.plan, b.hc, b.slot, sel, cnt)
    ref = paged_attention_sparse_ref(b.q, b.kd, b.vd, b.ks, b.vs, b.plan, b.hc, b.slot, sel, cnt)
    cache = sparse_cache(c, b, sel_idx=sel, sel_cnt=cnt)
    n, hq, _ = b.q.shape
    got = c.poison((n, hq * d), np.float16)
    o = c.ops.attention(c.dev16(b.q), cache, 0, c.ops.prepare_plan(b.plan), cache.head_class[0], out=got)
    return compare("attention.sparse_mixed", f"q{q_lens} ctx{ctx} 0110 D{d}", o.get(), ref, 4e-3, 2e-2)

def case_sparse_attention(c: Ctx) -> list[Result]:
    out = [sparse_prefill_one(c, n) for n in SPARSE_PREFILL]
    return out + [sparse_decode_one(c, n) for n in SPARSE_DECODE] + [sparse_mixed_one(c)]
