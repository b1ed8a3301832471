"""How much precision the page selector's statistics need (issue 12: the selector reads ~8 MB of fp16 kmax/kmin per
dense KV head at 256k, so 8-bit statistics would halve its traffic). SmolLM2 from its GGUF on the CPU, LServe, a
natural-text prompt (this repository's docs), the selector's inputs captured at every layer of a few decode steps;
each selection recomputed with the statistics as the engine keeps them (float32 on the CPU) and with 8-bit images
rounded outward (kmax up, kmin down, so a page's bound stays an upper bound):
  e4m3: FP8 E4M3 values (saturating at 448: a kmax beyond it would become +inf);
  int8: a scale per (logical page, KV head) = max |stat| / 127, kmax = ceil(x / s) s, kmin = floor(x / s) s;
  pow2: int8 as above with the scale the smallest power of two s with max |stat| / s <= 127;
  pow2inh: int8, power-of-two scale inherited (a writer that cannot see the whole key row at write time): per KV
    head along the sequence's logical pages, the first page takes its own pow2 scale, each later page the previous
    page's scale s_prev adjusted from that page's largest needed code c = max |stat_prev| / s_prev (c > 127: doubled
    until the previous page fits; c < 32: halved; else kept); a code beyond +-127 saturates: a kmax code is stored as
    127 and 127 is read as +inf, a kmin code as -127 read as -inf (a valid, loose bound). "+inf" is read as +-1e30
    (finite: the scorer's max(q, 0) kmax + min(q, 0) kmin would make 0 * inf NaN), so it ranks above every finite
    bound; among saturated pages the order is by the q mass on their saturated channels. Also reported: the share
    of statistics (kmax and kmin of each valid logical page, dense KV head and channel) that saturated.
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
from lserve_lite.llm import succeeded
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


INF_READ = 1e30  # what a saturated code (kmax 127 / kmin -127 of the inherited image) is read as: "+-inf"


def pow2_scale(m: np.ndarray) -> np.ndarray:
    """The smallest power of two s with m / s <= 127 (m > 0, float64)."""
    s = 2.0 ** np.ceil(np.log2(m / 127))
    s = np.where(m / s > 127, 2 * s, s)  # guard the log2's rounding both ways
    return np.where(m / (s / 2) <= 127, s / 2, s)


def inherited_scale(m: np.ndarray) -> np.ndarray:
    """Scales [L, H] for m [L, H] (max |stat| per logical page in sequence order and KV head): page 0 its own pow2
    scale, page i the scale of page i - 1 adjusted from that page's largest needed code."""
    s = np.empty_like(m)
    s[0] = pow2_scale(m[0])
    for i in range(1, m.shape[0]):
        prev, mp = s[i - 1], m[i - 1]
        c = mp / prev
        t = prev.copy()
        while np.any(mp / t > 127):
            t = np.where(mp / t > 127, 2 * t, t)
        s[i] = np.where(c < 32, prev / 2, t)
    return s


def int8_inherited(smax: np.ndarray, smin: np.ndarray, ctx: int, page_size: int):
    """The inherited-scale image of smax/smin [P, H, sub, D] (physical pages renumbered in sequence order) and the
    counts over valid logical pages: (statistics, saturated kmax, saturated kmin, kmax codes read as +inf,
    kmin codes read as -inf, codes clamped to a finite bound, pages whose scale is finer / coarser than their own,
    pages, heads with a page read as +-inf, heads)."""
    p, h, sub, d = smax.shape
    # [L, H, D]: the logical pages in sequence order
    lmax = smax.transpose(0, 2, 1, 3).reshape(p * sub, h, d).astype(np.float64)
    lmin = smin.transpose(0, 2, 1, 3).reshape(p * sub, h, d).astype(np.float64)
    m = np.maximum(np.maximum(np.abs(lmax), np.abs(lmin)).max(-1), 1e-8)  # [L, H]
    s = inherited_scale(m)
    own = pow2_scale(m)
    cx, cn = np.ceil(lmax / s[..., None]), np.floor(lmin / s[..., None])
    valid = (np.arange(p * sub) * (page_size // sub) < ctx)[:, None, None]  # logical pages holding a token
    qx, qn = np.clip(cx, -127, 127), np.clip(cn, -127, 127)
    counts = np.array(
        [
            2 * valid.sum() * h * d,
            (valid & (cx > 127)).sum(),
            (valid & (cn < -127)).sum(),
            (valid & (qx == 127)).sum(),
            (valid & (qn == -127)).sum(),
            (valid & ((cx < -127) | (cn > 127))).sum(),
            (valid[..., 0] & (s < own)).sum(),
            (valid[..., 0] & (s > own)).sum(),
            valid.sum() * h,
            (valid & ((qx == 127) | (qn == -127))).any(axis=(0, 2)).sum(),
            h,
        ],
        np.int64,
    )
    dmax = np.where(qx == 127, INF_READ, qx * s[..., None])
    dmin = np.where(qn == -127, -INF_READ, qn * s[..., None])
    back = (x.reshape(p, sub, h, d).transpose(0, 2, 1, 3).astype(np.float32) for x in (dmax, dmin))
    return (*back, counts)


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
    # a failed request is an error, not statistics of the steps it ran
    succeeded(llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=a.steps + 1, ignore_eos=True)))
    print(f"{len(ids)} prompt tokens, {len(calls)} selector calls (layers x steps), budget {a.budget}")
    kmax_abs = max(float(np.abs(c[1]).max()) for c in calls if c[1].size)
    print(f"largest |stat| {kmax_abs:.2f} (E4M3 saturates at 448)")
    for reduce in ("max", "mass"):
        report(calls, reduce)
    return 0


def report_saturation(counts: np.ndarray) -> None:
    n, sx, sn, ix, in_, clamp, finer, coarser, pages, hinf, heads = (int(x) for x in counts)
    print(f"pow2inh: {n} statistics (kmax, kmin x valid logical pages x dense heads x channels, all calls)")
    print(f"pow2inh: saturated (needed code beyond +-127, read as +-inf) {(sx + sn) / n:.3e} "
          f"(kmax {sx}, kmin {sn}); read as +-inf incl. an exact code of +-127: {(ix + in_) / n:.3e} "
          f"(kmax {ix}, kmin {in_}); clamped to a finite bound {clamp}")  # fmt: skip
    print(f"pow2inh: (logical page, head) scales finer than the page's own pow2 scale {finer / pages:.4f}, "
          f"coarser {coarser / pages:.4f}, of {pages}; selections (call x dense KV head) with a page read as "
          f"+-inf: {hinf} of {heads}")  # fmt: skip


def report(calls: list, reduce: str) -> None:
    """Every captured selection recomputed with each statistics format under the group reduction `reduce`."""
    rows = {"e4m3": [], "int8": [], "pow2": [], "pow2inh": []}
    mass = {"f32": [], "e4m3": [], "int8": [], "pow2": [], "pow2inh": [], "oracle": []}
    counts = np.zeros(11, np.int64)
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
        m = np.maximum(np.maximum(np.abs(smax), np.abs(smin)).max(-1, keepdims=True), 1e-8)
        scale = m / 127
        p2 = pow2_scale(m.astype(np.float64))
        ps = plan.page_size
        *inh, c = int8_inherited(smax, smin, ctx, ps)
        counts += c
        variants = {
            "f32": (smax, smin),
            "e4m3": (e4m3_out(smax, True), e4m3_out(smin, False)),
            "int8": (int8_out(smax, True, scale), int8_out(smin, False, scale)),
            "pow2": (int8_out(smax, True, p2), int8_out(smin, False, p2)),
            "pow2inh": tuple(inh),
        }
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
    if reduce == "max":  # the images do not depend on the reduction
        report_saturation(counts)


if __name__ == "__main__":
    sys.exit(main())
