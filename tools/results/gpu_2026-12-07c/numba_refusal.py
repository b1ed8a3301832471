"""On a GPU: LSERVE_SELECTOR=numba refuses at KV allocation a model whose query-head group the Numba selector cannot
hold (16 query heads a KV head), with the one-line error, and allocates a group of 4."""

import os

os.environ["LSERVE_SELECTOR"] = "numba"
import numpy as np

from lserve_lite.backends.cuda import CudaOps
from lserve_lite.config import ModelConfig
from lserve_lite.errors import InvalidRequestError
from lserve_lite.kv.layout import KVLayout

ops = CudaOps()
for hq, ok in ((32, True), (128, False)):
    cfg = ModelConfig(
        arch="LlamaForCausalLM",
        hidden_size=hq * 128,
        intermediate_size=1024,
        num_layers=2,
        num_heads=hq,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=1000,
    )
    cls = tuple(np.zeros(8, np.int32) for _ in range(2))
    slot = tuple(np.arange(8, dtype=np.int32) for _ in range(2))
    layout = KVLayout(page_size=16, head_class=cls, head_slot=slot, sub_pages=4, select_pages=8)
    try:
        ops.alloc_kv(cfg, 16, 64, layout)
        print(f"hq {hq}: allocated", "OK" if ok else "WRONG")
    except InvalidRequestError as e:
        print(f"hq {hq}: refused: {e}", "WRONG" if ok else "OK")
