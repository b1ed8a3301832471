"""Tiny random Hugging Face models (transformers, torch on the CPU) for oracle tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Engine knobs of a tiny model's server for tool calls: the tiny tokenizer spends ~700 tokens on the tools.
TOOLS_CFG = dict(page_size=16, max_model_len=2048, num_kv_pages=1024)


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


def make_tiny_numpy(path: Path, seed: int = 0, max_position_embeddings: int = 2048, hidden: int = 64) -> Path:
    """A random tiny llama written with NumPy + safetensors (no torch import: seconds instead of tens);
    4 heads, so `hidden=256` gives head_dim 64, a size the GPU kernels run."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    v, d, f, layers, heads, kv = 320, hidden, 96, 2, 4, 2
    hd = d // heads
    w = {"model.embed_tokens.weight": (v, d), "model.norm.weight": None, "lm_head.weight": (v, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                  p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, d),
                  p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                  p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": None,
                  p + "post_attention_layernorm.weight": None})  # fmt: skip
    tensors = {k: np.ones(d, np.float32) if s is None else (0.02 * rng.standard_normal(s)).astype(np.float32)
               for k, s in w.items()}  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=v, hidden_size=d, intermediate_size=f,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               max_position_embeddings=max_position_embeddings, rope_theta=10000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, torch_dtype="float32")  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path, v)
    return path
