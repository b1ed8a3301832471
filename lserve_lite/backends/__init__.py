"""Backend selection: "cpu", "cuda", or "auto" (CUDA when CuPy sees a GPU)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..errors import LServeError

if TYPE_CHECKING:
    from .base import Ops


def cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


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
