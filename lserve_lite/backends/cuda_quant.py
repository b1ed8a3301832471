"""Quantized weights on the GPU: their packed blocks uploaded as they are (`DeviceQuant`, no float copy), the
decode GEMV that reads them and the prefill path, through kernels/quant_gemv.cu.

- Decode, n <= GEMV_MAX_ROWS rows of x: `quant_gemv`, one warp per output row streaming the packed row
  through shared memory with 16-byte loads; fp16 activations times exactly dequantized weights, float32
  accumulation (no int8 activations: the same numerics as the fp16-weight path). `LSERVE_QGEMV=v2` (or
  `QuantKernels.gemv_variant = "v2"`) selects `quant_gemv2` instead (`auto`: v2 at batch 1 for the formats
  where the H200 measured it faster, `AUTO_V2_BATCH1`): no shared memory, each lane reading its
  own units of the row straight from global memory with several loads in flight, the block scale applied
  once per 8-value group; same float32 numerics (fp16 x, exact integer products). v1 stays the default
  until v2 is measured on a GPU.
- Prefill, more rows: `quant_dequant` writes a tile of rows as fp16 into one scratch buffer of at most
  TILE_BYTES, then cuBLAS multiplies it into the output's columns (Cublas.gemm_nt); tile after tile.
- A quantized embedding table: `quant_dequant` with the token ids as rows (only those rows are decoded,
  as the CPU's embed_q does).
The scratch is allocated when weights are uploaded, never during a step, so all of this runs inside the
decode CUDA Graphs (cuda_graphs.py); nothing here synchronizes with the host.
Reference: QuantTensor.dequantize (weights/qtensor.py, checked against gguf.quants.dequantize) times x.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..weights.qtensor import FORMATS, LAYOUTS, QuantTensor, RowStack
from .cuda_compile import load_module

QUANT_SOURCE = "quant_gemv.cu"
GEMV_ROWS = (1, 2, 4, 8)  # the kernel's NMAX instantiations: n rows run in the smallest NMAX >= n
GEMV_MAX_ROWS = GEMV_ROWS[-1]
GEMV_WARPS = 4  # output rows per block: QWARPS in quant_gemv.cu
GEMV2_WARPS = 8  # output rows per block of quant_gemv2: QWARPS2
GEMV_VARIANTS = {"v1": ("quant_gemv", GEMV_WARPS), "v2": ("quant_gemv2", GEMV2_WARPS)}
# LSERVE_QGEMV=auto: v2 where the H200 measured it faster than v1 (2026-12-02, tools/bench_quant_gpu.py at
# 4096x4096, 4096x14336, 128256x4096: +0-29% at batch 1), v1 elsewhere (q4_k and int8 at batch 1, every
# format at batch 8, where v2 was slower; batch 2-4 was not measured)
AUTO_V2_BATCH1 = frozenset({"q8_0", "q4_0", "q4_1", "q6_k", "int4"})


TILE_BYTES = 64 << 20  # fp16 scratch for the prefill path's dequantized tiles
PAD = 16  # bytes after the last row: the GEMV's aligned 16-byte loads may reach 15 bytes past it


def gemv_variant() -> str:
    """The decode GEMV kernel: $LSERVE_QGEMV ("v1", the default; "v2"; "auto": per format and row count)."""
    v = os.environ.get("LSERVE_QGEMV", "v1").strip().lower() or "v1"
    if v not in (*GEMV_VARIANTS, "auto"):
        raise ValueError(f"LSERVE_QGEMV={v!r}: expected one of {[*GEMV_VARIANTS, 'auto']}")
    return v


def pick_variant(setting: str, fmt: str, n: int) -> str:
    """The kernel that runs n rows of a `fmt` weight under the setting ("v1", "v2" or "auto")."""
    if setting == "auto":
        return "v2" if n == 1 and fmt in AUTO_V2_BATCH1 else "v1"
    return setting


def kernel_names(fmt: str, variants: tuple[str, ...] = tuple(GEMV_VARIANTS)) -> tuple[str, ...]:
    """The template instantiations one format needs (its trait struct is the format's name in capitals): the
    GEMV of each of `variants` (all by default: the compile test) and the dequantize kernel."""
    t = fmt.upper()
    gemv = (
        f"{GEMV_VARIANTS[v][0]}<{t}, {n}, {o}>"
        for v in variants
        for n in GEMV_ROWS
        for o in ("__half", "float")
    )
    return (*gemv, f"quant_dequant<{t}>")


QUANT_KERNELS = tuple(name for fmt in FORMATS for name in kernel_names(fmt))


@dataclass(frozen=True, eq=False)
class DeviceQuant:
    """A QuantTensor on the GPU: `data` is a flat uint8 device array, row r at r * row_bytes, then PAD bytes."""

    fmt: str
    shape: tuple[int, int]
    data: Any

    @property
    def row_bytes(self) -> int:
        return LAYOUTS[self.fmt].row_bytes(self.shape[1])

    @property
    def nbytes(self) -> int:
        """The packed bytes (what a decode step reads), without the padding."""
        return self.shape[0] * self.row_bytes


@dataclass(frozen=True, eq=False)
class DeviceRowStack:
    """A RowStack on the GPU: DeviceQuant parts and float16 arrays, each multiplied into its own columns."""

    parts: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return sum(int(p.shape[0]) for p in self.parts), int(self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)


class QuantKernels:
    """The packed-weight launchers of one CudaOps: per-format modules compiled at the first upload of a format,
    and the fp16 scratch of the prefill path, grown at upload to the largest tile."""

    def __init__(self, cp, blas, tile_bytes: int = TILE_BYTES):
        self.cp, self.blas, self.tile_bytes = cp, blas, tile_bytes
        self.gemv_variant = gemv_variant()  # "v1" | "v2" | "auto": which decode GEMV kernel `gemm` launches
        self._fns: dict[tuple[str, str], dict[str, Any]] = {}
        self.scratch = cp.empty(0, cp.float16)

    def upload(self, w: QuantTensor | RowStack, upload_float) -> DeviceQuant | DeviceRowStack:
        """The packed bytes copied as they are (`upload_float` takes the float parts of a RowStack)."""
        if isinstance(w, RowStack):
            return DeviceRowStack(
                tuple(self.upload(p, upload_float) if isinstance(p, QuantTensor) else upload_float(p)
                      for p in w.parts)
            )  # fmt: skip
        cp = self.cp
        host = np.ascontiguousarray(w.data).reshape(-1)
        data = cp.empty(host.size + PAD, cp.uint8)
        data[: host.size].set(host)
        data[host.size :] = 0
        for v in {pick_variant(self.gemv_variant, w.fmt, n) for n in (1, GEMV_MAX_ROWS)}:
            self._kernels(w.fmt, v)  # compiled now, never inside a CUDA Graph capture
        m, k = w.shape
        self.reserve(m, k)
        return DeviceQuant(w.fmt, (int(m), int(k)), data)

    def reserve(self, m: int, k: int) -> None:
        """Grow the prefill scratch for an [m, k] weight (at upload, or for packed weights made on the device)."""
        need = self.tile_rows(m, k) * k
        if need > self.scratch.size:
            self.scratch = self.cp.empty(need, self.cp.float16)

    def tile_rows(self, m: int, k: int) -> int:
        """Rows of a weight dequantized per cuBLAS call on the prefill path (all of them when they fit)."""
        return max(1, min(m, self.tile_bytes // (2 * k)))

    def _kernels(self, fmt: str, variant: str = "v1") -> dict[str, Any]:
        """The format's module with one GEMV variant's kernels (compiled once per format and variant)."""
        key = (fmt, variant)
        fns = self._fns.get(key)
        if fns is None:
            names = kernel_names(fmt, (variant,))
            mod = load_module(QUANT_SOURCE, names)
            fns = self._fns[key] = {n: mod.get_function(n) for n in names}
        return fns

    def gemm(self, x, w: DeviceQuant | DeviceRowStack, out) -> None:
        """out[N, M] = x[N, K] @ W^T (x contiguous float16; out float16 or float32, rows of stride >= M)."""
        if isinstance(w, DeviceRowStack):
            c = 0
            for p in w.parts:
                cols = out[:, c : c + int(p.shape[0])]
                self.gemm(x, p, cols) if isinstance(p, DeviceQuant) else self.blas.gemm_nt(x, p, cols)
                c += int(p.shape[0])
            return
        n, k = int(x.shape[0]), int(x.shape[1])
        m = w.shape[0]
        if n == 0 or m == 0:
            return
        variant = pick_variant(self.gemv_variant, w.fmt, n)
        fns = self._kernels(w.fmt, variant)
        if n <= GEMV_MAX_ROWS:
            nmax = next(r for r in GEMV_ROWS if r >= n)
            t = "__half" if out.dtype == np.float16 else "float"
            kernel, warps = GEMV_VARIANTS[variant]
            fn = fns[f"{kernel}<{w.fmt.upper()}, {nmax}, {t}>"]
            ldy = out.strides[0] // out.itemsize
            args = (
                w.data,
                np.int64(w.row_bytes),
                x,
                np.int32(n),
                out,
                np.int32(ldy),
                np.int32(m),
                np.int32(k),
            )
            fn((-(-m // warps),), (32 * warps,), args)
            return
        tile = self.tile_rows(m, k)
        for r0 in range(0, m, tile):
            r1 = min(m, r0 + tile)
            wt = self.scratch[: (r1 - r0) * k].reshape(r1 - r0, k)
            self._dequant(fns, w, None, r0, r1 - r0, wt)
            self.blas.gemm_nt(x, wt, out[:, r0:r1])

    def embed(self, table: DeviceQuant, ids, out) -> None:
        """out[j] = row ids[j] of the table as float16 (ids: int64 on the device)."""
        if int(ids.shape[0]):
            ids = self.cp.ascontiguousarray(ids, dtype=self.cp.int64)
            fns = self._kernels(table.fmt, pick_variant(self.gemv_variant, table.fmt, 1))
            self._dequant(fns, table, ids, 0, int(ids.shape[0]), out)

    def _dequant(self, fns, w: DeviceQuant, rows, r0: int, nrows: int, out) -> None:
        k = w.shape[1]
        total = nrows * (k // 8)
        rows_arg = np.uint64(0) if rows is None else rows
        args = (w.data, np.int64(w.row_bytes), rows_arg, np.int64(r0), np.int32(nrows), np.int32(k), out)
        fns[f"quant_dequant<{w.fmt.upper()}>"]((-(-total // 256),), (256,), args)
