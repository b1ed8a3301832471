// The row-level K/V write helpers shared by layers.cu's rope_write_kv(_sparse) and the q/k/v GEMVs' epilogue
// (rope_out.cuh): the half-split RoPE rotation every writer of rotated keys rounds the same way, a quantized
// (token, head) row written by one warp, and LServe's page statistics of keys in the Hadamard basis.
// References: lserve_lite/backends/reference/layers.py (rope_write_kv_ref, rope_write_kv_sparse_ref).
#pragma once
#include <cuda_fp16.h>

#include "kv_quant.cuh"

namespace lserve {

// The half-split RoPE rotation of a channel pair (a: channel j, b: channel j + D / 2) by (c, s) = (cos, sin) of the
// position: each product and the difference / sum rounded on its own (no FMA contraction), the one rule every
// writer of rotated keys follows, so that a key recomputed later (the page statistics) has the cache's bits.
__device__ __forceinline__ float rope_lo(float a, float b, float c, float s) {
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}
__device__ __forceinline__ float rope_hi(float a, float b, float c, float s) {
  return __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

}  // namespace lserve

// Rotated channel c of a head vector x[D] (half-split RoPE), rounded without FMA contraction so a value
// recomputed later (page stats below) has exactly the bits that were written into the cache.
__device__ __forceinline__ __half rope_channel(const __half* x, int c, int half_d, const __half* cos_row,
                                               const __half* sin_row) {
  const int j = c < half_d ? c : c - half_d;
  const float a = __half2float(x[j]), b = __half2float(x[j + half_d]);
  const float cs = __half2float(cos_row[j]), sn = __half2float(sin_row[j]);
  return c < half_d ? __float2half(lserve::rope_lo(a, b, cs, sn)) : __float2half(lserve::rope_hi(a, b, cs, sn));
}

// Head vector src after RoPE (each channel rounded to fp16 as rope_pairs8 rounds it) in the Hadamard basis
// (lskv::hadamard_row), by the calling warp: lane l holds channel i * 32 + l in v[i], i < D / 32. The one rotation of
// the q rows, the quantized keys' rows (write_kv_quant) and the keys their page statistics recompute.
__device__ __forceinline__ void rope_rotated(const __half* src, int head_dim, const __half* cos_row,
                                             const __half* sin_row, float (&v)[8]) {
  const int lane = threadIdx.x & 31, ni = head_dim / 32, half_d = head_dim / 2;
  for (int i = 0; i < ni; ++i) v[i] = __half2float(rope_channel(src, i * 32 + lane, half_d, cos_row, sin_row));
  lskv::hadamard_row(v, ni, lane);
}

// Query head h of row x in the Hadamard basis (int4's and fp8's), by the calling warp, rounded to fp16 into dst.
__device__ __forceinline__ void write_q_hadamard(const __half* src, int head_dim, const __half* cos_row,
                                                 const __half* sin_row, __half* dst) {
  const int lane = threadIdx.x & 31;
  float v[8];
  rope_rotated(src, head_dim, cos_row, sin_row, v);
  for (int i = 0; i < head_dim / 32; ++i) dst[i * 32 + lane] = __float2half(v[i]);
}

// A quantized cache (KV = lskv::Int8 / Int4 / Fp8, kernels/kv_quant.cuh): the calling warp quantizes K (after RoPE,
// rounded to fp16 as a float cache would hold it; then in the Hadamard basis if `hadamard`) or V of KV head g for
// item = g (K) or hkv + g (V);
// `where(is_k, g, vals, scales)` points at the row's values and scales, or returns false (nothing to write).
template <class KV, class Where>
__device__ __forceinline__ void write_kv_quant(const __half* x, int item, int hq, int hkv, int head_dim,
                                               const __half* cos_row, const __half* sin_row, bool hadamard,
                                               Where where) {
  const int lane = threadIdx.x & 31, ni = head_dim / 32, half_d = head_dim / 2;
  const bool is_k = item < hkv;
  unsigned char* vals;
  unsigned short* scales;
  if (!where(is_k, is_k ? item : item - hkv, vals, scales)) return;
  const __half* src = x + (hq + item) * head_dim;
  float v[8];
  if (is_k && hadamard) {
    rope_rotated(src, head_dim, cos_row, sin_row, v);
  } else {
    for (int i = 0; i < ni; ++i) {
      const int c = i * 32 + lane;
      v[i] = __half2float(is_k ? rope_channel(src, c, half_d, cos_row, sin_row) : src[c]);
    }
  }
  lskv::quantize_row<KV>(v, ni, vals, scales, lane);
}

// Byte offset of a (token, head) row's values, and its first scale, in a K or V pool of format KV.
template <class KV>
__device__ __forceinline__ void kv_row(void* pool, __half* scales, long long r, int head_dim, unsigned char*& vals,
                                       unsigned short*& sc) {
  vals = static_cast<unsigned char*>(pool) + r * (head_dim * KV::BITS / 8);
  sc = reinterpret_cast<unsigned short*>(scales) + r * lskv::scale_cols<KV>(head_dim);
}

// Where rope_write_kv_sparse's row `row` (the batch's last row in the logical page of dense slot dslot) finds the
// page statistics of KV head g: the first row r0 of the run of consecutive slots that ends at this row, the run's
// first and last offsets in the logical page, and the stats' index of channel 0.
struct StatsRun {
  int r0, first_off, last_off;
  long long st;
  __device__ __forceinline__ StatsRun(const long long* __restrict__ slots, const int* __restrict__ head_slot, int g,
                                      int row, long long dslot, int nd, int head_dim, int page_size, int sub) {
    const int lp = page_size / sub;
    const long long lid = dslot / lp;
    r0 = row;
    while (r0 > 0 && slots[r0 - 1] == slots[r0] - 1 && slots[r0 - 1] / lp == lid) --r0;
    last_off = (int)(dslot % lp);
    first_off = last_off - (row - r0);
    const long long page = dslot / page_size;
    const int lsub = (int)((dslot % page_size) / lp);
    st = ((page * nd + head_slot[g]) * sub + lsub) * head_dim;
  }
};

// The same statistics of KV head g in the Hadamard basis (int4 / fp8 keys), by the calling warp: each key of the run
// rotated once by rope_rotated, as its quantized row was (lane l: channels i * 32 + l), its channels' max / min in
// registers.
__device__ __forceinline__ void page_stats_rotated(const __half* __restrict__ qkv,
                                                   const long long* __restrict__ positions,
                                                   const long long* __restrict__ slots, const __half* __restrict__ cos_t,
                                                   const __half* __restrict__ sin_t,
                                                   const int* __restrict__ head_class, const int* __restrict__ head_slot,
                                                   __half* __restrict__ kmax, __half* __restrict__ kmin, int g, int row,
                                                   long long dslot, int hq, int hkv, int nd, int head_dim,
                                                   int page_size, int sub) {
  if (head_class[g] != 0) return;  // warp-uniform
  const int lane = threadIdx.x & 31, ni = head_dim / 32, half_d = head_dim / 2, nheads = hq + 2 * hkv;
  const StatsRun run(slots, head_slot, g, row, dslot, nd, head_dim, page_size, sub);
  float mx[8], mn[8];
  for (int i = 0; i < ni; ++i) {
    mx[i] = run.first_off > 0 ? __half2float(kmax[run.st + i * 32 + lane]) : -__int_as_float(0x7f800000);
    mn[i] = run.first_off > 0 ? __half2float(kmin[run.st + i * 32 + lane]) : __int_as_float(0x7f800000);
  }
  for (int r = run.r0; r <= row; ++r) {
    const long long p = positions[r];
    const __half* xr = qkv + (long long)r * nheads * head_dim + (hq + g) * head_dim;
    float k[8];
    rope_rotated(xr, head_dim, cos_t + p * half_d, sin_t + p * half_d, k);
    for (int i = 0; i < ni; ++i) {
      mx[i] = fmaxf(mx[i], k[i]);
      mn[i] = fminf(mn[i], k[i]);
    }
  }
  for (int i = 0; i < ni; ++i) {
    kmax[run.st + i * 32 + lane] = __float2half(mx[i]);
    kmin[run.st + i * 32 + lane] = __float2half(mn[i]);
  }
}
