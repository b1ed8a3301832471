"""Numba kernels of the CPU backend for decode-sized work (a few rows per step).

At batch 1 a decode step is a chain of small memory-bound operations: NumPy's per-call temporaries and
OpenBLAS's thread hand-offs (which stall for whole scheduler time slices on a busy host) cost more than
the arithmetic. These kernels read each operand once and write the result in place; all math is float32.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

# Reassociation (vectorized float32 sums) without "no NaN / no Inf", which masks and softmax rely on.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
NEG_INF = np.float32(-np.inf)


@nb.njit(fastmath=FAST, cache=True, nogil=True)
def gemv(x, w, out):
    """out[m, j] = dot(x[m], w[j]): each weight row comes from memory once, for all rows of x."""
    m, k = x.shape
    for j in range(w.shape[0]):
        for r in range(m):
            acc = np.float32(0.0)
            for i in range(k):
                acc += x[r, i] * w[j, i]
            out[r, j] = acc


@nb.njit(fastmath=FAST, cache=True, nogil=True, parallel=True)
def gemv_parallel(x, w, out, nt):
    """`gemv` with the weight rows split evenly over `nt` threads."""
    step = (w.shape[0] + nt - 1) // nt
    for c in nb.prange(nt):
        gemv(x, w[c * step : (c + 1) * step], out[:, c * step : (c + 1) * step])


@nb.njit(fastmath=FAST, cache=True, nogil=True)
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


@nb.njit(fastmath=FAST, cache=True, nogil=True)
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


@nb.njit(cache=True, nogil=True)
def silu_mul(gate_up, out):
    """out = silu(gate) * up for the fused [N, 2*I] gate/up rows."""
    n, i2 = gate_up.shape
    inter = i2 // 2
    one = np.float32(1.0)
    for r in range(n):
        for i in range(inter):
            g = gate_up[r, i]
            out[r, i] = (g / (one + np.exp(-g))) * gate_up[r, inter + i]


@nb.njit(cache=True, nogil=True)
def rope_write_kv(qkv, positions, slots, k_cache, v_cache, cos, sin, q):
    """Half-split RoPE on q and k of each row; k and v go to their page slot, q to `q` [N, Hq, D]."""
    hkv, page, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    hq, half = q.shape[1], d // 2
    for t in range(qkv.shape[0]):
        p, pg, off = positions[t], slots[t] // page, slots[t] % page
        for h in range(hq + hkv):
            dst = q[t, h] if h < hq else k_cache[pg, h - hq, off]
            for i in range(half):
                a, b = qkv[t, h * d + i], qkv[t, h * d + half + i]
                dst[i] = a * cos[p, i] - b * sin[p, i]
                dst[half + i] = b * cos[p, i] + a * sin[p, i]
        for h in range(hkv):
            for i in range(d):
                v_cache[pg, h, off, i] = qkv[t, (hq + hkv + h) * d + i]


@nb.njit(fastmath=FAST, cache=True, nogil=True)
def paged_attention(q, k_cache, v_cache, qb_start, qb_len, qb_pos, ctx, indptr, kv_page, kv_lpage,
                    head_class, sink, local, out):  # fmt: skip
    """Execute an attention plan: per query block and KV head, the pages of the head's class.

    Mask: key <= query position, key < context end, and for class 1 (streaming) key < sink or
    query - key < local. Exact two-pass float32 softmax, as `paged_attention_ref`'s NumPy path.
    """
    for qb in range(qb_start.shape[0]):
        for h in range(k_cache.shape[1]):
            cls = head_class[h]
            lo, hi = indptr[qb * 2 + cls], indptr[qb * 2 + cls + 1]
            win = (sink, local) if cls == 1 else (-1, -1)
            rows = (qb_start[qb], qb_len[qb], qb_pos[qb], ctx[qb])
            _attend_block(q, k_cache, v_cache, h, rows, kv_page[lo:hi], kv_lpage[lo:hi], win, out)


@nb.njit(fastmath=FAST, cache=True, nogil=True)
def _attend_block(q, k_cache, v_cache, h, rows, pages, lpages, win, out):
    """One query block x KV head h: masked scores of its query heads over the pages, softmax, sum of V."""
    r0, nr, pos0, ctx = rows
    page, d = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // k_cache.shape[1]
    nq, nk = nr * group, pages.shape[0] * page
    qv = np.empty((nq, d), np.float32)
    scale = np.float32(1.0 / math.sqrt(d))
    for r in range(nr):
        for g in range(group):
            qv[r * group + g] = q[r0 + r, h * group + g]
    s = np.empty((nq, nk), np.float32)
    for pi in range(pages.shape[0]):
        for o in range(page):
            kpos, key = lpages[pi] * page + o, k_cache[pages[pi], h, o]
            for r in range(nr):
                qpos = pos0 + r
                ok = kpos <= qpos and kpos < ctx and (win[1] < 0 or kpos < win[0] or qpos - kpos < win[1])
                for j in range(r * group, (r + 1) * group):
                    acc = np.float32(0.0)
                    for i in range(d):
                        acc += qv[j, i] * key[i]
                    s[j, pi * page + o] = acc * scale if ok else NEG_INF
    tot = _exp_rows(s)
    acc = np.zeros((nq, d), np.float32)
    for pi in range(pages.shape[0]):
        for o in range(page):
            val = v_cache[pages[pi], h, o]
            for j in range(nq):
                p = s[j, pi * page + o]
                for i in range(d):
                    acc[j, i] += p * val[i]
    for r in range(nr):
        for g in range(group):
            out[r0 + r, h * group + g] = acc[r * group + g] / tot[r * group + g]


@nb.njit(fastmath=FAST, cache=True, nogil=True)
def _exp_rows(s):
    """In place s = exp(s - row max) (-inf entries become 0); return the row sums."""
    tot = np.zeros(s.shape[0], np.float32)
    for j in range(s.shape[0]):
        m = NEG_INF
        for i in range(s.shape[1]):
            m = max(m, s[j, i])
        for i in range(s.shape[1]):
            e = np.exp(s[j, i] - m) if s[j, i] != NEG_INF else np.float32(0.0)
            s[j, i] = e
            tot[j] += e
    return tot
