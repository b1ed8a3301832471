"""Logical-page key statistics and the query-aware page selector (CPU references)."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.backends.reference.page_stats import (
    page_stats_reference,
    update_page_stats,
)
from lserve_lite.geometry import budget_pages, visit_capacity
from lserve_lite.sparse.selector import (
    choose_pages,
    exact_page_scores,
    page_scores,
    refresh_due,
    top_pages,
    visited_selection,
)

PS, SUB, HKV, D = 16, 4, 2, 8


def _zero_stats(num_pages: int, hkv: int, sub: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero (kmax, kmin) [num_pages, hkv, sub, d], as the pools start."""
    return np.zeros((num_pages, hkv, sub, d), np.float32), np.zeros((num_pages, hkv, sub, d), np.float32)


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
    kmax, kmin = _zero_stats(num_pages, HKV, SUB, D)
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
    kmax, kmin = _zero_stats(4, HKV, SUB, D)
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
    kmax, kmin = _zero_stats(num_pages, HKV, SUB, D)
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
    pages, lpages = _select(q, kmax, kmin, table, ctx, group, budget)
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
        pages, lpages = _select(q, kmax, kmin, table, ctx, group, max(2 * PS, n * PS))
        np.testing.assert_array_equal(lpages, np.tile(np.arange(n), (HKV, 1)))
        np.testing.assert_array_equal(pages[0], table[:n])


def test_newest_page_kept_even_if_lowest():
    q, cache, kmax, kmin, table, group = _setup(160, 4)
    kmax[table[-1]] = -50.0  # make the newest page score terribly
    kmin[table[-1]] = -60.0
    q = np.abs(q)
    _, lpages = _select(q, kmax, kmin, table, 160, group, 2 * PS)
    assert np.all(lpages[:, -1] == 9) and lpages.shape == (HKV, 2)


def test_gqa_max_over_group():
    q, cache, kmax, kmin, table, group = _setup(128, 5)
    full = page_scores(q, kmax, kmin, table, 128, group, PS)
    per_head = [
        page_scores(q[i : i + 1], kmax[:, :1], kmin[:, :1], table, 128, 1, PS)[0] for i in range(group)
    ]
    np.testing.assert_allclose(full[0], np.max(per_head, axis=0), rtol=1e-6)


@pytest.mark.parametrize("ctx,seed", [(200, 0), (161, 1), (300, 3)])
def test_group_mass_bruteforce(ctx, seed):
    """group_reduce "mass": log of the group's summed softmax weight of each page's bound / sqrt(D)."""
    q, cache, kmax, kmin, table, group = _setup(ctx, seed)
    q = q * 4  # spread the bounds so that the softmax is far from uniform
    got = page_scores(q, kmax, kmin, table, ctx, group, PS, "mass")
    # [group, HKV, n]: member g of every KV head's group alone
    b = np.stack([_independent_scores(q[g::group], cache, table, ctx, 1) for g in range(group)]) / np.sqrt(D)
    w = np.exp(b - b.max(2, keepdims=True))
    w = (w / w.sum(2, keepdims=True)).sum(0)
    np.testing.assert_allclose(got, np.log(w), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="group_reduce"):
        page_scores(q, kmax, kmin, table, ctx, group, PS, "mean")


@pytest.mark.parametrize("ctx,seed", [(200, 0), (161, 1), (17, 2)])
def test_oracle_scores_are_exact_attention_mass(ctx, seed):
    """group_reduce "oracle": log of the group's mean softmax weight per page, by a plain loop; its top
    pages hold the most exact mass any selection of that size can."""
    q, cache, _, _, table, group = _setup(ctx, seed)
    q = q * 3
    got = exact_page_scores(q, cache, table, ctx, group)
    n = -(-ctx // PS)
    want = np.zeros((HKV, n))
    for h in range(HKV):
        keys = np.concatenate([cache[table[p], h] for p in range(n)])[:ctx]
        for g in range(group):
            w = np.exp(keys @ q[h * group + g] / np.sqrt(D))
            w /= w.sum()
            want[h] += np.bincount(np.arange(ctx) // PS, w, n) / group
    np.testing.assert_allclose(np.exp(got), want, rtol=1e-4, atol=1e-7)
    if n > 3:
        sel = top_pages(got, 3)
        others = np.sort(want[:, :-1], axis=1)[:, -2:].sum(1) + want[:, -1]
        np.testing.assert_allclose(np.take_along_axis(want, sel, 1).sum(1), others, rtol=1e-5)


def test_top_pages_ties_deterministic():
    s = np.zeros((1, 6))
    np.testing.assert_array_equal(top_pages(s, 3), [[0, 1, 5]])


def _select(q, kmax, kmin, table, ctx, group, budget):
    lpages = choose_pages(q, kmax, kmin, table, ctx, group, budget_pages(budget, PS), PS)
    return np.asarray(table, np.int32)[lpages], lpages


def test_refresh_schedule():
    """The reusable selector recomputes at the first decode step and every `interval` steps after it."""
    assert [refresh_due(i, 4) for i in range(9)] == [
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
        True,
    ]
    assert all(refresh_due(i, 1) for i in range(5))


def test_reused_selection_visits_the_newest_page():
    """Between refreshes the stored selection is visited with the newest page, even one begun after it."""
    q, cache, kmax, kmin, table, group = _setup(5 * PS - 1, 8)
    _, stored = _select(q, kmax, kmin, table, 5 * PS - 1, group, 4 * PS)
    assert stored.shape == (HKV, 4) and np.all(stored[:, -1] == 4)
    for ctx, newest in ((5 * PS, 4), (5 * PS + 1, 5), (6 * PS + 3, 6)):
        for h in range(HKV):
            vis = visited_selection(stored[h], ctx, PS)
            assert vis[-1] == newest and set(stored[h]) <= set(vis)
            assert len(vis) <= visit_capacity(budget_pages(4 * PS, PS))
