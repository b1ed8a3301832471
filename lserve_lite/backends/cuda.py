"""CUDA backend: CuPy arrays in float16, cuBLAS GEMMs with float32 accumulation, our kernels for the rest.

Kernels: kernels/layers.cu (embedding gather, residual add + RMSNorm, RoPE + K/V page write, SiLU-and-multiply),
kernels/attention_*.cu (through cuda_attention.py), kernels/sampling.cu (through cuda_sampling.py).
Each launcher below names its CPU reference in cpu.py. The residual stream is kept in float32; everything
else that crosses kernels (activations, weights, K/V pages) is float16. Logits come out as float32.

Nothing here synchronizes with the host except `to_numpy`, `sample` and `kv_budget_bytes`, so a decode
forward can be captured in a CUDA Graph (engine/cuda_graph.py).
"""

from __future__ import annotations

import os

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..sparse.plan import AttentionPlan
from .base import KVCache
from .cuda_compile import load_module

FP16_MAX = 65504.0
LAYER_KERNELS = (
    "embed_gather<1>",
    "embed_gather<8>",
    "add_rmsnorm<false>",
    "add_rmsnorm<true>",
    "rope_write_kv",
    "rope_write_kv_sparse",
    "silu_mul<1>",
    "silu_mul<8>",
    *(f"gemv_rows<{n}, {t}>" for t in ("__half", "float") for n in range(1, 9)),
)
GEMV_MAX_ROWS = 8


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


def _threads(n: int, cap: int = 1024) -> int:
    """A block size for `n` elements per row: a multiple of 32, at most `cap`."""
    return int(min(cap, max(32, -(-n // 32) * 32)))


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
        """out[N, M] = x[N, K] @ w[M, K]^T (float16 inputs, float16 or float32 out, float32 compute)."""
        n, k = x.shape
        m = w.shape[0]
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
                x.data.ptr, self.R_16F, k, self._pzero, out.data.ptr, rc, m, self.COMPUTE_32F, self.GEMM_DEFAULT,
            ),
            "cublasGemmEx",
        )  # fmt: skip


class CudaOps:
    """float16 CuPy implementation of the Ops interface (sm_80 and newer)."""

    name = "cuda"
    dtype = np.float16

    def __init__(self, device: int | None = None):
        import cupy as cp
        from cupy_backends.cuda.api import runtime

        from .cuda_sampling import GpuSampler

        self.cp, self._runtime = cp, runtime
        if device is not None:
            cp.cuda.Device(device).use()
        self.device = cp.cuda.Device()
        mod = load_module("layers.cu", LAYER_KERNELS)
        self.k = {n: mod.get_function(n) for n in LAYER_KERNELS}
        self.sampler = GpuSampler()
        self.blas = Cublas(cp)
        self._plans: dict[tuple[int, int, int], object] = {}  # eager device plans by capacity bucket
        self._decode_parts: dict[tuple[int, int, int], object] = {}  # decode rows of mixed steps, likewise
        # Decode-sized GEMMs (<= 8 rows) through our GEMV kernel instead of cuBLAS; LSERVE_CUDA_GEMV=0 turns it off.
        self.small_gemv = os.environ.get("LSERVE_CUDA_GEMV", "1") != "0"

    # -- data movement ------------------------------------------------------------------------
    def upload(self, a, name: str | None = None):
        """Floats become float16 (checked), integers keep their dtype. Device arrays pass through."""
        cp = self.cp
        if isinstance(a, cp.ndarray):
            return a if a.dtype.kind != "f" or a.dtype == np.float16 else a.astype(np.float16)
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = to_fp16(a, name)
        return cp.asarray(np.ascontiguousarray(a))

    def check_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Raise ModelLoadError naming the first float tensor that float16 cannot hold."""
        for name, w in weights.items():
            if w.dtype.kind == "f" and w.dtype != np.float16 and w.size:
                if not (max(float(np.max(w)), -float(np.min(w))) <= FP16_MAX):
                    to_fp16(w, name)  # raises with the tensor's name

    def to_numpy(self, a) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        out = self.cp.asnumpy(a)
        return out.astype(np.float32) if out.dtype == np.float16 else out

    def kv_budget_bytes(self, fraction: float, reserved: int = 0) -> int:
        """`fraction` of the device memory free now (CuPy's cached free blocks count as free), less
        `reserved` bytes still to be uploaded (the weights) and 1 GiB for activations, cuBLAS and graphs."""
        free, _total = self._runtime.memGetInfo()
        free += self.cp.get_default_memory_pool().free_bytes()
        return max(0, int((free - reserved) * fraction) - (1 << 30))

    def alloc_kv(self, cfg: ModelConfig, num_pages: int, page_size: int) -> KVCache:
        cp = self.cp
        shape = (num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
        # Zeroed once: pages never written may still be read (masked) by a kernel, and must not hold NaN.
        k = [cp.zeros(shape, cp.float16) for _ in range(cfg.num_layers)]
        v = [cp.zeros(shape, cp.float16) for _ in range(cfg.num_layers)]
        return KVCache(k=k, v=v, page_size=page_size, num_pages=num_pages)

    def alloc_sparse_kv(self, cfg: ModelConfig, layout, num_pages: int, num_stream_pages: int, max_seqs: int):
        """LServe KV memory (reference: CpuOps.alloc_sparse_kv): per layer a dense pool [P, nd, page, D], a
        streaming pool [Ps, ns, page, D], fp16 key statistics [P, nd, sub_pages, D] (exact: keys are fp16) and
        the selection buffers sel_idx [max_seqs, Hkv, budget + 1] / sel_cnt [max_seqs, Hkv] (int32)."""
        cp = self.cp
        ps, d, L = layout.page_size, cfg.head_dim, cfg.num_layers
        nd = [layout.num_dense(i) for i in range(L)]
        ns = [layout.num_streaming(i) for i in range(L)]
        cap = layout.select_pages + 1
        z = lambda shape, dt=cp.float16: cp.zeros(shape, dt)  # noqa: E731  (zeroed: never NaN when read masked)
        stats = layout.sub_pages > 0
        return KVCache(
            k=[z((num_pages, n, ps, d)) for n in nd],
            v=[z((num_pages, n, ps, d)) for n in nd],
            page_size=ps,
            num_pages=num_pages,
            ks=[z((num_stream_pages, n, ps, d)) for n in ns],
            vs=[z((num_stream_pages, n, ps, d)) for n in ns],
            head_class=[cp.asarray(np.asarray(c, np.int32)) for c in layout.head_class],
            head_slot=[cp.asarray(np.asarray(s, np.int32)) for s in layout.head_slot],
            kmax=[z((num_pages, n, layout.sub_pages, d)) for n in nd] if stats else None,
            kmin=[z((num_pages, n, layout.sub_pages, d)) for n in nd] if stats else None,
            sel_idx=[z((max_seqs, cfg.num_kv_heads, cap), cp.int32) for _ in range(L)],
            sel_cnt=[z((max_seqs, cfg.num_kv_heads), cp.int32) for _ in range(L)],
        )

    def select_pages(self, q, cache: KVCache, layer: int, plan) -> None:
        """Reference: select_pages_ref. On the device (page_select.cu), no host synchronization."""
        from .cuda_attention import select_pages

        if cache.kmax is None:
            return
        select_pages(
            q, cache.kmax[layer], cache.kmin[layer], plan, cache.head_class[layer], cache.head_slot[layer],
            cache.sel_idx[layer], cache.sel_cnt[layer],
        )  # fmt: skip

    def prepare_plan(self, plan: AttentionPlan):
        """Upload the host plan into a device plan (cuda_attention.CudaPlan) reused across steps.

        Plans are kept per capacity bucket (powers of two of query blocks, pages and sequences), so a step
        reuses buffers sized within 2x of its needs (the decode kernel's grid follows the capacity).
        """

        dplan = self._bucket(self._plans, plan).update(plan)
        dplan.decode_part = None
        if plan.selects and int(plan.qb_len.max()) > 1:
            # Decode rows that select pages, mixed into a prefill step: the prefill kernel has no page
            # selection, so these rows are recomputed by the decode kernel on their own sub-plan.
            part = plan.subset(np.nonzero((plan.qb_len == 1) & (plan.qb_keep > 0))[0])
            dplan.decode_part = self._bucket(self._decode_parts, part).update(part)
        return dplan

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
    def embed(self, table, ids, out=None):
        """Reference: CpuOps.embed (table[ids])."""
        n, hidden = int(ids.shape[0]), int(table.shape[1])
        out = self.cp.empty((n, hidden), self.cp.float16) if out is None else out
        if n:
            vec = 8 if hidden % 8 == 0 else 1
            self.k[f"embed_gather<{vec}>"](
                (n,), (_threads(hidden // vec, 256),), (table, ids, out, np.int32(hidden))
            )
        return out

    def add_rmsnorm(self, x, residual, w, eps, out=None, res_out=None):
        """Reference: CpuOps.add_rmsnorm. Residual stream in float32 (updated in place when given)."""
        cp = self.cp
        x = cp.ascontiguousarray(x)
        n, hidden = int(x.shape[0]), int(x.shape[1])
        out = cp.empty((n, hidden), cp.float16) if out is None else out
        if residual is None:
            res_out = cp.empty((n, hidden), cp.float32) if res_out is None else res_out
            res_in, kern = res_out, self.k["add_rmsnorm<false>"]  # res_in unread
        else:
            res_in = res_out = cp.ascontiguousarray(residual, dtype=cp.float32)
            kern = self.k["add_rmsnorm<true>"]
        if n:
            kern(
                (n,),
                (_threads(hidden, 512),),
                (x, res_in, res_out, w, out, np.int32(hidden), np.float32(eps)),
            )
        return out, res_out

    def linear(self, x, w, bias=None, out=None):
        """x [N, K] @ w[M, K]^T through cuBLAS (float16 in and out, float32 accumulation)."""
        y = self.gemm(x, w, self.cp.float16, out=out)
        if bias is not None:
            y += bias
        return y

    def gemm_path(self, n: int, k: int) -> str:
        return "gemv" if self.small_gemv and 0 < n <= GEMV_MAX_ROWS and k % 8 == 0 else "cublas"

    def gemm(self, x, w, out_dtype, out=None):
        """out[N, M] = x[N, K] @ w[M, K]^T, float32 accumulation: gemv_rows (layers.cu) for N <= 8, else
        cublasGemmEx with CUBLAS_COMPUTE_32F (class Cublas)."""
        cp = self.cp
        x = cp.ascontiguousarray(x)
        n, k = int(x.shape[0]), int(x.shape[1])
        m = int(w.shape[0])
        if out is None:
            out = cp.empty((n, m), out_dtype)
        if n == 0:
            return out
        if self.gemm_path(n, k) == "gemv":
            t = "__half" if out.dtype == np.float16 else "float"
            self.k[f"gemv_rows<{n}, {t}>"]((-(-m // 8),), (256,), (x, w, out, np.int32(m), np.int32(k)))
            return out
        self.blas.gemm_nt(x, w, out)
        return out

    def silu_mul(self, gate_up, out=None):
        """Reference: silu_mul_ref."""
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
        """Reference: rope_write_kv_ref; LServe caches (`slots` [2, N]: dense-pool, streaming-pool slots):
        rope_write_kv_sparse_ref, with the page statistics update fused. Negative slots write no K/V
        (padding rows of a captured batch)."""
        cp = self.cp
        if cache.sparse:
            return self._rope_write_kv_sparse(qkv, positions, slots, cache, layer, rope, out)
        kc, vc = cache.k[layer], cache.v[layer]
        _, hkv, page, d = kc.shape
        n = int(qkv.shape[0])
        hq = int(qkv.shape[1]) // d - 2 * hkv
        q = cp.empty((n, hq, d), cp.float16) if out is None else out
        if n:
            args = (cp.ascontiguousarray(qkv), positions, slots, rope[0], rope[1], q, kc, vc,
                    np.int32(hq), np.int32(hkv), np.int32(d), np.int32(page))  # fmt: skip
            self.k["rope_write_kv"]((n,), (_threads((hq + 2 * hkv) * d // 2, 512),), args)
        return q

    def _rope_write_kv_sparse(self, qkv, positions, slots, cache: KVCache, layer: int, rope, out=None):
        cp = self.cp
        kd, vd, ks, vs = cache.k[layer], cache.v[layer], cache.ks[layer], cache.vs[layer]
        hc, hs = cache.head_class[layer], cache.head_slot[layer]
        hkv = int(hc.shape[0])
        nd, ns = int(kd.shape[1]), int(ks.shape[1])
        page, d = int(kd.shape[2]), int(kd.shape[3])
        n = int(qkv.shape[0])
        hq = int(qkv.shape[1]) // d - 2 * hkv
        q = cp.empty((n, hq, d), cp.float16) if out is None else out
        stats = cache.kmax is not None and nd > 0
        kmax = cache.kmax[layer] if stats else np.uint64(0)
        kmin = cache.kmin[layer] if stats else np.uint64(0)
        sub = int(cache.kmax[layer].shape[2]) if stats else 1
        if n:
            args = (cp.ascontiguousarray(qkv), positions, cp.ascontiguousarray(slots), rope[0], rope[1], q,
                    kd, vd, ks, vs, hc, hs, kmax, kmin, np.int32(hq), np.int32(hkv), np.int32(nd),
                    np.int32(ns), np.int32(d), np.int32(page), np.int32(sub), np.int32(n))  # fmt: skip
            self.k["rope_write_kv_sparse"]((n,), (_threads((hq + 2 * hkv) * d, 512),), args)
        return q

    def attention(self, q, cache: KVCache, layer: int, plan, head_class, out=None):
        """Reference: paged_attention_ref (dense cache), paged_attention_sparse_ref (LServe cache: two
        pools, per-block windows, selected pages). Returns [N, Hq * D] float16."""
        from .cuda_attention import paged_attention

        if not cache.sparse:
            o = paged_attention(q, cache.k[layer], cache.v[layer], plan, head_class, out=out)
            return o.reshape(q.shape[0], -1)
        pools = dict(ks=cache.ks[layer], vs=cache.vs[layer], head_slot=cache.head_slot[layer])
        sel = dict(sel_idx=cache.sel_idx[layer], sel_cnt=cache.sel_cnt[layer]) if plan.selects else {}
        o = paged_attention(
            q, cache.k[layer], cache.v[layer], plan, cache.head_class[layer], out=out, **pools, **sel
        )
        part = getattr(plan, "decode_part", None)
        if part is not None:  # selecting decode rows of a mixed step, with their page selection
            paged_attention(q, cache.k[layer], cache.v[layer], part, cache.head_class[layer], out=o, decode=True,
                            **pools, **sel)  # fmt: skip
        return o.reshape(q.shape[0], -1)

    def logits(self, h, lm_head, out=None):
        """float32 logits straight from cuBLAS (float16 inputs, float32 accumulation and output)."""
        return self.gemm(h, lm_head, self.cp.float32, out=out)

    def sample(self, logits, seqs: list) -> list[int]:
        """Reference: engine/sampler.py. Only the token ids come back to the host."""
        return self.sampler.sample(logits, seqs)
