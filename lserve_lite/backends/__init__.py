"""Backend selection: "cpu", "cuda", or "auto" (CUDA when CuPy sees a GPU)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..errors import LServeError

if TYPE_CHECKING:
    from .base import Ops


def driver_gpu_count() -> int:
    """GPUs the NVIDIA driver sees, asked through libcuda, not CuPy: importing CuPy creates ~/.cupy/kernel_cache,
    so a host without a GPU (a CPU run's `--backend auto`) never imports it."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:  # no NVIDIA driver
        return 0
    n = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return 0
    return n.value


def cuda_device_count() -> int:
    """GPUs CuPy sees (0 without CuPy); CuPy is imported only where the driver sees one."""
    if driver_gpu_count() == 0:
        return 0
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def cuda_available() -> bool:
    return cuda_device_count() > 0


def require_gpu(tool: str) -> None:
    """Exits with status 2 and one line when CuPy sees no GPU, so a GPU-only tool stops before it writes
    anything instead of failing deep in CuPy."""
    if not cuda_available():
        print(f"{tool}: needs an NVIDIA GPU: CuPy sees none on this host", file=sys.stderr)
        raise SystemExit(2)


def resolve_backend(backend: str) -> str:
    """The backend "auto" means here (CUDA when CuPy sees a GPU); any other name as given."""
    if backend == "auto":
        return "cuda" if cuda_available() else "cpu"
    return backend


def make_ops(backend: str = "auto") -> Ops:
    backend = resolve_backend(backend)
    if backend == "cpu":
        from .cpu import CpuOps

        return CpuOps()
    if backend == "cuda":
        if not cuda_available():
            raise LServeError(
                "backend 'cuda' asked for, but CuPy sees no NVIDIA GPU (install lserve-lite[cuda12])"
            )
        from .cuda import CudaOps

        return CudaOps()
    raise LServeError(f"unknown backend {backend!r} (cpu, cuda or auto)")
