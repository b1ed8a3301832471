"""The CPU backend's Numba page selector (backends/cpu_select.py) against select_pages_ref: the same pages and
counts for every reduction, float32 and fp16 statistics and keys, ragged batches, ties; and in the engine."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from lserve_lite.backends import cpu as C
from lserve_lite.backends import cpu_select as S
from lserve_lite.backends.reference.page_select import select_pages_ref
from lserve_lite.sparse.plan import BatchLayout, build_plan

REDUCTIONS = ["max", "mass", "oracle"]
# Per sequence (context, budget in pages): pages not a multiple of the page size, a budget larger than the list,
# budget 1 (the newest page only), a one-page context, and a prefill chunk (no selection) among them.
SEQS = [(9 * 16 + 1, 4), (97, 3), (48, 50), (1000 + 7, 6), (2, 2), (301, 1), (700, 9)]


def _step(rng, ps: int, sub: int, pattern: str, hq: int, d: int, refresh=None, dtype=np.float32):
    """(q, kmax, kmin, keys, plan, head_class, head_slot, slots): random pools, shuffled page tables and selection
    slots, the third row a prefill chunk of 5 tokens."""
    hc = np.array([int(c) for c in pattern], np.int32)
    slot = np.zeros(hc.size, np.int32)
    for c in (0, 1):  # pool rows in a shuffled order within each class
        heads = np.nonzero(hc == c)[0]
        slot[heads] = rng.permutation(heads.size)
    ctx, keep = [c for c, _ in SEQS], [k for _, k in SEQS]
    q_lens = [5 if i == 2 else 1 for i in range(len(ctx))]
    need = [-(-c // ps) for c in ctx]
    perm, offs = rng.permutation(sum(need) + 4), np.cumsum([0, *need])
    tables = [[int(p) for p in perm[offs[i] : offs[i + 1]]] for i in range(len(ctx))]
    nslots = len(ctx) + 2
    lay = BatchLayout(q_lens, ctx, tables, stream_tables=[[0, 1, 2]] * len(ctx), windows=[(ps, ps)] * len(ctx),
                      sel_slots=[int(s) for s in rng.permutation(nslots)[: len(ctx)]], sel_keep=keep,
                      sel_refresh=refresh or [1] * len(ctx))  # fmt: skip
    plan = build_plan(lay, ps, q_block=8, ring=(1, 2))
    nd, pages = int((hc == 0).sum()), sum(need) + 4
    kmax = rng.standard_normal((pages, nd, sub, d)).astype(dtype)
    kmin = (kmax - np.abs(rng.standard_normal(kmax.shape))).astype(dtype)
    keys = rng.standard_normal((pages, nd, ps, d)).astype(dtype)
    q = rng.standard_normal((sum(q_lens), hq, d)).astype(np.float32)
    return q, kmax, kmin, keys, plan, hc, slot, nslots


def _both(q, kmax, kmin, keys, plan, hc, slot, nslots, split=None):
    """(reference, Numba) selections and counts, each from arrays poisoned with -1."""
    out = []
    for fn in (select_pages_ref, S.select_pages_numba):
        sel, cnt = np.full((nslots, hc.size, 64), -1, np.int32), np.full((nslots, hc.size), -1, np.int32)
        fn(q, kmax, kmin, plan, hc, slot, sel, cnt, keys, *([split] if fn is S.select_pages_numba else []))
        out.append((sel, cnt))
    return out


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("ps,sub,pattern,hq,d", [(16, 4, "0110", 8, 32), (32, 8, "010", 9, 24), (64, 1, "00", 2, 64),
                                                 (64, 4, "101", 9, 64), (16, 2, "0", 4, 40)])  # fmt: skip
def test_numba_selector_equals_the_reference(rng, reduce, dtype, ps, sub, pattern, hq, d):
    """Random float statistics, keys and queries: the same pages and counts for every selecting dense head, and
    nothing written elsewhere (streaming heads, the prefill chunk, unused slots)."""
    *args, plan, hc, slot, nslots = _step(rng, ps, sub, pattern, hq, d, dtype=dtype)
    plan.group_reduce = reduce
    (want, want_n), (got, got_n) = _both(*args, plan, hc, slot, nslots)
    assert (want_n > 1).any() and (want_n == -1).any()  # selections made, rows left alone
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_array_equal(got, want)


def test_reused_selections_are_left_alone(rng):
    """Blocks that reuse their selection this step (refresh 0) keep what their rows hold."""
    *args, plan, hc, slot, nslots = _step(rng, 16, 4, "0110", 8, 32, refresh=[0, 1, 1, 0, 1, 0, 1])
    (want, want_n), (got, got_n) = _both(*args, plan, hc, slot, nslots)
    assert (want_n[plan.qb_slot[[0, 3, 5]]] == -1).all()
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_ties_take_the_lower_page(rng, reduce):
    """Small-integer queries, statistics and keys (every bound and q.k exact in float32), each page a copy of one of
    three palette pages: many pages tie at the cut, and both take the lowest-index ties."""
    q, kmax, kmin, keys, plan, hc, slot, nslots = _step(rng, 16, 4, "0110", 8, 32)
    plan.group_reduce = reduce
    q[...] = rng.integers(-2, 3, q.shape)
    pal = rng.integers(-3, 4, (3, *kmax.shape[1:]))
    pick = rng.integers(0, 3, kmax.shape[0])
    kmax[...] = pal[pick]
    kmin[...] = pal[pick] - rng.integers(0, 3, pal.shape)[pick]
    keys[...] = rng.integers(-2, 3, (3, *keys.shape[1:]))[pick]
    (want, want_n), (got, got_n) = _both(q, kmax, kmin, keys, plan, hc, slot, nslots)
    dropped = 0  # selections that left out a page equal to a chosen one (a tie at the cut)
    for qb in np.nonzero((plan.qb_keep > 0) & (plan.qb_keep < -(-(plan.qb_pos + 1) // 16)))[0]:
        table, _ = plan.pages(qb, 0)
        for h in np.nonzero(hc == 0)[0]:
            chosen = want[plan.qb_slot[qb], h, : want_n[plan.qb_slot[qb], h] - 1]
            dropped += len(set(pick[table[chosen]]) & set(np.delete(pick[table[:-1]], chosen)))
    assert dropped > 0
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("share", [0.05, 0.7])
def test_nan_statistics_select_as_the_reference(rng, reduce, share):
    """NaN in the statistics (a NaN key makes its page's NaN: merge_key_stats) or the keys (oracle): the pages of the
    reference, whose NaN scores rank below every number (ties: the lower index). The Numba selector dropped a NaN
    bound unless it came first and never took a NaN-scored page, so with fewer numbers than its budget it left
    selection slots unwritten (stale page indices for the attention to read) behind a full count."""
    q, kmax, kmin, keys, plan, hc, slot, nslots = _step(rng, 16, 4, "0110", 8, 32)
    plan.group_reduce = reduce
    poison = rng.random(kmax.shape[:3]) < share
    kmax[poison, 3] = np.nan
    keys[rng.random(keys.shape[:3]) < share / 16, 5] = np.nan
    (want, want_n), (got, got_n) = _both(q, kmax, kmin, keys, plan, hc, slot, nslots)
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [2, 3])
def test_parts_cover_every_unit_once(rng, n):
    """The kernel's parts (the units a SplitRunner spreads) write disjoint rows that add up to the whole call."""
    q, kmax, kmin, keys, plan, hc, slot, nslots = _step(rng, 16, 4, "0110", 8, 32)
    (want, want_n), _ = _both(q, kmax, kmin, keys, plan, hc, slot, nslots)
    got, got_n = np.full_like(want, -1), np.full_like(want_n, -1)
    written = []
    for p in range(n):
        sel, cnt = np.full_like(want, -1), np.full_like(want_n, -1)
        S.select_pages(q, kmax, kmin, S.NO_KEYS, plan.qb_start, plan.qb_pos, plan.qb_slot, plan.qb_keep,
                       plan.qb_refresh, plan.kv_indptr, plan.kv_page, hc, slot, 16, 0, sel, cnt, p, p + 1, n)  # fmt: skip
        written.append(cnt >= 0)
        got[cnt >= 0], got_n[cnt >= 0] = sel[cnt >= 0], cnt[cnt >= 0]
    assert sum(int(w.sum()) for w in written) == int((want_n >= 0).sum()) and all(w.any() for w in written)
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_array_equal(got, want)


def _lserve_cfg(**extra):
    """LServe on the tiny model: page 16, budget 4 pages of a 15-page prompt, a new selection every step."""
    from lserve_lite import EngineConfig, SparseConfig

    knobs = dict(page_size=16, sub_pages=4, prefill_sink=16, prefill_local=64, decode_sink=16, decode_local=32,
                 token_budget=64, select_interval=1, **extra)  # fmt: skip
    return EngineConfig(page_size=16, sparse=SparseConfig(enabled=True, static_sparsity=0.5, **knobs))


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_engine_selects_and_generates_as_the_reference(tiny_lserve, monkeypatch, reduce):
    """LServe on the CPU engine (page 16, budget 4 pages of a 15-page prompt, a new selection every step): the
    Numba selector runs and makes the reference's selections at every call, so the greedy tokens are equal."""
    from lserve_lite import LLM, SamplingParams

    ids = [int(t) for t in np.random.default_rng(7).integers(3, 300, 230)]
    cfg = _lserve_cfg(group_reduce=reduce)
    runs = {}
    ref = lambda *a: select_pages_ref(*a[:9])  # noqa: E731 (the same arguments but the threads)
    for name, fn in (("numba", S.select_pages_numba), ("ref", ref)):
        calls = []

        def spy(*a, fn=fn, calls=calls):
            fn(*a)
            calls.append((a[6].copy(), a[7].copy()))  # sel_idx, sel_cnt after the call

        monkeypatch.setattr(C, "select_pages_numba", spy)  # CpuOps.select_pages's callee
        out = LLM(str(tiny_lserve), backend="cpu", config=cfg).generate(
            [ids], SamplingParams(temperature=0, max_new_tokens=8)
        )
        runs[name] = out[0].token_ids, calls
    (tok, calls), (ref_tok, ref_calls) = runs["numba"], runs["ref"]
    assert len(calls) == len(ref_calls) == 2 * 7 and (ref_calls[-1][1] == 4).any()  # 2 layers, 7 decode steps
    for (sel, cnt), (rsel, rcnt) in zip(calls, ref_calls):
        np.testing.assert_array_equal(cnt, rcnt)
        np.testing.assert_array_equal(sel, rsel)
    assert tok == ref_tok


@pytest.mark.parametrize("value, selector", [("", "numba"), (" REF ", "ref"), ("Numba", "numba")])
def test_selector_switch_reads_as_the_other_switches(monkeypatch, value, selector):
    """LSERVE_CPU_SELECTOR goes through config.env_choice as every other kernel switch (README): empty is the default
    and case and outer blanks do not matter (an empty `LSERVE_CPU_SELECTOR=` stopped the engine, `REF` was refused)."""
    monkeypatch.setenv("LSERVE_CPU_SELECTOR", value)
    assert C.CpuOps().selector == selector


def test_selector_switch_and_its_clock(tiny_lserve, monkeypatch):
    """LSERVE_CPU_SELECTOR=ref runs the NumPy reference through CpuOps.select_pages (the benchmarks' comparison) and
    gives the Numba selector's tokens; select_seconds counts the selector's time; a bad value is refused at once."""
    from lserve_lite import LLM, SamplingParams

    monkeypatch.setenv("LSERVE_CPU_SELECTOR", "fast")
    with pytest.raises(ValueError, match="LSERVE_CPU_SELECTOR"):
        C.CpuOps()
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 300, 230)]
    cfg = _lserve_cfg()
    runs = {}
    for sel in ("numba", "ref"):
        monkeypatch.setenv("LSERVE_CPU_SELECTOR", sel)
        calls = []
        spy = lambda *a, calls=calls, **kw: (calls.append(1), select_pages_ref(*a, **kw))  # noqa: E731
        monkeypatch.setattr(C, "select_pages_ref", spy)
        llm = LLM(str(tiny_lserve), backend="cpu", config=cfg)
        out = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=6))
        assert (len(calls) > 0) == (sel == "ref")
        assert llm.engine.ops.select_seconds > 0
        runs[sel] = out[0].token_ids
    assert runs["numba"] == runs["ref"]
