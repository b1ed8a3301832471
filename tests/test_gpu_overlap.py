"""The overlapped decode step on the CUDA backend (gpu-marked): decode graphs replayed on the previous step's
samples still on the device give the synchronous engine's tokens, dense and LServe; stops end the stream."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    from tiny_models import make_tiny

    p = make_tiny(tmp_path_factory.mktemp("tiny64_overlap"), hidden_size=256, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip
    (p / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    return p


def _engine(path, overlap: bool, sparse: bool):
    from lserve_lite import EngineConfig, SparseConfig
    from lserve_lite.engine.llm_engine import LLMEngine

    sp = SparseConfig(enabled=True, page_size=16, sub_pages=4, prefill_sink=32, prefill_local=128, decode_sink=32,
                      decode_local=64, token_budget=128, select_interval=3)  # fmt: skip
    ecfg = EngineConfig(page_size=16, max_num_batched_tokens=64, max_num_seqs=8, num_kv_pages=512,
                        sparse=sp if sparse else SparseConfig(page_size=16), async_scheduling=overlap)  # fmt: skip
    eng = LLMEngine(str(path), backend="cuda", config=ecfg)
    eng.into_graph = 0
    sample_async = eng.ops.sample_async

    def counted(logits, seqs, out=None):
        eng.into_graph += out is not None  # sampled into the next replay's id row (no device copy)
        return sample_async(logits, seqs, out=out)

    eng.ops.sample_async = counted
    return eng


def _run(eng, reqs) -> list[tuple[list[int], str]]:
    rids = [eng.add_request(p, sp) for p, sp in reqs]
    ids, end = {r: [] for r in rids}, {}
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id not in end and -1 not in out.token_ids
            ids[out.request_id] += out.token_ids
            if out.finished:
                end[out.request_id] = out.finish_reason
    assert eng.blocks.num_used == 0
    return [(ids[r], end[r]) for r in rids]


@pytest.mark.parametrize("sparse", [False, True])
def test_overlapped_decode_equals_sync(tiny64, sparse):
    from lserve_lite import SamplingParams

    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 300, int(n))] for n in rng.integers(5, 300, 10)]
    reqs = [(p, SamplingParams(temperature=0, max_new_tokens=int(m), ignore_eos=True))
            for p, m in zip(prompts, rng.integers(1, 40, 10))]  # fmt: skip
    sync, over = _engine(tiny64, False, sparse), _engine(tiny64, True, sparse)
    ref = _run(sync, reqs)
    replays = over.runner.executor.replays
    assert _run(over, reqs) == ref
    assert sync.overlapped_rows == 0 and over.overlapped_rows > 0 and over.runner.executor.replays > replays
    assert over.into_graph > 0
    # seeded sampling with stop tokens: a stop ends the stream at the stop token, no token after it
    stops = {7, 11, 13, 17}
    reqs = [(p, SamplingParams(temperature=1.0, seed=i, max_new_tokens=40, stop_token_ids=sorted(stops)))
            for i, p in enumerate(prompts)]  # fmt: skip
    for ids, reason in _run(over, reqs):
        assert not set(ids[:-1]) & stops
        if reason == "length":
            assert len(ids) == 40
        else:
            assert reason == "stop" and ids[-1] in stops | over.eos_ids


@pytest.mark.parametrize("batch", [1, 2])
def test_lserve_first_reuse_step_keeps_the_sampled_ids(tiny64, batch):
    """Fresh engines: the second decode step is the first without a selector refresh, so its size's reuse
    graph is needed while that step's ids lie (sampled) in the rows it shares with the selector graph. Until
    2026-12-05 it was captured at that point, and its capture put token 1 in their place."""
    from lserve_lite import SamplingParams

    rng = np.random.default_rng(5)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    reqs = [([int(t) for t in rng.integers(3, 300, 200)], params) for _ in range(batch)]
    ref = _run(_engine(tiny64, False, True), reqs)
    over = _engine(tiny64, True, True)
    assert _run(over, reqs) == ref
    assert over.into_graph > 0 and over.runner.executor.size_for(batch) in over.runner.executor.reuse


@pytest.mark.parametrize("sparse", [False, True])
def test_scoring_between_overlapped_steps_keeps_the_sampled_ids(tiny64, sparse):
    """LLM.logits of one token while a stream's decode step is in flight ran as a one-row decode graph, whose
    upload wrote the scored id over the sampled ids that the next replay reads: the stream went on from the
    scored token. A score now reads the step in flight first (its outputs come with the next step)."""
    from lserve_lite import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    prompt = [int(t) for t in np.random.default_rng(7).integers(3, 300, 40)]
    eng = _engine(tiny64, True, sparse)
    (ref,) = _run(eng, [(prompt, params)])
    rid, got = eng.add_request(prompt, params), []
    while eng.has_unfinished():
        got += [t for out in eng.step() if out.request_id == rid for t in out.token_ids]
        if 0 < len(got) < 10:
            eng.score([5])
            eng.score([5, 6, 7])
    assert got == ref[0] and eng.into_graph > 0 and eng.blocks.num_used == 0


@pytest.mark.parametrize("biased", [False, True])
def test_sample_async_flags_the_unsound_rows(biased):
    """sample_async's soundness flags (`sound_rows_ref` of the caller's logits): an all-greedy batch whose logits
    nothing changes gets them from argmax_rows' own pass (one launch), a biased one (its logits copied and changed)
    from sound_rows over the raw logits; either way the NaN / inf / all-equal rows are flagged and a sound row's id
    is its argmax (or the bias's pick)."""
    import cupy as cp

    from lserve_lite import SamplingParams
    from lserve_lite.backends.cuda_sampling import GpuSampler
    from lserve_lite.backends.reference.sampling import sound_rows_ref
    from lserve_lite.sequence import Sequence

    b, vocab = 6, 9000
    x = np.random.default_rng(5).standard_normal((b, vocab)).astype(np.float32)
    x[0, 17], x[1, 4096], x[3] = np.nan, -np.inf, 0.5
    want = sound_rows_ref(x)
    assert want.tolist() == [False, False, True, False, True, True]
    bias = {7: 100.0} if biased else {}
    seqs = [Sequence([1, 2], SamplingParams(temperature=0.0, logit_bias=bias)) for _ in range(b)]
    toks = GpuSampler().sample_async(cp.asarray(x), seqs)
    assert toks.sound() == want.tolist()
    ids = np.asarray(toks.tolist())
    expect = np.full(b, 7) if biased else np.argmax(x, axis=1)
    assert (ids[want] == expect[want]).all()


@pytest.mark.parametrize("b", [1, 3, 17])
def test_greedy_ids_come_to_the_host_from_argmax_rows_itself(b, monkeypatch):
    """argmax_rows writes each row's id into pinned host memory as well (host buffers poisoned with -1: its host
    ids equal its device ids and np.argmax), so a greedy sample_async queues no device-to-host copy and a sampled
    one still does; steps overlapped as the engine does (step N read after step N + 1 is queued, fresh logits
    each) reuse two slots of the sampler's pinned ring and read their own ids, never a stale step's."""
    import cupy as cp
    import cupyx

    from lserve_lite import SamplingParams
    from lserve_lite.backends.cuda_sampling import ROW_CHUNK, GpuSampler
    from lserve_lite.sequence import Sequence

    rng = np.random.default_rng(b)
    vocab = 2 * ROW_CHUNK + 37  # not a multiple of the chunk
    sampler = GpuSampler()
    x = rng.standard_normal((b, vocab)).astype(np.float32)
    host, ids = cupyx.empty_pinned(b, np.int64), cp.full(b, -1, cp.int64)
    host[:] = -1
    sampler.argmax(cp.asarray(x), ids, host_ids=host)
    cp.cuda.get_current_stream().synchronize()
    assert host.tolist() == ids.get().tolist() == np.argmax(x, axis=1).tolist()

    copies = []
    memcpy = cp.cuda.runtime.memcpyAsync
    monkeypatch.setattr(cp.cuda.runtime, "memcpyAsync", lambda *a: copies.append(a) or memcpy(*a))
    greedy = [Sequence([1, 2], SamplingParams(temperature=0.0)) for _ in range(b)]
    sampled = [Sequence([1, 2], SamplingParams(temperature=1.0, seed=i)) for i in range(b)]
    prev = None
    for step in range(8):
        x = rng.standard_normal((b, vocab)).astype(np.float32)
        seqs = sampled if step % 4 == 2 else greedy
        toks = sampler.sample_async(cp.asarray(x), seqs)
        if prev is not None:  # step N, read while step N + 1 is queued
            assert prev[0].tolist() == prev[0].ids.get().tolist()
            assert prev[1] is None or prev[0].tolist() == prev[1]
        prev = (toks, np.argmax(x, axis=1).tolist() if seqs is greedy else None)
    assert prev[0].tolist() == prev[1] and len(copies) == 2 and len(sampler._pinned) == 2
