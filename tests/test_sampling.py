"""Sampler and streaming text: filters, seeds, penalties, stop strings, UTF-8-safe deltas."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite import LLM, EngineConfig, SamplingParams
from lserve_lite.backends import cpu
from lserve_lite.backends.reference.sampling import sample, sample_row, sound_rows_ref
from lserve_lite.sequence import Sequence
from lserve_lite.tokenizer import IncrementalDecoder


def _draws(x, n=4000, **kw):
    rng = np.random.default_rng(0)
    return np.array([sample_row(x, u=rng.random(), **kw) for _ in range(n)])


def test_sound_rows_ref_is_every_logit_finite_and_not_all_equal():
    """The two-pass form (a row's max and min) flags the rows the definition does: NaN, +inf or -inf at either end
    or inside the row, all equal, all zero; sound rows one ulp apart or holding float32's extremes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((14, 9)).astype(np.float32)
    bad = [(0, np.nan), (8, np.nan), (4, np.nan), (0, np.inf), (8, -np.inf), (3, np.inf)]  # (column, value)
    for row, (col, v) in enumerate(bad):
        x[row, col] = v
    x[6], x[7] = 0.0, 2.5
    x[8, 0], x[8, 1:] = np.nextafter(np.float32(1), np.float32(2)), 1.0
    x[9, 0], x[9, 1] = np.finfo(np.float32).max, np.finfo(np.float32).min
    want = np.isfinite(x).all(axis=1) & (x.max(axis=1) > x.min(axis=1))
    assert want.tolist() == [False] * 8 + [True] * 6
    assert sound_rows_ref(x).tolist() == want.tolist()


def test_cpu_sample_async_samples_sound_rows_from_the_logits_themselves(monkeypatch):
    """A step whose rows are all sound (every step but an overflow) hands the sampler the logits as they are: no
    copy of the [B, vocab] rows a step (there was one on every step, the sound rows gathered)."""
    params = SamplingParams(temperature=0)
    seqs = [Sequence([1, 2], params), Sequence([3], params)]
    logits = np.random.default_rng(1).standard_normal((2, 50)).astype(np.float32)
    given = []
    monkeypatch.setattr(cpu, "sample", lambda rows, s: given.append(rows) or sample(rows, s))
    got = cpu.CpuOps().sample_async(logits, seqs)
    assert got.tolist() == logits.argmax(axis=1).tolist() and got.sound() == [True, True]
    assert len(given) == 1 and given[0] is logits
    logits[0, 7] = np.nan  # an unsound row: the sound one alone is sampled, the other reads 0 and unsound
    got = cpu.CpuOps().sample_async(logits, seqs)
    assert got.tolist() == [0, int(logits[1].argmax())] and got.sound() == [False, True]
    assert given[1].shape == (1, 50)


def test_top_k_and_top_p_restrict_support():
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    assert set(_draws(x, temperature=1.0, top_k=2, top_p=1.0)) == {0, 1}
    assert set(_draws(x, temperature=1.0, top_k=0, top_p=0.65)) == {0, 1}
    d = _draws(x, temperature=1.0, top_k=0, top_p=1.0)
    freq = np.bincount(d, minlength=4) / len(d)
    assert np.abs(freq - [0.4, 0.3, 0.2, 0.1]).max() < 0.03


def test_temperature_sharpens():
    x = np.log(np.array([0.6, 0.4], np.float32))
    cold = np.mean(_draws(x, temperature=0.2, top_k=0, top_p=1.0) == 0)
    assert cold > 0.85


def test_seed_reproducible_and_repetition_penalty():
    logits = np.random.default_rng(3).normal(size=(1, 50)).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, [Sequence([1, 2], p)])[0] for _ in range(5)]
    b = [sample(logits, [Sequence([1, 2], p)])[0] for _ in range(5)]
    assert a == b
    top = int(np.argmax(logits[0]))
    pen = SamplingParams(temperature=0, repetition_penalty=100.0)
    assert sample(logits, [Sequence([top], pen)])[0] != top


def test_incremental_decoder_never_splits_utf8(tiny_llama):
    llm = LLM(str(tiny_llama), backend="cpu")
    text = "héllo 世界 🙂 done"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(llm.tokenizer)
    parts = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


def test_stop_string_truncates_and_finishes(tiny_llama):
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig())
    free = llm.generate(["the quick"], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0]
    stop = free.text[5:8]
    out = llm.generate(
        ["the quick"], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=[stop])
    )
    assert out[0].finish_reason == "stop"
    assert out[0].text == free.text[: free.text.find(stop)]
    streamed = "".join(
        llm.stream(
            "the quick", SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=[stop])
        )
    )
    assert streamed == out[0].text


def _sample_spec(
    x: np.ndarray, temperature: float, top_k: int, top_p: float, u: float, min_p: float = 0.0
) -> int:
    """The sampler's definition, written the plain way (a full stable argsort): what sample_row must decide."""
    x = x / np.float32(temperature)
    order = np.argsort(-x, kind="stable")
    if min_p > 0:  # vLLM's: probability at least min_p x the largest, after temperature
        probs = np.exp((x[order] - x[order[0]]).astype(np.float64))
        order = order[: max(1, int(np.count_nonzero(probs >= min_p)))]
    if top_k > 0:
        order = order[:top_k]
    probs = np.exp((x[order] - x[order[0]]).astype(np.float64))
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        probs, order = probs[:keep] / probs[:keep].sum(), order[:keep]
    idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    return int(order[min(idx, len(order) - 1)])


def test_sample_row_decides_as_the_full_sort():
    """sample_row sorts only a growing head of the order: the same token as the full-sort definition on rows of
    every shape it treats differently (ties, -inf masks, flat rows whose decision lies deep, top-k past the head,
    u near 1). Consistency with our own plain definition (the GPU kernels are checked against sample_row)."""
    rng = np.random.default_rng(11)
    for trial in range(400):
        n = int(rng.choice([50, 1000, 5000, 20000, 49152]))
        x = (rng.standard_normal(n) * rng.choice([0.05, 1.0, 3.0, 8.0])).astype(np.float32)
        shape = trial % 4
        if shape == 1:
            x = np.round(x)  # ties across the head's boundary
        elif shape == 2:
            x[rng.random(n) < 0.9] = -np.inf  # a grammar-like mask
        temp = float(rng.choice([0.3, 1.0, 2.5, 1e4]))
        top_k = int(rng.choice([0, 1, 7, 1024, 1025, 3000, n + 5]))
        top_p = float(rng.choice([1.0, 0.999, 0.95, 0.5, 0.1]))
        u = float(rng.choice([rng.random(), 0.999999, 0.0]))
        min_p = float(rng.choice([0.0, 0.0, 1e-6, 0.05, 0.5, 1.0]))
        want = _sample_spec(x, temp, top_k, top_p, u, min_p)
        assert sample_row(x, temp, top_k, top_p, u, min_p) == want, (trial, n, temp, top_k, top_p, u, min_p)


def test_min_p_drops_tokens_less_probable_than_a_share_of_the_top_one():
    """vLLM's min_p: tokens less probable than min_p x the most probable one are dropped, after temperature (which
    flattens [0.4, 0.1] to ratio 0.5 at T=2); min_p=1 keeps the top token only, as greedy."""
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    assert set(_draws(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.6)) == {0, 1}
    assert set(_draws(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.4)) == {0, 1, 2}
    two = np.log(np.array([0.4, 0.1], np.float32))
    assert set(_draws(two, temperature=1.0, top_k=0, top_p=1.0, min_p=0.4)) == {0}
    assert set(_draws(two, temperature=2.0, top_k=0, top_p=1.0, min_p=0.4)) == {0, 1}
    logits = np.random.default_rng(3).normal(size=(1, 50)).astype(np.float32)
    top = int(np.argmax(logits[0]))
    p = SamplingParams(temperature=5.0, min_p=1.0, seed=1)
    assert {sample(logits, [Sequence([1, 2], p)])[0] for _ in range(20)} == {top}


def test_logprobs_ref_top_ids_as_the_full_sort():
    """logprobs_ref takes each row's top k by a partition: the ids of a full stable argsort (ties by index)."""
    from lserve_lite.backends.reference.sampling import logprobs_ref

    rng = np.random.default_rng(5)
    for trial in range(60):
        r, v = int(rng.integers(1, 6)), int(rng.choice([40, 3000, 49152]))
        x = (rng.standard_normal((r, v)) * 3).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x)
        if trial % 3 == 1:
            x[rng.random((r, v)) < 0.5] = -np.inf
        k = int(rng.integers(0, 21))
        _, ids, _ = logprobs_ref(x, np.zeros(r, np.int64), k)
        assert np.array_equal(ids, np.argsort(-x, axis=1, kind="stable")[:, :k]), (trial, r, v, k)


def test_harness_logprob_rows_fail_a_nan_in_the_top_k():
    """The harness's logprob_rows took max(chosen error, top-k error) with Python's max, which returns its first
    argument beside a NaN: a kernel writing NaN top-k logprobs (ids right) passed. Here the CPU reference is the
    kernel: it passes, and with a NaN among the top-k values every row with k > 0 fails."""
    from types import SimpleNamespace

    from lserve_lite.backends.reference.sampling import logprobs_ref
    from lserve_lite.harness.common import HostCtx
    from lserve_lite.harness.sampling import _case_logprobs

    def rows(nan_top: bool) -> list:
        def logprobs(x, chosen, k):
            lp, ids, top = logprobs_ref(x, chosen, k)
            if nan_top and k:
                top = top.copy()
                top[-1, -1] = np.nan
            return lp, ids, top

        c = HostCtx(2)
        c.cp, c.ops = SimpleNamespace(asarray=np.asarray), SimpleNamespace(logprobs=logprobs)
        return _case_logprobs(c)

    good = rows(False)
    assert all(r.ok for r in good)
    assert [r.ok for r in rows(True)] == [r.shape.split()[2] == "k0" for r in good]


def test_output_text_continues_the_prompt_with_sentencepiece(tmp_path):
    """A SentencePiece vocabulary's decoder drops a text's leading space ("▁the" alone is "the"): decoded alone,
    the output lost its first space, so prompt + text read "the theater atthe" (vLLM and llama.cpp give " the").
    The decoder starts from the prompt's last tokens; through the engine too."""
    from test_gguf_import import write_tiny_gguf

    src = tmp_path / "spm.gguf"
    write_tiny_gguf(src, tokenizer="llama")
    llm = LLM(str(src), backend="cpu")
    tok = llm.tokenizer
    prompt = tok.encode("the theater at")
    the = tok.token_id("▁the")
    out = [the, tok.token_id("▁a"), the]
    dec = IncrementalDecoder(tok, prompt)
    text = "".join(dec.push(t) for t in out) + dec.flush()
    assert text == " the a the" and tok.decode(prompt) + text == tok.decode(prompt + out)
    params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True, logit_bias={the: 100.0})
    assert llm.generate([prompt], params)[0].text == " the the"


def _process_spec(x: np.ndarray, seq: Sequence, eos: set[int]) -> np.ndarray:
    """The logit processing of every knob, in float64, by the rules' own words and in vLLM's order (its v1
    sampler: the logits processors logit_bias and min_tokens, then the penalties): logit_bias, vLLM's min_tokens
    mask of EOS and stop_token_ids, the repetition penalty over the prompt and reply (divide a positive logit,
    multiply a negative one), then OpenAI's frequency / presence penalties over the reply."""
    p, x = seq.params, x.astype(np.float64)
    for t, b in p.logit_bias.items():
        x[t] += b
    if len(seq.output_ids) < p.min_tokens:
        x[list(eos | set(p.stop_token_ids))] = -np.inf
    for t in set(seq.all_ids) if p.repetition_penalty != 1.0 else ():
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(seq.output_ids):
        x[t] -= seq.output_ids.count(t) * p.frequency_penalty + p.presence_penalty
    return x


def test_logit_bias_then_repetition_then_presence_penalty_as_vllm():
    """vLLM adds logit_bias (and min_tokens' mask) before the repetition penalty, and the frequency / presence
    penalties after it; the sampler applied the repetition penalty first. Token 5 (in the prompt, logit -1, bias
    +2, repetition penalty 2) is (-1 + 2) / 2 = 0.5, not -1 x 2 + 2 = 0 (below token 7's 0.3); token 6 (logit 3,
    generated once, presence penalty 1.25) is 3 / 2 - 1.25 = 0.25, not (3 - 1.25) / 2 = 0.875 (above 0.5)."""
    x = np.full((1, 10), -5.0, np.float32)
    x[0, 5], x[0, 7] = -1.0, 0.3
    seq = Sequence([5], SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={5: 2.0}))
    assert sample(x, [seq]) == [5] == [int(np.argmax(_process_spec(x[0], seq, set())))]
    x[0, 6] = 3.0
    seq = Sequence([5], SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={5: 2.0},
                                       presence_penalty=1.25))  # fmt: skip
    seq.output_ids = [6]
    assert sample(x, [seq]) == [5] == [int(np.argmax(_process_spec(x[0], seq, set())))]


def test_logit_bias_and_repetition_penalty_as_transformers():
    """The same order in transformers (SequenceBiasLogitsProcessor before RepetitionPenaltyLogitsProcessor), an
    independent reference: the greedy token after a logit bias and a repetition penalty, on rows where some biased
    ids are in the prompt and the order decides."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(2)
    for trial in range(40):
        x = rng.standard_normal((1, 30)).astype(np.float32)
        prompt = [int(t) for t in rng.integers(0, 30, 8)]
        bias = {int(t): float(rng.uniform(-3, 3)) for t in rng.integers(0, 30, 6)}
        pen = float(rng.choice([0.5, 1.5, 3.0]))
        ids = torch.tensor([prompt])
        y = lp.SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in bias.items()])(
            ids, torch.tensor(x)
        )
        y = lp.RepetitionPenaltyLogitsProcessor(pen)(ids, y)
        seq = Sequence(prompt, SamplingParams(temperature=0, repetition_penalty=pen, logit_bias=bias))
        assert sample(x, [seq]) == [int(torch.argmax(y))], trial


def test_generate_follows_a_float64_spec_of_every_knob(tiny_llama):
    """Each token LLM.generate samples (seeded, n > 1, penalties, bias, min_tokens, top-k / top-p) is the one the
    float64 spec above picks from the logits the engine sampled and the uniform the sequence's seed gives."""
    llm = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=32))
    eng, rng, seen = llm.engine, np.random.default_rng(4), []
    sample_ = eng.ops.sample_async

    def spy(logits, seqs, out=None):
        state = [(np.array(row), Sequence(s.prompt_ids, s.params), s.rng.bit_generator.state) for row, s in
                 zip(np.asarray(logits), seqs)]  # fmt: skip
        for (_, copy, _), s in zip(state, seqs):
            copy.output_ids = list(s.output_ids)
        got = sample_(logits, seqs, out)
        seen.extend(zip(state, got.tolist()))
        return got

    eng.ops.sample_async = spy
    eos = set(eng.eos_ids)
    for trial in range(12):
        kw = dict(
            temperature=float(rng.choice([0.0, 0.6, 1.0, 1.8])), top_k=int(rng.choice([0, 1, 8, 60])),
            top_p=float(rng.choice([1.0, 0.9, 0.4])), repetition_penalty=float(rng.choice([1.0, 1.4, 0.7])),
            presence_penalty=float(rng.choice([0.0, 1.5, -2.0])), frequency_penalty=float(rng.choice([0.0, 0.7])),
            min_tokens=int(rng.integers(0, 6)), ignore_eos=bool(rng.integers(2)), seed=trial, n=2,
            logit_bias={2: float(rng.choice([8.0, 100.0])), int(rng.integers(3, 320)): -30.0},
            stop_token_ids=[int(t) for t in rng.integers(3, 320, 2)],
        )  # fmt: skip
        llm.generate([[int(t) for t in rng.integers(3, 320, 4)]], SamplingParams(max_tokens=7, **kw))
    assert len(seen) > 60
    for (row, seq, state), got in seen:
        p, x = seq.params, _process_spec(row, seq, eos)
        if p.greedy:
            assert got == int(np.argmax(x))
            continue
        u = np.random.default_rng()
        u.bit_generator.state = state
        assert got == _sample_spec(x.astype(np.float32), p.temperature, p.top_k, p.top_p, u.random())
