"""Startup cost of the GPU's RoPE tables at a 2^24-token context (streaming-only LServe allows it), head_dim 128:
the device-built tables (CudaOps.rope_tables) against the old path (host float64 angles, float32 tables, fp16
upload)."""

import time

from lserve_lite.backends.base import RopeTables, rope_tables
from lserve_lite.backends.cuda import CudaOps
from lserve_lite.config import ModelConfig

cfg = ModelConfig("LlamaForCausalLM", 4096, 14336, 1, 32, 8, 128, 1000, rope_theta=500000.0)
ops, n = CudaOps(), 1 << 24
ops.rope_tables(RopeTables(cfg, 1 << 16))  # warm: CuPy's elementwise kernels compiled
ops.cp.cuda.Device().synchronize()
t = time.perf_counter()
cos, sin = ops.rope_tables(RopeTables(cfg, n))
ops.cp.cuda.Device().synchronize()
dev = time.perf_counter() - t
del cos, sin
t = time.perf_counter()
host = [ops.upload(a, name="rope") for a in rope_tables(cfg, n)]
ops.cp.cuda.Device().synchronize()
old = time.perf_counter() - t
print(
    f"rope tables at 2^24 positions, head_dim 128: device-built {dev:.3f} s, host-built + upload {old:.2f} s"
)
