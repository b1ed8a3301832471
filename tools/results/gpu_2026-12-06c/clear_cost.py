"""What the allocator's page clear costs a step on CUDA: CudaOps.clear_pages on a Llama-3-8B-shaped fp16 / int8 cache
(32 layers, 8 KV heads, head_dim 128, 16-token pages) and a SmolLM2-shaped one, 1 and 8 pages (decode steps where
sequences cross into a new page), host wall time with a device sync (launch + the one upload) and device time
(CUDA events), medians of 200.  python3 tools/results/gpu_2026-12-06c/clear_cost.py"""

import time

import cupy as cp
import numpy as np

from lserve_lite.backends.cuda import CudaOps
from lserve_lite.config import ModelConfig
from lserve_lite.kv.quant import FORMATS

ops = CudaOps()
shapes = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
}
print(f"{'model':14} {'kv':5} {'pages':>5} {'host us':>8} {'device us':>9}")
for name, d in shapes.items():
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], max_position_embeddings=8192, **d))
    for kv in ("fp16", "int8"):
        cache = ops.alloc_kv(cfg, 16, 4096, fmt=FORMATS[kv])
        for n in (1, 8):
            pages = np.arange(100, 100 + n, dtype=np.int64)
            empty = np.zeros(0, np.int64)
            host, dev = [], []
            for i in range(220):
                s, e = cp.cuda.Event(), cp.cuda.Event()
                cp.cuda.Device().synchronize()
                t = time.perf_counter()
                s.record()
                ops.clear_pages(cache, pages, empty)
                e.record()
                e.synchronize()
                if i >= 20:
                    host.append((time.perf_counter() - t) * 1e6)
                    dev.append(cp.cuda.get_elapsed_time(s, e) * 1e3)
            print(f"{name:14} {kv:5} {n:5d} {np.median(host):8.1f} {np.median(dev):9.1f}")
        del cache
