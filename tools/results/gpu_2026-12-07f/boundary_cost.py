"""What a dependent step costs on the GPU: a kernel boundary (PDL or not, in a CUDA Graph) against a grid barrier
inside one persistent kernel. The question behind it: SmolLM2's batch-1 decode is ~8 dependent kernels a layer,
each bound by latency (docs/PERF_e2e.md), and a persistent layer kernel would pay a grid barrier where we pay a
boundary; if the barrier is not clearly cheaper, that design is not worth building.

Each step: every block reads one word that another block wrote in the previous step (a true dependency), reads
WPER floats of its own "weights" (before the PDL wait in the PDL chain, as our GEMVs do), writes its word.
    python3 tools/results/gpu_2026-12-07f/boundary_cost.py [--steps 240] [--reps 20] [--json FILE]
Prints us per step for each (blocks, threads, weights a block) and mode; a consistency check (every block's word
equals the number of steps run) guards against a barrier that lets a block run ahead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

SRC = r"""
#include "pdl.cuh"

__device__ __forceinline__ float weights(const float* __restrict__ w, int n) {
  float acc = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += __ldg(w + i);
  return acc;
}

// One dependent step: block b's word (ping-pong by step parity) = block (b + 1) % G's of the previous step + 1
// (acc keeps the weight loads alive).
extern "C" __global__ void hop_pp(float* buf, const float* __restrict__ w, int wper, int early, int parity) {
  const int b = blockIdx.x, G = gridDim.x;
  float acc = early ? weights(w + (long long)b * wper, wper) : 0.f;
  lserve::pdl_enter();
  if (!early) acc = weights(w + (long long)b * wper, wper);
  const float v = __ldcg(buf + ((b + 1) % G) * 32 + parity);
  if (threadIdx.x == 0) __stcg(buf + b * 32 + (parity ^ 1), v + 1.f);
  if (acc == 1.2345e30f) buf[b * 32 + 2] = acc;
}

// Sense-free generation barrier: bar[0] arrivals, bar[1] generation.
__device__ __forceinline__ void grid_barrier(unsigned int* bar, int G) {
  __syncthreads();
  if (threadIdx.x == 0) {
    volatile unsigned int* vb = bar;
    const unsigned int gen = vb[1];
    __threadfence();
    if (atomicAdd(bar, 1u) == (unsigned int)G - 1) {
      vb[0] = 0;
      __threadfence();
      atomicAdd(bar + 1, 1u);
    } else {
      while (vb[1] == gen) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

extern "C" __global__ void persist(float* buf, const float* __restrict__ w, int wper, int steps,
                                  unsigned int* bar) {
  lserve::pdl_enter();
  const int b = blockIdx.x, G = gridDim.x;
  for (int s = 0; s < steps; ++s) {
    const int parity = s & 1;
    const float acc = weights(w + ((long long)(s & 7) * G + b) * wper, wper);
    const float v = __ldcg(buf + ((b + 1) % G) * 32 + parity);
    if (threadIdx.x == 0) __stcg(buf + b * 32 + (parity ^ 1), v + 1.f);
    if (acc == 1.2345e30f) buf[b * 32 + 2] = acc;
    grid_barrier(bar, G);
  }
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import cupy as cp
    import numpy as np

    from lserve_lite.backends.cuda_launch import Module

    kdir = ROOT / "kernels"
    arch = cp.cuda.Device().compute_capability
    raw = cp.RawModule(code=SRC, options=("-std=c++17", f"-I{kdir}"))
    pdl_mod, plain_mod = Module(raw, pdl=True), Module(raw, pdl=False)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    rows = []
    stream = cp.cuda.Stream(non_blocking=True)
    for blocks in (sms // 4, sms // 2, sms, 2 * sms):
        for threads in (128, 256):
            for wper in (0, 256, 1024):
                w = cp.random.standard_normal(8 * blocks * max(wper, 1), dtype=cp.float32)
                buf = cp.zeros(blocks * 32, cp.float32)
                bar = cp.zeros(2, cp.uint32)
                res = {"blocks": blocks, "threads": threads, "wper": wper}
                for mode in ("chain", "chain_pdl", "chain_pdl_early", "persist"):
                    mod = plain_mod if mode == "chain" else pdl_mod
                    buf[...] = 0
                    cp.cuda.Device().synchronize()
                    with stream:
                        stream.begin_capture()
                        if mode == "persist":
                            mod.get_function("persist")(
                                (blocks,), (threads,), (buf, w, np.int32(wper), np.int32(args.steps), bar)
                            )
                        else:
                            k = mod.get_function("hop_pp")
                            early = np.int32(mode == "chain_pdl_early")
                            for s in range(args.steps):
                                k((blocks,), (threads,), (buf, w[(s & 7) * blocks * wper :], np.int32(wper),
                                                          early, np.int32(s & 1)))  # fmt: skip
                        graph = stream.end_capture()
                    graph.launch(stream)  # warm-up
                    stream.synchronize()
                    times = []
                    for _ in range(args.reps):
                        e0 = stream.record()
                        graph.launch(stream)
                        e1 = stream.record()
                        e1.synchronize()
                        times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / args.steps)
                    words = cp.asnumpy(buf.reshape(blocks, 32)[:, :2])
                    # after 1 + reps launches of `steps` (even) each: every block's latest word holds their total
                    total = (1 + args.reps) * args.steps
                    ok = bool(np.all(words[:, total & 1] == total))
                    res[mode] = round(statistics.median(times), 3)
                    res[mode + "_ok"] = ok
                rows.append(res)
                print(
                    f"blocks {blocks:4d} threads {threads:4d} wper {wper:5d} | us a step: chain {res['chain']:.3f}"
                    f"  pdl {res['chain_pdl']:.3f}  pdl+early {res['chain_pdl_early']:.3f}  persist "
                    f"{res['persist']:.3f}  | checks {[res[m + '_ok'] for m in ('chain', 'chain_pdl', 'persist')]}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                                         "arch": arch, "steps": args.steps, "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
