"""One 32k dense causal prefill per named kernel (Llama-3-8B heads, page 64), for ncu: python3 prof_prefill.py wgmma tma bf16"""

import sys

import cupy as cp
import numpy as np

sys.path.insert(0, "tools")
import check_prefill_sm90 as c

from lserve_lite.backends.cuda_attention import CudaPlan
from lserve_lite.harness.common import bf16_bits
from lserve_lite.sparse.plan import BatchLayout, build_plan

seq = 32768
npages = seq // c.PAGE
plan = build_plan(
    BatchLayout([seq], [seq], [list(np.random.default_rng(0).permutation(npages).tolist())]),
    c.PAGE,
    c.Q_BLOCK,
)
cplan = CudaPlan.from_plan(plan)
g = cp.random.default_rng(1)
q = g.standard_normal((seq, c.HQ, c.D), dtype=np.float32).astype(np.float16)
k = g.standard_normal((npages, c.HKV, c.PAGE, c.D), dtype=np.float32).astype(np.float16)
v = g.standard_normal((npages, c.HKV, c.PAGE, c.D), dtype=np.float32).astype(np.float16)
hc = cp.zeros(c.HKV, np.int32)
for kern in sys.argv[1:]:
    bf = kern == "bf16"
    args = tuple(bf16_bits(x) for x in (q, k, v)) if bf else (q, k, v)
    out = cp.empty((seq, c.HQ * c.D), np.uint16 if bf else np.float16)
    c._run(kern, *args, cplan, hc, out)
    cp.cuda.Device().synchronize()
    print(kern, "ran", flush=True)
