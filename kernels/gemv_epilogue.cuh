// Epilogues of the decode GEMVs (gemv_rows in layers.cu, quant_gemv_split in quant_gemv_split.cu): what a kernel
// does with its float32 dot products. Owned with those two kernels.
#pragma once
#include <cuda_fp16.h>

#include "block_reduce.cuh"

// EPI_STORE: y = the sums (in TOut). EPI_SILU: w is a row-fused [gate; up] matrix, y = silu(g) * u (fp16).
// EPI_ADD_NORM (fp16 y): residual add + RMSNorm of the rows (add_rmsnorm in layers.cu, fused): every block
// adds its outputs, rounded to fp16 as the unfused path stores them, into the float32 residual rows, and the
// block that finishes last normalizes the whole rows into y (lserve::add_rmsnorm_last_block).
enum Epi { EPI_STORE = 0, EPI_SILU = 1, EPI_ADD_NORM = 2 };

namespace lserve {

// The arguments of EPI_ADD_NORM (null / unused by the other epilogues): the float32 residual rows (same row
// stride as y), the norm's weight [M], its epsilon, and a device counter that is 0 at launch.
struct AddNormArgs {
  float* res;
  const __half* w;
  int* counter;
  float eps;
};

// Called by every thread of every block after the block's residual writes (res[r, m] += fp16(y)). The
// "last block finishes" pattern (CUDA's threadFenceReduction sample): each block makes its writes visible
// device-wide (__threadfence), then draws a ticket; the block with ticket gridDim.x - 1 knows every other
// block's writes are visible, and computes, for each row r < n, h[r, :] = fp16(res * inv * w) with
// inv = 1 / sqrt(mean(res^2) + eps), the formula and order of add_rmsnorm (the sum of squares reduced over
// this block's threads instead of add_rmsnorm's), reading res through L2 (__ldcg: never a stale L1 line or the
// read-only path). It then resets the counter to 0 for the next launch: launches on one stream never overlap
// (with programmatic dependent launch the next kernel's pdl_enter() waits for this grid to complete before it
// touches memory), so one counter serves every launch, CUDA Graph replays included.
__device__ __forceinline__ void add_rmsnorm_last_block(const AddNormArgs& a, __half* h, int ld, int n, int M) {
  __shared__ float scratch[32];
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counter, 1) == (int)gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int r = 0; r < n; ++r) {
    const float* row = a.res + (long long)r * ld;
    float ss = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < M; i += blockDim.x) {
      const float v = __ldcg(row + i);
      ss += v * v;
    }
    ss = block_reduce(ss, scratch, SumOp(), 0.f);
    const float inv = 1.0f / sqrtf(ss / (float)M + a.eps);
#pragma unroll 4
    for (int i = threadIdx.x; i < M; i += blockDim.x)
      h[(long long)r * ld + i] = __float2half(__ldcg(row + i) * inv * __half2float(a.w[i]));
  }
  if (threadIdx.x == 0) *a.counter = 0;
}

}  // namespace lserve
