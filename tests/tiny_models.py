"""Tiny random Hugging Face models (transformers, torch on the CPU) for oracle tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on a few lines, padded to vocab_size tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "the quick brown fox jumps over the lazy dog " * 3,
        "hello world, how are you today?",
        "0123456789",
    ]
    tok.train_from_iterator(text * 10, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": '
        "\"{% for m in messages %}<|im_start|>{{ m['role'] }}\\n{{ m['content'] }}<|im_end|>\\n{% endfor %}"
        '{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"}'
    )


def make_tiny(path: Path, arch: str = "llama", seed: int = 0, dtype: str = "float32", **over) -> Path:
    """Save a random tiny model of `arch` (llama, mistral, qwen2) with a tokenizer into `path`."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False,
        eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
    kw.update(over)
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }[arch]
    model = cls[1](cls[0](**kw)).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, kw["vocab_size"])
    return path


def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
