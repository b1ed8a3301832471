"""Prefix caching: greedy outputs with the cache equal a cold run (dense and LServe), pages are shared by
reference count, evicted only when idle, and every page comes back when everything finishes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse_patterns import _np_tiny

from lserve_lite import EngineConfig, InvalidRequestError, SamplingParams, SparseConfig
from lserve_lite.engine.intake import MAX_CACHE_SALT
from lserve_lite.engine.llm_engine import LLMEngine
from lserve_lite.engine.scheduler import Scheduler
from lserve_lite.geometry import ring_slot
from lserve_lite.kv import block_manager
from lserve_lite.kv.block_manager import BlockManager
from lserve_lite.kv.prefix_cache import PrefixCache
from lserve_lite.sequence import Sequence, Status
from lserve_lite.sparse.patterns import save_pattern

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("pc")
    return _np_tiny(d / "m"), str(save_pattern(d / "p.tsv", np.random.default_rng(5).random((2, 2))))


def engine(model, mode: str, cache: bool = True, **kw) -> LLMEngine:
    """A tiny engine, dense or LServe (half the KV heads streaming, windows far below the prompts)."""
    path, pat = model
    sc = SparseConfig()
    if mode == "lserve":
        sc = SparseConfig(enabled=True, static_sparsity=0.5, prefill_sink=64, prefill_local=128, decode_sink=64,
                          decode_local=64, token_budget=256, pattern_path=pat)  # fmt: skip
    kw = dict(num_kv_pages=48, max_num_batched_tokens=128) | kw
    return LLMEngine(str(path), "cpu", EngineConfig(sparse=sc, prefix_caching=cache, **kw))


def run(
    eng: LLMEngine, prompts: list[list[int]], params=GREEDY, aborts: dict | None = None, tag: str = "",
    salts: list[str | None] | None = None,
) -> list:  # fmt: skip
    """Per prompt (output ids, cached prompt tokens, finish reason); `aborts` maps a prompt index to the step it
    aborts at; with `tag`, prompt i runs as request id f"{tag}{i}"; `salts`: each prompt's cache_salt."""
    salts = salts or [None] * len(prompts)
    rids = [
        eng.add_request(p, params, request_id=f"{tag}{i}" if tag else None, cache_salt=salt)
        for i, (p, salt) in enumerate(zip(prompts, salts))
    ]
    out, step = {}, 0
    while eng.has_unfinished():
        for i, at in (aborts or {}).items():
            if at == step:
                eng.abort(rids[i])
        for o in eng.step():
            if o.finished:
                out[o.request_id] = (list(o.seq.output_ids), o.num_cached_tokens, o.finish_reason)
        step += 1
    check_pool(eng.blocks)
    return [out[r] for r in rids]


def cold(model, mode: str, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    """Each prompt alone in a fresh engine without the cache."""
    return [run(engine(model, mode, cache=False), [p], params)[0][0] for p in prompts]


def check_pool(b: BlockManager) -> None:
    """Nothing referenced; free and idle pages partition the dense pool, free and snapshot pages the stream pool."""
    assert not any(b.ref) and b.num_used == 0
    idle = list(b.cache.idle) if b.cache else []
    assert sorted(list(b.free) + idle) == list(range(b.num_pages))
    snaps = [p for s in b.cache.snaps for p in s.pages] if b.cache else []
    assert sorted(list(b.stream_free) + snaps) == list(range(b.num_stream_pages))


def computed(sched: Scheduler, b: BlockManager, batch) -> None:
    """A scheduled step's chunks computed, as the engine would: each sequence's cache advanced and indexed, a token
    appended once its prompt is done, finished at max_new_tokens."""
    for s, n in zip(batch.seqs, batch.num_new):
        s.num_cached += n
        b.cache_computed(s, n)
        if s.num_pending == 0:
            s.output_ids.append(5)
            if len(s.output_ids) >= s.params.max_new_tokens:
                sched.finish(s, "length")


def ids(rng, n: int) -> list[int]:
    return [int(t) for t in rng.integers(3, 300, n)]


MODES = ["dense", "lserve"]


@pytest.mark.parametrize("mode", MODES)
def test_multi_turn_conversation(model, mode):
    rng = np.random.default_rng(1)
    eng = engine(model, mode)
    turn, want = ids(rng, 420), 0
    for _ in range(3):
        ((out, cached, _),) = run(eng, [turn])
        assert out == cold(model, mode, [turn])[0] and cached == want
        # dense: the previous turn's computed pages (its last output has no K/V yet); LServe: its prompt's
        # pages (decode K/V is computed under decode sparsity, so it is not cached)
        want = (len(turn) + 9 if mode == "dense" else len(turn)) // 64 * 64
        turn = turn + out + ids(rng, 30)


@pytest.mark.parametrize("mode", MODES)
def test_shared_system_prompt_many_requests(model, mode):
    rng = np.random.default_rng(2)
    system = ids(rng, 330)
    prompts = [system + ids(rng, int(rng.integers(1, 60))) for _ in range(10)]
    eng = engine(model, mode, max_num_seqs=3)
    got = run(eng, prompts)
    assert [g[0] for g in got] == cold(model, mode, prompts)
    hits = [g[1] for g in got]
    assert hits[0] == 0 and sum(h == 320 for h in hits) >= 6, hits  # the shared whole pages, 5 x 64
    assert eng.scheduler.prompt_tokens_cached == sum(hits)


@pytest.mark.parametrize("mode", MODES)
def test_burst_waits_for_the_prefix_being_computed(model, mode):
    """Requests arriving together: the first computes the shared pages, the others wait and attach them."""
    rng = np.random.default_rng(9)
    system = ids(rng, 330)
    prompts = [system + ids(rng, int(rng.integers(1, 40))) for _ in range(6)]
    eng = engine(model, mode)
    got = run(eng, prompts)
    assert [g[1] for g in got] == [0] + [320] * 5
    assert eng.prompt_tokens_computed == sum(map(len, prompts)) - 5 * 320
    assert [g[0] for g in got] == cold(model, mode, prompts)


@pytest.mark.parametrize("mode", MODES)
def test_prefix_ending_mid_page_and_whole_prompt_hit(model, mode):
    rng = np.random.default_rng(3)
    a = ids(rng, 400)
    b = a[:350] + ids(rng, 20)  # shares 350 tokens: 5 whole pages, the 6th differs at offset 30
    eng = engine(model, mode)
    got = (
        run(eng, [a]) + run(eng, [b]) + run(eng, [a[:384]])
    )  # a page-aligned prompt: its last page recomputed
    assert [g[0] for g in got] == cold(model, mode, [a, b, a[:384]])
    assert [g[1] for g in got] == [0, 320, 320]


@pytest.mark.parametrize("mode", MODES)
def test_cache_salt_keeps_clients_pages_apart(model, mode):
    """vLLM's cache_salt: requests of one salt share prefix pages (dense pages and LServe's streaming snapshots), of
    another salt or none they share nothing, not even a prefix being computed beside them; unsalted ones as before."""
    rng = np.random.default_rng(12)
    p = ids(rng, 300)  # 4 whole pages
    eng = engine(model, mode)
    got = run(eng, [p, p], salts=["a", "b"])  # together: neither waits for the other's pages
    got += run(eng, [p]) + run(eng, [p], salts=["a"]) + run(eng, [p]) + run(eng, [p], salts=["c"])
    assert [g[1] for g in got] == [0, 0, 0, 256, 256, 0]
    assert eng.prompt_tokens_computed == 6 * 300 - 2 * 256
    assert [g[0] for g in got] == cold(model, mode, [p]) * 6


def test_cache_salt_is_checked_before_anything_is_queued(model):
    """A salt must be a non-empty string of at most MAX_CACHE_SALT characters: a one-line error, nothing queued."""
    eng = engine(model, "dense")
    for bad in ("", 5, b"a", "s" * (MAX_CACHE_SALT + 1)):
        with pytest.raises(
            InvalidRequestError, match=r"^cache_salt must be a non-empty string of at most 256 "
        ):
            eng.add_request([5, 6, 7], GREEDY, cache_salt=bad)
    assert not eng.has_unfinished() and not eng.seqs
    assert run(eng, [[5, 6, 7]], salts=["s" * MAX_CACHE_SALT])[0][2] == "length"


@pytest.mark.parametrize("mode", MODES)
def test_eviction_under_memory_pressure(model, mode):
    rng = np.random.default_rng(4)
    prompts = [ids(rng, 300) for _ in range(6)]  # 5 pages each; 6 of them do not fit 16 pages
    eng = engine(model, mode, num_kv_pages=16, max_num_seqs=2)
    got = run(eng, prompts) + run(eng, [prompts[-1] + [7], prompts[0] + [7]])
    assert [g[0] for g in got] == cold(model, mode, prompts + [prompts[-1] + [7], prompts[0] + [7]])
    assert got[-2][1] == 256 and got[-1][1] == 0  # the newest prefix is still cached, the oldest evicted
    assert len(eng.blocks.cache.page_of) <= 16


def test_streaming_only_index_is_bounded_by_the_snapshots(model):
    """With no dense head a dense page is an id without bytes (MAX_POOL_PAGES of them), so no allocation evicted
    an idle one: the index grew by every prompt served (~300 MB at a million pages). It now keeps at most the
    pages the streaming pool's snapshots can resume, and the newest prompts still hit."""
    rng = np.random.default_rng(11)
    prompts = [ids(rng, 200) for _ in range(6)]  # 3 full pages each: 18 indexed before
    sc = SparseConfig(enabled=True, static_sparsity=1.0, prefill_sink=64, prefill_local=128, decode_sink=64,
                      decode_local=64, token_budget=256, pattern_path=model[1])  # fmt: skip
    cfg = dict(sparse=sc, max_model_len=256, max_num_seqs=2)
    eng = LLMEngine(str(model[0]), "cpu", EngineConfig(**cfg))
    cache = eng.blocks.cache
    assert eng.layout.streaming_only and eng.blocks.num_pages > 1000 * cache.max_idle
    assert cache.max_idle == eng.blocks.num_stream_pages == 2 * 4  # a sequence's 4 pages hold a whole context
    again = prompts[-1] + [7]
    got = run(eng, prompts) + run(eng, [again])
    assert len(cache.page_of) == len(cache.idle) <= cache.max_idle
    ref = run(LLMEngine(str(model[0]), "cpu", EngineConfig(prefix_caching=False, **cfg)), [again])
    assert got[-1][1] == 192 and got[-1][0] == ref[0][0]


@pytest.mark.parametrize("mode", MODES)
def test_aborted_request_whose_pages_others_share(model, mode):
    rng = np.random.default_rng(5)
    system = ids(rng, 260)
    first = system + ids(rng, 5)
    eng = engine(model, mode)
    run(eng, [first])  # caches the system prompt's pages
    prompts = [system + ids(rng, 10) for _ in range(3)]
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    got = run(eng, prompts, params, aborts={0: 3})
    assert got[0][2] == "abort" and [g[1] for g in got] == [256] * 3
    assert [g[0] for g in got[1:]] == cold(model, mode, prompts[1:], params)
    assert got[0][0] == cold(model, mode, prompts[:1], params)[0][: len(got[0][0])]


@pytest.mark.parametrize("mode", MODES)
def test_preemption_returns_pages_to_the_cache(model, mode):
    rng = np.random.default_rng(6)
    system = ids(rng, 200)
    prompts = [system + ids(rng, int(rng.integers(20, 90))) for _ in range(6)]
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    eng = engine(model, mode, num_kv_pages=14, max_num_batched_tokens=64)
    first: dict[int, int] = {}  # request id -> outputs it had when first preempted
    orig = eng.scheduler._preempt
    eng.scheduler._preempt = lambda s: (first.setdefault(s.request_id, len(s.output_ids)), orig(s))[1]
    got = run(eng, prompts, params, tag="p")
    assert first, "the pool was meant to force preemption"
    want = cold(model, mode, prompts, params)
    if mode == "dense":  # recomputation is the same function as the decode steps it replaces
        assert [g[0] for g in got] == want
    else:  # LServe recomputes outputs under prefill sparsity: equal up to the first preemption (docs/PREFIX_CACHE.md)
        for i, (g, w) in enumerate(zip(got, want)):
            n = first.get(f"p{i}", len(w))
            assert g[0][:n] == w[:n], (i, n)
        assert any(n < len(want[0]) for n in first.values())  # someone was preempted mid-reply
    first_hits = sum(g[1] for g in got)
    assert eng.scheduler.prompt_tokens_cached > first_hits  # readmissions attached their own pages back


def test_cache_off_computes_every_prompt_token(model):
    rng = np.random.default_rng(7)
    prompts = [ids(rng, 200)] * 2
    eng = engine(model, "dense", cache=False)
    got = run(eng, prompts[:1]) + run(eng, prompts[1:])
    assert [g[1] for g in got] == [0, 0] and eng.prompt_tokens_computed == 400 and eng.blocks.cache is None


# -- property: random request streams under a small pool (no model) -----------------------------------------
class Driver:
    """The scheduler and block manager with fake model steps, with the prefix cache and a streaming pool."""

    def __init__(self, pages: int, ps: int, budget: int, stream: bool):
        sink, ring = (1, 3) if stream else (0, 0)
        cache = PrefixCache(ps, sink, ring, window=ps, prompt_only=stream)
        per = sink + ring
        self.blocks = BlockManager(pages, ps, 3 * per if stream else 0, per, 4, cache)
        self.sched = Scheduler(self.blocks, max_num_seqs=3, max_num_batched_tokens=budget)
        self.preemptions = 0

    def check(self) -> None:
        b = self.blocks
        held = Counter(p for s in self.sched.running for p in s.page_table)
        assert all(b.ref[p] == held[p] for p in range(b.num_pages))  # counts equal holders
        idle, free = set(b.cache.idle), set(b.free)
        assert len(free) == len(b.free) and not (idle & free) and not (idle | free) & set(held)
        assert idle | free | set(held) == set(range(b.num_pages))
        streams = [p for s in self.sched.running for p in s.stream_table]
        snaps = [p for s in b.cache.snaps for p in s.pages]
        assert sorted(streams + snaps + list(b.stream_free)) == list(range(b.num_stream_pages))
        assert b.in_flight == Counter(k for s in self.sched.running for k in s.in_flight)

    def step(self) -> None:
        batch = self.sched.schedule()
        self.blocks.take_page_ops()
        self.preemptions += len(batch.preempted)
        computed(self.sched, self.blocks, batch)
        self.blocks.take_page_ops()
        self.check()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 70), st.integers(1, 12)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=80, deadline=None)
@given(ops=OPS, ps=st.sampled_from([4, 8]), budget=st.integers(6, 40), stream=st.booleans())
def test_ref_counts_and_free_list_property(ops, ps, budget, stream):
    """Requests share prefixes (one of four stems), abort at random, and preempt one another in a pool that
    holds about two of them: after every step the counts equal the holders; at the end nothing is held."""
    d = Driver(pages=-(-(90 + 12) // ps) + 3, ps=ps, budget=budget, stream=stream)
    stems = [list(range(10 * i, 10 * i + 80)) for i in range(4)]
    seqs: list[Sequence] = []
    for op in ops:
        if op[0] == "add":
            _, stem, n, gen = op
            s = Sequence(stems[stem][:n] + [999] * (n % 3), SamplingParams(max_new_tokens=gen))
            s.kv_salt = b"s"
            seqs.append(s)
            d.sched.add(s)
        elif op[0] == "abort" and seqs:
            d.sched.finish(seqs[op[1] % len(seqs)], "abort")
        else:
            for _ in range(op[1]):
                if d.sched.has_work():
                    d.step()
    for _ in range(3000):
        if not d.sched.has_work():
            break
        d.step()
    assert all(s.is_finished for s in seqs)
    check_pool(d.blocks)
    while d.blocks.cache.idle:  # the free list is whole once the cache lets go
        d.blocks.free.append(d.blocks.cache.evict_page())
    assert sorted(d.blocks.free) == list(range(d.blocks.num_pages)) and not d.blocks.cache.page_of
    assert not d.blocks.in_flight


def test_a_request_waiting_for_a_selection_slot_attaches_nothing():
    """The queue's head, waiting for a page-selection slot (one held outside the scheduler, the other by a running
    request), attached its cached prefix and gave it back at every step: a copy of a streaming snapshot each step
    (a copy kernel on the GPU; the pool's last free pages could evict snapshots). Without a slot it does not try."""
    ps = 8
    b = BlockManager(40, ps, 12, 4, 2, PrefixCache(ps, 1, 3, window=ps, prompt_only=True))
    sched = Scheduler(b, max_num_seqs=2, max_num_batched_tokens=64)

    def step() -> list:
        computed(sched, b, sched.schedule())
        return b.take_page_ops()

    def add(prompt: list[int], gen: int) -> Sequence:
        seq = Sequence(prompt, SamplingParams(max_new_tokens=gen))
        seq.kv_salt = b"s"
        sched.add(seq)
        return seq

    prompt = list(range(3, 43))
    add(prompt, 1)
    while sched.has_work():
        step()
    assert len(b.cache.snaps) == 1  # the prompt's streaming state, for a request that repeats it
    b.grow(Sequence([1], SamplingParams()), 0)  # a slot held outside (an evaluation harness's sequence)
    running = add(list(range(100, 120)), 30)
    step()
    waiting = add(prompt + [7], 3)
    for _ in range(4):
        assert not [op for op in step() if op[0] == "copy"] and not waiting.page_table
    while not running.is_finished:
        step()
    step()
    assert waiting.num_prefix_cached == 40  # admitted once the slot was free: the prefix attached then


def test_a_request_that_does_not_fit_leaves_the_cache_as_it_was():
    """The queue's head attached its prefix, restoring the snapshot took the streaming pool's last pages (evicting
    that very snapshot), then no dense page was left for its first chunk: the prefix went back but the snapshot was
    lost, so the request missed when it could run. It is now admitted only if the chunk fits, else left untouched."""
    ps = 4
    b = BlockManager(10, ps, 8, 4, 4, PrefixCache(ps, 1, 3, window=ps, prompt_only=True))
    sched = Scheduler(b, max_num_seqs=3, max_num_batched_tokens=64)
    prompt = list(range(3, 20))
    seqs = [Sequence(p, SamplingParams(max_new_tokens=g)) for p, g in ((prompt, 1), ([100, 101, 102], 30))]
    for s in seqs:
        s.kv_salt = b"s"
        sched.add(s)
    while len(seqs[1].page_table) < 6:  # the first is done (its snapshot: 4 pages), the second holds the rest
        computed(sched, b, sched.schedule())
    assert not b.free and not b.stream_free and len(b.cache.snaps) == 1
    b.take_page_ops()
    before = (dict(b.cache.snap_of), list(b.cache.idle), b.cache.snapshot_pages)
    head = Sequence(prompt, SamplingParams(max_new_tokens=2))
    head.kv_salt = b"s"
    sched.add(head)
    sched.schedule()  # the second's decode fits its pages; the head's chunk needs a fifth dense page
    assert head.status is Status.WAITING and not head.page_table and not head.stream_table
    assert (dict(b.cache.snap_of), list(b.cache.idle), b.cache.snapshot_pages) == before
    assert not b.take_page_ops() and not b.in_flight


def test_a_preempted_sequence_snapshots_its_prompts_end():
    """Readmitted after a preemption, a sequence recomputes its prompt and reply in chunks that can run past the
    prompt's end: it took no snapshot there (only at a chunk ending exactly on it), so the next request of that
    prompt resumed only the sinks. The chunk that crosses the prompt's end now takes it."""
    d = Driver(pages=40, ps=4, budget=64, stream=True)
    prompt = list(range(3, 20))
    seq, again = (
        Sequence(prompt, SamplingParams(max_new_tokens=30)),
        Sequence(prompt + [9], SamplingParams(max_new_tokens=1)),
    )
    seq.output_ids = [5] * 6
    seq.preempt()  # as the scheduler leaves it: 23 tokens to recompute, in one chunk here
    for s in (seq, again):
        s.kv_salt = b"s"
        d.sched.add(s)
        while d.sched.has_work():
            d.step()
    assert again.num_prefix_cached == 16  # 4 whole pages (the prompt's 17th token is computed)


def test_driver_stream_exercises_preemption_and_snapshots():
    """The property test's driver on one fixed stream does preempt, attach and restore snapshots."""
    d = Driver(pages=16, ps=8, budget=24, stream=True)
    restores = []
    take = d.blocks.take_page_ops
    d.blocks.take_page_ops = lambda: restores.extend(op for op in take() if op[0] == "copy") or []
    seqs = [Sequence(list(range(70)) + [900 + i], SamplingParams(max_new_tokens=12)) for i in range(6)]
    for s in seqs:
        s.kv_salt = b"s"
        d.sched.add(s)
    while d.sched.has_work():
        d.step()
    assert d.preemptions and d.sched.prompt_tokens_cached and restores
    check_pool(d.blocks)


def test_queue_reserve_never_stalls_a_running_prefill():
    """A one-token budget: the queue's head was counted as taking the step's token (a page looked free), so the
    running prefill got none; then attaching the head's cached prefix claimed that page (it was the idle one)
    and the head could not start either: SchedulerStalled under mere KV pressure."""
    d = Driver(pages=4, ps=4, budget=1, stream=False)
    first = Sequence(list(range(8)), SamplingParams(max_new_tokens=1))  # leaves 2 idle cached pages
    running = Sequence(list(range(100, 112)), SamplingParams(max_new_tokens=2))  # 3 pages: evicts one
    head = Sequence(list(range(4)) + [50], SamplingParams(max_new_tokens=2))  # attaches the other
    for s in (first, running, head):
        s.kv_salt = b"s"
    d.sched.add(first)
    while d.sched.has_work():
        d.step()
    d.sched.add(running)
    while running.num_cached < 9:
        d.step()
    assert not d.blocks.free and len(d.blocks.cache.idle) == 1
    d.sched.add(head)
    for _ in range(100):
        if not d.sched.has_work():
            break
        d.step()
    assert running.is_finished and head.is_finished
    check_pool(d.blocks)


def test_queue_reserve_counts_the_heads_cached_prefix():
    """The tokens held back for the queue's head were counted from its first token, its cached prefix ignored: a
    head with 2 tokens past a cached 8 had 8 held back, the running prefill got 6 fewer than the step had and
    they went unused. The reserve is now the head's first chunk as admission computes it."""
    d = Driver(pages=40, ps=4, budget=32, stream=False)  # reserve: 8 tokens
    decoding = Sequence(list(range(8)), SamplingParams(max_new_tokens=50))  # its 2 prompt pages get cached
    long = Sequence(list(range(100, 180)), SamplingParams(max_new_tokens=1))
    head = Sequence(list(range(8)) + [50, 51], SamplingParams(max_new_tokens=1))
    for s in (decoding, long, head):
        s.kv_salt = b"s"
        d.sched.add(s)
        if s is not head:
            d.step()
    batches = []
    schedule = d.sched.schedule
    d.sched.schedule = lambda: batches.append(schedule()) or batches[-1]
    d.step()
    (batch,) = batches
    assert head.num_prefix_cached == 8 and batch.num_new[batch.seqs.index(head)] == 2
    assert batch.num_new[batch.seqs.index(long)] == 29 and batch.num_tokens == 32


def test_prefill_windows_are_part_of_the_key(model):
    """LServe: a request with other prefill windows computes different K/V, so it must not hit."""
    rng = np.random.default_rng(8)
    p = ids(rng, 300)
    eng = engine(model, "lserve")
    run(eng, [p])
    rid = eng.add_request(p, GREEDY, sparse={"prefill_local": 64})
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert outs[0].num_cached_tokens == 0
    ref = engine(model, "lserve", cache=False)
    ref.add_request(p, GREEDY, request_id=rid, sparse={"prefill_local": 64})
    want = []
    while ref.has_unfinished():
        want += [o for o in ref.step() if o.finished]
    assert outs[0].seq.output_ids == want[0].seq.output_ids


def test_snapshot_of_a_resumed_sequence_offers_only_pages_it_holds(model):
    """LServe: b resumes a's snapshot at page 4, where a's ring slot of page 1 holds a's page 6; b's own snapshot
    offered boundary 128 (its ring looked unwrapped), and c, resuming there, read a's page 6 as its page 1."""
    rng = np.random.default_rng(10)
    a = ids(rng, 400)
    prompts = [a, a[:300] + ids(rng, 20), a[:129]]
    eng = engine(model, "lserve")
    got = [run(eng, [p])[0] for p in prompts]
    assert [g[0] for g in got] == cold(model, "lserve", prompts)
    # c resumes a's snapshot at 64 instead (b's does not hold page 1)
    assert [g[1] for g in got] == [0, 256, 64]


def test_a_restored_snapshot_brings_only_the_prefix_pages(model):
    """LServe: a request resumed from a snapshot at page 4 got a copy of the donor's whole streaming table, its pages
    past the shared prefix too. The GPU kernels read a page 16 rows at a time and weigh rows past the context by 0,
    so a non-finite value the donor left there could reach the request (0 x NaN): those slots are cleared instead."""
    rng = np.random.default_rng(11)
    p = ids(rng, 256)
    eng = engine(model, "lserve")
    run(eng, [p + ids(rng, 100)])
    (snap,) = eng.blocks.cache.snaps
    lay = eng.layout
    past = [snap.pages[ring_slot(q, lay.sink_pages, lay.ring_pages)] for q in range(4, snap.end // 64 + 1)]
    for pool in eng.runner.cache.stream_pools():
        pool[past] = np.nan  # what a donor with non-finite K/V past the shared prefix leaves there
    rid = eng.add_request(p + ids(rng, 10), GREEDY)
    eng.step()
    seq = eng.seqs[rid]
    assert seq.num_attached == 256 and seq.num_cached == 266
    assert all(np.isfinite(pool[seq.stream_table]).all() for pool in eng.runner.cache.stream_pools())
    while eng.has_unfinished():
        eng.step()
    check_pool(eng.blocks)


class StreamTags:
    """What each streaming-pool row holds, symbolically: the token prefix whose K/V was written there (None: zeros)."""

    def __init__(self, num_pages: int, ps: int):
        self.ps = ps
        self.rows: dict[int, list] = {p: [None] * ps for p in range(num_pages)}
        self.restores = 0  # snapshot copies run before a step

    def apply(self, ops: list, before_step: bool) -> None:
        """The block manager's page ops, as the engine runs them: a copy gathers, then scatters."""
        for kind, a, b in ops:
            if kind == "copy":
                self.restores += before_step
                for d, rows in zip(b, [list(self.rows[s]) for s in a]):
                    self.rows[d] = rows
            else:
                for p in b:
                    self.rows[p] = [None] * self.ps


def stream_tags_run(seed: int) -> int:
    """One random stream of requests sharing stems (random page size, budget, sinks, window, a pool that preempts)
    through the scheduler and block manager, checking each step's streaming rows; the snapshot restores it ran."""
    rng = np.random.default_rng(seed)
    ps, budget, sink = int(rng.choice([4, 8, 16])), int(rng.integers(3, 40)), int(rng.integers(0, 3))
    window = ps * int(rng.integers(1, 4))
    ring = -(-(window + budget) // ps) + 1  # a window beside a chunk, as KVLayout sizes it
    pages = int(rng.integers(20, 60))
    b = BlockManager(pages, ps, int(rng.integers(1, 4)) * (sink + ring), sink + ring, 4,
                     PrefixCache(ps, sink, ring, window=window, prompt_only=True))  # fmt: skip
    sched = Scheduler(b, max_num_seqs=int(rng.integers(1, 4)), max_num_batched_tokens=budget)
    tags = StreamTags(b.num_stream_pages, ps)
    stems = [list(range(1000 * i, 1000 * i + 200)) for i in range(3)]
    seqs: list[Sequence] = []
    for _ in range(300):
        if rng.random() < 0.3:
            n = int(rng.integers(1, min(120, pages * ps - 20)))
            s = Sequence(stems[int(rng.integers(3))][:n] + [5000 + len(seqs)] * int(rng.integers(3)),
                         SamplingParams(max_new_tokens=int(rng.integers(1, 15))))  # fmt: skip
            s.kv_salt = b"s"
            seqs.append(s)
            sched.add(s)
        if rng.random() < 0.05 and seqs:
            sched.finish(seqs[int(rng.integers(len(seqs)))], "abort")
        if not sched.has_work():
            continue
        batch = sched.schedule()
        tags.apply(b.take_page_ops(), before_step=True)
        for s, n in zip(batch.seqs, batch.num_new):
            ids, start, end = s.all_ids, s.num_cached, s.num_cached + n
            rows = [tags.rows[s.stream_table[ring_slot(p, sink, ring)]] for p in range((end - 1) // ps + 1)]
            for q in range(start, end):
                for p in {*range(min(sink * ps, start)), *range(max(0, q - window + 1), start)}:
                    assert rows[p // ps][p % ps] == tuple(ids[: p + 1]), (seed, q, p)
                rows[q // ps][q % ps] = tuple(ids[: q + 1])
            for r in rows[-1][(end - 1) % ps + 1 :]:
                assert r is None or r == tuple(ids[: len(r)]), (
                    seed,
                    "another request's row past the context",
                )
            s.num_cached = end
            b.cache_computed(s, n)
            if s.num_pending == 0:
                s.output_ids.append(7000 + len(s.output_ids))
                if len(s.output_ids) >= s.params.max_new_tokens:
                    sched.finish(s, "length")
        tags.apply(b.take_page_ops(), before_step=False)
    return tags.restores


def test_streaming_rows_a_chunk_reads_hold_its_own_prefix():
    """Streaming-pool rows tracked symbolically over random request streams: every row a query can see (its sinks
    and window) holds its own prefix's K/V, and the page a step writes holds nothing of another request past the
    context (a snapshot restore copied the donor's rows there, which 16-row GPU kernels read, weighed by 0)."""
    assert sum(stream_tags_run(seed) for seed in range(40)) > 100  # snapshots were restored


def test_the_heads_prefix_is_looked_up_once_a_step(monkeypatch):
    """The queue's reserve looked up the head's cached prefix and checked it for pages in flight once per running
    prefill, and admission both again (each a walk over the prompt's pages); now each once a step, with the same
    chunks and the same prefix attached."""
    d = Driver(pages=60, ps=4, budget=32, stream=True)  # reserve: 8 tokens
    first = Sequence(list(range(8)) + [60], SamplingParams(max_new_tokens=1))  # its 2 prompt pages get cached
    longs = [Sequence(list(range(100 * i, 100 * i + 60)), SamplingParams(max_new_tokens=1)) for i in (1, 2)]
    head = Sequence(list(range(8)) + [50, 51], SamplingParams(max_new_tokens=1))
    for s in (first, *longs, head):
        s.kv_salt = b"s"
    d.sched.add(first)
    while d.sched.has_work():
        d.step()
    for s in longs:
        d.sched.add(s)
    while longs[1].status is not Status.RUNNING:
        d.step()
    assert (
        all(1 < s.num_pending for s in longs) and d.blocks.in_flight
    )  # two running prefills computing pages
    lookups, walks = [], []
    match, schedule, hashes = d.blocks.cache.match, d.sched.schedule, block_manager.extend_hashes
    d.blocks.cache.match = lambda keys: lookups.append(len(keys)) or match(keys)
    monkeypatch.setattr(
        block_manager,
        "extend_hashes",
        lambda seq, upto, ps: walks.append(seq is head) or hashes(seq, upto, ps),
    )
    batches = []
    d.sched.schedule = lambda: batches.append(schedule()) or batches[-1]
    d.sched.add(head)
    d.step()
    (batch,) = batches
    assert lookups == [2] and head.num_prefix_cached == 8 and batch.num_new[batch.seqs.index(head)] == 2
    assert walks.count(True) == 4  # its lookup, its check for pages in flight, its attach, then its indexing
    assert batch.num_tokens == 32
