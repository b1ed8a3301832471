"""One decoder forward for Llama, Mistral, Qwen2 and SmolLM2, written against the Ops interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import KVCache, Ops, RopeTables
from ..backends.comm import Communicator
from ..config import ModelConfig
from ..weights.qtensor import Weight, fuse_rows


@dataclass
class Layer:
    """One decoder layer's weights in the backend's layout (q/k/v and gate/up fused)."""

    ln1: Any
    qkv: Any
    qkv_bias: Any
    o: Any
    ln2: Any
    gate_up: Any
    down: Any


class LlamaModel:
    """Decoder-only transformer; `forward` runs one scheduled step over a flattened token batch.

    Tensor parallel (`comm` given; `cfg` and `weights` are this rank's shard, weights/shard.py): the embedding
    is a vocabulary slice (other ids give zeros), o_proj and down_proj give partial sums; one all-reduce after
    each completes them, and the vocabulary-parallel logits are gathered."""

    # host rope tables filled as positions are reached (`rope_for`); None: `rope` is whole (a model made without
    # __init__, as tools/bench_e2e.py makes its random ones, has whole tables too)
    lazy_rope: RopeTables | None = None

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, Weight],
        ops: Ops,
        max_len: int,
        comm: Communicator | None = None,
    ):
        self.cfg, self.ops, self.comm = cfg, ops, comm
        self.vocab_start = comm.rank * cfg.vocab_size if comm is not None else 0

        def up(name: str, a: Weight | None = None) -> Any:
            """Upload a tensor with its name, so a backend's range check can name it."""
            return ops.upload(weights[name] if a is None else a, name=name)

        self.embed = up("model.embed_tokens.weight")
        self.norm = up("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else up("lm_head.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = fuse_rows([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            bias = [weights[p + f"self_attn.{n}_proj.bias"] for n in "qkv"] if cfg.qkv_bias else None
            self.layers.append(
                Layer(
                    ln1=up(p + "input_layernorm.weight"),
                    qkv=up(p + "self_attn.{q,k,v}_proj.weight", qkv),
                    qkv_bias=None
                    if bias is None
                    else up(p + "self_attn.{q,k,v}_proj.bias", np.concatenate(bias)),
                    o=up(p + "self_attn.o_proj.weight"),
                    ln2=up(p + "post_attention_layernorm.weight"),
                    gate_up=up(
                        p + "mlp.{gate,up}_proj.weight",
                        fuse_rows([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]),
                    ),
                    down=up(p + "mlp.down_proj.weight"),
                )
            )
        # A backend that builds its own tables (the GPU's, on the device) gets them whole; one that reads the host's
        # gets them filled as positions are reached (`rope_for`).
        tables = RopeTables(cfg, max_len)
        device = ops.rope_tables(tables)
        self.rope = device or (tables.cos, tables.sin)
        self.lazy_rope = None if device else tables

    def rope_for(self, positions: Any) -> tuple[Any, Any]:
        """The rope tables, with the rows of `positions` filled."""
        if self.lazy_rope is not None and len(positions):
            self.lazy_rope.reach(int(positions.max()) + 1)
        return self.rope

    def forward(
        self,
        ids: Any,
        positions: Any,
        slots: Any,
        plan: Any,
        cache: KVCache,
        head_classes: list[Any],
        logit_rows: Any,
    ) -> Any:
        """Write the new tokens' K/V into the cache and return logits [len(logit_rows), vocab] (float32)."""
        ops, cfg = self.ops, self.cfg
        x = self._sum(ops.embed(self.embed, ids, vocab_start=self.vocab_start))
        residual, rope = None, self.rope_for(positions)
        for i, layer in enumerate(self.layers):
            q, residual = ops.qkv_rope(
                x, residual, layer.ln1, cfg.rms_norm_eps, layer.qkv, layer.qkv_bias,
                positions, slots, cache, i, rope,
            )  # fmt: skip
            if plan.refreshes:
                ops.select_pages(q, cache, i, plan)
            a = ops.attention(q, cache, i, plan, head_classes[i])
            x, residual = self._project(a, layer.o, residual)
            act, residual = ops.rmsnorm_linear(
                x, residual, layer.ln2, cfg.rms_norm_eps, layer.gate_up, silu=True
            )
            x, residual = self._project(act, layer.down, residual, last=i == len(self.layers) - 1)
        h, _ = ops.add_rmsnorm(x[logit_rows], residual[logit_rows], self.norm, cfg.rms_norm_eps)
        logits = ops.logits(h, self.lm_head)
        return logits if self.comm is None else self.comm.all_gather(logits)

    def _project(self, x: Any, w: Any, residual: Any, last: bool = False) -> tuple[Any, Any]:
        """An output projection and the residual stream for the norm after it: Ops.linear_add (the add may go into
        the product's kernel), except under tensor parallelism (the all-reduce comes first) and in the last layer
        (the final norm takes the rows of x it needs)."""
        if self.comm is None and not last:
            return self.ops.linear_add(x, w, residual)
        return self._sum(self.ops.linear(x, w)), residual

    def _sum(self, x: Any) -> Any:
        """The all-reduce that completes a row-parallel product (and the vocabulary-parallel embedding)."""
        if self.comm is not None:
            self.comm.all_reduce(x)
        return x
