"""A random SmolLM2-shaped fp16 model (the real config and tokenizer, weights N(0, 0.02)) in argv[2], from argv[1]'s files."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    shutil.copy(f, dst / f.name)
c = json.loads((src / "config.json").read_text())
d, f, v, L, h, kv = (
    c["hidden_size"],
    c["intermediate_size"],
    c["vocab_size"],
    c["num_hidden_layers"],
    c["num_attention_heads"],
    c["num_key_value_heads"],
)
hd = d // h
rng = np.random.default_rng(0)


def w(*s):
    return (0.02 * rng.standard_normal(s, dtype=np.float32)).astype(np.float16)


t = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": np.ones(d, np.float16)}
for i in range(L):
    p = f"model.layers.{i}."
    t.update(
        {
            p + "self_attn.q_proj.weight": w(h * hd, d),
            p + "self_attn.k_proj.weight": w(kv * hd, d),
            p + "self_attn.v_proj.weight": w(kv * hd, d),
            p + "self_attn.o_proj.weight": w(d, h * hd),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": np.ones(d, np.float16),
            p + "post_attention_layernorm.weight": np.ones(d, np.float16),
        }
    )
save_file(t, str(dst / "model.safetensors"))
print("model written", dst)
