"""Check kernels/layers.cu's K/V writes into quantized caches without a GPU: rope_write_kv and rope_write_kv_sparse
for int8 / int4 / fp8 compiled as host code (tools/layers_host_emu.cu, nvcc; a thread per CUDA thread, a barrier per
warp and per block), launched on CudaOps' grid (`cuda.rope_grid`), against backends/reference/layers.py with the
kernel harness's cases and rules (harness/kv_write.py: q within fp16 rounding, values within the step bound,
scales as the format's rule, LServe's page statistics as the reference's): int4's and fp8's queries and keys in the randomized Hadamard
basis (kv/quant.hadamard), int8's and a head dim of 96 in the plain one.
What it cannot: anything about the GPU itself (memory model, speed). The GPU rows (`lserve-lite kernels test
kv_quant`, `pytest -m gpu tests/test_gpu_kv_quant.py`) remain the test; this is for editing the kernels without one.

    python3 tools/layers_host_check.py

Prints one line per row; exit status 1 on any failure.
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

from host_emu_build import build_emulator  # noqa: E402

from lserve_lite.backends.cuda import rope_grid  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.harness.common import HostCtx, Result  # noqa: E402
from lserve_lite.harness.kv_write import SPARSE_DIMS, WriteCase, check_write, dense_case, sparse_case  # noqa: E402

# (format, Hq, Hkv, D, page, N): the harness's shapes (harness/kv_write.DENSE_WRITES, fewer rows: each emulated
# thread is an OS thread) and a head dim of 96, which int4 keeps in the plain basis.
DENSE = [(kv, *dims) for kv in ("int8", "int4", "fp8") for dims in ((9, 3, 64, 64, 13), (32, 8, 128, 16, 21))]
DENSE.append(("int4", 4, 2, 96, 16, 9))
SPARSE = [(kv, d) for kv in ("int8", "int4", "fp8") for d in SPARSE_DIMS]


def write_inputs(tmp: Path, case: WriteCase) -> None:
    case.qkv.astype(np.float16).tofile(tmp / "qkv.bin")
    np.asarray(case.pos, np.int64).tofile(tmp / "pos.bin")
    np.asarray(case.slots, np.int64).tofile(tmp / "slots.bin")
    case.cos.astype(np.float16).tofile(tmp / "cos.bin")
    case.sin.astype(np.float16).tofile(tmp / "sin.bin")
    if case.sparse:
        for name in ("hc", "hs"):
            case.sparse[name].astype(np.int32).tofile(tmp / f"{name}.bin")
        for name in ("kmax", "kmin"):
            case.sparse[name].astype(np.float16).tofile(tmp / f"{name}.bin")


def read_pools(tmp: Path, case: WriteCase, names: tuple[str, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each pool's values and fp16 scales as the emulator wrote them (files named as `names`)."""
    out = []
    for p, name in zip(case.pools, names, strict=True):
        vals = np.fromfile(tmp / f"{name}.bin", p.fmt.value_dtype).reshape(*p.shape, p.fmt.packed_dim(case.d))
        sc = np.fromfile(tmp / f"{name}_sc.bin", np.float16).reshape(*p.shape, p.fmt.scale_cols(case.d))
        out.append((vals, sc))
    return out


def run_case(exe: Path, tmp: Path, case: WriteCase) -> list[Result]:
    """The emulated kernel on the case's inputs, on CudaOps' grid, then harness/kv_write.check_write."""
    write_inputs(tmp, case)
    n, sp = case.pos.size, case.sparse
    pages = case.pools[0].shape[0]
    (_, gy), (block,) = rope_grid(n, case.hq, case.hkv, case.d, True, bool(sp), case.hadamard)
    dims = (n, case.hq, case.hkv, case.d, case.page, pages)
    if sp:
        dims += (case.pools[2].shape[0], sp["nd"], sp["ns"], sp["sub"])
    args = ["srope" if sp else "rope", case.kv, str(tmp), *map(str, (*dims, gy, block, int(case.hadamard)))]
    subprocess.run([str(exe), *args], check=True)
    q = np.fromfile(tmp / "q.bin", np.float16).reshape(n, case.hq, case.d)
    pools = read_pools(tmp, case, ("kd", "vd", "ks", "vs") if sp else ("k", "v"))
    stats = None
    if sp:
        shape = sp["kmax"].shape
        stats = tuple(np.fromfile(tmp / f"{m}.bin", np.float16).reshape(shape) for m in ("kmax", "kmin"))
    kernel = "rope_write_kv_sparse" if sp else "rope_write_kv"
    return check_write(case, kernel, q, pools, stats)


def report(results: list[Result]) -> bool:
    for r in results:
        print(f"{r.kernel:34s} {r.shape:40s} max_abs {r.max_abs:.2e} {'PASS' if r.ok else 'FAIL'} {r.note}")
    return all(r.ok for r in results)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help; it takes no options
    c = HostCtx(0)
    ok = True
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exe = build_emulator("layers", 1, "layers_host_emu", tmp)
        for kv, *dims in DENSE:
            ok &= report(run_case(exe, tmp, dense_case(c, kv, *dims)))
        for kv, d in SPARSE:
            ok &= report(run_case(exe, tmp, sparse_case(c, kv, d)))
    print("all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
