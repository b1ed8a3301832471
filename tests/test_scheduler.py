"""Continuous batching under KV pressure: every request finishes, equals running alone, frees its pages."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lserve_lite import LLM, EngineConfig, SamplingParams
from lserve_lite.config import MAX_POOL_PAGES
from lserve_lite.engine.llm_engine import LLMEngine
from lserve_lite.engine.scheduler import Scheduler, SchedulerStalled
from lserve_lite.kv.block_manager import BlockManager
from lserve_lite.sequence import Sequence


def test_32_concurrent_greedy_requests_equal_solo_runs(tiny_llama):
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 320, int(rng.integers(5, 150)))] for _ in range(32)]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    # 40 pages of 16 tokens: far less than 32 sequences need at once, so the scheduler must preempt.
    small = EngineConfig(num_kv_pages=40, page_size=16, max_num_batched_tokens=96, max_num_seqs=32)
    llm = LLM(str(tiny_llama), backend="cpu", config=small)
    outs = llm.generate(prompts, params)
    assert llm.engine.blocks.num_used == 0
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in outs)
    solo = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(page_size=16))
    for p, o in zip(prompts, outs):
        assert solo.generate([p], params)[0].token_ids == o.token_ids


def test_abort_frees_pages(tiny_llama):
    eng = LLMEngine(str(tiny_llama), "cpu", EngineConfig(num_kv_pages=64, page_size=16))
    rid = eng.add_request(
        list(range(3, 100)), SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True)
    )
    other = eng.add_request(
        list(range(3, 40)), SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    )
    eng.step()
    assert eng.blocks.num_used > 0
    eng.abort(rid)
    finished = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o.finish_reason
    assert finished == {rid: "abort", other: "length"}
    assert eng.blocks.num_used == 0


class _Driver:
    """Drives the scheduler with fake model steps (no model): each scheduled token is 'computed'."""

    def __init__(self, pages: int, page_size: int, budget: int, max_num_seqs: int = 8, slots: int = 0):
        self.blocks = BlockManager(pages, page_size, max_seqs=slots)
        self.sched = Scheduler(self.blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)

    def add(self, prompt_len: int, gen: int) -> Sequence:
        seq = Sequence(list(range(prompt_len)), SamplingParams(max_new_tokens=gen))
        self.sched.add(seq)
        return seq

    def step(self) -> None:
        batch = self.sched.schedule()
        used = sum(len(s.page_table) for s in self.sched.running)
        assert used == self.blocks.num_used  # pages are owned by running sequences only
        assert len(set(p for s in self.sched.running for p in s.page_table)) == used  # no page shared
        assert batch.num_tokens <= self.sched.budget
        for s, n in zip(batch.seqs, batch.num_new):
            assert len(s.page_table) * self.blocks.page_size >= s.num_cached + n
            assert s.page_array().tolist() == s.page_table  # the planner's array mirror, across preemptions
            s.num_cached += n
            if s.num_pending == 0:
                s.output_ids.append(1)
                if len(s.output_ids) >= s.params.max_new_tokens:
                    self.sched.finish(s, "length")

    def run(self, reqs: list[tuple[int, int]], max_steps: int = 5000) -> list[Sequence]:
        seqs = [self.add(p, g) for p, g in reqs]
        for _ in range(max_steps):
            if not self.sched.has_work():
                break
            self.step()
        return seqs


@settings(max_examples=60, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 120), st.integers(1, 20)), min_size=1, max_size=12),
    page_size=st.sampled_from([4, 16]),
    budget=st.integers(8, 64),
)
def test_kv_manager_property(reqs, page_size, budget):
    longest = max(p + g for p, g in reqs)
    pages = -(-longest // page_size) + 2  # enough for the longest sequence alone
    d = _Driver(pages, page_size, budget)
    seqs = d.run(reqs)
    assert all(s.is_finished and len(s.output_ids) == g for s, (_, g) in zip(seqs, reqs))
    assert d.blocks.num_used == 0 and d.blocks.num_free == pages


def test_admission_waits_for_a_page_selection_slot():
    """Slots held outside the scheduler (an evaluation harness's sequence) left a request admitted without one
    (slot -1: another sequence's selection row). It now waits for one; with none free and nothing running that
    could free one, the step says so instead of spinning. A prefill-only sequence (slot=False) takes none."""
    d = _Driver(pages=64, page_size=16, budget=64, max_num_seqs=3, slots=3)
    for _ in range(2):  # slots only: pages are the running sequences' (_Driver.step)
        d.blocks.grow(Sequence([1], SamplingParams()), 0)
    seqs = [d.add(30, 3) for _ in range(3)]
    while d.sched.has_work():
        d.step()
        assert len(d.sched.running) <= 1 and all(s.sel_slot >= 0 for s in d.sched.running)
    assert all(s.is_finished for s in seqs) and len(d.blocks.slots) == 1
    scoring = Sequence([1], SamplingParams())
    d.blocks.grow(scoring, 40, slot=False)
    assert scoring.sel_slot == -1 and len(d.blocks.slots) == 1
    d.blocks.release(scoring)
    d.blocks.grow(Sequence([1], SamplingParams()), 0)  # the last free slot
    d.add(30, 3)
    with pytest.raises(SchedulerStalled, match="no free page-selection slot"):
        d.step()
    dense = BlockManager(8, 16)  # an engine that selects no pages hands out no slots
    seq = Sequence([1], SamplingParams())
    dense.grow(seq, 1)
    assert seq.sel_slot == -1 and dense.has_room(seq, 16)


def test_page_array_mirrors_the_table():
    """Sequence.page_array follows appends (growing its buffer), a replaced list (prefix-cache admission, a
    freed sequence's empty table) and a shorter one, and returns int32 views of exactly the table."""
    seq = Sequence([1, 2, 3], SamplingParams())
    assert seq.page_array().dtype == np.int32 and seq.page_array().size == 0
    for k in range(40):
        seq.page_table.append(1000 + k)
        assert seq.page_array().tolist() == seq.page_table
    seq.page_table = [7, 8]
    assert seq.page_array().tolist() == [7, 8]
    seq.page_table = []
    assert seq.page_array().size == 0
    seq.page_table.extend([5, 6, 7])
    assert seq.page_array().tolist() == [5, 6, 7]


def _steps_until(d: _Driver, cond, limit: int = 1000) -> int:
    for i in range(1, limit + 1):
        d.step()
        if cond():
            return i
    raise AssertionError(f"not reached in {limit} steps")


@given(
    st.integers(1, 5), st.integers(0, 300), st.integers(0, 4), st.integers(0, 3), st.booleans(), st.booleans()
)
@settings(max_examples=200, deadline=None)
def test_has_room_means_grow_changes_nothing(shift, tokens, pages, stream_pages, streaming, slot):
    """The scheduler skips grow() where has_room() holds: there grow() must be a no-op (no page, no slot)."""
    ps = 1 << shift
    bm = BlockManager(64, ps, num_stream_pages=16 if streaming else 0, stream_per_seq=2 if streaming else 0,
                      max_seqs=4)  # fmt: skip
    seq = Sequence([1, 2, 3], SamplingParams())
    seq.page_table = [bm._page() for _ in range(pages)]
    seq.stream_table = [bm._stream_page() for _ in range(min(stream_pages, 2))] if streaming else []
    if slot:
        seq.sel_slot = bm.slots.popleft()

    def state():
        return list(seq.page_table), list(seq.stream_table), seq.sel_slot, bm.num_free, len(bm.slots)

    before = state()
    if bm.has_room(seq, tokens):
        bm.grow(seq, tokens)
        assert state() == before
    else:  # something to add: a page of either pool or the selection slot
        dense, stream = bm._needed(seq, tokens)
        assert dense or stream or (seq.sel_slot < 0 and bm.slots)


def test_short_request_not_starved_by_long_prefill():
    """Budget 64, a 6000-token prompt prefilling: a 5-token request arriving runs in the next step."""
    d = _Driver(pages=(6000 + 64) // 16 + 8, page_size=16, budget=64)
    long = d.add(6000, 1)
    _steps_until(d, lambda: long.num_cached == 640)  # 10 steps of full 64-token chunks
    short = d.add(5, 8)
    assert _steps_until(d, lambda: short.num_cached > 0) == 1  # first (and only) prefill chunk
    assert _steps_until(d, lambda: short.is_finished) == 7  # then one decode per step
    assert long.num_cached == 640 + 8 * 64 - (5 + 7)  # it gave up only the short request's 12 tokens
    assert long.num_pending > 64 * 70  # and is still more than 70 steps from the end of its prefill
    left = -(-(6000 - long.num_cached) // 64)
    assert _steps_until(d, lambda: long.is_finished) == left  # alone again: full 64-token chunks


def test_queue_heads_get_first_chunks_within_k_steps():
    """Three long prompts and then four short ones arrive: the k-th waiting request starts by step k."""
    d = _Driver(pages=400, page_size=16, budget=64)
    longs = [d.add(1500, 2) for _ in range(3)]
    d.step()
    shorts = [d.add(n, 4) for n in (5, 20, 3, 30)]
    first = {}
    for step in range(1, 12):
        d.step()
        for i, s in enumerate(longs[1:] + shorts):
            if s.num_cached and i not in first:
                first[i] = step
    assert all(first[k] <= k + 1 for k in range(6)), first
    # 20 and 30 tokens exceed the 16-token reserve: their rest comes before the long prompts' chunks
    assert all(s.is_finished for s in shorts) and not any(s.is_finished for s in longs)


def test_limits_below_one_raise_instead_of_spinning():
    for seqs, budget in ((0, 64), (8, 0), (-1, 64), (8, True)):
        with pytest.raises(SchedulerStalled, match="must be an integer >= 1"):
            Scheduler(BlockManager(8, 16), seqs, budget)
    d = _Driver(pages=2, page_size=16, budget=64)  # 32 tokens of KV: a 100-token prompt never fits
    d.add(100, 1)
    with pytest.raises(SchedulerStalled, match="no sequence can be scheduled"):
        d.step()


def test_engine_with_zero_budget_raises(tiny_llama):
    from lserve_lite.errors import LServeError

    for kw in (dict(max_num_batched_tokens=0), dict(max_num_seqs=0), dict(max_num_seqs=-1)):
        with pytest.raises(LServeError):
            LLMEngine(str(tiny_llama), "cpu", EngineConfig(**kw))


def test_late_abort_leaves_a_reused_id_alone(tiny_llama):
    """An abort of an id no longer in flight does nothing: it was kept as an id and applied at the next step, so a
    new request that reused the id was killed (finish 'abort') before its first token."""
    eng = LLMEngine(str(tiny_llama), "cpu", EngineConfig(num_kv_pages=64, page_size=16))
    sp = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)

    def run() -> dict[str, str]:
        ends = {}
        while eng.has_unfinished():
            ends |= {o.request_id: o.finish_reason for o in eng.step() if o.finished}
        return ends

    eng.add_request([5, 6, 7], sp, request_id="x")
    assert run() == {"x": "length"}
    eng.abort("x")  # finished: nothing to abort
    eng.abort("never-seen")
    eng.add_request([5, 6, 7], sp, request_id="x")
    assert run() == {"x": "length"} and eng.blocks.num_used == 0


def test_score_beside_running_requests_waits_for_their_pages(tiny_llama):
    """A score that fits the pool alone was refused ("not enough free KV pages ... now") while running requests
    held the pages (LLM.logits beside another thread's stream). It now steps them until they free enough (their
    outputs come with the next step): no preemption, so scores between every step starve nobody."""
    cfg = EngineConfig(num_kv_pages=8, page_size=16, max_num_batched_tokens=64, kv_dtype="fp32")
    eng = LLMEngine(str(tiny_llama), "cpu", cfg)
    sp = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(50, 90))]

    def finish(score: list[int] | None = None) -> list[list[int]]:
        out = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    assert o.seq.num_recompute == 0  # never preempted
                    out[o.request_id] = list(o.seq.output_ids)
            if score is not None and eng.has_unfinished():
                assert eng.score(score).shape == (len(score), 320)
        return [out[r] for r in rids]

    rids = [eng.add_request(p, sp) for p in prompts]
    alone = finish()
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 320, 8 * 16)]  # the whole pool
    ref = eng.score(ids)
    rids = [eng.add_request(p, sp) for p in prompts]
    eng.step()
    assert eng.blocks.num_dense_used > 0 and len(eng.scheduler.running) == 2
    np.testing.assert_array_equal(eng.score(ids), ref)
    assert finish() == alone
    rids = [eng.add_request(p, sp) for p in prompts]
    assert finish(score=ids[:70]) == alone  # 5 of the 8 pages: more than the requests leave free
    assert eng.blocks.num_used == 0 and eng.blocks.num_free == 8


def test_a_pool_of_page_ids_costs_no_memory_until_used():
    """Streaming-only mode's dense pool is MAX_POOL_PAGES ids without bytes: its free list listed every id as a
    Python int (~48 MB with the reference counts) before any page was used. Ids never handed out are now a range."""
    tracemalloc.start()
    b = BlockManager(MAX_POOL_PAGES, 64, 652, 3, 4)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size < 5 * 2**20 and len(b.free) == b.num_free == MAX_POOL_PAGES
    seq = Sequence([1] * 200, SamplingParams())
    b.grow(seq, 200)  # the same ids as the listed stack handed out: ascending, the last freed first
    assert seq.page_table == [0, 1, 2, 3] and seq.stream_table == [0, 1, 2]
    b.release(seq)
    b.grow(seq, 70)
    assert seq.page_table == [0, 1] and b.num_free == MAX_POOL_PAGES - 2
