"""Paged block-sparse attention on NVIDIA GPUs: launchers for kernels/attention_prefill.cu and
kernels/attention_decode.cu. The reference they are tested against is `cpu.paged_attention_ref`.

- `CudaPlan`: an `AttentionPlan` in device buffers of fixed capacity (one int32 allocation), refreshed in
  place by `update()` with a single host-to-device copy from pinned memory, so a decode step captured in a
  CUDA Graph replays for any plan of the same capacity (the kernels read every count from the buffers).
- `paged_attention(q, k_cache, v_cache, plan, head_class)`: fp16 q [N, Hq, D], fp16 caches
  [pages, Hkv, page_size, D] -> fp16 [N, Hq * D]; fp32 softmax and accumulation. Prefill (flash attention
  on tensor cores over the listed pages only) or decode (flash-decoding: split-KV partials + combine).
"""

from __future__ import annotations

import math

import numpy as np

from ..sparse.plan import AttentionPlan
from .cuda_compile import load_module, nvrtc_check

PREFILL_SOURCE = "attention_prefill.cu"
DECODE_SOURCE = "attention_decode.cu"
KERNEL_OPTIONS: tuple[str, ...] = ()  # extra NVRTC options, the same at run time and in the CI compile check
HEAD_DIMS = (64, 128)
_THREADS = 128
_COMBINE_THREADS = 256
_META = 8  # nqb, num_tokens, sink, local, then spare
_LOG2E = 1.4426950408889634


def nvrtc_compile_check(source: str, arch: str) -> str:
    """Compile kernels/<source> (a file name, or a path whose name is used) for `arch` ("sm_80", "sm_90")
    through NVRTC with the run-time flags, no GPU needed; returns the log, raises RuntimeError on errors."""
    from pathlib import Path

    return nvrtc_check(Path(source).name, arch, options=KERNEL_OPTIONS)


# --------------------------------------------------------------------------------------------------------
# Compiled variants: key tile BN of the prefill kernel per (head dim, m16 tiles per warp), decode ring depth
# per head dim. Module-level so a benchmark can switch them; each must be instantiated in the .cu
# (measured choices: docs/PERF_attention.md).
PREFILL_BN = {(64, 1): 64, (64, 2): 64, (128, 1): 64, (128, 2): 64}
DECODE_STAGES = {64: 4, 128: 4}


# Shared-memory bytes (must match PrefillSmem / DecodeSmem in the .cu files; +256 for the in-kernel alignment)


def _prefill_smem(d: int, mt: int, bn: int) -> int:
    bm = 64 * mt
    return bm * d * 2 + 4 * bn * d * 2 + 2 * bn * 4 + bm * 4 + 256


def _decode_smem(d: int, stages: int) -> int:
    return 16 * d * 2 + (_THREADS // 32) * stages * 2 * 16 * d * 2 + 256


# --------------------------------------------------------------------------------------------------------


class CudaPlan:
    """Device copy of an `AttentionPlan`, in buffers of fixed capacity.

    Layout of the one int32 device buffer: meta[8] | qb_seq | qb_start | qb_len | qb_pos (max_qblocks each)
    | seq_ctx (max_seqs) | kv_indptr (2 * max_qblocks + 1) | kv_pl (max_pages pairs of physical page, logical
    page). `update()` copies the used prefix only (one async copy from pinned memory on the current stream).
    Host-side fields (`nqb`, `max_qb_len`, ...) describe the last plan uploaded.
    """

    def __init__(self, max_qblocks: int, max_pages: int, max_seqs: int | None = None):
        import cupy as cp

        self.max_qblocks = int(max_qblocks)
        self.max_pages = int(max_pages)
        self.max_seqs = int(max_seqs if max_seqs is not None else max_qblocks)
        cq, cs = self.max_qblocks, self.max_seqs
        offs, o = {}, 0
        for name, n in (
            ("meta", _META),
            ("qb_seq", cq),
            ("qb_start", cq),
            ("qb_len", cq),
            ("qb_pos", cq),
            ("seq_ctx", cs),
            ("kv_indptr", 2 * cq + 1),
        ):
            offs[name] = (o, o + n)
            o += n
        o += o & 1  # kv_pl is read as int2: 8-byte aligned
        offs["kv_pl"] = (o, o + 2 * self.max_pages)
        self._offs = offs
        self._size = o + 2 * self.max_pages
        self.buffer = cp.zeros(self._size, dtype=np.int32)
        cp.cuda.Stream.null.synchronize()  # the zero fill must not race with an update on another stream
        self._pinned_mem = cp.cuda.alloc_pinned_memory(self._size * 4)
        self._host = np.frombuffer(self._pinned_mem, np.int32, self._size)
        self._host[:] = 0
        self._copy_done = None  # event after the last upload: the pinned buffer is reused only after it
        for name, (a, b) in offs.items():
            setattr(self, name, self.buffer[a:b])
        self.kv_page, self.kv_lpage = self.kv_pl[0::2], self.kv_pl[1::2]
        self.nqb = self.num_tokens = self.max_qb_len = self.q_block = self.page_size = 0
        self.sink = self.local = 0
        self._workspace: dict = {}

    @classmethod
    def from_plan(cls, plan: AttentionPlan) -> CudaPlan:
        cp_ = cls(max(1, plan.num_qblocks), max(1, int(plan.kv_page.shape[0])), max(1, len(plan.seq_ctx)))
        return cp_.update(plan)

    def update(self, plan: AttentionPlan, stream=None) -> CudaPlan:
        """Upload `plan` into the fixed buffers (raises ValueError when it exceeds the capacity)."""
        import cupy as cp

        nqb, nnz, nseq = plan.num_qblocks, int(plan.kv_page.shape[0]), int(plan.seq_ctx.shape[0])
        if nqb > self.max_qblocks or nnz > self.max_pages or nseq > self.max_seqs:
            raise ValueError(
                f"plan ({nqb} query blocks, {nnz} pages, {nseq} sequences) exceeds the CudaPlan capacity "
                f"({self.max_qblocks}, {self.max_pages}, {self.max_seqs})"
            )
        ps = int(plan.page_size)
        if ps < 16 or ps > 1024 or ps & (ps - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {ps}")
        if plan.selects:
            raise ValueError("decode page selection is not on the CUDA backend yet (use backend='cpu')")
        self.selects = False
        if self._copy_done is not None:
            self._copy_done.synchronize()
        h, o = self._host, self._offs
        h[o["meta"][0] : o["meta"][0] + 4] = (nqb, plan.num_tokens, plan.sink, plan.local)
        for name in ("qb_seq", "qb_start", "qb_len", "qb_pos"):
            a = o[name][0]
            h[a : a + nqb] = getattr(plan, name)
        a = o["seq_ctx"][0]
        h[a : a + nseq] = plan.seq_ctx
        a = o["kv_indptr"][0]
        h[a : a + 2 * nqb + 1] = plan.kv_indptr
        a = o["kv_pl"][0]
        h[a : a + 2 * nnz : 2] = plan.kv_page
        h[a + 1 : a + 2 * nnz : 2] = plan.kv_lpage
        n = a + 2 * nnz
        stream = stream if stream is not None else cp.cuda.get_current_stream()
        self.buffer[:n].set(h[:n], stream=stream)
        self._copy_done = stream.record()
        self.nqb, self.num_tokens = nqb, int(plan.num_tokens)
        self.max_qb_len = int(plan.qb_len.max()) if nqb else 0
        self.q_block, self.page_size = int(plan.q_block), ps
        self.sink, self.local = int(plan.sink), int(plan.local)
        return self

    def workspace(self, name: str, size: int, dtype):
        """A device scratch buffer that only grows (stable pointers for CUDA Graph replay)."""
        import cupy as cp

        buf = self._workspace.get(name)
        if buf is None or buf.size < size:
            buf = cp.empty(size, dtype=dtype)
            self._workspace[name] = buf
        return buf[:size]


# --------------------------------------------------------------------------------------------------------


class _Kernels:
    """The compiled modules of the current device, loaded on first use."""

    def __init__(self):
        import cupy as cp

        self.prefill = load_module(PREFILL_SOURCE, options=KERNEL_OPTIONS)
        self.decode = load_module(DECODE_SOURCE, options=KERNEL_OPTIONS)
        self.num_sms = cp.cuda.Device().attributes["MultiProcessorCount"]
        self.smem_per_sm = cp.cuda.Device().attributes["MaxSharedMemoryPerMultiprocessor"]
        self._fns: dict = {}

    def get(self, module, name: str, smem: int):
        fn = self._fns.get(name)
        if fn is None:
            fn = module.get_function(name)
            if smem > 48 * 1024:
                fn.max_dynamic_shared_size_bytes = smem
            self._fns[name] = fn
        return fn


_kernels_by_device: dict[int, _Kernels] = {}


def _kernels() -> _Kernels:
    import cupy as cp

    dev = cp.cuda.Device().id
    k = _kernels_by_device.get(dev)
    if k is None:
        k = _kernels_by_device[dev] = _Kernels()
    return k


def _plan_args(plan: CudaPlan) -> tuple:
    return (
        plan.meta,
        plan.qb_seq,
        plan.qb_start,
        plan.qb_len,
        plan.qb_pos,
        plan.seq_ctx,
        plan.kv_indptr,
        plan.kv_pl,
    )


def decode_splits(plan: CudaPlan, hkv: int, head_tiles: int, d: int) -> int:
    """CTAs per (query block, KV head, head tile): fill the GPU once (all CTAs resident together)."""
    k = _kernels()
    per_sm = max(1, min(16, k.smem_per_sm // (_decode_smem(d, DECODE_STAGES[d]) + 1024)))
    slots = k.num_sms * per_sm
    pairs = max(1, plan.max_qblocks * hkv * head_tiles)
    return max(1, slots // pairs)


def paged_attention(
    q,
    k_cache,
    v_cache,
    plan: CudaPlan,
    head_class,
    out=None,
    *,
    decode: bool | None = None,
    num_splits: int | None = None,
):
    """Block-sparse paged attention executing `plan` (see `cpu.paged_attention_ref`); returns out [N, Hq*D].

    q: fp16 [N, Hq, D]; k_cache, v_cache: fp16 [num_pages, Hkv, page_size, D]; head_class: int32 [Hkv] on
    the device (0 dense, 1 streaming). `decode=None` picks the decode kernel when every query block has one
    row; pass `decode=True` when capturing a decode step in a CUDA Graph (only row 0 of each query block is
    computed then). `num_splits` (decode) overrides the CTAs per (query block, KV head); keep it fixed
    between capture and replay (the default depends only on the plan's capacity).
    """
    import cupy as cp

    n, hq, d = q.shape
    npages, hkv, ps, d2 = k_cache.shape
    if d != d2 or v_cache.shape != k_cache.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d} not compiled (have {HEAD_DIMS})")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if ps != plan.page_size:
        raise ValueError(f"cache page size {ps} != plan page size {plan.page_size}")
    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if a.dtype != np.float16 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float16 array")
    if not isinstance(head_class, cp.ndarray) or head_class.dtype != np.int32:
        head_class = cp.asarray(
            np.asarray(head_class, dtype=np.int32)
            if not isinstance(head_class, cp.ndarray)
            else head_class.astype(np.int32)
        )
    if out is None:
        out = cp.empty((n, hq * d), dtype=np.float16)
    group = hq // hkv
    scale_log2 = np.float32(_LOG2E / math.sqrt(d))
    ps_shift = np.int32(ps.bit_length() - 1)
    if decode is None:
        decode = plan.max_qb_len <= 1
    if plan.nqb == 0 and not decode:
        return out
    k = _kernels()
    if decode:
        head_tiles = -(-group // 16)
        splits = int(num_splits) if num_splits else decode_splits(plan, hkv, head_tiles, d)
        sw = splits * (_THREADS // 32)
        part_o = plan.workspace("part_o", plan.max_qblocks * hq * sw * d, np.float32)
        part_lse = plan.workspace("part_lse", plan.max_qblocks * hq * sw, np.float32)
        stages = DECODE_STAGES[d]
        smem = _decode_smem(d, stages)
        fn = k.get(k.decode, f"paged_attn_decode_d{d}_s{stages}", smem)
        fn(
            (splits, plan.max_qblocks, hkv * head_tiles),
            (_THREADS,),
            (
                q,
                k_cache,
                v_cache,
                part_o,
                part_lse,
                *_plan_args(plan),
                head_class,
                np.int32(hq),
                np.int32(hkv),
                ps_shift,
                np.int32(head_tiles),
                scale_log2,
            ),
            shared_mem=smem,
        )
        comb = k.get(k.decode, "paged_attn_decode_combine", 0)
        comb(
            (plan.max_qblocks, hq),
            (_COMBINE_THREADS,),
            (part_o, part_lse, out, plan.meta, plan.qb_start, np.int32(hq), np.int32(sw), np.int32(d)),
            shared_mem=(sw + 2 * (_COMBINE_THREADS // 32) * (1 + d // 2)) * 4,
        )
        return out
    # Prefill: BM = 64 * mt rows per CTA, packing `heads_per_cta` heads of `rows_per_head` rows each.
    qlen = plan.max_qb_len
    mt = 2 if qlen * group >= 128 else 1
    bm = 64 * mt
    rows_per_head = min(qlen, bm)
    heads_per_cta = bm // rows_per_head
    n_sub = -(-qlen // rows_per_head)
    hgroups = -(-group // heads_per_cta)
    bn = PREFILL_BN[(d, mt)]
    smem = _prefill_smem(d, mt, bn)
    fn = k.get(k.prefill, f"paged_attn_prefill_d{d}_m{mt}_n{bn}", smem)
    fn(
        (plan.nqb * n_sub, hkv * hgroups),
        (_THREADS,),
        (
            q,
            k_cache,
            v_cache,
            out,
            *_plan_args(plan),
            head_class,
            np.int32(hq),
            np.int32(hkv),
            ps_shift,
            np.int32(rows_per_head),
            np.int32(heads_per_cta),
            np.int32(n_sub),
            np.int32(hgroups),
            scale_log2,
        ),
        shared_mem=smem,
    )
    return out
