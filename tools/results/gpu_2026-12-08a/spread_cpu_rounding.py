"""How far the spread norm's rounding alone moves a model's logits, on the CPU (no GPU needed): the CPU backend with
one-row rmsnorm_linear computed as the spread norm rounds (int8 activations of r * w, rstd on the sums) against the
plain CPU backend, on tests/test_gpu_spread.py's models (a random 3-layer Llama, int4; Qwen2-style int8), 21-token
prompt then 12 decode steps teacher-forced with the plain run's greedy tokens. Prints the largest difference
relative to the largest logit. `--control`: the subclass computes the composed norm instead (the floor: ~1e-5).

    python3 tools/results/gpu_2026-12-08a/spread_cpu_rounding.py [--control]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_gpu_ops import _step, small_llama  # noqa: E402

from lserve_lite.backends.base import norm_qkv_rope  # noqa: E402
from lserve_lite.backends.cpu import CpuOps  # noqa: E402
from lserve_lite.backends.reference.layers import rmsnorm_ref  # noqa: E402
from lserve_lite.config import EngineConfig  # noqa: E402
from lserve_lite.engine.model_runner import ModelRunner  # noqa: E402
from lserve_lite.kv.block_manager import BlockManager  # noqa: E402
from lserve_lite.sampling_params import SamplingParams  # noqa: E402
from lserve_lite.sequence import Sequence  # noqa: E402
from lserve_lite.weights.quantize import quantize_weights  # noqa: E402


class SpreadRounding(CpuOps):
    """One-row norms + GEMVs rounded as the spread norm does: linear(r * w) * rstd (gate/up scaled before SiLU)."""

    def __init__(self, control: bool):
        super().__init__()
        self.control = control

    def rmsnorm_linear(self, x, residual, norm_w, eps, w, bias=None, silu=False):
        if residual is None or x.shape[0] != 1:
            return super().rmsnorm_linear(x, residual, norm_w, eps, w, bias, silu)
        r = (x + residual).astype(np.float32)
        lnw = norm_w.astype(np.float32)
        if self.control:
            y = self.linear(rmsnorm_ref(r, lnw, eps), w)
        else:
            rstd = 1.0 / np.sqrt(np.mean(r.astype(np.float64) ** 2, axis=1, keepdims=True) + eps)
            y = self.linear(r * lnw, w) * rstd.astype(np.float32)
        if silu:
            g, u = np.split(y, 2, axis=1)
            y = g / (1 + np.exp(-g)) * u
        return (y if bias is None else y + bias), r

    def qkv_rope(self, x, residual, norm_w, eps, w, bias, positions, slots, cache, layer, rope):
        return norm_qkv_rope(self, x, residual, norm_w, eps, w, bias, positions, slots, cache, layer, rope)


def runner(cfg, ws, ops):
    ecfg = EngineConfig(max_num_seqs=8, page_size=16, max_model_len=1024, num_kv_pages=96)
    return ModelRunner(cfg, ws, ops, ecfg, 1024, 96), BlockManager(96, 16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--control", action="store_true")
    args = ap.parse_args()
    for mode, bias in (("int4", False), ("int8", True)):
        cfg, ws = small_llama(qkv_bias=bias, layers=3)
        wq = quantize_weights(ws, mode)
        plain, spread = runner(cfg, wq, CpuOps()), runner(cfg, wq, SpreadRounding(args.control))
        prompt = list(np.random.default_rng(3).integers(0, cfg.vocab_size, 21))
        sa, sb = [Sequence(list(prompt), SamplingParams())], [Sequence(list(prompt), SamplingParams())]
        token, worst = int(_step(*plain, sa, [21]).argmax(-1)[0]), 0.0
        _step(*spread, sb, [21])
        for _ in range(12):
            sa[0].output_ids.append(token)
            sb[0].output_ids.append(token)
            a, b = _step(*plain, sa, [1]), _step(*spread, sb, [1])
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
            token = int(a.argmax(-1)[0])
        print(f"{mode}: largest |spread rounding - composed| / largest logit over 12 steps: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
