"""bench_e2e with the fp16 decode ring depth set: python3 e2e_stages.py <stages> <bench_e2e args...>"""

import sys

sys.path.insert(0, "tools")
from lserve_lite.backends import cuda_attention as ca

ca.DECODE_STAGES[128] = int(sys.argv[1])
import bench_e2e  # noqa: E402  (after the ring depth is set)

sys.exit(bench_e2e.main(sys.argv[2:]))
