"""Harness rows of the page selectors (kernels/page_select.cu, backends/numba_page_select.py) against
backends/reference/page_select.py."""

from __future__ import annotations

import numpy as np

from ..backends.cuda import SELECTORS, page_selector
from ..backends.reference.page_select import select_pages_ref
from ..config import GROUP_REDUCE
from ..sparse.selector import page_scores
from .attention import SPARSE_DECODE, decode_setup
from .common import Ctx, Result
from .sparse_batch import SparseBatch, sparse_cache

# Long lists, selector rows only (the attention rows' NumPy references would take minutes there): the page
# count of a 256k-token context with Llama-3-8B heads, half of them streaming (page_topk keeps its 4095
# candidates in registers), 8192 pages (staged in shared memory) and 17024 pages (past the stage: every pass
# rereads L2); one long list among 15 short ones (the score grid, sized for the average list, gives a warp
# ~50 pages: more than one page-table fetch of 32). Same format as SPARSE_DECODE.
SELECT_LONG = {
    "one_long_15_short": ([64 * 1200] + [300] * 15, 8, "01", 128, 64, 4, [16] * 16, [(128, 256)] * 16, None),
    "llama3_256k": ([262144], 32, "01010101", 128, 64, 4, [64], [(128, 256)], None),
    "llama3_128k_p16": ([131072], 32, "01010101", 128, 16, 4, [256], [(128, 256)], None),
    "llama3_272k_p16": ([272384], 32, "01010101", 128, 16, 4, [256], [(128, 256)], None),
}
# Exact ties: small-integer queries and key statistics make every page bound an exact integer in fp32 on both
# sides, so many pages tie the cut and the GPU must take the lowest-index ties exactly (group_reduce max: no
# near-tie allowance). One list per page_topk path (registers, shared memory, L2), D 128 and 64.
SELECT_TIES = {
    "ties_20k_p16": ([20000], 32, "01010101", 128, 16, 4, [64], [(128, 256)], None),
    "ties_96k_d64_p16": ([96000], 32, "01010101", 64, 16, 4, [128], [(128, 256)], None),
    "ties_272k_d64_p16": ([272384], 32, "01010101", 64, 16, 4, [256], [(128, 256)], None),
}
# Query groups other than SPARSE_DECODE's 2 and 4: 1 (multi-head attention), 3 (SmolLM2: 9 query heads on 3 KV
# heads, D 64) and 6 (page_topk's `mass` takes four heads a round: a second, partial round). Same format.
SELECT_GROUPS = {
    "group1": ([3000, 900], 4, "0101", 64, 16, 4, [40, 20], [(32, 64)] * 2, None),
    "group3_smollm2": ([5000, 1300], 9, "010", 64, 64, 4, [16, 8], [(64, 128)] * 2, None),
    "group6": ([4000], 12, "01", 128, 16, 4, [64], [(128, 256)], None),
}
SELECT_SETUPS = {**SELECT_LONG, **SELECT_TIES, **SELECT_GROUPS}  # the selector-only setups, by name


def integer_stats(c: Ctx, b: SparseBatch, kmax: np.ndarray, kmin: np.ndarray) -> None:
    """In place: q in {-2..2}, kmax in {-3..3}, kmin = kmax - {0, 1, 2} (every bound an exact fp32 integer)."""
    b.q[...] = c.rng.integers(-2, 3, b.q.shape)
    kmax[...] = c.rng.integers(-3, 4, kmax.shape)
    kmin[...] = kmax - c.rng.integers(0, 3, kmax.shape)


def page_select_one(c: Ctx, name: str, group_reduce: str = "max", selector: str = "rawkernel") -> Result:
    """A page selector launcher (backends.cuda.page_selector) vs select_pages_ref on a poisoned (-1)
    selection: the selected page sets per (selection slot, dense head), the counts, and rows the selector
    must leave alone (streaming heads, no budget, reused selections). abs = mismatching rows; a set that
    differs only by pages whose reference scores tie the k-th best within fp32 summation error is noted,
    not counted (except for SELECT_TIES with group_reduce max: exact). `name`: a setup of SPARSE_DECODE or
    SELECT_SETUPS."""
    b, kmax, kmin, cap = decode_setup(c, name, SELECT_SETUPS.get(name))
    exact = name in SELECT_TIES and group_reduce == "max"
    if name in SELECT_TIES:
        integer_stats(c, b, kmax, kmin)
    b.plan.group_reduce = group_reduce
    hkv = b.hc.size
    sel = np.full((b.num_slots, hkv, cap), -1, np.int32)
    cnt = np.full((b.num_slots, hkv), -1, np.int32)
    select_pages_ref(b.q, kmax, kmin, b.plan, b.hc, b.slot, sel, cnt)
    cache = sparse_cache(c, b, kmax, kmin, cap=cap)
    page_selector(selector)(
        c.dev16(b.q), cache.kmax[0], cache.kmin[0], c.ops.prepare_plan(b.plan), cache.head_class[0],
        cache.head_slot[0], cache.sel_idx[0], cache.sel_cnt[0],
    )  # fmt: skip
    got_sel, got_cnt = cache.sel_idx[0].get(), cache.sel_cnt[0].get()
    hard, near = selection_mismatches(b, kmax, kmin, got_sel, got_cnt, sel, cnt)
    if exact:  # exact integer scores: a near-tie swap is a wrong tie rule
        hard, near = hard + near, 0
    pattern = "".join(str(int(x)) for x in b.hc)
    tag = f"{name} {selector} {group_reduce} {pattern} Hq{b.q.shape[1]} D{b.q.shape[2]} p{b.plan.page_size}"
    note = "abs = mismatching rows" + (f"; {near} near-tie swaps" if near else "")
    return Result("page_select", tag, hard, 0.0, hard == 0, note)


def selection_mismatches(b: SparseBatch, kmax, kmin, sel_g, cnt_g, sel_r, cnt_r) -> tuple[int, int]:
    """(rows that differ, rows that differ only by near-ties) between a GPU and a reference selection."""
    plan = b.plan
    qb_of_slot = {int(plan.qb_slot[qb]): qb for qb in range(plan.num_qblocks)}
    hard = near = 0
    for s in range(sel_r.shape[0]):
        for g in range(sel_r.shape[1]):
            k = int(cnt_r[s, g])
            tail = max(k, 0)  # entries past the count: left as they were (poison) on both sides
            if int(cnt_g[s, g]) != k or not np.array_equal(sel_g[s, g, tail:], sel_r[s, g, tail:]):
                hard += 1
                continue
            got, want = set(sel_g[s, g, : max(k, 0)].tolist()), set(sel_r[s, g, : max(k, 0)].tolist())
            if got == want:
                continue
            if len(got) != k or b.hc[g] != 0 or s not in qb_of_slot:
                hard += 1
                continue
            qb = qb_of_slot[s]
            table, _ = plan.pages(qb, 0)
            group = b.q.shape[1] // b.hc.size
            qg = b.q[plan.qb_start[qb]].reshape(b.hc.size, group, -1)[g]
            st = (kmax[:, b.slot[g] : b.slot[g] + 1], kmin[:, b.slot[g] : b.slot[g] + 1])
            ctx = int(plan.qb_pos[qb]) + 1
            scores = page_scores(qg, *st, table, ctx, group, plan.page_size, plan.group_reduce)[0, :-1]
            kth = np.sort(scores)[::-1][k - 2]
            swapped = np.asarray(sorted(got ^ want))
            tol = 1e-4 * max(1.0, abs(kth))
            if swapped.max() < scores.size and np.all(np.abs(scores[swapped] - kth) <= tol):
                near += 1
            else:
                hard += 1
    return hard, near


def case_page_select(c: Ctx) -> list[Result]:
    return [
        page_select_one(c, n, r, k)
        for n in [*SPARSE_DECODE, *SELECT_SETUPS]
        for r in GROUP_REDUCE
        for k in SELECTORS
    ]
