"""Scratch: where page_topk's time goes, max vs mass. Writes a copy of kernels/page_select.cu with clock64()
stamps (thread 0 of each CTA of query block 0) at the top-k's phase boundaries into TREE/kernels (TREE: a copy of
the repository), then (second invocation, from TREE) runs the selector on the bench's layers at 128k / 256k and
prints the cycles per phase, the refine depth and the list length; page_topk alone timed (CUDA Graph replays of 10
launches) by the unchanged kernel in the first invocation.
  python3 topk_profile.py patch TREE ; python3 topk_profile.py time LABEL OUTDIR   (repository root / TREE)"""

import json
import sys
from functools import partial
from pathlib import Path


def patch(tree: Path) -> None:
    p = tree / "kernels" / "page_select.cu"
    text = p.read_text()
    subs = [
        (
            "namespace lsattn {",
            "namespace lsattn {\n__device__ long long ps_prof[16][16];\n"
            "#define PROF(i) do { if (threadIdx.x == 0 && blockIdx.x == 0) ps_prof[blockIdx.y][i] = clock64(); } while (0)\n"
            "#define PROFV(i, v) do { if (threadIdx.x == 0 && blockIdx.x == 0) ps_prof[blockIdx.y][i] = (v); } while (0)\n",
        ),
        (
            "  Tiles<Src, RESIDENT> tiles(src, n);\n",
            "  PROF(3);\n  Tiles<Src, RESIDENT> tiles(src, n);\n  PROF(4);\n",
        ),
        (
            "  cta_min_max(lo, hi, sm);  // also publishes the zeroed histograms\n",
            "  cta_min_max(lo, hi, sm);  // also publishes the zeroed histograms\n  PROF(5);\n",
        ),
        (
            "  t.whole = c.count == t.need;\n  if (!t.whole) refine(tiles, t, sm);\n  compact(tiles, t, k, out, sm);\n",
            "  t.whole = c.count == t.need;\n  PROF(6);\n  if (!t.whole) refine(tiles, t, sm);\n  PROF(7);\n"
            "  compact(tiles, t, k, out, sm);\n  PROF(8);\n  PROFV(12, t.lo); PROFV(13, t.whole); PROFV(14, c.count);\n",
        ),
        (
            "  const int qb = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;\n",
            "  const int qb = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;\n  PROF(0);\n",
        ),
        (
            "  if (!job.on) return;\n  const int keep = min(job.keep, sel_cap)",
            "  if (!job.on) return;\n  PROF(1);\n  const int keep = min(job.keep, sel_cap)",
        ),
        (
            "      head_lse(lse_part + ((size_t)qb * Hkv + g) * group * parts, parts, group, sm);\n      src.lse = sm.lse;\n",
            "      head_lse(lse_part + ((size_t)qb * Hkv + g) * group * parts, parts, group, sm);\n      src.lse = sm.lse;\n"
            "      PROF(2);\n",
        ),
        (
            "    if (n <= stage_cap && (job.mass || n > TILE)) {",
            "    PROFV(15, n);\n    if (n <= stage_cap && (job.mass || n > TILE)) {",
        ),
    ]
    for old, new in subs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    p.write_text(text)


def time(label: str, out: Path) -> None:
    import cupy as cp
    import numpy as np

    sys.path.insert(0, "tools")
    import bench_sparse as bs

    from lserve_lite.backends import cuda_attention as ca

    profiled = "ps_prof" in (Path("kernels") / "page_select.cu").read_text()
    classes = bs.layer_classes()
    rows = []
    for ctx in (131072, 262144):
        for li in bs.LAYERS[:2]:
            hc = classes[li]
            st = bs._sparse_step(ctx, 1, hc, 4096, 128, 256)
            for reduce, plan in (("max", st[1]), ("mass", st["mass"])):
                args = (st["q"], st["kmax"], st["kmin"], plan, st["hcd"], st["hsd"], st["sel"], st["cnt"])
                row = {"label": label, "ctx": ctx, "layer": li, "reduce": reduce}
                if profiled:
                    k = ca._kernels()
                    ca.select_pages(*args)
                    cp.cuda.Device().synchronize()
                    ptr = k.select.raw.get_global("_ZN6lsattn7ps_profE")
                    buf = cp.ndarray((16, 16), np.int64, ptr)
                    buf.fill(0)
                    ca.select_pages(*args)
                    cp.cuda.Device().synchronize()
                    prof = buf.get()
                    dense = [g for g in range(hc.size) if hc[g] == 0]
                    p = prof[dense[0]]
                    t = {i: int(p[i]) for i in range(9)}
                    base = t[1]
                    row["phases_cycles"] = {
                        "job": t[1] - t[0], "head_lse": (t[2] - base) if t[2] else 0,
                        "stage": (t[3] - t[2]) if t[2] else 0, "fill": t[4] - t[3], "minmax": t[5] - t[4], "coarse": t[6] - t[5],
                        "refine": t[7] - t[6], "compact": t[8] - t[7], "total": t[8] - t[0],
                    }  # fmt: skip
                    row["refine_lo"], row["whole"], row["cut_count"], row["n"] = (
                        int(p[12]),
                        int(p[13]),
                        int(p[14]),
                        int(p[15]),
                    )
                else:
                    sc = partial(ca.select_pages, *args)
                    row["pair_us"] = bs._graph_us(sc)
                print(json.dumps(row), flush=True)
                rows.append(row)
            bs._free_memory()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "topk_profile.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "patch":
        patch(Path(sys.argv[2]))
    else:
        time(sys.argv[2], Path(sys.argv[3]))
