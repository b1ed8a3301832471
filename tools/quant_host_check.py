"""Check kernels/quant_gemv.cu without a GPU: its kernels compiled unchanged as host code (tools/quant_host_emu.cu,
nvcc; a thread per CUDA thread, a barrier per warp) on the kernel harness's random weights, against the harness's
float64 references (gguf.quants.dequantize) and tolerances (lserve_lite/harness/quant.py).

What it checks: the format traits' byte layouts and decoders (v1's decode8 and v2's units), both GEMV kernels
(quant_gemv and quant_gemv2), v1's segment staging (rows that are not
16-byte aligned, partial segments), row counts 1..8, output strides, the dequantize kernel's row gather.
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

from lserve_lite.harness.quant import GEMV_SHAPES, U32, random_quant, reference_matrix  # noqa: E402
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


def check_gemv(
    exe: Path, tmp: Path, fmt: str, n: int, k: int, m: int, rng: np.random.Generator, mode: str = "gemv"
) -> bool:
    qt = random_quant(fmt, m, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float16)
    ldy = m + 3  # a column block of a wider output: columns past m must stay untouched
    qt.data.tofile(tmp / "w.bin")
    x.tofile(tmp / "x.bin")
    args = [str(exe), mode, fmt, str(n), str(m), str(k), str(ldy)] + [
        str(tmp / f) for f in ("w.bin", "x.bin", "y.bin")
    ]
    subprocess.run(args, check=True)
    y = np.fromfile(tmp / "y.bin", np.float32).reshape(n, ldy)
    ref_w = reference_matrix(qt)
    x64 = x.astype(np.float64)
    bound = np.abs(x64) @ np.abs(ref_w).T
    err = np.abs(y[:, :m] - x64 @ ref_w.T)
    ok = bool(np.all(err <= (k / 32 + 20) * U32 * bound) and np.all(y[:, m:] == 12345.0))
    print(
        f"{mode:7s} {fmt:5s} N{n} K{k} M{m}: max err / bound {float((err / bound).max()):.2e} {'PASS' if ok else 'FAIL'}"
    )
    return ok


def check_dequant(exe: Path, tmp: Path, fmt: str, rng: np.random.Generator) -> bool:
    m, k, n = 301, 768, 13
    qt = random_quant(fmt, m, k, rng)
    ids = rng.integers(0, m, n).astype(np.int64)
    ids[-1] = m - 1  # the last row: its reads reach the padding
    qt.data.tofile(tmp / "w.bin")
    ids.tofile(tmp / "ids.bin")
    args = [str(exe), "dequant", fmt, str(m), str(k), str(n)] + [
        str(tmp / f) for f in ("w.bin", "ids.bin", "o.bin")
    ]
    subprocess.run(args, check=True)
    got = np.fromfile(tmp / "o.bin", np.float16).reshape(n, k).astype(np.float64)
    ref = reference_matrix(qt)[ids]
    ok = bool(np.all(np.abs(got - ref) <= U32 + 2.0**-10 * np.abs(ref)))
    print(f"dequant {fmt:5s} V{m} H{k} N{n}: {'PASS' if ok else 'FAIL'}")
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
        choices=("gemv", "gemv2"),
        default=["gemv", "gemv2"],
        help="quant_gemv (v1, the default kernel) and/or quant_gemv2 (LSERVE_QGEMV=v2)",
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
                        ok &= check_gemv(exe, tmp, fmt, n, k, m, rng, mode)
            ok &= check_dequant(exe, tmp, fmt, rng)
    print("all passed" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
