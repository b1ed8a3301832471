"""Is a persistent layer kernel worth building for batch-1 decode? A realistic piece of one, measured both ways:
the MLP block of a decoder layer (residual add + RMSNorm + gate/up GEMV + SiLU-and-multiply, then the down GEMV),
fp16 weights, L layers chained, as

  chain      two kernels a layer (norm + gate_up + SiLU, then down), plain launches in a CUDA Graph;
  chain_pdl  the same with programmatic dependent launch, each kernel loading its first weights before the wait
             (what the engine's decode GEMVs do);
  persist    one kernel for all L layers, a grid barrier where the chain has a kernel boundary, each warp loading
             its first weights of the next phase before the barrier;
  chain_sep  (PDL) three kernels a layer: the add + RMSNorm in a one-block kernel of its own, as the engine runs it
             before a packed-weight GEMV, then gate_up reading the normed row, then down;
  chain_ss   (PDL) two kernels a layer, the residual add in down's epilogue, which also leaves each block's sum of
             squares of the rows it wrote; gate_up sums those partials in a fixed order (one warp) and scales its
             dot products by the norm, so its prologue has no block reduction before the GEMV (the question: is
             this cheaper than the hop chain_sep pays, and than chain_pdl's prologue?).

Same device code, same work split (a warp per output row pair / row), so the difference is the boundary (and, for
chain_sep / chain_ss, where the norm is done). Checked
against a float64 NumPy reference of the same fp16 weights (each mode, fresh random inputs, outputs poisoned first).
    python3 tools/results/gpu_2026-12-07g/mlp_persist.py [--layers 30] [--shape 576x1536] [--json FILE]
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
#include <cuda_fp16.h>
#include "pdl.cuh"

#define WARPS 8
constexpr int H = HDIM, I = IDIM;         // hidden, intermediate (multiples of 256)
constexpr int HV = H / 8, IV = I / 8;     // 16-byte vectors a row
constexpr int HPL = (HV + 31) / 32, IPL = (IV + 31) / 32;  // vectors a lane

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int NV, int PL>
__device__ __forceinline__ void load_row(uint4 (&r)[PL], const __half* w) {
  const uint4* p = reinterpret_cast<const uint4*>(w);
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int v = lane + 32 * i;
    r[i] = v < NV ? __ldg(p + v) : make_uint4(0, 0, 0, 0);
  }
}

template <int NV, int PL>
__device__ __forceinline__ float dot_row(const uint4 (&r)[PL], const float* x) {
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int v = lane + 32 * i;
    if (v < NV) {
      const __half2* h = reinterpret_cast<const __half2*>(&r[i]);
      const float4 a = reinterpret_cast<const float4*>(x)[2 * v], b = reinterpret_cast<const float4*>(x)[2 * v + 1];
      const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]), f2 = __half22float2(h[2]),
                   f3 = __half22float2(h[3]);
      acc += f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y + f3.x * b.z + f3.y * b.w;
    }
  }
  return warp_sum(acc);
}

// residual add + RMSNorm into shared memory (every block, redundantly); block 0 writes the new residual.
__device__ __forceinline__ void norm_in(float* xs, const float* x, const float* res_in, float* res_out,
                                        const __half* lnw, float eps) {
  __shared__ float red[WARPS];
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float h = __ldcg(x + i) + __ldcg(res_in + i);
    xs[i] = h;
    ss += h * h;
    if (blockIdx.x == 0) res_out[i] = h;
  }
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < WARPS; ++w) t += red[w];
  const float inv = rsqrtf(t / H + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) xs[i] = xs[i] * inv * __half2float(lnw[i]);
  __syncthreads();
}

// gate/up rows j and I + j of wgu, SiLU(gate) * up into act[j], for this warp's rows; the first row pair preloaded.
__device__ __forceinline__ void gate_up(float* act, const __half* wgu, const float* xs, int gw, int GW,
                                        uint4 (&g0)[HPL], uint4 (&u0)[HPL], float scale = 1.f) {
  for (int j = gw, first = 1; j < I; j += GW, first = 0) {
    uint4 g[HPL], u[HPL];
    if (first) {
#pragma unroll
      for (int i = 0; i < HPL; ++i) g[i] = g0[i], u[i] = u0[i];
    } else {
      load_row<HV, HPL>(g, wgu + (long long)j * H);
      load_row<HV, HPL>(u, wgu + (long long)(I + j) * H);
    }
    const float a = scale * dot_row<HV, HPL>(g, xs), b = scale * dot_row<HV, HPL>(u, xs);
    if ((threadIdx.x & 31) == 0) __stcg(act + j, a / (1.f + __expf(-a)) * b);
  }
}

// down rows into out; with res_in, out = res_in + W_d act (the residual add), and the sum of squares of the rows
// this warp wrote is returned (every lane holds it)
__device__ __forceinline__ float down(float* out, const __half* wd, const float* acts, int gw, int GW,
                                      uint4 (&d0)[IPL], const float* res_in = nullptr) {
  float ss = 0.f;
  for (int r = gw, first = 1; r < H; r += GW, first = 0) {
    uint4 d[IPL];
    if (first) {
#pragma unroll
      for (int i = 0; i < IPL; ++i) d[i] = d0[i];
    } else {
      load_row<IV, IPL>(d, wd + (long long)r * I);
    }
    const float v = dot_row<IV, IPL>(d, acts) + (res_in ? __ldcg(res_in + r) : 0.f);
    if ((threadIdx.x & 31) == 0) __stcg(out + r, v);
    ss += v * v;
  }
  return ss;
}

__device__ __forceinline__ void preload_gu(uint4 (&g0)[HPL], uint4 (&u0)[HPL], const __half* wgu, int gw) {
  if (gw < I) {
    load_row<HV, HPL>(g0, wgu + (long long)gw * H);
    load_row<HV, HPL>(u0, wgu + (long long)(I + gw) * H);
  }
}

__device__ __forceinline__ void preload_d(uint4 (&d0)[IPL], const __half* wd, int gw) {
  if (gw < H) load_row<IV, IPL>(d0, wd + (long long)gw * I);
}

// x: [2][H] ping-pong activations (x[0] the input of layer 0), res: [2][H] residual ping-pong, act: [I].
extern "C" __global__ void __launch_bounds__(WARPS * 32) k_gate_up(const __half* wgu, const __half* lnw, const float* x,
    const float* res_in, float* res_out, float* act, float eps) {
  __shared__ __align__(16) float xs[H];
  const int gw = blockIdx.x * WARPS + (threadIdx.x >> 5), GW = gridDim.x * WARPS;
  uint4 g0[HPL], u0[HPL];
  preload_gu(g0, u0, wgu, gw);
  lserve::pdl_enter();
  norm_in(xs, x, res_in, res_out, lnw, eps);
  gate_up(act, wgu, xs, gw, GW, g0, u0);
}

// chain_sep: the add + RMSNorm alone (one block), its normed row read by gate_up
extern "C" __global__ void __launch_bounds__(WARPS * 32) k_norm(const __half* lnw, const float* x, const float* res_in,
    float* res_out, float* xn, float eps) {
  __shared__ __align__(16) float xs[H];
  lserve::pdl_enter();
  norm_in(xs, x, res_in, res_out, lnw, eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) __stcg(xn + i, xs[i]);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) k_gate_up_xn(const __half* wgu, const float* xn, float* act) {
  __shared__ __align__(16) float xs[H];
  const int gw = blockIdx.x * WARPS + (threadIdx.x >> 5), GW = gridDim.x * WARPS;
  uint4 g0[HPL], u0[HPL];
  preload_gu(g0, u0, wgu, gw);
  lserve::pdl_enter();
  for (int i = threadIdx.x; i < H; i += blockDim.x) xs[i] = __ldcg(xn + i);
  __syncthreads();
  gate_up(act, wgu, xs, gw, GW, g0, u0);
}

// down rows into out; for chain_ss (part given) with the residual add in its epilogue (out = res_in + W_d act) and
// each block's sum of squares of the rows it wrote in part[blockIdx.x] (0 where it wrote none)
extern "C" __global__ void __launch_bounds__(WARPS * 32) k_down(const __half* wd, const float* act,
    const float* res_in, float* out, float* part) {
  __shared__ __align__(16) float as[I];
  __shared__ float red[WARPS];
  const int gw = blockIdx.x * WARPS + (threadIdx.x >> 5), GW = gridDim.x * WARPS;
  uint4 d0[IPL];
  preload_d(d0, wd, gw);
  lserve::pdl_enter();
  for (int i = threadIdx.x; i < I; i += blockDim.x) as[i] = __ldcg(act + i);
  __syncthreads();
  const float ss = down(out, wd, as, gw, GW, d0, res_in);
  if (!part) return;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < WARPS; ++w) t += red[w];
    __stcg(part + blockIdx.x, t);
  }
}

// chain_ss: gate_up over the residual stream res, normed by the P partial sums of squares the down before it left
// (summed by one warp in the same order in every block) folded into its dot products' scale
extern "C" __global__ void __launch_bounds__(WARPS * 32) k_gate_up_ss(const __half* wgu, const __half* lnw,
    const float* res, const float* part, int P, float* act, float eps) {
  __shared__ __align__(16) float xs[H];
  __shared__ float inv_s;
  const int gw = blockIdx.x * WARPS + (threadIdx.x >> 5), GW = gridDim.x * WARPS;
  uint4 g0[HPL], u0[HPL];
  preload_gu(g0, u0, wgu, gw);
  lserve::pdl_enter();
  if (threadIdx.x < 32) {
    float t = 0.f;
    for (int i = threadIdx.x; i < P; i += 32) t += __ldcg(part + i);
    t = warp_sum(t);
    if (threadIdx.x == 0) inv_s = rsqrtf(t / H + eps);
  }
  for (int i = threadIdx.x; i < H; i += blockDim.x) xs[i] = __ldcg(res + i) * __half2float(lnw[i]);
  __syncthreads();
  gate_up(act, wgu, xs, gw, GW, g0, u0, inv_s);
}

// generation barrier: bar[0] arrivals, bar[1] generation (acquire / release at gpu scope)
__device__ __forceinline__ void grid_barrier(unsigned int* bar) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    unsigned int gen;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(gen) : "l"(bar + 1) : "memory");
    unsigned int old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(bar) : "memory");
    if (old == gridDim.x - 1) {
      asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(bar) : "memory");
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar + 1) : "memory");
    } else {
      unsigned int g;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(g) : "l"(bar + 1) : "memory");
      } while (g == gen);
    }
    __threadfence();
  }
  __syncthreads();
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) k_persist(const __half* wgu, const __half* wd,
    const __half* lnw, float* x, float* res, float* act, float eps, int layers, unsigned int* bar) {
  __shared__ __align__(16) float xs[H > I ? H : I];
  const int gw = blockIdx.x * WARPS + (threadIdx.x >> 5), GW = gridDim.x * WARPS;
  lserve::pdl_enter();
  for (int l = 0; l < layers; ++l) {
    const __half* wgl = wgu + (long long)l * 2 * I * H;
    const __half* wdl = wd + (long long)l * H * I;
    uint4 g0[HPL], u0[HPL];
    preload_gu(g0, u0, wgl, gw);
    if (l) grid_barrier(bar);  // the previous layer's down output is complete
    norm_in(xs, x + (l & 1) * H, res + (l & 1) * H, res + ((l + 1) & 1) * H, lnw + (long long)l * H, eps);
    gate_up(act, wgl, xs, gw, GW, g0, u0);
    uint4 d0[IPL];
    preload_d(d0, wdl, gw);
    grid_barrier(bar);
    for (int i = threadIdx.x; i < I; i += blockDim.x) xs[i] = __ldcg(act + i);
    __syncthreads();
    down(x + ((l + 1) & 1) * H, wdl, xs, gw, GW, d0);
  }
}
"""


def reference(wgu, wd, lnw, x0, r0, eps, layers, inter):
    import numpy as np

    x, res = x0.astype(np.float64), r0.astype(np.float64)
    for layer in range(layers):
        h = x + res
        res = h
        xn = h / np.sqrt(np.mean(h * h) + eps) * lnw[layer].astype(np.float64)
        gu = wgu[layer].astype(np.float64) @ xn
        a = gu[:inter] / (1 + np.exp(-gu[:inter])) * gu[inter:]
        x = wd[layer].astype(np.float64) @ a
    return x, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--shape", action="append", help="HxI (default 576x1536 and 2048x8192)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import cupy as cp
    import numpy as np

    from lserve_lite.backends.cuda_launch import Module

    kdir = ROOT / "kernels"
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    out_rows = []
    stream = cp.cuda.Stream(non_blocking=True)
    L, eps = args.layers, 1e-5
    NULL = np.uint64(0)  # a null pointer argument
    for shape in args.shape or ["576x1536", "2048x8192"]:
        H, inter = (int(v) for v in shape.split("x"))
        raw = cp.RawModule(code=SRC, options=("-std=c++17", f"-I{kdir}", f"-DHDIM={H}", f"-DIDIM={inter}"))
        pdl_mod, plain_mod = Module(raw, pdl=True), Module(raw, pdl=False)
        rng = np.random.default_rng(7)
        wgu_h = (rng.standard_normal((L, 2 * inter, H)) / np.sqrt(H)).astype(np.float16)
        wd_h = (rng.standard_normal((L, H, inter)) / np.sqrt(inter)).astype(np.float16)
        lnw_h = (1 + 0.1 * rng.standard_normal((L, H))).astype(np.float16)
        wgu, wd, lnw = cp.asarray(wgu_h), cp.asarray(wd_h), cp.asarray(lnw_h)
        x = cp.empty((2, H), cp.float32)
        res = cp.empty((2, H), cp.float32)
        act = cp.empty(inter, cp.float32)
        xn = cp.empty(H, cp.float32)
        bar = cp.zeros(2, cp.uint32)
        wbytes = (3 * H * inter) * 2
        for blocks in (sms, 2 * sms):
            row = {"H": H, "I": inter, "layers": L, "blocks": blocks, "weight_MB_a_layer": wbytes / 1e6}
            part = cp.zeros((2, blocks), cp.float32)
            for mode in ("chain", "chain_pdl", "chain_sep", "chain_ss", "persist"):
                mod = plain_mod if mode == "chain" else pdl_mod
                with stream:
                    stream.begin_capture()
                    if mode == "persist":
                        mod.get_function("k_persist")(
                            (blocks,), (256,), (wgu, wd, lnw, x, res, act, np.float32(eps), np.int32(L), bar)
                        )
                    elif mode == "chain_sep":
                        kn, ku, kd = (mod.get_function(k) for k in ("k_norm", "k_gate_up_xn", "k_down"))
                        for layer in range(L):
                            p, q = layer & 1, (layer + 1) & 1
                            kn((1,), (256,), (lnw[layer], x[p], res[p], res[q], xn, np.float32(eps)))
                            ku((blocks,), (256,), (wgu[layer], xn, act))
                            kd((blocks,), (256,), (wd[layer], act, NULL, x[q], NULL))
                    elif mode == "chain_ss":
                        ku, kd = mod.get_function("k_gate_up_ss"), mod.get_function("k_down")
                        for layer in range(L):
                            p, q = layer & 1, (layer + 1) & 1
                            ku((blocks,), (256,), (wgu[layer], lnw[layer], res[p], part[p], np.int32(blocks), act,
                                                   np.float32(eps)))  # fmt: skip
                            kd((blocks,), (256,), (wd[layer], act, res[p], res[q], part[q]))
                    else:
                        ku, kd = mod.get_function("k_gate_up"), mod.get_function("k_down")
                        for layer in range(L):
                            p, q = layer & 1, (layer + 1) & 1
                            ku((blocks,), (256,), (wgu[layer], lnw[layer], x[p], res[p], res[q], act,
                                                   np.float32(eps)))  # fmt: skip
                            kd((blocks,), (256,), (wd[layer], act, NULL, x[q], NULL))
                    graph = stream.end_capture()
                ok = True
                for _ in range(2):  # fresh inputs, poisoned outputs, twice (the barrier's state carries over)
                    x0 = rng.standard_normal(H).astype(np.float32)
                    r0 = rng.standard_normal(H).astype(np.float32)
                    x[...] = cp.nan
                    res[...] = cp.nan
                    act[...] = cp.nan
                    x[0] = cp.asarray(x0)
                    res[0] = cp.asarray(r0)
                    if mode == "chain_ss":  # its input: the residual stream with x added, and that row's norm
                        h0 = x0.astype(np.float64) + r0
                        res[0] = cp.asarray(h0.astype(np.float32))
                        part[...] = cp.nan
                        part[0] = 0
                        part[0, 0] = float(np.sum(h0 * h0))
                    graph.launch(stream)
                    stream.synchronize()
                    want_x, want_r = reference(wgu_h, wd_h, lnw_h, x0, r0, eps, L, inter)
                    got_x, got_r = cp.asnumpy(x[L & 1]), cp.asnumpy(res[L & 1])
                    if mode == "chain_ss":  # it leaves the last residual add done: compare that sum (twice)
                        want_x = want_r = want_x + want_r
                        got_x = got_r
                    err = max(
                        float(np.max(np.abs(got_x - want_x)) / np.max(np.abs(want_x))),
                        float(np.max(np.abs(got_r - want_r)) / np.max(np.abs(want_r))),
                    )
                    ok = ok and bool(np.isfinite(err) and err < 2e-3)
                times = []
                for _ in range(args.reps):
                    e0 = stream.record()
                    graph.launch(stream)
                    e1 = stream.record()
                    e1.synchronize()
                    times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / L)
                med = statistics.median(times)
                row[mode] = round(med, 3)
                row[mode + "_GBps"] = round(wbytes / med / 1e3, 1)
                row[mode + "_ok"] = ok
                row[mode + "_err"] = err
            out_rows.append(row)
            print(
                f"H {H} I {inter} blocks {blocks} | us a layer (MLP): chain {row['chain']:.2f}  pdl {row['chain_pdl']:.2f}"
                f"  sep {row['chain_sep']:.2f}  ss {row['chain_ss']:.2f}  persist {row['persist']:.2f} | ok "
                f"{[row[m + '_ok'] for m in ('chain', 'chain_pdl', 'chain_sep', 'chain_ss', 'persist')]}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                                         "rows": out_rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
