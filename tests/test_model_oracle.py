"""The CPU engine's teacher-forced logits against transformers on tiny random models of each architecture."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from tiny_models import hf_logits, make_tiny

from lserve_lite import LLM, EngineConfig

CASES = {
    "llama-gqa": dict(arch="llama"),
    "llama-tied-mha": dict(arch="llama", tie_word_embeddings=True, num_key_value_heads=4),
    "llama3-rope-scaling": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),  # fmt: skip
    "mistral": dict(arch="mistral", sliding_window=None),
    "qwen2-bias": dict(arch="qwen2", num_key_value_heads=1),
    "llama-bf16": dict(arch="llama", dtype="bfloat16"),
    "llama-fp16": dict(arch="llama", dtype="float16"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    path = make_tiny(tmp_path / case, seed=zlib.crc32(case.encode()) % 1000, **CASES[case])
    ids = [int(t) for t in np.random.default_rng(1).integers(0, 320, 300)]
    ref = hf_logits(path, ids)
    # float32 KV: the architectures' float numerics against transformers' (the default fp16 KV rounds K/V to 11
    # bits, which flips near-tied argmaxes of these random models; it is checked in test_kv_quant.py)
    llm = LLM(str(path), backend="cpu", config=EngineConfig(max_num_batched_tokens=96, kv_dtype="fp32"))
    got = llm.logits(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_chunk_size_does_not_change_logits(tiny_llama):
    ids = [int(t) for t in np.random.default_rng(2).integers(0, 320, 257)]
    a = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(max_num_batched_tokens=17)).logits(ids)
    b = LLM(str(tiny_llama), backend="cpu", config=EngineConfig(max_num_batched_tokens=512)).logits(ids)
    assert np.abs(a - b).max() < 1e-4


def test_tied_config_with_its_own_head_runs_that_head(tmp_path):
    """config.json ties the head to the embedding, but the checkpoint holds an lm_head.weight of other values:
    transformers keeps the two apart (and warns), so the head is the checkpoint's; the engine used the embedding
    (max logit error 1.26). An lm_head equal to the embedding stays tied (one table held)."""
    import json

    from safetensors.numpy import load_file, save_file
    from tiny_models import make_tiny_numpy

    path = make_tiny_numpy(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True, "model_type": "llama"}))
    ids = [5, 9, 14, 3, 7, 22, 11, 40]
    llm = LLM(str(path), backend="cpu", config=EngineConfig(kv_dtype="fp32"))
    assert np.abs(llm.logits(ids) - hf_logits(path, ids)).max() < 1e-4
    sd = load_file(str(path / "model.safetensors"))
    save_file(sd | {"lm_head.weight": sd["model.embed_tokens.weight"]}, str(path / "model.safetensors"))
    model = LLM(str(path), backend="cpu").engine.runner.model
    assert model.lm_head is model.embed
