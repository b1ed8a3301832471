"""Scratch: page_score alone, page_topk alone and the pair (max / mass), per bench layer (0: 1 dense KV head,
8: 6), 128k and 256k, batch 1, CUDA Graph replays of 10 launches; saves the pair's selections for comparing
builds.  python3 selector_parts.py LABEL OUTDIR  (run from the repository root)"""

import json
import sys
from functools import partial
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, "tools")
import bench_sparse as bs  # noqa: E402

from lserve_lite.backends import cuda_attention as ca  # noqa: E402

label, out = sys.argv[1], Path(sys.argv[2])
classes = bs.layer_classes()
rows, sels = [], {}
for ctx in (131072, 262144):
    for li in bs.LAYERS[:2]:
        hc = classes[li]
        st = bs._sparse_step(ctx, 1, hc, 4096, 128, 256)
        q, kmax, kmin = st["q"], st["kmax"], st["kmin"]
        hcd, hsd, sel, cnt = st["hcd"], st["hsd"], st["sel"], st["cnt"]
        row = {"label": label, "ctx": ctx, "layer": li, "dense": int((hc == 0).sum())}
        for reduce, plan in (("max", st[1]), ("mass", st["mass"])):
            k = ca._kernels()
            hq, d, hkv = q.shape[1], q.shape[2], hc.size
            nd, sub = kmax.shape[1], kmax.shape[2]
            scores = plan.workspace("sel_scores", hq * plan.max_pages, np.float32)
            smem = (hq // hkv) * d * 8
            pa = ca._plan_args(plan)
            gx = ca.score_grid_x(plan.max_pages, plan.max_qblocks, nd, k.num_sms)
            fs = k.get(k.select, f"page_score_d{d}", smem)
            sargs = (q, kmax, kmin, *pa, hcd, hsd, np.int32(nd), np.int32(sub), scores, np.int32(plan.max_pages),
                     np.int32(hq), np.int32(hkv), np.int32(plan.page_size.bit_length() - 1))  # fmt: skip
            row["gx"] = gx
            row[f"score_{reduce}_us"] = bs._graph_us(
                partial(fs, (gx, plan.max_qblocks, hkv), (256,), sargs, shared_mem=smem)
            )
            args = (q, kmax, kmin, plan, hcd, hsd, sel, cnt)
            sel.fill(-1)
            ca.select_pages(*args)
            cp.cuda.Device().synchronize()
            sels[f"{ctx}_{li}_{reduce}"] = np.sort(sel.get(), -1)
            row[f"pair_{reduce}_us"] = bs._graph_us(partial(ca.select_pages, *args))
        print(json.dumps(row), flush=True)
        rows.append(row)
        bs._free_memory()
out.mkdir(parents=True, exist_ok=True)
np.savez(out / f"sel_{label}.npz", **sels)
with open(out / "parts.jsonl", "a") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
