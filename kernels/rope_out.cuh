// RoPE and the K/V page write in the epilogue of the decode GEMV of the fused q/k/v projection (CudaOps.qkv_rope),
// so that no rope_write_kv launch sits between the projection and the attention (fp16 caches, dense or LServe's two
// pools with the selector's page statistics; quantized caches keep that kernel). The GEMV computes its outputs in
// "paired order": output o = h * D + 2 j + s is W's row h * D + j + s * D / 2 (rope_row), so outputs 2t and
// 2t + 1, which one warp finishes together for every row of x, are channels j and j + D / 2 of one head: a half-split
// RoPE pair. rope_store_rows then writes them as the unfused path would: each sum rounded to fp16 (the GEMV's
// output), the bias added in fp16 (`out += bias`), rotated and rounded as layers.cu's rope_pairs8 (q and k heads),
// into q_out [N, Hq, D] or the page slot of the row in its KV head's pool (slot = page * page_size + offset; a
// negative slot writes nothing), and for a dense-pool key the logical page's key max / min as
// rope_write_kv_sparse's page_stats_item leaves them (a run of consecutive slots of one logical page, merged with
// the stored statistics when it starts past the page's offset 0: the warp holds every row of its channels).
// Reference: lserve_lite/backends/reference/layers.rope_write_kv_ref / rope_write_kv_sparse_ref of the product.
#pragma once
#include <cuda_fp16.h>

namespace lserve {

// One kernel argument (backends/rope_out.py builds it as a NumPy structured scalar of the same layout);
// instantiations without the epilogue take a zeroed one. Dense caches: the ks .. kmin pointers null, nd = Hkv.
struct RopeOut {
  const long long* positions;  // [N]
  const long long* slots;      // [N] dense, [2, N] LServe (dense-pool slots, then streaming-pool slots)
  const __half* cos_t;         // [max_len, D / 2]
  const __half* sin_t;
  __half* q_out;            // [N, Hq, D]
  __half* k_cache;          // [pages, nd, page_size, D]: every KV head, or LServe's dense pool
  __half* v_cache;
  const __half* bias;       // [(Hq + 2 Hkv) D] in W's row order, or null
  __half* ks;               // LServe's streaming pool [pages, ns, page_size, D]
  __half* vs;
  const int* head_class;    // [Hkv]: 0 dense pool, 1 streaming pool (read by the LServe instantiation only)
  const int* head_slot;     // [Hkv]: the KV head's row in its pool
  __half* kmax;             // [pages, nd, sub, D] logical-page key statistics, or null
  __half* kmin;
  int hq, hkv, head_dim, page_size;
  int nd, ns, sub, n_rows;  // pool rows; logical pages a page; N (the streaming slots' offset in `slots`)
};
static_assert(sizeof(RopeOut) == 144, "backends/rope_out.py's ROPE_OUT dtype");

// The half-split RoPE rotation of a channel pair (a: channel j, b: channel j + D / 2) by (c, s) = (cos, sin) of the
// position: each product and the difference / sum rounded on its own (no FMA contraction), the one rule every
// writer of rotated keys follows, so that a key recomputed later (the page statistics) has the cache's bits.
__device__ __forceinline__ float rope_lo(float a, float b, float c, float s) {
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}
__device__ __forceinline__ float rope_hi(float a, float b, float c, float s) {
  return __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// The row of W that paired-order output o reads.
__device__ __forceinline__ int rope_row(int o, int head_dim) {
  const int h = o / head_dim, t = o - h * head_dim;
  return h * head_dim + (t >> 1) + (t & 1) * (head_dim >> 1);
}

// Rows r < n of the paired outputs o (even) and o + 1: a[r] and b[r], the float32 sums of channels j and j + D / 2
// of head o / D. LSERVE: the two pools and the statistics (a separate instantiation, so that a dense cache's
// GEMV carries none of their registers).
template <int NMAX, bool LSERVE>
__device__ __forceinline__ void rope_store_rows(const RopeOut& ro, int n, int o, const float (&a)[NMAX],
                                                const float (&b)[NMAX]) {
  const int d = ro.head_dim, half_d = d >> 1, h = o / d, j = (o - h * d) >> 1;
  const bool is_q = h < ro.hq, is_k = !is_q && h < ro.hq + ro.hkv;
  const int g = is_q ? h : is_k ? h - ro.hq : h - ro.hq - ro.hkv;
  const int cls = LSERVE && !is_q ? ro.head_class[g] : 0;
  const int hrow = LSERVE && !is_q ? ro.head_slot[g] : g;
  const bool stats = LSERVE && is_k && cls == 0 && ro.kmax != nullptr;
  const int lp = ro.page_size / ro.sub;  // sub >= 1
  const __half ba = ro.bias ? ro.bias[h * d + j] : __float2half(0.f);
  const __half bb = ro.bias ? ro.bias[h * d + j + half_d] : __float2half(0.f);
  float mx0 = 0.f, mn0 = 0.f, mx1 = 0.f, mn1 = 0.f;  // the current run's statistics of channels j, j + D / 2
  long long prev = -1;                               // the previous row's dense slot (-1: none)
#pragma unroll
  for (int r = 0; r < NMAX; ++r) {
    if (r >= n) break;
    __half ha = __float2half(a[r]), hb = __float2half(b[r]);
    if (ro.bias) {
      ha = __float2half(__half2float(ha) + __half2float(ba));
      hb = __float2half(__half2float(hb) + __half2float(bb));
    }
    if (is_q || is_k) {  // rotated as rope_pairs8 rotates
      const long long p = ro.positions[r];
      const float af = __half2float(ha), bf = __half2float(hb);
      const float c = __half2float(ro.cos_t[p * half_d + j]), s = __half2float(ro.sin_t[p * half_d + j]);
      ha = __float2half(rope_lo(af, bf, c, s));
      hb = __float2half(rope_hi(af, bf, c, s));
    }
    __half* dst;
    if (is_q) {
      dst = ro.q_out + ((long long)r * ro.hq + h) * d;
    } else {
      const long long slot = ro.slots[cls ? ro.n_rows + r : r];
      if (slot < 0) {
        prev = -1;
        continue;
      }
      const long long page = slot / ro.page_size, off = slot - page * ro.page_size;
      __half* pool = is_k ? (cls ? ro.ks : ro.k_cache) : (cls ? ro.vs : ro.v_cache);
      dst = pool + ((page * (cls ? ro.ns : ro.nd) + hrow) * ro.page_size + off) * d;
      if (stats) {
        const long long lid = slot / lp;
        const long long st = ((page * ro.nd + hrow) * ro.sub + off / lp) * d + j;
        if (!(prev >= 0 && prev == slot - 1 && prev / lp == lid)) {  // a run starts: merged past offset 0
          const bool merge = slot % lp != 0;
          mx0 = merge ? __half2float(ro.kmax[st]) : -__int_as_float(0x7f800000);
          mn0 = merge ? __half2float(ro.kmin[st]) : __int_as_float(0x7f800000);
          mx1 = merge ? __half2float(ro.kmax[st + half_d]) : -__int_as_float(0x7f800000);
          mn1 = merge ? __half2float(ro.kmin[st + half_d]) : __int_as_float(0x7f800000);
        }
        mx0 = fmaxf(mx0, __half2float(ha)), mn0 = fminf(mn0, __half2float(ha));
        mx1 = fmaxf(mx1, __half2float(hb)), mn1 = fminf(mn1, __half2float(hb));
        if (!(r + 1 < n && ro.slots[r + 1] == slot + 1 && (slot + 1) / lp == lid)) {  // the run ends here
          ro.kmax[st] = __float2half(mx0), ro.kmin[st] = __float2half(mn0);
          ro.kmax[st + half_d] = __float2half(mx1), ro.kmin[st + half_d] = __float2half(mn1);
        }
        prev = slot;
      }
    }
    dst[j] = ha;
    dst[j + half_d] = hb;
  }
}

}  // namespace lserve
