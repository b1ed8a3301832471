// The residual add + RMSNorm between two packed-weight decode GEMVs, spread over both instead of a kernel of its
// own (CudaOps.linear_add; docs/ARCHITECTURE.md, "The spread norm"):
//   producer (o_proj, down; SPREAD_ADD): its epilogue adds each output, rounded to fp16 as the plain GEMV stores
//     it, into the float32 residual stream in place (r = res + fp16(y), add_rmsnorm's sum bit for bit), and each
//     block leaves the sum of squares of the values it wrote in part[block * n + row] (0 where it wrote none);
//   consumer (gate_up, qkv; SPREAD_NORM): one warp sums a row's `parts` partials in a fixed order (the same in
//     every block: the result does not depend on which block runs first) into rstd = 1 / sqrt(mean(r^2) + eps),
//     while the block quantizes r * w (the norm weight) to int8; rstd multiplies the dot products' sums.
// No block then reduces a whole row before its GEMV, and no launch sits between the two.
// Reference: harness/quant.norm_linear_ref (consumer), r = res + fp16(x W^T) and sum(r^2) (producer).
#pragma once
#include <cuda_fp16.h>

namespace lserve {

enum SpreadMode { SPREAD_OFF = 0, SPREAD_ADD = 1, SPREAD_NORM = 2 };

struct Spread {
  float* res;        // [n, ld] the residual stream: updated in place (ADD), read (NORM)
  float* part;       // [parts, n] the producer's per-block sums of squares: written (ADD), read (NORM)
  const __half* w;   // NORM: the RMSNorm weight [K]
  int ld;            // res's row stride in floats
  int parts;         // NORM: blocks of the producer
  float eps;
};
static_assert(sizeof(Spread) == 40, "backends/spread.py's SPREAD dtype");

// A spread launch's dynamic shared memory holds WARPS x NMAX floats more than the GEMV's own (cuda_quant.spread_smem;
// at NMAX = 1 SPREAD_SMEM_FLOATS): NMAX rstd values (NORM), or each warp's sums of squares (ADD).

// NORM, the block's last warp (quantize_x's chunks start at thread 0: at K <= 7168 the last warp has none):
// rstd[r] for the n rows from the producer's partials, lane-strided then a butterfly (a fixed order).
template <int NMAX>
__device__ __forceinline__ void spread_rstd(const Spread& sp, int n, int K, float* rstd) {
  if (threadIdx.x < blockDim.x - 32) return;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < NMAX; ++r) {
    if (r >= n) continue;
    float t = 0.f;
    for (int i = lane; i < sp.parts; i += 32) t += sp.part[(long long)i * n + r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) rstd[r] = 1.0f / sqrtf(t / (float)K + sp.eps);
  }
}

// NORM: f = r * w for chunk c (values 32c .. 32c + 31 of the [n, K] rows, res row stride sp.ld), in float32.
__device__ __forceinline__ void spread_normed32(const Spread& sp, int K, int c, float (&f)[32]) {
  const int nc = K / 32, row = c / nc, k0 = 32 * (c % nc);
  const float4* r = reinterpret_cast<const float4*>(sp.res + (long long)row * sp.ld + k0);
  const uint4* w = reinterpret_cast<const uint4*>(sp.w + k0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 a = r[2 * i], b = r[2 * i + 1];
    const uint4 wv = w[i];
    const __half2* wh = reinterpret_cast<const __half2*>(&wv);
    const float2 w0 = __half22float2(wh[0]), w1 = __half22float2(wh[1]);
    const float2 w2 = __half22float2(wh[2]), w3 = __half22float2(wh[3]);
    f[8 * i] = a.x * w0.x, f[8 * i + 1] = a.y * w0.y, f[8 * i + 2] = a.z * w1.x, f[8 * i + 3] = a.w * w1.y;
    f[8 * i + 4] = b.x * w2.x, f[8 * i + 5] = b.y * w2.y, f[8 * i + 6] = b.z * w3.x, f[8 * i + 7] = b.w * w3.y;
  }
}

// ADD, lane 0 of a warp: the stream's values at outputs m0 .. m0 + R - 1 (those < M) of the n rows, loaded when the
// warp's last K step begins so that the epilogue does not wait on them.
template <int R, int NMAX>
__device__ __forceinline__ void spread_load(const Spread& sp, int n, int m0, int M, float (&old)[R][NMAX]) {
  if ((threadIdx.x & 31) != 0) return;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int r = 0; r < NMAX; ++r)
      if (r < n && m0 + i < M) old[i][r] = sp.res[(long long)r * sp.ld + m0 + i];
}

// ADD, one output: r = old + y rounded to fp16 (old: spread_load's), stored into the stream; returns r.
__device__ __forceinline__ float spread_add(const Spread& sp, int row, int m, float old, float y) {
  const float r = old + __half2float(__float2half(y));
  sp.res[(long long)row * sp.ld + m] = r;
  return r;
}

// ADD, after a block's last output: the block's sums of squares (ss: each warp's, held by its lane 0) into
// part[blockIdx.x * n + r], warps added in order. Every thread of the block must call it (a barrier).
template <int WARPS, int NMAX>
__device__ __forceinline__ void spread_part(const Spread& sp, int n, const float (&ss)[NMAX], float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < NMAX; ++r) scratch[warp * NMAX + r] = ss[r];
  }
  __syncthreads();
  if (threadIdx.x < n) {
    float t = 0.f;
    for (int w = 0; w < WARPS; ++w) t += scratch[w * NMAX + threadIdx.x];
    sp.part[(long long)blockIdx.x * n + threadIdx.x] = t;
  }
}

}  // namespace lserve
