"""Launcher of kernels/gemv_stream.cu: the decode GEMV (N <= 8 rows) over fp16 weights that streams them through
shared memory with bulk copies, on a persistent grid (sm_90; CudaOps uses it for K >= MIN_K, gemv_rows elsewhere).

Its contract is gemv_rows' (layers.cu): plain, gate_up + SiLU-and-multiply, and the residual add + RMSNorm of
its input in the prologue (rms_in.RmsIn). Tuning knobs, read once: LSERVE_GEMV_STAGES (ring stages of 16 KB
per block, 2-8) and LSERVE_GEMV_STREAM_BPS (blocks per SM at most, 1-4; fewer than the occupancy leaves room
for the next kernel's blocks under programmatic dependent launch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .cuda_compile import load_module, tuning_knob
from .rms_in import NO_NORM, RmsIn, scratch_bytes

SOURCE = "gemv_stream.cu"  # sm_90 only (cuda_compile.ARCH_SPECIFIC)
THREADS = 288  # 8 consumer warps + 1 producer warp (the kernel's THREADS)
PIECES = 4  # row pieces per stage (the kernel's P)
STAGE_BYTES = PIECES * 2048 * 2  # P pieces of KC halves
MIN_K = 2048  # a shorter row fills a fraction of a stage: gemv_rows serves it
DEFAULT = False  # not yet measured on a GPU against gemv_rows: off unless LSERVE_GEMV_STREAM=1
MAX_ROWS = 8
KERNELS = tuple(
    f"gemv_stream<{n}, {t}>"
    for n in range(1, MAX_ROWS + 1)
    for t in ("__half", "float", "__half, true", "__half, false, true", "__half, true, true")
)
MAX_NORM_SMEM = 48 << 10  # the normed rows (N * K halves) + rms scratch, as gemv_rows' NORM_SMEM


def smem_bytes(n: int, k: int, stages: int, norm: bool) -> int:
    """Dynamic shared memory of one block (the kernel's layout): ring, partial sums, mbarriers, normed rows."""
    return stages * STAGE_BYTES + 256 * n + 16 * stages + (2 * n * k + scratch_bytes(n) if norm else 0)


def kernel_name(n: int, out_dtype: Any, silu: bool, norm: bool) -> str:
    if norm:
        return f"gemv_stream<{n}, __half, {'true' if silu else 'false'}, true>"
    if silu:
        return f"gemv_stream<{n}, __half, true>"
    return f"gemv_stream<{n}, {'__half' if np.dtype(out_dtype) == np.float16 else 'float'}>"


class StreamGemv:
    """Compiled gemv_stream kernels and the grid each launch gets (SMs x min(occupancy, blocks-per-SM knob))."""

    def __init__(self, cp, env: Mapping[str, str] = os.environ):
        self.stages = tuning_knob(env, "LSERVE_GEMV_STAGES", 2, 8) or 4
        self.max_per_sm = tuning_knob(env, "LSERVE_GEMV_STREAM_BPS", 1, 4) or 2
        ldgsts = tuning_knob(env, "LSERVE_STREAM_LDGSTS", 0, 1)
        mod = load_module(SOURCE, KERNELS, () if ldgsts is None else (f"-DLSERVE_STREAM_LDGSTS={ldgsts}",))
        self.k = {name: mod.get_function(name) for name in KERNELS}
        most = smem_bytes(MAX_ROWS, 0, self.stages, False) + MAX_NORM_SMEM
        for fn in self.k.values():  # opt in once, outside any graph capture
            fn.max_dynamic_shared_size_bytes = most
        self.sms = int(cp.cuda.Device().attributes["MultiProcessorCount"])
        self._per_sm: dict[tuple[str, int], int] = {}

    @staticmethod
    def fits_norm(n: int, k: int) -> bool:
        return 2 * n * k + scratch_bytes(n) <= MAX_NORM_SMEM

    def __call__(self, x, w, out, m: int, k: int, silu: bool = False, norm: RmsIn | None = None) -> None:
        """out[n, u] for the m units (rows, or gate/up row pairs with silu) of w [m or 2m, k], x [n, k] fp16."""
        n = int(x.shape[0])
        name = kernel_name(n, out.dtype, silu, norm is not None)
        smem = smem_bytes(n, k, self.stages, norm is not None)
        fn = self.k[name]
        per_sm = self._per_sm.get((name, smem))
        if per_sm is None:
            per_sm = self._per_sm[(name, smem)] = max(
                1, min(self.max_per_sm, fn.blocks_per_sm(THREADS, smem))
            )
        groups = -(-m // (PIECES // 2 if silu else PIECES))  # the kernel's G units per group
        per_block = -(-groups // (self.sms * per_sm))
        grid = -(-groups // per_block)  # every block takes per_block groups, the last few one fewer
        args = (
            x,
            w,
            out,
            np.int32(m),
            np.int32(k),
            np.int32(self.stages),
            *(norm.args() if norm else NO_NORM),
        )
        fn((grid,), (THREADS,), args, shared_mem=smem)
