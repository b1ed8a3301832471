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

from . import cpu_half, cpu_kv, cpu_native
from .cpu_kv import hadamard_row, kv_store, page_rows, page_scores, page_weighted_sum, to_f32
from .cpu_native import view
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


@intrinsic
def _f32_bits(typingctx, x):
    """The int32 with the same bits as a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@nb.njit(inline="always")
def _order_key(bits):
    """float32 bits as an int32 that orders as the floats do (-0.0 just below +0.0, NaN beyond +-inf by its sign);
    its own inverse."""
    return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


_POS_INF_KEY, _NEG_INF_KEY = np.int32(0x7F800000), np.int32(-0x7F800001)


@nb.njit(**JIT)
def sound_rows(x, sound):
    """reference.sampling.sound_rows_ref (every logit finite, not all equal) of float32 x [B, V] into sound [B]
    in one vectorizing pass of integer max / min (NumPy's takes two passes and six calls); returns the count."""
    n = 0
    for r in range(x.shape[0]):
        hi, lo = np.int32(-0x80000000), np.int32(0x7FFFFFFF)
        for j in range(x.shape[1]):
            k = _order_key(_f32_bits(x[r, j]))
            hi, lo = max(hi, k), min(lo, k)
        # finite: between -inf's key and +inf's; not all equal: as floats (-0.0 == +0.0)
        sound[r] = ok = (
            _NEG_INF_KEY < lo
            and hi < _POS_INF_KEY
            and _bits_to_f32(_order_key(hi)) > _bits_to_f32(_order_key(lo))
        )
        n += ok
    return n


@nb.njit(inline="always")
def exp32(x):
    """float32 exp (Cody-Waite reduction, Cephes polynomial, <= 1 ulp, median 0.25, on [-87, 0]) that vectorizes.

    Call it from kernels without fastmath "reassoc", which would fold the two-step reduction into one (4.4 ulp).
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
def rope_write_kv(
    qkv, positions, slots, k_cache, v_cache, k_scale, v_scale, cos, sin, q, k_rot=None, hadamard=False
):
    """Half-split RoPE on q and k of each row (then the Hadamard basis if `hadamard`: kv/quant.rotates_keys); k and
    v go to their page slot (quantized there for a quantized cache: `cpu_kv.kv_store`), q to `q` [N, Hq, D], and
    the rotated keys, unquantized, to k_rot [N, Hkv, D] if given (LServe's key statistics of a quantized cache:
    `merge_key_stats`)."""
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
            if hadamard:
                hadamard_row(dst)
            if h >= hq:
                kv_store(row, k_cache, k_scale, pg, h - hq, off)
                if k_rot is not None:
                    k_rot[t, h - hq] = row
        for h in range(hkv):
            kv_store(qkv[t, (hq + hkv + h) * d : (hq + hkv + h + 1) * d], v_cache, v_scale, pg, h, off)


@nb.njit(**JIT)
def merge_key_stats(kmax, kmin, keys, slots, page):
    """LServe's logical-page key max / min after keys [N, Hkv, D] (any stored row type: `to_f32`) were written at
    `slots` of a pool with pages of `page` tokens (in order within a sequence; -1: none): a slot at offset 0 of
    its logical page starts the page's statistics afresh, any other merges its key in. With tokens appended in
    order this is reference/page_stats.update_page_stats (a float cache: keys as stored) or merge_page_stats
    (a quantized cache: the unquantized keys): a NaN key makes its channel's max and min NaN, as theirs does
    (`nan_max`)."""
    lp = page // kmax.shape[2]
    for i in range(slots.shape[0]):
        if slots[i] < 0:
            continue
        pg, off = slots[i] // page, slots[i] % page
        sp, fresh = off // lp, off % lp == 0
        for h in range(keys.shape[1]):
            for c in range(keys.shape[2]):
                x = to_f32(keys[i, h, c])
                if fresh:
                    kmax[pg, h, sp, c] = x
                    kmin[pg, h, sp, c] = x
                else:
                    kmax[pg, h, sp, c] = nan_max(kmax[pg, h, sp, c], x)
                    kmin[pg, h, sp, c] = -nan_max(-kmin[pg, h, sp, c], -x)


@nb.njit(**JIT)
def nan_max(m, x):
    """max(m, x) with NaN sticky on either side, as NumPy's max: Python's max(m, NaN) keeps m (a NaN key was
    dropped from its page's statistics, a NaN bound from its page's score, unless it came first)."""
    return x if x > m or x != x else m


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


@nb.njit(fastmath=False, **JIT)
def _exp_shift(row, m):
    """In place row = exp(row - m), 0 where row is -inf (masked). fastmath=False said, not left unset: Numba gives a
    kernel that sets none the flags of the caller that first compiles it (and caches that), and the decode kernel's
    "reassoc" would fold exp32's reduction (4.4 ulp, 67 without FMA, instead of 0.95)."""
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


@nb.njit(inline="always")
def _runs(head_class, item_head, item, h):
    """Whether KV head h runs on plan item `item` (query block * 2 + class): its class, and the item's head if set."""
    return head_class[h] == item % 2 and (item_head[item] < 0 or item_head[item] == h)


@nb.njit(fastmath=FAST, **JIT)
def paged_attention(q, k_cache, v_cache, k_scale, v_scale, qb_start, qb_len, qb_pos, qb_seq, seq_ctx, indptr, kv_page,
                    kv_lpage, head_class, item_head, qb_sink, qb_local, chunk, part, acc, p0, p1, n):  # fmt: skip
    """Execute an attention plan's units that fall in parts p0..p1-1 of n (cut by visited pages); `merge_units`
    then writes the output. Unit u = (item, KV head of the item's class, run of `chunk` of its listed pages),
    item = query block * 2 + head class, enumerated in that order.

    A unit scores its rows (query row, query head of the KV head's group) over its pages. Mask: key <= query
    position, key < context end, and for class 1 (streaming) key < sink or query - key < local (the block's
    window: qb_sink, qb_local). item_head[item] >= 0 runs that KV head alone on the item (each head its own list:
    LServe's selections), -1 every head of the item's class. Exact two-pass
    float32 softmax over the unit's keys: part[u] = (row max, row sum of exp), acc[u] = the un-normalized
    weighted sum of V. Pages are read as stored, in any KV format (`cpu_kv.page_scores` / `page_weighted_sum`);
    values past the context's end are never read (a freed page's slots may hold anything, NaN included).
    """
    hkv, page, d = k_cache.shape[1], k_cache.shape[2], q.shape[2]
    group = q.shape[1] // hkv
    total = 0
    for item in range(indptr.shape[0] - 1):
        for h in range(hkv):
            if _runs(head_class, item_head, item, h):
                total += indptr[item + 1] - indptr[item]
    s = np.empty((part.shape[2], chunk * page), np.float32)
    qv = np.empty((part.shape[2], d), np.float32)
    tmp = np.empty(2 * d, np.float32)
    scale = np.float32(1.0 / math.sqrt(d))
    u, done = 0, 0
    for item in range(indptr.shape[0] - 1):
        qb, cls = item // 2, item % 2
        r0, nr, pos0, end = qb_start[qb], qb_len[qb], qb_pos[qb], seq_ctx[qb_seq[qb]]
        win = (qb_sink[qb], qb_local[qb]) if cls == 1 else (-1, -1)
        for h in range(hkv):
            if not _runs(head_class, item_head, item, h):
                continue
            for c0 in range(indptr[item], indptr[item + 1], chunk):
                c1 = min(c0 + chunk, indptr[item + 1])
                if p0 <= n * (2 * done + c1 - c0) // (2 * total) < p1:  # the part holding the unit's midpoint
                    for r in range(nr):
                        for g in range(group):
                            qv[r * group + g] = q[r0 + r, h * group + g]
                    rows, kv = (nr * group, nr, pos0, end), (k_cache, v_cache, k_scale, v_scale)
                    _attend_unit(
                        qv, kv, h, kv_page[c0:c1], kv_lpage[c0:c1], rows, win, scale, s, tmp, part[u], acc[u]
                    )
                done += c1 - c0
                u += 1


ATTN_ARRAYS = 19  # paged_attention's arrays, packed by `attention_args`: address and up to 4 dims each


@nb.njit(inline="always")
def _pack(a, i, x):
    a[5 * i] = x.ctypes.data
    for d in range(x.ndim):
        a[5 * i + 1 + d] = x.shape[d]
    return x.flags.c_contiguous


@nb.njit(**JIT)
def attention_args(q, k_cache, v_cache, k_scale, v_scale, qb_start, qb_len, qb_pos, qb_seq, seq_ctx, indptr, kv_page,
                   kv_lpage, head_class, item_head, qb_sink, qb_local, chunk, part, acc, n):  # fmt: skip
    """`paged_attention`'s operands (a float cache: fp32, or fp16 bits) as the int64 args of its `ATTENTION_JOBS`
    job; none (size 0: run Python parts) if an array is not C-contiguous or a plan vector not 32-bit."""
    a = np.zeros(5 * ATTN_ARRAYS + 2, np.int64)
    ok = _pack(a, 0, q) and _pack(a, 1, k_cache) and _pack(a, 2, v_cache) and _pack(a, 3, k_scale)
    ok = ok and _pack(a, 4, v_scale) and _pack(a, 17, part) and _pack(a, 18, acc)
    plan = (qb_start, qb_len, qb_pos, qb_seq, seq_ctx, indptr, kv_page, kv_lpage, head_class, item_head, qb_sink,
            qb_local)  # fmt: skip
    for i in range(12):
        ok = ok and _pack(a, 5 + i, plan[i]) and plan[i].itemsize == 4
    a[5 * ATTN_ARRAYS], a[5 * ATTN_ARRAYS + 1] = chunk, n
    return a if ok else a[:0]


@nb.njit(inline="always")
def _i32(a, i):
    return view(a[5 * i], (a[5 * i + 1],), nb.int32)


@nb.njit(inline="always")
def _f32(a, i):
    return view(a[5 * i], (a[5 * i + 1], a[5 * i + 2], a[5 * i + 3]), nb.float32)


@nb.njit(inline="always")
def _arr4(a, i, dtype):
    return view(a[5 * i], (a[5 * i + 1], a[5 * i + 2], a[5 * i + 3], a[5 * i + 4]), dtype)


def _attention_job(kv_type):
    """The decode attention job of a float cache of `kv_type` (float32, or uint16: fp16 bits) over args packed by
    `attention_args`: one per cache type, so that a process loads the compiled code of the type it uses only."""

    def job(args, p0, p1):
        """Parts p0..p1 of the call: a native job (cpu_native), so that its parts spread over the helper threads
        without the GIL (a Python part waits for it: ~30 us, the call's length)."""
        a = view(args, (5 * ATTN_ARRAYS + 2,), nb.int64)
        o = 5 * ATTN_ARRAYS
        paged_attention(_f32(a, 0), _arr4(a, 1, kv_type), _arr4(a, 2, kv_type), _arr4(a, 3, nb.float32),
                        _arr4(a, 4, nb.float32), _i32(a, 5), _i32(a, 6), _i32(a, 7), _i32(a, 8), _i32(a, 9),
                        _i32(a, 10), _i32(a, 11), _i32(a, 12), _i32(a, 13), _i32(a, 14), _i32(a, 15), _i32(a, 16),
                        a[o], _f32(a, 17), _f32(a, 18), p0, p1, a[o + 1])  # fmt: skip

    return job


# a float cache's kernel view (cpu_kv.kernel_view) -> its decode attention's native job
ATTENTION_JOBS = {d: _attention_job(nb.from_dtype(d)) for d in map(np.dtype, (np.float32, np.uint16))}


@nb.njit(fastmath=FAST, **JIT)
def _attend_unit(qv, kv, h, pages, lpages, rows, win, scale, s, tmp, ml, acc):
    """KV head h's score rows qv [R, D] over `pages`: (max, sum of exp) per row into ml, the weighted V into acc."""
    nq, nr, pos0, end = rows
    k_cache, v_cache, k_scale, v_scale = kv
    page, group = k_cache.shape[2], nq // nr
    for pi in range(pages.shape[0]):
        kpos0 = lpages[pi] * page
        for j in range(nq):
            page_scores(qv[j], k_cache, k_scale, pages[pi], h, s[j, pi * page : (pi + 1) * page], scale, tmp)
        if win[1] >= 0 or kpos0 + page > min(pos0 + 1, end):  # the page straddles a mask boundary
            for r in range(nr):
                qpos = pos0 + r
                for o in range(page):
                    kpos = kpos0 + o
                    if not (
                        kpos <= qpos and kpos < end and (win[1] < 0 or kpos < win[0] or qpos - kpos < win[1])
                    ):
                        s[r * group : (r + 1) * group, pi * page + o] = NEG_INF
    nk = pages.shape[0] * page
    for j in range(nq):
        ml[0, j] = _row_max(s[j, :nk])
        _exp_shift(s[j, :nk], ml[0, j])
        ml[1, j] = _row_sum(s[j, :nk])
    acc[:nq] = 0
    for pi in range(pages.shape[0]):
        valid = max(0, min(page, end - lpages[pi] * page))  # rows before the context's end (then: anything)
        for j in range(nq):
            page_weighted_sum(
                s[j, pi * page : (pi + 1) * page], v_cache, v_scale, pages[pi], h, acc[j], tmp, valid
            )


@nb.njit(**JIT)
def gather_pages(vals, scales, pages, h, out):
    """Head h's rows on `pages` into out [len(pages) * page, D] float32, dequantized (`cpu_kv.page_rows`)."""
    page = vals.shape[2]
    for i in range(pages.shape[0]):
        page_rows(vals, scales, pages[i], h, out[i * page : (i + 1) * page])


@nb.njit(**JIT)
def merge_units(qb_start, qb_len, indptr, head_class, item_head, chunk, part, acc, out):
    """out [N, Hq, D] from `paged_attention`'s units: per row, the units' sums rescaled to their common max
    (flash-decoding's merge; exact for a single unit: its weight is exp(0) = 1), over their total."""
    hkv = head_class.shape[0]
    group = out.shape[1] // hkv
    u = 0
    for item in range(indptr.shape[0] - 1):
        qb = item // 2
        units = (indptr[item + 1] - indptr[item] + chunk - 1) // chunk
        for h in range(hkv):
            if not _runs(head_class, item_head, item, h):
                continue
            for j in range(qb_len[qb] * group):
                o = out[qb_start[qb] + j // group, h * group + j % group]
                m = _row_max(part[u : u + units, 0, j])
                o[:] = 0
                tot = np.float32(0.0)
                for v in range(u, u + units):
                    x = part[v, 0, j] - m
                    w = exp32(x) if x >= EXP_MIN else np.float32(0.0)
                    tot += part[v, 1, j] * w
                    for i in range(o.shape[0]):
                        o[i] += w * acc[v, j, i]
                for i in range(o.shape[0]):
                    o[i] /= tot
            u += units


# The KV formats' store and page loops are compiled in from cpu_kv.py, its fp16 conversions from cpu_half.py, and
# the native jobs' array views from cpu_native.py, which Numba's cache does not track.
flush_if_deps_changed(globals(), [cpu_kv, cpu_half, cpu_native])
