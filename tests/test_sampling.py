"""Sampler and streaming text: filters, seeds, penalties, stop strings, UTF-8-safe deltas."""

from __future__ import annotations

import numpy as np

from lserve_lite import LLM, EngineConfig, SamplingParams
from lserve_lite.backends.reference.sampling import sample, sample_row
from lserve_lite.sequence import Sequence
from lserve_lite.tokenizer import IncrementalDecoder


def _draws(x, n=4000, **kw):
    rng = np.random.default_rng(0)
    return np.array([sample_row(x, u=rng.random(), **kw) for _ in range(n)])


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
