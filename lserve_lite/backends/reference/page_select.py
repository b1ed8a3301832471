"""Reference of kernels/page_select.cu: LServe's page selector for the dense heads of decode blocks.
The rule itself (scores, top pages, budget) is sparse/selector.py's; this applies it to a plan's blocks
and stores the selections where the decode kernels read them."""

from __future__ import annotations

import numpy as np

from ...sparse.plan import AttentionPlan
from ...sparse.selector import choose_pages


def select_pages_ref(
    q, kmax, kmin, plan: AttentionPlan, head_class, head_slot, sel_idx, sel_cnt, k=None
) -> None:
    """For decode blocks with a budget that refresh this step: store each dense head's top pages.

    `k` (the layer's dense pool) only for group_reduce "oracle", which ranks pages by exact attention.
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
        keys = k[:, head_slot[dense]] if plan.group_reduce == "oracle" else None  # no copy for the others
        chosen = choose_pages(
            qh, st_max, st_min, table, ctx, group, keep, plan.page_size, plan.group_reduce, keys=keys
        )
        slot = int(plan.qb_slot[qb])
        sel_idx[slot, dense, : chosen.shape[1]] = chosen
        sel_cnt[slot, dense] = chosen.shape[1]
