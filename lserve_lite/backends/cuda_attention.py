"""Paged block-sparse attention on NVIDIA GPUs: launchers for kernels/attention_prefill.cu and
kernels/attention_decode.cu. The references they are tested against: backends/reference/attention.py.

- `CudaPlan`: an `AttentionPlan` in device buffers of fixed capacity (one int32 allocation), refreshed in
  place by `update()` with a single host-to-device copy from pinned memory, so a decode step captured in a
  CUDA Graph replays for any plan of the same capacity (the kernels read every count from the buffers).
- `paged_attention(q, k_cache, v_cache, plan, head_class)`: fp16 q [N, Hq, D], fp16 caches
  [pages, Hkv, page_size, D] -> fp16 [N, Hq * D]; fp32 softmax and accumulation. Prefill (flash attention
  on tensor cores over the listed pages only) or decode (flash-decoding: split-KV partials, one per CTA, then a
  combine; with a single split the decode kernel writes the output and no combine runs).
  Quantized caches (int8 / int4 / fp8 values with fp16 scales, kv/quant.py) run the same kernels
  instantiated for their format (kernels/kv_quant.cuh), dequantizing in shared memory; decode by default
  dequantizes in registers straight into the mma fragments, with its own split count (`KVQ_DECODE = "v2"`;
  "v1", env `LSERVE_KVQ_DECODE=v1`, is the shared-memory path).
- Prefill on Hopper: kernels/attention_prefill_sm90.cu (wgmma, sm_90a) runs every cache format (fp16, and int8 /
  int4 / fp8: tiles staged as stored, dequantized by the CTA into the swizzled fp16 tiles the wgmmas read) of head
  dim 64 / 128 on compute capability 9.x; other devices run kernels/attention_prefill.cu (mma.sync). Its
  warp-specialized variant ("ws": a producer warpgroup streaming K/V tiles through an mbarrier ring, consumer
  warpgroups overlapping each tile's softmax with the previous tile's PV product) runs fp16 caches, and so does its
  TMA path ("tma": K/V tiles brought in by the tensor memory accelerator, backends/cuda_tma.py). `PREFILL_KERNEL`
  ("auto" | "mma" | "wgmma" | "ws" | "tma", env `LSERVE_PREFILL_KERNEL`) overrides the choice for tests and
  benchmarks.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import MASS_MAX_GROUP, env_choice, env_float
from ..kv.quant import FORMATS
from ..sparse.plan import AttentionPlan
from .cuda_compile import load_module
from .cuda_tma import pool_maps

PREFILL_SOURCE = "attention_prefill.cu"
PREFILL_SM90_SOURCE = "attention_prefill_sm90.cu"  # sm_90a only (cuda_compile.ARCH_SPECIFIC)
DECODE_SOURCE = "attention_decode.cu"
SELECT_SOURCE = "page_select.cu"
KERNEL_OPTIONS: tuple[str, ...] = ()  # extra NVRTC options, the same at run time and in the CI compile check
HEAD_DIMS = (64, 128)
# KV format -> the kernels' template argument (kernels/kv_quant.cuh); fp16 kernel names carry no suffix.
KV_TRAITS = {"fp16": "lskv::Half", "int8": "lskv::Int8", "int4": "lskv::Int4", "fp8": "lskv::Fp8"}
# The Hopper prefill kernel also takes bf16 queries, caches and output (`kv="bf16"`; arrays of uint16 holding bf16 bits:
# CuPy has no bfloat16 dtype); nothing else does.
SM90_TRAITS = {**KV_TRAITS, "bf16": "lskv::BHalf"}
_THREADS = 128
_COMBINE_THREADS = 256
_META = 8  # nqb, num_tokens, sink, local, group_reduce, then spare (PLAN_META in attention_common.cuh)
GROUP_REDUCE_CODE = {"max": 0, "mass": 1}  # plan meta[4], read by the selector kernels
_QB_FIELDS = (
    "qb_seq",
    "qb_start",
    "qb_len",
    "qb_pos",
    "qb_sink",
    "qb_local",
    "qb_slot",
    "qb_keep",
    "qb_refresh",
)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------------
# Compiled variants: key tile BN of the prefill kernel per (head dim, m16 tiles per warp), decode ring depth
# per head dim. Module-level so a benchmark can switch them; each must be instantiated in the .cu
# (measured choices: docs/PERF_attention.md).
PREFILL_BN = {(64, 1): 64, (64, 2): 64, (128, 1): 64, (128, 2): 64}
DECODE_STAGES = {64: 4, 128: 4}
# Decode: units of 16 keys a warp takes at least before a list is spread over another CTA (the kernel's
# min_units; the grid stays sized for the capacity, the CTAs a short list does not need exit at once). Read per
# call; LSERVE_DECODE_MIN_UNITS sets the initial value (1-4096).
DECODE_MIN_UNITS = int(env_float("LSERVE_DECODE_MIN_UNITS", 1, 1, 4096))
# ... and at most this many CTAs per (query block, KV head, head tile): a few KV heads at batch 1 (SmolLM2: 3) would
# otherwise get 132 CTAs each, most of them idle below long contexts (H200: 0.693 / 0.710 ms per SmolLM2 step at 512 /
# 4096 context with 64 against 0.699 / 0.730 with 132; docs/PERF_attention.md).
DECODE_MAX_SPLITS = 64
# Prefill kernel: "auto" (the wgmma kernel on compute capability 9.x for a head dim in SM90_HEAD_DIMS, mma.sync
# otherwise), "mma" (always attention_prefill.cu), "wgmma" (attention_prefill_sm90.cu wherever it applies) or "ws" (its
# warp-specialized variant for fp16 caches, measured slower, the wgmma kernel for quantized ones), "tma" (the wgmma
# kernel with fp16 K/V tiles brought in by TMA, measured equal; the plain wgmma kernel for quantized caches); every
# choice but "auto" and "mma" is an error on a device that is not 9.x. Read per call; the environment variable
# LSERVE_PREFILL_KERNEL sets the initial value.
PREFILL_KERNELS = ("auto", "mma", "wgmma", "ws", "tma")
PREFILL_KERNEL = env_choice("LSERVE_PREFILL_KERNEL", "auto", PREFILL_KERNELS)
SM90_ONLY = ("wgmma", "ws", "tma")
SM90_HEAD_DIMS = (64, 128)
# wgmma prefill: cp.async ring depth per (head dim, warpgroups per CTA, KV format); each must be instantiated in the
# .cu. Quantized formats: 2 as well, the ring of tiles as stored plus one fp16 K / V tile pair: two CTAs per SM at
# head dim 128 with two warpgroups (int8 / fp8 99 KiB each; 3 stages would take 115 KiB, one CTA per SM).
PREFILL_SM90_STAGES = {(d, w, kv): 2 for d in SM90_HEAD_DIMS for w in (1, 2) for kv in SM90_TRAITS}
# Warp-specialized prefill (fp16 caches): ring depth per (head dim, consumer warpgroups), as many stages as fit
# 227 KiB beside the Q tile (one CTA per SM); each must be instantiated in the .cu.
PREFILL_WS_STAGES = {(64, 1): 8, (64, 2): 8, (128, 1): 6, (128, 2): 5}
# The TMA path of the wgmma kernel (fp16 caches): ring depth per (head dim, warpgroups); each instantiated in the .cu.
PREFILL_TMA_STAGES = {(64, 1): 2, (64, 2): 2, (128, 1): 2, (128, 2): 2}
# Quantized decode: "v2" (register-level dequantization into the mma fragments; paged_attn_decode_v2_*), the
# default since the H200 measured it 2.6-3.6x faster than "v1" (dequantize each unit into an fp16 tile in shared
# memory, then ldmatrix; kept as the reference path the benchmarks compare with). Read per call, so tests and
# benchmarks can switch it; the environment variable LSERVE_KVQ_DECODE sets the initial value.
KVQ_DECODE_IMPLS = ("v1", "v2")
KVQ_DECODE = env_choice("LSERVE_KVQ_DECODE", "v2", KVQ_DECODE_IMPLS)
# Ring depth of v2 per format (both head dims; units of 16 keys, two per loop step). int4: 6, so that 3 CTAs fit an
# H200 SM at D 128 (66 KB; 8 stages took 88 KB and measured slower); int8: 6 (2 CTAs per SM: 2% faster than 4).
DECODE_V2_STAGES = {"int8": 6, "fp8": 4, "int4": 6}


# Shared-memory bytes (must match PrefillSmem / DecodeSmem in the .cu files; +256 for the in-kernel alignment)


def _prefill_smem(d: int, mt: int, bn: int, kv: str = "fp16") -> int:
    bm, tile = 64 * mt, bn * d * 2
    if kv == "fp16":
        return bm * d * 2 + 4 * tile + 2 * bn * 4 + bm * 4 + 256
    raw = bn * FORMATS[kv].row_bytes(d, 2)  # a tile as stored: values + fp16 scales
    return -(-(bm * d * 2 + 4 * raw) // 256) * 256 + 2 * tile + 2 * bn * 4 + bm * 4 + 256


def _prefill_sm90_smem(d: int, nwg: int, stages: int, kv: str = "fp16") -> int:
    """lsattn::sm90::Smem<D, NWG, STAGES, KV> (BN = 64) + 1024 for the in-kernel alignment to the 128-byte swizzle
    atom. Quantized: the ring holds tiles as stored (K and V alike), then one 1024-aligned fp16 K / V tile pair."""
    bm, bn, tile = 64 * nwg, 64, 64 * d * 2
    tail = stages * bn * 4 + bm * 4 + stages * 8 + 1024  # key and query positions, mbarriers, alignment
    if kv in ("fp16", "bf16"):
        return bm * d * 2 + 2 * stages * tile + tail
    raw = bn * FORMATS[kv].row_bytes(d, 2)  # a K tile as stored: values + fp16 scales
    return -(-(bm * d * 2 + 2 * stages * raw) // 1024) * 1024 + 2 * tile + tail


def _prefill_sm90_name(d: int, nwg: int, stages: int, kv: str = "fp16", load: str = "") -> str:
    """The wgmma kernel's entry point; `load` "tma" names the TMA path (fp16 caches)."""
    return f"paged_attn_prefill_sm90_d{d}_w{nwg}_s{stages}{_suffix(kv)}{'_' + load if load else ''}"


def _prefill_ws_smem(d: int, nc: int, stages: int) -> int:
    """lsattn::sm90::WsSmem<D, NC, STAGES> (BN = 64) + 1024 for the in-kernel alignment to the swizzle atom."""
    return 64 * nc * d * 2 + stages * (2 * 64 * d * 2 + 64 * 4 + 16) + 1024


def _prefill_ws_name(d: int, nc: int) -> str:
    return f"paged_attn_prefill_ws_d{d}_c{nc}_s{PREFILL_WS_STAGES[(d, nc)]}"


def prefill_kernel_for(d: int, kv: str, cc: str) -> str:
    """The prefill kernel, "mma", "wgmma", "ws" or "tma", that `PREFILL_KERNEL` selects for head dim d, cache
    format kv, on a device of compute capability cc ("90")."""
    choice = PREFILL_KERNEL
    if choice not in PREFILL_KERNELS:
        raise ValueError(
            f"LSERVE_PREFILL_KERNEL / PREFILL_KERNEL must be one of {PREFILL_KERNELS}, got {choice!r}"
        )
    hopper = str(cc).startswith("9")
    if kv == "bf16":  # the plain wgmma kernel only
        if not hopper or d not in SM90_HEAD_DIMS or choice not in ("auto", "wgmma"):
            raise ValueError(
                f"bf16 prefill runs the wgmma kernel only (compute capability 9.x, head dim in {SM90_HEAD_DIMS}); "
                f"here cc {cc}, head dim {d}, PREFILL_KERNEL={choice!r}"
            )
        return "wgmma"
    if choice in SM90_ONLY and not hopper:
        raise ValueError(
            f"PREFILL_KERNEL={choice!r} needs compute capability 9.x (sm_90a), this device is {cc}"
        )
    if choice == "mma" or not hopper or d not in SM90_HEAD_DIMS or kv not in KV_TRAITS:
        return "mma"
    return choice if choice in ("ws", "tma") and kv == "fp16" else "wgmma"


def _decode_smem(d: int, stages: int, kv: str = "fp16") -> int:
    unit, raw = 16 * d * 2, 16 * FORMATS[kv].row_bytes(d, 2)  # a unit as stored, K's or V's
    tiles = 0 if kv == "fp16" else 2 * unit
    return 16 * d * 2 + (_THREADS // 32) * (stages * 2 * raw + tiles) + 256


def _decode_v2_smem(d: int, stages: int, kv: str) -> int:
    """DecodeSmemV2: per warp, `stages` K and V units as stored (no fp16 tiles, no Q tile)."""
    return (_THREADS // 32) * stages * 16 * FORMATS[kv].kv_bytes(d, 2)


def _decode_v2_name(d: int, kv: str) -> str:
    """v2's entry point for head dim d and format kv."""
    return f"paged_attn_decode_v2_d{d}_s{DECODE_V2_STAGES[kv]}_{kv}"


def _suffix(kv: str) -> str:
    return "" if kv == "fp16" else f"_{kv}"


def launcher_kernels(source: str) -> tuple[str, ...]:
    """The entry points of `source` this launcher may ask for, every KV format (the CI compile check
    requires each to exist)."""
    kvs = [_suffix(kv) for kv in KV_TRAITS]
    if source == SELECT_SOURCE:
        return (*(f"page_score_d{d}" for d in HEAD_DIMS), "page_topk")
    if source == PREFILL_SM90_SOURCE:
        names = tuple(_prefill_sm90_name(d, w, st, kv) for (d, w, kv), st in PREFILL_SM90_STAGES.items())
        tma = tuple(_prefill_sm90_name(d, w, st, "fp16", "tma") for (d, w), st in PREFILL_TMA_STAGES.items())
        return (*names, *tma, *(_prefill_ws_name(d, nc) for d, nc in PREFILL_WS_STAGES))
    if source == PREFILL_SOURCE:
        return tuple(
            f"paged_attn_prefill_d{d}_m{mt}_n{bn}{s}" for (d, mt), bn in PREFILL_BN.items() for s in kvs
        )
    names = tuple(f"paged_attn_decode_d{d}_s{st}{s}" for d, st in DECODE_STAGES.items() for s in kvs)
    v2 = tuple(_decode_v2_name(d, kv) for d in DECODE_STAGES for kv in KV_TRAITS if kv != "fp16")
    return (*names, *v2, "paged_attn_decode_combine")


# --------------------------------------------------------------------------------------------------------


def plan_offsets(max_qblocks: int, max_seqs: int, max_pages: int) -> dict[str, tuple[int, int]]:
    """[start, end) of each field in a device plan buffer of this capacity (`plan_view` in
    attention_common.cuh computes the same from the capacity); the buffer size is offs["kv_pl"][1]."""
    cq, offs, o = max_qblocks, {}, 0
    for name, n in (
        ("meta", _META),
        *((f, cq) for f in _QB_FIELDS),
        ("seq_ctx", max_seqs),
        ("kv_indptr", 2 * cq + 1),
    ):
        offs[name] = (o, o + n)
        o += n
    o += o & 1  # kv_pl is read as int2: 8-byte aligned
    offs["kv_pl"] = (o, o + 2 * max_pages)
    return offs


def pack_plan(h: np.ndarray, offs: dict[str, tuple[int, int]], plan: AttentionPlan) -> int:
    """Write `plan` into the int32 host buffer `h` laid out by `offs`; returns the used prefix length."""
    nqb, nnz, nseq = plan.num_qblocks, int(plan.kv_page.shape[0]), int(plan.seq_ctx.shape[0])
    m = offs["meta"][0]
    h[m : m + 5] = (nqb, plan.num_tokens, plan.sink, plan.local, GROUP_REDUCE_CODE[plan.group_reduce])
    for name in _QB_FIELDS:
        a = offs[name][0]
        v = getattr(plan, name)
        h[a : a + nqb] = 0 if v is None else v
    a = offs["seq_ctx"][0]
    h[a : a + nseq] = plan.seq_ctx
    a = offs["kv_indptr"][0]
    h[a : a + 2 * nqb + 1] = plan.kv_indptr
    a = offs["kv_pl"][0]
    h[a : a + 2 * nnz : 2] = plan.kv_page
    h[a + 1 : a + 2 * nnz : 2] = plan.kv_lpage
    return a + 2 * nnz


class CudaPlan:
    """Device copy of an `AttentionPlan`, in buffers of fixed capacity.

    Layout of the one int32 device buffer (`plan_view` in attention_common.cuh reads it from the capacity):
    meta[8] | qb_seq | qb_start | qb_len | qb_pos | qb_sink | qb_local | qb_slot | qb_keep | qb_refresh
    (max_qblocks each) | seq_ctx (max_seqs) | kv_indptr (2 * max_qblocks + 1) | kv_pl (max_pages pairs of
    physical page, logical page). `update()` copies the used prefix only (one async copy from pinned memory
    on the current stream). `prefix_bytes` reserves device memory in front of the buffer (`prefix(dtype, shape)`)
    that `update(..., prefix=rows)` fills in the same copy: a captured decode step's token, position and slot
    rows ride with its plan (one host-to-device copy a step). Host-side fields (`nqb`, `max_qb_len`, `selects`,
    `refreshes`, ...) describe the last plan uploaded; `always_select` (CUDA Graphs) keeps `selects` and
    `refreshes` True so a captured step reads the selection and runs the selector (blocks without a budget or
    refresh flag skip it on the device); the graph executor's reuse graphs are captured with `refreshes` set
    False (no selector launches).
    """

    def __init__(
        self, max_qblocks: int, max_pages: int, max_seqs: int | None = None, *, always_select: bool = False,
        fixed_visit_pages: int | None = None, prefix_bytes: int = 0,
    ):  # fmt: skip
        """`always_select` and `fixed_visit_pages` are for CUDA Graphs: the captured step always runs the
        selector (blocks without a budget or refresh flag skip it on the device), and the decode split
        count (which depends on the longest page list) must not change between capture and replay."""
        import cupy as cp

        self.max_qblocks = int(max_qblocks)
        self.max_pages = int(max_pages)
        self.max_seqs = int(max_seqs if max_seqs is not None else max_qblocks)
        self._offs = offs = plan_offsets(self.max_qblocks, self.max_seqs, self.max_pages)
        self._size = offs["kv_pl"][1]
        self._pre = -(-prefix_bytes // 256) * 64  # int32 words before the plan (256-byte aligned)
        self._storage = cp.zeros(self._pre + self._size, dtype=np.int32)
        self.buffer = self._storage[self._pre :]
        cp.cuda.Stream.null.synchronize()  # the zero fill must not race with an update on another stream
        self._pinned_mem = cp.cuda.alloc_pinned_memory((self._pre + self._size) * 4)
        self._host_all = np.frombuffer(self._pinned_mem, np.int32, self._pre + self._size)
        self._host_all[:] = 0
        self._host = self._host_all[self._pre :]
        self._copy_done = None  # event after the last upload: the pinned buffer is reused only after it
        for name, (a, b) in offs.items():
            setattr(self, name, self.buffer[a:b])
        self.kv_page, self.kv_lpage = self.kv_pl[0::2], self.kv_pl[1::2]
        self.nqb = self.num_tokens = self.max_qb_len = self.q_block = self.page_size = 0
        self.sink = self.local = 0
        self.group_reduce = "max"
        self.selects = self.refreshes = False
        self.always_select = always_select
        self.visit_pages: int | None = None  # longest page list a decode head visits (None: unknown)
        self.fixed_visit_pages = fixed_visit_pages
        self.decode_part: CudaPlan | None = None  # selecting decode rows of a mixed step (prepare_plan)
        self._workspace: dict = {}

    @classmethod
    def from_plan(cls, plan: AttentionPlan) -> CudaPlan:
        cp_ = cls(max(1, plan.num_qblocks), max(1, int(plan.kv_page.shape[0])), max(1, len(plan.seq_ctx)))
        return cp_.update(plan)

    def prefix(self, dtype, shape: tuple[int, ...]):
        """The device memory reserved in front of the plan, as an array of `dtype` and `shape`."""
        words = -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 4)
        if words > self._pre:
            raise ValueError(
                f"prefix of {shape} {np.dtype(dtype).name} exceeds the {self._pre * 4} bytes reserved"
            )
        return self._storage[:words].view(dtype).reshape(shape)

    def update(
        self, plan: AttentionPlan, stream=None, decode_part: CudaPlan | None = None,
        prefix: np.ndarray | None = None, keep: int = 0,
    ) -> CudaPlan:  # fmt: skip
        """Upload `plan` into the fixed buffers (raises ValueError when it exceeds the capacity). `prefix`: the
        bytes of the reserved memory in front, uploaded in the same copy from byte `keep` on (the first `keep`
        bytes stay as the device holds them: token ids a sampling kernel wrote there)."""
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
        self.selects = self.always_select or plan.selects
        self.refreshes = self.always_select or plan.refreshes
        if self._copy_done is not None:
            self._copy_done.synchronize()
        n = pack_plan(self._host, self._offs, plan)
        stream = stream if stream is not None else cp.cuda.get_current_stream()
        lo = self._pre
        if prefix is not None:
            words = np.ascontiguousarray(prefix).view(np.int32).ravel()
            if words.size > self._pre or keep % 4 or not 0 <= keep <= words.size * 4:
                raise ValueError(
                    f"prefix of {words.size * 4} bytes (keep {keep}) in {self._pre * 4} reserved"
                )
            self._host_all[: words.size] = words
            lo = keep // 4
        self._storage[lo : self._pre + n].set(self._host_all[lo : self._pre + n], stream=stream)
        self._copy_done = stream.record()
        self.nqb, self.num_tokens = nqb, int(plan.num_tokens)
        self.max_qb_len = int(plan.qb_len.max()) if nqb else 0
        self.q_block, self.page_size = int(plan.q_block), ps
        self.sink, self.local = int(plan.sink), int(plan.local)
        self.group_reduce = plan.group_reduce
        self.visit_pages = plan.decode_visit_pages() if plan.selects else None
        self.decode_part = decode_part
        return self

    def workspace(self, name: str, size: int, dtype, zeroed: bool = False):
        """A device scratch buffer that only grows (stable pointers for CUDA Graph replay); `zeroed`: filled
        with zeros when (re)allocated, for state a kernel keeps and restores itself (counters)."""
        import cupy as cp

        buf = self._workspace.get(name)
        if buf is None or buf.size < size:
            buf = (cp.zeros if zeroed else cp.empty)(size, dtype=dtype)
            self._workspace[name] = buf
        return buf[:size]


# --------------------------------------------------------------------------------------------------------


class _Kernels:
    """The compiled modules of the current device, loaded on first use."""

    def __init__(self):
        import cupy as cp

        self.prefill = load_module(PREFILL_SOURCE, options=KERNEL_OPTIONS)
        self.decode = load_module(DECODE_SOURCE, options=KERNEL_OPTIONS)
        self.select = load_module(SELECT_SOURCE, options=KERNEL_OPTIONS)
        self.num_sms = cp.cuda.Device().attributes["MultiProcessorCount"]
        self.smem_per_sm = cp.cuda.Device().attributes["MaxSharedMemoryPerMultiprocessor"]
        self.cc = cp.cuda.Device().compute_capability
        self._prefill_sm90 = None
        self._fns: dict = {}

    @property
    def prefill_sm90(self):
        """attention_prefill_sm90.cu, compiled on first use (sm_90a devices only)."""
        if self._prefill_sm90 is None:
            self._prefill_sm90 = load_module(PREFILL_SM90_SOURCE, options=KERNEL_OPTIONS)
        return self._prefill_sm90

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
    return (plan.buffer, np.int32(plan.max_qblocks), np.int32(plan.max_seqs))


_arange_cache: dict = {}


def _arange(n: int):
    """Device int32 arange(n), cached (the head_slot of dense mode: pool 0 holds every head)."""
    import cupy as cp

    key = (cp.cuda.Device().id, n)
    a = _arange_cache.get(key)
    if a is None:
        a = _arange_cache[key] = cp.arange(n, dtype=np.int32)
    return a


def _int32_dev(a):
    import cupy as cp

    if isinstance(a, cp.ndarray) and a.dtype == np.int32:
        return a
    return cp.asarray(np.asarray(a.get() if isinstance(a, cp.ndarray) else a, dtype=np.int32))


def _ctas_per_sm(fn, smem: int) -> int:
    """Resident CTAs of _THREADS threads per SM for kernel `fn` with `smem` bytes of dynamic shared memory:
    the smaller of the shared-memory and register limits (65536 registers, allocated 8 per thread at a time)."""
    k = _kernels()
    by_smem = k.smem_per_sm // (smem + 1024)
    try:
        regs = -(-int(fn.num_regs) // 8) * 8
        by_regs = 65536 // (max(regs, 1) * _THREADS)
    except Exception:  # attribute not offered by this CuPy: trust __launch_bounds__ (DC_V2_MIN_CTAS)
        by_regs = 3
    return max(1, min(16, by_smem, by_regs))


def combine_smem(d: int) -> int:
    """Dynamic shared memory of paged_attn_decode_combine (combine_body: per warp, D sums, a max and a weight
    sum); independent of the split count (each warp folds its splits into a running max in registers)."""
    nw = _COMBINE_THREADS // 32
    return (nw * d + 2 * nw) * 4


def decode_can_write_output(out) -> bool:
    """Whether the decode kernel may write the fp16 output itself (its `out` argument) where one CTA takes a
    whole (query block, KV head) list: `out` a row-major [N, Hq * D] array it can store 4 halves at a time into.
    With a grid of one split (fixed for a captured graph, as the output buffer is) no combine is launched."""
    return out.flags.c_contiguous and out.data.ptr % 8 == 0


def decode_splits(plan: CudaPlan, hkv: int, head_tiles: int, d: int, per_sm: int | None = None) -> int:
    """CTAs per (query block, KV head, head tile): fill the GPU once (all CTAs resident together), at most
    DECODE_MAX_SPLITS; a short list uses fewer of them on the device (live_splits in attention_decode.cu).
    `per_sm`: resident CTAs per SM of the kernel launched (default: the fp16 / v1 kernel's shared memory)."""
    k = _kernels()
    if not per_sm:
        per_sm = max(1, min(16, k.smem_per_sm // (_decode_smem(d, DECODE_STAGES[d]) + 1024)))
    slots = k.num_sms * per_sm
    pairs = max(1, plan.max_qblocks * hkv * head_tiles)
    splits = max(1, min(DECODE_MAX_SPLITS, slots // pairs))
    visit = plan.fixed_visit_pages if plan.fixed_visit_pages is not None else plan.visit_pages
    if visit is not None:  # short (selected / windowed) lists: about 4 units of 16 keys per warp at least
        units = max(1, visit * plan.page_size // 16)
        splits = min(splits, max(1, -(-units // (4 * (_THREADS // 32)))))
    return splits


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
    min_units: int | None = None,
    ks=None,
    vs=None,
    head_slot=None,
    sel_idx=None,
    sel_cnt=None,
    scales: tuple | None = None,
    kv: str = "fp16",
):
    """Block-sparse paged attention executing `plan`; returns out [N, Hq*D] (fp16).

    Dense mode (reference `reference/attention.paged_attention_ref`): q fp16 [N, Hq, D]; k_cache, v_cache fp16
    [num_pages, Hkv, page_size, D]; head_class int32 [Hkv] (0 dense, 1 streaming: the window of its query
    block). LServe mode (reference `reference/attention.paged_attention_sparse_ref`): k_cache/v_cache are the dense pool
    [P, nd, page, D], ks/vs the streaming pool [Ps, ns, page, D], head_slot[g] KV head g's row in the pool of
    its class; with sel_idx [slots, Hkv, K] / sel_cnt [slots, Hkv] dense heads of decode blocks with
    qb_keep > 0 visit only their selected pages plus the newest one. Either pool may have 0 heads.
    `decode=None` picks the decode kernel when every query block has one row; pass `decode=True` when
    capturing a decode step in a CUDA Graph (only row 0 of each query block is computed then). `num_splits`
    (decode) overrides the CTAs per (query block, KV head); it must stay fixed between capture and replay
    (the default depends only on the plan's capacity and `fixed_visit_pages`); `min_units` (default
    DECODE_MIN_UNITS) the units of 16 keys a warp takes at least before a list uses another of them. A quantized
    cache (`kv` int8 / int4 / fp8): the pools hold its values and `scales` (k, v, ks, vs) its fp16 scales [pages,
    heads, page, scale_cols] (reference: the same functions with their `scales` /
    `fmt` arguments). `kv="bf16"` (prefill on compute capability 9.x only): q, the pools and out are uint16 arrays of
    bf16 bits.
    """
    import cupy as cp

    n, hq, d = q.shape
    bf16 = kv == "bf16"
    ps, d2 = k_cache.shape[2], k_cache.shape[3] * (1 if bf16 else 2 // FORMATS[kv].packed_dim(2))
    hkv = int(head_class.shape[0])
    sparse = ks is not None
    if not sparse:
        ks, vs = k_cache, v_cache
        if k_cache.shape[1] != hkv:
            raise ValueError(f"cache has {k_cache.shape[1]} heads, head_class {hkv}")
    if d != d2 or v_cache.shape != k_cache.shape or vs.shape != ks.shape or ks.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k_cache.shape}, v {v_cache.shape}, ks {ks.shape}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d} not compiled (have {HEAD_DIMS})")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if ps != plan.page_size:
        raise ValueError(f"cache page size {ps} != plan page size {plan.page_size}")
    qtype = np.uint16 if bf16 else np.float16  # bf16: the bits
    vtype = qtype if bf16 else FORMATS[kv].value_dtype
    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("ks", ks), ("vs", vs)):
        if a.dtype != (qtype if name == "q" else vtype) or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(vtype).name} array ({kv} cache)")
    if (scales is None) != (kv in ("fp16", "bf16")):
        raise ValueError(f"a {kv} cache {'needs' if scales is None else 'has no'} scales")
    if scales is None:
        scale_args = (np.uint64(0),) * 4
    else:
        scale_args = tuple(np.uint64(0) if a is None else a for a in scales)
        scale_args = scale_args if sparse else (scale_args[0], scale_args[1], scale_args[0], scale_args[1])
    head_class = _int32_dev(head_class)
    head_slot = _arange(hkv) if head_slot is None else _int32_dev(head_slot)
    n0, n1 = int(k_cache.shape[1]), int(ks.shape[1])  # dense mode: pool 1 is pool 0 (every head)
    pools = (k_cache, v_cache, ks, vs, *scale_args)
    pool_args = (head_class, head_slot, np.int32(n0), np.int32(n1))
    if out is None:
        out = cp.empty((n, hq * d), dtype=qtype)
    group = hq // hkv
    scale_log2 = np.float32(_LOG2E / math.sqrt(d))
    ps_shift = np.int32(ps.bit_length() - 1)
    if decode is None:
        decode = plan.max_qb_len <= 1
    if bf16 and decode:
        raise ValueError(
            "bf16 runs prefill only (the Hopper wgmma kernel); decode takes fp16 or a quantized cache"
        )
    if out.dtype != qtype:
        raise ValueError(f"out must be {np.dtype(qtype).name} ({kv} attention), got {out.dtype}")
    if plan.nqb == 0 and not decode:
        return out
    k = _kernels()
    if decode:
        head_tiles = -(-group // 16)
        impl = KVQ_DECODE if kv != "fp16" else "v1"
        if impl not in KVQ_DECODE_IMPLS:
            raise ValueError(
                f"LSERVE_KVQ_DECODE / KVQ_DECODE must be one of {KVQ_DECODE_IMPLS}, got {impl!r}"
            )
        per_sm = None
        if impl == "v2":
            smem = _decode_v2_smem(d, DECODE_V2_STAGES[kv], kv)
            fn = _v2_kernel(k, _decode_v2_name(d, kv), smem)
            per_sm = _ctas_per_sm(fn, smem)
        else:
            smem = _decode_smem(d, DECODE_STAGES[d], kv)
            fn = k.get(k.decode, f"paged_attn_decode_d{d}_s{DECODE_STAGES[d]}{_suffix(kv)}", smem)
        splits = int(num_splits) if num_splits else decode_splits(plan, hkv, head_tiles, d, per_sm)
        # Each live CTA merges its warps' partials and writes one per query head (slots of stride `splits`); a
        # list that one CTA takes whole needs no combine: the kernel writes the fp16 output itself (part_live 0),
        # and a grid of one split launches none.
        direct = decode_can_write_output(out)
        combine = not (direct and splits == 1)
        if not combine:
            part_o = part_lse = part_live = np.uint64(0)  # null: never touched
        else:
            part_o = plan.workspace("part_o", plan.max_qblocks * hq * splits * d, np.float32)
            part_lse = plan.workspace("part_lse", plan.max_qblocks * hq * splits, np.float32)
            part_live = plan.workspace("part_live", plan.max_qblocks * hkv, np.int32)
        min_units = DECODE_MIN_UNITS if min_units is None else min_units
        if sel_idx is None:
            sel = (np.uint64(0), np.uint64(0), np.int32(0))  # null pointers: no selection
        else:
            sel = (sel_idx, sel_cnt, np.int32(sel_idx.shape[-1]))
        fn(
            (splits, plan.max_qblocks, hkv * head_tiles),
            (_THREADS,),
            (q, *pools, part_o, part_lse, part_live, out if direct else np.uint64(0), *_plan_args(plan),
             *pool_args, *sel, np.int32(hq), np.int32(hkv), ps_shift, np.int32(head_tiles), scale_log2,
             np.int32(min_units)),
            shared_mem=smem,
        )  # fmt: skip
        if combine:
            comb = k.get(k.decode, "paged_attn_decode_combine", 0)
            comb(
                (plan.max_qblocks, hq),
                (_COMBINE_THREADS,),
                (part_o, part_lse, part_live, out, plan.meta, plan.qb_start, np.int32(hq), np.int32(hkv),
                 np.int32(splits), np.int32(d)),
                shared_mem=combine_smem(d),
            )  # fmt: skip
        return out
    # Prefill: BM = 64 * mt rows per CTA, packing `heads_per_cta` heads of `rows_per_head` rows each.
    qlen = plan.max_qb_len
    mt = 2 if qlen * group >= 128 else 1
    bm = 64 * mt
    rows_per_head = min(qlen, bm)
    heads_per_cta = bm // rows_per_head
    n_sub = -(-qlen // rows_per_head)
    hgroups = -(-group // heads_per_cta)
    choice = prefill_kernel_for(d, kv, k.cc)
    tmaps = np.uint64(0)  # the wgmma kernel's TMA tensor maps (its TMA path only)
    if choice == "ws":  # mt consumer warpgroups of 64 rows (the same row packing) and the producer
        smem = _prefill_ws_smem(d, mt, PREFILL_WS_STAGES[(d, mt)])
        fn = k.get(k.prefill_sm90, _prefill_ws_name(d, mt), smem)
        threads = 128 * (mt + 1)
    elif choice in ("wgmma", "tma"):  # mt warpgroups of 64 rows: the same row packing
        tma = choice != "wgmma"
        stages = PREFILL_TMA_STAGES[(d, mt)] if tma else PREFILL_SM90_STAGES[(d, mt, kv)]
        smem = _prefill_sm90_smem(d, mt, stages, kv)
        fn = k.get(k.prefill_sm90, _prefill_sm90_name(d, mt, stages, kv, choice if tma else ""), smem)
        threads = 128 * mt
        if tma:
            tmaps = pool_maps((k_cache, v_cache, ks, vs), d)
    else:
        bn = PREFILL_BN[(d, mt)]
        smem = _prefill_smem(d, mt, bn, kv)
        fn = k.get(k.prefill, f"paged_attn_prefill_d{d}_m{mt}_n{bn}{_suffix(kv)}", smem)
        threads = _THREADS
    fn(
        (plan.nqb * n_sub, hkv * hgroups),
        (threads,),
        (q, *pools, out, *_plan_args(plan), *pool_args, np.int32(hq), np.int32(hkv), ps_shift,
         np.int32(rows_per_head), np.int32(heads_per_cta), np.int32(n_sub), np.int32(hgroups), scale_log2,
         *((tmaps,) if choice in ("wgmma", "tma") else ())),
        shared_mem=smem,
    )  # fmt: skip
    return out


def _v2_kernel(k: _Kernels, name: str, smem: int):
    """A v2 decode kernel, asking once for the largest shared-memory carveout (several CTAs per SM)."""
    new = name not in k._fns
    fn = k.get(k.decode, name, smem)
    if new:
        try:
            fn.preferred_shared_memory_carveout = 100
        except Exception:  # not offered by this CuPy: the driver's choice
            pass
    return fn


_SELECT_THREADS = 256  # page_score: 8 warps, a warp scores one physical page at a time (PS_THREADS)
_SELECT_CTAS_PER_SM = 3  # page_score's __launch_bounds__(PS_THREADS, 3)
_TOPK_THREADS = 512  # page_topk (TK_THREADS)
_TOPK_STAGE_MAX = 16384  # candidates it stages in shared memory past that; longer lists reread L2 each pass


def score_grid_x(max_pages: int, max_qblocks: int, dense_heads: int, sms: int) -> int:
    """page_score's CTAs per list: the capacity's lists of every dense head (max_qblocks x dense_heads) share one
    wave of resident CTAs (3 per SM on `sms` SMs), at least one page per warp. A warp's loads of one page are
    one round trip, so below a full wave a warp's pages are a serial chain that more CTAs shorten; once the wave
    is full the score is bound by the statistics' traffic, and a second, partial wave would only add a tail."""
    per_list = -(-max_pages // max_qblocks)
    warps = _SELECT_THREADS // 32
    wave = _SELECT_CTAS_PER_SM * sms
    return int(max(1, min(1024, -(-per_list // warps), wave // max(1, max_qblocks * dense_heads))))


def topk_stage_entries(max_pages: int) -> int:
    """Candidates page_topk stages in shared memory for a plan of this capacity (a list has at most
    max_pages - 1 candidates), up to _TOPK_STAGE_MAX: with group_reduce mass every list is staged (its scores
    computed in one coalesced pass); with max only lists past the registers (TK_THREADS x TK_RUN) are."""
    return max(0, min(max_pages - 1, _TOPK_STAGE_MAX))


def topk_stage_bytes(entries: int) -> int:
    """Dynamic shared memory of page_topk for `entries` staged scores (a pad word every 32: staged_at)."""
    return 4 * (entries + entries // 32 + 1) if entries else 0


def select_pages(q, kmax, kmin, plan: CudaPlan, head_class, head_slot, sel_idx, sel_cnt) -> None:
    """The page selector on the GPU (reference `reference/page_select.select_pages_ref`): for decode blocks with
    qb_keep > 0 and qb_refresh = 1, each dense KV head's top pages -> sel_idx / sel_cnt (ascending indices
    into the block's class-0 list, the newest last). kmax/kmin fp16 [P, nd, sub_pages, D]. Two launches
    (page_score, page_topk) sized by the plan's capacity only: graph-capturable, no host round trip; the
    group reduction is read from the device plan (meta[4]), so one graph serves either."""
    n, hq, d = q.shape
    hkv = int(head_class.shape[0])
    nd, sub = int(kmax.shape[1]), int(kmax.shape[2])
    if nd == 0 or plan.max_qblocks == 0:
        return
    if kmax.dtype != np.float16 or kmin.dtype != np.float16 or q.dtype != np.float16:
        raise ValueError("select_pages needs float16 q and key statistics")
    if q.data.ptr % 16 or not q.flags.c_contiguous:
        raise ValueError("select_pages reads q [n, Hq, D] in 16-byte vectors: contiguous and 16-byte aligned")
    ps = plan.page_size
    if ps % sub or (sub & (sub - 1)):
        raise ValueError(f"sub_pages {sub} must be a power of two dividing page_size {ps}")
    group = hq // hkv
    if plan.group_reduce == "mass" and group > MASS_MAX_GROUP:
        raise ValueError(
            f"group_reduce mass needs at most {MASS_MAX_GROUP} query heads per KV head, got {group}"
        )
    k = _kernels()
    head_class, head_slot = _int32_dev(head_class), _int32_dev(head_slot)
    scores = plan.workspace("sel_scores", hq * plan.max_pages, np.float32)  # mass: a row per query head
    smem = group * d * 2 * 4  # max(q, 0) and min(q, 0) per query head, fp32
    gx = score_grid_x(plan.max_pages, plan.max_qblocks, nd, k.num_sms)
    lse_part = plan.workspace(
        "sel_lse_part", plan.max_qblocks * hq * gx * 2, np.float32
    )  # mass: (m, z) a CTA
    plan_args = _plan_args(plan)
    fn = k.get(k.select, f"page_score_d{d}", smem)
    fn(
        (gx, plan.max_qblocks, hkv),
        (_SELECT_THREADS,),
        (q, kmax, kmin, *plan_args, head_class, head_slot, np.int32(nd), np.int32(sub), scores, lse_part,
         np.int32(plan.max_pages), np.int32(hq), np.int32(hkv), np.int32(ps.bit_length() - 1)),
        shared_mem=smem,
    )  # fmt: skip
    stage = topk_stage_entries(plan.max_pages)
    topk = k.get(k.select, "page_topk", topk_stage_bytes(_TOPK_STAGE_MAX))  # opt in to the largest stage once
    topk(
        (plan.max_qblocks, hkv),
        (_TOPK_THREADS,),
        (*plan_args, head_class, scores, lse_part, np.int32(gx), np.int32(plan.max_pages), np.int32(hkv),
         np.int32(group), sel_idx, sel_cnt, np.int32(sel_idx.shape[-1]), np.int32(stage)),
        shared_mem=topk_stage_bytes(stage),
    )  # fmt: skip
