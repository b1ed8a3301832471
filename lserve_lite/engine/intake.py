"""A request's checks before it is queued, each a one-line InvalidRequestError: its id, argument types and cache
salt, its token ids (the vocabulary's and the context's rules), its sampling params against the model, and its
per-request LServe knobs against the engine's pools."""

from __future__ import annotations

import numpy as np

from ..config import EngineConfig, ModelConfig, SparseConfig
from ..errors import InvalidRequestError
from ..geometry import ring_fits, ring_window, sink_fits
from ..kv.layout import KVLayout
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from .kv_sizing import context_limit, max_chunk

MAX_CACHE_SALT = 256  # characters of a cache salt: a client's name for its pages, not a payload


class PromptIds(tuple):
    """A prompt's token ids as `LLMEngine.prompt_ids` checked them (immutable): add_request takes them without checking
    again, so the n candidates of one prompt are checked once, not n times (a Python pass over every id each)."""


def check_request_id(request_id: object) -> None:
    """Request ids key the engine's tables: a non-empty str, or a one-line error instead of a TypeError."""
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError(f"request_id must be a non-empty str, got {request_id!r:.60}")


def check_cache_salt(salt: object) -> None:
    """vLLM's cache_salt (None: no salt) as a non-empty string, bounded: it keys a client's prefix-cache pages."""
    if salt is None or (isinstance(salt, str) and 0 < len(salt) <= MAX_CACHE_SALT):
        return
    got = (f"{len(salt)} characters" if salt else "''") if isinstance(salt, str) else type(salt).__name__
    raise InvalidRequestError(
        f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters, got {got}"
    )


def check_request(params: object, sparse: object, request_id: object, cache_salt: object = None) -> None:
    """add_request's arguments' types (the request id where one is given) and its cache salt."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
    if sparse is not None and not isinstance(sparse, dict):
        raise InvalidRequestError(f"sparse must be a dict of LServe knobs, got {type(sparse).__name__}")
    if request_id is not None:
        check_request_id(request_id)
    check_cache_salt(cache_salt)


def check_prompt_room(ids: list[int], params: SamplingParams, max_len: int, vocab_size: int) -> None:
    """A prompt with room for its output in the context, one sequence a request, and logit_bias / stop_token_ids of
    the model's vocabulary."""
    # room for an output token, except for one token alone (scoring a whole context): sampled from the
    # prompt's last position, it never enters the KV cache (the engine's _append ends it by length)
    if len(ids) > max_len or (len(ids) == max_len and params.max_new_tokens > 1):
        raise InvalidRequestError(too_long("prompt", len(ids), max_len))
    if params.n != 1:
        raise InvalidRequestError("one sequence per engine request: add params.candidates() for n > 1")
    for what, ids_ in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids_ if t >= vocab_size]
        if bad:
            raise InvalidRequestError(f"{what} token id {bad[0]} is not in [0, {vocab_size})")


def encode_prompt(tokenizer: Tokenizer, text: str, vocab_size: int) -> list[int]:
    """A text prompt's token ids (here and in the server); a tokenizer with more tokens than the model's embedding
    rows (an added token the checkpoint was never resized for) would give an id the model has no row for:
    refused, naming it."""
    ids = tokenizer.encode(text)
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"prompt token {tokenizer.tok.id_to_token(bad)!r:.60} (id {bad}) is outside the model's "
            f"vocabulary [0, {vocab_size}): the tokenizer has more tokens than the model"
        )
    return ids


def check_count(ids, what: str, max_len: int) -> None:
    """Token ids as a sized sequence of 1 to `max_len` of them, checked before any id is read (10^8 ids were copied
    one by one before their count was refused)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise InvalidRequestError(f"{what} must be a list of token ids")
    if len(ids) == 0:
        raise InvalidRequestError(f"{what} is empty")
    if len(ids) > max_len:
        raise InvalidRequestError(too_long(what, len(ids), max_len))


def vocab_ids(ids, what: str, vocab_size: int) -> list[int]:
    """Token ids as a list of ints in [0, vocab), of any length: the one home of the vocabulary's rule (the
    server's /tokenize counts a rendered conversation of any length with it)."""
    out = []
    for t in ids:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise InvalidRequestError(f"{what} token ids must be integers, got {t!r}")
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"{what} token ids must be in [0, {vocab_size}), got {int(t)}")
        out.append(int(t))
    return out


def too_long(what: str, n: int, max_len: int) -> str:
    """The one line of a prompt (with room for its output) or a scored sequence past the context limit."""
    room = " (prompt + output)" if what == "prompt" else ""
    return f"{what} has {n} tokens; the context limit is {max_len}{room}"


def request_sparse_config(
    knobs: dict, ecfg: EngineConfig, cfg: ModelConfig, layout: KVLayout | None
) -> SparseConfig:
    """The engine's SparseConfig with a request's knobs (budget, select interval, windows) applied."""
    sp = ecfg.sparse
    if not sp.enabled:
        raise InvalidRequestError("per-request sparse knobs need an engine started in sparse mode")
    fixed = {
        "enabled",
        "static_sparsity",
        "page_size",
        "sub_pages",
        "pattern_path",
        "group_reduce",
    } & set(knobs)
    if fixed:
        raise InvalidRequestError(
            f"sparse knob(s) {sorted(fixed)} are fixed per engine (KV memory layout, selector rule)"
        )
    req = sp.with_knobs(knobs)
    lay, ps, ctx, chunk = layout, ecfg.page_size, context_limit(cfg, ecfg), max_chunk(cfg, ecfg)
    local, sink = max(req.prefill_local, req.decode_local), max(req.prefill_sink, req.decode_sink)
    if not ring_fits(local, lay.ring_pages, chunk, ps, ctx, lay.sink_pages):
        raise InvalidRequestError(
            f"per-request local windows must fit the engine's streaming ring: up to "
            f"{ring_window(lay.ring_pages, chunk, ps)} tokens beside a {chunk}-token prefill chunk, got {local}"
        )
    if not sink_fits(sink, lay.sink_pages, ps, ctx):
        raise InvalidRequestError(
            f"per-request sinks must fit the engine's streaming pool: up to {lay.sink_pages * ps} tokens, got {sink}"
        )
    if req.token_budget > sp.token_budget:
        raise InvalidRequestError(f"token_budget above the engine's {sp.token_budget} is not possible")
    return req
