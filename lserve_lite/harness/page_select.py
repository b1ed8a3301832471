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

# The page count of a 256k-token context (Llama-3-8B heads, half of them streaming): selector rows only, the
# attention rows' NumPy references would take minutes there.
SELECT_LONG = {"llama3_256k": ([262144], 32, "01010101", 128, 64, 4, [64], [(128, 256)], None)}


def page_select_one(c: Ctx, name: str, group_reduce: str = "max", selector: str = "rawkernel") -> Result:
    """A page selector launcher (backends.cuda.page_selector) vs select_pages_ref on a poisoned (-1)
    selection: the selected page sets per (selection slot, dense head), the counts, and rows the selector
    must leave alone (streaming heads, no budget, reused selections). abs = mismatching rows; a set that
    differs only by pages whose reference scores tie the k-th best within fp32 summation error is noted,
    not counted. `name`: a setup of SPARSE_DECODE or SELECT_LONG."""
    b, kmax, kmin, cap = decode_setup(c, name, SELECT_LONG.get(name))
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
    hard, near = _selection_mismatches(b, kmax, kmin, got_sel, got_cnt, sel, cnt)
    pattern = "".join(str(int(x)) for x in b.hc)
    tag = f"{name} {selector} {group_reduce} {pattern} Hq{b.q.shape[1]} D{b.q.shape[2]} p{b.plan.page_size}"
    note = "abs = mismatching rows" + (f"; {near} near-tie swaps" if near else "")
    return Result("page_select", tag, hard, 0.0, hard == 0, note)


def _selection_mismatches(b: SparseBatch, kmax, kmin, sel_g, cnt_g, sel_r, cnt_r) -> tuple[int, int]:
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
        for n in [*SPARSE_DECODE, *SELECT_LONG]
        for r in GROUP_REDUCE
        for k in SELECTORS
    ]
