"""Logical-page key statistics for the page selector: the reference of the statistics update fused into
kernels/layers.cu::rope_write_kv_sparse.

A physical page of `page_size` tokens is split into `sub_pages` logical pages of `page_size // sub_pages`
tokens. For each logical page and KV head we keep the per-channel max and min of its keys:
kmax/kmin [num_pages, num_kv_heads, sub_pages, head_dim], indexed by physical page id like the KV cache.
Only tokens that were written count; a logical page is recomputed whenever one of its slots is written.
Logical pages beyond a sequence's context hold stale values: the selector masks them by context length.
"""

from __future__ import annotations

import numpy as np


def update_page_stats(kmax: np.ndarray, kmin: np.ndarray, k_cache: np.ndarray, slots: np.ndarray) -> None:
    """Recompute, in place, the stats of every logical page touched by the newly written `slots`.

    `k_cache` [num_pages, Hkv, page_size, D] already holds the new keys; `slots` are their flat slot ids
    (page * page_size + offset). Tokens are appended in order, so a touched logical page holds the valid
    tokens from its first slot up to the highest slot written into it; later slots (not written yet)
    do not count.
    """
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    if slots.size == 0:
        return
    page_size, sub = k_cache.shape[2], kmax.shape[2]
    lp = page_size // sub
    if lp * sub != page_size:
        raise ValueError(f"sub_pages {sub} must divide page_size {page_size}")
    logical = slots // lp  # global logical-page id: page * sub + sub_index
    # Highest written offset (within the logical page) per touched logical page -> valid token count.
    order = np.lexsort((slots, logical))
    logical, slots = logical[order], slots[order]
    last = np.r_[logical[1:] != logical[:-1], True]
    lids, counts = logical[last], slots[last] % lp + 1
    for n in np.unique(counts):
        ids = lids[counts == n]
        pages, subs = ids // sub, ids % sub
        # keys [m, Hkv, n, D] of the valid prefix of each touched logical page
        offs = subs[:, None] * lp + np.arange(n)[None, :]
        k = k_cache[pages[:, None], :, offs]  # [m, n, Hkv, D]
        kmax[pages, :, subs] = k.max(axis=1)
        kmin[pages, :, subs] = k.min(axis=1)


def merge_page_stats(kmax, kmin, keys: np.ndarray, slots: np.ndarray, page_size: int) -> None:
    """The statistics update of a quantized cache, whose stored keys are not the model's: from the written
    keys themselves (keys [N, Hkv, D] unquantized, in slot order per sequence). A logical page whose first
    written slot is its offset 0 starts afresh, else its stats are merged with the keys; with tokens appended
    in order this equals `update_page_stats` on the unquantized keys."""
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    lp = page_size // kmax.shape[2]
    ok = slots >= 0
    logical = slots // lp
    for lid in np.unique(logical[ok]):
        rows = np.nonzero(ok & (logical == lid))[0]
        page, sub = lid // kmax.shape[2], lid % kmax.shape[2]
        mx, mn = keys[rows].max(0), keys[rows].min(0)
        if slots[rows].min() % lp:
            mx, mn = np.maximum(mx, kmax[page, :, sub]), np.minimum(mn, kmin[page, :, sub])
        kmax[page, :, sub], kmin[page, :, sub] = mx, mn


def page_stats_reference(
    k_cache: np.ndarray, page_table: list[int] | np.ndarray, ctx_len: int, sub_pages: int
) -> tuple[np.ndarray, np.ndarray]:
    """From-scratch stats of one sequence's valid logical pages: (kmax, kmin) [n_pages, Hkv, sub_pages, D].

    Logical pages with no valid token are left at zero (they are never scored).
    """
    _, hkv, page_size, d = k_cache.shape
    lp = page_size // sub_pages
    n_pages = -(-ctx_len // page_size)
    kmax = np.zeros((n_pages, hkv, sub_pages, d), k_cache.dtype)
    kmin = np.zeros_like(kmax)
    for i in range(n_pages):
        for s in range(sub_pages):
            lo = i * page_size + s * lp
            n = min(lp, ctx_len - lo)
            if n <= 0:
                continue
            k = k_cache[page_table[i], :, s * lp : s * lp + n]
            kmax[i, :, s], kmin[i, :, s] = k.max(axis=1), k.min(axis=1)
    return kmax, kmin
