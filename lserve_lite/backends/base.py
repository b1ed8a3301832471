"""The Ops interface: everything the model forward needs from a backend. Model code never branches on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..config import ModelConfig
from ..sparse.plan import AttentionPlan

Array = Any  # numpy.ndarray on the CPU, cupy.ndarray on the GPU


@dataclass
class KVCache:
    """Paged K/V per layer: [num_pages, heads, page_size, head_dim] in the backend's dtype.

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

    @property
    def sparse(self) -> bool:
        return self.ks is not None


class Ops(Protocol):
    """Backend operations; arrays are the backend's own (NumPy or CuPy)."""

    name: str
    dtype: Any

    def upload(self, a: np.ndarray, name: str | None = None) -> Array: ...
    def to_numpy(self, a: Array) -> np.ndarray: ...
    def alloc_kv(self, cfg: ModelConfig, num_pages: int, page_size: int) -> KVCache: ...
    def alloc_sparse_kv(
        self, cfg: ModelConfig, layout: Any, num_pages: int, num_stream_pages: int, max_seqs: int
    ) -> KVCache: ...
    def select_pages(self, q: Array, cache: KVCache, layer: int, plan: Any) -> None: ...
    def prepare_plan(self, plan: AttentionPlan) -> Any: ...
    def embed(self, table: Array, ids: Array) -> Array: ...
    def add_rmsnorm(self, x: Array, residual: Array | None, w: Array, eps: float) -> tuple[Array, Array]: ...
    def linear(self, x: Array, w: Array, bias: Array | None = None) -> Array: ...
    def silu_mul(self, gate_up: Array) -> Array: ...
    def rope_write_kv(
        self,
        qkv: Array,
        positions: Array,
        slots: Array,
        cache: KVCache,
        layer: int,
        rope: tuple[Array, Array],
    ) -> Array: ...
    def attention(self, q: Array, cache: KVCache, layer: int, plan: Any, head_class: Array) -> Array: ...
    def logits(self, h: Array, lm_head: Array) -> Array: ...
    def sample(self, logits: Array, seqs: list) -> list[int]: ...
    def kv_budget_bytes(self, fraction: float, reserved: int = 0) -> int: ...


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_len, head_dim/2] in float32 (half-split rotation as HF Llama), llama3 scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        inv = _llama3_scale(inv, rs)
    ang = np.arange(max_len, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


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
