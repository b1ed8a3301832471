"""The engine loop: requests in, one scheduled model step at a time, text deltas out."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..backends import make_ops, resolve_backend
from ..backends.base import SampledTokens
from ..backends.group import host_ops
from ..backends.memory import (
    LOGIT_BYTES,
    MemoryNeed,
    check_buffers,
    check_needs,
    host_left,
)
from ..config import MASS_MAX_GROUP, ORACLE_REDUCE, EngineConfig, SparseConfig
from ..errors import InvalidRequestError, LServeError
from ..geometry import pages_for, ring_fits, ring_window, sink_fits
from ..kv.block_manager import BlockManager
from ..kv.layout import KVLayout, fit_context, kv_summary, page_bytes, pool_context, pool_pages, pools_bytes
from ..kv.prefix_cache import PrefixCache, kv_salt, snapshot_chain_pages
from ..kv.quant import resolve_kv_format
from ..sampling_params import SamplingParams
from ..sequence import Sequence, Status, TokenLogprob
from ..sparse.patterns import head_classes, resolve_pattern
from ..tokenizer import IncrementalDecoder
from ..weights.loader import load_config, load_model, load_tokenizer, model_name, resolve_model_dir
from .interrupts import ctrl_c_held
from .logprobs import record_prompt_logprobs, record_token_logprobs
from .model_runner import ModelRunner
from .scheduler import ScheduledBatch, Scheduler
from .structured import Grammars, advance, failure
from .tp_group import WorkerGroup, tensor_parallel_runner


@dataclass
class StepOutput:
    """What one step produced for one request: new text and ids, and whether it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of `token_ids`, when asked for
    seq: Sequence | None = field(default=None, repr=False)
    error: str | None = None  # the one line that says why the request failed (logits it could not sample)


class PromptIds(tuple):
    """A prompt's token ids as `LLMEngine.prompt_ids` checked them (immutable): add_request takes them without checking
    again, so the n candidates of one prompt are checked once, not n times (a Python pass over every id each)."""


@dataclass
class _InFlight:
    """A launched decode step whose sampled ids the host has not read yet; each of its sequences holds a
    placeholder as its last output id meanwhile."""

    seqs: list[Sequence]
    tokens: SampledTokens


PLACEHOLDER = -1  # output id of a token sampled on the device and not read back yet


class LLMEngine:
    """Model + tokenizer + scheduler + runner for one backend; not thread-safe except `abort`."""

    def __init__(self, model: str | None = None, backend: str = "auto", config: EngineConfig | None = None):
        self.ecfg = config or EngineConfig()
        self._group: WorkerGroup | None = None  # the tensor-parallel workers, if any
        self.model_dir = resolve_model_dir(model)  # an HF directory or a GGUF file
        self.model_name = model_name(self.model_dir)
        if self.ecfg.tensor_parallel is None:
            num_pages, num_stream = self._load_local(backend)
        else:
            num_pages, num_stream = self._start_workers(backend)
        self._say_assumed_context()
        per_seq = self.layout.stream_pages_per_seq if self.layout else 0
        slots = self.ecfg.max_num_seqs if self.layout and self.layout.select_pages else 0  # rows of sel_idx
        self.blocks = BlockManager(
            num_pages, self.ecfg.page_size, num_stream, per_seq, slots, self._prefix_cache(num_stream)
        )
        self.scheduler = Scheduler(self.blocks, self.ecfg.max_num_seqs, self.ecfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.decoders: dict[str, IncrementalDecoder] = {}
        self._aborts: list[Sequence] = []
        # Reentrant: a stream's clean-up calls abort wherever garbage collection closes it, this engine's own
        # locked blocks included.
        self._lock = threading.RLock()
        self._ids = itertools.count()  # generated request ids
        self.eos_ids = set(self.cfg.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, self.cfg.vocab_size, sorted(self.eos_ids))
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (recomputation included)
        self._inflight: _InFlight | None = None  # the overlapped decode step (docs/ARCHITECTURE.md)
        self._ready: list[StepOutput] = []  # outputs of a step in flight that `score` read: the next step's
        self._closed = False

    def _load_local(self, backend: str) -> tuple[int, int]:
        """The whole model in this process on one backend; (dense pages, streaming pages)."""
        # LServe's layout (head pattern, group size) needs only the config: a bad one is refused before the weights
        # load (a bf16 or --quantize'd checkpoint is converted whole there)
        self.cfg = load_config(self.model_dir) if self.ecfg.sparse.enabled else None
        self.layout = self._kv_layout()
        loaded = load_model(self.model_dir, self.ecfg.quantize)
        self.cfg, self.tokenizer, weights = loaded.cfg, loaded.tokenizer, loaded.weights
        self.backend = resolve_backend(backend)  # what runs the model (logs, bench)
        self.ops = make_ops(self.backend)
        self.max_len = self.ecfg.resolve_max_len(self.cfg)
        # What the backend will hold (quantized matrices in its layout, floats at its type), reserved from the KV
        # budget before the upload (the budget only matters on the GPU).
        self.weight_bytes = sum(self.ops.weight_bytes(w) for w in weights.values())
        self.kv_format = resolve_kv_format(self.ecfg.kv_dtype, self.ops.kv_dtypes, self.cfg.head_dim)
        # one token's K and V of one KV head in that format, scales included: what sizes a page
        self.itemsize = np.dtype(self.ops.dtype).itemsize  # the cache's float type (page statistics)
        self.kv_bytes = self.kv_format.kv_bytes(self.cfg.head_dim, self.itemsize)
        self._check_oracle(ORACLE_REDUCE in self.ops.selector_reductions and not self.kv_format.quantized)
        num_pages, num_stream = self._num_pages()
        self.max_len, self.layout = fit_context(self.max_len, num_pages, self.ecfg.page_size, self.layout)
        self._check_buffers(num_pages, num_stream)
        self.runner = ModelRunner(
            self.cfg, weights, self.ops, self.ecfg, self.max_len, num_pages, self.layout, num_stream,
            kv_format=self.kv_format,
        )  # fmt: skip
        loaded.drop_file_pages()
        return num_pages, num_stream

    def _start_workers(self, backend: str) -> tuple[int, int]:
        """Tensor parallel: the workers load their shards; the driver keeps the config, tokenizer, scheduler
        and planner (engine/tp_group.py). (dense pages, streaming pages)."""
        self.cfg, self.tokenizer = load_config(self.model_dir), load_tokenizer(self.model_dir)
        self.ops, self.layout = host_ops(), self._kv_layout()
        self._check_oracle(False)
        max_len = self.ecfg.resolve_max_len(self.cfg)
        self.runner, num_pages, num_stream = tensor_parallel_runner(
            self.model_dir, backend, self.cfg, self.ecfg, self.layout, max_len
        )
        # the workers resolved the KV format on their backend and device
        group = self._group = self.runner.executor
        self.kv_format = group.kv_format
        self.backend = f"{group.backend}, tensor parallel {len(group.procs)}"  # self.ops are the host's
        self.itemsize = group.itemsize
        self.kv_bytes = self.kv_format.kv_bytes(self.cfg.head_dim, self.itemsize)
        self.max_len = self.runner.max_len  # both fitted to the pools (fit_context)
        self.layout = self.runner.layout
        self._host_left = group.host_left  # what `score`'s logits may take
        return num_pages, num_stream

    def _say_assumed_context(self) -> None:
        """One line on stderr where the context limit is a default the model never named: a model trained longer
        would be cut there without a word (a GGUF without context_length ran to 4096 tokens so)."""
        c = self.cfg
        if c.context_assumed and self.ecfg.max_model_len is None:
            print(
                f"lserve-lite: {self.model_dir}: the model names no trained context length (max_position_embeddings"
                f", a GGUF's context_length): assuming {c.max_position_embeddings}, transformers' default for "
                f"{c.arch}; --max-model-len (max_model_len=) sets the limit",
                file=sys.stderr,
                flush=True,
            )

    def _prefix_cache(self, num_stream: int) -> PrefixCache | None:
        """The prefix cache (None when turned off); in LServe mode only prompt K/V is cacheable, and with no dense
        head the idle pages are bounded by what the `num_stream` streaming pages' snapshots can resume."""
        if not self.ecfg.prefix_caching:
            return None
        lay, sp, ps = self.layout, self.ecfg.sparse, self.ecfg.page_size
        if lay is None:
            return PrefixCache(ps)
        window = max(sp.prefill_local, sp.decode_local)
        max_idle = None
        if lay.streaming_only:
            max_idle = snapshot_chain_pages(num_stream, lay.stream_pages_per_seq, pages_for(self.max_len, ps))
        return PrefixCache(ps, lay.sink_pages, lay.ring_pages, window, prompt_only=True, max_idle=max_idle)

    def _kv_salt(self, seq: Sequence) -> bytes:
        """What besides token ids changes a page's K/V or its streaming snapshot: model, KV dtype, layout,
        the runner's head classes and windows and, with streaming heads, the request's prefill windows
        (streaming heads feed every later layer). Decode knobs do not: decode K/V is never cached in LServe
        mode (PrefixCache.prompt_only)."""
        run, lay = self.runner, self.layout
        parts = [str(self.model_dir), repr(self.cfg), np.dtype(self.ops.dtype).str, self.kv_format.name, self.ecfg.page_size,
                 [c.tobytes() for c in run.head_classes], run.sink, run.local]  # fmt: skip
        if lay is not None:
            sp = seq.sparse or self.ecfg.sparse
            parts += [lay.sink_pages, lay.ring_pages, lay.sub_pages]
            parts += [sp.prefill_sink, sp.prefill_local] if lay.has_streaming else []
        return kv_salt(*parts)

    def _check_oracle(self, supported: bool) -> None:
        """The oracle selector reads float keys in the CPU reference; refused elsewhere, at start."""
        if self.ecfg.sparse.enabled and self.ecfg.sparse.group_reduce == ORACLE_REDUCE and not supported:
            raise InvalidRequestError(
                "group_reduce oracle is an evaluation selector of the CPU backend with a float KV cache"
            )

    def _kv_layout(self) -> KVLayout | None:
        """LServe mode: head classes from the pattern (static sparsity) and the two-pool geometry."""
        sp = self.ecfg.sparse
        if not sp.enabled:
            return None
        c = self.cfg
        if sp.group_reduce == "mass" and c.num_heads // c.num_kv_heads > MASS_MAX_GROUP:
            raise InvalidRequestError(
                f"group_reduce mass handles at most {MASS_MAX_GROUP} query heads per KV head (this model: "
                f"{c.num_heads // c.num_kv_heads}); start with --group-reduce max"
            )
        if sp.static_sparsity > 0 or sp.pattern_path:  # a pattern given is read where no head streams too
            gates = resolve_pattern(self.model_dir, c.num_layers, c.num_kv_heads, sp.pattern_path)
            classes = head_classes(gates, sp.static_sparsity)
        else:
            classes = [np.zeros(c.num_kv_heads, np.int32)] * c.num_layers
        return KVLayout.sparse(sp, classes, self._max_chunk(), self._context_limit())

    def _context_limit(self) -> int:
        """The context limit as known before the KV pools are sized: the configured (or the model's) one, cut to
        an explicit num_kv_pages (LServe's rings and sinks were sized for contexts the pool can never hold)."""
        max_len, pages = self.ecfg.resolve_max_len(self.cfg), self.ecfg.num_kv_pages
        return max_len if pages is None else pool_context(max_len, pages, self.ecfg.page_size)

    def _max_chunk(self) -> int:
        """The most tokens of one sequence a step computes (what LServe's ring holds beside the window): a chunk
        is at most the step's budget and at most the context, whichever is less."""
        return min(self.ecfg.max_num_batched_tokens, self._context_limit())

    def _num_pages(self) -> tuple[int, int]:
        """(dense-pool pages, streaming-pool pages) from the configured count or the memory budget."""
        e = self.ecfg
        budget = self.ops.kv_budget_bytes(e.kv_memory_fraction, self.weight_bytes)
        limit = self.ops.kv_limit_bytes(self.weight_bytes)
        return pool_pages(self.cfg, e.page_size, self.kv_bytes, budget, self.layout, e.max_num_seqs,
                          e.num_kv_pages, stat_itemsize=self.itemsize, limit=limit)  # fmt: skip

    def _check_buffers(self, num_pages: int, num_stream: int) -> None:
        """The buffers the config and the limits size (Ops.buffer_needs: logits, activations, RoPE tables, CUDA
        Graphs) must fit beside the weights and the KV pools, checked before any of them is allocated."""
        e = self.ecfg
        kv = pools_bytes(self.cfg, e.page_size, self.kv_bytes, self.layout, e.max_num_seqs, num_pages, num_stream,
                         stat_itemsize=self.itemsize)  # fmt: skip
        where = f"the {self.backend} backend's memory beside the weights and the KV cache"
        left = check_buffers(self.ops, self.cfg, e, self.max_len, self.layout, self.weight_bytes + kv, where)
        self._host_left = host_left(self.ops.memory_is_host, left)  # what `score`'s logits may take

    def kv_summary(self) -> str:
        """The KV cache in one line (startup logs): format, capacity in tokens, bytes per token of the pool that
        holds the context (LServe: the dense heads' pages, statistics included; the streaming pool's bytes and
        sequences beside it); and a context limit set past the model's trained positions (allowed, and said), or
        a model that names none (its limit assumed, or max_model_len's)."""
        lay, ps, name = self.layout, self.ecfg.page_size, self.kv_format.name
        pages = self.kv_pages()["context"][1]
        if lay is None:
            per_tok = self.cfg.num_layers * self.cfg.num_kv_heads * self.kv_bytes
            line = kv_summary(name, pages, ps, per_tok)
        else:
            dense_b, stream_b = page_bytes(self.cfg, ps, self.kv_bytes, lay, self.itemsize)
            stream, per_seq = self.blocks.num_stream_pages, lay.stream_pages_per_seq
            token_b = (stream_b if lay.streaming_only else dense_b) // ps
            line = kv_summary(name, pages, ps, token_b, streaming_only=lay.streaming_only)
            if per_seq:
                n = stream // per_seq
                gib = stream * stream_b / 2**30  # beside the context's pool, from the same KV memory
                line += (
                    f"; streaming pool {stream} pages (sink + local window, {gib:.2f} GiB): "
                    f"{n} sequence{'s' * (n != 1)} at once"
                )
        trained = self.cfg.max_position_embeddings
        if self.cfg.context_assumed:
            asked = self.ecfg.max_model_len
            # fit_context cut it to what the pool holds: that limit is the one kept
            if self.max_len < (asked or trained):
                under = f"--max-model-len's {asked}" if asked else f"{trained} assumed"
                limit = f"{self.max_len}, what the KV pool holds, under {under}"
            else:
                limit = "--max-model-len's" if asked else f"{trained} assumed; --max-model-len sets another"
            return f"{line}; the model names no trained context length (limit {limit})"
        if self.max_len > trained:
            line += (
                f"; context limit {self.max_len} past the model's {trained} trained positions (extrapolated)"
            )
        return line

    def kv_pages(self) -> dict[str, tuple[int, int]]:
        """(pages sequences hold, pages) per KV pool (/metrics, the startup line): "context", the pool that holds
        the context (the dense pool; with no dense head, whose pages are ids without bytes, the streaming pool),
        and beside it in LServe mode with both kinds of heads, "streaming"."""
        b, lay = self.blocks, self.layout
        dense, stream = (b.num_dense_used, b.num_pages), (b.num_stream_used, b.num_stream_pages)
        if lay is None or not lay.has_streaming:
            return {"context": dense}
        return {"context": stream} if lay.streaming_only else {"context": dense, "streaming": stream}

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        sparse: dict | None = None,
        guide: tuple[object, np.ndarray] | None = None,
    ) -> str:
        """Queue a request; `sparse` overrides LServe knobs for it (token_budget, select_interval, windows). `guide`:
        the params' grammar built beforehand (`guide`); else built here."""
        self._check_open()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if sparse is not None and not isinstance(sparse, dict):
            raise InvalidRequestError(f"sparse must be a dict of LServe knobs, got {type(sparse).__name__}")
        if request_id is not None:
            _check_request_id(request_id)
        else:  # skip ids a caller gave explicitly: a generated id must never be refused as a duplicate
            request_id = next(r for r in (f"req-{i}" for i in self._ids) if r not in self.seqs)
        params.validate()  # again: its fields may have changed since it was made
        ids = list(self.prompt_ids(prompt))
        # room for an output token, except for one token alone (scoring a whole context): sampled from the
        # prompt's last position, it never enters the KV cache (_append ends it by length)
        if len(ids) > self.max_len or (len(ids) == self.max_len and params.max_new_tokens > 1):
            raise InvalidRequestError(self._too_long("prompt", len(ids)))
        if params.n != 1:
            raise InvalidRequestError("one sequence per engine request: add params.candidates() for n > 1")
        for what, ids_ in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids_ if t >= self.cfg.vocab_size]
            if bad:
                raise InvalidRequestError(f"{what} token id {bad[0]} is not in [0, {self.cfg.vocab_size})")
        seq = Sequence(ids, params, request_id)
        seq.stop_ids = frozenset(params.stop_token_ids) | frozenset(self.eos_ids)
        if params.constrained:
            seq.guide, seq.token_mask = guide or self.guide(params)
        if sparse:
            seq.sparse = self.request_sparse_config(sparse)
        if seq.request_id in self.seqs:
            raise InvalidRequestError(f"duplicate request id {seq.request_id}")
        seq.kv_salt = self._kv_salt(seq)
        with self._lock:
            self.seqs[seq.request_id] = seq
            keep = self.tokenizer.special_ids(params.keep_special_tokens)
            self.decoders[seq.request_id] = IncrementalDecoder(self.tokenizer, seq.prompt_ids, keep=keep)
            self.scheduler.add(seq)
        return seq.request_id

    def prompt_ids(self, prompt: str | list[int]) -> PromptIds:
        """A prompt's token ids checked (text encoded; ids of the model's vocabulary, not none), as add_request takes
        them: each request of one prompt, or a check made off the engine thread, need not check them again."""
        if type(prompt) is PromptIds:
            return prompt
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else self.check_ids(prompt, "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty (no tokens after tokenizing)")
        return PromptIds(ids)

    def guide(self, params: SamplingParams) -> tuple[object, np.ndarray] | None:
        """The matcher of `params`' response_format and its first mask (None: unconstrained), for add_request's
        `guide`. Thread-safe, and up to seconds for a large schema: callers that take turns on a lock (the server's
        engine thread, LLM's) build it before taking it. An invalid schema is an InvalidRequestError."""
        params.validate()
        return self.grammars.matcher(params.response_format) if params.constrained else None

    def request_sparse_config(self, knobs: dict) -> SparseConfig:
        """The engine's SparseConfig with a request's knobs (budget, select interval, windows) applied."""
        sp = self.ecfg.sparse
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
        lay, ps, ctx, chunk = self.layout, self.ecfg.page_size, self._context_limit(), self._max_chunk()
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

    def fault(self) -> str | None:
        """Why this engine can run no step (a tensor-parallel worker failed or exited), or None."""
        return self._group.fault() if self._group is not None else None

    def close(self) -> None:
        """Stop the tensor-parallel workers now (they stop at exit too, which a process ended by a signal never
        reaches: the server re-raises SIGTERM). No request, step or score runs after, in one process too, and the
        model runner goes now (weights, KV cache), not when this engine is collected: a closed LLM kept in scope
        held all of it. The config, tokenizer and block tables stay (small)."""
        if self._closed:
            return
        self._closed = True
        # a decode step in flight (`_inflight`) stays: it holds what its copy to the host still writes into
        del self.runner
        if self._group is not None:
            self._group.close()

    @property
    def closed(self) -> bool:
        """Whether `close` was called: no step runs any more."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise LServeError("this engine was closed (LLMEngine.close): load a new LLM to go on")

    def abort(self, request_id: str) -> None:
        """Thread-safe: the request in flight under this id now (none: nothing to do) is dropped and its pages freed
        at the start of the next step; a later request that reuses the id is not touched by it."""
        _check_request_id(request_id)  # checked here, not inside a later step()
        with self._lock:
            seq = self.seqs.get(request_id)
            if seq is not None:
                self._aborts.append(seq)

    def run_page_ops(self) -> None:
        """The block manager's page ops (before a step, or after `blocks.grow` outside one: the evaluation harness),
        all of them or none: a Ctrl-C meanwhile is raised after the last (once
        taken, ops left undone were lost: a page never cleared, a prefix-cache snapshot never copied)."""
        if not self.blocks.page_ops:  # most decode steps: no signal handler swapped
            return
        self._check_open()  # a closed engine has no runner
        with ctrl_c_held():
            self.runner.apply_page_ops(self.blocks.take_page_ops())

    def sync(self) -> None:
        """Read the overlapped decode step in flight, if any (its outputs come with the next `step`): before the
        model runs outside the scheduler (`score`, the evaluation harness), whose one-row run uploads its token ids
        where that step's samples lie on the GPU (the next launch read those ids as the requests' tokens)."""
        if self._inflight is not None:
            self._ready += self._read(self._take_inflight())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts) or bool(self._ready)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduled step. A plain decode batch is launched without waiting for the device (`_launch`):
        its outputs come one call later; anything else first reads the step in flight, then runs in sync."""
        self._check_open()
        outs, self._ready = self._ready, []
        outs += self._apply_aborts()
        if self._inflight is not None and self._inflight_ends():
            outs += self._read(self._take_inflight())  # schedule none of them past its limits
        batch = self.scheduler.schedule()
        self.run_page_ops()  # snapshots attached, pages cleared: before any write
        if self._inflight is not None and not self._overlaps(batch):
            outs += self._read(self._take_inflight())
            _drop_finished(batch)
        if not batch.seqs:
            return outs
        self.prompt_tokens_computed += sum(
            max(0, min(s.num_cached + n, len(s.prompt_ids)) - s.num_cached)
            for s, n in zip(batch.seqs, batch.num_new)
        )
        if self._overlaps(batch):
            return outs + self._launch(batch)
        wants = [s.wants_prompt_logprobs for s in batch.seqs]
        logits = self.runner.run(batch.seqs, batch.num_new)
        for seq, n in zip(batch.seqs, batch.num_new):
            self.blocks.cache_computed(seq, n)
        self.run_page_ops()  # snapshots taken, before sequences move on
        last = (
            np.cumsum([n if w else 1 for n, w in zip(batch.num_new, wants)]) - 1
        )  # each sequence's last row
        if any(wants):
            record_prompt_logprobs(self.ops, logits, batch.seqs, batch.num_new, wants)
        done_rows = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new)) if s.num_pending == 0]
        if last[-1] + 1 > len(done_rows):  # rows of sequences still in prefill produce no token
            logits = logits[last[np.asarray(done_rows, np.int64)]] if done_rows else None
        done = [batch.seqs[i] for i in done_rows]
        sound = self.ops.sound_rows(logits).tolist() if done else []
        if not all(sound):  # those requests fail, the others go on
            outs += [self._fail(s, overflowed(s)) for s, ok in zip(done, sound) if not ok]
            keep = np.flatnonzero(sound)
            logits, done = logits[keep], [done[i] for i in keep]
        self.grammars.fill_masks(done)
        tokens = self.ops.sample(logits, done) if done else []
        record_token_logprobs(self.ops, logits, done, tokens)
        for seq, tok in zip(done, tokens):
            outs.append(self._append(seq, tok))
        return outs

    # -- the overlapped decode step ---------------------------------------------------------------
    def _overlaps(self, batch: ScheduledBatch) -> bool:
        """Whether the batch may launch before the host reads its samples: plain decodes on a backend that
        runs asynchronously, each fed by the step in flight (if any), nothing preempted."""
        if not (self.ecfg.async_scheduling and self.ops.async_steps) or batch.preempted:
            return False
        live = set(map(id, self._inflight.seqs)) if self._inflight is not None else None
        return all(
            s.decodes(n) and _plain(s) and (live is None or id(s) in live)
            for s, n in zip(batch.seqs, batch.num_new)
        )

    def _inflight_ends(self) -> bool:
        """The step in flight has no running sequence left, or its sample is the last of one by length
        (max_new_tokens, context limit)."""
        live = [s for s in self._inflight.seqs if not s.is_finished]
        return not live or any(
            len(s.output_ids) >= s.params.max_new_tokens or s.num_tokens >= self.max_len for s in live
        )

    def _launch(self, batch: ScheduledBatch) -> list[StepOutput]:
        """Launch the batch on the previous step's samples (still on the device), then read those back and
        handle them (detokenize, stop checks) while the device computes this one. Sequences that stop there
        computed one token too many: it is never appended (`_read` skips finished sequences)."""
        prev, ids = self._inflight, None
        if prev is not None:
            ids = prev.tokens.ids
            if batch.seqs != prev.seqs:  # some finished or were aborted: gather the survivors' rows
                row = {id(s): i for i, s in enumerate(prev.seqs)}
                ids = ids[self.ops.upload(np.asarray([row[id(s)] for s in batch.seqs], np.int64))]
        logits = self.runner.run(batch.seqs, batch.num_new, ids=ids)
        out = self.runner.ids_row(len(batch.seqs))  # the next step's id row, when it has one
        self._inflight = _InFlight(list(batch.seqs), self.ops.sample_async(logits, batch.seqs, out=out))
        outs = self._read(prev) if prev is not None else []
        for seq in batch.seqs:
            if not seq.is_finished:
                seq.output_ids.append(PLACEHOLDER)  # its pending token for the scheduler's next step
        return outs

    def _take_inflight(self) -> _InFlight:
        fl, self._inflight = self._inflight, None
        return fl

    def _read(self, fl: _InFlight) -> list[StepOutput]:
        """The host's half of an overlapped step: its samples replace the placeholders and are handled as a
        synchronous step handles its tokens; sequences finished (or aborted) meanwhile drop theirs."""
        outs = []
        for seq, tok, ok in zip(fl.seqs, fl.tokens.tolist(), fl.tokens.sound()):
            if seq.is_finished:
                continue
            if not ok:
                seq.output_ids.pop()  # its placeholder
                outs.append(self._fail(seq, overflowed(seq)))
                continue
            # the sample takes its placeholder's place first: a page the step launched since filled is keyed over it
            seq.output_ids[-1] = tok
            if seq.status is Status.RUNNING:  # a preempted one has no pages left to index
                self.blocks.cache_computed(seq, 1)
            seq.output_ids.pop()
            outs.append(self._append(seq, tok))
        return outs

    def _apply_aborts(self) -> list[StepOutput]:
        with self._lock:
            seqs, self._aborts = self._aborts, []
        outs = []
        for seq in seqs:
            if not seq.is_finished:
                if seq.output_ids and seq.output_ids[-1] == PLACEHOLDER:
                    seq.output_ids.pop()  # its token in flight is dropped with it
                self.scheduler.finish(seq, "abort")
                outs.append(self._output(seq, "", []))
        return outs

    def _append(self, seq: Sequence, tok: int) -> StepOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        p = seq.params
        seq.output_ids.append(tok)
        dec = self.decoders[seq.request_id]
        stop_tok = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        complete = advance(seq, tok)  # a constrained request ends where its grammar does
        at_length = len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_len
        if not stop_tok:
            seq.text += dec.push(tok)
            if complete or at_length:  # its last text: the stop strings below see all of it
                seq.text += dec.flush()
        # vLLM's min_tokens (its PR 22014): no stop string ends the reply in its first min_tokens tokens' text
        early = len(seq.output_ids) <= p.min_tokens
        if early:
            seq.stops_from = len(seq.text)
        reason = "stop" if stop_tok or complete else None
        if stop_tok and (tok not in self.eos_ids or p.ignore_eos):  # vLLM's stop_reason: a stop id, not EOS
            seq.stop_reason = tok
        if reason == "stop" and failure(seq):  # the grammar gave up: the reply is cut, not whole
            reason = "error"
        if not stop_tok and p.stop and not early:
            hit = min(
                (i for i in (seq.text.find(s, _search_from(seq, s)) for s in p.stop) if i >= 0),
                default=-1,
            )
            if hit >= 0:
                seq.stop_reason = next(s for s in p.stop if seq.text.startswith(s, hit))
                seq.text, reason = seq.text[:hit], "stop"
        if reason is None and at_length:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
        held = max((len(s) - 1 for s in p.stop), default=0) if reason is None else 0
        upto = max(seq.emitted, len(seq.text) - held)
        delta, seq.emitted = seq.text[seq.emitted : upto], upto
        return self._output(seq, delta, [tok])

    def _fail(self, seq: Sequence, why: str) -> StepOutput:
        """End `seq` as failed (finish_reason "error", `why` its output's error line): the engine goes on."""
        seq.error = why
        self.scheduler.finish(seq, "error")
        return self._output(seq, "", [])

    def _output(self, seq: Sequence, text: str, ids: list[int]) -> StepOutput:
        lps = seq.logprobs[-1:] if ids and seq.params.logprobs is not None else []
        out = StepOutput(
            seq.request_id, text, ids, seq.is_finished, seq.finish_reason,
            len(seq.prompt_ids), len(seq.output_ids), seq.num_prefix_cached or 0, lps, seq, seq.error,
        )  # fmt: skip
        if seq.is_finished:
            self.seqs.pop(seq.request_id, None)
            self.decoders.pop(seq.request_id, None)
        return out

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt's token ids (here and in the server); a tokenizer with more tokens than the model's embedding
        rows (an added token the checkpoint was never resized for) would give an id the model has no row for:
        refused, naming it."""
        ids = self.tokenizer.encode(text)
        bad = next((t for t in ids if t >= self.cfg.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token {self.tokenizer.tok.id_to_token(bad)!r:.60} (id {bad}) is outside the model's "
                f"vocabulary [0, {self.cfg.vocab_size}): the tokenizer has more tokens than the model"
            )
        return ids

    def check_ids(self, ids, what: str) -> list[int]:
        """Token ids as a list of ints in [0, vocab), at most the context limit: more, bools, floats and out-of-range
        ids are refused (more before any is read: 10^8 ids were copied one by one before their count was refused)."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise InvalidRequestError(f"{what} must be a list of token ids")
        if len(ids) == 0:
            raise InvalidRequestError(f"{what} is empty")
        if len(ids) > self.max_len:
            raise InvalidRequestError(self._too_long(what, len(ids)))
        return self.vocab_ids(ids, what)

    def vocab_ids(self, ids, what: str) -> list[int]:
        """Token ids as a list of ints in [0, vocab), of any length: the one home of the vocabulary's rule (the
        server's /tokenize counts a rendered conversation of any length with it)."""
        out = []
        for t in ids:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise InvalidRequestError(f"{what} token ids must be integers, got {t!r}")
            if not 0 <= t < self.cfg.vocab_size:
                raise InvalidRequestError(
                    f"{what} token ids must be in [0, {self.cfg.vocab_size}), got {int(t)}"
                )
            out.append(int(t))
        return out

    def _too_long(self, what: str, n: int) -> str:
        """The one line of a prompt (with room for its output) or a scored sequence past the context limit."""
        room = " (prompt + output)" if what == "prompt" else ""
        return f"{what} has {n} tokens; the context limit is {self.max_len}{room}"

    def score(self, token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits [T, vocab] for `token_ids` (runs alone, in prefill chunks). Where
        running requests hold the pages it needs, it steps them until they free enough."""
        self._check_open()
        token_ids = self.check_ids(token_ids, "scored sequence")
        n, vocab = len(token_ids), self.cfg.vocab_size
        # its logits come back whole to the host: checked before any is computed
        sized = f"scoring {n} tokens x vocab {vocab}"
        need = MemoryNeed(n * vocab * LOGIT_BYTES, sized, "logits", "the number of tokens scored")
        check_needs([need], *self._host_left)
        seq = Sequence(list(token_ids), SamplingParams(max_new_tokens=1))
        # prefill only: it selects no pages, so it needs no selection slot (running requests may hold them all);
        # where they hold the pages it needs, they run until they free them (their outputs come with the next step):
        # preempting them instead starved them under repeated scores, each throwing away their progress
        while not self.blocks.can_grow(seq, len(token_ids), slot=False) and self.scheduler.has_work():
            self._ready = self.step()
        self.sync()
        if not self.blocks.can_grow(seq, len(token_ids), slot=False):
            short = self.blocks.shortfall(seq, len(token_ids))
            raise InvalidRequestError(f"not enough free KV pages to score this sequence now ({short})")
        self.blocks.grow(seq, len(token_ids), slot=False)
        try:
            self.run_page_ops()
            out = np.empty((n, vocab), np.float32)  # filled chunk by chunk: no second copy of the chunks
            while seq.num_pending:
                start, k = seq.num_cached, min(seq.num_pending, self.ecfg.max_num_batched_tokens)
                out[start : start + k] = self.ops.to_numpy(self.runner.run([seq], [k], all_logits=True))
            return out
        finally:
            self.blocks.release(seq)


def _check_request_id(request_id: object) -> None:
    """Request ids key the engine's tables: a non-empty str, or a one-line error instead of a TypeError."""
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError(f"request_id must be a non-empty str, got {request_id!r:.60}")


def overflowed(seq: Sequence) -> str:
    """Why a request whose logits could not be sampled (Ops.sound_rows) failed: said, not sampled into garbage."""
    return (
        f"non-finite activations at step {len(seq.output_ids) + 1} of request {seq.request_id}: its logits are NaN, "
        f"inf or all equal, as float32 gives them once the activations overflow; likely overflowing weights (values "
        f"too large in a norm, embedding or projection weight of the model)"
    )


def _plain(seq: Sequence) -> bool:
    """A sequence whose next step needs nothing of this step's token on the host: no grammar, no logprobs,
    no penalty that counts the generated tokens, no min_tokens mask still to lift."""
    p = seq.params
    return (
        seq.guide is None
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and len(seq.output_ids) >= p.min_tokens
    )


def _search_from(seq: Sequence, stop: str) -> int:
    """Where stop string `stop` is searched in seq.text: past the text already returned (less the stop's length,
    for one the last token completed) and ending past the text of the first min_tokens tokens (vLLM's rule)."""
    return max(0, seq.emitted - len(stop), seq.stops_from - len(stop) + 1)


def _drop_finished(batch: ScheduledBatch) -> None:
    """Rows of sequences that finished after the batch was scheduled (their pages are already freed)."""
    keep = [i for i, s in enumerate(batch.seqs) if not s.is_finished]
    batch.seqs = [batch.seqs[i] for i in keep]
    batch.num_new = [batch.num_new[i] for i in keep]
