"""Decode attention alone per ring depth (fp16, Llama-3-8B heads): python3 dec_stages.py <stages>"""

import sys

sys.path.insert(0, "tools")
from lserve_lite.backends import cuda_attention as ca

st = int(sys.argv[1])
ca.DECODE_STAGES[128] = st
import bench_attention as ba  # noqa: E402  (after the ring depth is set)

for b in (1, 8):
    for ctx in (4096, 8192, 32768, 131072):
        r = ba.ours_decode(ctx, b)
        print(
            f"stages {st} ctx {ctx} x{b}: {r['us']:.1f} us ({r['tbs']:.2f} TB/s), eager {r['eager_us']:.1f}",
            flush=True,
        )
