"""Quantized weights on the GPU: their packed blocks uploaded without a float copy (`DeviceQuant`), the decode
GEMV that reads them and the prefill path, through kernels/quant_gemv_split.cu and kernels/quant_gemv.cu.

- Every format (q8_0, q4_0, q4_1, q4_k, q6_k, int8, int4: backends/quant_split.py) is repacked at upload
  into the "split" layout (integers, scales, additive terms and the k-quants' integer sub-scales in separate
  aligned arrays; exact) and decodes through `quant_gemv_split`: int8 activations per 32 values (llama.cpp's
  scheme, as the CPU backend's decode) and dp4a integer dot products, R output rows per warp; a [gate; up]
  weight's decode may apply SiLU-and-multiply in the same kernel (`gate_up_silu`). q6_k's split layout holds
  a byte per value (8.56 bits a weight against its blocks' 6.56): 30% more to read, for a kernel that reads
  at several times the block kernels' fraction of the copy bandwidth (quant_split.py).
- The split GEMV's grid (`LSERVE_QGEMV_SPLIT`): "persist" (the default) launches only the blocks that are resident
  at once (SMs x the kernel's occupancy, `split_blocks`), each warp looping over row groups strided over the grid
  with the next item's loads in flight; "grid" launches one row group per warp (the grid before 2026-12).
- `LSERVE_QGEMV=v1|v2` keeps the blocks as stored and runs the float kernels instead: `quant_gemv` (v1), one
  warp per output row streaming the packed row through shared memory, or `quant_gemv2` (v2), each lane
  reading its own units of the row; both multiply fp16 activations by exactly dequantized weights in float32.
- Prefill, more than GEMV_MAX_ROWS rows: a dequantize kernel writes a tile of rows as fp16 into one scratch
  buffer of at most TILE_BYTES, then cuBLAS multiplies it into the output's columns (Cublas.gemm_nt).
- A quantized embedding table: the dequantize kernel with the token ids as rows.
The scratch is allocated when weights are uploaded, never during a step, so all of this runs inside the
decode CUDA Graphs (cuda_graphs.py); nothing here synchronizes with the host.
Reference: QuantTensor.dequantize (weights/qtensor.py, checked against gguf.quants.dequantize) times x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import env_choice, env_flag
from ..weights.qtensor import FORMATS, LAYOUTS, QuantTensor, RowStack, Weight, stored_bytes
from .base import Added
from .cuda_compile import load_module
from .quant_split import SPLIT_FORMATS, SplitFormat, split
from .rope_out import rope_kind, rope_kinds, rope_rows
from .spread import spread_arg

QUANT_SOURCE = "quant_gemv.cu"
SPLIT_SOURCE = "quant_gemv_split.cu"
GEMV_ROWS = (1, 2, 4, 8)  # the kernel's NMAX instantiations: n rows run in the smallest NMAX >= n
GEMV_MAX_ROWS = GEMV_ROWS[-1]
GEMV_WARPS = 4  # output rows per block: QWARPS in quant_gemv.cu
GEMV2_WARPS = 8  # output rows per block of quant_gemv2: QWARPS2
GEMV_VARIANTS = {"v1": ("quant_gemv", GEMV_WARPS), "v2": ("quant_gemv2", GEMV2_WARPS)}
SETTINGS = (*GEMV_VARIANTS, "auto")
# The block kernels' choice under LSERVE_QGEMV=auto for a weight stored as blocks (a format without a split
# layout; none since q4_k / q6_k have one, which leaves it to weights made as blocks on the device, as
# tools/bench_quant_gpu.py's): v2 where the H200 measured it faster than v1 (2026-12-02, tools/bench_quant_gpu.py
# at 4096x4096, 4096x14336, 128256x4096: +0-29% at batch 1), v1 elsewhere (q4_k at batch 1, every format at
# batch 8, where v2 was slower; batch 2-4 was not measured)
AUTO_V2_BATCH1 = frozenset({"q8_0", "q4_0", "q4_1", "q6_k", "int4"})
SPLIT_WARPS = 8  # warps per block of quant_gemv_split: SWARPS
SPLIT_R = (1, 2, 4)  # output rows per warp instantiated (split_rows picks one)
# rows per warp of the fused gate_up + SiLU-and-multiply GEMV (SILU: R/2 gate rows and their up rows a warp),
# instantiated with fp16 outputs in one pass only (split_silu_rows picks one)
SPLIT_SILU_R = (2, 4)
# (int8 passes of x, output type) instantiated: fp16 outputs in one pass, float32 outputs (the logits: their top
# two are often < 0.5% apart) in two
SPLIT_PASSES = ((1, "__half"), (2, "float"))
# NMAX of the split kernels (fewer than GEMV_ROWS: each instantiation costs compile time)
SPLIT_ROWS = (1, 4, 8)
SPLIT_GRIDS = ("persist", "grid")  # LSERVE_QGEMV_SPLIT: the split GEMV's grid (split_blocks)
# Rows per warp with a "deep" instantiation (UX = 2: register sets of twice the chunks, batch 1, fp16 out, one
# pass), for matrices whose row groups all fit the GPU's resident warps (split_deep)
SPLIT_DEEP_R = 2
SPLIT_ROPE_R = 2  # rows per warp of quant_gemv_split_rope (one RoPE pair; fixed in the kernel)
# The spread norm (spread_norm.cuh; CudaOps.linear_add): floats of shared memory past split_smem (NMAX = 1), the
# modes' template values, and the RoPE kinds its q/k/v consumer is compiled for (fp16 caches, dense and LServe)
SPREAD_SMEM_FLOATS, SPREAD_ADD, SPREAD_NORM = SPLIT_WARPS, 1, 2
SPREAD_ROPE_KINDS = (1, 2)
SMEM_DEFAULT = 48 << 10  # dynamic shared memory a launch gets without opting in


TILE_BYTES = 64 << 20  # fp16 scratch for the prefill path's dequantized tiles
PAD = 16  # bytes after the last row: the GEMV's aligned 16-byte loads may reach 15 bytes past it


def gemv_variant() -> str:
    """The decode GEMV setting: $LSERVE_QGEMV ("auto", the default: the split kernels, for every format;
    "v1" / "v2": the float kernels on the blocks as stored)."""
    return env_choice("LSERVE_QGEMV", "auto", SETTINGS)


def split_grid_setting() -> str:
    """$LSERVE_QGEMV_SPLIT: "persist" (the default), the split GEMV's grid no larger than what is resident at once,
    or "grid", one row group per warp (the A/B of the persistent loop; the same kernel and the same sums)."""
    return env_choice("LSERVE_QGEMV_SPLIT", "persist", SPLIT_GRIDS)


def split_blocks(outs: int, per_warp: int, resident: int | None = None) -> int:
    """Blocks of a split GEMV launch over `outs` outputs, `per_warp` a warp's row group: one group per warp, or
    at most `resident` blocks (what fits on the GPU at once: every warp then loops over several groups, so its
    next loads are issued before its current math instead of waiting for a new block and its x quantization)."""
    full = -(-outs // (SPLIT_WARPS * per_warp))
    return max(1, min(full, resident)) if resident else full


def deep_name(trait: str) -> str:
    """The deep split GEMV of a split format's trait struct (quant_gemv_split's UX = 2)."""
    return f"quant_gemv_split<{trait}, {SPLIT_DEEP_R}, 1, 1, __half, false, 2>"


def rope_name(trait: str, nmax: int, kind: int) -> str:
    """The q/k/v split GEMV with RoPE and the K/V write in its epilogue (ROPE = kind, rope_out.rope_kind; two rows
    a warp, a pair)."""
    return f"quant_gemv_split_rope<{trait}, {nmax}, {kind}>"


def spread_name(trait: str, r: int, mode: int, silu: bool = False, ux: int = 1) -> str:
    """A batch-1 split GEMV with the spread norm: `mode` SPREAD_ADD (an output projection adding into the residual
    stream) or SPREAD_NORM (gate_up with `silu`, normalizing the stream)."""
    return f"quant_gemv_split_spread<{trait}, {r}, {'true' if silu else 'false'}, {ux}, {mode}>"


def spread_rope_name(trait: str, kind: int) -> str:
    """The q/k/v split GEMV with the RoPE epilogue over the spread norm's stream (one row)."""
    return f"quant_gemv_split_rope_spread<{trait}, {kind}>"


def spread_names(trait: str) -> list[str]:
    """The spread norm's instantiations of a split format: the producer at every R (and the deep sets), gate_up at
    the SiLU R, q/k/v at SPREAD_ROPE_KINDS (a module of its own, compiled only when the spread norm is on)."""
    names = [spread_name(trait, r, SPREAD_ADD) for r in SPLIT_R]
    names.append(spread_name(trait, SPLIT_DEEP_R, SPREAD_ADD, ux=2))
    names += [spread_name(trait, r, SPREAD_NORM, silu=True) for r in SPLIT_SILU_R]
    return names + [spread_rope_name(trait, kind) for kind in SPREAD_ROPE_KINDS]


def spread_smem(k: int) -> int:
    """Dynamic shared memory of a spread norm launch (one row, one pass): split_smem's, then SPREAD_SMEM_FLOATS."""
    return split_smem(1, k) + 4 * SPREAD_SMEM_FLOATS


def split_name_shape(name: str) -> tuple[int, int]:
    """(NMAX, passes) of a split GEMV instantiation's name: quant_gemv_split<T, R, NMAX, P, ...>,
    `rope_name`'s quant_gemv_split_rope<T, NMAX, KIND> (one pass), or a spread norm's (one row, one pass)."""
    f = name.split(",")
    if name.startswith("quant_gemv_split_rope<"):
        return int(f[1]), 1
    return (1, 1) if "_spread<" in name else (int(f[2]), int(f[3]))


def deep_setting() -> bool:
    """$LSERVE_QGEMV_DEEP: "1" (the default) lets split_deep pick the deep GEMV, "0" never (the A / B switch)."""
    return env_flag("LSERVE_QGEMV_DEEP", True)


def split_deep(outs: int, r: int, deep_resident: int) -> bool:
    """Whether a batch-1 launch of `outs` outputs at `r` rows per warp takes the deep GEMV: r is the deep R and
    every row group has its own warp among the deep kernel's `deep_resident` resident blocks, so each warp holds
    twice the bytes in flight and none loops. On an H200, o_proj and down of a Llama-3-8B shape (4,096 rows: 2,048
    groups against 2,112 resident warps at 2 blocks per SM); qkv (3,072 groups) and gate_up keep the shallow sets."""
    return r == SPLIT_DEEP_R and split_blocks(outs, r) <= deep_resident


def pick_variant(setting: str, fmt: str, n: int) -> str:
    """The kernel that runs n rows of a `fmt` weight under the setting: "split", "v1" or "v2"."""
    if setting == "auto" and fmt in SPLIT_FORMATS:
        return "split"
    return block_variant(setting, fmt, n)


def block_variant(setting: str, fmt: str, n: int) -> str:
    """The block kernel, "v1" or "v2", that runs n rows of a `fmt` weight stored as blocks under the setting."""
    if setting == "auto":
        return "v2" if n == 1 and fmt in AUTO_V2_BATCH1 else "v1"
    return setting


def device_bytes(w: Weight, setting: str) -> int:
    """Bytes QuantKernels.upload will hold for w under the GEMV setting, without the padding: the split layout's
    where it repacks (q6_k: 30% more than its blocks, q4_k 3%), the packed blocks' otherwise, fp16 for floats."""
    if isinstance(w, RowStack):
        return sum(device_bytes(p, setting) for p in w.parts)
    if isinstance(w, QuantTensor) and pick_variant(setting, w.fmt, 1) == "split":
        return SPLIT_FORMATS[w.fmt].nbytes(*w.shape)
    return stored_bytes(w, 2)


def split_rows(m: int, n: int = 1) -> int:
    """Output rows per warp of the split GEMV for an M-row weight and n rows of x: more rows share each block's
    quantized x (read and rounded once per block, and reused from shared memory n times per chunk), while the
    grid still fills the GPU. H200, 2026-12-02 (tools/bench_quant_gpu.py --split-r 1 2 4): R = 2 best at
    M = 4096, R = 4 at M >= 28672 (4-bit; 8-bit about equal) and at batch 8 for every shape."""
    if m >= 8192 or (n >= 4 and m >= 1024):
        return 4
    return 2 if m >= 2048 else 1


def split_silu_rows(m: int, n: int = 1) -> int:
    """Rows per warp of the fused gate_up GEMV for a [gate; up] weight of m = 2I rows: what the unfused launch
    of the same weight would take (split_rows(m, n), so a warp reads as many rows either way), at least 2 (a
    gate row and its up row)."""
    return max(2, split_rows(m, n))


def split_smem(n: int, k: int, passes: int = 1) -> int:
    """Dynamic shared memory of a split GEMV launch: n rows of x as int8 plus a {dx, sum} pair per 32, per pass."""
    return passes * (n * k + n * (k // 32) * 8)


def kernel_names(fmt: str, variants: tuple[str, ...] = (*GEMV_VARIANTS, "split")) -> tuple[str, ...]:
    """The template instantiations one format needs (all variants by default: the compile test). v1 / v2:
    the format's trait struct is its name in capitals; split: SPLIT_FORMATS' trait (split formats only)."""
    t, names = fmt.upper(), []
    for v in variants:
        if v == "split":
            if fmt in SPLIT_FORMATS:
                s = SPLIT_FORMATS[fmt].trait
                names += [f"quant_gemv_split<{s}, {r}, {n}, {p}, {o}>" for r in SPLIT_R for n in SPLIT_ROWS
                          for p, o in SPLIT_PASSES]  # fmt: skip
                names += [f"quant_gemv_split<{s}, {r}, {n}, 1, __half, true>" for r in SPLIT_SILU_R
                          for n in SPLIT_ROWS]  # fmt: skip
                names += [rope_name(s, n, kind) for n in SPLIT_ROWS for kind in rope_kinds(n)]
                names.append(deep_name(s))
                names.append(f"quant_dequant_split<{s}>")
            continue
        if v == "spread":
            names += spread_names(SPLIT_FORMATS[fmt].trait) if fmt in SPLIT_FORMATS else []
            continue
        names += [f"{GEMV_VARIANTS[v][0]}<{t}, {n}, {o}>" for n in GEMV_ROWS for o in ("__half", "float")]
    if any(v in GEMV_VARIANTS for v in variants):
        names.append(f"quant_dequant<{t}>")
    return tuple(names)


QUANT_KERNELS = tuple(name for fmt in FORMATS for name in kernel_names(fmt, tuple(GEMV_VARIANTS)))
SPLIT_KERNELS = tuple(name for fmt in SPLIT_FORMATS for name in kernel_names(fmt, ("split", "spread")))


@dataclass(frozen=True, eq=False)
class DeviceQuant:
    """A QuantTensor on the GPU. Blocks as stored: `data` flat uint8, row r at r * row_bytes, then PAD bytes.
    Split (`split` set): `data` the integers [M, K * bits / 8], `d` / `m` the fp16 scales / additive terms, `s`
    the int8 sub-scales of the k-quants."""

    fmt: str
    shape: tuple[int, int]
    data: Any
    split: SplitFormat | None = None
    d: Any = None
    m: Any = None
    s: Any = None

    @property
    def row_bytes(self) -> int:
        if self.split:
            return self.shape[1] * self.split.bits // 8
        return LAYOUTS[self.fmt].row_bytes(self.shape[1])

    @property
    def nbytes(self) -> int:
        """The bytes a decode step reads (integers and scales), without the padding."""
        extra = sum(int(a.nbytes) for a in (self.d, self.m, self.s) if a is not None)
        return self.shape[0] * self.row_bytes + extra


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
        self.gemv_variant = gemv_variant()  # "auto" | "v1" | "v2": which decode GEMV kernels `gemm` launches
        self.split_r: int | None = None  # split GEMV rows per warp (None: split_rows; benchmarks set it)
        self.split_grid = split_grid_setting()  # "persist" | "grid": the split GEMV's grid (split_blocks)
        self.split_resident: int | None = None  # persistent launches' blocks (None: the occupancy's; tests)
        self.split_deep = deep_setting()  # the deep GEMV where split_deep allows it
        self.spread = False  # the spread norm's kernels compiled at upload too (CudaOps.spread_norm sets it)
        self._resident: dict[tuple[str, int], int] = {}  # (kernel, shared memory) -> blocks resident at once
        self._num_sms: int | None = None
        self._fns: dict[tuple[str, str], dict[str, Any]] = {}
        self._smem: dict[str, int] = {}  # kernel name -> dynamic shared memory it was opted in to
        self._smem_limit: int | None = None
        self.scratch = cp.empty(0, cp.float16)

    def upload(self, w: QuantTensor | RowStack, upload_float) -> DeviceQuant | DeviceRowStack:
        """The packed weight on the device (`upload_float` takes the float parts of a RowStack): split formats
        repacked under the split kernels, the other formats' bytes copied as they are."""
        if isinstance(w, RowStack):
            return DeviceRowStack(
                tuple(self.upload(p, upload_float) if isinstance(p, QuantTensor) else upload_float(p)
                      for p in w.parts)
            )  # fmt: skip
        m, k = int(w.shape[0]), int(w.shape[1])
        if pick_variant(self.gemv_variant, w.fmt, 1) == "split":
            host = split(w)
            dq = DeviceQuant(w.fmt, (m, k), self._device(host.q), SPLIT_FORMATS[w.fmt], self._device(host.d),
                             *(None if a is None else self._device(a) for a in (host.m, host.s)))  # fmt: skip
        else:
            dq = DeviceQuant(w.fmt, (m, k), self._device(w.data))
        self.prepare(dq)
        return dq

    def prepare(self, w: DeviceQuant) -> None:
        """Everything a weight's launches need made now, never inside a CUDA Graph capture: its kernels compiled,
        the split GEMV's shared memory opted in for its K (the SILU instantiations too: any split weight may be a
        gate_up) and its resident blocks counted for NMAX rows of x, the prefill scratch grown for it."""
        m, k = w.shape
        self.reserve(m, k)
        if not w.split:
            for v in {self._variant(w, n) for n in (1, GEMV_MAX_ROWS)}:
                self._kernels(w.fmt, v)
            return
        for variant in ("split", "spread") if self.spread else ("split",):
            for name, fn in self._kernels(w.fmt, variant).items():
                if name.startswith("quant_gemv_split"):
                    nmax, passes = split_name_shape(name)
                    smem = spread_smem(k) if variant == "spread" else split_smem(nmax, k, passes)
                    self._opt_in(name, fn, smem)
                    if self.split_grid == "persist" and smem <= self.smem_limit:
                        self.resident_blocks(name, fn, smem)

    def _device(self, a: np.ndarray):
        """A host array's bytes on the device, flat, with PAD zero bytes after them."""
        host = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        data = self.cp.empty(host.size + PAD, self.cp.uint8)
        data[: host.size].set(host)
        data[host.size :] = 0
        return data

    def _opt_in(self, name: str, fn, nbytes: int) -> None:
        """Let `fn` launch with `nbytes` of dynamic shared memory (past the default 48 KB, an opt-in), up to the
        device's limit (`gemm` launches fewer rows of x at a time past it)."""
        nbytes = min(nbytes, self.smem_limit)
        if nbytes > max(self._smem.get(name, 0), SMEM_DEFAULT):
            fn.max_dynamic_shared_size_bytes = nbytes
            self._smem[name] = nbytes

    @property
    def smem_limit(self) -> int:
        """The most dynamic shared memory one block may opt in to on this device (227 KB on an H100 / H200)."""
        if self._smem_limit is None:
            attrs = self.cp.cuda.Device().attributes
            self._smem_limit = int(attrs.get("MaxSharedMemoryPerBlockOptin", SMEM_DEFAULT))
        return self._smem_limit

    def resident_blocks(self, name: str, fn, smem: int) -> int:
        """Blocks of the split GEMV `fn` resident on the whole GPU at once with `smem` bytes of dynamic shared
        memory (cached; a host-side query, so a launch inside a graph capture may make it)."""
        got = self._resident.get((name, smem))
        if got is None:
            if self._num_sms is None:
                self._num_sms = int(self.cp.cuda.Device().attributes["MultiProcessorCount"])
            per_sm = max(1, fn.blocks_per_sm(32 * SPLIT_WARPS, smem))
            got = self._resident[name, smem] = self._num_sms * per_sm
        return got

    def reserve(self, m: int, k: int) -> None:
        """Grow the prefill scratch for an [m, k] weight (at upload, or for packed weights made on the device)."""
        need = self.tile_rows(m, k) * k
        if need > self.scratch.size:
            self.scratch = self.cp.empty(need, self.cp.float16)

    def tile_rows(self, m: int, k: int) -> int:
        """Rows of a weight dequantized per cuBLAS call on the prefill path: all of them when they fit, else a
        multiple of 64, so every tile's output columns start 128-byte aligned (an unaligned start made cuBLAS
        3.4x slower: 4096 x 14336 at 2048 rows on the H200, 2026-12-02)."""
        rows = self.tile_bytes // (2 * k)
        return m if rows >= m else max(1, rows // 64 * 64 or rows)

    def _kernels(self, fmt: str, variant: str = "v1") -> dict[str, Any]:
        """The format's module with one GEMV variant's kernels (compiled once per format and variant)."""
        key = (fmt, variant)
        fns = self._fns.get(key)
        if fns is None:
            names = kernel_names(fmt, (variant,))
            mod = load_module(SPLIT_SOURCE if variant in ("split", "spread") else QUANT_SOURCE, names)
            fns = self._fns[key] = {n: mod.get_function(n) for n in names}
        return fns

    def gemm(self, x, w: DeviceQuant | DeviceRowStack, out) -> None:
        """out[N, M] = x[N, K] @ W^T (x contiguous float16; out float16 or float32, rows of stride >= M). Into
        float32 (the logits) the split GEMV rounds x in two int8 passes (x, then its residual), as the CPU's
        cpu_quant.logits_q."""
        if isinstance(w, DeviceRowStack):
            c = 0
            for p in w.parts:
                cols = out[:, c : c + int(p.shape[0])]
                if isinstance(p, DeviceQuant):
                    self.gemm(x, p, cols)
                else:
                    self.blas.gemm_nt(x, p, cols)
                c += int(p.shape[0])
            return
        n, k = int(x.shape[0]), int(x.shape[1])
        m = w.shape[0]
        if n == 0 or m == 0:
            return
        variant = self._variant(w, n)
        fns = self._kernels(w.fmt, variant)
        if n <= GEMV_MAX_ROWS and w.split:
            self._gemv_split(fns, x, w, out)
            return
        if n <= GEMV_MAX_ROWS:
            nmax = next(r for r in GEMV_ROWS if r >= n)
            t = "__half" if out.dtype == np.float16 else "float"
            ldy = np.int32(out.strides[0] // out.itemsize)
            kernel, warps = GEMV_VARIANTS[variant]
            fn = fns[f"{kernel}<{w.fmt.upper()}, {nmax}, {t}>"]
            args = (w.data, np.int64(w.row_bytes), x, np.int32(n), out, ldy, np.int32(m), np.int32(k))
            fn((-(-m // warps),), (32 * warps,), args)
            return
        tile = self.tile_rows(m, k)
        for r0 in range(0, m, tile):
            r1 = min(m, r0 + tile)
            wt = self.scratch[: (r1 - r0) * k].reshape(r1 - r0, k)
            self._dequant(fns, w, None, r0, r1 - r0, wt)
            self.blas.gemm_nt(x, wt, out[:, r0:r1])

    def gate_up_silu(self, x, w: DeviceQuant, out) -> bool:
        """out[N, I] = silu(x @ Wg^T) * (x @ Wu^T) for the row-fused w = [Wg; Wu] [2I, K] in one launch per
        shared-memory step (quant_gemv_split with SILU) when w is a split weight and N <= GEMV_MAX_ROWS (out
        float16); False (nothing launched) otherwise, for the caller's GEMM + silu_mul."""
        n = int(x.shape[0])
        if not (w.split and 0 < n <= GEMV_MAX_ROWS and out.dtype == np.float16):
            return False
        self._gemv_split(self._kernels(w.fmt, "split"), x, w, out, silu=True)
        return True

    def qkv_rope(self, x, w: DeviceQuant, ro: np.void) -> None:
        """The split q/k/v GEMV over x's rows (N <= GEMV_MAX_ROWS, fp16) with RoPE and the K/V page write in its
        epilogue (`ro`: rope_out.rope_out; CudaOps.qkv_rope checks the rest)."""
        self._gemv_split(self._kernels(w.fmt, "split"), x, w, None, rope=ro)

    def _gemv_split(
        self, fns, x, w: DeviceQuant, out, silu: bool = False, rope: np.void | None = None
    ) -> None:
        """quant_gemv_split over x's rows, as many per launch as the shared memory holds (all of them unless K is
        large: 8 rows of K = 14336 need 140 KB, 280 KB with a float32 output's two passes). `silu`: w is
        [gate; up] and out gets silu(gate) * up, [N, M / 2] in fp16. `rope` (out None): w is the q/k/v matrix and
        the ROPE epilogue writes q and the K/V page slots (each launch's rows: rope_rows)."""
        n, k, m = int(x.shape[0]), int(x.shape[1]), w.shape[0]
        passes = 2 if out is not None and out.dtype == np.float32 else 1
        step = n
        while step > 1 and split_smem(step, k, passes) > self.smem_limit:
            step = (step + 1) // 2
        r = self.split_r or split_rows(m, n)
        t = "__half" if out is None or out.dtype == np.float16 else "float"
        tail, outs = "", m  # template flag, outputs of the launch (M, the kernel's)
        if silu:  # R in SPLIT_SILU_R, R/2 outputs a warp
            r, tail, outs = max(2, self.split_r or split_silu_rows(m, n)), ", true", m // 2
        if rope is not None:  # the epilogue writes q and the cache; the y argument is never written
            r, ldy = SPLIT_ROPE_R, np.int32(0)
        else:
            ldy = np.int32(out.strides[0] // out.itemsize)
        for i in range(0, n, step):
            rows = min(step, n - i)
            nmax = next(g for g in SPLIT_ROWS if g >= rows)
            name = f"quant_gemv_split<{w.split.trait}, {r}, {nmax}, {passes}, {t}{tail}>"
            if rope is not None:
                name = rope_name(w.split.trait, nmax, rope_kind(rope))
            smem = split_smem(rows, k, passes)
            if rope is None:
                args = (w.data, *self._fields(w), x[i : i + rows], np.int32(rows), out[i : i + rows], ldy,
                        np.int32(outs), np.int32(k))  # fmt: skip
            else:  # no y: the RopeOut struct, moved to these rows
                args = (w.data, *self._fields(w), x[i : i + rows], np.int32(rows), np.int32(outs), np.int32(k),
                        rope_rows(rope, i))  # fmt: skip
            plain = not silu and rope is None and nmax == 1 and passes == 1
            deep = deep_name(w.split.trait) if plain else None
            self._launch(fns, name, args, smem, outs, r, r // 2 if silu else r, deep)

    def _launch(self, fns, name: str, args: tuple, smem: int, outs: int, r: int, per_warp: int,
                deep: str | None = None) -> int:  # fmt: skip
        """Launch a split GEMV over `outs` outputs at `r` rows (`per_warp` outputs) a warp: the persistent grid
        (split_blocks) or, where `deep` (its deep twin, the same arguments) fits split_deep, a row group per warp of
        that. Returns the grid's blocks."""
        fn, resident = fns[name], self.split_resident
        if resident is None and self.split_grid == "persist":
            resident = self.resident_blocks(name, fn, smem)
        deep_fits = deep is not None and self.split_deep
        if deep_fits and split_deep(outs, r, self.resident_blocks(deep, fns[deep], smem)):
            fn, resident = fns[deep], None  # a row group per warp
        grid = split_blocks(outs, per_warp, resident)
        fn((grid,), (32 * SPLIT_WARPS,), args, shared_mem=smem)
        return grid

    def linear_add(self, x, w: DeviceQuant, res) -> Added:
        """res[0] += x[0] @ W^T (each output rounded to fp16 first) for one row of x, in the GEMV's epilogue (SPREAD_ADD),
        with each block's sum of squares of what it wrote: the Added the next spread_norm consumer reads."""
        m, k = w.shape
        fns, r = self._kernels(w.fmt, "spread"), self.split_r or split_rows(m, 1)
        deep = spread_name(w.split.trait, SPLIT_DEEP_R, SPREAD_ADD, ux=2)  # split_deep takes it at R = 2 only
        grid_max = split_blocks(m, r)  # the most blocks it may take: the partials' room
        part = self.cp.empty((grid_max, 1), self.cp.float32)
        sp = spread_arg(res, part)
        args = (w.data, *self._fields(w), x, np.uint64(0), np.int32(0), np.int32(m), np.int32(k), sp)
        parts = self._launch(
            fns, spread_name(w.split.trait, r, SPREAD_ADD), args, spread_smem(k), m, r, r, deep
        )
        return Added(part, parts)

    def gate_up_norm(self, add: Added, res, norm_w, eps: float, w: DeviceQuant, out) -> None:
        """out[0] = silu(h Wg^T) * (h Wu^T), h = RMSNorm(res[0]) from add's partials (SPREAD_NORM with SILU)."""
        m, k = w.shape
        r = max(2, self.split_r or split_silu_rows(m, 1))
        sp = spread_arg(res, add.part, norm_w, add.parts, eps)
        ldy = np.int32(out.strides[0] // out.itemsize)
        args = (w.data, *self._fields(w), np.uint64(0), out, ldy, np.int32(m // 2), np.int32(k), sp)
        name = spread_name(w.split.trait, r, SPREAD_NORM, silu=True)
        self._launch(self._kernels(w.fmt, "spread"), name, args, spread_smem(k), m // 2, r, r // 2)

    def qkv_rope_norm(self, add: Added, res, norm_w, eps: float, w: DeviceQuant, ro: np.void) -> None:
        """The q/k/v GEMV with the RoPE epilogue (`ro`, an fp16 cache's) over h = RMSNorm(res[0]) from add's
        partials (SPREAD_NORM)."""
        m, k = w.shape
        sp = spread_arg(res, add.part, norm_w, add.parts, eps)
        args = (w.data, *self._fields(w), np.int32(m), np.int32(k), ro, sp)
        name = spread_rope_name(w.split.trait, rope_kind(ro))
        self._launch(
            self._kernels(w.fmt, "spread"), name, args, spread_smem(k), m, SPLIT_ROPE_R, SPLIT_ROPE_R
        )

    def _variant(self, w: DeviceQuant, n: int) -> str:
        """The kernels of w's layout: split for a split weight, else the setting's block kernel (v1 / v2, for
        weights stored as blocks)."""
        return "split" if w.split else block_variant(self.gemv_variant, w.fmt, n)

    @staticmethod
    def _fields(w: DeviceQuant) -> tuple:
        """A split weight's scales, additive terms and sub-scales as the kernels take them (an absent array: the
        scales' as a placeholder the kernel never reads)."""
        return w.d, w.d if w.m is None else w.m, w.d if w.s is None else w.s

    def embed(self, table: DeviceQuant, ids, out) -> None:
        """out[j] = row ids[j] of the table as float16 (ids: int64 on the device)."""
        if int(ids.shape[0]):
            ids = self.cp.ascontiguousarray(ids, dtype=self.cp.int64)
            self._dequant(
                self._kernels(table.fmt, self._variant(table, 1)), table, ids, 0, int(ids.shape[0]), out
            )

    def _dequant(self, fns, w: DeviceQuant, rows, r0: int, nrows: int, out) -> None:
        k = w.shape[1]
        total = nrows * (k // 8)
        rows_arg = np.uint64(0) if rows is None else rows
        tail = (rows_arg, np.int64(r0), np.int32(nrows), np.int32(k), out)
        if w.split:
            args = (w.data, *self._fields(w), *tail)
            fn = fns[f"quant_dequant_split<{w.split.trait}>"]
        else:
            args = (w.data, np.int64(w.row_bytes), *tail)
            fn = fns[f"quant_dequant<{w.fmt.upper()}>"]
        fn((-(-total // 256),), (256,), args)
