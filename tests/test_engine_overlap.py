"""The overlapped decode step (LLMEngine._launch) forced on the CPU backend: token for token what the
synchronous engine emits, never a token past a stop, pages and counters as the synchronous engine leaves them."""

from __future__ import annotations

import numpy as np

from lserve_lite import EngineConfig, SamplingParams, SparseConfig
from lserve_lite.engine.llm_engine import PLACEHOLDER, LLMEngine

RNG = np.random.default_rng(7)
PROMPTS = [[int(t) for t in RNG.integers(3, 320, int(n))] for n in RNG.integers(3, 90, 12)]


def engine(path, overlap: bool, **kw) -> LLMEngine:
    """A CPU engine; `overlap`: its Ops claims asynchronous launches."""
    cfg = EngineConfig(page_size=16, async_scheduling=overlap, **kw)
    eng = LLMEngine(str(path), "cpu", cfg)
    eng.ops.async_steps = overlap
    return eng


def drive(eng: LLMEngine, requests: list[tuple[list[int], SamplingParams]], abort_after: dict | None = None):
    """Run every request to its end; per request (ids, text, finish reason, output count) from the stream.
    `abort_after[i] = k`: abort request i once k of its tokens were emitted."""
    abort_after = abort_after or {}
    rids = [eng.add_request(p, sp) for p, sp in requests]
    ids = {r: [] for r in rids}
    text = {r: "" for r in rids}
    end: dict[str, tuple] = {}
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id not in end, "output after the request finished"
            assert PLACEHOLDER not in out.token_ids
            ids[out.request_id] += out.token_ids
            text[out.request_id] += out.text
            assert out.num_output_tokens == len(ids[out.request_id])
            if out.finished:
                end[out.request_id] = (out.finish_reason, out.num_output_tokens)
            i = rids.index(out.request_id)
            if not out.finished and abort_after.get(i) == len(ids[out.request_id]):
                eng.abort(out.request_id)
    assert eng.blocks.num_used == 0 and not eng.seqs
    return [(ids[r], text[r], *end[r]) for r in rids]


def counters(eng: LLMEngine) -> tuple[int, int]:
    return eng.prompt_tokens_computed, eng.scheduler.prompt_tokens_cached


def both(path, requests, abort_after=None, **kw):
    """The synchronous and the overlapped engine on the same requests; asserts equal streams and counters."""
    sync, over = engine(path, False, **kw), engine(path, True, **kw)
    ref = drive(sync, requests, abort_after)
    got = drive(over, requests, abort_after)
    assert got == ref
    assert counters(over) == counters(sync)
    assert sync.overlapped_rows == 0
    return ref, over


def plain(**kw) -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens=int(n), **kw) for n in RNG.integers(1, 30, len(PROMPTS))]


def test_greedy_many_lengths_equals_sync(tiny_llama):
    reqs = list(zip(PROMPTS, plain(temperature=0, ignore_eos=True)))
    ref, over = both(tiny_llama, reqs, max_num_seqs=8)
    assert [r[2] for r in ref] == ["length"] * len(reqs)
    decoded = sum(len(r[0]) - 1 for r in ref)  # each request's first token comes from its prefill step
    # most decode rows were overlapped, and none past a length limit (its sample would be dropped)
    assert decoded // 2 < over.overlapped_rows <= decoded


def test_context_limit_equals_sync(tiny_llama):
    """Sequences that end at the context limit, not at max_new_tokens: no row is scheduled past it."""
    reqs = [(p[:40], SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True)) for p in PROMPTS]
    ref, over = both(tiny_llama, reqs, max_model_len=48, max_num_seqs=4)
    assert all(r[2] == "length" and len(r[0]) == 48 - min(40, len(p)) for r, (p, _) in zip(ref, reqs))
    assert 0 < over.overlapped_rows <= sum(len(r[0]) - 1 for r in ref)


def test_seeded_sampling_equals_sync(tiny_llama):
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=i, max_new_tokens=25) for i in range(12)
    ]
    _, over = both(tiny_llama, list(zip(PROMPTS, params)))
    assert over.overlapped_rows > 0


def test_stop_tokens_and_strings_never_emit_the_extra_token(tiny_llama):
    """Stops found only when the host reads a sample: the overlapped step computed one more token for them."""
    free = drive(engine(tiny_llama, False), [(p, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))
                                             for p in PROMPTS])  # fmt: skip
    reqs = []
    for i, (p, (ids, text, _, _)) in enumerate(zip(PROMPTS, free)):
        k = 3 + i % 7
        if i % 3 == 0:
            sp = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[ids[k]])
        elif i % 3 == 1 and len(text) > 12:
            sp = SamplingParams(temperature=0, max_new_tokens=30, stop=[text[8:11]])
        else:
            sp = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop_token_ids=[ids[k], 2])
        reqs.append((p, sp))
    ref, over = both(tiny_llama, reqs, max_num_seqs=6)
    stops = [r for r in ref if r[2] == "stop"]
    assert len(stops) >= len(reqs) // 2
    for i in range(0, len(reqs), 3):
        assert ref[i][0][-1] == free[i][0][3 + i % 7] and len(ref[i][0]) <= 4 + i % 7
    assert over.overlapped_rows > 0


def test_aborts_equal_sync(tiny_llama):
    reqs = list(zip(PROMPTS, plain(temperature=0, ignore_eos=True)))
    long = [i for i, (_, sp) in enumerate(reqs) if sp.max_new_tokens > 6][:4]
    ref, _ = both(tiny_llama, reqs, abort_after={i: 2 + j for j, i in enumerate(long)})
    assert [ref[i][2] for i in long] == ["abort"] * len(long)
    assert [len(ref[i][0]) for i in long] == [2 + j for j in range(len(long))]


def test_kv_pressure_preemption_equals_sync(tiny_llama):
    """Few pages: sequences are preempted (the step in flight is read first) and recompute."""
    reqs = list(zip(PROMPTS, plain(temperature=0, ignore_eos=True)))
    _, over = both(tiny_llama, reqs, num_kv_pages=14, max_num_batched_tokens=64)
    assert over.overlapped_rows > 0


def test_one_token_recompute_chunks_run_in_sync(tiny_llama):
    """A preempted request readmitted beside a decode recomputes its reply one token a step (a budget of 2): those
    chunks passed the overlap's decode test, so each was launched as a decode row and its sample appended in the
    middle of the recompute (the reply went wrong from there)."""
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, 320, 20)] for _ in range(3)]
    reqs = [
        (p, SamplingParams(temperature=0, max_new_tokens=m, ignore_eos=True))
        for p, m in zip(prompts, [90, 40, 40])
    ]
    kw = dict(num_kv_pages=8, max_num_batched_tokens=2, prefix_caching=False)
    over = engine(tiny_llama, True, **kw)
    chunks = []  # whether each one-token recompute chunk was launched overlapped
    forward = over.runner.forward

    def spy(seqs, num_new, all_logits=False, ids=None):
        chunks.extend(ids is not None for s, n in zip(seqs, num_new) if n == 1 < s.num_pending)
        return forward(seqs, num_new, all_logits, ids)

    over.runner.forward = spy
    assert drive(over, reqs) == drive(engine(tiny_llama, False, **kw), reqs)
    assert chunks and not any(chunks)


def test_requests_that_need_the_host_fall_back(tiny_llama):
    """Logprobs and penalties need each token on the host before the next step: those batches run in sync,
    the others overlap, and the mix equals the synchronous engine."""
    special = [SamplingParams(temperature=0, max_new_tokens=12, logprobs=2),
               SamplingParams(temperature=0.7, seed=3, max_new_tokens=12, repetition_penalty=1.3),
               SamplingParams(temperature=0, max_new_tokens=12, presence_penalty=0.5, frequency_penalty=0.5)]  # fmt: skip
    params = plain(temperature=0, ignore_eos=True)
    reqs = [(PROMPTS[i], special[i] if i < 3 else params[i]) for i in range(len(PROMPTS))]
    both(tiny_llama, reqs[:3], max_num_seqs=3)
    both(tiny_llama, reqs)
    alone = engine(tiny_llama, True)
    drive(alone, reqs[:3])
    assert alone.overlapped_rows == 0


def test_min_tokens_runs_in_sync_until_met_then_overlaps(tiny_llama):
    """min_tokens masks EOS on the host's count of tokens: a sequence steps in sync until it has them, then
    overlaps; the streams equal the synchronous engine's, and EOS biased to come first ends each at min_tokens + 1."""
    reqs = [
        (p, SamplingParams(temperature=0, max_new_tokens=16, min_tokens=6, **(
            {"logit_bias": {2: 100}} if i % 2 else {"ignore_eos": True})))
        for i, p in enumerate(PROMPTS)
    ]  # fmt: skip
    ref, over = both(tiny_llama, reqs)
    assert [r[2:] for r in ref[1::2]] == [("stop", 7)] * (len(PROMPTS) // 2)
    assert (
        0 < over.overlapped_rows <= sum(n - 5 for *_, n in ref)
    )  # none sampled ahead before min_tokens (+1: a stop)


def test_lserve_mode_equals_sync(tiny_llama, tmp_path):
    pattern = tmp_path / "full_attention_heads.tsv"
    pattern.write_text("0.9\t0.1\n0.2\t0.8\n")
    sp = SparseConfig(enabled=True, static_sparsity=0.5, page_size=16, sub_pages=4, prefill_sink=16,
                      prefill_local=32, decode_sink=16, decode_local=32, token_budget=48, select_interval=3,
                      pattern_path=str(pattern))  # fmt: skip
    reqs = list(zip(PROMPTS, plain(temperature=0, ignore_eos=True)))
    _, over = both(tiny_llama, reqs, sparse=sp, max_num_seqs=5)
    assert over.overlapped_rows > 0


def test_off_switch_and_synchronous_backends_never_overlap(tiny_llama):
    reqs = list(zip(PROMPTS[:4], plain(temperature=0)[:4]))

    for eng in (engine(tiny_llama, False), LLMEngine(str(tiny_llama), "cpu", EngineConfig(page_size=16))):
        drive(eng, reqs)
        assert eng.overlapped_rows == 0


def test_overlap_is_the_default_and_the_cli_turns_it_off():
    """On by default (the CUDA backend overlaps; the CPU's steps compute before they return, so it never does);
    `--no-async-scheduling` gives the synchronous engine."""
    import argparse

    from lserve_lite.engine_args import add_engine_args, engine_config_from_args

    assert EngineConfig().async_scheduling
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args([])).async_scheduling
    assert not engine_config_from_args(p.parse_args(["--no-async-scheduling"])).async_scheduling


def test_ring_pages_never_exceed_a_whole_context():
    """geometry.ring_pages: the window plus a chunk and one straddled page, clipped to what a whole context has
    past the sink pages (a ring that holds it never wraps), and ring_fits, the per-request window check, reading
    that rule backwards."""
    from lserve_lite.geometry import ring_fits, ring_pages

    assert ring_pages(8192, 2048, 64) == ring_pages(8192, 2048, 64, 1 << 18, 2) == 161
    # SmolLM2's LServe defaults: was 161 pages for 128 of context, then 128 beside the 2 sink pages
    assert ring_pages(8192, 2048, 64, 8192, 2) == 126 and ring_pages(8192, 2048, 64, 8192) == 128
    assert ring_fits(8192, 161, 2048, 64, 1 << 18) and not ring_fits(8193, 161, 2048, 64, 1 << 18)
    assert ring_fits(8192, 126, 2048, 64, 8192, 2) and ring_fits(100_000, 126, 2048, 64, 8192, 2)
    assert not ring_fits(8192, 125, 2048, 64, 8192, 2) and not ring_fits(8192, 126, 2048, 64, 8192, 1)


def test_ring_pages_are_the_most_a_chunk_sees_at_once():
    """The ring is the most pages a chunk of up to max_chunk queries visits past the sink at once (the Lambda
    mask, geometry.streaming_bounds): it reserved `local + max_chunk` tokens' pages plus one, a page more than
    any chunk sees where max_chunk is 1 or 2 past a page multiple (a 2049-token step budget, a decode-only ring),
    and ring_window reads it back to the widest window it serves."""
    from lserve_lite.geometry import ring_pages, ring_window, streaming_bounds

    ps = 16
    for local in (ps, 3 * ps):
        for chunk in (1, 2, 3, ps, ps + 1, ps + 2, 2 * ps - 1, 3 * ps):
            seen = max(
                n - lo
                for n, _, lo in (streaming_bounds(f, f + chunk - 1, ps, 0, local) for f in range(6 * ps))
            )
            assert ring_pages(local, chunk, ps) == seen, (local, chunk)
            assert ring_window(seen, chunk, ps) >= local > ring_window(seen - 1, chunk, ps)


def test_lserve_ring_is_sized_for_a_chunk_no_longer_than_the_context(tiny_llama, tmp_path):
    """A step budget above the context (max_num_batched_tokens 2^20) does not size the streaming ring: it holds at
    most a whole context (it asked for 2^20 tokens a sequence, and the KV budget went to the streaming pool), and
    runs, and takes the engine's own windows per request."""
    from lserve_lite import LLM, EngineConfig

    pattern = tmp_path / "full_attention_heads.tsv"
    pattern.write_text("0.9\t0.1\n0.2\t0.8\n")
    sp = SparseConfig(enabled=True, static_sparsity=0.5, page_size=16, prefill_local=32, decode_local=32,
                      token_budget=48, pattern_path=str(pattern))  # fmt: skip
    llm = LLM(str(tiny_llama), backend="cpu",
              config=EngineConfig(page_size=16, max_model_len=256, max_num_batched_tokens=1 << 20, sparse=sp))  # fmt: skip
    lay = llm.engine.layout
    assert lay.sink_pages + lay.ring_pages == 256 // 16  # the ring holds the rest of a context past the sink
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    out = llm.generate([list(range(3, 203))], params)
    llm.engine.add_request(list(range(3, 203)), params, sparse={"prefill_local": 32, "decode_local": 32})
    ids = []
    while llm.engine.has_unfinished():
        ids += [t for o in llm.engine.step() for t in o.token_ids]
    assert len(out[0].token_ids) == 8 and ids == out[0].token_ids


def test_scoring_between_overlapped_steps_loses_no_output(tiny_llama):
    """A score reads the decode step in flight first (on the GPU its one-row run would upload its ids where that
    step's samples lie: tests/test_gpu_overlap.py); those outputs come with the next step, a request's last one
    too (the engine still has them to give, so it is not idle)."""
    reqs = list(zip(PROMPTS[:4], plain(temperature=0, ignore_eos=True)))
    ref = drive(engine(tiny_llama, False), reqs)
    over = engine(tiny_llama, True)
    score, scored = over.score, []

    def score_then_step():  # a score after every step, as LLM.logits between a stream's steps
        outs = step()
        scored.append(over._inflight is not None)
        score([5])
        return outs

    step, over.step = over.step, score_then_step
    assert drive(over, reqs) == ref
    assert any(scored) and over.overlapped_rows > 0


def test_harness_steps_between_overlapped_steps_read_the_step_in_flight(tiny_llama):
    """A SparseHarness step runs the model outside the scheduler, as a score does: on the GPU its one-row run
    uploads its token id where the decode step in flight samples (a one-row graph's id row), so the next launch
    read the harness's token as the request's. The harness reads that step first, as score does; the outputs
    come with the next step, equal to the synchronous engine's."""
    from lserve_lite import LLM
    from lserve_lite.evaluation.harness import SparseHarness

    reqs = list(zip(PROMPTS[:2], plain(temperature=0, ignore_eos=True)))
    ref = drive(engine(tiny_llama, False), reqs)
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(page_size=16))
    over, h, read = llm.engine, SparseHarness(llm), []
    over.ops.async_steps = True  # as engine(..., overlap=True)
    step = over.step

    def harness_then_step():
        outs = step()
        if over._inflight is not None:
            seq = h.begin([5, 6, 7])
            h.forward(seq, 1)
            read.append(over._inflight is None)
            h.end(seq)
        return outs

    over.step = harness_then_step
    assert drive(over, reqs) == ref
    assert read and all(read)


def test_next_turn_attaches_the_pages_overlapped_decode_steps_filled(tiny_llama):
    """A page filled by an overlapped decode step is keyed over its token ids once the sample is read: it was keyed
    with its last id missing (its placeholder popped first), so a conversation's next turn reused only the prompt."""
    first = [int(t) for t in RNG.integers(3, 320, 40)]
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    for eng in (engine(tiny_llama, False), engine(tiny_llama, True)):
        ((reply, *_),) = drive(eng, [(first, params)])
        drive(eng, [(first + reply + [7, 8, 9], params)])
        assert eng.scheduler.prompt_tokens_cached == 64  # 4 pages of 16: the prompt and the reply's pages
    assert eng.overlapped_rows > 0
