"""`spread_norm`: the spread norm of batch-1 packed-weight decode (kernels/spread_norm.cuh; CudaOps.linear_add and
the Added it hands rmsnorm_linear / qkv_rope), on a CudaOps with it forced on."""

from __future__ import annotations

import numpy as np

from ..backends.base import Added, KVCache
from .common import Ctx, Result, compare
from .quant import U32, activation_bound, norm_linear_ref, random_quant, reference_matrix, unit_scale

# (format, K, M) of the output projections: SmolLM2's o_proj and down, Llama-3-8B's down (the deep sets)
ADD_CASES = [("q4_1", 576, 576), ("q4_1", 1536, 576), ("int8", 14336, 4096), ("q4_k", 512, 301)]
NORM_CASES = [("q4_1", 576, 1536), ("int4", 4096, 14336), ("q6_k", 256, 77)]  # (format, K, I) of gate_up
ROPE_CASES = [("q4_1", 576, 9, 3, 64), ("int8", 512, 8, 2, 128)]  # (format, K, Hq, Hkv, D) of q/k/v


def case_spread_norm(c: Ctx) -> list[Result]:
    """The producer against res + fp16(the plain split GEMV's product) bit for bit, its output against x @ W^T in
    float64, its partials summing to the stream's float64 sum of squares; gate_up + SiLU against
    harness.quant.norm_linear_ref from partials cut at random points; q/k/v + RoPE bit for bit against the composed
    path (add_rmsnorm, then the split RoPE GEMV) where the norm is exact (a stream of +-2, eps 0: rstd = 1/2)."""
    from ..backends.cuda import CudaOps

    ops, cp, out = CudaOps(spread_norm=True), c.cp, []
    for fmt, k, m in ADD_CASES:
        qt = random_quant(fmt, m, k, c.rng)
        ref_w, w = reference_matrix(qt), ops.upload(qt)
        x = (c.rng.standard_normal((1, k)) * unit_scale(ref_w)).astype(np.float16)
        res = (3 * c.rng.standard_normal((1, m))).astype(np.float32)
        y = ops.linear(c.dev16(x), w).get()  # the plain split GEMV, fp16
        stream = cp.asarray(res)
        added, got = ops.linear_add(c.dev16(x), w, stream)
        tag = f"{fmt} K{k} M{m}"
        if not isinstance(added, Added) or got is not stream:
            out.append(Result("spread_norm.add", tag, np.inf, np.inf, False, "not the spread path"))
            continue
        got = got.get()
        out.append(compare("spread_norm.add residual", tag, got, res + y.astype(np.float32), 0, 0))
        ref = x.astype(np.float64) @ ref_w.T
        atol = (k / 32 + 20) * U32 * (np.abs(x.astype(np.float64)) @ np.abs(ref_w).T) + activation_bound(
            x, ref_w
        )
        out.append(compare("spread_norm.add vs float64", tag, got - res, ref, atol, 2.0**-11))
        parts = added.part[: added.parts].get().astype(np.float64).sum()
        ss = float(np.sum(got.astype(np.float64) ** 2))
        out.append(compare("spread_norm.add partials", f"{tag} parts {added.parts}", [parts], [ss], 0, 1e-5))
    for fmt, k, inter in NORM_CASES:
        qt = random_quant(fmt, 2 * inter, k, c.rng)
        ref_w, w = reference_matrix(qt), ops.upload(qt)
        res = (2 * c.rng.standard_normal((1, k))).astype(np.float32)
        lnw = ((c.rng.standard_normal(k) * 0.3 + 1) * 3 * unit_scale(ref_w)).astype(np.float16)
        ref, atol, _ = norm_linear_ref(np.zeros((1, k), np.float16), res, lnw, 1e-5, ref_w, True, True)
        got, got_res = ops.rmsnorm_linear(
            _partials(c, res), cp.asarray(res), c.dev16(lnw), 1e-5, w, silu=True
        )
        tag = f"{fmt} K{k} I{inter}"
        out.append(compare("spread_norm.gate_up", tag, got.get(), ref, atol, 2.0**-10))
        out.append(compare("spread_norm.gate_up residual", tag, got_res.get(), res, 0, 0))
    for fmt, k, hq, hkv, d in ROPE_CASES:
        out += _rope_rows(c, ops, fmt, k, hq, hkv, d)
    return out


def random_partials(rng: np.random.Generator, row: np.ndarray, cuts: int) -> np.ndarray:
    """A row's sums of squares in float32 over pieces cut at `cuts` random points, then an empty piece's 0: partials
    as a producer's blocks leave them (also tools/spread_host_check.py's)."""
    sq = row.astype(np.float32) ** 2
    at = np.sort(rng.choice(np.arange(1, sq.size), cuts, replace=False))
    return np.asarray([np.sum(p, dtype=np.float32) for p in np.split(sq, at)] + [0.0], np.float32)


def _partials(c: Ctx, res: np.ndarray) -> Added:
    """res's partials (random_partials) on the device, as linear_add returns them."""
    part = random_partials(c.rng, res[0], 5)
    return Added(c.cp.asarray(part[:, None]), len(part))


def _rope_rows(c: Ctx, ops, fmt: str, k: int, hq: int, hkv: int, d: int) -> list[Result]:
    """q and the K/V slot of one decode row through the spread kernel, then the composed path, into fresh caches."""
    cp, page, pages, max_len = c.cp, 16, 4, 512
    m = (hq + 2 * hkv) * d
    qt = random_quant(fmt, m, k, c.rng)
    ref_w, w = reference_matrix(qt), ops.upload(qt)
    res = np.where(c.rng.random((1, k)) < 0.5, -2.0, 2.0).astype(np.float32)
    lnw = ((c.rng.standard_normal(k) * 0.3 + 1) * unit_scale(ref_w)).astype(np.float16)
    ang = c.rng.uniform(0, 2 * np.pi, (max_len, d // 2))
    rope = (c.dev16(np.cos(ang)), c.dev16(np.sin(ang)))
    pos = cp.asarray(c.rng.integers(0, max_len, 1).astype(np.int64))
    slots = cp.asarray(c.rng.integers(0, pages * page, 1).astype(np.int64))
    got = []
    for spread in (True, False):
        cache = KVCache(k=[c.poison((pages, hkv, page, d), np.float16)],
                        v=[c.poison((pages, hkv, page, d), np.float16)], page_size=page, num_pages=pages)  # fmt: skip
        x = _partials(c, res) if spread else c.dev16(np.zeros((1, k)))  # composed: add_rmsnorm(0 + res)
        q, _ = ops.qkv_rope(x, cp.asarray(res), c.dev16(lnw), 0.0, w, None, pos, slots, cache, 0, rope)
        got.append([q.get(), cache.k[0].get(), cache.v[0].get()])
    tag = f"{fmt} K{k} Hq{hq} Hkv{hkv} D{d}"
    return [
        compare(f"spread_norm.qkv_rope {n}", tag, a, b, 0, 0) for n, a, b in zip("qkv", *got, strict=True)
    ]
