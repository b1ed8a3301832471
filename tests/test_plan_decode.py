"""build_plan's decode-only path (sparse/plan._decode_plan, a step of decode rows, streaming lists included) makes
the plan its block-by-block path makes, field for field (consistency: both are this project's code; the
attention tests check the plans' meaning against the references)."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite.sparse import plan as P


def _fields(p: P.AttentionPlan) -> dict:
    return {k: v for k, v in vars(p).items()}


def _equal(a: P.AttentionPlan, b: P.AttentionPlan) -> None:
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()
    for k, va in fa.items():
        vb = fb[k]
        if isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            assert va.dtype == vb.dtype and np.array_equal(va, vb), k
        else:
            assert va == vb, k


@pytest.mark.parametrize("seed", range(40))
def test_decode_plan_equals_the_general_plan(seed):
    rng = np.random.default_rng(seed)
    ps = int(rng.choice([16, 64, 128]))
    b = int(rng.integers(0, 40))  # the comparison calls _decode_plan itself below ARRAY_PLAN_ROWS
    ctx = [int(c) for c in rng.integers(1, 5000, b)]
    ctx[: min(b, 3)] = [ps, 1, 2 * ps + 1][: min(b, 3)]  # page boundaries and a first token
    pool = rng.permutation(200_000).astype(np.int32)
    tables, at = [], 0
    for c in ctx:
        n = -(-c // ps) + int(rng.integers(0, 3))  # tables may hold pages past the context
        t = pool[at : at + n]
        at += n
        tables.append(t if rng.random() < 0.5 else t.tolist())
    sel = rng.random() < 0.5
    lay = P.BatchLayout([1] * b, ctx, tables)
    sink, local = int(rng.choice([0, 64])), int(rng.choice([0, 0, 256]))
    if (
        rng.random() < 0.5
    ):  # per-sequence windows: some rows streaming, some not, sinks across page boundaries
        lay.windows = [(int(rng.choice([0, 32, 100, 3 * ps])), int(rng.choice([0, 1, 50, 300, 4 * ps])))
                       for _ in range(b)]  # fmt: skip
    ring = None
    if rng.random() < 0.5:  # LServe's streaming pool: sink pages, then a ring
        ring = (int(rng.integers(0, 4)), int(rng.integers(2, 9)))
        lay.stream_tables = [[int(x) for x in rng.integers(0, 10_000, sum(ring))] for _ in range(b)]
    if sel:
        lay.sel_slots = [int(s) for s in rng.permutation(b)]
        lay.sel_keep = [int(k) for k in rng.integers(0, 9, b)]
        lay.sel_refresh = [int(r) for r in rng.integers(0, 2, b)]
    reduce = "mass" if sel else "max"
    fast = P._decode_plan(lay, ps, 64, sink, local, ring, reduce)
    slow = P._general_plan(lay, ps, 64, sink, local, ring, reduce)
    _equal(fast, slow)


def test_build_plan_takes_the_array_path_from_its_threshold(monkeypatch):
    def general(*a):
        raise AssertionError("block loop")

    monkeypatch.setattr(P, "_general_plan", general)
    k = P.ARRAY_PLAN_ROWS
    P.build_plan(P.BatchLayout([1] * k, [100] * k, [[7, 8]] * k), 64)  # the array path
    with pytest.raises(AssertionError, match="block loop"):
        P.build_plan(P.BatchLayout([1] * (k - 1), [100] * (k - 1), [[7, 8]] * (k - 1)), 64)


def test_a_streaming_list_by_hand_and_prefill_rows():
    """Row 0 (300 tokens, pages of 64, sink 64, local 128): causal pages 0-4, streaming pages 0 (sink) and 2-4
    (tokens 172-299); row 1 has no window. A batch with a row of more than one token is planned block by block."""
    tables = [np.arange(10, dtype=np.int32), np.arange(10, 20, dtype=np.int32)]
    lay = P.BatchLayout([1, 1], [300, 500], tables, windows=[(64, 128), (0, 0)])
    p = P._decode_plan(lay, 64, 64, 0, 0, None, "max")
    assert p.kv_indptr.tolist() == [0, 5, 9, 17, 17]
    assert p.kv_lpage[5:9].tolist() == [0, 2, 3, 4] and p.kv_page[5:9].tolist() == [0, 2, 3, 4]
    ring = P._decode_plan(P.BatchLayout([1], [300], tables[:1], stream_tables=[[90, 91, 92, 93]],
                                        windows=[(64, 128)]), 64, 64, 0, 0, (1, 3), "max")  # fmt: skip
    assert ring.kv_page[5:].tolist() == [
        90,
        92,
        93,
        91,
    ]  # pages 2, 3, 4 in ring slots 1 + (p - 1) % 3: 2, 3, 1
    lay = P.BatchLayout([1, 3], [300, 500], tables)
    assert P.build_plan(lay, 64).qb_len.tolist() == [1, 3]


def test_short_streaming_table_is_refused():
    lay = P.BatchLayout(
        [1], [300], [np.arange(10, dtype=np.int32)], stream_tables=[[1, 2]], windows=[(64, 128)]
    )
    with pytest.raises(ValueError, match="streaming table"):
        P._decode_plan(lay, 64, 64, 0, 0, (1, 3), "max")


def test_geometry_rules_agree_on_ints_and_arrays():
    """ring_slot answers a Python int as an int, equal to its array form; streaming_pages is the union of the
    sink pages and the local window, in order and without repeats (its set-based definition)."""
    from lserve_lite.geometry import ring_slot, sink_pages, streaming_pages

    for p in range(40):
        for ns in (0, 1, 3):
            for nr in (0, 1, 5):
                got = ring_slot(p, ns, nr)
                assert isinstance(got, int) and got == int(ring_slot(np.asarray([p]), ns, nr)[0])
    for first in range(0, 300, 7):
        for n in (1, 5, 64):
            last = first + n - 1
            for sink, local in ((0, 1), (16, 50), (100, 300), (64, 64)):
                want = sorted(set(range(min(sink_pages(sink, 16), last // 16 + 1))) |
                              set(range(max(0, first - local + 1) // 16, last // 16 + 1)))  # fmt: skip
                assert streaming_pages(first, last, 16, sink, local) == want
