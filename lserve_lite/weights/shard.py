"""Megatron-style tensor-parallel shards: which query heads, KV heads, FFN columns and vocabulary rows rank
`rank` of `world` holds, and its slices of every weight (docs/TENSOR_PARALLEL.md).

Column-parallel (output rows split): fused q/k/v by heads, gate/up by FFN columns. Row-parallel (input
columns split): o_proj and down_proj, whose partial products are summed by an all-reduce. Vocabulary-parallel:
embedding rows and lm_head rows (tied or not). With fewer KV heads than ranks, each KV head is replicated on
the ranks whose query heads read it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..config import ModelConfig
from ..errors import InvalidRequestError
from .qtensor import QuantTensor, RowStack, Weight


@dataclass(frozen=True)
class Shard:
    """Rank `rank`'s ranges: query heads, KV heads, FFN columns and vocabulary rows (half-open)."""

    rank: int
    world: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]

    def head_classes(self, classes: list[np.ndarray]) -> list[np.ndarray]:
        """Per-layer LServe head classes (or gates, slots) of this rank's KV heads."""
        k0, k1 = self.kv_heads
        return [np.asarray(c)[k0:k1] for c in classes]


def check_tensor_parallel(cfg: ModelConfig, world: int) -> None:
    """Whether `cfg` splits over `world` ranks; each reason is one InvalidRequestError line."""
    hq, hkv = cfg.num_heads, cfg.num_kv_heads
    for what, n in (("num_attention_heads", hq), ("intermediate_size", cfg.intermediate_size),
                    ("vocab_size", cfg.vocab_size)):  # fmt: skip
        if n % world:
            raise InvalidRequestError(f"tensor_parallel {world} must divide {what} ({n})")
    if hkv % world and world % hkv:
        raise InvalidRequestError(
            f"tensor_parallel {world} and num_key_value_heads ({hkv}) must divide one another"
        )


def shard_of(cfg: ModelConfig, rank: int, world: int) -> Shard:
    """Rank `rank`'s ranges; a KV head is replicated on world / num_kv_heads ranks when there are fewer."""
    check_tensor_parallel(cfg, world)
    if not 0 <= rank < world:
        raise InvalidRequestError(f"rank {rank} is outside [0, {world})")
    nq, hkv = cfg.num_heads // world, cfg.num_kv_heads
    q0 = rank * nq
    if hkv >= world:
        nkv = hkv // world
        kv = (rank * nkv, (rank + 1) * nkv)
    else:
        g = q0 // cfg.group_size  # the one KV head this rank's query heads read
        kv = (g, g + 1)
    ni, nv = cfg.intermediate_size // world, cfg.vocab_size // world
    return Shard(rank, world, (q0, q0 + nq), kv, (rank * ni, (rank + 1) * ni), (rank * nv, (rank + 1) * nv))


def shard_config(cfg: ModelConfig, s: Shard) -> ModelConfig:
    """The config one rank's model runs with: its heads, KV heads, FFN width and vocabulary slice."""
    return replace(
        cfg,
        num_heads=s.q_heads[1] - s.q_heads[0],
        num_kv_heads=s.kv_heads[1] - s.kv_heads[0],
        intermediate_size=s.ffn[1] - s.ffn[0],
        vocab_size=s.vocab[1] - s.vocab[0],
    )


def shard_weights(weights: dict[str, Weight], cfg: ModelConfig, s: Shard) -> dict[str, Weight]:
    """Rank `s.rank`'s slice of every tensor, by the same names (norms are replicated). Float slices are
    copies, so the full tensors (a memory map, or widened bf16) can be dropped after this; quantized row
    slices are views of their blocks, column slices copies."""
    d = cfg.head_dim
    q = (s.q_heads[0] * d, s.q_heads[1] * d)
    kv = (s.kv_heads[0] * d, s.kv_heads[1] * d)
    rows = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv, "mlp.gate_proj": s.ffn,
            "mlp.up_proj": s.ffn}  # fmt: skip
    cols = {"self_attn.o_proj.weight": q, "mlp.down_proj.weight": s.ffn}
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        part = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        kind = part.rsplit(".", 1)[0]
        if kind in rows:
            out[name] = _rows(w, *rows[kind])
        elif part in cols:
            out[name] = _cols(w, *cols[part], name, s.world)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = _rows(w, *s.vocab)
        else:
            out[name] = np.array(w)  # norms: replicated
    return out


def _rows(w: Weight, r0: int, r1: int) -> Weight:
    if isinstance(w, QuantTensor):
        return w.rows(r0, r1)  # a view of the packed blocks (of the mapped file for a GGUF)
    if isinstance(w, RowStack):
        raise TypeError("row stacks are fused in the model, after sharding")
    return np.array(w[r0:r1])


def _cols(w: Weight, c0: int, c1: int, name: str, world: int) -> Weight:
    """Input columns c0..c1; a quantized matrix only on its block boundaries (its blocks are not split)."""
    if not isinstance(w, QuantTensor):
        return np.array(w[:, c0:c1])
    lay = w.layout
    if c0 % lay.block or c1 % lay.block:
        raise InvalidRequestError(
            f"tensor_parallel {world}: {name} is {w.fmt} in blocks of {lay.block} values, and its input split"
            f" at {c0}..{c1} is not on a block boundary; choose a tensor-parallel size that splits it so"
        )
    b0, b1 = (
        lay.row_head + c0 // lay.block * lay.block_bytes,
        lay.row_head + c1 // lay.block * lay.block_bytes,
    )
    data = np.concatenate([w.data[:, : lay.row_head], w.data[:, b0:b1]], axis=1)
    return QuantTensor(w.fmt, (w.shape[0], c1 - c0), data)
