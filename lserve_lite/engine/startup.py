"""Loading the model for an engine: the whole of it in this process on one backend, with its KV pools and buffers
sized to the memory, or tensor-parallel workers that each load a shard (engine/tp_group.py); either way what the
engine then runs with (EngineParts)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import make_ops, resolve_backend
from ..backends.group import host_ops
from ..backends.memory import check_buffers, host_left
from ..config import ORACLE_REDUCE, EngineConfig, ModelConfig
from ..kv.layout import KVLayout, fit_context, pool_pages, pools_bytes
from ..kv.quant import KVFormat, resolve_kv_format
from ..tokenizer import Tokenizer
from ..weights.loader import load_config, load_model, load_tokenizer
from .kv_sizing import check_oracle, kv_layout
from .model_runner import ModelRunner
from .tp_group import WorkerGroup, tensor_parallel_runner


@dataclass
class EngineParts:
    """What an engine runs with once its model is loaded, and its KV pools' page counts."""

    cfg: ModelConfig
    tokenizer: Tokenizer
    layout: KVLayout | None
    backend: str  # what runs the model (logs, bench)
    ops: Any  # the backend's Ops (the host's with tensor parallelism)
    max_len: int  # the context limit, fitted to the pools
    kv_format: KVFormat
    itemsize: int  # the cache's float type (page statistics)
    kv_bytes: int  # one token's K and V of one KV head in that format, scales included: what sizes a page
    runner: ModelRunner
    host_left: tuple[int, str]  # what `score`'s logits may take of the host (memory.host_left)
    num_pages: int  # dense pages
    num_stream: int  # streaming pages
    weight_bytes: int | None = None  # what the backend holds of the weights (None: the workers hold them)
    group: WorkerGroup | None = None  # the tensor-parallel workers, if any


def load_local(model_dir: Path, backend: str, ecfg: EngineConfig) -> EngineParts:
    """The whole model in this process on one backend."""
    # LServe's layout (head pattern, group size) needs only the config: a bad one is refused before the weights
    # load (a bf16 or --quantize'd checkpoint is converted whole there)
    cfg = load_config(model_dir) if ecfg.sparse.enabled else None
    layout = kv_layout(model_dir, cfg, ecfg)
    loaded = load_model(model_dir, ecfg.quantize)
    cfg, tokenizer, weights = loaded.cfg, loaded.tokenizer, loaded.weights
    backend = resolve_backend(backend)
    ops = make_ops(backend)
    max_len = ecfg.resolve_max_len(cfg)
    # What the backend will hold (quantized matrices in its layout, floats at its type), reserved from the KV
    # budget before the upload (the budget only matters on the GPU).
    weight_bytes = sum(ops.weight_bytes(w) for w in weights.values())
    kv_format = resolve_kv_format(ecfg.kv_dtype, ops.kv_dtypes, cfg.head_dim)
    # one token's K and V of one KV head in that format, scales included: what sizes a page
    itemsize = np.dtype(ops.dtype).itemsize  # the cache's float type (page statistics)
    kv_bytes = kv_format.kv_bytes(cfg.head_dim, itemsize)
    check_oracle(ecfg, ORACLE_REDUCE in ops.selector_reductions and not kv_format.quantized)
    num_pages, num_stream = _num_pages(ops, cfg, ecfg, kv_bytes, itemsize, weight_bytes, layout)
    max_len, layout = fit_context(max_len, num_pages, ecfg.page_size, layout)
    # The buffers the config and the limits size (Ops.buffer_needs: logits, activations, RoPE tables, CUDA
    # Graphs) must fit beside the weights and the KV pools, checked before any of them is allocated.
    kv = pools_bytes(cfg, ecfg.page_size, kv_bytes, layout, ecfg.max_num_seqs, num_pages, num_stream,
                     stat_itemsize=itemsize)  # fmt: skip
    where = f"the {backend} backend's memory beside the weights and the KV cache"
    left = check_buffers(ops, cfg, ecfg, max_len, layout, weight_bytes + kv, where)
    runner = ModelRunner(
        cfg, weights, ops, ecfg, max_len, num_pages, layout, num_stream, kv_format=kv_format,
    )  # fmt: skip
    loaded.drop_file_pages()
    return EngineParts(
        cfg=cfg, tokenizer=tokenizer, layout=layout, backend=backend, ops=ops, max_len=max_len, kv_format=kv_format,
        itemsize=itemsize, kv_bytes=kv_bytes, runner=runner, host_left=host_left(ops.memory_is_host, left),
        num_pages=num_pages, num_stream=num_stream, weight_bytes=weight_bytes,
    )  # fmt: skip


def start_workers(model_dir: Path, backend: str, ecfg: EngineConfig) -> EngineParts:
    """Tensor parallel: the workers load their shards; the driver keeps the config, tokenizer, scheduler
    and planner (engine/tp_group.py)."""
    cfg, tokenizer = load_config(model_dir), load_tokenizer(model_dir)
    ops, layout = host_ops(), kv_layout(model_dir, cfg, ecfg)
    check_oracle(ecfg, False)
    max_len = ecfg.resolve_max_len(cfg)
    runner, num_pages, num_stream = tensor_parallel_runner(model_dir, backend, cfg, ecfg, layout, max_len)
    # the workers resolved the KV format on their backend and device
    group = runner.executor
    kv_format, itemsize = group.kv_format, group.itemsize
    return EngineParts(
        cfg=cfg, tokenizer=tokenizer,
        layout=runner.layout, max_len=runner.max_len,  # both fitted to the pools (fit_context)
        backend=f"{group.backend}, tensor parallel {len(group.procs)}", ops=ops,  # ops are the host's
        kv_format=kv_format, itemsize=itemsize, kv_bytes=kv_format.kv_bytes(cfg.head_dim, itemsize), runner=runner,
        host_left=group.host_left, num_pages=num_pages, num_stream=num_stream, group=group,
    )  # fmt: skip


def say_assumed_context(model_dir: Path, cfg: ModelConfig, ecfg: EngineConfig) -> None:
    """One line on stderr where the context limit is a default the model never named: a model trained longer
    would be cut there without a word (a GGUF without context_length ran to 4096 tokens so)."""
    c = cfg
    if c.context_assumed and ecfg.max_model_len is None:
        print(
            f"lserve-lite: {model_dir}: the model names no trained context length (max_position_embeddings"
            f", a GGUF's context_length): assuming {c.max_position_embeddings}, transformers' default for "
            f"{c.arch}; --max-model-len (max_model_len=) sets the limit",
            file=sys.stderr,
            flush=True,
        )


def _num_pages(
    ops: Any, cfg: ModelConfig, ecfg: EngineConfig, kv_bytes: int, itemsize: int, weight_bytes: int,
    layout: KVLayout | None,
) -> tuple[int, int]:  # fmt: skip
    """(dense-pool pages, streaming-pool pages) from the configured count or the memory budget."""
    e = ecfg
    budget = ops.kv_budget_bytes(e.kv_memory_fraction, weight_bytes)
    limit = ops.kv_limit_bytes(weight_bytes)
    return pool_pages(cfg, e.page_size, kv_bytes, budget, layout, e.max_num_seqs,
                      e.num_kv_pages, stat_itemsize=itemsize, limit=limit)  # fmt: skip
