"""CUDA backend: CuPy arrays in float16, cuBLAS GEMMs with float32 accumulation, our kernels for the rest.

Kernels: kernels/layers.cu (embedding gather, residual add + RMSNorm, RoPE + K/V page write, SiLU-and-multiply),
kernels/attention_*.cu (through cuda_attention.py), kernels/sampling.cu (through cuda_sampling.py),
kernels/quant_gemv.cu (quantized weights kept in their packed blocks, through cuda_quant.py).
Each launcher below names its CPU reference in backends/reference/. The residual stream is kept in float32; everything
else that crosses kernels (activations, weights, K/V pages) is float16. Logits come out as float32.

Nothing here synchronizes with the host except `to_numpy`, `sample`, `logprobs` and `kv_budget_bytes`, so a
decode forward can be captured in a CUDA Graph (cuda_graphs.py) and `sample_async` lets the engine plan the
next step while the device runs this one.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping

import numpy as np

from ..config import GROUP_REDUCE, EngineConfig, env_choice, env_flag, env_float
from ..errors import InvalidRequestError, ModelLoadError
from ..kv.layout import KVLayout
from ..sparse.plan import AttentionPlan
from ..weights.qtensor import QuantTensor, RowStack
from .base import (
    ROPE_CHUNK,
    Added,
    EagerExecutor,
    Forward,
    KVCache,
    RopeTables,
    alloc_kv_cache,
    norm_qkv_rope,
    norm_then_linear,
)
from .cuda_attention import HEAD_DIMS, KV_TRAITS
from .cuda_compile import load_module
from .cuda_graphs import GraphExecutor, graph_needs
from .cuda_quant import DeviceQuant, DeviceRowStack, QuantKernels, device_bytes
from .memory import MemoryNeed, step_needs
from .rms_in import NO_NORM, RmsIn, scratch_bytes
from .rope_out import QUANT_ROPE_ROWS, ROPE_TICKETS, rope_kind, rope_kinds, rope_out

FP16_MAX = 65504.0
LAYER_KERNELS = (
    "embed_gather<1>",
    "embed_gather<8>",
    *(f"add_rmsnorm<{r}, {v}>" for r in ("false", "true") for v in ("false", "true")),
    *(f"rope_write_kv{s}<{t}>" for s in ("", "_sparse") for t in KV_TRAITS.values()),
    "silu_mul<1>",
    "silu_mul<8>",
    "clear_pages",
    *(f"gemv_rows<{n}, {t}>" for t in ("__half", "float") for n in range(1, 9)),
    *(f"gemv_rows<{n}, __half, true>" for n in range(1, 9)),  # gate_up GEMV + SiLU-and-multiply (decode)
    # the input's residual add and RMSNorm in the GEMV's prologue (rmsnorm_linear), plain and gate_up + SiLU
    *(f"gemv_rows<{n}, __half, {s}, true>" for s in ("false", "true") for n in range(1, 9)),
    # the q/k/v GEMV with RoPE and the K/V page write in its epilogue (qkv_rope), with and without the norm
    *(
        f"gemv_rows_rope<{n}, {s}, {r}>"
        for s in ("false", "true")
        for n in range(1, 9)
        for r in rope_kinds(n)
    ),
)
GEMV_MAX_ROWS = 8
# Rows of a decode step whose q/k/v GEMV writes RoPE and the K/V pages itself (qkv_rope): batch 1 only. Measured
# (docs/PERF_e2e.md, 2026-12-05): its replay 1-5% faster at one row, 1.5-6% slower at 2-8 rows (SmolLM2, Q4_1).
FUSE_ROPE_ROWS = 1

ROPE_DTYPE = np.float16  # the device's RoPE tables (rope_tables), as buffer_needs counts them
NORM_CHUNKS = 4  # add_rmsnorm's chunks of 8 values a thread at most on its vector path (layers.cu)
GEMV_WARPS = 8  # gemv_rows' warps per block (its launch and its shared partial sums, one per warp)
NORM_SMEM = 48 << 10  # gemv_rows with NORM: normed rows (N * K halves) + scratch in shared memory, no opt-in


def gemv_rows_smem(n: int, k: int, slices: int, silu: bool, norm: bool) -> int:
    """gemv_rows' dynamic shared memory (layers.cu): with NORM the normed rows (n * k halves) and the rms scratch;
    with slices > 1 then GEMV_WARPS x (2 with silu) x n float partial sums."""
    return (2 * n * k + scratch_bytes(n) if norm else 0) + (
        GEMV_WARPS * (2 if silu else 1) * n * 4 if slices > 1 else 0
    )


def gemv_tuning(env: Mapping[str, str]) -> tuple[str, ...]:
    """NVRTC definitions for gemv_rows' tuning knobs (layers.cu) from LSERVE_GEMV_PREFETCH (chunks of a row
    prefetched to L2, 0-4096) and LSERVE_GEMV_UNROLL (1-16); unset: the kernel's measured defaults."""
    opts = []
    for name, lo, hi in (("LSERVE_GEMV_PREFETCH", 0, 4096), ("LSERVE_GEMV_UNROLL", 1, 16)):
        value = env.get(name, "")
        if value == "":
            continue
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise InvalidRequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        opts.append(f"-D{name}={int(value)}")
    return tuple(opts)


def to_fp16(a: np.ndarray, name: str | None = None) -> np.ndarray:
    """Checked float16 conversion: refuses values beyond the float16 range (or NaN) instead of making inf."""
    if a.dtype == np.float16 or a.size == 0:
        return np.ascontiguousarray(a, dtype=np.float16)
    hi, lo = float(np.max(a)), float(np.min(a))
    if not (max(hi, -lo) <= FP16_MAX):
        what = f"tensor {name}" if name else f"a weight tensor of shape {tuple(a.shape)}"
        raise ModelLoadError(
            f"{what} has values up to {max(abs(hi), abs(lo)):.4g} (or NaN), beyond float16's range "
            f"({FP16_MAX:g}); the CUDA backend stores weights in float16"
        )
    return np.ascontiguousarray(a, dtype=np.float16)


def kv_trait(cache: KVCache) -> str:
    """The kernels' template argument for the cache's format (kernels/kv_quant.cuh)."""
    return KV_TRAITS[cache.fmt.name if cache.fmt is not None else "fp16"]


def _scale_args(cache: KVCache, layer: int) -> tuple:
    """The four scale pointers of a layer's pools (k, v, ks, vs); null for a float cache or a missing pool."""
    return tuple(np.uint64(0) if a is None else a for a in cache.scales(layer))


def _threads(n: int, cap: int = 1024) -> int:
    """A block size for `n` elements per row: a multiple of 32, at most `cap`."""
    return int(min(cap, max(32, -(-n // 32) * 32)))


def _aligned16(*arrays) -> bool:
    """Every array's data starts on a 16-byte boundary (the vector paths' uint4 / float4 accesses)."""
    return all(int(a.data.ptr) % 16 == 0 for a in arrays)


def _row_grid(rows: int, items: int, threads: int = 256) -> tuple[tuple[int, int], tuple[int]]:
    """(grid, block) of a per-row kernel whose row's `items` spread over grid.y blocks, about one per thread: a decode
    step's single row then runs on many SMs instead of one block's dependent-load chain (rope_write_kv)."""
    block = _threads(items, threads)
    return (rows, -(-items // block)), (block,)


def _rope_threads(hq: int, hkv: int, d: int, quant: bool, stats: bool = False, hadamard: bool = False) -> int:
    """Threads of a rope_write_kv(_sparse) row, one item each (layers.cu RowItems): eight channel pairs of a head
    (rope_pairs8; q only when the cache is quantized, none when q is in the Hadamard basis), padded to a warp, then
    32 per q head in the Hadamard basis and per quantized K / V row, then the page statistics: one per (KV head,
    channel), or a warp per KV head when the keys go into the Hadamard basis."""
    if d % 16:
        raise ValueError(f"rope_write_kv needs a head dim divisible by 16, got {d}")
    q_rows = hq if quant and hadamard else 0
    rows = q_rows + 2 * hkv if quant else 0
    pairs = (hq - q_rows if quant else hq + 2 * hkv) * d // 16
    return -(-pairs // 32) * 32 + 32 * rows + (hkv * (32 if q_rows else d) if stats else 0)


def rope_grid(
    n: int, hq: int, hkv: int, d: int, quant: bool, stats: bool = False, hadamard: bool = False
) -> tuple[tuple[int, int], tuple[int]]:
    """(grid, block) of rope_write_kv(_sparse) over n rows (also what tools/layers_host_check.py launches)."""
    return _row_grid(n, _rope_threads(hq, hkv, d, quant, stats, hadamard))


class Cublas:
    """cublasGemmEx through ctypes on a handle of our own, with a workspace of our own.

    CuPy refuses cuBLAS calls while a stream is being captured; cuBLAS itself supports capture when the
    handle has a user workspace (cublasSetWorkspace after each cublasSetStream, as PyTorch does). One path
    for eager and captured steps, so both pick the same algorithms.
    """

    OP_N, OP_T = 0, 1
    R_32F, R_16F = 0, 2
    COMPUTE_32F = 68
    GEMM_DEFAULT = -1
    WORKSPACE = 32 << 20

    def __init__(self, cp):
        import ctypes

        import cupy_backends.cuda.libs.cublas  # noqa: F401  (makes CuPy load libcublas first)

        self.cp, c = cp, ctypes
        self.lib = c.CDLL(self._libpath())
        vp, i = c.c_void_p, c.c_int
        self.lib.cublasCreate_v2.argtypes = [c.POINTER(vp)]
        self.lib.cublasSetStream_v2.argtypes = [vp, vp]
        self.lib.cublasSetWorkspace_v2.argtypes = [vp, vp, c.c_size_t]
        self.lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        handle = vp()
        self._check(self.lib.cublasCreate_v2(c.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cp.empty(self.WORKSPACE, cp.uint8)
        self._stream = None
        self._one, self._zero = c.c_float(1.0), c.c_float(0.0)
        self._pone, self._pzero = c.cast(c.byref(self._one), vp), c.cast(c.byref(self._zero), vp)

    @staticmethod
    def _libpath() -> str:
        """The libcublas CuPy loaded (read from /proc/self/maps), else the usual sonames."""
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    path = line.split()[-1]
                    name = path.rsplit("/", 1)[-1]
                    if name.startswith("libcublas.so"):
                        return path
        except OSError:
            pass
        import ctypes.util

        return ctypes.util.find_library("cublas") or "libcublas.so"

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def gemm_nt(self, x, w, out) -> None:
        """out[N, M] = x[N, K] @ w[M, K]^T (float16 inputs, float16 or float32 out, float32 compute); `out` may be
        a column block of a wider output (its row stride is the leading dimension)."""
        n, k = x.shape
        m = w.shape[0]
        ldc = out.strides[0] // out.itemsize
        stream = self.cp.cuda.get_current_stream().ptr
        if stream != self._stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, stream), "cublasSetStream")
            ws = self.workspace
            self._check(
                self.lib.cublasSetWorkspace_v2(self.handle, ws.data.ptr, ws.nbytes), "cublasSetWorkspace"
            )
            self._stream = stream
        rc = self.R_16F if out.dtype == self.cp.float16 else self.R_32F
        self._check(
            self.lib.cublasGemmEx(
                self.handle, self.OP_T, self.OP_N, m, n, k, self._pone, w.data.ptr, self.R_16F, k,
                x.data.ptr, self.R_16F, k, self._pzero, out.data.ptr, rc, ldc, self.COMPUTE_32F, self.GEMM_DEFAULT,
            ),
            "cublasGemmEx",
        )  # fmt: skip


SELECTORS = ("rawkernel", "numba")


def page_selector(name: str):
    """The page selector launcher (arguments of cuda_attention.select_pages): "rawkernel", page_select.cu's
    two launches (the default), or "numba", numba_page_select.py's one launch (docs/SPARSE.md)."""
    if name == "rawkernel":
        from .cuda_attention import select_pages

        return select_pages
    if name == "numba":
        from .numba_page_select import NumbaSelector

        return NumbaSelector()
    raise ValueError(f"LSERVE_SELECTOR must be one of {', '.join(SELECTORS)}, got {name!r}")


def fuse_rope_rows(choice: bool | None, env: str | None) -> int:
    """Rows up to which qkv_rope fuses: an explicit choice (all GEMV-sized steps or none), else the environment's
    LSERVE_CUDA_FUSE_ROPE (1: all, 0: none), else FUSE_ROPE_ROWS."""
    if choice is None:
        if env not in ("0", "1"):
            return FUSE_ROPE_ROWS
        choice = env == "1"
    return GEMV_MAX_ROWS if choice else 0


class CudaOps:
    """float16 CuPy implementation of the Ops interface (sm_80 and newer)."""

    name = "cuda"
    memory_is_host = False
    dtype = np.float16
    kv_dtypes: tuple[str, ...] = ("fp16", "int8", "int4")  # + fp8 on sm_89 and newer (__init__)
    selector_reductions = GROUP_REDUCE
    async_steps = True  # kernels and graph replays are queued on a stream: the host may plan the next step

    def __init__(
        self, device: int | None = None, fuse_rope: bool | None = None, fuse_rope_quant: bool | None = None,
        spread_norm: bool | None = None,
    ):  # fmt: skip
        import cupy as cp
        from cupy_backends.cuda.api import runtime

        from .cuda_sampling import GpuSampler

        self.cp, self._runtime = cp, runtime
        if device is not None:
            cp.cuda.Device(device).use()
        self.device = cp.cuda.Device()
        if int(self.device.compute_capability) >= 89:
            self.kv_dtypes = (*CudaOps.kv_dtypes, "fp8")
        mod = load_module("layers.cu", LAYER_KERNELS, gemv_tuning(os.environ))
        self.k = {n: mod.get_function(n) for n in LAYER_KERNELS}
        self.sampler = GpuSampler()
        # LSERVE_SELECTOR: checked now, its launcher built on first use (page_selector)
        self._selector_name = env_choice("LSERVE_SELECTOR", "rawkernel", SELECTORS)
        self._selector = None
        # the cache (a weak reference: an engine's pools go with it) and pool lists whose tables clear_pages keeps
        self._pool_table_of: tuple = (lambda: None, ())
        self._pool_tables_kept: tuple = ()
        self.blas = Cublas(cp)
        self.quant = QuantKernels(cp, self.blas)
        self._plans: dict[tuple[int, int, int], object] = {}  # eager device plans by capacity bucket
        self._decode_parts: dict[tuple[int, int, int], object] = {}  # decode rows of mixed steps, likewise
        # Decode-sized GEMMs (<= 8 rows) through our GEMV kernel instead of cuBLAS; LSERVE_CUDA_GEMV=0 turns it off.
        self.small_gemv = env_flag("LSERVE_CUDA_GEMV", True)
        # SiLU-and-multiply in the decode gate_up GEMV's epilogue (gate_up_silu); LSERVE_CUDA_FUSE_SILU=0: separate.
        self.fuse_silu = env_flag("LSERVE_CUDA_FUSE_SILU", True)
        # residual add + RMSNorm in the prologue of the decode GEMV after it (rmsnorm_linear); LSERVE_CUDA_FUSE_NORM=0:
        # add_rmsnorm's own kernel.
        self.fuse_norm = env_flag("LSERVE_CUDA_FUSE_NORM", True)
        # RoPE + K/V write in the decode q/k/v GEMV's epilogue (qkv_rope) for steps of at most this many rows, else
        # rope_write_kv after the GEMV: FUSE_ROPE_ROWS by default, LSERVE_CUDA_FUSE_ROPE=1 every GEMV-sized step, 0 none.
        # (`fuse_rope` / `fuse_rope_quant`: this instance's choice whatever the environment; the kernel harness tests
        # the fused kernels)
        self.fuse_rope_rows = fuse_rope_rows(
            fuse_rope, env_choice("LSERVE_CUDA_FUSE_ROPE", "", ("", "0", "1"))
        )
        # ... for a quantized cache too (one row: rope_out.QUANT_ROPE_ROWS) with LSERVE_CUDA_FUSE_ROPE_QUANT=1; off by
        # default: 3.5-3.7% slower LServe decode with int8 weights on an H100 (docs/PERF_e2e.md, 2026-12-06). Its
        # heads' tickets (rope_out.cuh), zero between launches: every fused launch on this device's one stream of
        # steps (eager and graph replays alike) counts in them and leaves them zero.
        env_quant = env_flag("LSERVE_CUDA_FUSE_ROPE_QUANT", False)
        self.fuse_rope_quant = env_quant if fuse_rope_quant is None else fuse_rope_quant
        self._rope_tickets = cp.zeros(ROPE_TICKETS, cp.int32) if self.fuse_rope_quant else None
        # gemv_rows with S = 2 warps per row where twice the rows fit this many waves of resident warps (gemv_slices);
        # LSERVE_GEMV_KSPLIT=0: one warp per row everywhere (1.5, splitting the QKV projection too, measured slower).
        self.gemv_ksplit = env_float("LSERVE_GEMV_KSPLIT", 1.0, 0.0, 8.0)
        # The spread norm of batch-1 packed-weight decode (linear_add; kernels/spread_norm.cuh) with
        # LSERVE_CUDA_SPREAD_NORM=1; off by default until measured faster on a GPU (`spread_norm`: this instance's).
        env_spread = env_flag("LSERVE_CUDA_SPREAD_NORM", False)
        self.spread_norm = env_spread if spread_norm is None else spread_norm
        self.quant.spread = self.spread_norm
        self.resident_warps = 64 * int(self.device.attributes["MultiProcessorCount"])  # at <= 32 registers

    # -- data movement ------------------------------------------------------------------------
    def upload(self, a, name: str | None = None):
        """Floats become float16 (checked), integers keep their dtype. Device arrays pass through. Quantized
        weights keep their packed blocks (cuda_quant.DeviceQuant / DeviceRowStack; no float copy)."""
        cp = self.cp
        if isinstance(a, cp.ndarray):
            return a if a.dtype.kind != "f" or a.dtype == np.float16 else a.astype(np.float16)
        if isinstance(a, (QuantTensor, RowStack)):
            return self.quant.upload(a, lambda part: self.upload(part, name))
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = to_fp16(a, name)
        return cp.asarray(np.ascontiguousarray(a))

    def rope_tables(self, tables: RopeTables) -> tuple:
        """fp16 cos / sin of every position, computed here from the float64 angles a chunk at a time as the host's
        `RopeTables.reach` does (float64 -> float32 -> float16, the upload's rounding): a 2^24-token table took ~18 s
        of host startup and 8 GiB of host float32 before its upload."""
        cp = self.cp
        n, inv = tables.max_len, cp.asarray(tables.inv)
        cos, sin = (cp.empty((n, inv.size), ROPE_DTYPE) for _ in range(2))
        for p in range(0, n, ROPE_CHUNK):
            ang = cp.arange(p, min(p + ROPE_CHUNK, n), dtype=cp.float64)[:, None] * inv[None, :]
            cos[p : p + len(ang)] = cp.cos(ang).astype(cp.float32)
            sin[p : p + len(ang)] = cp.sin(ang).astype(cp.float32)
        return cos, sin

    def to_numpy(self, a) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        out = self.cp.asnumpy(a)
        return out.astype(np.float32) if out.dtype == np.float16 else out

    def weight_bytes(self, w) -> int:
        """Quantized matrices in the layout `upload` gives them (cuda_quant), fp16 for the rest."""
        return device_bytes(w, self.quant.gemv_variant)

    def memory_bytes(self) -> int:
        """The device memory free now (CuPy's cached free blocks count as free)."""
        free, _total = self._runtime.memGetInfo()
        return free + self.cp.get_default_memory_pool().free_bytes()

    def kv_budget_bytes(self, fraction: float, reserved: int = 0) -> int:
        """`fraction` of `memory_bytes`, less `reserved` bytes still to be uploaded (the weights) and 1 GiB for
        activations, cuBLAS and graphs."""
        return max(0, int((self.memory_bytes() - reserved) * fraction) - (1 << 30))

    def kv_limit_bytes(self, reserved: int = 0) -> int:
        """All of the device memory free now, less the weights still to come and the 1 GiB of workspaces."""
        return self.kv_budget_bytes(1.0, reserved)

    def buffer_needs(
        self, cfg, ecfg: EngineConfig, max_len: int, layout: KVLayout | None = None
    ) -> list[MemoryNeed]:
        """A step's logits, activations and RoPE tables (`memory.step_needs`), and with CUDA Graphs what the captured
        sizes hold (`cuda_graphs.graph_needs`)."""
        needs = step_needs(cfg, ecfg, max_len, np.dtype(ROPE_DTYPE).itemsize)
        if ecfg.cuda_graphs:
            needs += graph_needs(
                cfg.vocab_size, ecfg.max_num_seqs, max_len, ecfg.page_size, layout is not None
            )
        return needs

    def alloc_kv(
        self, cfg, page_size, num_pages, layout=None, num_stream_pages=0, max_seqs=0, fmt=None
    ) -> KVCache:
        """Reference: backends/base.alloc_kv_cache. fp16 pools, or quantized values with fp16 scales (head dims
        64 and 128); fp16 key statistics (exact: keys are fp16)."""
        if (
            self._selector_name == "numba"
            and layout is not None
            and layout.sub_pages
            and not layout.streaming_only
        ):
            from .numba_page_select import unsupported

            why = unsupported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layout.sub_pages)
            if why:
                raise InvalidRequestError(f"LSERVE_SELECTOR=numba: {why}")
        if fmt is not None and fmt.quantized and cfg.head_dim not in HEAD_DIMS:
            raise InvalidRequestError(
                f"kv_dtype {fmt.name} needs head_dim 64 or 128 on the GPU, got {cfg.head_dim}"
            )
        kv = alloc_kv_cache(self.cp.zeros, self.cp.asarray, self.cp.float16, cfg, page_size, num_pages, layout,
                            num_stream_pages, max_seqs, fmt)  # fmt: skip
        self.cp.cuda.Stream.null.synchronize()  # the zero fills must be done before other streams read
        return kv

    def executor(self, forward: Forward, cache: KVCache, ecfg: EngineConfig, layout: KVLayout | None,
                 max_len: int):  # fmt: skip
        """Decode steps through CUDA Graphs (cuda_graphs.py) when `ecfg.cuda_graphs`, the rest eagerly."""
        if not ecfg.cuda_graphs:
            return EagerExecutor(self, forward, cache)
        visit = layout.decode_visit_pages(ecfg.sparse) if layout is not None else None
        return GraphExecutor(self, forward, cache, ecfg.max_num_seqs, max_len, visit)

    def select_pages(self, q, cache: KVCache, layer: int, plan) -> None:
        """Reference: reference/page_select.select_pages_ref. On the device, no host synchronization, with the
        launcher LSERVE_SELECTOR names (page_selector)."""
        if cache.kmax is None:
            return
        if self._selector is None:
            self._selector = page_selector(self._selector_name)
        self._selector(
            q, cache.kmax[layer], cache.kmin[layer], plan, cache.head_class[layer], cache.head_slot[layer],
            cache.sel_idx[layer], cache.sel_cnt[layer],
        )  # fmt: skip

    def copy_stream_pages(self, cache: KVCache, src: np.ndarray, dst: np.ndarray) -> None:
        """Reference: CpuOps.copy_stream_pages. CuPy's gather makes a temporary before the scatter (overlap is
        safe), on the current stream, so it lands before the next forward or graph replay."""
        s, d = self.cp.asarray(np.asarray(src, np.int64)), self.cp.asarray(np.asarray(dst, np.int64))
        for pool in cache.stream_pools():
            pool[d] = pool[s]

    def clear_pages(self, cache: KVCache, pages: np.ndarray, stream_pages: np.ndarray) -> None:
        """Reference: CpuOps.clear_pages. One launch per pool family (layers.cu's clear_pages): its pool addresses,
        page sizes (kept per cache) and page ids in one upload, on the current stream (before the next forward or
        graph replay)."""
        for ids, table in zip((pages, stream_pages), self._pool_tables(cache)):
            npools = len(table) // 2
            if len(ids) and npools:
                meta = self.cp.asarray(np.concatenate([table, np.asarray(ids, np.int64)]))
                self.k["clear_pages"]((len(ids), npools), (256,), (meta, np.int32(npools)))

    def _pool_tables(self, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
        """[base addresses, page sizes in bytes] of the dense and the streaming pools' non-empty arrays, built once
        per cache and pool lists (an engine's never change; built every call, a call took 58-85 us on an H100)."""
        lists = tuple(id(x) for x in (cache.k, cache.v, cache.k_scale, cache.v_scale, cache.kmax, cache.kmin,
                                      cache.ks, cache.vs, cache.ks_scale, cache.vs_scale))  # fmt: skip
        kept, kept_lists = self._pool_table_of
        if kept() is not cache or kept_lists != lists:
            tables = []
            for pools in (cache.dense_pools(), cache.stream_pools()):
                pools = [p for p in pools if p.size]
                sizes = [p.nbytes // p.shape[0] for p in pools]
                if any(b % 16 for b in sizes):
                    raise ValueError(f"KV pool pages must be multiples of 16 bytes, got {sorted(set(sizes))}")
                tables.append(np.asarray([p.data.ptr for p in pools] + sizes, np.int64))
            self._pool_table_of, self._pool_tables_kept = (weakref.ref(cache), lists), tuple(tables)
        return self._pool_tables_kept

    def prepare_plan(self, plan: AttentionPlan):
        """Upload the host plan into a device plan (cuda_attention.CudaPlan) reused across steps.

        Plans are kept per capacity bucket (powers of two of query blocks, pages and sequences), so a step
        reuses buffers sized within 2x of its needs (the decode kernel's grid follows the capacity).
        """

        part = None
        if plan.selects and int(plan.qb_len.max()) > 1:
            # Decode rows that select pages, mixed into a prefill step: the prefill kernel has no page
            # selection, so these rows are recomputed by the decode kernel on their own sub-plan.
            sub = plan.subset(np.nonzero((plan.qb_len == 1) & (plan.qb_keep > 0))[0])
            part = self._bucket(self._decode_parts, sub).update(sub)
        return self._bucket(self._plans, plan).update(plan, decode_part=part)

    @staticmethod
    def _bucket(cache: dict, plan: AttentionPlan):
        """A CudaPlan from `cache` whose capacity (powers of two) fits `plan`."""
        from .cuda_attention import CudaPlan

        need = (plan.num_qblocks, int(plan.kv_page.shape[0]), int(plan.seq_ctx.shape[0]))
        key = tuple(1 << max(0, int(x) - 1).bit_length() for x in need)
        if key not in cache:
            cache[key] = CudaPlan(max_qblocks=key[0], max_pages=key[1], max_seqs=key[2])
        return cache[key]

    # -- layers -------------------------------------------------------------------------------
    def embed(self, table, ids, out=None, vocab_start: int = 0):
        """Reference: reference/layers.embed_ref (zeros for ids outside a vocabulary shard); a quantized table
        decodes only the gathered rows."""
        n, hidden = int(ids.shape[0]), int(table.shape[1])
        out = self.cp.empty((n, hidden), self.cp.float16) if out is None else out
        if isinstance(table, DeviceQuant):  # ids outside a vocabulary shard decode row 0, then are zeroed
            local = ids - vocab_start
            inside = (local >= 0) & (local < table.shape[0])
            self.quant.embed(table, self.cp.where(inside, local, 0), out)
            out *= inside[:, None]
        elif n:
            vec = 8 if hidden % 8 == 0 else 1
            args = (table, ids, out, np.int32(hidden), np.int64(vocab_start), np.int64(table.shape[0]))
            self.k[f"embed_gather<{vec}>"]((n,), (_threads(hidden // vec, 256),), args)
        return out

    def add_rmsnorm(self, x, residual, w, eps, out=None, res_out=None):
        """Reference: reference/layers.rmsnorm_ref (after the residual add). Residual stream in float32 (updated in place when given)."""
        cp = self.cp
        x = cp.ascontiguousarray(x)
        n, hidden = int(x.shape[0]), int(x.shape[1])
        out = cp.empty((n, hidden), cp.float16) if out is None else out
        if residual is None:
            res_out = cp.empty((n, hidden), cp.float32) if res_out is None else res_out
            res_in, has_res = res_out, "false"  # res_in unread
        else:
            res_in = res_out = cp.ascontiguousarray(residual, dtype=cp.float32)
            has_res = "true"
        chunks = hidden // 8
        vec = hidden % 8 == 0 and chunks <= NORM_CHUNKS * 512 and _aligned16(x, res_in, res_out, w, out)
        threads = _threads(chunks if vec else hidden, 512)  # vec: at most NORM_CHUNKS chunks a thread
        if n:
            self.k[f"add_rmsnorm<{has_res}, {'true' if vec else 'false'}>"](
                (n,),
                (threads,),
                (x, res_in, res_out, w, out, np.int32(hidden), np.float32(eps)),
            )
        return out, res_out

    def linear(self, x, w, bias=None, out=None):
        """x [N, K] @ w[M, K]^T (float16 in and out, float32 accumulation; `gemm` picks the kernel)."""
        y = self.gemm(x, w, self.cp.float16, out=out)
        if bias is not None:
            y += bias
        return y

    def gemm_path(self, n: int, k: int) -> str:
        return "gemv" if self.small_gemv and 0 < n <= GEMV_MAX_ROWS and k % 8 == 0 else "cublas"

    def gemv_slices(self, m: int, k: int) -> int:
        """Warps per output row of gemv_rows: 2 where twice the m rows fit LSERVE_GEMV_KSPLIT waves of the GPU's
        resident warps (1: all at once) and a row is long enough to cut (K >= 2048: o_proj and down of 8B-class
        models), else 1."""
        return 2 if k >= 2048 and 2 * m <= self.gemv_ksplit * self.resident_warps else 1

    def _gemv_rows(
        self,
        x,
        w,
        out,
        m: int,
        k: int,
        silu: bool = False,
        norm: RmsIn | None = None,
        rope: np.void | None = None,
    ) -> None:
        """Launch the gemv_rows instantiation for m output rows (units; gate/up row pairs with silu, RoPE pairs with
        `rope`, whose slices are those of the 2m rows unfused): grid, slices, dynamic shared memory (gemv_rows_smem)."""
        n, s = int(x.shape[0]), self.gemv_slices(2 * m if rope is not None else m, k)
        b = lambda f: "true" if f else "false"  # noqa: E731
        sizes, tail = (np.int32(m), np.int32(k), np.int32(s)), norm.args() if norm else NO_NORM
        if rope is not None:  # gemv_rows_rope: no y, the RopeOut struct last
            name, args = f"gemv_rows_rope<{n}, {b(norm)}, {rope_kind(rope)}>", (x, w, *sizes, *tail, rope)
        else:
            if norm is not None:
                name = f"gemv_rows<{n}, __half, {b(silu)}, true>"
            elif silu:
                name = f"gemv_rows<{n}, __half, true>"
            else:
                name = f"gemv_rows<{n}, {'__half' if out.dtype == np.float16 else 'float'}>"
            args = (x, w, out, *sizes, *tail)
        smem = gemv_rows_smem(n, k, s, silu or rope is not None, norm is not None)
        self.k[name]((-(-m * s // GEMV_WARPS),), (32 * GEMV_WARPS,), args, shared_mem=smem)

    def gemm(self, x, w, out_dtype, out=None):
        """out[N, M] = x[N, K] @ w[M, K]^T, float32 accumulation: gemv_rows (layers.cu) for N <= 8, else
        cublasGemmEx with CUBLAS_COMPUTE_32F (class Cublas); a quantized w through cuda_quant.QuantKernels."""
        cp = self.cp
        x = cp.ascontiguousarray(x)
        n, k = int(x.shape[0]), int(x.shape[1])
        m = int(w.shape[0])
        if out is None:
            out = cp.empty((n, m), out_dtype)
        if n == 0:
            return out
        if isinstance(w, (DeviceQuant, DeviceRowStack)):
            self.quant.gemm(x, w, out)
            return out
        if self.gemm_path(n, k) == "gemv":
            self._gemv_rows(x, w, out, m, k)
            return out
        self.blas.gemm_nt(x, w, out)
        return out

    def gate_up_silu(self, h, w, out=None):
        """silu(h @ Wg^T) * (h @ Wu^T) [N, I] fp16 for the row-fused w = [Wg; Wu] [2I, K]. Decode rows (the
        GEMV paths: gemv_rows, or quant_gemv_split for a split weight) in one kernel that applies SiLU-and-multiply
        to its float32 sums; otherwise (cuBLAS, the q4_K / q6_K block kernels, a RowStack) `linear` + `silu_mul`.
        Reference: reference/layers.silu_mul_ref(h @ w^T)."""
        cp = self.cp
        h = cp.ascontiguousarray(h)
        n, k = int(h.shape[0]), int(h.shape[1])
        inter = int(w.shape[0]) // 2
        out = cp.empty((n, inter), cp.float16) if out is None else out
        fused = False
        if self.fuse_silu and isinstance(w, DeviceQuant):
            fused = self.quant.gate_up_silu(h, w, out)  # split weights only
        elif self.fuse_silu and not isinstance(w, DeviceRowStack) and self.gemm_path(n, k) == "gemv":
            self._gemv_rows(h, w, out, inter, k, silu=True)
            fused = True
        return out if fused else self.silu_mul(self.linear(h, w), out=out)

    def _spreads(self, w, n: int) -> bool:
        """Whether the spread norm runs around the GEMV of n rows of w: on, one row, a split weight."""
        return self.spread_norm and n == 1 and isinstance(w, DeviceQuant) and w.split is not None

    def linear_add(self, x, w, residual):
        """One row of a split weight with the spread norm on: res += fp16(x @ w^T) in the GEMV's epilogue, each block
        leaving its sum of squares for the next norm (Added); otherwise `linear`, the add left to that norm.
        Reference: reference/layers.rmsnorm_ref's residual add of the plain product."""
        if residual is None or not self._spreads(w, int(x.shape[0])):
            return self.linear(x, w), residual
        res = self.cp.ascontiguousarray(residual, dtype=self.cp.float32)
        return self.quant.linear_add(self.cp.ascontiguousarray(x), w, res), res

    def _stream_only(self, residual):
        """x for the composed norm over a stream that already holds the projection (an Added whose consumer has no
        spread kernel): zeros, so that add_rmsnorm's sum is the stream itself, bit for bit."""
        return self.cp.zeros(residual.shape, self.cp.float16)

    def rmsnorm_linear(self, x, residual, norm_w, eps, w, bias=None, silu=False):
        """Decode rows of an fp16 weight: the residual add and RMSNorm in the prologue of gemv_rows (NORM: no
        add_rmsnorm launch), the residual stream returned in a new float32 array. Everything else (packed
        weights, whose split GEMV measured slower with the norm in its prologue: docs/ARCHITECTURE.md; cuBLAS
        rows; N * K halves past NORM_SMEM) and LSERVE_CUDA_FUSE_NORM=0: add_rmsnorm, then `linear` /
        `gate_up_silu`. After linear_add's Added: gate_up's spread norm kernel (one launch; anything else
        composes). Reference: that composition of reference/layers.rmsnorm_ref and the product."""
        cp = self.cp
        if isinstance(x, Added):
            if silu and self.fuse_silu and self._spreads(w, 1):
                out = cp.empty((1, int(w.shape[0]) // 2), cp.float16)
                self.quant.gate_up_norm(x, residual, norm_w, eps, w, out)
                return out, residual
            x = self._stream_only(residual)
        n, k = int(x.shape[0]), int(x.shape[1])
        rows = int(w.shape[0]) // 2 if silu else int(w.shape[0])
        norm = None
        if self.fuse_silu or not silu:
            norm = self._prologue_norm(x, residual, norm_w, eps, w, self.gemv_slices(rows, k), silu)
        if norm is None:
            return norm_then_linear(self, x, residual, norm_w, eps, w, bias, silu)
        x = cp.ascontiguousarray(x)
        out = cp.empty((n, rows), cp.float16)
        self._gemv_rows(x, w, out, rows, k, silu=silu, norm=norm)
        if bias is not None:
            out += bias
        return out, norm.res_out

    def _prologue_norm(self, x, residual, norm_w, eps, w, slices: int, pairs: bool) -> RmsIn | None:
        """The residual add + RMSNorm for the prologue of the decode gemv_rows of `w` at `slices` warps a row (`pairs`:
        two rows a warp, gate/up or RoPE), with its fresh residual stream; None where it does not go there
        (LSERVE_CUDA_FUSE_NORM=0, not an fp16 gemv_rows launch, N * K halves past NORM_SMEM)."""
        cp = self.cp
        n, k = int(x.shape[0]), int(x.shape[1])
        fits = isinstance(w, cp.ndarray) and self.gemm_path(n, k) == "gemv"
        if not (self.fuse_norm and fits and gemv_rows_smem(n, k, slices, pairs, True) <= NORM_SMEM):
            return None
        res_in = None if residual is None else cp.ascontiguousarray(residual, dtype=cp.float32)
        return RmsIn(res_in, cp.empty((n, k), cp.float32), norm_w, eps)

    def fuses_qkv_rope(self, x, w, positions, slots, cache: KVCache) -> bool:
        """Whether qkv_rope writes RoPE and the K/V rows in the GEMV's epilogue for these arguments (else it takes
        `norm_qkv_rope`): a gemv_rows or split GEMV of at most `fuse_rope_rows` rows, int64 positions and slots, an
        fp16 cache or (with `fuse_rope_quant`, at QUANT_ROPE_ROWS) a quantized one."""
        n, k, m, d = int(x.shape[0]), int(x.shape[1]), int(w.shape[0]), cache.head_dim
        split = isinstance(w, DeviceQuant) and w.split is not None
        dense = isinstance(w, self.cp.ndarray) and self.gemm_path(n, k) == "gemv"
        quant = cache.quantized and n in QUANT_ROPE_ROWS and self.fuse_rope_quant and m // d <= ROPE_TICKETS
        return (0 < n <= self.fuse_rope_rows and (quant or not cache.quantized) and (split or dense)
                and positions.dtype == self.cp.int64 and slots.dtype == self.cp.int64)  # fmt: skip

    def qkv_rope(self, x, residual, norm_w, eps, w, bias, positions, slots, cache: KVCache, layer: int, rope):
        """Decode rows into a cache (dense, or LServe's two pools and page statistics; fp16, or a quantized format
        for one row): RoPE and the K/V page write in the epilogue of the q/k/v GEMV (gemv_rows with ROPE, the norm in
        its prologue where rmsnorm_linear fuses it; quant_gemv_split with ROPE after add_rmsnorm for a split
        weight): no rope_write_kv launch, no qkv array (a quantized cache's K / V heads pass through a stage the
        size of one). Everything else (`fuses_qkv_rope` false: cuBLAS rows, RowStacks, block formats, steps of more
        than `fuse_rope_rows` rows, quantized caches at more than one row): `norm_qkv_rope`. Reference:
        reference/layers.rope_write_kv(_sparse)_ref of rmsnorm_linear's product. After linear_add's Added, into an
        fp16 cache: the split GEMV's spread norm kernel (anything else composes)."""
        cp = self.cp
        if isinstance(x, Added):
            fused = self.fuses_qkv_rope(residual, w, positions, slots, cache)
            if fused and self._spreads(w, 1) and not cache.quantized:
                q, ro, _alive = self._rope_out(1, w, positions, slots, cache, layer, rope, bias)
                self.quant.qkv_rope_norm(x, residual, norm_w, eps, w, ro)
                return q, residual
            x = self._stream_only(residual)
        if not self.fuses_qkv_rope(x, w, positions, slots, cache):
            return norm_qkv_rope(
                self, x, residual, norm_w, eps, w, bias, positions, slots, cache, layer, rope
            )
        n, k, m = int(x.shape[0]), int(x.shape[1]), int(w.shape[0])
        split = isinstance(w, DeviceQuant) and w.split is not None
        q, ro, _alive = self._rope_out(n, w, positions, slots, cache, layer, rope, bias)
        norm = self._prologue_norm(x, residual, norm_w, eps, w, self.gemv_slices(m, k), True)  # fp16 w only
        if norm is not None:
            self._gemv_rows(cp.ascontiguousarray(x), w, q, m // 2, k, norm=norm, rope=ro)
            return q, norm.res_out
        h, residual = self.add_rmsnorm(x, residual, norm_w, eps)
        if split:
            self.quant.qkv_rope(h, w, ro)
        else:
            self._gemv_rows(h, w, q, m // 2, k, rope=ro)
        return q, residual

    def _rope_out(self, n: int, w, positions, slots, cache: KVCache, layer: int, rope, bias) -> tuple:
        """(q [n, Hq, D] to fill, the RopeOut argument of a fused q/k/v launch, the arrays its pointers name: keep
        them alive until the launch)."""
        cp, m, d = self.cp, int(w.shape[0]), cache.head_dim
        quant = cache.quantized
        hq = m // d - 2 * cache.kv_heads(layer)
        q = cp.empty((n, hq, d), cp.float16)
        pos, slots = cp.ascontiguousarray(positions), cp.ascontiguousarray(slots)
        stage = cp.empty((n, m // d, d), cp.float16) if quant else None
        ro = rope_out(
            pos, slots, rope, q, cache, layer, bias, hq, stage, self._rope_tickets if quant else None
        )
        return q, ro, (pos, slots, stage)

    def silu_mul(self, gate_up, out=None):
        """Reference: reference/layers.silu_mul_ref."""
        cp = self.cp
        n, inter = int(gate_up.shape[0]), int(gate_up.shape[1]) // 2
        out = cp.empty((n, inter), cp.float16) if out is None else out
        vec = 8 if inter % 8 == 0 else 1
        total = n * inter // vec
        if total:
            self.k[f"silu_mul<{vec}>"](
                (-(-total // 256),),
                (256,),
                (cp.ascontiguousarray(gate_up), out, np.int32(inter), np.int64(total)),
            )
        return out

    def rope_write_kv(self, qkv, positions, slots, cache: KVCache, layer: int, rope, out=None):
        """Reference: reference/layers.rope_write_kv_ref; LServe caches (`slots` [2, N]: dense-pool, streaming-pool slots):
        rope_write_kv_sparse_ref, with the page statistics update fused. Negative slots write no K/V
        (padding rows of a captured batch)."""
        cp = self.cp
        if cache.sparse:
            return self._rope_write_kv_sparse(qkv, positions, slots, cache, layer, rope, out)
        kc, vc = cache.k[layer], cache.v[layer]
        hkv, page, d = int(kc.shape[1]), int(kc.shape[2]), cache.head_dim
        n = int(qkv.shape[0])
        hq = int(qkv.shape[1]) // d - 2 * hkv
        q = cp.empty((n, hq, d), cp.float16) if out is None else out
        ksc, vsc, _, _ = _scale_args(cache, layer)
        if n:
            had = cache.rotates_keys
            args = (cp.ascontiguousarray(qkv), positions, slots, rope[0], rope[1], q, kc, vc, ksc, vsc,
                    np.int32(hq), np.int32(hkv), np.int32(d), np.int32(page), np.int32(had))  # fmt: skip
            grid = rope_grid(n, hq, hkv, d, cache.quantized, hadamard=had)
            self.k[f"rope_write_kv<{kv_trait(cache)}>"](*grid, args)
        return q

    def _rope_write_kv_sparse(self, qkv, positions, slots, cache: KVCache, layer: int, rope, out=None):
        cp = self.cp
        kd, vd, ks, vs = cache.k[layer], cache.v[layer], cache.ks[layer], cache.vs[layer]
        hc, hs = cache.head_class[layer], cache.head_slot[layer]
        hkv = int(hc.shape[0])
        nd, ns = int(kd.shape[1]), int(ks.shape[1])
        page, d = int(kd.shape[2]), cache.head_dim
        n = int(qkv.shape[0])
        hq = int(qkv.shape[1]) // d - 2 * hkv
        q = cp.empty((n, hq, d), cp.float16) if out is None else out
        stats = cache.kmax is not None and nd > 0
        kmax = cache.kmax[layer] if stats else np.uint64(0)
        kmin = cache.kmin[layer] if stats else np.uint64(0)
        sub = int(cache.kmax[layer].shape[2]) if stats else 1
        if n:
            had = cache.rotates_keys
            args = (cp.ascontiguousarray(qkv), positions, cp.ascontiguousarray(slots), rope[0], rope[1], q,
                    kd, vd, ks, vs, *_scale_args(cache, layer), hc, hs, kmax, kmin, np.int32(hq), np.int32(hkv),
                    np.int32(nd), np.int32(ns), np.int32(d), np.int32(page), np.int32(sub), np.int32(n),
                    np.int32(had))  # fmt: skip
            kernel = self.k[f"rope_write_kv_sparse<{kv_trait(cache)}>"]
            kernel(*rope_grid(n, hq, hkv, d, cache.quantized, stats, had), args)
        return q

    def attention(self, q, cache: KVCache, layer: int, plan, head_class, out=None):
        """Reference: reference/attention.paged_attention_ref (dense cache), paged_attention_sparse_ref (LServe cache: two
        pools, per-block windows, selected pages). Returns [N, Hq * D] float16."""
        from .cuda_attention import paged_attention

        quant = dict(scales=cache.scales(layer), kv=cache.fmt.name) if cache.quantized else {}
        if not cache.sparse:
            o = paged_attention(q, cache.k[layer], cache.v[layer], plan, head_class, out=out, **quant)
            return o.reshape(q.shape[0], -1)
        pools = dict(ks=cache.ks[layer], vs=cache.vs[layer], head_slot=cache.head_slot[layer], **quant)
        sel = dict(sel_idx=cache.sel_idx[layer], sel_cnt=cache.sel_cnt[layer]) if plan.selects else {}
        o = paged_attention(
            q, cache.k[layer], cache.v[layer], plan, cache.head_class[layer], out=out, **pools, **sel
        )
        part = plan.decode_part
        if part is not None:  # selecting decode rows of a mixed step, with their page selection
            paged_attention(q, cache.k[layer], cache.v[layer], part, cache.head_class[layer], out=o, decode=True,
                            **pools, **sel)  # fmt: skip
        return o.reshape(q.shape[0], -1)

    def logits(self, h, lm_head, out=None):
        """float32 logits (float16 inputs, float32 accumulation and output). A quantized head's decode GEMV
        rounds the activations to int8 in two passes (x, then its residual) into its float32 output, as the
        CPU's cpu_quant.logits_q."""
        return self.gemm(h, lm_head, self.cp.float32, out=out)

    def sample(self, logits, seqs: list) -> list[int]:
        """Reference: backends/reference/sampling.py. Only the token ids come back to the host."""
        return self.sampler.sample(logits, seqs)

    def sample_async(self, logits, seqs: list, out=None):
        """`sample` whose ids stay on the device (cuda_sampling.DeviceTokens; in `out` when given); no host
        synchronization."""
        return self.sampler.sample_async(logits, seqs, out)

    def logprobs(self, logits, chosen: np.ndarray, k: int):
        """Reference: backends/reference/sampling.logprobs_ref. Only the requested numbers come back."""
        return self.sampler.logprobs(logits, chosen, k)
