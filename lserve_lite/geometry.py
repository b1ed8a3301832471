"""LServe's page geometry: the one home of every rule that turns tokens, budgets and windows into pages.

The planner (sparse/plan.py), the KV layout (kv/layout.py), both backends and the tests all ask here, so a
rule changes in one place. Positions are token indices; a sequence's logical page `p` holds positions
[p * page_size, (p + 1) * page_size).
"""

from __future__ import annotations

import numpy as np


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens (ceil)."""
    return -(-tokens // page_size)


def newest_page(ctx_len: int, page_size: int) -> int:
    """Logical index of the page that holds the last of `ctx_len` tokens (the one decode writes into)."""
    return pages_for(ctx_len, page_size) - 1


def budget_pages(token_budget: int, page_size: int) -> int:
    """Pages a dense head keeps at a selecting decode step: the newest + the top (budget - 1) by score."""
    return token_budget // page_size


def visit_capacity(keep: int) -> int:
    """Most pages a dense head visits with a page budget `keep`: a reused selection may predate the newest
    page, which is visited anyway (sparse/selector.py's reuse rule), so one more than the budget."""
    return keep + 1


def sink_pages(sink: int, page_size: int) -> int:
    """Pages that hold a streaming head's `sink` first tokens."""
    return pages_for(sink, page_size)


def ring_pages(
    local: int, max_chunk: int, page_size: int, max_len: int | None = None, num_sink_pages: int = 0
) -> int:  # fmt: skip
    """Ring of a streaming head's local pages: every page a chunk of `max_chunk` queries sees in its `local` window
    (the query included) at once, its own included: `local + max_chunk - 1` tokens, which straddle at most one page
    more than they fill (`streaming_bounds`; `local + max_chunk` tokens reserved a page more where max_chunk is 1
    or 2 past a page multiple). No more than what a whole context (`max_len` tokens) has past its `num_sink_pages`
    sink pages, since a ring that holds the rest of a sequence never wraps (clipped to the whole context, it
    reserved the sink pages twice)."""
    ring = pages_for(local + max_chunk - 2, page_size) + 1
    return ring if max_len is None else min(ring, pages_for(max_len, page_size) - num_sink_pages)


def holds_context(num_sink_pages: int, num_ring_pages: int, page_size: int, max_len: int) -> bool:
    """Whether sink pages and a ring hold a whole context of `max_len` tokens (the ring never wraps)."""
    return num_sink_pages + num_ring_pages >= pages_for(max_len, page_size)


def ring_fits(
    local: int, num_ring_pages: int, max_chunk: int, page_size: int, max_len: int, num_sink_pages: int = 0
) -> bool:  # fmt: skip
    """Whether a ring of `num_ring_pages` serves a `local` window (`ring_pages`' rule read backwards): it holds
    the window beside a chunk, or, beside `num_sink_pages` sink pages, a whole context."""
    whole = holds_context(num_sink_pages, num_ring_pages, page_size, max_len)
    return whole or local <= ring_window(num_ring_pages, max_chunk, page_size)


def ring_window(num_ring_pages: int, max_chunk: int, page_size: int) -> int:
    """The widest local window (a page multiple, as windows are) a ring of `num_ring_pages` serves beside a
    `max_chunk`-token chunk (`ring_pages` read backwards; a ring that holds a whole context serves any, `ring_fits`)."""
    return ((num_ring_pages - 1) * page_size - max_chunk + 2) // page_size * page_size


def sink_fits(sink: int, num_sink_pages: int, page_size: int, max_len: int) -> bool:
    """Whether `num_sink_pages` serve a `sink`-token sink (`sink_pages` read backwards): they hold it, or a whole
    context of `max_len` tokens (the pages are clipped to one: a longer sink is the whole context)."""
    return sink_pages(sink, page_size) <= num_sink_pages or num_sink_pages >= pages_for(max_len, page_size)


def ring_slot(lpage: int | np.ndarray, num_sink_pages: int, num_ring_pages: int) -> int | np.ndarray:
    """Index in a sequence's streaming-pool table of logical page `lpage` (an int, answered as an int: a decode
    row's one page, or an int array): sink pages, then the ring."""
    wrapped = num_sink_pages + (lpage - num_sink_pages) % max(num_ring_pages, 1)
    if isinstance(lpage, int):
        return lpage if lpage < num_sink_pages else wrapped
    return np.where(lpage < num_sink_pages, lpage, wrapped)


def streaming_bounds(
    first: int | np.ndarray,
    last: int | np.ndarray,
    page_size: int,
    sink: int | np.ndarray,
    local: int | np.ndarray,
) -> tuple:
    """(n, s, lo) of the Lambda mask for queries at positions first..last: a streaming head visits logical pages
    [0, s) (its sink) and [lo, n) (its local window), lo >= s. Ints or arrays (a batch of decode rows)."""
    n = last // page_size + 1
    s = np.minimum(sink_pages(sink, page_size), n)
    return n, s, np.maximum(np.maximum(0, first - local + 1) // page_size, s)


def streaming_pages(first: int, last: int, page_size: int, sink: int, local: int) -> list[int]:
    """Logical pages a streaming head visits for queries at positions first..last (the Lambda mask)."""
    n, s, lo = streaming_bounds(first, last, page_size, sink, local)
    return [*range(s), *range(lo, n)]


def window_visit_pages(sink: int, local: int, page_size: int) -> int:
    """Most pages a streaming head visits at a decode step (sink pages + local pages + a straddled one)."""
    return sink_pages(sink, page_size) + pages_for(local, page_size) + 1


def ring_oldest(end: int, num_ring_pages: int, page_size: int, held_from: int = 0) -> int:
    """The oldest non-sink logical page a streaming table written up to `end` tokens holds for its sequence: the ring
    keeps the newest pages, and a table resumed from a snapshot holds none older than `held_from` (its older slots
    hold pages of the snapshot's donor past the shared prefix)."""
    return max((end - 1) // page_size - num_ring_pages + 1, held_from)


def ring_covers(
    boundary: int, end: int, local: int, num_sink_pages: int, num_ring_pages: int, page_size: int,
    held_from: int = 0,
) -> bool:  # fmt: skip
    """Whether a streaming table written up to `end` tokens (holding no ring page older than `held_from`) still holds
    every page that queries from position `boundary` on can see before it with a `local` window (sink pages always
    stay; the ring keeps the newest): a snapshot resumed at a page boundary, a harness rewound to any position."""
    first = max(max(0, boundary - local + 1) // page_size, num_sink_pages)  # oldest non-sink page visible
    kept = ring_oldest(end, num_ring_pages, page_size, held_from)
    return boundary <= end and (first > (boundary - 1) // page_size or first >= kept)
