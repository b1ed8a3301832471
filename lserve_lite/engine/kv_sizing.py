"""The KV cache's shape as the engine sees it: LServe's layout from the head pattern, the context limit and chunk
it is sized for, the pools' use, and the startup line that says what was sized."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import MASS_MAX_GROUP, ORACLE_REDUCE, EngineConfig, ModelConfig
from ..errors import InvalidRequestError
from ..kv.block_manager import BlockManager
from ..kv.layout import KVLayout, kv_summary, page_bytes, pool_context
from ..sparse.patterns import head_classes, resolve_pattern


def check_oracle(ecfg: EngineConfig, supported: bool) -> None:
    """The oracle selector reads float keys in the CPU reference; refused elsewhere, at start."""
    if ecfg.sparse.enabled and ecfg.sparse.group_reduce == ORACLE_REDUCE and not supported:
        raise InvalidRequestError(
            "group_reduce oracle is an evaluation selector of the CPU backend with a float KV cache"
        )


def kv_layout(model_dir: Path, cfg: ModelConfig | None, ecfg: EngineConfig) -> KVLayout | None:
    """LServe mode: head classes from the pattern (static sparsity) and the two-pool geometry."""
    sp = ecfg.sparse
    if not sp.enabled:
        return None
    c = cfg
    if sp.group_reduce == "mass" and c.num_heads // c.num_kv_heads > MASS_MAX_GROUP:
        raise InvalidRequestError(
            f"group_reduce mass handles at most {MASS_MAX_GROUP} query heads per KV head (this model: "
            f"{c.num_heads // c.num_kv_heads}); start with --group-reduce max"
        )
    if sp.static_sparsity > 0 or sp.pattern_path:  # a pattern given is read where no head streams too
        gates = resolve_pattern(model_dir, c.num_layers, c.num_kv_heads, sp.pattern_path)
        classes = head_classes(gates, sp.static_sparsity)
    else:
        classes = [np.zeros(c.num_kv_heads, np.int32)] * c.num_layers
    return KVLayout.sparse(sp, classes, max_chunk(c, ecfg), context_limit(c, ecfg))


def context_limit(cfg: ModelConfig, ecfg: EngineConfig) -> int:
    """The context limit as known before the KV pools are sized: the configured (or the model's) one, cut to
    an explicit num_kv_pages (LServe's rings and sinks were sized for contexts the pool can never hold)."""
    max_len, pages = ecfg.resolve_max_len(cfg), ecfg.num_kv_pages
    return max_len if pages is None else pool_context(max_len, pages, ecfg.page_size)


def max_chunk(cfg: ModelConfig, ecfg: EngineConfig) -> int:
    """The most tokens of one sequence a step computes (what LServe's ring holds beside the window): a chunk
    is at most the step's budget and at most the context, whichever is less."""
    return min(ecfg.max_num_batched_tokens, context_limit(cfg, ecfg))


def pools_in_use(blocks: BlockManager, layout: KVLayout | None) -> dict[str, tuple[int, int]]:
    """(pages sequences hold, pages) per KV pool (/metrics, the startup line): "context", the pool that holds
    the context (the dense pool; with no dense head, whose pages are ids without bytes, the streaming pool),
    and beside it in LServe mode with both kinds of heads, "streaming"."""
    b, lay = blocks, layout
    dense, stream = (b.num_dense_used, b.num_pages), (b.num_stream_used, b.num_stream_pages)
    if lay is None or not lay.has_streaming:
        return {"context": dense}
    return {"context": stream} if lay.streaming_only else {"context": dense, "streaming": stream}


def kv_line(
    cfg: ModelConfig, ecfg: EngineConfig, layout: KVLayout | None, format_name: str, kv_bytes: int, itemsize: int,
    max_len: int, blocks: BlockManager,
) -> str:  # fmt: skip
    """The KV cache in one line (startup logs): format, capacity in tokens, bytes per token of the pool that
    holds the context (LServe: the dense heads' pages, statistics included; the streaming pool's bytes and
    sequences beside it); and a context limit set past the model's trained positions (allowed, and said), or
    a model that names none (its limit assumed, or max_model_len's)."""
    lay, ps, name = layout, ecfg.page_size, format_name
    pages = pools_in_use(blocks, layout)["context"][1]
    if lay is None:
        per_tok = cfg.num_layers * cfg.num_kv_heads * kv_bytes
        line = kv_summary(name, pages, ps, per_tok)
    else:
        dense_b, stream_b = page_bytes(cfg, ps, kv_bytes, lay, itemsize)
        stream, per_seq = blocks.num_stream_pages, lay.stream_pages_per_seq
        token_b = (stream_b if lay.streaming_only else dense_b) // ps
        line = kv_summary(name, pages, ps, token_b, streaming_only=lay.streaming_only)
        if per_seq:
            n = stream // per_seq
            gib = stream * stream_b / 2**30  # beside the context's pool, from the same KV memory
            line += (
                f"; streaming pool {stream} pages (sink + local window, {gib:.2f} GiB): "
                f"{n} sequence{'s' * (n != 1)} at once"
            )
    trained = cfg.max_position_embeddings
    if cfg.context_assumed:
        asked = ecfg.max_model_len
        # fit_context cut it to what the pool holds: that limit is the one kept
        if max_len < (asked or trained):
            under = f"--max-model-len's {asked}" if asked else f"{trained} assumed"
            limit = f"{max_len}, what the KV pool holds, under {under}"
        else:
            limit = "--max-model-len's" if asked else f"{trained} assumed; --max-model-len sets another"
        return f"{line}; the model names no trained context length (limit {limit})"
    if max_len > trained:
        line += f"; context limit {max_len} past the model's {trained} trained positions (extrapolated)"
    return line
