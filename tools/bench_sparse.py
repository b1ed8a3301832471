"""LServe sparse attention on the GPU beside our dense path and torch peers (same run, same GPU).

Llama-3-8B heads (32 query / 8 KV heads, head dim 128, fp16, page 64) with the Llama-3-8B-Instruct-Gradient-1048k
DuoAttention pattern at static sparsity 0.5 (per-layer head classes; layers LAYERS are timed and averaged).
- prefill attention, one chunk of `seq` tokens, at 32k and 128k: ours dense (all heads causal), ours sparse
  (streaming heads sink 128 + local 8192 or 4096, one launch over both pools), torch SDPA flash / cuDNN dense,
  FlexAttention with the same block mask (if it runs);
- decode attention per layer at 128k and 256k, batch 1 and 8: ours dense (CUDA Graph), ours sparse = attention
  over the selected pages (budget 4096 tokens) + streaming windows (sink 128 + local 256) + 1/4 of the page
  selector (select_interval 4; the launcher LSERVE_SELECTOR names, as in the engine), both through CUDA Graphs;
  SDPA flash / cuDNN dense decode.
Writes JSON (--out DIR/bench_sparse.json) and a PNG of speedup against context length; prints a table.
- the page selector per layer at 128k and 256k, batch 1: every launcher of backends.cuda.SELECTORS
  (page_select.cu's two launches, the Numba kernel), group_reduce max and mass, through CUDA
  Graphs, and whether they pick the same pages.
Usage: python3 tools/bench_sparse.py --out DIR [--no-flex] [--quick] [--selector-only] [--no-prefill]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import _free_memory, _peer, _reps, events_median, torch_decode, torch_prefill  # noqa: E402

from lserve_lite.backends import require_gpu  # noqa: E402
from lserve_lite.engine_args import bounded_int, results_folder  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.evaluation.plotting import pyplot  # noqa: E402

HQ, HKV, D, PAGE, SUB = 32, 8, 128, 64, 4
LAYERS = (0, 8, 16, 24, 31)
PATTERN = "Llama-3-8B-Instruct-Gradient-1048k"


def layer_classes(sparsity: float = 0.5) -> list[np.ndarray]:
    from lserve_lite.sparse.patterns import head_classes, load_pattern

    here = Path(__file__).resolve().parents[1]
    for p in (here / "lserve_lite/sparse/patterns" / PATTERN / "full_attention_heads.tsv",):
        if p.is_file():
            return head_classes(load_pattern(p, 32, HKV), sparsity)
    raise FileNotFoundError(PATTERN)


def _slots(hc):
    slot = np.zeros_like(hc)
    for k in (0, 1):
        slot[hc == k] = np.arange(int((hc == k).sum()))
    return slot


def _rand(cp, shape, seed):
    return cp.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(np.float16)


def _timed(fn, est_ms=None):
    if est_ms is None:
        est_ms = events_median(fn, 1, 1)
    return events_median(fn, 1, _reps(est_ms))


def ours_prefill(seq: int, hc: np.ndarray | None, sink: int = 128, local: int = 8192) -> float:
    """Milliseconds of one prefill launch over `seq` new tokens (hc None: dense path, one pool)."""
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    npages = seq // PAGE
    table = [int(x) for x in np.random.default_rng(0).permutation(npages)]
    q = _rand(cp, (seq, HQ, D), 1)
    out = cp.empty((seq, HQ * D), np.float16)
    if hc is None:
        plan = CudaPlan.from_plan(build_plan(BatchLayout([seq], [seq], [table]), PAGE, 64))
        k, v = _rand(cp, (npages, HKV, PAGE, D), 2), _rand(cp, (npages, HKV, PAGE, D), 3)
        fn = lambda: paged_attention(q, k, v, plan, cp.zeros(HKV, np.int32), out=out)  # noqa: E731
    else:
        nd, ns = int((hc == 0).sum()), int((hc == 1).sum())
        lay = BatchLayout([seq], [seq], [table], stream_tables=[table], windows=[(sink, local)])
        plan = CudaPlan.from_plan(build_plan(lay, PAGE, 64))
        k, v = _rand(cp, (npages, nd, PAGE, D), 2), _rand(cp, (npages, nd, PAGE, D), 3)
        ks, vs = _rand(cp, (npages, ns, PAGE, D), 4), _rand(cp, (npages, ns, PAGE, D), 5)
        hcd, hsd = cp.asarray(hc.astype(np.int32)), cp.asarray(_slots(hc).astype(np.int32))
        fn = lambda: paged_attention(q, k, v, plan, hcd, out=out, ks=ks, vs=vs, head_slot=hsd)  # noqa: E731
    return _timed(fn)


def _graph(fn, steps: int = 10):
    import cupy as cp

    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()
        s.synchronize()
        s.begin_capture()
        for _ in range(steps):
            fn()
        g = s.end_capture()
    return g, s


def _graph_us(fn, steps: int = 10) -> float:
    g, s = _graph(fn, steps)
    with s:
        ms = events_median(lambda: g.launch(stream=s), 3, 30)
    return ms * 1000 / steps


def set_sub_pages(n: int) -> None:
    """The selector's logical pages per physical page for this run's key statistics."""
    global SUB
    if n < 1 or PAGE % n or n & (n - 1):
        raise SystemExit(f"--sub-pages must be a power of two dividing {PAGE}, got {n}")
    SUB = n


def _sparse_step(ctx: int, batch: int, hc: np.ndarray, budget: int, sink: int, local: int) -> dict:
    """Random LServe decode inputs of one layer: pools, key statistics, selection buffers, and the device plans
    of a reuse step (0), a refresh step (1) and a refresh step with group_reduce mass ("mass")."""
    import cupy as cp

    from lserve_lite.backends.cuda_attention import CudaPlan
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    per = ctx // PAGE
    perm = np.random.default_rng(0).permutation(per * batch)
    tables = [[int(x) for x in perm[i * per : (i + 1) * per]] for i in range(batch)]
    nd, ns = int((hc == 0).sum()), int((hc == 1).sum())
    ring = (math.ceil(sink / PAGE), math.ceil((local + 64) / PAGE) + 1)
    sp = ring[0] + ring[1]
    stables = [list(range(i * sp, (i + 1) * sp)) for i in range(batch)]
    keep = budget // PAGE
    kmax = _rand(cp, (per * batch, nd, SUB, D), 6)
    st = dict(
        q=_rand(cp, (batch, HQ, D), 1), nd=nd, ns=ns, kmax=kmax, kmin=kmax - cp.abs(_rand(cp, kmax.shape, 7)),
        k=_rand(cp, (per * batch, nd, PAGE, D), 2), v=_rand(cp, (per * batch, nd, PAGE, D), 3),
        ks=_rand(cp, (sp * batch, ns, PAGE, D), 4), vs=_rand(cp, (sp * batch, ns, PAGE, D), 5),
        hcd=cp.asarray(hc.astype(np.int32)), hsd=cp.asarray(_slots(hc).astype(np.int32)),
        sel=cp.zeros((batch, HKV, keep + 1), np.int32), cnt=cp.zeros((batch, HKV), np.int32),
    )  # fmt: skip
    for key, refresh, reduce in ((0, 0, "max"), (1, 1, "max"), ("mass", 1, "mass")):
        lay = BatchLayout([1] * batch, [ctx] * batch, tables, stream_tables=stables, windows=[(sink, local)] * batch,
                          sel_slots=list(range(batch)), sel_keep=[keep] * batch, sel_refresh=[refresh] * batch)  # fmt: skip
        st[key] = CudaPlan.from_plan(build_plan(lay, PAGE, 64, ring=ring, group_reduce=reduce))
    return st


def selectors(ctx: int, batch: int, hc: np.ndarray, budget: int = 4096) -> dict:
    """The page selector of one layer per launcher (backends.cuda.SELECTORS) and group reduction: us per
    call (CUDA Graph replays), and the fraction of (sequence, dense head) rows whose pages equal the
    RawKernel's with the same reduction."""
    import cupy as cp

    from lserve_lite.backends.cuda import SELECTORS, page_selector

    st = _sparse_step(ctx, batch, hc, budget, 128, 256)
    dense = hc == 0
    res, first = {}, {}
    for reduce, plan in (("max", st[1]), ("mass", st["mass"])):
        for name in SELECTORS:
            fn = page_selector(name)
            args = (st["q"], st["kmax"], st["kmin"], plan, st["hcd"], st["hsd"], st["sel"], st["cnt"])
            call = partial(fn, *args)
            st["sel"].fill(-1)
            call()
            cp.cuda.Device().synchronize()
            got = np.sort(st["sel"].get()[:, dense], axis=-1)
            first.setdefault(reduce, got)
            res[f"{name}_{reduce}_us"] = _graph_us(call)
            res[f"{name}_{reduce}_same"] = float(np.mean(np.all(got == first[reduce], axis=-1)))
    return res


def ours_decode(ctx: int, batch: int, hc: np.ndarray | None, budget: int = 4096, sink: int = 128,
                local: int = 256) -> dict:  # fmt: skip
    """Per-layer decode attention (us per step, CUDA Graph replays): dense path, or LServe sparse."""
    import cupy as cp

    from lserve_lite.backends.cuda import page_selector
    from lserve_lite.backends.cuda_attention import CudaPlan, paged_attention
    from lserve_lite.sparse.plan import BatchLayout, build_plan

    select_pages = page_selector(os.environ.get("LSERVE_SELECTOR", "rawkernel"))  # the engine's choice

    q, out = _rand(cp, (batch, HQ, D), 1), cp.empty((batch, HQ * D), np.float16)
    if hc is None:
        per = ctx // PAGE
        perm = np.random.default_rng(0).permutation(per * batch)
        tables = [[int(x) for x in perm[i * per : (i + 1) * per]] for i in range(batch)]
        plan = CudaPlan.from_plan(build_plan(BatchLayout([1] * batch, [ctx] * batch, tables), PAGE, 64))
        k, v = _rand(cp, (per * batch, HKV, PAGE, D), 2), _rand(cp, (per * batch, HKV, PAGE, D), 3)
        us = _graph_us(lambda: paged_attention(q, k, v, plan, cp.zeros(HKV, np.int32), out=out, decode=True))
        return {"us": us}
    st = _sparse_step(ctx, batch, hc, budget, sink, local)
    sel_args = (st["q"], st["kmax"], st["kmin"], st[1], st["hcd"], st["hsd"], st["sel"], st["cnt"])
    select_pages(*sel_args)
    cp.cuda.Device().synchronize()
    res = {"sel_cnt_min": int(st["cnt"][:, hc == 0].min()) if st["nd"] else 0}
    res["select_us"] = _graph_us(lambda: select_pages(*sel_args))
    res["attn_us"] = _graph_us(
        lambda: paged_attention(
            st["q"],
            st["k"],
            st["v"],
            st[0],
            st["hcd"],
            out=out,
            decode=True,
            ks=st["ks"],
            vs=st["vs"],
            head_slot=st["hsd"],
            sel_idx=st["sel"],
            sel_cnt=st["cnt"],
        )  # fmt: skip
    )
    res["us"] = res["attn_us"] + res["select_us"] / 4
    return res


def flex_prefill(seq: int, hc: np.ndarray, sink: int, local: int) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    hq_cls = torch.as_tensor(np.repeat(hc, HQ // HKV), device="cuda")

    def mask_mod(b, h, qi, ki):
        lam = (ki < sink) | (qi - ki < local)
        return (qi >= ki) & ((hq_cls[h] == 0) | lam)

    bm = create_block_mask(mask_mod, 1, HQ, seq, seq, device="cuda", BLOCK_SIZE=128, _compile=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, seq, D, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(1, HKV, seq, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(1, HKV, seq, D, device="cuda", dtype=torch.float16, generator=g)
    fa = torch.compile(flex_attention, dynamic=False)
    fn = lambda: fa(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
    from bench_attention import _torch_median

    return {"ms": _torch_median(fn)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", type=results_folder, help="folder for the results")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--selector-only", action="store_true", help="only the page selector rows (batch 1)")
    ap.add_argument(
        "--no-prefill", action="store_true", help="skip the prefill rows (selector and decode only)"
    )
    ap.add_argument(
        "--sub-pages", type=bounded_int(1, 64), default=SUB, help=f"logical pages per page ({SUB})"
    )
    a = ap.parse_args(argv)
    require_gpu("bench_sparse.py")
    set_sub_pages(a.sub_pages)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = layer_classes()
    layers = LAYERS[:2] if a.quick else LAYERS
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "layers": list(layers),
           "dense_heads_per_layer": [int((c == 0).sum()) for c in classes], "prefill": [], "decode": [],
           "selector": [], "sub_pages": SUB}  # fmt: skip
    t0 = time.time()
    for ctx in (131072, 262144):
        per = [selectors(ctx, 1, classes[i]) for i in layers]
        row = {"ctx": ctx, "batch": 1, **{k: float(np.mean([p[k] for p in per])) for k in per[0]}}
        res["selector"].append(row)
        _free_memory()
        print(json.dumps(row), f"t={time.time() - t0:.0f}s", flush=True)
    if a.selector_only:
        tail = "" if SUB == 4 else f"_s{SUB}"
        (out / f"bench_sparse_selector{tail}.json").write_text(json.dumps(res, indent=1))
        print(format_table(res))
        return 0
    for seq in () if a.no_prefill else (32768, 131072):
        row = {"seq": seq, "ours_dense_ms": ours_prefill(seq, None)}
        for local in (8192, 4096):
            row[f"ours_sparse_l{local}_ms"] = float(
                np.mean([ours_prefill(seq, classes[i], 128, local) for i in layers])
            )
        row["sdpa_flash"] = _peer(torch_prefill, seq, "flash")
        row["sdpa_cudnn"] = _peer(torch_prefill, seq, "cudnn")
        if not a.no_flex:
            mid = classes[layers[len(layers) // 2]]
            row["flex_l4096_one_layer"] = _peer(flex_prefill, seq, mid, 128, 4096)
            row["ours_sparse_l4096_same_layer_ms"] = ours_prefill(seq, mid, 128, 4096)
        res["prefill"].append(row)
        _free_memory()
        (out / "bench_sparse.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(row), f"t={time.time() - t0:.0f}s", flush=True)
    for ctx in (131072, 262144):
        for batch in (1, 8):
            row = {"ctx": ctx, "batch": batch, "ours_dense": ours_decode(ctx, batch, None)}
            per = [ours_decode(ctx, batch, classes[i]) for i in layers]
            row["ours_sparse"] = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
            row["sdpa_flash"] = _peer(torch_decode, ctx, "flash", batch)
            row["sdpa_cudnn"] = _peer(torch_decode, ctx, "cudnn", batch)
            res["decode"].append(row)
            _free_memory()
            (out / "bench_sparse.json").write_text(json.dumps(res, indent=1))
            print(json.dumps(row), f"t={time.time() - t0:.0f}s", flush=True)
    (out / "bench_sparse.json").write_text(json.dumps(res, indent=1))
    print(format_table(res))
    try:
        plot(res, out / "bench_sparse.png")
    except Exception as e:  # matplotlib may be missing on the device: plot from the JSON afterwards
        print("plot skipped:", e)
    return 0


def _ms(d, key="ms"):
    return d.get(key, float("nan")) if isinstance(d, dict) else float("nan")


def format_table(res: dict) -> str:
    lines = ["| prefill | ours dense ms | ours sparse l8192 | ours sparse l4096 | SDPA flash | SDPA cuDNN | Flex l4096 "
             "(same layer: ours) | flash / ours-l8192 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["prefill"]:
        fl = r.get("flex_l4096_one_layer", {})
        lines.append(
            f"| {r['seq'] // 1024}k | {r['ours_dense_ms']:.1f} | {r['ours_sparse_l8192_ms']:.1f} | "
            f"{r['ours_sparse_l4096_ms']:.1f} | {_ms(r['sdpa_flash']):.1f} | {_ms(r['sdpa_cudnn']):.1f} | "
            f"{_ms(fl):.1f} ({r.get('ours_sparse_l4096_same_layer_ms', float('nan')):.1f}) | "
            f"{_ms(r['sdpa_flash']) / r['ours_sparse_l8192_ms']:.2f}x |"
        )
    lines += ["", "| selector per layer | " + " | ".join(f"{n} {r} us (same pages)" for r in ("max", "mass")
              for n in ("rawkernel", "numba")) + " |", "|---|---|---|---|---|"]  # fmt: skip
    for r in res.get("selector", []):
        cells = [
            f"{r[f'{n}_{g}_us']:.1f} ({r[f'{n}_{g}_same']:.2f})"
            for g in ("max", "mass")
            for n in ("rawkernel", "numba")
        ]
        lines.append(f"| {r['ctx'] // 1024}k x{r['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "| decode | ours dense us | ours sparse us (attn + select/4) | select us | SDPA flash us | "
              "SDPA cuDNN us | flash / ours sparse |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["decode"]:
        s = r["ours_sparse"]
        fl = _ms(r["sdpa_flash"], "us")
        lines.append(
            f"| {r['ctx'] // 1024}k x{r['batch']} | {r['ours_dense']['us']:.1f} | {s['us']:.1f} "
            f"({s['attn_us']:.1f} + {s['select_us'] / 4:.1f}) | {s['select_us']:.1f} | {fl:.1f} | "
            f"{_ms(r['sdpa_cudnn'], 'us'):.1f} | {fl / s['us']:.1f}x |"
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["seq"] // 1024 for r in res["prefill"]]
    for key, lab in (
        ("ours_sparse_l8192_ms", "ours sparse (local 8192)"),
        ("ours_sparse_l4096_ms", "local 4096"),
    ):
        ax[0].plot(
            xs, [r["ours_dense_ms"] / r[key] for r in res["prefill"]], "o-", label=f"{lab} vs ours dense"
        )
    ax[0].plot(xs, [_ms(r["sdpa_flash"]) / r["ours_sparse_l8192_ms"] for r in res["prefill"]], "s--",
               label="local 8192 vs SDPA flash")  # fmt: skip
    ax[0].set(xlabel="context (k tokens)", ylabel="speedup", title="prefill attention")
    for b in (1, 8):
        rows = [r for r in res["decode"] if r["batch"] == b]
        ax[1].plot([r["ctx"] // 1024 for r in rows], [r["ours_dense"]["us"] / r["ours_sparse"]["us"] for r in rows],
                   "o-", label=f"batch {b} vs ours dense")  # fmt: skip
        ax[1].plot([r["ctx"] // 1024 for r in rows], [_ms(r["sdpa_flash"], "us") / r["ours_sparse"]["us"] for r in rows],
                   "s--", label=f"batch {b} vs SDPA flash")  # fmt: skip
    ax[1].set(xlabel="context (k tokens)", ylabel="speedup", title="decode attention (per layer)")
    for x in ax:
        x.legend(fontsize=7)
        x.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
