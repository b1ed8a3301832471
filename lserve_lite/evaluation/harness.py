"""A step-by-step harness over an LLM's model runner, shared by calibration and the evaluation tools.

It runs one sequence at a time through the engine's own runner (prefill in chunks, decode steps one token
each), so every LServe behaviour measured is the engine's: in an LLM built with
`SparseConfig(enabled=True)` the two KV pools, the streaming windows and the page selector (with its reuse
rule) are the ones `lserve-lite serve` runs. One public hook changes heads on a dense-mode LLM:
`ModelRunner.set_head_classes` (calibration makes one head at a time a streaming head, in the dense pool).
Each call that touches the engine holds the LLM's turn (`LLM.hold_engine`), so an application's generate / stream
on the same LLM in another thread waits for it instead of stepping the engine in the middle of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..config import SparseConfig
from ..errors import InvalidRequestError, LServeError
from ..geometry import ring_covers
from ..llm import LLM
from ..sampling_params import SamplingParams, is_int
from ..sequence import Sequence

if TYPE_CHECKING:
    from ..engine.model_runner import ModelRunner


class SparseHarness:
    """Runs single sequences through an LLM's ModelRunner, step by step, for calibration and evaluation.

    - dense-mode LLM: `set_heads` makes chosen KV heads streaming heads with a window (the runner's
      `set_head_classes` hook); every other head attends densely.
    - LServe-mode LLM (`SparseConfig(enabled=True)`): the engine applies its config, page selection
      included; `set_request_sparse` sets per-request knobs (budget, interval, windows) on a sequence.
    A sequence is decoding once its prompt is cached, so tokens that decode steps should score go after
    `prompt_len` (`begin`).
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.engine = llm.engine
        self.cfg = llm.engine.cfg
        self.chunk = llm.engine.ecfg.max_num_batched_tokens
        self.engine_sparse = llm.engine.layout is not None
        self._written: dict[int, int] = {}  # seq_id -> most tokens computed since its last rewind to 0

    @property
    def runner(self) -> ModelRunner:
        """The engine's model runner, asked for at each use: a closed LLM has none (freed at the close), and a
        reference kept here ran steps on it and kept its weights and KV cache in memory."""
        if self.engine.closed:
            raise LServeError("this LLM was closed (LLM.close): make a new LLM and harness to go on")
        return self.engine.runner

    # classes ------------------------------------------------------------------------------------------
    def dense_classes(self) -> list[np.ndarray]:
        return [np.zeros(self.cfg.num_kv_heads, np.int32) for _ in range(self.cfg.num_layers)]

    def set_heads(self, classes: list[np.ndarray], sink: int, local: int) -> None:
        """Dense-mode LLM: per-layer KV-head classes (1 = streaming with the sink/local window)."""
        if self.engine_sparse:
            raise InvalidRequestError("this LLM applies its own sparse config; set_heads is for dense mode")
        with self.llm.hold_engine():  # checked there, as they are (int32 first made a class 0.5 a 0)
            self.runner.set_head_classes(classes, sink=sink, local=local)

    def set_request_sparse(self, seq: Sequence, sc: SparseConfig) -> None:
        """LServe-mode LLM: this sequence's per-request knobs (token budget, interval, windows). Mid-decode, the
        page-selection schedule restarts (as a rewind's): the selection stored in its slot holds the old budget's
        page count, which the next steps reused (more pages than a smaller budget lets a step visit)."""
        knobs = {k: getattr(sc, k) for k in ("token_budget", "select_interval", "prefill_sink",
                                             "prefill_local", "decode_sink", "decode_local")}  # fmt: skip
        seq.sparse = self.engine.request_sparse_config(knobs)
        seq.decode_steps = 0

    # sequences ----------------------------------------------------------------------------------------
    def begin(self, ids: list[int], prompt_len: int | None = None, reserve: int = 0) -> Sequence:
        """A sequence of `ids` (prompt = the first `prompt_len`, the rest teacher-forced outputs) with KV
        pages for len(ids) + reserve tokens; nothing computed yet."""
        with self.llm.hold_engine():
            return self._begin(ids, prompt_len, reserve)

    def _begin(self, ids: list[int], prompt_len: int | None, reserve: int) -> Sequence:
        ids = self.engine.check_ids(ids, "sequence")
        p = len(ids) if prompt_len is None else prompt_len
        if not int_in(p, 1, len(ids)):
            raise InvalidRequestError(f"prompt_len must be an integer in [1, {len(ids)}], got {p!r:.40}")
        if not int_in(reserve, 0, self.engine.max_len):
            raise InvalidRequestError(
                f"reserve must be an integer in [0, {self.engine.max_len}], got {reserve!r:.40}"
            )
        p, reserve = int(p), int(reserve)
        seq = Sequence(ids[:p], SamplingParams(max_new_tokens=max(1, reserve)))
        seq.output_ids = ids[p:]
        blocks = self.engine.blocks
        total = len(ids) + reserve
        if total > self.engine.max_len:
            raise InvalidRequestError(f"{total} tokens exceed the context limit {self.engine.max_len}")
        if blocks.lacks_slot(seq):  # without one it selected in another's row
            raise InvalidRequestError(
                f"every page-selection slot is taken (max_num_seqs={self.engine.ecfg.max_num_seqs} sequences hold "
                f"pages): end one first"
            )
        if not blocks.can_grow(seq, total):
            raise InvalidRequestError(
                f"not enough free KV pages for this sequence ({blocks.shortfall(seq, total)})"
            )
        blocks.grow(seq, total)
        self.engine.run_page_ops()  # the new pages cleared before anything writes them
        return seq

    def end(self, seq: Sequence) -> None:
        self._written.pop(seq.seq_id, None)
        with self.llm.hold_engine():
            self.engine.blocks.release(seq)

    def can_rewind(self, seq: Sequence, num_cached: int) -> bool:
        """Whether the K/V of the first `num_cached` tokens that the tokens after them can see is all still held: a
        streaming head's ring keeps only its newest pages, so computing far past that point (another setting's
        decode steps) overwrote its window. Else recompute from 0."""
        lay = self.engine.layout
        if num_cached == 0 or lay is None or not lay.has_streaming:
            return True
        written = max(self._written.get(seq.seq_id, 0), seq.num_cached)
        configs = (self.engine.ecfg.sparse, seq.sparse or self.engine.ecfg.sparse)  # the widest window counts
        local = max(w for sp in configs for w in (sp.prefill_local, sp.decode_local))
        ps = self.engine.ecfg.page_size
        return ring_covers(num_cached, written, local, lay.sink_pages, lay.ring_pages, ps, seq.stream_from)

    def rewind(self, seq: Sequence, num_cached: int, keep_outputs: bool = True) -> None:
        """Forget computed K/V beyond `num_cached` tokens (overwritten when recomputed); restart the
        page-selection schedule. `keep_outputs=False` also drops output ids beyond that point. A rewind forward
        (past the tokens computed) or one that would read overwritten K/V (`can_rewind`) is refused."""
        if not int_in(num_cached, 0, seq.num_cached):  # ahead, it would read K/V never written
            raise InvalidRequestError(f"rewind to 0 to {seq.num_cached} tokens here, got {num_cached!r:.40}")
        if not self.can_rewind(seq, num_cached):
            raise InvalidRequestError(
                f"cannot rewind to {num_cached} tokens: the streaming heads' ring no longer holds their window "
                f"(recompute from 0)"
            )
        self._written[seq.seq_id] = max(self._written.get(seq.seq_id, 0), seq.num_cached) if num_cached else 0
        seq.num_cached = num_cached
        seq.decode_steps = 0
        if not keep_outputs:
            del seq.output_ids[max(0, num_cached - len(seq.prompt_ids)) :]

    def forward(self, seq: Sequence, n: int, logits: str = "all") -> np.ndarray:
        """Compute the next `n` tokens (in chunks); logits of every row ("all") or the last one."""
        with self.llm.hold_engine():
            return self._forward(seq, n, logits)

    def _forward(self, seq: Sequence, n: int, logits: str = "all") -> np.ndarray:
        """`forward` inside the LLM's turn, which the caller holds."""
        # before any chunk runs: past the end, a reshape failed mid-way
        if not int_in(n, 0, seq.num_pending):
            raise InvalidRequestError(
                f"forward() computes 0 to {seq.num_pending} more tokens here, got {n!r:.40}"
            )
        out = []
        ops = self.runner.ops
        self.engine.sync()  # an engine step in flight reads its samples first (they lie where this run uploads)
        while n > 0:
            k = min(n, self.chunk)
            lg = ops.to_numpy(self.runner.run([seq], [k], all_logits=logits == "all"))
            n -= k
            if logits == "all" or n == 0:
                out.append(lg)
        return np.concatenate(out) if out else np.zeros((0, self.cfg.vocab_size), np.float32)

    def decode(self, seq: Sequence, n: int) -> np.ndarray:
        """Teacher-force the next `n` tokens (outputs) by one decode step each; logits [n, vocab]."""
        if seq.num_cached < len(seq.prompt_ids) or not int_in(n, 0, seq.num_pending):
            raise InvalidRequestError("decode() needs the prompt cached and n teacher-forced outputs left")
        with self.llm.hold_engine():  # one turn for all n steps
            rows = [self._forward(seq, 1) for _ in range(n)] or [self._forward(seq, 0)]  # n = 0: [0, vocab]
        return np.concatenate(rows)

    def greedy(self, seq: Sequence, max_new: int, first_logits: np.ndarray, stop_ids=()) -> list[int]:
        """Greedy generation by decode steps after the cached prompt, from the prompt's last logits."""
        room = len(seq.page_table) * self.engine.ecfg.page_size - len(seq.prompt_ids) + 1
        if not int_in(max_new, 1, room):  # checked before any step: past its pages a step failed mid-way
            raise InvalidRequestError(
                f"greedy() makes at most {room} tokens here (begin's reserve), got {max_new!r:.40}"
            )
        self.rewind(seq, len(seq.prompt_ids), keep_outputs=False)
        tok = int(np.argmax(first_logits))
        out = [tok]
        with self.llm.hold_engine():  # one turn for the whole reply
            while len(out) < max_new and tok not in stop_ids:
                seq.output_ids.append(tok)
                tok = int(np.argmax(self._forward(seq, 1)[-1]))
                out.append(tok)
        return out


def int_in(v: object, lo: int, hi: int) -> bool:
    """An integer (NumPy's too, not a bool) in [lo, hi]: a fraction or a bool passed range checks, then failed
    mid-run (a TypeError in a slice) or ran something else."""
    return is_int(v) and lo <= v <= hi
