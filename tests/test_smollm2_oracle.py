"""The default model on the CPU engine against transformers loading the same GGUF with its own loader."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_lite import SamplingParams
from lserve_lite.backends.cpu_half import NATIVE_HALF

TEXTS = [
    "The history of the Roman Empire spans many centuries. " * 25,
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    * 6,
    "東京は日本の首都です。🙂 Emoji and CJK mixed with English text, numbers 12345 and    spaces.\n\n" * 8,
]


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    d, name = smollm2_gguf.parent, smollm2_gguf.name
    model = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model, tok


@pytest.fixture(scope="module")
def smollm2_cpu_fp32(smollm2_dir):
    from lserve_lite import LLM, EngineConfig

    return LLM(str(smollm2_dir), backend="cpu", config=EngineConfig(kv_dtype="fp32"))


@pytest.mark.parametrize("text", TEXTS, ids=["prose", "code", "cjk-emoji"])
def test_teacher_forced_logits_match(hf_model, smollm2_cpu, smollm2_cpu_fp32, text):
    """float32 KV: within 1e-2 of transformers' float32; the default fp16 KV (K/V rounded to 11 bits, as on the
    GPU and in llama.cpp): the same argmax everywhere, logits within 0.1 (measured <= 0.05)."""
    import torch

    model, tok = hf_model
    ids = tok(text)["input_ids"]
    assert 150 <= len(ids) <= 600
    assert smollm2_cpu.tokenizer.encode(text) == ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    for llm, tol in ((smollm2_cpu_fp32, 1e-2), (smollm2_cpu, 0.1)):
        got = llm.logits(ids)
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        assert np.abs(got - ref).max() <= tol
    assert smollm2_cpu.engine.kv_format.name == ("fp16" if NATIVE_HALF else "fp32")


def test_chat_prompt_and_greedy_generation_match(hf_model, smollm2_cpu):
    import torch

    model, tok = hf_model
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three primary colors."},
    ]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert smollm2_cpu.tokenizer.render_chat(msgs) == want
    ids = smollm2_cpu.tokenizer.encode_chat(msgs)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
    out = smollm2_cpu.chat(msgs, SamplingParams(temperature=0, max_new_tokens=20))
    eos = set(smollm2_cpu.engine.cfg.eos_token_ids)
    ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
    assert out.token_ids == ref
