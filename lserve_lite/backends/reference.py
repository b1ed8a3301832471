"""float32 NumPy references of the LServe kernels (two KV pools, page statistics, page selection).

These execute the same plans as the GPU kernels, so the two can be compared exactly. Dense (class 0)
KV heads live in the dense pool (`kd`, `vd` [pages, dense heads, page, D]); streaming (class 1) heads
in the streaming pool (`ks`, `vs`); `head_slot[g]` is KV head g's row in the pool of its class.
"""

from __future__ import annotations

import math

import numpy as np

from ..kv.page_stats import update_page_stats
from ..sparse.plan import AttentionPlan
from ..sparse.selector import page_scores, top_pages


def rope_qkv(qkv, positions, hkv: int, d: int, cos, sin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the fused [N, (Hq + 2 Hkv) * D] projection into q, k (both rotated, half-split RoPE) and v."""
    n = qkv.shape[0]
    hq = qkv.shape[1] // d - 2 * hkv
    x = qkv.reshape(n, hq + 2 * hkv, d)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    qk = x[:, : hq + hkv]
    a, b = qk[..., : d // 2], qk[..., d // 2 :]
    rot = np.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(np.float32)
    return rot[:, :hq], rot[:, hq:], x[:, hq + hkv :]


def rope_write_kv_sparse_ref(
    qkv, positions, dense_slots, stream_slots, kd, vd, ks, vs, head_class, head_slot, cos, sin,
    kmax=None, kmin=None,
) -> np.ndarray:  # fmt: skip
    """Rotate q/k (half-split RoPE); write each KV head's k/v into the pool of its class; refresh stats."""
    hkv, d = head_class.shape[0], kd.shape[-1] if kd.shape[1] else ks.shape[-1]
    q, k, v = rope_qkv(qkv, positions, hkv, d, cos, sin)
    for cls, slots, kc, vc in ((0, dense_slots, kd, vd), (1, stream_slots, ks, vs)):
        heads = np.nonzero(head_class == cls)[0]
        if heads.size == 0:
            continue
        page = kc.shape[2]
        pg, off = slots // page, slots % page
        rows = head_slot[heads]
        kc[pg[:, None], rows[None, :], off[:, None]] = k[:, heads]
        vc[pg[:, None], rows[None, :], off[:, None]] = v[:, heads]
    if kmax is not None and kd.shape[1]:
        update_page_stats(kmax, kmin, kd, dense_slots)
    return np.ascontiguousarray(q)


def select_pages_ref(q, kmax, kmin, plan: AttentionPlan, head_class, head_slot, sel_idx, sel_cnt) -> None:
    """For decode blocks with a budget that refresh this step: store each dense head's top pages.

    sel_idx [slots, Hkv, K] holds logical page indices (= positions in the block's class-0 list),
    sel_cnt [slots, Hkv] how many; the newest page is always among them.
    """
    hkv = head_class.shape[0]
    group = q.shape[1] // hkv
    dense = np.nonzero(head_class == 0)[0]
    for qb in range(plan.num_qblocks):
        keep = int(plan.qb_keep[qb])
        if keep == 0 or not plan.qb_refresh[qb] or dense.size == 0:
            continue
        ctx = int(plan.qb_pos[qb]) + 1
        table, _ = plan.pages(qb, 0)
        qh = q[plan.qb_start[qb]].reshape(hkv, group, -1)[dense].reshape(dense.size * group, -1)
        st_max, st_min = kmax[:, head_slot[dense]], kmin[:, head_slot[dense]]
        n_pages = table.shape[0]
        if n_pages <= keep:
            chosen = np.broadcast_to(np.arange(n_pages), (dense.size, n_pages))
        else:
            chosen = top_pages(page_scores(qh, st_max, st_min, table, ctx, group, plan.page_size), keep)
        slot = int(plan.qb_slot[qb])
        sel_idx[slot, dense, : chosen.shape[1]] = chosen
        sel_cnt[slot, dense] = chosen.shape[1]


def visited_pages(
    plan: AttentionPlan, qb: int, cls: int, g: int, sel_idx, sel_cnt
) -> tuple[np.ndarray, np.ndarray]:
    """(physical, logical) pages KV head g of class `cls` visits for query block qb."""
    pages, lpages = plan.pages(qb, cls)
    if cls == 1 or plan.qb_keep is None or plan.qb_keep[qb] == 0:
        return pages, lpages
    slot = int(plan.qb_slot[qb])
    idx = sel_idx[slot, g, : sel_cnt[slot, g]]
    idx = np.union1d(idx, [pages.shape[0] - 1])  # the newest page, even if it began after the selection
    return pages[idx], lpages[idx]


def paged_attention_sparse_ref(
    q, kd, vd, ks, vs, plan: AttentionPlan, head_class, head_slot, sel_idx=None, sel_cnt=None
) -> np.ndarray:
    """Block-sparse paged attention over both pools; q [N, Hq, D] -> [N, Hq*D]."""
    n, hq, d = q.shape
    hkv = head_class.shape[0]
    group = hq // hkv
    out = np.empty((n, hq, d), np.float32)
    scale = np.float32(1.0 / math.sqrt(d))
    for qb in range(plan.num_qblocks):
        r0, nr, pos0 = int(plan.qb_start[qb]), int(plan.qb_len[qb]), int(plan.qb_pos[qb])
        ctx = int(plan.seq_ctx[plan.qb_seq[qb]])
        qpos = pos0 + np.arange(nr)
        for g in range(hkv):
            cls = int(head_class[g])
            kc, vc = (kd, vd) if cls == 0 else (ks, vs)
            pages, lpages = visited_pages(plan, qb, cls, g, sel_idx, sel_cnt)
            page = kc.shape[2]
            kpos = (lpages[:, None] * page + np.arange(page)[None, :]).reshape(-1)
            k = kc[pages, head_slot[g]].reshape(-1, d)
            v = vc[pages, head_slot[g]].reshape(-1, d)
            ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < ctx)
            if cls == 1:
                ok &= (kpos[None, :] < plan.qb_sink[qb]) | (qpos[:, None] - kpos[None, :] < plan.qb_local[qb])
            heads = slice(g * group, (g + 1) * group)
            s = (q[r0 : r0 + nr, heads] @ k.T) * scale  # [nr, group, L]
            s = np.where(ok[:, None, :], s, -np.inf)
            v = np.where((kpos < ctx)[:, None], v, 0)  # slots past the context may hold anything
            s = np.exp(s - s.max(-1, keepdims=True))
            out[r0 : r0 + nr, heads] = (s @ v) / s.sum(-1, keepdims=True)
    return out.reshape(n, hq * d)
