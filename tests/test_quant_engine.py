"""Quantized weights through the whole CPU engine: GGUF files run from their blocks, `--quantize int8|int4`.

Oracles: for GGUFs, the same file converted to float32 by `convert_gguf` (gguf's own `quants.dequantize`, an
independent decoder), run by our engine; so these compare our quantized path against our float path on the
same weights (a consistency check of the kernels, fusion and loading; the float engine itself is checked
against transformers in test_smollm2_oracle.py and test_model_oracle.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from test_gguf_import import write_tiny_gguf
from test_gpu_e2e import N_POSITIONS, TEXT
from tiny_models import make_tiny, make_tiny_numpy

from lserve_lite import LLM, SamplingParams
from lserve_lite.config import EngineConfig
from lserve_lite.errors import InvalidRequestError, ModelLoadError
from lserve_lite.sparse.patterns import PATTERNS_DIR, bundled_pattern
from lserve_lite.weights.gguf_import import convert_gguf
from lserve_lite.weights.qtensor import QuantTensor, RowStack
from lserve_lite.weights.quantize import quantize_weights

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
DECODE_POSITIONS = 512
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_q(smollm2_gguf):
    return LLM(str(smollm2_gguf), backend="cpu")


def test_smollm2_gguf_loads_quantized(smollm2_q, smollm2_gguf):
    """No float copy of a matrix: every projection and the tied head stay Q4_1 / Q8_0 blocks."""
    model = smollm2_q.engine.runner.model
    layer = model.layers[0]
    assert all(isinstance(w, QuantTensor) and w.fmt == "q4_1" for w in (layer.qkv, layer.o, layer.gate_up))
    assert isinstance(model.lm_head, QuantTensor) and model.lm_head is model.embed
    assert model.embed.fmt == "q8_0"
    total = sum(w.nbytes for lay in model.layers for w in (lay.qkv, lay.o, lay.gate_up, lay.down))
    assert total + model.embed.nbytes < smollm2_gguf.stat().st_size
    assert (
        bundled_pattern(smollm2_gguf) == PATTERNS_DIR / "SmolLM2-135M-Instruct" / "full_attention_heads.tsv"
    )


def test_smollm2_gguf_teacher_forced_vs_dequantized(smollm2_q, smollm2_gguf, smollm2_cpu):
    """Q4_1 run natively vs the same weights dequantized to float32 (smollm2_cpu), over N_POSITIONS ids.

    Prefill (GEMM on dequantized tiles, float32 activations) must agree at >= 99% of positions. The decode
    kernels (int8 activations per 32 values, as llama.cpp) are forced with 16-token chunks on the first
    DECODE_POSITIONS ids (time): measured 95.9% agreement (SmolLM2's top two logits are often < 0.5%
    apart); asserted at >= 94%."""
    ids = smollm2_q.tokenizer.encode(TEXT)[:N_POSITIONS]
    assert len(ids) >= 1000
    ref = smollm2_cpu.logits(ids)
    got = smollm2_q.logits(ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    small = LLM(str(smollm2_gguf), backend="cpu", config=EngineConfig(max_num_batched_tokens=16))
    t = time.perf_counter()
    dec = small.logits(ids[:DECODE_POSITIONS])
    agree = (dec.argmax(-1) == ref[:DECODE_POSITIONS].argmax(-1)).mean()
    print(f"decode-kernel argmax agreement {agree:.4f} over {len(dec)} ({time.perf_counter() - t:.1f} s)")
    assert agree >= 0.94


def test_smollm2_gguf_chat_answers_paris(smollm2_q):
    assert "Paris" in smollm2_q.chat(PARIS, GREEDY).text


# Every type the gguf package's writer can quantize, Q4_K / Q6_K from random blocks, F16 / F32, and a
# Q4_K_M-like mix whose fused q/k/v has two formats (a RowStack).
GGUF_TYPES = {
    "Q8_0": {},
    "Q4_0": {},
    "Q4_1": {},
    "Q4_K": {},
    "Q6_K": {},
    "F16": {},
    "F32": {},
    "Q4_K_M-mix": {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "ffn_gate": "Q4_K",
                   "ffn_up": "F16", "ffn_down": "Q6_K", "attn_output": "Q4_K", "token_embd": "Q6_K"},
}  # fmt: skip
KINDS = ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_gguf_every_type_loads_and_generates(tmp_path: Path, name: str):
    types = GGUF_TYPES[name] or dict.fromkeys(KINDS, name)
    src = tmp_path / f"tiny-{name}.gguf"
    write_tiny_gguf(src, types=types, hidden=256, ffn=512, head_dim=64, matrix_scale=1 / 16)
    native = LLM(str(src), backend="cpu")
    qkv = native.engine.runner.model.layers[0].qkv
    assert isinstance(qkv, RowStack) if name == "Q4_K_M-mix" else not isinstance(qkv, RowStack)
    flt = LLM(str(convert_gguf(src, tmp_path / "float", progress=False)), backend="cpu")
    ids = list(np.random.default_rng(1).integers(3, 200, 40))
    ref = flt.logits(ids)
    # Prefill: float32 activations on exactly gguf's dequantized weights, so float32 rounding only.
    np.testing.assert_allclose(native.logits(ids), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # Decode rows: int8 activations (each off by <= 1/254 of its 32-block's max), a few % of the logits.
    short = native.logits(ids[:6])
    assert np.abs(short - ref[:6]).max() <= 0.05 * np.abs(ref[:6]).max()
    out = native.generate([ids], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory) -> Path:
    """A tiny HF model whose in_features (128, 256) are multiples of int4's group of 128."""
    return make_tiny(tmp_path_factory.mktemp("tiny128"), hidden_size=128, intermediate_size=256, head_dim=32)


def _dequantized_copy(src: Path, dst: Path, mode: str) -> Path:
    """The HF model at `src` with its weights replaced by their `mode` quantization, dequantized to float32."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = quantize_weights(load_file(str(src / "model.safetensors")), mode)
    flat = {k: v.dequantize() if isinstance(v, QuantTensor) else v for k, v in weights.items()}
    save_file(flat, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# Closeness to the float model, RMS logit error / RMS logit: round to nearest on these Gaussian weights
# changes each matrix's outputs by ~0.7% RMS (int8: step max|row| / 127) and ~11% (int4: max|group| / 7),
# compounded over the 9 matrices in sequence of this 2-layer model; measured 1.2% and 27%.
@pytest.mark.parametrize(("mode", "tol"), [("int8", 0.03), ("int4", 0.4)])
def test_quantize_hf_model(tiny128: Path, tmp_path: Path, mode: str, tol: float):
    q = LLM(str(tiny128), backend="cpu", quantize=mode)
    model = q.engine.runner.model
    assert {model.layers[0].qkv.fmt, model.layers[0].down.fmt, model.lm_head.fmt} == {mode}
    assert isinstance(model.embed, np.ndarray)  # the embedding stays float
    ids = list(np.random.default_rng(2).integers(3, 300, 48))
    got = q.logits(ids)
    # Exactly the quantized weights' products (prefill, float32 activations): vs their float32 copy.
    same = LLM(str(_dequantized_copy(tiny128, tmp_path / mode, mode)), backend="cpu").logits(ids)
    np.testing.assert_allclose(got, same, rtol=0, atol=1e-4 * np.abs(same).max())
    ref = LLM(str(tiny128), backend="cpu").logits(ids)
    rms = np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean())
    print(f"{mode}: RMS logit error {rms:.4f} of the float model's RMS logit")
    assert rms <= tol
    out = q.generate([ids], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_quantize_int4_falls_back_to_int8_and_keeps_bias(tiny_llama, tmp_path: Path):
    """in_features 64 is not a multiple of 128: int4 becomes int8; qwen2's q/k/v biases stay float."""
    qwen = make_tiny(tmp_path / "qwen2", arch="qwen2")
    q = LLM(str(qwen), backend="cpu", quantize="int4")
    layer = q.engine.runner.model.layers[0]
    assert layer.qkv.fmt == "int8" and isinstance(layer.qkv_bias, np.ndarray)
    ids = [5, 9, 14, 3, 7, 22, 11, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    ref = LLM(str(qwen), backend="cpu").logits(ids)
    assert np.abs(q.logits(ids) - ref).max() <= 0.02 * np.abs(ref).max()


def test_quantize_bogus_is_a_clear_error(tiny_llama):
    with pytest.raises(InvalidRequestError, match="quantize must be one of 'int8', 'int4'"):
        EngineConfig(quantize="bogus")
    with pytest.raises(InvalidRequestError, match="'int3'"):
        LLM(str(tiny_llama), backend="cpu", quantize="int3")


@pytest.mark.parametrize(
    ("mode", "value", "msg"), [("int4", np.nan, "NaN or Inf"), ("int8", 1e30, "too large")]
)
def test_quantize_unquantizable_weights_is_one_line(tmp_path: Path, mode: str, value: float, msg: str):
    """A weight --quantize cannot represent (NaN, or past fp16 scales) is a ModelLoadError naming the tensor (it
    was a bare ValueError, a traceback from the CLI)."""
    from safetensors.numpy import load_file, save_file

    d = make_tiny_numpy(tmp_path / "m", hidden=128)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.self_attn.q_proj.weight"][3, 5] = value
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=rf"cannot quantize to {mode} \(tensor model.layers.1.self_attn.q_proj"
                       rf".weight: .*{msg}"):  # fmt: skip
        LLM(str(d), backend="cpu", quantize=mode)


def test_quantize_command_line_option():
    import argparse

    from lserve_lite.engine_args import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--quantize", "int4"])).quantize == "int4"
    assert engine_config_from_args(p.parse_args([])).quantize is None
    with pytest.raises(SystemExit):
        p.parse_args(["--quantize", "int3"])
