"""References of kernels/attention_prefill.cu and kernels/attention_decode.cu: block-sparse paged attention
executing an AttentionPlan, over one KV pool (dense mode) or two (LServe: dense-head pool + streaming
pool, selected pages at decode). float32, softmax in float32; they run the same plans as the GPU kernels,
so the two compare exactly. `attend_qblocks` is also the CPU backend's prefill attention. A quantized cache
(values + `scales`, kv/quant.py) is dequantized as its visited pages are gathered.
"""

from __future__ import annotations

import math

import numpy as np

from ...kv.quant import KVFormat, dequantize
from ...sparse.plan import AttentionPlan
from ...sparse.selector import visited_selection
from .. import cpu_kernels as K


def gather_rows(cache, scales, fmt: KVFormat | None, pages, h) -> np.ndarray:
    """Head h's K (or V) rows on `pages` as float32 [len(pages) * page, D], dequantized if `scales` is given."""
    x = cache[pages, h]
    if scales is not None:
        x = dequantize(x, scales[pages, h], fmt, np.float32)
    elif x.dtype == np.float16:  # an fp16 CPU cache: BLAS multiplies float32
        x = x.astype(np.float32)
    return x.reshape(-1, x.shape[-1])


def paged_attention_ref(
    q, k_cache, v_cache, plan: AttentionPlan, head_class: np.ndarray, k_scale=None, v_scale=None, fmt=None
) -> np.ndarray:
    """Block-sparse paged attention executing `plan`; q [N, Hq, D] -> [N, Hq*D].

    Per query block and KV head: gather the head's listed pages, one GEMM for its query heads, mask
    (causal, context end, and the sink/local window for streaming heads), softmax in float32, one GEMM.
    """
    out = np.empty(q.shape, np.float32)
    attend_qblocks(
        q, k_cache, v_cache, plan, np.asarray(head_class), out, 0, plan.num_qblocks, k_scale, v_scale, fmt
    )
    return out.reshape(q.shape[0], -1)


def attend_qblocks(
    q, k_cache, v_cache, plan: AttentionPlan, head_class, out, qb0: int, qb1: int, k_scale=None, v_scale=None,
    fmt=None, gather=gather_rows,
) -> None:  # fmt: skip
    """`paged_attention_ref` for query blocks qb0..qb1-1, written into out [N, Hq, D]; `gather` has
    `gather_rows`' contract (the CPU backend passes its Numba one)."""
    d, page = q.shape[2], k_cache.shape[2]
    group = q.shape[1] // k_cache.shape[1]
    scale = np.float32(1.0 / math.sqrt(d))
    for qb in range(qb0, qb1):
        r0, nr, pos0 = int(plan.qb_start[qb]), int(plan.qb_len[qb]), int(plan.qb_pos[qb])
        ctx = int(plan.seq_ctx[plan.qb_seq[qb]])
        qpos = pos0 + np.arange(nr)
        for cls in (0, 1):
            heads = np.nonzero(head_class == cls)[0]
            if heads.size == 0:
                continue
            pages, lpages = plan.pages(qb, cls)
            kpos = (lpages[:, None] * page + np.arange(page)[None, :]).reshape(-1)
            ok = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < ctx)
            if cls == 1:  # the block's window (a dense-mode plan's are all its sink / local)
                ok &= (kpos[None, :] < plan.qb_sink[qb]) | (qpos[:, None] - kpos[None, :] < plan.qb_local[qb])
            past = kpos >= ctx  # slots past the context may hold anything (a freed page's NaN: 0 * NaN = NaN)
            stale = bool(past.any())
            for h in heads:
                rows = slice(h * group, (h + 1) * group)
                qh = q[r0 : r0 + nr, rows].reshape(nr * group, d)
                s = (qh @ gather(k_cache, k_scale, fmt, pages, h).T).reshape(nr, group, -1)
                tot = K.masked_softmax(s, ok, scale)
                v = gather(v_cache, v_scale, fmt, pages, h)
                if stale:
                    v[past] = 0
                o = s.reshape(nr * group, -1) @ v
                o /= tot.reshape(-1, 1)
                out[r0 : r0 + nr, rows] = o.reshape(nr, group, d)


def visited_pages(
    plan: AttentionPlan, qb: int, cls: int, g: int, sel_idx, sel_cnt
) -> tuple[np.ndarray, np.ndarray]:
    """(physical, logical) pages KV head g of class `cls` visits for query block qb."""
    pages, lpages = plan.pages(qb, cls)
    if cls == 1 or plan.qb_keep is None or plan.qb_keep[qb] == 0:
        return pages, lpages
    slot = int(plan.qb_slot[qb])
    ctx = int(plan.qb_pos[qb] + plan.qb_len[qb])
    idx = visited_selection(sel_idx[slot, g, : sel_cnt[slot, g]], ctx, plan.page_size)
    return pages[idx], lpages[idx]


def paged_attention_sparse_ref(
    q, kd, vd, ks, vs, plan: AttentionPlan, head_class, head_slot, sel_idx=None, sel_cnt=None,
    scales: tuple = (None,) * 4, fmt: KVFormat | None = None,
) -> np.ndarray:  # fmt: skip
    """Block-sparse paged attention over both pools; q [N, Hq, D] -> [N, Hq*D]; `scales` of kd, vd, ks, vs."""
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
            kc, vc, ksc, vsc = (kd, vd, *scales[:2]) if cls == 0 else (ks, vs, *scales[2:])
            pages, lpages = visited_pages(plan, qb, cls, g, sel_idx, sel_cnt)
            page = kc.shape[2]
            kpos = (lpages[:, None] * page + np.arange(page)[None, :]).reshape(-1)
            k = gather_rows(kc, ksc, fmt, pages, head_slot[g])
            v = gather_rows(vc, vsc, fmt, pages, head_slot[g])
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
