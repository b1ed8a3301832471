"""Ctrl-C deep inside an engine step (the scheduler, the block manager, the prefix cache, the model runner, the
step's outputs), caught as the chat REPL catches it (the stream closed: its request aborted), leaves the engine
usable, the request beside it untouched and the KV pages accounted for."""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from pathlib import Path

import interrupt_points
import numpy as np
import pytest

from lserve_lite import LLM, EngineConfig, SamplingParams, SparseConfig
from lserve_lite.engine import llm_engine
from lserve_lite.kv import block_manager
from lserve_lite.sparse.patterns import save_pattern

if sys.version_info < (3, 11):
    pytest.skip("the interrupt points modelled are CPython 3.11's and later", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# every file of the engine's and the block manager's packages: the step's frames
STEP_FILES = tuple(
    str(f) for pkg in (llm_engine, block_manager) for f in sorted(Path(pkg.__file__).parent.glob("*.py"))
)
# 16-token pages; 32-token steps: a 70-token prompt takes three prefill chunks beside a decode
CFG = dict(num_kv_pages=16, page_size=16, max_num_batched_tokens=32)
OTHER = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
OTHER_PROMPT = [*range(150, 230)]  # 80 tokens: LServe selects its pages (past 64 tokens)
MINE = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def kinds(tiny_llama, tmp_path_factory) -> dict[str, tuple[LLM, LLM]]:
    """Per kind, the engine interrupted (prefix caching on) and a reference without prefix caching: dense, and
    LServe (half the KV heads streaming, with prefix-cache snapshots; pages selected past 64 tokens, every other
    step anew)."""
    pattern = save_pattern(
        tmp_path_factory.mktemp("pattern") / "p.tsv", np.random.default_rng(5).random((2, 2))
    )
    lserve = SparseConfig(enabled=True, page_size=16, static_sparsity=0.5, prefill_sink=16, prefill_local=32,
                          decode_sink=16, decode_local=32, token_budget=64, select_interval=2,
                          pattern_path=str(pattern))  # fmt: skip

    def pair(sparse: SparseConfig) -> tuple[LLM, LLM]:
        cfg = lambda cache: EngineConfig(**CFG, sparse=sparse, prefix_caching=cache)  # noqa: E731
        return tuple(LLM(str(tiny_llama), backend="cpu", config=cfg(c)) for c in (True, False))

    return {"dense": pair(SparseConfig()), "lserve": pair(lserve)}


@pytest.fixture
def llms(kinds) -> tuple[LLM, LLM]:
    return kinds["dense"]


def pages_accounted(llm: LLM) -> None:
    """Every dense page free, idle in the prefix cache or referenced exactly as often as sequences hold it; the
    cache's index one-to-one; the pages announced as being computed those of sequences still holding pages."""
    engine, blocks = llm.engine, llm.engine.blocks
    sched = engine.scheduler
    held = (*sched.running, *sched.waiting, *engine.seqs.values(), *filter(None, [engine._scoring]))
    seqs = {id(s): s for s in held}.values()
    owners = Counter(p for s in seqs for p in s.page_table)
    free, idle = list(blocks.free), list(blocks.cache.idle)
    assert len(set(free)) == len(free), "a page twice in the free list"
    assert not set(free) & set(owners), f"pages both free and held: {set(free) & set(owners)}"
    assert not set(free) & set(idle), "pages both free and idle in the prefix cache"
    assert not set(idle) & set(owners), "held pages listed idle"
    for page in range(blocks.num_pages):
        assert blocks.ref[page] == owners[page], (
            f"page {page}: refcount {blocks.ref[page]}, held {owners[page]}"
        )
    assert len(free) + len(idle) + len(owners) == blocks.num_pages, "pages lost (neither free, idle nor held)"
    streams = Counter(p for s in seqs for p in s.stream_table)
    snapshots = [p for snap in blocks.cache.snaps for p in snap.pages]
    assert sorted([*streams, *snapshots, *blocks.stream_free]) == list(range(blocks.num_stream_pages)), (
        "streaming pages lost, or held twice"
    )
    slots = [s.sel_slot for s in seqs if s.sel_slot >= 0]
    assert sorted([*slots, *blocks.slots]) == list(range(blocks.num_slots)), (
        "selection slots lost, or held twice"
    )
    c = blocks.cache
    assert {p: k for k, p in c.page_of.items()} == c.key_of, "the prefix cache's index is not one-to-one"
    assert set(idle) <= set(c.key_of), "an idle page the prefix cache does not index"
    announced = Counter(k for s in seqs for k in s.in_flight)
    assert +announced == +blocks.in_flight, "announced in-flight pages differ from the sequences'"
    for s in seqs:
        assert s.num_cached <= s.num_tokens and len(s.page_table) * blocks.page_size >= s.num_cached


def greedy(llm: LLM, prompt: list[int]) -> list[int]:
    return llm.generate([prompt], MINE)[0].token_ids


@pytest.mark.parametrize(
    "kind, where", [("dense", "prefill"), ("dense", "decode"), ("dense", "overlapped"), ("lserve", "decode")]
)
def test_ctrl_c_inside_a_step_leaves_the_engine_sound(kinds, kind, where, monkeypatch):
    """A KeyboardInterrupt at each point of the step's frames (engine/*.py, kv/*.py: ~1300 points in prefill, ~190
    in decode) while a request prefills a prompt of three chunks or decodes (in overlapped steps too, as the GPU's:
    a placeholder token held while the sample is in flight), with another request decoding beside it; the interrupted stream is closed, as the REPL does. Then the other request's tokens are
    those of an uninterrupted greedy run; every page is free, idle or held as its refcount says; the pool is whole
    once every request ended; and the interrupted prompt's greedy output, its pages now taken from the prefix
    cache where they were registered, is a run's without prefix caching (a page registered before its K/V was
    written reads garbage). LServe's decode: the other request selects its pages (until 2026-12-07 an interrupted
    forward had moved its selection count on: run again, it selected one step off, and its tokens differed)."""
    llm, plain = kinds[kind]
    monkeypatch.setattr(llm.engine.ops, "async_steps", where == "overlapped")
    want = plain.generate([OTHER_PROMPT], OTHER)[0].token_ids
    firsts = itertools.count(20)  # each prompt's own first token: a cold prefix, however far the last one got
    state: dict = {}

    def setup() -> None:
        state["got"] = []
        state["other"] = llm.stream_outputs(OTHER_PROMPT, OTHER)
        state["got"] += next(state["other"]).token_ids
        state["prompt"] = [next(firsts) % 300 + 3, *range(40, 109)]  # 70 tokens
        state["mine"] = llm.stream_outputs(state["prompt"], MINE)
        if where != "prefill":
            next(state["mine"])

    def check() -> None:
        state["mine"].close()  # an interrupted reply's request aborted, as the chat REPL does
        pages_accounted(llm)
        state["got"] += [t for out in state.pop("other") for t in out.token_ids]
        assert state["got"] == want, f"the other request got {state['got']}, {want} uninterrupted"
        blocks = llm.engine.blocks
        assert not llm.engine.seqs and not llm.engine.scheduler.has_work()
        assert blocks.num_free == blocks.num_pages and not any(blocks.ref), "pages still held"
        pages_accounted(llm)
        got = greedy(llm, state["prompt"])  # a new request runs, on the prefix cache's pages of the prompt
        assert got == greedy(plain, state["prompt"]), "a prefix-cache page holds K/V never written"

    points = interrupt_points.each_point(setup, lambda: next(state["mine"]), check, STEP_FILES)
    assert points > 150


def test_ctrl_c_inside_a_score_leaves_the_pages_whole(llms):
    """`LLM.logits` (`LLMEngine.score`, which takes pages outside the scheduler) interrupted at each point of the
    same frames: its pages are held as recorded, and the next call gives them all back (until 2026-12-07 a Ctrl-C
    inside its page grant or as its `finally` began lost pages for good)."""
    llm, _ = llms
    firsts = itertools.count(20)

    def check() -> None:
        pages_accounted(llm)
        assert llm.logits([5, 6]).shape == (2, llm.engine.cfg.vocab_size)
        blocks = llm.engine.blocks
        assert blocks.num_free == blocks.num_pages and not any(blocks.ref), "pages still held"

    score = lambda: llm.logits([next(firsts) % 300 + 3, *range(40, 109)])  # noqa: E731
    assert interrupt_points.each_point(lambda: None, score, check, STEP_FILES) > 50


def test_ctrl_c_in_a_score_waiting_for_pages_loses_no_token_of_a_stream(llms):
    """A score that steps the running requests until they free its pages (here: another stream's, holding most of
    the pool) interrupted at each point of the same frames: the stream gets its uninterrupted greedy tokens."""
    llm, plain = llms
    other = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    long = [*range(3, 153)]  # 10 of the 16 pages; the score's 120 tokens take 8
    want = plain.generate([long], other)[0].token_ids
    firsts = itertools.count(20)
    state: dict = {}

    def setup() -> None:
        state["stream"] = llm.stream_outputs(long, other)
        state["got"] = list(next(state["stream"]).token_ids)

    def check() -> None:
        state["got"] += [t for out in state.pop("stream") for t in out.token_ids]
        assert state["got"] == want, f"the stream got {state['got']}, {want} uninterrupted"
        pages_accounted(llm)

    score = lambda: llm.logits([next(firsts) % 300 + 3, *range(200, 319)])  # noqa: E731
    assert interrupt_points.each_point(setup, score, check, STEP_FILES) > 200
