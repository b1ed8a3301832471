"""Check kernels/quant_gemv.cu and kernels/quant_gemv_split.cu without a GPU: their kernels compiled unchanged as host code (tools/quant_host_emu.cu,
nvcc; a thread per CUDA thread, a barrier per warp) on the kernel harness's random weights, against the harness's
float64 references (gguf.quants.dequantize) and tolerances (lserve_lite/harness/quant.py).

What it checks: the format traits' byte layouts and decoders (v1's decode8 and v2's units), both GEMV kernels
(quant_gemv and quant_gemv2), v1's segment staging (rows that are not
16-byte aligned, partial segments), row counts 1..8, output strides, the dequantize kernel's row gather; the
split layout (backends/quant_split.py's repacking) through quant_gemv_split at 1, 2 and 4 rows per warp (its
int8 activations within harness.quant.activation_bound) and quant_dequant_split.
What it cannot: anything about the GPU itself (memory model, alignment faults, speed). The GPU rows
(`lserve-lite kernels test quant_gemv ...`) remain the test; this is for editing the kernels on a machine
without one.

    python3 tools/quant_host_check.py [--quick] [--formats q4_k int8]

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

from lserve_lite.backends.quant_split import SPLIT_FORMATS, split  # noqa: E402
from lserve_lite.harness.quant import (  # noqa: E402
    GEMV_SHAPES,
    U32,
    activation_bound,
    random_quant,
    reference_matrix,
)
from lserve_lite.weights.qtensor import FORMATS, LAYOUTS  # noqa: E402

QUICK_SHAPES = [(1, 96, 37), (3, 256, 9), (8, 2304, 5)]


def build(tmp: Path) -> Path:
    exe = tmp / "quant_host_emu"
    cmd = [
        "nvcc",
        "-std=c++17",
        "-w",
        f"-I{ROOT / 'kernels'}",
        "-o",
        str(exe),
        str(ROOT / "tools" / "quant_host_emu.cu"),
    ]
    subprocess.run(cmd, check=True)
    return exe


def write_split(tmp: Path, qt) -> list[str]:
    """The split arrays of qt as files q.bin, d.bin, m.bin (m: the scales again where the format has none)."""
    s = split(qt)
    s.q.tofile(tmp / "q.bin")
    s.d.tofile(tmp / "d.bin")
    (s.d if s.m is None else s.m).tofile(tmp / "m.bin")
    return [str(tmp / f) for f in ("q.bin", "d.bin", "m.bin")]


def check_gemv(
    exe: Path, tmp: Path, fmt: str, n: int, k: int, m: int, rng: np.random.Generator, mode: str = "gemv"
) -> bool:
    qt = random_quant(fmt, m, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float16)
    x[:, :32] *= 50.0  # one block of large activations: its int8 step is 50x the others'
    ldy = m + 3  # a column block of a wider output: columns past m must stay untouched
    x.tofile(tmp / "x.bin")
    outs = [str(tmp / f) for f in ("x.bin", "y.bin")]
    passes = 2 if mode.endswith("p2") else 1
    if mode.startswith("split"):  # split1 / split2 / split4: R rows per warp; "p2": the logits' two passes
        sizes = [str(v) for v in (n, m, k, ldy, mode[5], passes)]
        args = [str(exe), "split", fmt, *sizes, *write_split(tmp, qt), *outs]
    else:
        qt.data.tofile(tmp / "w.bin")
        args = [str(exe), mode, fmt, str(n), str(m), str(k), str(ldy), str(tmp / "w.bin"), *outs]
    subprocess.run(args, check=True)
    y = np.fromfile(tmp / "y.bin", np.float32).reshape(n, ldy)
    ref_w = reference_matrix(qt)
    x64 = x.astype(np.float64)
    bound = np.abs(x64) @ np.abs(ref_w).T
    err = np.abs(y[:, :m] - x64 @ ref_w.T)
    atol = (k / 32 + 20) * U32 * bound
    if mode.startswith("split"):
        atol = atol + activation_bound(x, ref_w, passes)
        bound = atol  # the ratio printed: error / tolerance
    ok = bool(np.all(err <= atol) and np.all(y[:, m:] == 12345.0))
    print(
        f"{mode:7s} {fmt:5s} N{n} K{k} M{m}: max err / bound {float((err / bound).max()):.2e} {'PASS' if ok else 'FAIL'}"
    )
    return ok


def check_dequant(exe: Path, tmp: Path, fmt: str, rng: np.random.Generator, mode: str = "dequant") -> bool:
    m, k, n = 301, 768, 13
    qt = random_quant(fmt, m, k, rng)
    ids = rng.integers(0, m, n).astype(np.int64)
    ids[-1] = m - 1  # the last row: its reads reach the padding
    ids.tofile(tmp / "ids.bin")
    outs = [str(tmp / f) for f in ("ids.bin", "o.bin")]
    if mode == "dsplit":
        args = [str(exe), mode, fmt, str(m), str(k), str(n), *write_split(tmp, qt), *outs]
    else:
        qt.data.tofile(tmp / "w.bin")
        args = [str(exe), mode, fmt, str(m), str(k), str(n), str(tmp / "w.bin"), *outs]
    subprocess.run(args, check=True)
    got = np.fromfile(tmp / "o.bin", np.float16).reshape(n, k).astype(np.float64)
    ref = reference_matrix(qt)[ids]
    ok = bool(np.all(np.abs(got - ref) <= U32 + 2.0**-10 * np.abs(ref)))
    print(f"{mode:7s} {fmt:5s} V{m} H{k} N{n}: {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="three small GEMV shapes per format (seconds, not minutes)"
    )
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=("gemv", "gemv2", "split"),
        default=["gemv", "gemv2", "split"],
        help="quant_gemv (v1), quant_gemv2 (v2), quant_gemv_split (the split formats' default)",
    )
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    shapes = QUICK_SHAPES if args.quick else GEMV_SHAPES
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = build(tmp)
        for fmt in args.formats:
            for n, k, m in shapes:
                if k % LAYOUTS[fmt].block == 0:
                    for mode in args.variants:
                        if mode != "split":
                            ok &= check_gemv(exe, tmp, fmt, n, k, m, rng, mode)
                        elif fmt in SPLIT_FORMATS:
                            for r in ("1", "2", "4", "1p2", "4p2"):
                                ok &= check_gemv(exe, tmp, fmt, n, k, m, rng, f"split{r}")
            ok &= check_dequant(exe, tmp, fmt, rng)
            if "split" in args.variants and fmt in SPLIT_FORMATS:
                ok &= check_dequant(exe, tmp, fmt, rng, "dsplit")
    print("all passed" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
