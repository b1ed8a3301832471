"""LServe's query-aware page selector for dense heads at decode (hierarchical paging): the rule, in one place.

Scores: logical page score = sum_c max(q_c * kmax_c, q_c * kmin_c) (an upper bound of q.k over its keys);
physical page score = max of its logical pages' scores. With GQA one score per KV head, from its group's
query heads (`group_reduce`):
- "max" (LServe's rule): the max over the group of the raw bounds;
- "mass": each query head's bounds / sqrt(D) through a softmax over the sequence's pages, the group's mean
  weight; kept in log space (logsumexp over the group of bound - the head's logsumexp over pages), which
  ranks pages as the mean weight does and still orders those whose weight underflows. It keeps more of the
  exact attention mass at equal budget (docs/ACCURACY.md): the max follows whichever head has the largest
  bounds, not the one whose attention sits on a few far pages.
- "oracle" (evaluation only, CPU backend, float KV): the group's mean exact attention weight per page from
  the keys themselves (`exact_page_scores`): the best any page choice of that size can do for this query,
  so a loss it keeps is the selector's, one it also loses is the budget's (docs/ACCURACY.md).
Per KV head keep the top `budget_pages - 1` pages among all but the newest page, plus the newest page; if
the context fits in the budget, keep every page (geometry.budget_pages).

Reuse (the reusable page selector): a selection is computed at the decode steps where `refresh_due` says
so (every `select_interval` steps from the first decode step whose pages exceed the budget: the planner gives a
row within its budget no selection at all, ModelRunner._sparse_layout) and reused in between; a reused selection
is visited together with the newest page, which may have begun after it was made (`visited_selection`).
This is the rule the engine runs on both backends (backends/reference/page_select.py, kernels/page_select.cu,
the decode kernels' page lists); calibration and evaluation run the engine itself.
"""

from __future__ import annotations

import numpy as np

from ..geometry import newest_page, pages_for


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def page_scores(
    q: np.ndarray,
    kmax: np.ndarray,
    kmin: np.ndarray,
    page_table: list[int] | np.ndarray,
    ctx_len: int,
    group_size: int,
    page_size: int,
    group_reduce: str = "max",
) -> np.ndarray:
    """Physical page scores [Hkv, n_pages] (n_pages = ceil(ctx_len / page_size)) for one sequence.

    q [Hq, D] (Hq = Hkv * group_size, query head h belongs to KV head h // group_size);
    kmax/kmin [num_pages, Hkv, sub_pages, D] indexed by physical page id. Logical pages that hold no
    valid token (start >= ctx_len) are ignored (every page has a valid first logical page).
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
    lp = page_size // sub
    start = np.arange(n_pages)[:, None] * page_size + np.arange(sub)[None, :] * lp
    b = np.where(start < ctx_len, s.reshape(hkv, group_size, n_pages, sub), -np.inf).max(
        axis=3
    )  # [Hkv, G, P]
    if group_reduce == "max":
        return b.max(axis=1)
    if group_reduce != "mass":
        raise ValueError(f"group_reduce must be 'max' or 'mass', got {group_reduce!r}")
    b = b * np.float32(1 / np.sqrt(d))
    return _logsumexp(b - _logsumexp(b, 2)[..., None], 1)


def exact_page_scores(
    q: np.ndarray, k: np.ndarray, page_table: list[int] | np.ndarray, ctx_len: int, group_size: int
) -> np.ndarray:
    """The oracle's page scores [Hkv, n_pages]: log of the group's mean exact softmax weight per page.

    q [Hq, D]; k [num_pages, Hkv, page_size, D] (the dense pool, by physical page id). Log space keeps the
    order of pages whose weight underflows."""
    q = np.asarray(q, np.float32)
    hq, d = q.shape
    page = k.shape[2]
    n_pages = pages_for(ctx_len, page)
    table = np.asarray(page_table, np.int64)[:n_pages]
    hkv = k.shape[1]
    kk = k[table].transpose(1, 0, 2, 3).reshape(hkv, n_pages * page, d)[:, :ctx_len]
    s = np.einsum("hgd,htd->hgt", q.reshape(hkv, group_size, d), kk) * np.float32(1 / np.sqrt(d))
    s = s - _logsumexp(s, 2)[..., None]  # per query head, log-softmax over the context
    s = np.pad(s, ((0, 0), (0, 0), (0, n_pages * page - ctx_len)), constant_values=-np.inf)
    return _logsumexp(_logsumexp(s.reshape(hkv, group_size, n_pages, page), 3), 1) - np.log(group_size)


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
    group_reduce: str = "max",
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """Logical pages [Hkv, min(keep, P)] one sequence's dense heads keep (all of them if P <= keep).
    `keys` (the dense heads' pool [num_pages, Hkv, page_size, D]) is read by "oracle" only."""
    n_pages = pages_for(ctx_len, page_size)
    if n_pages <= keep:
        return np.broadcast_to(np.arange(n_pages, dtype=np.int32), (kmax.shape[1], n_pages)).copy()
    if group_reduce == "oracle":
        scores = exact_page_scores(q, keys, page_table, ctx_len, group_size)
    else:
        scores = page_scores(q, kmax, kmin, page_table, ctx_len, group_size, page_size, group_reduce)
    return top_pages(scores, keep)


def refresh_due(decode_step: int, interval: int) -> bool:
    """Whether decode step `decode_step` (0 = the first after a prefill) computes a new selection."""
    return decode_step % interval == 0


def visited_selection(stored: np.ndarray, ctx_len: int, page_size: int) -> np.ndarray:
    """Logical pages a dense head visits from a stored selection: the selection plus the newest page."""
    return np.union1d(stored, [newest_page(ctx_len, page_size)]).astype(np.int32)
