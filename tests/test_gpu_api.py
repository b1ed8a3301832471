"""The OpenAI options on the CUDA backend (gpu-marked): logprobs and prompt logprobs from the sampling
kernels equal the log-softmax of the GPU's own logits, grammar masks and logit bias applied on the device,
n candidates sharing the prompt's pages. Kernel-level rows (add_logits, mask_logits, logprob_rows against
backends/reference/sampling.py) run in tests/test_gpu_ops.py through the harness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lserve_lite import LLM, EngineConfig, SamplingParams

pytestmark = pytest.mark.gpu
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "k": {"enum": ["x", "y"]}},
    "required": ["n", "k"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gpu_llm(tmp_path_factory) -> LLM:
    from tiny_models import make_tiny_numpy

    model = make_tiny_numpy(tmp_path_factory.mktemp("tiny_gpu_api"), hidden=256)
    return LLM(
        str(model), backend="cuda", config=EngineConfig(page_size=16, max_model_len=256, num_kv_pages=64)
    )


def test_logprobs_from_the_kernels_match_the_gpu_logits(gpu_llm):
    out = gpu_llm.generate("hello world, how are you", SamplingParams(temperature=0, max_new_tokens=6, logprobs=4,
                                                                      prompt_logprobs=3))[0]  # fmt: skip
    ids = out.prompt_token_ids + out.token_ids
    x = gpu_llm.logits(ids).astype(np.float64)
    lp = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
    p = len(out.prompt_token_ids)
    for j in range(1, p):
        e = out.prompt_logprobs[j]
        assert abs(e.logprob - lp[j - 1, ids[j]]) < 1e-3 and len(e.top) == 3
    for i, e in enumerate(out.logprobs):
        assert abs(e.logprob - lp[p - 1 + i, out.token_ids[i]]) < 1e-3
        assert (
            e.top[0][0] == out.token_ids[i] and e.top[0][1] == e.logprob
        )  # greedy: chosen = top, same number


def test_masks_bias_and_candidates_on_the_device(gpu_llm):
    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    outs = gpu_llm.generate(
        ["go"] * 16, SamplingParams(temperature=0.9, max_new_tokens=60, response_format=fmt)
    )
    assert all(o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    assert all(set(json.loads(o.text)) == {"n", "k"} for o in outs)
    forced = gpu_llm.generate("hi", SamplingParams(temperature=0.8, max_new_tokens=5, ignore_eos=True,
                                                   logit_bias={42: 100.0}, seed=3))[0]  # fmt: skip
    assert forced.token_ids == [42] * 5
    eng = gpu_llm.engine
    before = eng.prompt_tokens_computed
    long = "the quick brown fox jumps over the lazy dog " * 6
    outs = gpu_llm.generate(long, SamplingParams(n=3, temperature=1.0, seed=1, max_new_tokens=4, ignore_eos=True,
                                                 presence_penalty=1.0, frequency_penalty=0.5))  # fmt: skip
    p = len(outs[0].prompt_token_ids)
    assert eng.prompt_tokens_computed - before == p + 2 * (p - (p - 1) // 16 * 16)
    assert eng.blocks.num_used == 0
