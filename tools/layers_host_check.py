"""Check kernels/layers.cu's K/V writes into quantized caches without a GPU: rope_write_kv and rope_write_kv_sparse
for int8 / int4 / fp8 compiled as host code (tools/layers_host_emu.cu, nvcc; a thread per CUDA thread, a barrier per
warp and per block), launched on CudaOps' grid (`cuda.rope_grid`), against backends/reference/layers.py with the
kernel harness's cases and rules (harness/kv_write.py: q within fp16 rounding, values within the step bound,
scales as the format's rule, LServe's page statistics as the reference's): int4's and fp8's queries and keys in the randomized Hadamard
basis (kv/quant.hadamard), int8's and a head dim of 96 in the plain one. Then the q/k/v GEMV with the quantized
write in its epilogue (gemv_rows_rope at one row, kernels/rope_out.cuh) against the plain GEMV + rope_write_kv(_sparse)
on the same x and W, bit for bit, every format, dense and LServe, one and two warps a RoPE pair (a consistency
check: the unfused pair is checked against the references above).
What it cannot: anything about the GPU itself (memory model, speed; the epilogue's tickets race as the
emulator's threads happen to run, e.g. a finisher taken one ticket early went unnoticed here). The GPU rows (`lserve-lite kernels test
kv_quant`, `pytest -m gpu tests/test_gpu_kv_quant.py`) remain the test; this is for editing the kernels without one.

    python3 tools/layers_host_check.py [--seed N]

Prints one line per row; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host_emu_build import build_emulator  # noqa: E402

from lserve_lite.backends.cuda import rope_grid  # noqa: E402
from lserve_lite.engine_args import bounded_int  # noqa: E402
from lserve_lite.errors import exit_status  # noqa: E402
from lserve_lite.harness.common import HostCtx, Result  # noqa: E402
from lserve_lite.harness.kv_write import SPARSE_DIMS, WriteCase, check_write, dense_case, sparse_case  # noqa: E402
from lserve_lite.kv.quant import FORMATS  # noqa: E402

# (format, Hq, Hkv, D, page, N): the harness's shapes (harness/kv_write.DENSE_WRITES, fewer rows: each emulated
# thread is an OS thread) and a head dim of 96, which int4 keeps in the plain basis.
DENSE = [(kv, *dims) for kv in ("int8", "int4", "fp8") for dims in ((9, 3, 64, 64, 13), (32, 8, 128, 16, 21))]
DENSE.append(("int4", 4, 2, 96, 16, 9))
DENSE_NAN = [(kv, 9, 3, 64, 64, 13) for kv in ("int8", "int4", "fp8")]  # a NaN in a K row and a V row
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
    kernel = "rope_write_kv_sparse" if sp else "rope_write_kv"
    why = emulate(exe, args)
    if why:
        return [Result(kernel, case.tag, math.inf, math.inf, False, why)]
    q = np.fromfile(tmp / "q.bin", np.float16).reshape(n, case.hq, case.d)
    pools = read_pools(tmp, case, ("kd", "vd", "ks", "vs") if sp else ("k", "v"))
    stats = None
    if sp:
        shape = sp["kmax"].shape
        stats = tuple(np.fromfile(tmp / f"{m}.bin", np.float16).reshape(shape) for m in ("kmax", "kmin"))
    return check_write(case, kernel, q, pools, stats)


def emulate(exe: Path, args: list[str]) -> str:
    """Run the emulator: "" when it ended well, else why not, for a FAIL row (a kernel's stray access can kill it,
    a ticket left nonzero exits 3); raised, the tool ended in a traceback there, the rows after it never run."""
    rc = subprocess.run([str(exe), *args]).returncode
    if rc == 0:
        return ""
    return f"the emulator died of signal {-rc}" if rc < 0 else f"the emulator exited with status {rc}"


def check_qrope(exe: Path, tmp: Path, rng: np.random.Generator, kv: str, d: int, sparse: bool, dslot: int,
                slices: int) -> bool:  # fmt: skip
    """The q/k/v GEMV with the quantized K/V write in its epilogue (gemv_rows_rope, one row, `slices` warps a
    RoPE pair) against the plain GEMV then rope_write_kv(_sparse) on the same x and W, bit for bit: q, every
    pool's values and scales, LServe's statistics (dslot: the dense slot, mid-logical-page merges with the
    stored statistics, a multiple of 8 starts them); the emulator also fails if a ticket is left nonzero."""
    hq, hkv, k, page, pages = 8, 4, 256, 16, 8
    had = int(FORMATS[kv].rotates_keys(d))
    m = (hq + 2 * hkv) * d
    (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float16).tofile(tmp / "w.bin")
    rng.standard_normal((1, k)).astype(np.float16).tofile(tmp / "x.bin")
    np.array([rng.integers(0, 512)], np.int64).tofile(tmp / "pos.bin")
    for name in ("cos", "sin"):
        rng.uniform(-1, 1, (512, d // 2)).astype(np.float16).tofile(tmp / f"{name}.bin")
    dims: tuple[int, ...] = (1, hq, hkv, d, page, pages)
    if sparse:
        np.array([dslot, rng.integers(0, pages * page)], np.int64).tofile(tmp / "slots.bin")
        np.array([0, 1, 0, 1], np.int32).tofile(tmp / "hc.bin")
        np.array([1, 1, 0, 0], np.int32).tofile(tmp / "hs.bin")
        st = rng.standard_normal((2, pages, 2, 2, d)).astype(np.float16)
        st.max(0).tofile(tmp / "kmax.bin")
        st.min(0).tofile(tmp / "kmin.bin")
        dims += (pages, 2, 2, 2)
    else:
        np.array([dslot], np.int64).tofile(tmp / "slots.bin")
    (_, gy), (block,) = rope_grid(1, hq, hkv, d, True, sparse, bool(had))
    why = emulate(exe, ["qrope", kv, str(tmp), *map(str, (*dims, k, slices, had, gy, block))])
    names = ["q", "k", "v", "k_sc", "v_sc"] + (
        ["ks", "vs", "ks_sc", "vs_sc", "kmax", "kmin"] if sparse else []
    )
    if not why:
        bad = [
            f for f in names if (tmp / f"{f}_ref.bin").read_bytes() != (tmp / f"{f}_fused.bin").read_bytes()
        ]
        unwritten = np.all(np.fromfile(tmp / "q_ref.bin", np.uint16) == 0xFFFF)
        why = ", ".join(bad or (["q unwritten"] if unwritten else []))
    print(f"{'gemv_rows_rope quantized':34s} {kv} D{d} {'LServe' if sparse else 'dense'} slot {dslot} S{slices}"
          f"{' hadamard' if had else '':9s} {f'FAIL ({why})' if why else 'PASS'}")  # fmt: skip
    return not why


def report(results: list[Result]) -> bool:
    for r in results:
        print(f"{r.kernel:34s} {r.shape:40s} max_abs {r.max_abs:.2e} {'PASS' if r.ok else 'FAIL'} {r.note}")
    return all(r.ok for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--seed", type=bounded_int(0), default=0, help="the cases' inputs (as the other host checks)"
    )
    c = HostCtx(ap.parse_args().seed)
    ok = True
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exe = build_emulator("layers", 1, "layers_host_emu", tmp)
        for kv, *dims in DENSE:
            ok &= report(run_case(exe, tmp, dense_case(c, kv, *dims)))
        for kv, *dims in DENSE_NAN:
            ok &= report(run_case(exe, tmp, dense_case(c, kv, *dims, nan=True)))
        for kv, d in SPARSE:
            ok &= report(run_case(exe, tmp, sparse_case(c, kv, d)))
        for kv in ("int8", "int4", "fp8"):
            for d, sparse, dslot, slices in ((64, False, 37, 1), (128, False, 5, 2), (64, True, 13, 1),
                                              (128, True, 24, 2), (128, True, 29, 1)):  # fmt: skip
                ok &= check_qrope(exe, tmp, c.rng, kv, d, sparse, dslot, slices)
    print("all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
