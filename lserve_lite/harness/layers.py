"""Harness rows of kernels/layers.cu (embedding gather, residual add + RMSNorm, alone and in the prologue of the
GEMV after it, RoPE + K/V page write in both KV layouts with the page statistics, SiLU-and-multiply, alone and in
the gate_up GEMV, the page clears of a fresh page) and of the GEMMs (our GEMV and cuBLAS), against backends/reference/layers.py."""

from __future__ import annotations

import math

import numpy as np

from ..backends.base import KVCache, rope_tables
from ..backends.cuda_quant import pick_variant
from ..backends.reference.layers import (
    embed_ref,
    rmsnorm_ref,
    rope_write_kv_ref,
    rope_write_kv_sparse_ref,
    silu_mul_ref,
)
from ..backends.reference.page_stats import update_page_stats
from ..config import ModelConfig
from .common import Ctx, Result, compare, silu_mul_atol
from .quant import U32, norm_linear_ref, random_quant, reference_matrix, silu_inputs, unit_scale
from .sparse_batch import head_classes


def case_embed(c: Ctx) -> list[Result]:
    out = []
    for vocab, hidden, n, start in [
        (1000, 576, 7, 0),
        (333, 100, 5, 0),
        (4096, 4096, 33, 0),
        (500, 576, 9, 500),
    ]:
        table = c.f16(vocab, hidden)
        ids = c.rng.integers(0, 2 * vocab, n)  # a vocabulary shard at `start`: ids outside it give zeros
        ids = ids if start else ids % vocab
        got = c.poison((n, hidden), np.float16)
        c.ops.embed(c.dev16(table), c.cp.asarray(ids), out=got, vocab_start=start)
        want = embed_ref(table, ids, start)
        out.append(compare("embed_gather", f"V{vocab} H{hidden} N{n} start{start}", got.get(), want, 0, 0))
    return out


def case_add_rmsnorm(c: Ctx) -> list[Result]:
    out = []
    # vector path: 1-4 chunks of 8 a thread (576 .. 16384); scalar: hidden % 8 != 0, over 2048 chunks, or x not
    # 16-byte aligned (shift: x starts that many halves into its buffer)
    for n, hidden, shift in [
        (1, 576, 0),
        (7, 100, 0),
        (130, 4096, 0),
        (3, 1000, 0),
        (2, 8192, 0),
        (1, 16384, 0),
        (2, 16392, 0),
        (3, 576, 4),
    ]:
        for with_res in (False, True):
            x, w = c.f16(n, hidden), c.f16(hidden, scale=0.3) + 1.0
            w = w.astype(np.float16).astype(np.float32)
            res = c.rng.standard_normal((n, hidden)).astype(np.float32) * 2
            ref_res = x + res if with_res else x
            ref = rmsnorm_ref(ref_res, w, 1e-5)
            got = c.poison((n, hidden), np.float16)
            got_res = c.cp.asarray(res) if with_res else c.poison((n, hidden), np.float32)
            x_dev = c.dev16(np.concatenate([np.zeros(shift), x.ravel()]))[shift:].reshape(n, hidden)
            c.ops.add_rmsnorm(
                x_dev, got_res if with_res else None, c.dev16(w), 1e-5, out=got, res_out=got_res
            )
            tag = f"N{n} H{hidden}" + (f" shift{shift}" if shift else "") + (" +res" if with_res else "")
            out.append(compare("add_rmsnorm", tag, got.get(), ref, 2e-3, 4e-3))
            out.append(compare("add_rmsnorm.residual", tag, got_res.get(), ref_res, 1e-5, 1e-6))
    return out


def case_rope_write_kv(c: Ctx) -> list[Result]:
    out = []
    for hq, hkv, d, page, n, scaling in [
        (9, 3, 64, 64, 13, None),
        (
            32,
            8,
            128,
            16,
            70,
            {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        ),
        (4, 4, 32, 64, 1, None),
    ]:
        cfg = ModelConfig(
            "LlamaForCausalLM", hq * d, 4 * d, 1, hq, hkv, d, 100, rope_theta=5e5, rope_scaling=scaling
        )
        max_len, num_pages = 20000, 40
        cos, sin = (t.astype(np.float16).astype(np.float32) for t in rope_tables(cfg, max_len))
        qkv = c.f16(n, (hq + 2 * hkv) * d)
        pos = c.rng.integers(0, max_len, n)
        slots = c.rng.permutation(num_pages * page)[:n]
        slots[c.rng.random(n) < 0.2] = -1  # padding rows write nothing
        shape = (num_pages, hkv, page, d)
        k_ref, v_ref = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
        live = slots >= 0
        q_ref = rope_write_kv_ref(qkv, pos, np.maximum(slots, 0), k_ref.copy(), v_ref.copy(), cos, sin)
        rope_write_kv_ref(qkv[live], pos[live], slots[live], k_ref, v_ref, cos, sin)
        kc, vc = c.poison(shape, np.float16), c.poison(shape, np.float16)
        q = c.poison((n, hq, d), np.float16)
        cache = KVCache([kc], [vc], page, num_pages)
        c.ops.rope_write_kv(
            c.dev16(qkv),
            c.cp.asarray(pos),
            c.cp.asarray(slots),
            cache,
            0,
            (c.dev16(cos), c.dev16(sin)),
            out=q,
        )
        tag = f"Hq{hq} Hkv{hkv} D{d} page{page} N{n}" + (" llama3" if scaling else "")
        out.append(compare("rope_write_kv.q", tag, q.get(), q_ref, 2e-3, 4e-3))
        out.append(compare("rope_write_kv.k", tag, kc.get(), k_ref, 2e-3, 4e-3))
        out.append(compare("rope_write_kv.v", tag, vc.get(), v_ref, 0, 0))
    return out


def case_clear_pages(c: Ctx) -> list[Result]:
    """CudaOps.clear_pages (layers.cu's clear_pages: pages handed to a sequence read as a fresh pool's) on pools of
    every kind, random and nonzero: fp16 values, int4 bytes, scales, page statistics, a pool without heads, a
    streaming pool family; a page listed twice. Reference: NumPy zeroes the listed pages; every other page must
    stay as it was, bit for bit."""
    cp = c.cp
    dense = [c.f16(12, 2, 16, 64), c.f16(12, 0, 16, 64), c.f16(12, 3, 16, 2), c.f16(12, 1, 4, 128)]
    dense = [a.astype(np.float16) for a in dense] + [c.rng.integers(1, 256, (12, 2, 16, 32), dtype=np.uint8)]
    stream = [c.f16(7, 1, 16, 64).astype(np.float16) for _ in "kv"]
    pages, stream_pages = np.array([5, 0, 11, 5]), np.array([6])
    dev_dense, dev_stream = [cp.asarray(a) for a in dense], [cp.asarray(a) for a in stream]
    cache = KVCache(k=dev_dense[:2], v=dev_dense[4:], page_size=16, num_pages=12, ks=dev_stream[:1],
                    vs=dev_stream[1:], k_scale=dev_dense[2:3], v_scale=[], kmax=dev_dense[3:4], kmin=[])  # fmt: skip
    c.ops.clear_pages(cache, pages, stream_pages)
    out = []
    names = ("k", "k (no heads)", "k_scale", "kmax", "v int4", "ks", "vs")
    for name, a, d, cleared in zip(names, dense + stream, dev_dense + dev_stream, [pages] * 5 + [stream_pages] * 2,
                                   strict=True):  # fmt: skip
        want = a.copy()
        want[cleared] = 0
        out.append(
            compare(f"clear_pages.{name}", f"{a.shape} pages {cleared.tolist()}", cp.asnumpy(d), want, 0, 0)
        )
    return out


def case_silu_mul(c: Ctx) -> list[Result]:
    out = []
    for n, inter in [(1, 1536), (5, 100), (64, 14336), (3, 7)]:
        gu = c.f16(n, 2 * inter, scale=2.0)
        got = c.poison((n, inter), np.float16)
        c.ops.silu_mul(c.dev16(gu), out=got)
        out.append(compare("silu_mul", f"N{n} I{inter}", got.get(), silu_mul_ref(gu), 2e-3, 4e-3))
    return out


def gemv_label(c: Ctx, n: int, m: int, k: int) -> str:
    """The label suffix " x2" where gemv_rows serves the product with two warps per output row (gemv_slices)."""
    return " x2" if c.ops.gemm_path(n, k) == "gemv" and c.ops.gemv_slices(m, k) > 1 else ""


def case_gate_up_silu(c: Ctx) -> list[Result]:
    """CudaOps.gate_up_silu on an fp16 [gate; up] weight [2I, K]: decode rows in one kernel (gemv_rows with SiLU-
    and-multiply in its epilogue), more rows through cuBLAS + silu_mul; against silu_mul_ref(x @ W^T) in float64.
    Tolerance: the GEMV's float32 sums ((K/32 + 20) u32 (|x| @ |W|^T); cuBLAS: 1e-4) through silu_mul_atol, plus
    the output's fp16 rounding."""
    out = []
    for n, k, inter in [
        (1, 576, 1536),
        (3, 256, 1001),
        (8, 1024, 77),
        (5, 4096, 2731),
        (2, 96, 7),
        (12, 512, 301),
    ]:
        w = c.f16(2 * inter, k, scale=1 / math.sqrt(k))
        x = silu_inputs(c.rng, n, w)
        x64, w64 = x.astype(np.float64), w.astype(np.float64)
        gu, bound = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
        gemv = c.ops.gemm_path(n, k) == "gemv"
        fused = gemv and c.ops.fuse_silu
        got = c.poison((n, inter), np.float16)
        c.ops.gate_up_silu(c.dev16(x), c.dev16(w), out=got)
        atol = silu_mul_atol(gu, (k / 32 + 20) * U32 * bound if gemv else 1e-4 * bound, rounded=not fused)
        name = f"gate_up_silu [{'gemv fused' if fused else c.ops.gemm_path(n, k) + ' + silu_mul'}"
        name += f"{gemv_label(c, n, inter, k)}]"
        out.append(compare(name, f"N{n} K{k} I{inter}", c.cp.asnumpy(got), silu_mul_ref(gu), atol, 2.0**-10))
    return out


def case_rmsnorm_linear(c: Ctx) -> list[Result]:
    """CudaOps.rmsnorm_linear: the residual add and RMSNorm in the prologue of the decode GEMV of an fp16 weight
    (gemv_rows with NORM), plain and gate_up + SiLU-and-multiply, the first layer (no residual); and the unfused
    composition elsewhere (packed weights: split GEMVs, block kernels under v1 / v2; N * K past gemv_rows' shared
    memory; cuBLAS rows). Against harness.quant.norm_linear_ref; the residual stream must be x + res exactly."""
    out = []
    cases = [(None, 1, 576, 960, False), (None, 3, 4096, 1001, True), (None, 6, 4096, 77, False),
             (None, 12, 576, 301, True), ("q4_1", 1, 576, 1536, True), ("q4_1", 8, 1024, 515, False),
             ("int8", 2, 4096, 4097, False), ("int4", 5, 4096, 2731, True), ("q8_0", 4, 512, 129, True),
             ("q4_0", 1, 256, 37, False), ("q4_k", 3, 512, 129, True)]  # fmt: skip
    for i, (fmt, n, k, m, silu) in enumerate(cases):
        rows = 2 * m if silu else m
        w = c.f16(rows, k, scale=1 / math.sqrt(k)) if fmt is None else random_quant(fmt, rows, k, c.rng)
        ref_w = reference_matrix(w)
        x, lnw = c.f16(n, k), c.f16(k, scale=0.3) + 1.0
        if silu:  # h @ W of std ~3 (silu_inputs' reason: random q4_k blocks overflow fp16 unscaled)
            lnw = lnw * 3.0 * unit_scale(ref_w)
        lnw = lnw.astype(np.float16)
        res = None if i == 0 else c.rng.standard_normal((n, k)).astype(np.float32) * 2
        split = fmt is not None and pick_variant(c.ops.quant.gemv_variant, fmt, n) == "split" and n <= 8
        ref, atol, r = norm_linear_ref(x, res, lnw, 1e-5, ref_w, silu, split)
        dw = c.dev16(w) if fmt is None else c.ops.upload(w)
        got, got_res = c.ops.rmsnorm_linear(
            c.dev16(x), None if res is None else c.cp.asarray(res), c.dev16(lnw), 1e-5, dw, silu=silu
        )
        if n > 8:  # cuBLAS: float32 sums 1e-4 of the bound
            atol = atol + 1e-4 * (np.abs(x) @ np.abs(ref_w).T)[:, : ref.shape[1]]
        tag = f"{fmt or 'f16'} N{n} K{k} M{m}" + (" silu" if silu else "") + (" first" if res is None else "")
        tag += gemv_label(c, n, m, k) if fmt is None else ""
        out.append(compare("rmsnorm_linear", tag, c.cp.asnumpy(got), ref, atol, 2.0**-10))
        out.append(compare("rmsnorm_linear.residual", tag, c.cp.asnumpy(got_res), r, 0, 0))
    return out


def case_qkv_rope(c: Ctx) -> list[Result]:
    """CudaOps.qkv_rope with its fused kernels forced on at every GEMV-sized row count (gemv_rows_rope with the norm
    in its prologue, quant_gemv_split_rope after add_rmsnorm): RoPE and the K/V page write in the QKV GEMV's epilogue,
    a dense fp16 cache, against harness.quant.norm_linear_ref's float64 product rotated and written by
    rope_write_kv_ref. A rotated pair's tolerance: both products' (and their fp16 rounding before the rotation);
    rtol 2^-10 for the output's own. The residual stream exact; every q entry compared (qkv_rope allocates q, so it
    is not poisoned); cache slots not written stay NaN (a padding row with slot -1 writes none). The LServe flavor is checked bit for bit against the unfused kernels in
    tests/test_gpu_qkv_rope.py."""
    from ..backends.cuda import CudaOps

    ops, cp, out = CudaOps(fuse_rope=True), c.cp, []
    cases = [(None, 1, 576, 9, 3, 64), (None, 3, 4096, 32, 8, 128), ("q4_1", 1, 576, 9, 3, 64),
             ("int8", 8, 512, 8, 2, 128), ("q4_k", 4, 512, 4, 4, 64)]  # fmt: skip
    page, pages, max_len = 16, 8, 4096
    for i, (fmt, n, k, hq, hkv, d) in enumerate(cases):
        m, heads = (hq + 2 * hkv) * d, hq + 2 * hkv
        w = c.f16(m, k, scale=1 / math.sqrt(k)) if fmt is None else random_quant(fmt, m, k, c.rng)
        ref_w = reference_matrix(w)
        x, lnw = c.f16(n, k), (c.f16(k, scale=0.3) + 1.0).astype(np.float16)
        res = None if i == 0 else c.rng.standard_normal((n, k)).astype(np.float32) * 2
        split = fmt is not None and pick_variant(ops.quant.gemv_variant, fmt, n) == "split"
        prod, atol, r = norm_linear_ref(x, res, lnw, 1e-5, ref_w, False, split)
        ang = c.rng.uniform(0, 2 * np.pi, (max_len, d // 2))
        cos, sin = np.cos(ang).astype(np.float16), np.sin(ang).astype(np.float16)
        pos = c.rng.integers(0, max_len, n).astype(np.int64)
        slots = c.rng.choice(pages * page, n, replace=False).astype(np.int64)
        if n > 1:
            slots[-1] = -1
        cache = KVCache(k=[c.poison((pages, hkv, page, d), np.float16)], v=[c.poison((pages, hkv, page, d), np.float16)],
                        page_size=page, num_pages=pages)  # fmt: skip
        dw = c.dev16(w) if fmt is None else ops.upload(w)
        q, got_r = ops.qkv_rope(c.dev16(x), None if res is None else cp.asarray(res), c.dev16(lnw), 1e-5, dw, None,
                                cp.asarray(pos), cp.asarray(slots), cache, 0, (c.dev16(cos), c.dev16(sin)))  # fmt: skip
        # a pair's bound (both products, each rounded to fp16 first), on both of its outputs; q / k / v in rows
        a3 = (atol + 2.0**-11 * np.abs(prod)).reshape(n, heads, 2, d // 2)
        pair = np.concatenate([a3.sum(2)] * 2, axis=-1).reshape(n, heads, d)
        cos64, sin64 = cos.astype(np.float64), sin.astype(np.float64)
        live = slots >= 0
        q_ref = rope_write_kv_ref(prod, pos, np.maximum(slots, 0), *(np.zeros((pages, hkv, page, d)),) * 2, cos64,
                                  sin64)  # fmt: skip
        k_ref, v_ref = np.full((pages, hkv, page, d), np.nan), np.full((pages, hkv, page, d), np.nan)
        rope_write_kv_ref(prod[live], pos[live], slots[live], k_ref, v_ref, cos64, sin64)
        tag = f"{fmt or 'f16'} N{n} K{k} Hq{hq} Hkv{hkv} D{d}" + (" first" if res is None else "")
        out.append(compare("qkv_rope.q", tag, cp.asnumpy(q), q_ref, pair[:, :hq], 2.0**-10))
        kv_tol = np.full(k_ref.shape, np.inf)  # unwritten slots: NaN on both sides (compare's both-NaN rule)
        for name, got, ref, h0 in (("k", cache.k[0], k_ref, hq), ("v", cache.v[0], v_ref, hq + hkv)):
            tol = kv_tol.copy()
            tol[slots[live] // page, :, slots[live] % page] = pair[live, h0 : h0 + hkv]
            out.append(compare(f"qkv_rope.{name}", tag, cp.asnumpy(got), ref, tol, 2.0**-10))
        out.append(compare("qkv_rope.residual", tag, cp.asnumpy(got_r), r, 0, 0))
    return out


def case_linear(c: Ctx) -> list[Result]:
    out = []
    for n, k, m in [
        (1, 576, 960),
        (7, 100, 33),
        (3, 4096, 14336),
        (8, 1536, 576),
        (64, 4096, 1024),
        (300, 576, 1536),
        (1, 4104, 515),  # two warps per row (CudaOps.gemv_slices), odd M, a row of 513 16-byte chunks
        (8, 2048, 300),
    ]:
        x, w = c.f16(n, k), c.f16(m, k, scale=1 / math.sqrt(k))
        got = c.poison((n, m), np.float16)
        c.ops.linear(c.dev16(x), c.dev16(w), out=got)
        name = f"linear [{c.ops.gemm_path(n, k)}{gemv_label(c, n, m, k)}]"
        out.append(compare(name, f"N{n} K{k} M{m}", got.get(), x @ w.T, 4e-3, 4e-3))
    return out


def case_logits(c: Ctx) -> list[Result]:
    out = []
    for n, h, v in [(1, 576, 49152), (3, 4096, 32000), (20, 576, 49152), (2, 4096, 4001)]:
        x, w = c.f16(n, h), c.f16(v, h, scale=1 / math.sqrt(h))
        got = c.poison((n, v), np.float32)
        c.ops.logits(c.dev16(x), c.dev16(w), out=got)
        name = f"logits fp32 [{c.ops.gemm_path(n, h)}{gemv_label(c, n, v, h)}]"
        out.append(compare(name, f"N{n} H{h} V{v}", got.get(), x @ w.T, 1e-4, 1e-4))
    return out


ROPE_SPARSE = {
    # name: (head classes, query heads per KV head, D, page, sub_pages)
    "mixed": ("0110", 2, 64, 16, 4),
    "no_streaming": ("00", 2, 64, 16, 2),
    "no_dense": ("111", 2, 64, 16, 4),
    "one_dense_sub1": ("1000", 2, 64, 16, 1),
    "gqa3_d128_p64": ("01011", 3, 128, 64, 8),
}


def rope_write_kv_sparse_one(c: Ctx, name: str) -> list[Result]:
    """CudaOps.rope_write_kv on an LServe cache (kernel rope_write_kv_sparse: RoPE, K/V into the pool of each
    KV head's class, fused page statistics) vs rope_write_kv_sparse_ref. Three sequences (a chunk appended at
    an unaligned position, a fresh prompt, a decode row at an unaligned position) and two padding rows (slots
    -1); the pools NaN-poisoned except the sequences' earlier tokens, the statistics NaN-poisoned except those
    of the earlier tokens' logical pages (the reference recomputes them from the cache, the kernel merges), q
    NaN-poisoned."""
    pattern, gsize, d, ps, sub = ROPE_SPARSE[name]
    hc, slot = head_classes(pattern)
    hkv = hc.size
    hq, nd, ns = gsize * hkv, int((hc == 0).sum()), int((hc == 1).sum())
    starts, lens, pad = [37, 0, 203], [45, 20, 1], 2
    n_live = sum(lens)
    need = [-(-(s + m) // ps) for s, m in zip(starts, lens, strict=True)]
    n_pages, n_spages = sum(need) + 5, -(-n_live // ps) + 3
    perm, offs = c.rng.permutation(n_pages), np.cumsum([0, *need])
    tables = [perm[offs[i] : offs[i + 1]] for i in range(len(lens))]

    def slot_of(t, p):
        return t[p // ps] * ps + p % ps

    spans = [np.arange(s, s + m) for s, m in zip(starts, lens, strict=True)]
    pos = np.concatenate([*spans, c.rng.integers(0, max(starts), pad)]).astype(np.int64)
    n = pos.size
    live = np.arange(n) < n_live
    dslots, sslots = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    dslots[live] = np.concatenate([slot_of(t, p) for t, p in zip(tables, spans, strict=True)])
    sslots[live] = c.rng.permutation(n_spages * ps)[:n_live]
    qkv = c.f16(n, (hq + 2 * hkv) * d)
    cos, sin = c.f16(256, d // 2), c.f16(256, d // 2)
    pools = [np.full((n_pages, nd, ps, d), np.nan, np.float32) for _ in "kv"]
    pools += [np.full((n_spages, ns, ps, d), np.nan, np.float32) for _ in "kv"]
    hist = np.concatenate([slot_of(t, np.arange(s)) for t, s in zip(tables, starts, strict=True)])
    for pool in pools[:2]:  # the sequences' earlier tokens (dense pool): random
        pool[hist // ps, :, hist % ps] = c.f16(hist.size, nd, d)
    stats = [np.full((n_pages, nd, sub, d), np.nan, np.float32) for _ in "xn"]
    # the earlier tokens' statistics, as their own writes left them (the kernel merges new keys into them)
    update_page_stats(*stats, pools[0], hist)
    dev = [c.dev16(a) for a in pools + stats]
    want = [a.copy() for a in pools + stats]
    rope_write_kv_sparse_ref(
        qkv[live], pos[live], dslots[live], sslots[live], *want[:4], hc, slot, cos, sin, *want[4:]
    )
    q_ref = rope_write_kv_sparse_ref(  # q of every row, padding included (its K/V writes are thrown away)
        qkv, pos, np.maximum(dslots, 0), np.maximum(sslots, 0), *[a.copy() for a in pools], hc, slot, cos, sin
    )
    cp = c.cp
    cache = KVCache(
        k=[dev[0]], v=[dev[1]], page_size=ps, num_pages=n_pages, ks=[dev[2]], vs=[dev[3]],
        head_class=[cp.asarray(hc)], head_slot=[cp.asarray(slot)], kmax=[dev[4]], kmin=[dev[5]],
    )  # fmt: skip
    q = c.poison((n, hq, d), np.float16)
    slots = cp.asarray(np.stack([dslots, sslots]))
    c.ops.rope_write_kv(c.dev16(qkv), cp.asarray(pos), slots, cache, 0, (c.dev16(cos), c.dev16(sin)), out=q)
    tag = f"{name} {pattern} Hq{hq} D{d} p{ps} sub{sub} N{n}"
    out = [compare("rope_write_kv_sparse.q", tag, q.get(), q_ref, 2e-3, 4e-3)]
    rot, exact = (2e-3, 4e-3), (0.0, 0.0)  # rotated keys and their statistics; values are copied
    names = ("k dense", "v dense", "k stream", "v stream", "kmax", "kmin")
    tols = (rot, exact, rot, exact, rot, rot)
    for what, got, ref, tol in zip(names, dev, want, tols, strict=True):
        if ref.size:  # a pool without heads (layer with no dense / no streaming heads) has nothing to check
            out.append(compare(f"rope_write_kv_sparse.{what}", tag, got.get(), ref, *tol))
    return out


def case_rope_write_kv_sparse(c: Ctx) -> list[Result]:
    return [r for n in ROPE_SPARSE for r in rope_write_kv_sparse_one(c, n)]
