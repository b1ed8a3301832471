"""A SmolLM2-shaped model of random fp16 weights (the real config and tokenizer, no weights carried): host-overhead
A/B runs need its shapes and vocabulary, not its answers. python3 rand_smol.py <dir with config + tokenizer> <out>"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
    if (src / f).exists():
        shutil.copy(src / f, dst / f)
c = json.loads((src / "config.json").read_text())
h, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
d = h // c["num_attention_heads"]
q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
rng = np.random.default_rng(0)


def w(*shape):
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)


t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float16)}
for i in range(n):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": np.ones(h, np.float16), p + "post_attention_layernorm.weight": np.ones(h, np.float16),
          p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
          p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
          p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h), p + "mlp.down_proj.weight": w(h, f)}  # fmt: skip
if not c.get("tie_word_embeddings", False):
    t["lm_head.weight"] = w(v, h)
save_file(t, str(dst / "model.safetensors"))
print(f"rand_smol: {len(t)} tensors, {sum(a.nbytes for a in t.values()) / 1e6:.0f} MB")
