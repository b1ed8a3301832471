"""build_plan's decode-only path (sparse/plan._decode_plan, a step of decode rows without streaming lists) makes
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


@pytest.mark.parametrize("seed", range(12))
def test_decode_plan_equals_the_general_plan(seed):
    rng = np.random.default_rng(seed)
    ps = int(rng.choice([16, 64, 128]))
    b = int(rng.integers(0, 40))
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
    sink = int(rng.choice([0, 64]))
    if rng.random() < 0.5:
        lay.windows = [(int(rng.choice([0, 32])), 0) for _ in range(b)]
    if sel:
        lay.sel_slots = [int(s) for s in rng.permutation(b)]
        lay.sel_keep = [int(k) for k in rng.integers(0, 9, b)]
        lay.sel_refresh = [int(r) for r in rng.integers(0, 2, b)]
    fast = P.build_plan(lay, ps, sink=sink, group_reduce="mass" if sel else "max")
    slow = P._general_plan(lay, ps, 64, sink, 0, None, "mass" if sel else "max")
    _equal(fast, slow)


def test_streaming_or_prefill_rows_take_the_general_path():
    """A decode row with a streaming window, or any row of more than one token, is planned block by block."""
    tables = [np.arange(10, dtype=np.int32), np.arange(10, 20, dtype=np.int32)]
    lay = P.BatchLayout([1, 1], [300, 500], tables, windows=[(64, 128), (0, 0)])
    p = P.build_plan(lay, 64)
    assert p.kv_indptr[2] > p.kv_indptr[1]  # row 0's streaming list is there
    lay = P.BatchLayout([1, 3], [300, 500], tables)
    assert P.build_plan(lay, 64).qb_len.tolist() == [1, 3]
