"""What vLLM's LLM fills in for a request: generation_config.json's sampling fields make
`get_default_sampling_params()`, which a call without sampling_params runs with, and the engine's seed seeds
requests without one of their own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lserve_lite import LLM, EngineConfig, InvalidRequestError, SamplingParams


def _with_generation_config(tiny_llama: Path, tmp_path: Path, fields: dict) -> str:
    """A copy of the tiny model whose generation_config.json also holds `fields`."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    gen = model / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), **fields}))
    return str(model)


@pytest.fixture(scope="module")
def creator_llm(tiny_llama, tmp_path_factory):
    """A model whose creator asks for greedy replies of 3 tokens (top_k 50 and repetition_penalty 1.0 are
    transformers' defaults, which vLLM does not read as the creator's)."""
    fields = {"temperature": 0.0, "max_new_tokens": 3, "top_k": 50, "repetition_penalty": 1.0, "top_p": 0.9}
    model = _with_generation_config(tiny_llama, tmp_path_factory.mktemp("gen"), fields)
    return LLM(model, backend="cpu", config=EngineConfig(num_kv_pages=16))


def test_default_sampling_params_are_the_generation_configs(creator_llm):
    sp = creator_llm.get_default_sampling_params()
    assert (sp.temperature, sp.max_tokens, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.0, 3, 0.9, 0, 1.0)
    sp.max_tokens = 1  # vLLM's examples set fields on it: a new object each call
    assert creator_llm.get_default_sampling_params().max_tokens == 3


def test_calls_without_sampling_params_run_with_the_models_defaults(creator_llm):
    explicit = SamplingParams(temperature=0.0, max_tokens=3, top_p=0.9)
    want = creator_llm.generate("hello world", explicit)[0].token_ids
    assert 1 <= len(want) <= 3
    assert creator_llm.generate("hello world")[0].token_ids == want
    assert creator_llm.generate(["the fox", "hello world"], [explicit, None])[1].token_ids == want
    msgs = [{"role": "user", "content": "hello"}]
    assert creator_llm.chat(msgs).token_ids == creator_llm.chat(msgs, explicit).token_ids
    streamed = [t for out in creator_llm.stream_outputs("hello world") for t in out.token_ids]
    assert streamed == want


def test_a_model_without_sampling_fields_defaults_as_sampling_params(tiny_llama):
    with LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16)) as llm:
        assert llm.get_default_sampling_params() == SamplingParams()


def test_refused_generation_config_values_name_the_file(tiny_llama, tmp_path):
    model = _with_generation_config(tiny_llama, tmp_path, {"temperature": -1})
    with LLM(model, backend="cpu", config=EngineConfig(num_kv_pages=16)) as llm:
        refused = r"generation_config\.json .*temperature.*pass sampling_params"
        with pytest.raises(InvalidRequestError, match=refused):
            llm.generate("hello")
        out = llm.generate("hello", SamplingParams(max_tokens=2))[0]  # the caller's own params still run
        assert out.token_ids


def test_an_engine_seed_repeats_unseeded_requests_as_vllms(tiny_llama):
    """vLLM's LLM(seed=...) makes requests without a seed of their own repeat from run to run; here it was refused.
    Each unseeded request (and candidate) gets its own seed from the engine's, in the order they are added."""
    hot = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, n=2)

    def run(seed: int) -> list[list[int]]:
        with LLM(str(tiny_llama), backend="cpu", config=EngineConfig(num_kv_pages=16), seed=seed) as llm:
            return [o.token_ids for o in llm.generate([[5, 6], [7]], hot) + llm.generate([[5, 6]], hot)]

    first = run(5)
    assert run(5) == first and run(6) != first
    assert len({tuple(t) for t in first}) == len(first)  # every request and candidate drew its own numbers
    with pytest.raises(InvalidRequestError, match=r"^seed must be a non-negative integer, got -1$"):
        LLM(str(tiny_llama), backend="cpu", seed=-1)
