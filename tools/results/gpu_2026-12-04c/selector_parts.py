"""Scratch: page_score alone, page_topk alone, the pair and the fused kernel, per layer (graph replays)."""
import sys
from functools import partial

import numpy as np
import cupy as cp

sys.path.insert(0, "tools")
import bench_sparse as bs  # noqa: E402
from lserve_lite.backends import cuda_attention as ca  # noqa: E402

classes = bs.layer_classes()
for ctx in (131072, 262144):
    for li in bs.LAYERS[:2]:
        hc = classes[li]
        st = bs._sparse_step(ctx, 1, hc, 4096, 128, 256)
        plan = st[1]
        q, kmax, kmin = st["q"], st["kmax"], st["kmin"]
        hcd, hsd, sel, cnt = st["hcd"], st["hsd"], st["sel"], st["cnt"]
        k = ca._kernels()
        hq, d, hkv = q.shape[1], q.shape[2], hc.size
        nd, sub = kmax.shape[1], kmax.shape[2]
        scores = plan.workspace("sel_scores", hq * plan.max_pages, np.float32)
        qsmem = (hq // hkv) * d * 8
        pa = ca._plan_args(plan)
        sargs = (q, kmax, kmin, *pa, ca._int32_dev(hcd), ca._int32_dev(hsd), np.int32(nd), np.int32(sub), scores,
                 np.int32(plan.max_pages), np.int32(hq), np.int32(hkv), np.int32(plan.page_size.bit_length() - 1))
        gx = ca.score_grid_x(plan.max_pages, plan.max_qblocks, nd, k.num_sms)
        gx_old = -(-plan.max_pages // (8 * 6))
        fs = k.get(k.select, f"page_score_d{d}", qsmem)
        ft = k.get(k.select, "page_topk", ca.topk_stage_bytes(ca._TOPK_STAGE_MAX))
        score = lambda: fs((gx, plan.max_qblocks, hkv), (256,), sargs, shared_mem=qsmem)
        score_old = lambda: fs((gx_old, plan.max_qblocks, hkv), (256,), sargs, shared_mem=qsmem)
        topk = lambda: ft((plan.max_qblocks, hkv), (512,), (*pa, ca._int32_dev(hcd), scores, np.int32(plan.max_pages),
                          np.int32(hkv), np.int32(hq // hkv), sel, cnt, np.int32(sel.shape[-1]), np.int32(0)), shared_mem=0)
        row = {"ctx": ctx, "layer": li, "dense": int(nd), "gx": gx, "gx_old": gx_old}
        row["score_us"] = bs._graph_us(score)
        row["score_old_us"] = bs._graph_us(score_old)
        row["topk_us"] = bs._graph_us(topk)
        args = (q, kmax, kmin, plan, hcd, hsd, sel, cnt)
        row["pair_us"] = bs._graph_us(partial(ca.select_pages, *args))
        ref = None
        sel.fill(-1); ca.select_pages(*args); ref = np.sort(sel.get(), -1)
        for minb in ("2", "1"):
            import os
            os.environ["LSERVE_SELECT_MINB"] = minb
            sel.fill(-1); ca.select_pages(*args, fused=True); got = np.sort(sel.get(), -1)
            row[f"fused{minb}_same"] = bool((got[:, hc == 0] == ref[:, hc == 0]).all())
            row[f"fused{minb}_us"] = bs._graph_us(partial(ca.select_pages, *args, fused=True))
            row[f"fused{minb}_again_same"] = bool((np.sort(sel.get(), -1)[:, hc == 0] == ref[:, hc == 0]).all())
        print(row, flush=True)
        bs._free_memory()
