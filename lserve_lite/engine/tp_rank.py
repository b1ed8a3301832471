"""One tensor-parallel rank: its shard of the model, its KV pools and its executor, run on the steps the
driver plans (docs/TENSOR_PARALLEL.md)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..backends.base import Array, Ops, StepInputs
from ..backends.comm import Communicator
from ..config import EngineConfig, ModelConfig
from ..kv.layout import KVLayout
from ..kv.quant import KVFormat
from ..models.llama import LlamaModel
from ..weights.qtensor import Weight
from ..weights.shard import shard_config, shard_of, shard_weights


class RankRunner:
    """A rank's model on its heads, FFN columns and vocabulary slice, with KV pools (dense and streaming)
    and page selector over its own KV heads. Page ids are the driver's: every rank has the same pages."""

    def __init__(
        self, cfg: ModelConfig, weights: dict[str, Weight], ops: Ops, ecfg: EngineConfig, max_len: int,
        num_pages: int, layout: KVLayout | None, num_stream_pages: int, comm: Communicator,
        kv_format: KVFormat | None = None,
    ):  # fmt: skip
        """`cfg`, `weights` and `layout`: the whole model's (this rank takes its shard of them); `kv_format`: the
        KV cache's format (None: the backend's float type)."""
        self.shard = shard_of(cfg, comm.rank, comm.world)
        self.cfg = shard_config(cfg, self.shard)
        self.ops = ops
        self.model = LlamaModel(self.cfg, shard_weights(weights, cfg, self.shard), ops, max_len, comm)
        self.layout = layout.heads(*self.shard.kv_heads) if layout is not None else None
        self.cache = ops.alloc_kv(
            self.cfg, ecfg.page_size, num_pages, self.layout, num_stream_pages, ecfg.max_num_seqs, kv_format
        )
        self.executor = ops.executor(self.model.forward, self.cache, ecfg, self.layout, max_len)
        self._src: list[np.ndarray] | None = None  # the driver's head classes, and this rank's slice of them
        self._mine: list[np.ndarray] = []

    def run(self, step: StepInputs) -> Array:
        """Logits [rows, vocab] (every rank gets all of them) of a step the driver prepared."""
        if self._src is None or not _same(step.head_classes, self._src):
            self._src, self._mine = step.head_classes, self.shard.head_classes(step.head_classes)
        # one list object while the classes stay the same: executors cache their uploads by identity
        return self.executor.run(self.executor.plan(replace(step, head_classes=self._mine)))

    def copy_stream_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.ops.copy_stream_pages(self.cache, src, dst)

    def clear_pages(self, pages: np.ndarray, stream_pages: np.ndarray) -> None:
        self.ops.clear_pages(self.cache, pages, stream_pages)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
