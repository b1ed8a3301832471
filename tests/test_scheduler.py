"""Continuous batching under KV pressure: every request finishes, equals running alone, frees its pages."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lserve_lite import LLM, EngineConfig, SamplingParams
from lserve_lite.engine.llm_engine import LLMEngine
from lserve_lite.engine.scheduler import Scheduler
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

    def __init__(self, pages: int, page_size: int, budget: int):
        self.blocks = BlockManager(pages, page_size)
        self.sched = Scheduler(self.blocks, max_num_seqs=8, max_num_batched_tokens=budget)

    def run(self, reqs: list[tuple[int, int]], max_steps: int = 5000) -> list[Sequence]:
        seqs = [Sequence(list(range(p)), SamplingParams(max_new_tokens=g)) for p, g in reqs]
        for s in seqs:
            self.sched.add(s)
        for _ in range(max_steps):
            if not self.sched.has_work():
                break
            batch = self.sched.schedule()
            used = sum(len(s.page_table) for s in self.sched.running)
            assert used == self.blocks.num_used  # pages are owned by running sequences only
            assert len(set(p for s in self.sched.running for p in s.page_table)) == used  # no page shared
            assert batch.num_tokens <= self.sched.budget
            for s, n in zip(batch.seqs, batch.num_new):
                assert len(s.page_table) * self.blocks.page_size >= s.num_cached + n
                s.num_cached += n
                if s.num_pending == 0:
                    s.output_ids.append(1)
                    if len(s.output_ids) >= s.params.max_new_tokens:
                        self.sched.finish(s, "length")
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
