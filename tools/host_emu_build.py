"""Build a host emulator of a kernels/*.cu file (tools/host_emu.cuh): the kernel's text with its `extern __shared__`
arrays pointed at the emulator's buffer, written to DIR/<kernel>.inc, then nvcc on tools/<emulator>.cu."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_emulator(kernel: str, shared_arrays: int, emulator: str, tmp: Path) -> Path:
    """kernels/<kernel>.cu -> tmp/<kernel>.inc (checking it has `shared_arrays` extern __shared__ arrays), and the
    executable tmp/<emulator> built from tools/<emulator>.cu."""
    src = (ROOT / "kernels" / f"{kernel}.cu").read_text()
    inc, n = re.subn(
        r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = reinterpret_cast<\1*>(emu_dyn_smem);", src
    )
    if n != shared_arrays:
        raise RuntimeError(f"expected {shared_arrays} extern __shared__ arrays in {kernel}.cu, found {n}")
    (tmp / f"{kernel}.inc").write_text(inc)
    exe = tmp / emulator
    inc_dirs = [f"-I{ROOT / 'kernels'}", f"-I{ROOT / 'tools'}", f"-I{tmp}"]
    if shutil.which("nvcc") is None:
        raise SystemExit(f"{emulator}: needs nvcc (the CUDA toolkit) on PATH to build the host emulation")
    build = subprocess.run(
        [
            "nvcc",
            "-std=c++17",
            "-O2",
            "-w",
            "-Xcompiler",
            "-fno-strict-aliasing",  # the kernels read 16-byte vectors through __half pointers
            *inc_dirs,
            "-o",
            str(exe),
            str(ROOT / "tools" / f"{emulator}.cu"),
        ],
    )
    if build.returncode:  # its errors are above; a CalledProcessError's traceback only buried them
        raise SystemExit(f"{emulator}: nvcc could not build the host emulation (status {build.returncode})")
    return exe
