"""Query-aware page selection for dense heads at decode (LServe's hierarchical paging), CPU reference.

Scores (DESIGN.md): logical page score = sum_c max(q_c * kmax_c, q_c * kmin_c); physical page score =
max of its logical pages' scores; with GQA the score of a KV head is the max over its group's query heads.
Per KV head keep the top `token_budget // page_size - 1` pages among all but the newest page, plus the
newest page; if the context fits in the budget, keep every page. `SelectorState` reuses a selection for
`select_interval` decode steps (the reusable page selector).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def page_scores(
    q: np.ndarray,
    kmax: np.ndarray,
    kmin: np.ndarray,
    page_table: list[int] | np.ndarray,
    ctx_len: int,
    group_size: int,
    page_size: int,
) -> np.ndarray:
    """Physical page scores [Hkv, n_pages] (n_pages = ceil(ctx_len / page_size)) for one sequence.

    q [Hq, D] (Hq = Hkv * group_size, query head h belongs to KV head h // group_size);
    kmax/kmin [num_pages, Hkv, sub_pages, D] indexed by physical page id. Logical pages that hold no
    valid token (start >= ctx_len) score -inf.
    """
    q = np.asarray(q, np.float32)
    hq, d = q.shape
    n_pages = -(-ctx_len // page_size)
    table = np.asarray(page_table, np.int64)[:n_pages]
    hkv, sub = kmax.shape[1], kmax.shape[2]
    if hq != hkv * group_size:
        raise ValueError(f"q has {hq} heads; expected {hkv} KV heads x group {group_size}")
    if table.size < n_pages:
        raise ValueError(f"page table has {table.size} pages; context {ctx_len} needs {n_pages}")
    qg = q.reshape(hkv, group_size, d)
    # max(q*kmax, q*kmin) = max(q,0)*kmax + min(q,0)*kmin, valid because kmax >= kmin.
    qp, qn = np.maximum(qg, 0), np.minimum(qg, 0)
    kx = kmax[table].transpose(1, 0, 2, 3).reshape(hkv, n_pages * sub, d)  # [Hkv, P*S, D]
    kn = kmin[table].transpose(1, 0, 2, 3).reshape(hkv, n_pages * sub, d)
    s = qp @ kx.transpose(0, 2, 1) + qn @ kn.transpose(0, 2, 1)  # [Hkv, G, P*S]
    s = s.max(axis=1).reshape(hkv, n_pages, sub)  # GQA: max over the group
    lp = page_size // sub
    start = np.arange(n_pages)[:, None] * page_size + np.arange(sub)[None, :] * lp
    s = np.where(start[None] < ctx_len, s, -np.inf)
    return s.max(axis=2)


def top_pages(scores: np.ndarray, keep: int) -> np.ndarray:
    """Logical page indices [Hkv, min(keep, P)] sorted ascending: the newest page plus the top keep-1
    of the others by score (ties: the lower index); all pages if P <= keep."""
    hkv, n_pages = scores.shape
    if keep < 1:
        raise ValueError("keep must be >= 1")
    if n_pages <= keep:
        return np.broadcast_to(np.arange(n_pages, dtype=np.int32), (hkv, n_pages)).copy()
    order = np.argsort(-scores[:, :-1], axis=1, kind="stable")[:, : keep - 1]
    sel = np.concatenate([order, np.full((hkv, 1), n_pages - 1)], axis=1)
    return np.sort(sel, axis=1).astype(np.int32)


def select_pages(
    q: np.ndarray,
    kmax: np.ndarray,
    kmin: np.ndarray,
    page_table: list[int] | np.ndarray,
    ctx_len: int,
    group_size: int,
    token_budget: int,
    page_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Selected pages for one sequence and layer: (physical ids, logical indices), each [Hkv, k] int32.

    k = min(ceil(ctx_len / page_size), token_budget // page_size); rows sorted by logical index.
    """
    keep = token_budget // page_size
    n_pages = -(-ctx_len // page_size)
    hkv = kmax.shape[1]
    table = np.asarray(page_table, np.int32)
    if n_pages <= keep:  # the context fits in the budget: no scoring needed
        lsel = np.broadcast_to(np.arange(n_pages, dtype=np.int32), (hkv, n_pages)).copy()
    else:
        lsel = top_pages(page_scores(q, kmax, kmin, table, ctx_len, group_size, page_size), keep)
    return table[lsel], lsel


@dataclass
class _Entry:
    lpages: np.ndarray  # [Hkv, k] logical indices, sorted
    scores: np.ndarray | None  # [Hkv, P] scores at selection time (None: context fitted the budget)
    n_pages: int  # pages in the context when selected
    age: int  # decode steps served since the selection was computed


class SelectorState:
    """The reusable page selector: one selection per (sequence, layer), recomputed every `interval` steps.

    Between recomputations the stored logical selection is reused. If the context has gained pages
    since, the newest page is added; when that would exceed the budget, the lowest-scoring stored page
    (never the previously newest one, which holds the most recent tokens) makes room. A selection made
    while the context fitted the budget (all pages, no scores) is recomputed as soon as it no longer fits.
    """

    def __init__(self, token_budget: int, page_size: int, interval: int = 4):
        if interval < 1:
            raise ValueError("interval must be >= 1")
        self.token_budget, self.page_size, self.interval = token_budget, page_size, interval
        self.keep = token_budget // page_size
        self._entries: dict[tuple[int, int], _Entry] = {}
        self.num_recomputes = 0
        self.last_recomputed = False

    def select(
        self,
        seq_id: int,
        layer: int,
        q: np.ndarray,
        kmax: np.ndarray,
        kmin: np.ndarray,
        page_table: list[int] | np.ndarray,
        ctx_len: int,
        group_size: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One decode step of (seq_id, layer): (physical ids, logical indices) [Hkv, k] int32."""
        key = (seq_id, layer)
        ps = self.page_size
        n_pages = -(-ctx_len // ps)
        table = np.asarray(page_table, np.int32)
        e = self._entries.get(key)
        self.last_recomputed = (
            e is None
            or e.age >= self.interval
            or n_pages < e.n_pages
            or (e.scores is None and n_pages > self.keep)  # outgrew the budget: no scores to evict by
        )
        if self.last_recomputed:
            scores = None
            if n_pages > self.keep:
                scores = page_scores(q, kmax, kmin, table, ctx_len, group_size, ps)
                lsel = top_pages(scores, self.keep)
            else:
                lsel = np.broadcast_to(np.arange(n_pages, dtype=np.int32), (kmax.shape[1], n_pages)).copy()
            e = _Entry(lsel, scores, n_pages, 0)
            self._entries[key] = e
            self.num_recomputes += 1
        elif n_pages > e.n_pages:
            e.lpages = self._extend(e, n_pages)
            e.n_pages = n_pages
        e.age += 1
        return table[e.lpages], e.lpages

    def _extend(self, e: _Entry, n_pages: int) -> np.ndarray:
        """Add the pages appended since the selection (newest kept; evict the lowest-scoring old page)."""
        rows = []
        for h, row in enumerate(e.lpages):
            cur = list(row)
            for new in range(e.n_pages, n_pages):
                cur.append(new)
                if len(cur) > self.keep:
                    old = [p for p in cur if p < e.n_pages - 1]
                    if old:
                        victim = min(old, key=lambda p: (e.scores[h, p], -p))
                    else:  # only recent pages left: drop the oldest of those appended in between
                        victim = min(p for p in cur if p != new)
                    cur.remove(victim)
            rows.append(sorted(cur))
        return np.asarray(rows, np.int32)

    def drop(self, seq_id: int) -> None:
        """Forget a finished (or preempted) sequence's selections."""
        for key in [k for k in self._entries if k[0] == seq_id]:
            del self._entries[key]

    def reset(self) -> None:
        self._entries.clear()
