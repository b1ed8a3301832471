"""LServe's query-aware page selector for dense heads at decode (hierarchical paging): the rule, in one place.

Scores: logical page score = sum_c max(q_c * kmax_c, q_c * kmin_c); physical page score = max of its
logical pages' scores; with GQA the score of a KV head is the max over its group's query heads. Per KV
head keep the top `budget_pages - 1` pages among all but the newest page, plus the newest page; if the
context fits in the budget, keep every page (geometry.budget_pages).

Reuse (the reusable page selector): a selection is computed at the decode steps where `refresh_due` says
so (every `select_interval` steps from the first decode step) and reused in between; a reused selection
is visited together with the newest page, which may have begun after it was made (`visited_selection`).
This is the rule the engine runs on both backends (backends/reference/page_select.py, kernels/page_select.cu,
the decode kernels' page lists); calibration and evaluation run the engine itself.
"""

from __future__ import annotations

import numpy as np

from ..geometry import newest_page, pages_for


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
    n_pages = pages_for(ctx_len, page_size)
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


def choose_pages(
    q: np.ndarray,
    kmax: np.ndarray,
    kmin: np.ndarray,
    page_table: list[int] | np.ndarray,
    ctx_len: int,
    group_size: int,
    keep: int,
    page_size: int,
) -> np.ndarray:
    """Logical pages [Hkv, min(keep, P)] one sequence's dense heads keep (all of them if P <= keep)."""
    n_pages = pages_for(ctx_len, page_size)
    if n_pages <= keep:
        return np.broadcast_to(np.arange(n_pages, dtype=np.int32), (kmax.shape[1], n_pages)).copy()
    return top_pages(page_scores(q, kmax, kmin, page_table, ctx_len, group_size, page_size), keep)


def refresh_due(decode_step: int, interval: int) -> bool:
    """Whether decode step `decode_step` (0 = the first after a prefill) computes a new selection."""
    return decode_step % interval == 0


def visited_selection(stored: np.ndarray, ctx_len: int, page_size: int) -> np.ndarray:
    """Logical pages a dense head visits from a stored selection: the selection plus the newest page."""
    return np.union1d(stored, [newest_page(ctx_len, page_size)]).astype(np.int32)
