"""How much precision the page selector's statistics need (issue 12: the selector reads ~8 MB of fp16 kmax/kmin per
dense KV head at 256k, so 8-bit statistics would halve its traffic). SmolLM2 from its GGUF on the CPU, LServe, a
natural-text prompt (this repository's docs), the selector's inputs captured at every layer of a few decode steps;
each selection recomputed with the statistics as the engine keeps them (float32 on the CPU) and with 8-bit images
rounded outward (kmax up, kmin down, so a page's bound stays an upper bound):
  e4m3: FP8 E4M3 values (saturating at 448: a kmax beyond it would become +inf);
  int8: a scale per (logical page, KV head) = max |stat| / 127, kmax = ceil(x / s) s, kmin = floor(x / s) s.
Reported per format: the share of the float32 selection it keeps, and the exact attention mass its pages hold
(the group's mean softmax weight, from the keys) against float32's and against the oracle's top pages.

    python3 stats_precision.py <gguf> [--tokens 7000] [--budget 1024] [--steps 4]   (both group reductions, max and mass)
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from lserve_lite import LLM, SamplingParams
from lserve_lite.backends import cpu as cpu_backend
from lserve_lite.config import EngineConfig, SparseConfig
from lserve_lite.sparse.selector import choose_pages, exact_page_scores


def e4m3_out(x: np.ndarray, up: bool) -> np.ndarray:
    """x rounded to FP8 E4M3 toward +inf (up) or -inf: 3 mantissa bits, normals from 2^-6, subnormal step 2^-9."""
    a = np.abs(x).astype(np.float64)
    e = np.floor(np.log2(np.maximum(a, 2.0**-6)))
    step = 2.0 ** (e - 3)
    r = (np.ceil if up else np.floor)(x / step) * step
    return np.clip(r, -448, 448).astype(np.float32)


def int8_out(x: np.ndarray, up: bool, scale: np.ndarray) -> np.ndarray:
    return ((np.ceil if up else np.floor)(x / scale) * scale).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=7000)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    sp = SparseConfig(enabled=True, token_budget=a.budget, select_interval=1)
    llm = LLM(a.gguf, backend="cpu", config=EngineConfig(sparse=sp, max_model_len=8192))
    root = Path(__file__).resolve().parents[3]
    text = "\n\n".join(p.read_text() for p in sorted((root / "docs").glob("*.md")))
    ids = llm.tokenizer.encode(text)[: a.tokens]
    calls = []

    def spy(*args):  # the sequence's pages only, renumbered 0..n-1 (the pools are much larger)
        q, kmax, kmin, plan, head_class, head_slot = args[:6]
        table = np.asarray(plan.pages(0, 0)[0], np.int64)
        pages = (kmax[table], kmin[table], args[8][table].astype(np.float32))
        calls.append((q.copy(), *pages, plan, head_class.copy(), head_slot.copy()))
        return select(*args)

    select = cpu_backend.select_pages_numba
    cpu_backend.select_pages_numba = spy  # this script's probe, not the engine's
    llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=a.steps + 1, ignore_eos=True))
    print(f"{len(ids)} prompt tokens, {len(calls)} selector calls (layers x steps), budget {a.budget}")
    kmax_abs = max(float(np.abs(c[1]).max()) for c in calls if c[1].size)
    print(f"largest |stat| {kmax_abs:.2f} (E4M3 saturates at 448)")
    for reduce in ("max", "mass"):
        report(calls, reduce)
    return 0


def report(calls: list, reduce: str) -> None:
    """Every captured selection recomputed with each statistics format under the group reduction `reduce`."""
    rows = {"e4m3": [], "int8": []}
    mass = {"f32": [], "e4m3": [], "int8": [], "oracle": []}
    for q, kmax, kmin, k, plan, hc, hs in calls:
        hkv = hc.shape[0]
        dense = np.nonzero(hc == 0)[0]
        if dense.size == 0:
            continue
        group = q.shape[1] // hkv
        ctx = int(plan.qb_pos[0]) + 1
        table = np.arange(kmax.shape[0])  # renumbered by the probe
        keep = int(plan.qb_keep[0])
        qh = q[plan.qb_start[0]].reshape(hkv, group, -1)[dense].reshape(dense.size * group, -1)
        smax, smin, keys = kmax[:, hs[dense]], kmin[:, hs[dense]], k[:, hs[dense]]
        scale = np.maximum(np.maximum(np.abs(smax), np.abs(smin)).max(-1, keepdims=True), 1e-8) / 127
        variants = {
            "f32": (smax, smin),
            "e4m3": (e4m3_out(smax, True), e4m3_out(smin, False)),
            "int8": (int8_out(smax, True, scale), int8_out(smin, False, scale)),
        }
        ps = plan.page_size
        w = np.exp(exact_page_scores(qh, keys, table, ctx, group))  # [Hd, pages]: the group's mean weight
        sel = {
            n: choose_pages(qh, mx, mn, table, ctx, group, keep, ps, reduce)
            for n, (mx, mn) in variants.items()
        }
        sel["oracle"] = choose_pages(qh, smax, smin, table, ctx, group, keep, ps, "oracle", keys=keys)
        for n, s in sel.items():
            mass[n].append(np.take_along_axis(w, s.astype(np.int64), 1).sum(1))
        for n in rows:
            rows[n] += [len(set(x) & set(y)) / len(y) for x, y in zip(sel[n], sel["f32"])]
    for n, r in rows.items():
        print(f"{reduce} {n}: keeps {np.mean(r):.4f} of float32's pages (min over heads {np.min(r):.3f})")
    f32 = np.concatenate(mass["f32"])
    for n, m in mass.items():
        m = np.concatenate(m)
        print(f"{reduce} {n}: attention mass held {m.mean():.4f} (float32 {f32.mean():.4f}; per head vs float32: "
              f"mean {np.mean(m - f32):+.5f}, worst {np.min(m - f32):+.4f})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
