"""The Ops interface: everything the model forward needs from a backend. Model code never branches on it."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..config import EngineConfig, ModelConfig
from ..geometry import visit_capacity
from ..kv.layout import KVLayout
from ..kv.quant import KVFormat
from ..sparse.plan import AttentionPlan
from ..weights.qtensor import Weight
from .memory import MemoryNeed

Array = Any  # numpy.ndarray on the CPU, cupy.ndarray on the GPU


@dataclass
class KVCache:
    """Paged K/V per layer: [num_pages, heads, page_size, head_dim] in the backend's dtype, or in a quantized
    format (`fmt`, kv/quant.py): values in `k`/`v`/`ks`/`vs`, their scales in `*_scale` by the same page ids.

    Dense mode: `k`/`v` hold every KV head. LServe mode: `k`/`v` are the dense pool (dense heads only),
    `ks`/`vs` the streaming pool, `head_slot[layer][g]` KV head g's row in its pool, `kmax`/`kmin` the
    logical-page key stats of the dense pool, `sel_idx`/`sel_cnt` the reusable page selections.
    """

    k: list[Array]
    v: list[Array]
    page_size: int
    num_pages: int
    ks: list[Array] | None = None
    vs: list[Array] | None = None
    head_class: list[Array] | None = None
    head_slot: list[Array] | None = None
    kmax: list[Array] | None = None
    kmin: list[Array] | None = None
    sel_idx: list[Array] | None = None  # [max_seqs, Hkv, K] int32 logical page indices
    sel_cnt: list[Array] | None = None  # [max_seqs, Hkv] int32
    fmt: KVFormat | None = None  # None: the backend's float type
    k_scale: list[Array] | None = None  # [num_pages, heads, page_size, D / group] per pool, as k/v/ks/vs
    v_scale: list[Array] | None = None
    ks_scale: list[Array] | None = None
    vs_scale: list[Array] | None = None

    @property
    def sparse(self) -> bool:
        return self.ks is not None

    @property
    def quantized(self) -> bool:
        return self.fmt is not None and self.fmt.quantized

    @property
    def head_dim(self) -> int:
        d = int(self.k[0].shape[3])
        return d if self.fmt is None else d * 2 // self.fmt.packed_dim(2)

    @property
    def rotates_keys(self) -> bool:
        """Whether queries and keys are written in the Hadamard basis (the format's rule: kv/quant.py)."""
        return self.fmt is not None and self.fmt.rotates_keys(self.head_dim)

    def kv_heads(self, layer: int) -> int:
        """The model's KV heads at `layer` (LServe mode: both pools together)."""
        return int(self.head_class[layer].shape[0]) if self.sparse else int(self.k[layer].shape[1])

    def dense_pools(self) -> list[Array]:
        """Every layer's arrays indexed by a dense-pool page first: values, scales, the selector's statistics."""
        return [
            a
            for pools in (self.k, self.v, self.k_scale, self.v_scale, self.kmax, self.kmin)
            for a in pools or ()
        ]

    def stream_pools(self) -> list[Array]:
        """Every layer's arrays indexed by a streaming-pool page first: values and scales (none in dense mode)."""
        return [a for pools in (self.ks, self.vs, self.ks_scale, self.vs_scale) for a in pools or ()]

    def scales(self, layer: int) -> tuple:
        """(k, v, ks, vs) scales of a layer's pools; Nones for a float cache (or a pool that does not exist)."""
        pick = lambda a: a[layer] if a is not None else None  # noqa: E731
        return pick(self.k_scale), pick(self.v_scale), pick(self.ks_scale), pick(self.vs_scale)


@dataclass
class StepInputs:
    """Host (NumPy) inputs of one forward step, as the model runner builds them."""

    ids: Any  # [N] int64 token ids: NumPy, or the backend's array of the previous step's samples (overlap)
    positions: np.ndarray  # [N] int64
    slots: np.ndarray  # [N] int64 KV slots, or [2, N] (dense pool, streaming pool) in LServe mode
    plan: AttentionPlan
    logit_rows: np.ndarray  # [R] int64 rows whose logits are wanted
    head_classes: list[np.ndarray]  # per layer [Hkv] int32 (0 dense, 1 streaming)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, logits of every row: what a decode CUDA Graph can replay."""
        n = len(self.ids)
        return (
            n > 0
            and self.plan.num_qblocks == n
            and len(self.logit_rows) == n
            and bool(np.all(self.plan.qb_len == 1))
        )


class SampledTokens(Protocol):
    """One step's sampled ids: `ids` stays on the backend (the next step's input ids, [B] int64); `tolist`
    waits for this step's sampling only, so the host can read them while the device runs a later step."""

    ids: Array

    def tolist(self) -> list[int]: ...
    def sound(self) -> list[bool]:
        """Whether each row's logits could be sampled (`Ops.sample_async`), read back with the ids."""
        ...


@dataclass
class HostTokens:
    """Sampled ids already on the host (a backend whose launches compute synchronously)."""

    ids: np.ndarray
    sound_rows: np.ndarray  # bool [B]

    def tolist(self) -> list[int]:
        return self.ids.tolist()

    def sound(self) -> list[bool]:
        return self.sound_rows.tolist()


# model.forward(ids, positions, slots, plan, cache, head_classes, logit_rows) -> logits
Forward = Callable[..., Any]


class Executor(Protocol):
    """Runs forward steps on one backend, FlashInfer style: `plan` does all host work of a step (uploads,
    device plan, graph choice); `run` only launches or replays. Logits stay valid until the next `run`."""

    def plan(self, step: StepInputs) -> Any: ...
    def run(self, prepared: Any) -> Array: ...
    def ids_row(self, n: int) -> Array | None:
        """Device memory the next n-row decode step reads its token ids from, for the sampler to write them
        there (None: none such, the ids travel as an array of their own)."""
        ...


class EagerExecutor:
    """Every step through `forward` with the backend's arrays (the CPU backend's executor; the CUDA one
    for steps its graphs do not serve)."""

    def __init__(self, ops: Ops, forward: Forward, cache: KVCache):
        self.ops, self.forward, self.cache = ops, forward, cache
        self._hc_src: list | None = None
        self._hc: list = []

    def plan(self, step: StepInputs) -> tuple:
        up = self.ops.upload
        if step.head_classes is not self._hc_src:
            self._hc_src, self._hc = (
                step.head_classes,
                [up(np.asarray(c, np.int32)) for c in step.head_classes],
            )
        return (up(step.ids), up(step.positions), up(step.slots), self.ops.prepare_plan(step.plan), self.cache,
                self._hc, up(step.logit_rows))  # fmt: skip

    def run(self, prepared: tuple) -> Array:
        return self.forward(*prepared)

    def ids_row(self, n: int) -> None:
        return None


@dataclass(frozen=True)
class Added:
    """A projection's output already added into the residual stream by its kernel (Ops.linear_add), with what the
    next norm needs of it: each block's sum of squares of the values it wrote (`part` [parts, N] on the device)."""

    part: Array
    parts: int


class Ops(Protocol):
    """Backend operations; arrays are the backend's own (NumPy or CuPy). A weight given to `upload` may be a
    float array, a `QuantTensor` or a `RowStack` (weights/qtensor.py); `linear`, `embed` and `logits` take
    what `upload` returned (both backends keep the packed blocks: QuantTensor on the CPU, DeviceQuant on the GPU)."""

    name: str
    dtype: Any
    kv_dtypes: tuple[str, ...]  # KV formats the backend runs; the first is its float type ("auto")
    # page selector group reductions it runs (config.GROUP_REDUCE, + oracle)
    selector_reductions: tuple[str, ...]
    # launches return before the device is done: the engine overlaps its host work with them
    async_steps: bool
    # its memory is the host's (weights, KV cache and buffers beside the arrays returned to the host)
    memory_is_host: bool

    def upload(self, a: np.ndarray, name: str | None = None) -> Array: ...
    def rope_tables(self, tables: RopeTables) -> tuple[Array, Array] | None: ...
    def to_numpy(self, a: Array) -> np.ndarray: ...
    def alloc_kv(
        self, cfg: ModelConfig, page_size: int, num_pages: int, layout: KVLayout | None = None,
        num_stream_pages: int = 0, max_seqs: int = 0, fmt: KVFormat | None = None,
    ) -> KVCache: ...  # fmt: skip
    def executor(
        self, forward: Forward, cache: KVCache, ecfg: EngineConfig, layout: KVLayout | None, max_len: int
    ) -> Executor: ...
    def select_pages(self, q: Array, cache: KVCache, layer: int, plan: Any) -> None: ...
    def copy_stream_pages(self, cache: KVCache, src: np.ndarray, dst: np.ndarray) -> None: ...
    def clear_pages(self, cache: KVCache, pages: np.ndarray, stream_pages: np.ndarray) -> None: ...
    def prepare_plan(self, plan: AttentionPlan) -> Any: ...
    def embed(self, table: Array, ids: Array, vocab_start: int = 0) -> Array: ...
    def add_rmsnorm(self, x: Array, residual: Array | None, w: Array, eps: float) -> tuple[Array, Array]: ...
    def linear(self, x: Array, w: Array, bias: Array | None = None) -> Array: ...
    def silu_mul(self, gate_up: Array) -> Array: ...
    def gate_up_silu(self, h: Array, w: Array) -> Array:
        """silu(h @ Wg^T) * (h @ Wu^T) [N, I] for the row-fused gate/up weight w = [Wg; Wu] [2I, K] (as `upload`
        returned it): silu_mul(linear(h, w)), which a backend may run as one kernel (CUDA: decode GEMVs)."""
        ...

    def rmsnorm_linear(
        self, x: Array, residual: Array | None, norm_w: Array, eps: float, w: Array, bias: Array | None = None,
        silu: bool = False,
    ) -> tuple[Array, Array]:  # fmt: skip
        """A layer's input norm and the projection that consumes it: (linear(h, w, bias), or gate_up_silu(h, w)
        with `silu`; the residual stream), h = add_rmsnorm(x, residual): one method so that a backend can run the
        norm inside the product's kernel (CUDA: decode GEMVs); `norm_then_linear` is the unfused form."""
        ...

    def linear_add(self, x: Array, w: Array, residual: Array) -> tuple[Array | Added, Array]:
        """An output projection whose result joins the residual stream before the next norm: (linear(x, w), residual)
        for the next rmsnorm_linear / qkv_rope, or, where a backend adds it in the product's epilogue (CUDA: the
        spread norm of packed-weight decode), (Added, the residual stream with it added)."""
        ...

    def rope_write_kv(
        self,
        qkv: Array,
        positions: Array,
        slots: Array,
        cache: KVCache,
        layer: int,
        rope: tuple[Array, Array],
    ) -> Array: ...
    def qkv_rope(
        self, x: Array, residual: Array | None, norm_w: Array, eps: float, w: Array, bias: Array | None,
        positions: Array, slots: Array, cache: KVCache, layer: int, rope: tuple[Array, Array],
    ) -> tuple[Array, Array]:  # fmt: skip
        """A layer's attention input: (q [N, Hq, D], the residual stream), its K/V written into the cache. One
        method so that a backend can rotate and write K/V in the q/k/v product's epilogue (CUDA: decode GEMVs);
        `norm_qkv_rope` is the unfused form (rmsnorm_linear, then rope_write_kv)."""
        ...

    def attention(self, q: Array, cache: KVCache, layer: int, plan: Any, head_class: Array) -> Array: ...
    def logits(self, h: Array, lm_head: Array) -> Array: ...
    def sample(self, logits: Array, seqs: list) -> list[int]: ...
    def sample_async(self, logits: Array, seqs: list, out: Array | None = None) -> SampledTokens:
        """`sample` without waiting for the device: the ids stay on it (in `out`, [B] int64, when given: the
        executor's `ids_row`), their way to the host (a copy, or the sampling kernels' own writes) is queued with
        each row's soundness: all finite and not all equal (activations that overflowed float32 give NaN / inf, or
        zeros where a norm's sum of squares overflowed, and such a row samples a meaningless id; checked on the
        sampled rows only, none per layer)."""
        ...

    def logprobs(
        self, logits: Array, chosen: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw-logit log-softmax of each row: the chosen ids' logprobs, the top-k ids and logprobs (host arrays;
        reference: backends/reference/sampling.logprobs_ref)."""
        ...

    def memory_bytes(self) -> int:
        """The memory the backend has now (the host's on the CPU, the device's free memory on the GPU)."""
        ...

    def buffer_needs(
        self, cfg: ModelConfig, ecfg: EngineConfig, max_len: int, layout: KVLayout | None = None
    ) -> list[MemoryNeed]:
        """The buffers the model's config and the engine's limits size on this backend (backends/memory.py), for
        the engine to check before allocating any."""
        ...

    def kv_budget_bytes(self, fraction: float, reserved: int = 0) -> int: ...
    def kv_limit_bytes(self, reserved: int = 0) -> int:
        """The most KV memory an explicit page count (`num_kv_pages`) may ask for, checked before allocating."""
        ...

    def weight_bytes(self, w: Weight) -> int:
        """Bytes `upload(w)` will hold (reserved from the KV budget before the upload)."""
        ...


def norm_then_linear(
    ops: Ops, x: Array, residual: Array | None, norm_w: Array, eps: float, w: Array, bias: Array | None = None,
    silu: bool = False,
) -> tuple[Array, Array]:  # fmt: skip
    """Ops.rmsnorm_linear as two calls: add_rmsnorm, then linear or gate_up_silu."""
    h, residual = ops.add_rmsnorm(x, residual, norm_w, eps)
    return (ops.gate_up_silu(h, w) if silu else ops.linear(h, w, bias)), residual


def norm_qkv_rope(
    ops: Ops, x: Array, residual: Array | None, norm_w: Array, eps: float, w: Array, bias: Array | None,
    positions: Array, slots: Array, cache: KVCache, layer: int, rope: tuple[Array, Array],
) -> tuple[Array, Array]:  # fmt: skip
    """Ops.qkv_rope as two calls: rmsnorm_linear, then rope_write_kv."""
    qkv, residual = ops.rmsnorm_linear(x, residual, norm_w, eps, w, bias)
    return ops.rope_write_kv(qkv, positions, slots, cache, layer, rope), residual


def alloc_kv_cache(
    zeros: Callable, asarray: Callable, dtype: Any, cfg: ModelConfig, page_size: int, num_pages: int, layout: KVLayout | None,
    num_stream_pages: int, max_seqs: int, fmt: KVFormat | None = None,
) -> KVCache:  # fmt: skip
    """Paged KV memory with the backend's `zeros(shape, dtype)` and `asarray` (zeroed: pages never written may be read,
    masked, and must not hold NaN). Dense mode (layout None): one pool of every head. LServe mode: per
    layer a dense-head pool, a streaming pool, the selector's key statistics and selection buffers. A
    `fmt` stores values in its own type (fp16 on the CPU too), a quantized one with scales in `dtype` beside them
    (kv/quant.py)."""
    L, d, ps = cfg.num_layers, cfg.head_dim, page_size
    q = fmt is not None and fmt.quantized
    vshape, vtype = (d, dtype) if fmt is None else (fmt.packed_dim(d), fmt.value_dtype)

    def pools(pages: int, heads: list[int]) -> tuple[list, list, list | None, list | None]:
        """K and V values of every layer, and their scales (None for a float cache)."""
        kv = [[zeros((pages, n, ps, vshape), vtype) for n in heads] for _ in range(2)]
        sc = (
            [[zeros((pages, n, ps, fmt.scale_cols(d)), dtype) for n in heads] for _ in range(2)]
            if q
            else [None, None]
        )
        return kv[0], kv[1], sc[0], sc[1]

    if layout is None:
        k, v, k_s, v_s = pools(num_pages, [cfg.num_kv_heads] * L)
        return KVCache(k=k, v=v, page_size=ps, num_pages=num_pages, fmt=fmt, k_scale=k_s, v_scale=v_s)
    nd = [layout.num_dense(i) for i in range(L)]
    ns = [layout.num_streaming(i) for i in range(L)]
    cap = visit_capacity(layout.select_pages)
    stats = [zeros((num_pages, n, layout.sub_pages, d), dtype) for n in nd] if layout.sub_pages else None
    k, v, k_s, v_s = pools(num_pages, nd)
    ks, vs, ks_s, vs_s = pools(num_stream_pages, ns)
    return KVCache(
        k=k,
        v=v,
        page_size=ps,
        num_pages=num_pages,
        ks=ks,
        vs=vs,
        fmt=fmt,
        k_scale=k_s,
        v_scale=v_s,
        ks_scale=ks_s,
        vs_scale=vs_s,
        head_class=[asarray(np.asarray(c, np.int32)) for c in layout.head_class],
        head_slot=[asarray(np.asarray(s, np.int32)) for s in layout.head_slot],
        kmax=stats,
        kmin=[zeros((num_pages, n, layout.sub_pages, d), dtype) for n in nd] if stats else None,
        sel_idx=[zeros((max_seqs, cfg.num_kv_heads, cap), np.int32) for _ in range(L)],
        sel_cnt=[zeros((max_seqs, cfg.num_kv_heads), np.int32) for _ in range(L)],
    )


ROPE_CHUNK = 1 << 16  # positions whose float64 angles RopeTables computes at once


class RopeTables:
    """cos/sin [max_len, head_dim/2] in float32 (half-split rotation as HF Llama), llama3 scaling applied, filled a
    chunk of ROPE_CHUNK positions at a time as `reach` asks for them: at a 2^24-token context (which streaming heads
    alone allow) building them whole took ~18 s of startup and 4 GiB for positions no request may reach (the
    unfilled rows are np.empty's, never touched). The angles are float64 (exact at long positions)."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        d = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rs = cfg.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "llama3":
            inv = _llama3_scale(inv, rs)
        self.inv, self.max_len = inv, max_len
        self.filled = 0  # rows [0, filled) hold their values

    @functools.cached_property
    def cos(self) -> np.ndarray:
        """Allocated at first use: a backend that builds its own tables from `inv` (the GPU's) never reserves them."""
        return np.empty((self.max_len, self.inv.size), np.float32)

    @functools.cached_property
    def sin(self) -> np.ndarray:
        return np.empty((self.max_len, self.inv.size), np.float32)

    def reach(self, end: int) -> None:
        """Fill the rows of positions [0, end) (whole chunks, at most the table's)."""
        end = min(-(-end // ROPE_CHUNK) * ROPE_CHUNK, self.max_len)
        for p in range(self.filled, end, ROPE_CHUNK):
            ang = np.arange(p, min(p + ROPE_CHUNK, end), dtype=np.float64)[:, None] * self.inv[None, :]
            self.cos[p : p + ROPE_CHUNK], self.sin[p : p + ROPE_CHUNK] = np.cos(ang), np.sin(ang)
        self.filled = max(self.filled, end)


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`RopeTables`' cos / sin with every row filled."""
    t = RopeTables(cfg, max_len)
    t.reach(max_len)
    return t.cos, t.sin


def _llama3_scale(inv: np.ndarray, rs: dict) -> np.ndarray:
    """Llama-3.1 frequency scaling, as transformers' _compute_llama3_parameters."""
    factor = float(rs["factor"])
    lo, hi = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old = float(rs["original_max_position_embeddings"])
    lo_wl, hi_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    out = np.where(wl > lo_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    mid = (1 - smooth) * out / factor + smooth * out
    is_mid = (wl >= hi_wl) & (wl <= lo_wl)
    return np.where(is_mid, mid, out)
