"""LServe's page selector on the CPU as Numba kernels: reference/page_select.select_pages_ref's rule
(sparse/selector.py: bounds, group reductions, the oracle, top pages) computed per (query block, dense KV head)
in place, without the reference's gathers, temporaries and sorts per block (~4 ms a decode step on SmolLM2)."""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ..sparse.plan import AttentionPlan
from . import cpu_half, cpu_kernels, cpu_kv
from .cpu_kernels import FAST, JIT, NEG_INF, nan_max
from .cpu_kv import kernel_view, to_f32
from .numba_cache import flush_if_deps_changed

REDUCE = {"max": 0, "mass": 1, "oracle": 2}  # plan.group_reduce as the kernel's code
NO_KEYS = np.zeros((1, 1, 1, 1), np.float32)  # the keys argument of the reductions that do not read them


def select_pages_numba(
    q, kmax, kmin, plan: AttentionPlan, head_class, head_slot, sel_idx, sel_cnt, k=None, split=None
) -> None:
    """`select_pages_ref` (same arguments, same selections); `split` (a SplitRunner) may spread the units
    (query block, dense KV head) over the backend's threads: each unit writes only its own rows."""
    if plan.qb_keep is None:
        return
    reduce = REDUCE[plan.group_reduce]
    refresh = np.ones_like(plan.qb_keep) if plan.qb_refresh is None else plan.qb_refresh
    keys = kernel_view(k) if reduce == 2 else NO_KEYS
    args = (q, kernel_view(kmax), kernel_view(kmin), keys, plan.qb_start, plan.qb_pos, plan.qb_slot, plan.qb_keep,
            refresh, plan.kv_indptr, plan.kv_page, np.asarray(head_class, np.int32),
            np.asarray(head_slot, np.int32), plan.page_size, reduce, sel_idx, sel_cnt)  # fmt: skip
    n = 1 if split is None else split.parts
    if n < 2:
        select_pages(*args, 0, 1, 1)
    else:
        key = ("select", plan.num_qblocks, plan.kv_page.shape[0].bit_length())
        split.run(key, lambda a, b: select_pages(*args, a, b, n), list(range(n + 1)), joint=True)


@nb.njit(**JIT)
def select_pages(q, kmax, kmin, keys, qb_start, qb_pos, qb_slot, qb_keep, qb_refresh, indptr, kv_page, head_class,
                 head_slot, page, reduce, sel_idx, sel_cnt, p0, p1, n):  # fmt: skip
    """The units in parts p0..p1-1 of n (cut by pages scored): unit (qb, h) for each block with a budget that
    refreshes this step and each dense KV head h, in that order, stores h's top pages -> sel_idx / sel_cnt
    [qb_slot[qb], h] (logical page indices, ascending, the newest among them)."""
    hkv = head_class.shape[0]
    total = 0
    for qb in range(qb_keep.shape[0]):
        if qb_keep[qb] > 0 and qb_refresh[qb] != 0:
            total += (qb_pos[qb] + page) // page * (hkv - np.count_nonzero(head_class))
    done = 0
    for qb in range(qb_keep.shape[0]):
        keep = qb_keep[qb]
        if keep <= 0 or qb_refresh[qb] == 0:
            continue
        ctx = qb_pos[qb] + 1
        pages = (ctx + page - 1) // page
        if indptr[2 * qb + 1] - indptr[2 * qb] < pages:
            raise ValueError("a selecting block's page list is shorter than its context")
        table = kv_page[indptr[2 * qb] : indptr[2 * qb] + pages]
        for h in range(hkv):
            if head_class[h] != 0:
                continue
            if p0 <= n * (2 * done + pages) // (2 * total) < p1:  # the part holding the unit's midpoint
                out = sel_idx[qb_slot[qb], h]
                if pages <= keep:
                    for p in range(pages):
                        out[p] = p
                    sel_cnt[qb_slot[qb], h] = pages
                else:
                    qg = q[qb_start[qb], h * (q.shape[1] // hkv) : (h + 1) * (q.shape[1] // hkv)]
                    if reduce == 2:
                        s = _oracle_scores(qg, keys, table, head_slot[h], ctx)
                    else:
                        s = _bound_scores(qg, kmax, kmin, table, head_slot[h], ctx, page, reduce)
                    sel_cnt[qb_slot[qb], h] = _top_pages(s, keep, out)
            done += pages


@nb.njit(**JIT)
def _top_pages(s, keep, out):
    """selector.top_pages of one head: the keep - 1 best of all pages but the newest (ties: the lower index; NaN
    below every number, as its argsort ranks it) and the newest, ascending, into out; returns keep. (NaN scores
    were never taken: fewer than keep - 1 pages were written, the rest of `out` left as it was.)"""
    last = s.shape[0] - 1
    want = keep - 1
    if want > 0:
        srt = np.sort(s[:last])  # NaN last
        numbers = last
        while numbers > 0 and srt[numbers - 1] != srt[numbers - 1]:
            numbers -= 1
        nans = max(0, want - numbers)  # NaN pages taken, by index
        thr = srt[numbers - want] if nans == 0 else NEG_INF  # the want-th largest number
        ties, c = want - nans, 0
        for p in range(last):
            if s[p] > thr:
                ties -= 1
        for p in range(last):
            v = s[p]
            if v != v:
                take = nans > 0
                nans -= 1
            else:
                take = v > thr or (v == thr and ties > 0)
                ties -= 1 if take and v == thr else 0
            if take:
                out[c] = p
                c += 1
    out[want] = last
    return keep


@nb.njit(fastmath=FAST, **JIT)
def _bounds(qg, kmax, kmin, table, row, ctx, page, b):
    """b[g, p] = max over the valid logical pages of page p of sum_c max(q_c * kmax_c, q_c * kmin_c) (kmax >= kmin:
    max(q, 0) * kmax + min(q, 0) * kmin), query head g of the group, stats row `row` of the dense pool."""
    group, d = qg.shape
    sub = kmax.shape[2]
    qp, qn = np.empty((group, d), np.float32), np.empty((group, d), np.float32)
    for g in range(group):
        for c in range(d):
            qp[g, c], qn[g, c] = max(qg[g, c], np.float32(0.0)), min(qg[g, c], np.float32(0.0))
    for p in range(table.shape[0]):
        pg = table[p]
        for sp in range(sub):
            if p * page + sp * (page // sub) >= ctx:  # holds no valid token (the first always does)
                break
            for g in range(group):
                acc = np.float32(0.0)
                for c in range(d):
                    acc += qp[g, c] * to_f32(kmax[pg, row, sp, c]) + qn[g, c] * to_f32(kmin[pg, row, sp, c])
                b[g, p] = acc if sp == 0 else nan_max(b[g, p], acc)  # NaN kept, as the reference's max


@nb.njit(**JIT)
def _bound_scores(qg, kmax, kmin, table, row, ctx, page, reduce):
    """selector.page_scores of one KV head: the group's max of the bounds, or (mass) the log of its summed
    softmax weights, each head's bounds / sqrt(D) against its logsumexp over the pages."""
    group, pages = qg.shape[0], table.shape[0]
    b = np.empty((group, pages), np.float32)
    _bounds(qg, kmax, kmin, table, row, ctx, page, b)
    s = np.empty(pages, np.float32)
    if reduce == 0:
        for p in range(pages):
            s[p] = b[0, p]
            for g in range(1, group):
                s[p] = nan_max(s[p], b[g, p])
        return s
    scale = np.float32(1.0 / math.sqrt(qg.shape[1]))
    for g in range(group):
        for p in range(pages):
            b[g, p] *= scale
        lse = _logsumexp(b[g])
        for p in range(pages):
            b[g, p] -= lse
    col = np.empty(group, np.float32)
    for p in range(pages):
        col[:] = b[:, p]
        s[p] = _logsumexp(col)
    return s


@nb.njit(**JIT)
def _oracle_scores(qg, keys, table, row, ctx):
    """selector.exact_page_scores of one KV head (less its constant log(group)): the log of the group's summed
    exact softmax weight per page, from the stored keys (float32 or fp16 bits)."""
    group, d = qg.shape
    page, pages = keys.shape[2], table.shape[0]
    scale = np.float32(1.0 / math.sqrt(d))
    t = np.empty((group, pages * page), np.float32)
    for p in range(pages):
        for o in range(page):
            valid = p * page + o < ctx
            for g in range(group):
                t[g, p * page + o] = _dot(qg[g], keys[table[p], row, o]) * scale if valid else NEG_INF
    for g in range(group):
        lse = _logsumexp(t[g, :ctx])
        for i in range(ctx):
            t[g, i] -= lse
    s = np.empty(pages, np.float32)
    col = np.empty(group, np.float32)
    for p in range(pages):
        for g in range(group):
            col[g] = _logsumexp(t[g, p * page : (p + 1) * page])
        s[p] = _logsumexp(col)
    return s


@nb.njit(fastmath=FAST, **JIT)
def _dot(a, b):
    acc = np.float32(0.0)
    for c in range(a.shape[0]):
        acc += a[c] * to_f32(b[c])
    return acc


@nb.njit(**JIT)
def _logsumexp(x):
    """max + log(sum exp(x - max)) rounded to float32 (its sum in float64); -inf for an all -inf row, NaN for a row
    holding NaN (as the reference's)."""
    m = NEG_INF
    for i in range(x.shape[0]):
        m = nan_max(m, x[i])
    if m == NEG_INF:
        return m
    acc = 0.0
    for i in range(x.shape[0]):
        acc += math.exp(np.float32(x[i] - m))
    return np.float32(m + math.log(acc))


# to_f32 (fp16 bits) is compiled in from cpu_kv.py and cpu_half.py, nan_max from cpu_kernels.py, which Numba's cache
# does not track.
flush_if_deps_changed(globals(), [cpu_kv, cpu_half, cpu_kernels])
