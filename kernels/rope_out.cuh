// RoPE and the K/V page write in the epilogue of the decode GEMV of the fused q/k/v projection (CudaOps.qkv_rope),
// so that no rope_write_kv launch sits between the projection and the attention (a dense fp16 cache; quantized or
// LServe caches keep that kernel). The GEMV computes its outputs in "paired order": output o = h * D + 2 j + s
// is W's row h * D + j + s * D / 2 (rope_row), so outputs 2t and 2t + 1, which one warp finishes together, are
// channels j and j + D / 2 of one head: a half-split RoPE pair. rope_store_pair then writes them as the unfused
// path would: each sum rounded to fp16 (the GEMV's output), the bias added in fp16 (`out += bias`), rotated and
// rounded as layers.cu's rope_pairs8 (q and k heads), into q_out [N, Hq, D] or the page slot of the row
// (slot = page * page_size + offset; k / v caches [pages, Hkv, page_size, D]; a negative slot writes nothing).
// Reference: lserve_lite/backends/reference/layers.rope_write_kv_ref of the product.
#pragma once
#include <cuda_fp16.h>

namespace lserve {

// One kernel argument (backends/rope_out.py builds it as a NumPy structured scalar of the same layout);
// instantiations without the epilogue take a zeroed one.
struct RopeOut {
  const long long* positions;  // [N]
  const long long* slots;      // [N]
  const __half* cos_t;         // [max_len, D / 2]
  const __half* sin_t;
  __half* q_out;  // [N, Hq, D]
  __half* k_cache;
  __half* v_cache;
  const __half* bias;  // [(Hq + 2 Hkv) D] in W's row order, or null
  int hq, hkv, head_dim, page_size;
};
static_assert(sizeof(RopeOut) == 80, "backends/rope_out.py's ROPE_OUT dtype");

// The row of W that paired-order output o reads.
__device__ __forceinline__ int rope_row(int o, int head_dim) {
  const int h = o / head_dim, t = o - h * head_dim;
  return h * head_dim + (t >> 1) + (t & 1) * (head_dim >> 1);
}

// Token row r's outputs o (even) and o + 1: a and b, the float32 sums of channels j and j + D / 2 of head o / D.
__device__ __forceinline__ void rope_store_pair(const RopeOut& ro, int r, int o, float a, float b) {
  const int d = ro.head_dim, half_d = d >> 1, h = o / d, j = (o - h * d) >> 1;
  __half ha = __float2half(a), hb = __float2half(b);
  if (ro.bias) {
    ha = __float2half(__half2float(ha) + __half2float(ro.bias[h * d + j]));
    hb = __float2half(__half2float(hb) + __half2float(ro.bias[h * d + j + half_d]));
  }
  __half* dst;
  if (h < ro.hq) {
    dst = ro.q_out + ((long long)r * ro.hq + h) * d;
  } else {
    const long long slot = ro.slots[r];
    if (slot < 0) return;
    const long long page = slot / ro.page_size, off = slot - page * ro.page_size;
    const bool is_k = h < ro.hq + ro.hkv;
    const int g = is_k ? h - ro.hq : h - ro.hq - ro.hkv;
    dst = (is_k ? ro.k_cache : ro.v_cache) + ((page * ro.hkv + g) * ro.page_size + off) * d;
  }
  if (h < ro.hq + ro.hkv) {  // rope_pairs8's rotation and rounding
    const long long p = ro.positions[r];
    const float af = __half2float(ha), bf = __half2float(hb);
    const float c = __half2float(ro.cos_t[p * half_d + j]), s = __half2float(ro.sin_t[p * half_d + j]);
    ha = __float2half(__fsub_rn(__fmul_rn(af, c), __fmul_rn(bf, s)));
    hb = __float2half(__fadd_rn(__fmul_rn(bf, c), __fmul_rn(af, s)));
  }
  dst[j] = ha;
  dst[j + half_d] = hb;
}

}  // namespace lserve
