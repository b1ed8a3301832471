"""Logical-page key statistics and the query-aware page selector (CPU references)."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.kv.page_stats import alloc_page_stats, page_stats_reference, update_page_stats
from lserve_lite.sparse.selector import SelectorState, page_scores, select_pages, top_pages

PS, SUB, HKV, D = 16, 4, 2, 8


def _write(cache, table, pos, rng):
    """Write random keys at positions `pos` of a sequence; return their slots."""
    pos = np.asarray(pos)
    slots = np.asarray(table)[pos // PS] * PS + pos % PS
    cache[slots // PS, :, slots % PS] = rng.standard_normal((len(pos), HKV, D)).astype(np.float32)
    return slots


def _brute_stats(cache, table, ctx):
    """Independent loop: per valid token, fold its key into its logical page's max/min."""
    n = -(-ctx // PS)
    kmax = np.full((n, HKV, SUB, D), -np.inf, np.float32)
    kmin = np.full((n, HKV, SUB, D), np.inf, np.float32)
    for t in range(ctx):
        k = cache[table[t // PS], :, t % PS]
        s = (t % PS) // (PS // SUB)
        kmax[t // PS, :, s] = np.maximum(kmax[t // PS, :, s], k)
        kmin[t // PS, :, s] = np.minimum(kmin[t // PS, :, s], k)
    return kmax, kmin


@pytest.mark.parametrize("chunks", [[1] * 45, [7, 1, 1, 20, 3, 13], [45], [16, 16, 13]])
def test_incremental_stats_equal_from_scratch(chunks):
    rng = np.random.default_rng(len(chunks))
    num_pages = 8
    cache = rng.standard_normal((num_pages, HKV, PS, D)).astype(np.float32)  # garbage in unwritten slots
    kmax, kmin = alloc_page_stats(num_pages, HKV, SUB, D)
    kmax[:] = 99.0  # stale values from a previous owner of the pages
    kmin[:] = -99.0
    table = [5, 2, 7]
    ctx = 0
    for n in chunks:
        slots = _write(cache, table, range(ctx, ctx + n), rng)
        update_page_stats(kmax, kmin, cache, slots)
        ctx += n
        ref_max, ref_min = page_stats_reference(cache, table, ctx, SUB)
        bmax, bmin = _brute_stats(cache, table, ctx)
        n_lp = -(-ctx // (PS // SUB))  # logical pages holding valid tokens
        got_max = kmax[table[: len(ref_max)]].transpose(0, 2, 1, 3).reshape(-1, HKV, D)[:n_lp]
        got_min = kmin[table[: len(ref_max)]].transpose(0, 2, 1, 3).reshape(-1, HKV, D)[:n_lp]
        for ref, brute, got in ((ref_max, bmax, got_max), (ref_min, bmin, got_min)):
            ref = ref.transpose(0, 2, 1, 3).reshape(-1, HKV, D)[:n_lp]
            brute = brute.transpose(0, 2, 1, 3).reshape(-1, HKV, D)[:n_lp]
            np.testing.assert_array_equal(got, ref)
            np.testing.assert_array_equal(got, brute)


def test_stats_shuffled_slots_and_empty():
    rng = np.random.default_rng(3)
    cache = rng.standard_normal((4, HKV, PS, D)).astype(np.float32)
    kmax, kmin = alloc_page_stats(4, HKV, SUB, D)
    update_page_stats(kmax, kmin, cache, np.array([], np.int64))
    assert not kmax.any()
    slots = _write(cache, [3, 1], range(0, 27), rng)
    update_page_stats(kmax, kmin, cache, rng.permutation(slots))  # order of slots does not matter
    ref_max, ref_min = page_stats_reference(cache, [3, 1], 27, SUB)
    np.testing.assert_array_equal(kmax[[3, 1]][:, :, :3], ref_max[:, :, :3])
    np.testing.assert_array_equal(kmin[1, :, 2], ref_min[1, :, 2])  # partial logical page: 3 tokens


def _setup(ctx, seed=0, group=3):
    rng = np.random.default_rng(seed)
    n = -(-ctx // PS)
    num_pages = n + 5
    table = rng.permutation(num_pages)[:n]
    cache = rng.standard_normal((num_pages, HKV, PS, D)).astype(np.float32)
    kmax, kmin = alloc_page_stats(num_pages, HKV, SUB, D)
    update_page_stats(kmax, kmin, cache, (table[:, None] * PS + np.arange(PS)).reshape(-1)[:ctx])
    q = rng.standard_normal((HKV * group, D)).astype(np.float32)
    return q, cache, kmax, kmin, table, group


def _independent_scores(q, cache, table, ctx, group):
    """Page score straight from the keys: max over group heads and logical pages of sum_c max(q k)."""
    n = -(-ctx // PS)
    lp = PS // SUB
    out = np.full((HKV, n), -np.inf)
    for h in range(HKV):
        for p in range(n):
            for s in range(SUB):
                lo = p * PS + s * lp
                if lo >= ctx:
                    continue
                k = cache[table[p], h, s * lp : s * lp + min(lp, ctx - lo)].astype(np.float64)
                for g in range(group):
                    qq = q[h * group + g].astype(np.float64)
                    v = np.maximum(qq * k.max(0), qq * k.min(0)).sum()
                    out[h, p] = max(out[h, p], v)
    return out


@pytest.mark.parametrize("ctx,seed", [(200, 0), (161, 1), (17, 2), (300, 3)])
def test_scores_and_topk_bruteforce(ctx, seed):
    q, cache, kmax, kmin, table, group = _setup(ctx, seed)
    sc = page_scores(q, kmax, kmin, table, ctx, group, PS)
    ref = _independent_scores(q, cache, table, ctx, group)
    np.testing.assert_allclose(sc, ref, rtol=1e-5, atol=1e-5)
    budget = 4 * PS
    pages, lpages = select_pages(q, kmax, kmin, table, ctx, group, budget, PS)
    n = -(-ctx // PS)
    k = min(n, budget // PS)
    assert pages.shape == lpages.shape == (HKV, k) and pages.dtype == np.int32
    np.testing.assert_array_equal(pages, table[lpages])
    for h in range(HKV):
        row = lpages[h]
        assert np.all(np.diff(row) > 0) and row[-1] == n - 1  # sorted; newest page always present
        if n > k:  # the others are the true top-(k-1) by the independent score
            others = row[:-1]
            rest = np.setdiff1d(np.arange(n - 1), others)
            assert ref[h, others].min() >= ref[h, rest].max() - 1e-5


def test_budget_covers_context_returns_all_pages():
    for ctx in (1, 16, 64, 65):
        q, _, kmax, kmin, table, group = _setup(ctx, 7)
        n = -(-ctx // PS)
        pages, lpages = select_pages(q, kmax, kmin, table, ctx, group, max(2 * PS, n * PS), PS)
        np.testing.assert_array_equal(lpages, np.tile(np.arange(n), (HKV, 1)))
        np.testing.assert_array_equal(pages[0], table[:n])


def test_newest_page_kept_even_if_lowest():
    q, cache, kmax, kmin, table, group = _setup(160, 4)
    kmax[table[-1]] = -50.0  # make the newest page score terribly
    kmin[table[-1]] = -60.0
    q = np.abs(q)
    _, lpages = select_pages(q, kmax, kmin, table, 160, group, 2 * PS, PS)
    assert np.all(lpages[:, -1] == 9) and lpages.shape == (HKV, 2)


def test_gqa_max_over_group():
    q, cache, kmax, kmin, table, group = _setup(128, 5)
    full = page_scores(q, kmax, kmin, table, 128, group, PS)
    per_head = [
        page_scores(q[i : i + 1], kmax[:, :1], kmin[:, :1], table, 128, 1, PS)[0] for i in range(group)
    ]
    np.testing.assert_allclose(full[0], np.max(per_head, axis=0), rtol=1e-6)


def test_top_pages_ties_deterministic():
    s = np.zeros((1, 6))
    np.testing.assert_array_equal(top_pages(s, 3), [[0, 1, 5]])


def test_selector_state_reuse_interval():
    ctx = 200
    q, cache, kmax, kmin, table, group = _setup(ctx, 6)
    st = SelectorState(token_budget=4 * PS, page_size=PS, interval=4)
    rng = np.random.default_rng(0)
    recomputed, sels = [], []
    qs = [rng.standard_normal(q.shape).astype(np.float32) for _ in range(9)]
    for step in range(9):
        pages, lpages = st.select(1, 0, qs[step], kmax, kmin, table, ctx, group)
        recomputed.append(st.last_recomputed)
        sels.append(lpages.copy())
        if st.last_recomputed:
            np.testing.assert_array_equal(
                lpages, select_pages(qs[step], kmax, kmin, table, ctx, group, 4 * PS, PS)[1]
            )
        else:
            np.testing.assert_array_equal(lpages, sels[-2])  # reused unchanged
    assert recomputed == [True, False, False, False, True, False, False, False, True]
    assert st.num_recomputes == 3
    # other (sequence, layer) keys are independent
    st.select(1, 1, q, kmax, kmin, table, ctx, group)
    assert st.last_recomputed
    st.drop(1)
    st.select(1, 0, q, kmax, kmin, table, ctx, group)
    assert st.last_recomputed


def test_selector_state_new_page_included_between_recomputes():
    rng = np.random.default_rng(8)
    num_pages, budget = 20, 4 * PS
    cache = rng.standard_normal((num_pages, HKV, PS, D)).astype(np.float32)
    kmax, kmin = alloc_page_stats(num_pages, HKV, SUB, D)
    table = list(rng.permutation(num_pages))
    ctx = 5 * PS - 1  # 5 pages, last one has one free slot
    update_page_stats(kmax, kmin, cache, (np.asarray(table)[:5, None] * PS + np.arange(PS)).reshape(-1)[:ctx])
    q = rng.standard_normal((HKV * 3, D)).astype(np.float32)
    st = SelectorState(budget, PS, interval=8)
    _, first = st.select(0, 0, q, kmax, kmin, table, ctx, 3)
    assert st.last_recomputed and first.shape == (HKV, 4) and np.all(first[:, -1] == 4)
    scores = page_scores(q, kmax, kmin, table, ctx, 3, PS)
    for _ in range(1, 4):  # decode steps: the 5th page fills, then the 6th page starts
        ctx += 1
        update_page_stats(kmax, kmin, cache, [table[(ctx - 1) // PS] * PS + (ctx - 1) % PS])
        pages, lp = st.select(0, 0, q, kmax, kmin, table, ctx, 3)
        assert not st.last_recomputed
        n = -(-ctx // PS)
        assert lp.shape == (HKV, 4) and np.all(lp[:, -1] == n - 1)  # newest page present, budget kept
        np.testing.assert_array_equal(pages, np.asarray(table)[lp])
        if n == 6:
            for h in range(HKV):
                assert 4 in lp[h]  # the previous newest page stays
                old = first[h, :-1]
                dropped = old[np.argmin(scores[h, old])]  # the lowest-scoring old page was evicted
                np.testing.assert_array_equal(lp[h], sorted([p for p in old if p != dropped] + [4, 5]))


def test_selector_state_fit_then_outgrow_recomputes():
    q, cache, kmax, kmin, table, group = _setup(300, 9)
    st = SelectorState(token_budget=4 * PS, page_size=PS, interval=100)
    _, lp = st.select(0, 0, q, kmax, kmin, table, 3 * PS, group)
    assert lp.shape == (HKV, 3)
    _, lp = st.select(0, 0, q, kmax, kmin, table, 3 * PS + 1, group)  # 4 pages: still fits, appended
    assert not st.last_recomputed and lp.shape == (HKV, 4) and np.all(lp == np.arange(4))
    _, lp = st.select(0, 0, q, kmax, kmin, table, 4 * PS + 1, group)  # 5 pages: outgrew -> recompute
    assert st.last_recomputed and lp.shape == (HKV, 4) and np.all(lp[:, -1] == 4)
