"""Check the spread norm's kernels (kernels/spread_norm.cuh through quant_gemv_split.cu; CudaOps.linear_add) without a
GPU, in quant_host_check.py's emulator (the kernels compiled unchanged as host code):

- producer (`sadd`, SPREAD_ADD at R = 1, 2, 4 and the deep sets, a row group per warp and a 3-block persistent
  grid): the residual stream must equal res + fp16(y) bit for bit, y the plain split kernel's sums of the same W and
  x (checked against float64 by quant_host_check), and each block's partial the float64 sum of squares of the
  outputs its warps wrote (rtol 1e-5); y itself against x @ W^T in float64 with the split GEMV's tolerance.
- consumers (`ssilu` / `srope` after `spread`: gate_up + SiLU, q/k/v + RoPE), two ways: against float64 (gate_up:
  harness.quant.norm_linear_ref of the residual, partials cut at random points), and bit for bit against the plain
  kernel on the normed row where the norm is exact (every residual value +-2 and eps 0: rstd = 1/2, so r * w and
  its fp16 norm quantize to the same integers and the sums differ by exactly the factor 2 that rstd takes back).

    python3 tools/spread_host_check.py [--formats q4_1 int8] [--seed N]

Prints one line per case; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from quant_host_check import (  # noqa: E402
    PERSIST_BLOCKS,
    ROPE_LEN,
    ROPE_PAGE,
    ROPE_PAGES,
    ROPE_SUB,
    build,
    rope_scene,
    write_split,
)

from lserve_lite.backends.quant_split import SPLIT_FORMATS  # noqa: E402
from lserve_lite.engine_args import bounded_int  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.harness.quant import (  # noqa: E402
    U32,
    activation_bound,
    norm_linear_ref,
    random_quant,
    reference_matrix,
    unit_scale,
)
from lserve_lite.harness.spread import random_partials  # noqa: E402
from lserve_lite.weights.qtensor import LAYOUTS  # noqa: E402

WARPS = 8  # quant_gemv_split's SWARPS
# (K, M) of the producer: M not a multiple of R or of the warps
ADD_SHAPES = [(96, 37), (256, 301), (576, 64)]
NORM_SHAPES = [(256, 21), (576, 61)]  # (K, I) of the gate_up consumer
ROPE_SHAPES = [(256, 4, 2, 64), (512, 6, 3, 128)]  # (K, Hq, Hkv, D) of the q/k/v consumer


def run(exe: Path, *args) -> None:
    subprocess.run([str(exe), *(str(a) for a in args)], check=True)


def block_outputs(m: int, r: int, blocks: int) -> list[np.ndarray]:
    """The outputs each block's warps write: warp w of the grid takes row groups w, w + warps, ... of r rows."""
    gstride, groups = blocks * WARPS, -(-m // r)
    out = []
    for b in range(blocks):
        gs = [g for w in range(b * WARPS, (b + 1) * WARPS) for g in range(w, groups, gstride)]
        out.append(np.array([g * r + i for g in gs for i in range(r) if g * r + i < m], np.int64))
    return out


def check_add(exe: Path, tmp: Path, fmt: str, k: int, m: int, r: str, rng: np.random.Generator) -> bool:
    """SPREAD_ADD at `r` rows a warp ("2d": the deep sets) on both grids."""
    qt = random_quant(fmt, m, k, rng)
    arrays, ref_w = write_split(tmp, qt), reference_matrix(qt)
    x = rng.standard_normal((1, k)) * unit_scale(ref_w)
    x[:, :32] *= 50.0  # one block of large activations
    x = x.astype(np.float16)
    x.tofile(tmp / "x.bin")
    rr = 2 if r == "2d" else int(r)
    rarg = -2 if r == "2d" else rr
    run(exe, "split", fmt, 1, m, k, m, rarg, 1, 0, *arrays, tmp / "x.bin", tmp / "y.bin")
    y = np.fromfile(tmp / "y.bin", np.float32)
    res = (3.0 * rng.standard_normal(m)).astype(np.float32)
    ref = (x.astype(np.float64) @ ref_w.T)[0]
    atol = (k / 32 + 20) * U32 * (np.abs(x.astype(np.float64)) @ np.abs(ref_w).T)[0]
    atol += activation_bound(x, ref_w, 1)[0] + 2.0**-11 * np.abs(ref)  # + the fp16 rounding of the output
    ok = True
    for grid in (0, PERSIST_BLOCKS):
        res.tofile(tmp / "res.bin")
        run(exe, "sadd", fmt, m, k, rarg, grid, *arrays, tmp / "x.bin", tmp / "res.bin", tmp / "part.bin")
        got = np.fromfile(tmp / "res.bin", np.float32)
        part = np.fromfile(tmp / "part.bin", np.float32)
        blocks = -(-m // (WARPS * rr)) if grid == 0 else min(grid, -(-m // (WARPS * rr)))
        want = res + y.astype(np.float16).astype(np.float32)
        exact = bool(np.array_equal(got, want))
        close = bool(np.all(np.abs(got.astype(np.float64) - res - ref) <= atol))
        sums = np.array([np.sum(got[o].astype(np.float64) ** 2) for o in block_outputs(m, rr, blocks)])
        parts = len(part) == blocks and bool(np.allclose(part, sums, rtol=1e-5, atol=1e-30))
        good = exact and close and parts
        print(f"sadd{r:2s}  {fmt:5s} K{k} M{m} grid {blocks}: residual {'exact' if exact else 'WRONG'}, "
              f"vs float64 {'ok' if close else 'WRONG'}, partials {'ok' if parts else 'WRONG'} "
              f"{'PASS' if good else 'FAIL'}")  # fmt: skip
        ok &= good
    return ok


def write_spread(tmp: Path, res: np.ndarray, lnw: np.ndarray, rng: np.random.Generator) -> list:
    """The `spread` prefix's files: the residual, its squares summed in float32 over pieces cut at random points
    (a producer's partials; one empty), the norm weight."""
    res.astype(np.float32).tofile(tmp / "sres.bin")
    part = random_partials(rng, res, 6)
    part.tofile(tmp / "spart.bin")
    lnw.tofile(tmp / "slnw.bin")
    return [tmp / "sres.bin", tmp / "spart.bin", len(part), tmp / "slnw.bin"]


def norm_weight(k: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """An RMSNorm weight around `scale` (unit_scale: the normed rows' outputs about unit size)."""
    return ((1.0 + 0.5 * rng.standard_normal(k)) * scale).astype(np.float16)


def exact_norm_inputs(
    k: int, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual of +-2, norm weight, its normed row in fp16): with eps 0, rstd is exactly 1/2 and h = r w / 2."""
    res = np.where(rng.random(k) < 0.5, -2.0, 2.0).astype(np.float32)
    lnw = norm_weight(k, scale, rng)
    return res, lnw, (res * lnw.astype(np.float32) / 2).astype(np.float16)[None]


def check_norm_silu(exe: Path, tmp: Path, fmt: str, k: int, inter: int, r: int, rng: np.random.Generator,
                    ) -> bool:  # fmt: skip
    """SPREAD_NORM with SILU at `r` rows a warp: float64 on a random residual, bit for bit on an exact one."""
    qt = random_quant(fmt, 2 * inter, k, rng)
    arrays, ref_w, ldy, eps = write_split(tmp, qt), reference_matrix(qt), inter + 3, 1e-5
    res = (3.0 * rng.standard_normal(k)).astype(np.float32)
    res[:32] *= 8.0
    lnw = norm_weight(k, unit_scale(ref_w), rng)
    sizes = (1, inter, k, ldy, r, PERSIST_BLOCKS)
    spread = ["spread", *write_spread(tmp, res, lnw, rng), eps]
    run(exe, *spread, "ssilu", fmt, *sizes, *arrays, "-", tmp / "y.bin")
    y = np.fromfile(tmp / "y.bin", np.float16).astype(np.float64)
    ref, tol, _ = norm_linear_ref(np.zeros((1, k), np.float16), res[None], lnw, eps, ref_w, True, True)
    tol = tol[0] + 2.0**-10 * np.abs(ref[0])
    err = np.abs(y[:inter] - ref[0])
    close = bool(np.all(err <= tol) and np.all(y[inter:] == 12344.0))
    res, lnw, h = exact_norm_inputs(k, unit_scale(ref_w), rng)
    spread = ["spread", *write_spread(tmp, res, lnw, rng), 0.0]
    run(exe, *spread, "ssilu", fmt, *sizes, *arrays, "-", tmp / "y.bin")
    got = np.fromfile(tmp / "y.bin", np.float16)
    h.tofile(tmp / "x.bin")
    run(exe, "ssilu", fmt, *sizes, *arrays, tmp / "x.bin", tmp / "y.bin")
    exact = bool(np.array_equal(got, np.fromfile(tmp / "y.bin", np.float16)))
    good = close and exact
    print(f"snorm{r}  {fmt:5s} K{k} I{inter}: max err / bound {float((err / tol).max()):.2e}, exact norm "
          f"{'equal' if exact else 'DIFFERS'} {'PASS' if good else 'FAIL'}")  # fmt: skip
    return good


def check_norm_rope(exe: Path, tmp: Path, fmt: str, k: int, hq: int, hkv: int, d: int, sparse: bool,
                    rng: np.random.Generator) -> bool:  # fmt: skip
    """quant_gemv_split_rope_spread bit for bit against quant_gemv_split_rope on the exactly normed row: q, the K/V
    slots and the page statistics it writes."""
    m = (hq + 2 * hkv) * d
    qt = random_quant(fmt, m, k, rng)
    arrays = write_split(tmp, qt)
    res, lnw, h = exact_norm_inputs(k, unit_scale(reference_matrix(qt)), rng)
    h.tofile(tmp / "x.bin")
    spread = ["spread", *write_spread(tmp, res, lnw, rng), 0.0]
    pos = rng.integers(0, ROPE_LEN, 1).astype(np.int64)
    ang = rng.uniform(0, 2 * np.pi, (ROPE_LEN, d // 2))
    tables = {"pos": pos, "cos": np.cos(ang).astype(np.float16), "sin": np.sin(ang).astype(np.float16)}
    sc = rope_scene(rng, 1, hkv, d, sparse)
    sc["q"] = np.full((1, hq, d), 7.0, np.float16)
    order = ("q", "kc", "vc", "ks", "vs", "hc", "hs", "kmax", "kmin")
    nd, ns = sc["kc"].shape[1], sc["ks"].shape[1] if sparse else 0
    cache = (ROPE_PAGE, ROPE_LEN, ROPE_PAGES, nd, ns, ROPE_SUB if sparse else 1)
    sizes = (1, hq, hkv, d, k, *cache, PERSIST_BLOCKS)
    outs = [f for f in order if f in sc and f not in ("hc", "hs")]
    got = []
    for head, x in ((spread, "-"), ([], tmp / "x.bin")):
        for f, a in {**tables, **sc}.items():
            a.tofile(tmp / f"r_{f}.bin")
        tail = [tmp / f"r_{f}.bin" for f in ("pos", "slots", "cos", "sin")]
        tail += [tmp / f"r_{f}.bin" if f in sc else "-" for f in order]
        run(exe, *head, "srope", fmt, *sizes, *arrays, x, *tail)
        got.append({f: np.fromfile(tmp / f"r_{f}.bin", np.float16) for f in outs})
    bad = [f for f in outs if not np.array_equal(got[0][f], got[1][f])]
    moved = not np.array_equal(got[0]["q"], sc["q"].reshape(-1))  # the run wrote q at all
    ok = not bad and moved
    print(f"srope-s {fmt:5s} K{k} Hq{hq} Hkv{hkv} D{d}{' LServe' if sparse else ''}: "
          f"{'PASS' if ok else 'FAIL (' + (', '.join(bad) or 'nothing written') + ')'}")  # fmt: skip
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", choices=sorted(SPLIT_FORMATS), default=["q4_1", "int8", "q4_k"])
    ap.add_argument("--seed", type=bounded_int(0), default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = build(tmp)
        for fmt in args.formats:
            block = LAYOUTS[fmt].block
            for k, m in ADD_SHAPES:
                if k % block == 0:
                    ok &= all([check_add(exe, tmp, fmt, k, m, r, rng) for r in ("1", "2", "2d", "4")])
            for k, inter in NORM_SHAPES:
                if k % block == 0:
                    ok &= all([check_norm_silu(exe, tmp, fmt, k, inter, r, rng) for r in (2, 4)])
            for k, hq, hkv, dh in ROPE_SHAPES:
                if k % block == 0:
                    ok &= all([check_norm_rope(exe, tmp, fmt, k, hq, hkv, dh, s, rng) for s in (False, True)])
    print("all passed" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
