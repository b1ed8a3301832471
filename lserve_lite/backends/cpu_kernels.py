"""Numba kernels of the CPU backend: GEMV, norms, activations, RoPE and softmax passes, decode attention.

A batch-1 decode step is a chain of small memory-bound operations, where NumPy's temporaries and per-call
costs outweigh the arithmetic; these kernels read each operand once and write in place. All math is float32.
`nogil` lets `SplitRunner` (cpu.py) run parts of one kernel call on several threads at once.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import cpu_kv
from .cpu_kv import kv_load, kv_store
from .numba_cache import flush_if_deps_changed

# Reassociation (vectorized float32 sums) without "no NaN / no Inf", which masks and softmax rely on.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
NEG_INF = np.float32(-np.inf)
# IEEE division (a ZeroDivisionError branch keeps loops from vectorizing); cached; callable off the GIL.
JIT = dict(cache=True, nogil=True, error_model="numpy")
EXP_MIN, EXP_MAX = np.float32(-87.33654), np.float32(88.37626)  # exp32 is 0 below, clamped above


@intrinsic
def _bits_to_f32(typingctx, i):
    """Reinterpret an int32 as the float32 with the same bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@nb.njit(inline="always")
def exp32(x):
    """float32 exp (Cody-Waite reduction, Cephes polynomial, <= 4.5 ulp, median 1.4, on [-87, 0]) that vectorizes.

    Call it from kernels without fastmath "reassoc", which would fold the two-step reduction into one.
    """
    x = min(max(x, EXP_MIN), EXP_MAX)
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@nb.njit(fastmath=FAST, **JIT)
def gemv_rows(x, w, out, j0, j1):
    """out[m, j] = dot(x[m], w[j]) for j0 <= j < j1: each weight row is read once, for all rows of x."""
    m, k = x.shape
    for j in range(j0, j1):
        for r in range(m):
            acc = np.float32(0.0)
            for i in range(k):
                acc += x[r, i] * w[j, i]
            out[r, j] = acc


@nb.njit(fastmath=FAST, **JIT)
def add_rmsnorm(x, residual, w, eps, h, res):
    """res = x + residual; h = res / sqrt(mean(res^2) + eps) * w, row by row (HF Llama RMSNorm)."""
    n, d = x.shape
    for r in range(n):
        ss = np.float32(0.0)
        for i in range(d):
            v = x[r, i] + residual[r, i]
            res[r, i] = v
            ss += v * v
        den = np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            h[r, i] = (res[r, i] / den) * w[i]


@nb.njit(fastmath=FAST, **JIT)
def rmsnorm(x, w, eps, h):
    """h = x / sqrt(mean(x^2) + eps) * w, row by row."""
    n, d = x.shape
    for r in range(n):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[r, i] * x[r, i]
        den = np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            h[r, i] = (x[r, i] / den) * w[i]


@nb.njit(**JIT)
def silu_mul(gate_up, out):
    """out = silu(gate) * up for the fused [N, 2*I] gate/up rows."""
    inter = out.shape[1]
    for r in range(out.shape[0]):
        _silu_mul_row(gate_up[r, :inter], gate_up[r, inter:], out[r])


@nb.njit(**JIT)
def _silu_mul_row(g, u, out):
    for i in range(out.shape[0]):
        out[i] = (g[i] / (np.float32(1.0) + exp32(-g[i]))) * u[i]


@nb.njit(**JIT)
def rope_write_kv(qkv, positions, slots, k_cache, v_cache, k_scale, v_scale, cos, sin, q):
    """Half-split RoPE on q and k of each row; k and v go to their page slot (quantized there for a quantized
    cache: `cpu_kv.kv_store`), q to `q` [N, Hq, D]."""
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    hq, d = q.shape[1], q.shape[2]
    half = d // 2
    row = np.empty(d, np.float32)
    for t in range(qkv.shape[0]):
        p, pg, off = positions[t], slots[t] // page, slots[t] % page
        for h in range(hq + hkv):
            dst = q[t, h] if h < hq else row
            for i in range(half):
                a, b = qkv[t, h * d + i], qkv[t, h * d + half + i]
                dst[i] = a * cos[p, i] - b * sin[p, i]
                dst[half + i] = b * cos[p, i] + a * sin[p, i]
            if h >= hq:
                kv_store(row, k_cache, k_scale, pg, h - hq, off)
        for h in range(hkv):
            kv_store(qkv[t, (hq + hkv + h) * d : (hq + hkv + h + 1) * d], v_cache, v_scale, pg, h, off)


@nb.njit(fastmath={"nnan", "nsz"}, **JIT)
def _row_max(row):
    m = NEG_INF
    for i in range(row.shape[0]):
        m = max(m, row[i])
    return m


@nb.njit(fastmath=FAST, **JIT)
def _row_sum(row):
    tot = np.float32(0.0)
    for i in range(row.shape[0]):
        tot += row[i]
    return tot


@nb.njit(**JIT)
def _exp_shift(row, m):
    """In place row = exp(row - m), 0 where row is -inf (masked)."""
    for i in range(row.shape[0]):
        v = row[i] - m
        row[i] = exp32(v) if v >= EXP_MIN else np.float32(0.0)


@nb.njit(fastmath=FAST, **JIT)
def _scale_mask(row, ok, scale):
    """In place row = row * scale where ok, -inf elsewhere."""
    for i in range(row.shape[0]):
        row[i] = row[i] * scale if ok[i] else NEG_INF


@nb.njit(**JIT)
def masked_softmax(s, ok, scale):
    """In place over scores s [R, G, K]: exp(s*scale - row max) where ok [R, K], else 0; row sums [R, G]."""
    tot = np.empty(s.shape[:2], np.float32)
    for r in range(s.shape[0]):
        for g in range(s.shape[1]):
            _scale_mask(s[r, g], ok[r], scale)
            _exp_shift(s[r, g], _row_max(s[r, g]))
            tot[r, g] = _row_sum(s[r, g])
    return tot


@nb.njit(fastmath=FAST, **JIT)
def paged_attention(q, k_cache, v_cache, k_scale, v_scale, qb_start, qb_len, qb_pos, ctx, indptr, kv_page, kv_lpage,
                    head_class, sink, local, out, i0, i1):  # fmt: skip
    """Execute an attention plan for work items i0..i1-1 (item = query block * 2 + head class).

    Each item visits the pages listed for its class with all KV heads of that class. Mask: key <= query
    position, key < context end, and for class 1 (streaming) key < sink or query - key < local.
    Exact two-pass float32 softmax. A quantized cache is dequantized row by row as it is read (`kv_load`).
    """
    for item in range(i0, i1):
        qb, cls = item // 2, item % 2
        heads = np.nonzero(head_class == cls)[0]
        lo, hi = indptr[item], indptr[item + 1]
        if heads.size == 0 or hi == lo:
            continue
        win = (sink, local) if cls == 1 else (-1, -1)
        rows = (qb_start[qb], qb_len[qb], qb_pos[qb], ctx[qb])
        kv = (k_cache, v_cache, k_scale, v_scale)
        _attend_block(q, kv, heads, rows, kv_page[lo:hi], kv_lpage[lo:hi], win, out)


@nb.njit(fastmath=FAST, **JIT)
def _attend_block(q, kv, heads, rows, pages, lpages, win, out):
    """One query block x the KV heads `heads`: masked scores over the pages, softmax, weighted sum of V.

    Pages are walked in memory order (page, head, key) so each page's heads stream as one block.
    """
    r0, nr, pos0, ctx = rows
    k_cache, v_cache, k_scale, v_scale = kv
    page, d = k_cache.shape[2], q.shape[2]
    buf = np.empty(d, np.float32)
    group = q.shape[1] // k_cache.shape[1]
    per_head = nr * group  # score rows of one KV head: (query row, query head of its group)
    nq, nk = heads.size * per_head, pages.shape[0] * page
    qv = np.empty((nq, d), np.float32)
    for hi in range(heads.size):
        for r in range(nr):
            for g in range(group):
                qv[hi * per_head + r * group + g] = q[r0 + r, heads[hi] * group + g]
    scale = np.float32(1.0 / math.sqrt(d))
    s = np.empty((nq, nk), np.float32)
    for pi in range(pages.shape[0]):
        for hi in range(heads.size):
            for o in range(page):
                kpos, key = lpages[pi] * page + o, kv_load(k_cache, k_scale, pages[pi], heads[hi], o, buf)
                for r in range(nr):
                    qpos = pos0 + r
                    ok = kpos <= qpos and kpos < ctx and (win[1] < 0 or kpos < win[0] or qpos - kpos < win[1])
                    for j in range(hi * per_head + r * group, hi * per_head + (r + 1) * group):
                        acc = np.float32(0.0)
                        for i in range(d):
                            acc += qv[j, i] * key[i]
                        s[j, pi * page + o] = acc * scale if ok else NEG_INF
    tot = np.empty(nq, np.float32)
    for j in range(nq):
        _exp_shift(s[j], _row_max(s[j]))
        tot[j] = _row_sum(s[j])
    acc = np.zeros((nq, d), np.float32)
    for pi in range(pages.shape[0]):
        for hi in range(heads.size):
            for o in range(page):
                val = kv_load(v_cache, v_scale, pages[pi], heads[hi], o, buf)
                for j in range(hi * per_head, (hi + 1) * per_head):
                    p = s[j, pi * page + o]
                    for i in range(d):
                        acc[j, i] += p * val[i]
    for hi in range(heads.size):
        for r in range(nr):
            for g in range(group):
                j = hi * per_head + r * group + g
                out[r0 + r, heads[hi] * group + g] = acc[j] / tot[j]


# The int4/int8 store and load above are compiled in from cpu_kv.py, which Numba's cache does not track.
flush_if_deps_changed(globals(), [cpu_kv])
