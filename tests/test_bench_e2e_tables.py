"""tools/bench_e2e.batch_tables: the page tables and copies of the batched Llama decode benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_e2e import batch_tables  # noqa: E402


def test_private_rows_own_their_pages_and_get_row_0s_kv():
    tables, copies = batch_tables(3, ctx=130, ps=64, seq_pages=5, private=True, spare0=15)
    assert tables == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert sorted(copies) == sorted([(p, 5 + p) for p in range(3)] + [(p, 10 + p) for p in range(3)])


def test_shared_rows_read_row_0s_pages_and_write_their_own():
    tables, copies = batch_tables(3, ctx=130, ps=64, seq_pages=5, private=False, spare0=5)
    assert tables == [[0, 1, 2, 3, 4], [0, 1, 5, 3, 4], [0, 1, 6, 3, 4]]  # page 2 holds token 130
    assert copies == [(2, 5), (2, 6)]
    slots = {t[130 // 64] * 64 + 130 % 64 for t in tables}
    assert len(slots) == 3  # no two rows write one slot
