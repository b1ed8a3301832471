"""A measurement, not library code: tools/bench_e2e.py with the q/k/v split GEMV that writes a quantized cache in its
epilogue (quant_gemv_split_rope, ROPE >= 3) launched on its full grid (a row group per warp) instead of the
persistent one, so that no warp's next row groups wait behind its fences, tickets and head writes.
    python3 fullgrid_qwrite.py <bench_e2e args>"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import bench_e2e  # noqa: E402

from lserve_lite.backends.cuda_quant import QuantKernels  # noqa: E402

original = QuantKernels.resident_blocks


def resident_blocks(self, name, fn, smem):
    if name.startswith("quant_gemv_split_rope<") and int(name.rstrip(">").split(",")[-1]) >= 3:
        return None  # split_blocks(outs, r, None): the full grid
    return original(self, name, fn, smem)


QuantKernels.resident_blocks = resident_blocks
sys.exit(bench_e2e.main(sys.argv[1:]))
