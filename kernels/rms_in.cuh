// The residual add and RMSNorm a decode GEMV applies to its input rows in its prologue (CudaOps.rmsnorm_linear),
// so that no kernel of its own runs between a layer's output projection and the next projection:
//   r = x + res_in (the float32 residual stream; res_in null on the first layer),
//   h = r * (1 / sqrt(mean(r^2) + eps)) * w, rounded to fp16,
// the values layers.cu's add_rmsnorm writes. Every block computes the norm of the whole rows it needs (a few KB
// from L1 / L2); block 0 also writes r to res_out, which must not be res_in (the other blocks still read it).
// Reference: lserve_lite/backends/reference/layers.rmsnorm_ref after the residual add.
#pragma once
#include <cuda_fp16.h>

namespace lserve {

struct RmsIn {
  const float* res_in;  // [n, K] or null
  float* res_out;       // [n, K]
  const __half* w;      // [K]
  float eps;
};

// r[0..8) = x + res_in at row `row`, values 8c .. 8c + 7 (K % 8 == 0, rows 16-byte aligned).
__device__ __forceinline__ void rms_residual8(const __half* x, const RmsIn& in, int row, int K, int c, float (&r)[8]) {
  const long long off = (long long)row * K + 8 * c;
  const uint4 xv = *reinterpret_cast<const uint4*>(x + off);
  const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(xh[j]);
    r[2 * j] = f.x, r[2 * j + 1] = f.y;
  }
  if (in.res_in) {
    const float4* s = reinterpret_cast<const float4*>(in.res_in + off);
    const float4 a = s[0], b = s[1];
    r[0] += a.x, r[1] += a.y, r[2] += a.z, r[3] += a.w, r[4] += b.x, r[5] += b.y, r[6] += b.z, r[7] += b.w;
  }
}

// Floats of scratch rms_rows<NMAX> takes: rstd, then one partial sum per (warp, row) of up to 32 warps
// (backends/rms_in.py's scratch_bytes is 4 times this).
template <int NMAX>
constexpr int rms_scratch_floats = 33 * NMAX;

// rstd[r] = 1 / sqrt(mean((x + res_in)^2) + eps) for rows r < n <= NMAX, by the whole block, into scratch[0..n):
// rms_scratch_floats<NMAX> floats of the caller's shared memory; block 0 writes res_out.
// Ends with a barrier: rstd is then readable.
template <int NMAX>
__device__ __forceinline__ void rms_rows(const __half* x, const RmsIn& in, int n, int K, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float *rstd = scratch, *part = scratch + NMAX;
  float ss[NMAX];
#pragma unroll
  for (int r = 0; r < NMAX; ++r) {
    ss[r] = 0.f;
    if (r >= n) continue;
    for (int c = threadIdx.x; c < K / 8; c += blockDim.x) {
      float v[8];
      rms_residual8(x, in, r, K, c, v);
      if (blockIdx.x == 0) {
        float4* o = reinterpret_cast<float4*>(in.res_out + (long long)r * K + 8 * c);
        o[0] = make_float4(v[0], v[1], v[2], v[3]), o[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) ss[r] = fmaf(v[j], v[j], ss[r]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], o);
    if (lane == 0) part[warp * NMAX + r] = ss[r];
  }
  __syncthreads();
  if (threadIdx.x < n) {
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += part[w * NMAX + threadIdx.x];
    rstd[threadIdx.x] = 1.0f / sqrtf(s / (float)K + in.eps);
  }
  __syncthreads();
}

// h[0..8) of row `row`, values 8c .. 8c + 7, each rounded to fp16 as add_rmsnorm's output is.
__device__ __forceinline__ void rms_normed8(const __half* x, const RmsIn& in, const float* rstd, int row, int K, int c,
                                           float (&h)[8]) {
  rms_residual8(x, in, row, K, c, h);
  const uint4 wv = *reinterpret_cast<const uint4*>(in.w + 8 * c);
  const __half2* wh = reinterpret_cast<const __half2*>(&wv);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(wh[j]);
    h[2 * j] = __half2float(__float2half(h[2 * j] * rstd[row] * f.x));
    h[2 * j + 1] = __half2float(__float2half(h[2 * j + 1] * rstd[row] * f.y));
  }
}

}  // namespace lserve
