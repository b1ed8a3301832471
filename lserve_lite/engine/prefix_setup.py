"""The engine's prefix cache: the cache it builds (bounded, with no dense head, by what the streaming pool's
snapshots can resume) and the salt that keys a request's pages beside their token ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import EngineConfig, ModelConfig
from ..geometry import pages_for
from ..kv.layout import KVLayout
from ..kv.prefix_cache import PrefixCache, kv_salt, snapshot_chain_pages
from ..kv.quant import KVFormat
from ..sequence import Sequence
from .model_runner import ModelRunner


def prefix_cache(
    ecfg: EngineConfig, layout: KVLayout | None, num_stream: int, max_len: int
) -> PrefixCache | None:
    """The prefix cache (None when turned off); in LServe mode only prompt K/V is cacheable, and with no dense
    head the idle pages are bounded by what the `num_stream` streaming pages' snapshots can resume."""
    if not ecfg.prefix_caching:
        return None
    lay, sp, ps = layout, ecfg.sparse, ecfg.page_size
    if lay is None:
        return PrefixCache(ps)
    window = max(sp.prefill_local, sp.decode_local)
    max_idle = None
    if lay.streaming_only:
        max_idle = snapshot_chain_pages(num_stream, lay.stream_pages_per_seq, pages_for(max_len, ps))
    return PrefixCache(ps, lay.sink_pages, lay.ring_pages, window, prompt_only=True, max_idle=max_idle)


def seq_kv_salt(
    seq: Sequence, model_dir: Path, cfg: ModelConfig, ecfg: EngineConfig, dtype: object, kv_format: KVFormat,
    runner: ModelRunner, layout: KVLayout | None,
) -> bytes:  # fmt: skip
    """What besides token ids changes a page's K/V or its streaming snapshot: model, KV dtype, layout,
    the runner's head classes and windows and, with streaming heads, the request's prefill windows
    (streaming heads feed every later layer). Decode knobs do not: decode K/V is never cached in LServe
    mode (PrefixCache.prompt_only). The request's cache_salt, where it has one, keeps its pages to requests of
    that salt (vLLM's: in the first page's key, which every later key chains from); unsalted keys are unchanged."""
    run, lay = runner, layout
    parts = [str(model_dir), repr(cfg), np.dtype(dtype).str, kv_format.name, ecfg.page_size,
             [c.tobytes() for c in run.head_classes], run.sink, run.local]  # fmt: skip
    if lay is not None:
        sp = seq.sparse or ecfg.sparse
        parts += [lay.sink_pages, lay.ring_pages, lay.sub_pages]
        parts += [sp.prefill_sink, sp.prefill_local] if lay.has_streaming else []
    parts += [("cache_salt", seq.cache_salt)] if seq.cache_salt is not None else []
    return kv_salt(*parts)
