"""The engine loop: requests in, one scheduled model step at a time, text deltas out. Loading and KV sizing
(startup.py, kv_sizing.py), request checks (intake.py), token and text output (outputs.py) and the overlapped
step's rules (overlap.py) live beside it."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import MutableSequence
from functools import cached_property
from pathlib import Path

import numpy as np

from ..backends.base import Array
from ..backends.memory import LOGIT_BYTES, MemoryNeed, check_needs
from ..config import EngineConfig, SparseConfig
from ..errors import InvalidRequestError, LServeError
from ..kv.block_manager import BlockManager
from ..sampling_params import SamplingParams
from ..sequence import Sequence, Status
from ..tokenizer import IncrementalDecoder
from ..weights.loader import model_name, resolve_model_dir, sampling_defaults
from . import intake
from .intake import PromptIds
from .interrupts import ctrl_c_held
from .kv_sizing import kv_line, pools_in_use
from .logprobs import record_prompt_logprobs, record_token_logprobs
from .outputs import StepOutput, new_text, overflowed, step_output, take_token
from .overlap import PLACEHOLDER, InFlight, drop_finished, inflight_ends, overlaps
from .prefix_setup import prefix_cache, seq_kv_salt
from .scheduler import ScheduledBatch, Scheduler
from .startup import load_local, say_assumed_context, start_workers
from .structured import Grammars


class LLMEngine:
    """Model + tokenizer + scheduler + runner for one backend; not thread-safe except `abort`."""

    def __init__(self, model: str | None = None, backend: str = "auto", config: EngineConfig | None = None):
        self.ecfg = config or EngineConfig()
        self.model_dir = resolve_model_dir(model)  # an HF directory or a GGUF file
        self.model_name = model_name(self.model_dir)
        start = load_local if self.ecfg.tensor_parallel is None else start_workers
        parts = start(self.model_dir, backend, self.ecfg)
        self.cfg, self.tokenizer, self.layout, self.ops = parts.cfg, parts.tokenizer, parts.layout, parts.ops
        self.backend, self.max_len, self.runner = parts.backend, parts.max_len, parts.runner
        self.kv_format, self.itemsize, self.kv_bytes = parts.kv_format, parts.itemsize, parts.kv_bytes
        self.weight_bytes = parts.weight_bytes  # None with tensor parallelism: the workers hold the weights
        self._group = parts.group  # the tensor-parallel workers, if any
        self._host_left = parts.host_left  # what `score`'s logits may take
        num_pages, num_stream = parts.num_pages, parts.num_stream
        say_assumed_context(self.model_dir, self.cfg, self.ecfg)
        per_seq = self.layout.stream_pages_per_seq if self.layout else 0
        slots = self.ecfg.max_num_seqs if self.layout and self.layout.select_pages else 0  # rows of sel_idx
        cache = prefix_cache(self.ecfg, self.layout, num_stream, self.max_len)
        self.blocks = BlockManager(num_pages, self.ecfg.page_size, num_stream, per_seq, slots, cache)
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
        self._inflight: InFlight | None = None  # the overlapped decode step (docs/ARCHITECTURE.md)
        self.overlapped_rows = 0  # rows launched by overlapped steps (how much of the decode overlapped)
        self._ready: list[StepOutput] = []  # outputs of a step in flight that `score` read: the next step's
        # `score`'s sequence until its pages are given back (`_end_score`)
        self._scoring: Sequence | None = None
        self._closed = False

    def kv_summary(self) -> str:
        """The KV cache in one line (startup logs): kv_sizing.kv_line."""
        return kv_line(self.cfg, self.ecfg, self.layout, self.kv_format.name, self.kv_bytes, self.itemsize,
                       self.max_len, self.blocks)  # fmt: skip

    def kv_pages(self) -> dict[str, tuple[int, int]]:
        """(pages sequences hold, pages) per KV pool (/metrics, the startup line): kv_sizing.pools_in_use."""
        return pools_in_use(self.blocks, self.layout)

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        sparse: dict | None = None,
        guide: tuple[object, np.ndarray] | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request; `sparse` overrides LServe knobs for it (token_budget, select_interval, windows). `guide`:
        the params' grammar built beforehand (`guide`); else built here. `cache_salt` (vLLM's): the request shares
        prefix-cache pages only with requests of the same salt (None: with the other unsalted ones)."""
        self._check_open()
        intake.check_request(params, sparse, request_id, cache_salt)
        if request_id is None:
            request_id = self.new_request_id()
        params.validate()  # again: its fields may have changed since it was made
        ids = list(self.prompt_ids(prompt))
        intake.check_prompt_room(ids, params, self.max_len, self.cfg.vocab_size)
        seq = Sequence(ids, params, request_id, cache_salt)
        seq.stop_ids = frozenset(params.stop_token_ids) | frozenset(self.eos_ids)
        if params.constrained:
            seq.guide, seq.token_mask = guide or self.guide(params)
        if sparse:
            seq.sparse = self.request_sparse_config(sparse)
        if seq.request_id in self.seqs:
            raise InvalidRequestError(f"duplicate request id {seq.request_id}")
        seq.kv_salt = seq_kv_salt(seq, self.model_dir, self.cfg, self.ecfg, self.ops.dtype, self.kv_format,
                                  self.runner, self.layout)  # fmt: skip
        with self._lock:
            self.seqs[seq.request_id] = seq
            keep = self.tokenizer.special_ids(params.keep_special_tokens)
            self.decoders[seq.request_id] = IncrementalDecoder(
                self.tokenizer, seq.prompt_ids, keep, params.skip_special_tokens
            )
            self.scheduler.add(seq)
        return seq.request_id

    def new_request_id(self) -> str:
        """An id for `add_request` that no request in flight holds (LLM picks it before queueing, so a Ctrl-C's
        clean-up knows it); ids a caller gave explicitly are skipped: a generated id is never refused as a duplicate."""
        return next(r for r in (f"req-{i}" for i in self._ids) if r not in self.seqs)

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
        return intake.request_sparse_config(knobs, self.ecfg, self.cfg, self.layout)

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt's token ids, refused where the tokenizer gives one outside the model's vocabulary
        (intake.encode_prompt)."""
        return intake.encode_prompt(self.tokenizer, text, self.cfg.vocab_size)

    def check_ids(self, ids, what: str) -> list[int]:
        """Token ids as a list of ints in [0, vocab), at most the context limit: more, bools, floats and out-of-range
        ids are refused (more before any is read: intake.check_count)."""
        intake.check_count(ids, what, self.max_len)
        return self.vocab_ids(ids, what)

    def vocab_ids(self, ids, what: str) -> list[int]:
        """Token ids as a list of ints in [0, vocab), of any length (intake.vocab_ids)."""
        return intake.vocab_ids(ids, what, self.cfg.vocab_size)

    def fault(self) -> str | None:
        """Why this engine can run no step (a tensor-parallel worker failed or exited), or None."""
        return self._group.fault() if self._group is not None else None

    @cached_property
    def sampling_defaults(self) -> dict[str, object]:
        """generation_config.json's sampling fields as SamplingParams keywords, checked: vLLM's defaults of an LLM call
        without sampling_params and of a server request's omitted fields. EngineConfig.generation_config says whose
        file: the model's ("auto"), none ("vllm") or a folder's."""
        source = self.ecfg.generation_config
        if source == "vllm":
            return {}
        folder = self.model_dir if source == "auto" else Path(os.fsdecode(source))
        defaults = sampling_defaults(folder)
        try:
            SamplingParams(**defaults)
        except InvalidRequestError as e:  # the file's values, not the caller's: say whose they are
            whose = (
                folder / "generation_config.json"
                if source != "auto"
                else "the model's generation_config.json"
            )
            raise InvalidRequestError(f"{whose} sampling defaults {defaults} are refused ({e})") from None
        return defaults

    def close(self) -> None:
        """Stop the tensor-parallel workers now (they stop at exit too, which a process ended by a signal never
        reaches: the server re-raises SIGTERM). No request, step or score runs after, in one process too, and the
        model runner goes now (weights, KV cache), not when this engine is collected: a closed LLM kept in scope
        held all of it. The config, tokenizer and block tables stay (small)."""
        self._closed = True
        # a decode step in flight (`_inflight`) stays: it holds what its copy to the host still writes into.
        # Each part is let go of only if still held, so a close a Ctrl-C cut short is completed by closing again.
        if hasattr(self, "runner"):
            del self.runner
        if self._group is not None:
            self._group.close()  # closing a closed group does nothing

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
        intake.check_request_id(request_id)  # checked here, not inside a later step()
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
            self._read_inflight(self._ready)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts) or bool(self._ready)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduled step's outputs (`step_into`)."""
        outs: list[StepOutput] = []
        self.step_into(outs)
        return outs

    def step_into(self, outs: MutableSequence[StepOutput]) -> None:
        """One scheduled step, its outputs appended to `outs` as they come (LLM's undelivered ones: a Ctrl-C as the
        step returns loses none). A plain decode batch is launched without waiting for the device (`_launch`): its
        outputs come one call later; anything else first reads the step in flight, then runs in sync."""
        self._check_open()
        self._end_score()
        if outs is not self._ready:  # `score` steps into `_ready` itself
            outs += self._ready
            self._ready = []
        if self._aborts:
            self._apply_aborts(outs)
        if self._inflight is not None and inflight_ends(self._inflight, self.max_len):
            self._read_inflight(outs)  # schedule none of them past its limits
        batch = self.scheduler.schedule()
        self.run_page_ops()  # snapshots attached, pages cleared: before any write
        if self._inflight is not None and not self._overlaps(batch):
            self._read_inflight(outs)
            drop_finished(batch)
        if not batch.seqs:
            return
        self.prompt_tokens_computed += sum(
            max(0, min(s.num_cached + n, len(s.prompt_ids)) - s.num_cached)
            for s, n in zip(batch.seqs, batch.num_new)
        )
        if self._overlaps(batch):
            self._launch(batch, outs)
            return
        wants = [s.wants_prompt_logprobs for s in batch.seqs]
        logits = self.runner.forward(batch.seqs, batch.num_new)  # a Ctrl-C here: the step runs again
        # held from the sequences' advance to their tokens: a sequence advanced but never given its sample had
        # nothing left to compute (the scheduler stalled on it), and a finished one stayed in `seqs`
        with ctrl_c_held():
            self._take_step(batch, wants, logits, outs)

    def _take_step(
        self, batch: ScheduledBatch, wants: list[bool], logits: Array, outs: MutableSequence[StepOutput]
    ) -> None:
        """A synchronous step's forward recorded: sequences advanced, pages indexed, tokens sampled and taken."""
        self.runner.advance(batch.seqs, batch.num_new)
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
        if not done:
            return
        self.grammars.fill_masks(done)
        sampled = self.ops.sample_async(logits, done)  # the ids and the rows' soundness in one readback
        tokens, sound = sampled.tolist(), sampled.sound()
        if not all(sound):  # those requests fail, the others go on
            outs += [self._fail(s, overflowed(s)) for s, ok in zip(done, sound) if not ok]
            keep = np.flatnonzero(sound)
            logits, done, tokens = logits[keep], [done[i] for i in keep], [tokens[i] for i in keep]
        record_token_logprobs(self.ops, logits, done, tokens)
        for seq, tok in zip(done, tokens):
            outs.append(self._append(seq, tok))

    # -- the overlapped decode step ---------------------------------------------------------------
    def _overlaps(self, batch: ScheduledBatch) -> bool:
        """Whether the batch may launch before the host reads its samples (overlap.overlaps)."""
        return overlaps(batch, self._inflight, self.ecfg.async_scheduling and self.ops.async_steps)

    def _launch(self, batch: ScheduledBatch, outs: MutableSequence[StepOutput]) -> None:
        """Launch the batch on the previous step's samples (still on the device), then read those back and
        handle them (detokenize, stop checks) while the device computes this one. Sequences that stop there
        computed one token too many: it is never appended (`_read` skips finished sequences). Ctrl-C is held
        from the launch's return to the placeholders, as over a synchronous step's recording."""
        prev, ids = self._inflight, None
        if prev is not None:
            ids = prev.tokens.ids
            if batch.seqs != prev.seqs:  # some finished or were aborted: gather the survivors' rows
                row = {id(s): i for i, s in enumerate(prev.seqs)}
                ids = ids[self.ops.upload(np.asarray([row[id(s)] for s in batch.seqs], np.int64))]
        logits = self.runner.forward(batch.seqs, batch.num_new, ids=ids)
        with ctrl_c_held():
            self.runner.advance(batch.seqs, batch.num_new)
            self.overlapped_rows += len(batch.seqs)
            out = self.runner.ids_row(len(batch.seqs))  # the next step's id row, when it has one
            self._inflight = InFlight(list(batch.seqs), self.ops.sample_async(logits, batch.seqs, out=out))
            if prev is not None:
                self._read(prev, outs)
            for seq in batch.seqs:
                if not seq.is_finished:
                    seq.output_ids.append(PLACEHOLDER)  # its pending token for the scheduler's next step

    def _read_inflight(self, outs: MutableSequence[StepOutput]) -> None:
        """The step in flight read (`_read`) and let go of, in one hold of Ctrl-C: one between the two lost its
        tokens, its sequences left advanced on placeholders."""
        with ctrl_c_held():
            fl, self._inflight = self._inflight, None
            self._read(fl, outs)

    def _read(self, fl: InFlight, outs: MutableSequence[StepOutput]) -> None:
        """The host's half of an overlapped step, its outputs appended to `outs`: its samples replace the
        placeholders and are handled as a synchronous step handles its tokens; sequences finished (or aborted)
        meanwhile drop theirs."""
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

    def _apply_aborts(self, outs: MutableSequence[StepOutput]) -> None:
        """End the requests `abort` recorded, in one hold of Ctrl-C: one cut short lost the aborts not yet applied
        (their requests ran on, unread) or left a finished request in `seqs`."""
        with ctrl_c_held(), self._lock:
            seqs, self._aborts = self._aborts, []
            for seq in seqs:
                if not seq.is_finished:
                    if seq.output_ids and seq.output_ids[-1] == PLACEHOLDER:
                        seq.output_ids.pop()  # its token in flight is dropped with it
                    self.scheduler.finish(seq, "abort")
                    outs.append(self._output(seq, "", []))

    def _append(self, seq: Sequence, tok: int) -> StepOutput:
        """`seq`'s sampled token taken (outputs.take_token), the request finished where that says it ends."""
        reason = take_token(seq, tok, self.decoders[seq.request_id], self.eos_ids, self.max_len)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return self._output(seq, new_text(seq, reason), [tok])

    def _fail(self, seq: Sequence, why: str) -> StepOutput:
        """End `seq` as failed (finish_reason "error", `why` its output's error line): the engine goes on."""
        seq.error = why
        self.scheduler.finish(seq, "error")
        return self._output(seq, "", [])

    def _output(self, seq: Sequence, text: str, ids: list[int]) -> StepOutput:
        """`seq`'s output of this step; a finished request leaves the engine's tables."""
        out = step_output(seq, text, ids)
        if seq.is_finished:
            self.seqs.pop(seq.request_id, None)
            self.decoders.pop(seq.request_id, None)
        return out

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
        self._end_score()
        seq = Sequence(list(token_ids), SamplingParams(max_new_tokens=1))
        # prefill only: it selects no pages, so it needs no selection slot (running requests may hold them all);
        # where they hold the pages it needs, they run until they free them (their outputs come with the next step):
        # preempting them instead starved them under repeated scores, each throwing away their progress
        while not self.blocks.can_grow(seq, len(token_ids), slot=False) and self.scheduler.has_work():
            self.step_into(self._ready)  # appended as they come: a Ctrl-C as a step returned lost its outputs
        self.sync()
        if not self.blocks.can_grow(seq, len(token_ids), slot=False):
            short = self.blocks.shortfall(seq, len(token_ids))
            raise InvalidRequestError(f"not enough free KV pages to score this sequence now ({short})")
        self._scoring = seq
        try:
            with ctrl_c_held():  # pages handed out and recorded whole
                self.blocks.grow(seq, len(token_ids), slot=False)
            self.run_page_ops()
            out = np.empty((n, vocab), np.float32)  # filled chunk by chunk: no second copy of the chunks
            while seq.num_pending:
                start, k = seq.num_cached, min(seq.num_pending, self.ecfg.max_num_batched_tokens)
                out[start : start + k] = self.ops.to_numpy(self.runner.run([seq], [k], all_logits=True))
            return out
        finally:
            self._end_score()

    def _end_score(self) -> None:
        """Give back the pages `score` took, if it holds any. A Ctrl-C as its `finally` began skipped this: the next
        step or score does it (the pages were lost for good)."""
        if self._scoring is None:
            return
        with ctrl_c_held():
            self.blocks.release(self._scoring)
            self._scoring = None
