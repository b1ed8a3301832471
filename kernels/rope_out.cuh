// RoPE and the K/V page write in the epilogue of the decode GEMV of the fused q/k/v projection (CudaOps.qkv_rope),
// so that no rope_write_kv launch sits between the projection and the attention (dense caches or LServe's two pools
// with the selector's page statistics; fp16 or quantized). The GEMV computes its outputs in
// "paired order": output o = h * D + 2 j + s is W's row h * D + j + s * D / 2 (rope_row), so outputs 2t and
// 2t + 1, which one warp finishes together for every row of x, are channels j and j + D / 2 of one head: a half-split
// RoPE pair. rope_store_rows then writes them as the unfused path would: each sum rounded to fp16 (the GEMV's
// output), the bias added in fp16 (`out += bias`), rotated and rounded as layers.cu's rope_pairs8 (q and k heads),
// into q_out [N, Hq, D] or the page slot of the row in its KV head's pool (slot = page * page_size + offset; a
// negative slot writes nothing), and for a dense-pool key the logical page's key max / min as
// rope_write_kv_sparse's page_stats_item leaves them (a run of consecutive slots of one logical page, merged with
// the stored statistics when it starts past the page's offset 0: the warp holds every row of its channels).
// A quantized cache needs a K / V row whole (its scale is over the head; int4's and fp8's keys and queries go into
// the Hadamard basis first), which many warps compute: each stages its pair's fp16 values (the unfused GEMV's
// output) in `stage`, fences and takes a ticket of the head; the warp with the head's last ticket writes its rows
// with rope_write_kv(_sparse)'s own row code (kv_row.cuh) from the stage, so every byte written is theirs.
// Reference: lserve_lite/backends/reference/layers.rope_write_kv_ref / rope_write_kv_sparse_ref of the product.
#pragma once
#include <cuda_fp16.h>

#include "kv_row.cuh"

namespace lserve {

// One kernel argument (backends/rope_out.py builds it as a NumPy structured scalar of the same layout);
// instantiations without the epilogue take a zeroed one. Dense caches: the ks .. kmin pointers null, nd = Hkv.
struct RopeOut {
  const long long* positions;  // [N]
  const long long* slots;      // [N] dense, [2, N] LServe (dense-pool slots, then streaming-pool slots)
  const __half* cos_t;         // [max_len, D / 2]
  const __half* sin_t;
  __half* q_out;            // [N, Hq, D]
  void* k_cache;            // [pages, nd, page_size, D] (fp16 or the format's bytes): every KV head, or LServe's dense pool
  void* v_cache;
  const __half* bias;       // [(Hq + 2 Hkv) D] in W's row order, or null
  void* ks;                 // LServe's streaming pool [pages, ns, page_size, D]
  void* vs;
  const int* head_class;    // [Hkv]: 0 dense pool, 1 streaming pool (read by the LServe instantiation only)
  const int* head_slot;     // [Hkv]: the KV head's row in its pool
  __half* kmax;             // [pages, nd, sub, D] logical-page key statistics, or null
  __half* kmin;
  __half* k_sc;             // a quantized cache's fp16 scales beside k_cache, v_cache, ks, vs (null for fp16)
  __half* v_sc;
  __half* ks_sc;
  __half* vs_sc;
  __half* stage;            // quantized: [N, Hq + 2 Hkv, D] the staged fp16 outputs of the heads written whole
  int* ticket;              // quantized: [Hq + 2 Hkv] pairs staged per head, zero between launches
  int hq, hkv, head_dim, page_size;
  int nd, ns, sub, n_rows;  // pool rows; logical pages a page; N (the streaming slots' offset in `slots`)
  int hadamard;             // quantized: q and k in the Hadamard basis (KVCache.rotates_keys)
  int rope;                 // the instantiation's ROPE (RopeKind), for the host's bookkeeping
};
static_assert(sizeof(RopeOut) == 200, "backends/rope_out.py's ROPE_OUT dtype");

// The epilogue's template argument ROPE = kind + 2 fmt: kind 1 a dense cache, 2 LServe's (two pools, statistics: a
// separate instantiation, so that a dense cache's GEMV carries none of their registers); fmt the KV format
// (0 fp16, 1 int8, 2 int4, 3 fp8: cuda_attention.py's KV_TRAITS order, which a test checks). backends/rope_out.py's
// rope_kind computes it.
template <int F> struct KvOf;
template <> struct KvOf<0> { typedef lskv::Half T; };
template <> struct KvOf<1> { typedef lskv::Int8 T; };
template <> struct KvOf<2> { typedef lskv::Int4 T; };
template <> struct KvOf<3> { typedef lskv::Fp8 T; };
template <int ROPE>
struct RopeKind {
  static_assert(ROPE >= 1 && ROPE <= 8, "ROPE = kind (1, 2) + 2 fmt (0..3)");
  static constexpr bool LSERVE = (ROPE - 1) % 2 == 1;
  typedef typename KvOf<(ROPE - 1) / 2>::T KV;
};

// The row of W that paired-order output o reads.
__device__ __forceinline__ int rope_row(int o, int head_dim) {
  const int h = o / head_dim, t = o - h * head_dim;
  return h * head_dim + (t >> 1) + (t & 1) * (head_dim >> 1);
}

// Rows r < n of the paired outputs o (even) and o + 1: a[r] and b[r], the float32 sums of channels j and j + D / 2
// of head o / D, by one lane. A quantized cache's K / V heads (and q heads when keys rotate) are staged instead;
// returns the head when this pair was its last (the warp then calls rope_finish), else -1.
template <int NMAX, int ROPE>
__device__ __forceinline__ int rope_store_rows(const RopeOut& ro, int n, int o, const float (&a)[NMAX],
                                               const float (&b)[NMAX]) {
  constexpr bool LSERVE = RopeKind<ROPE>::LSERVE, QUANT = RopeKind<ROPE>::KV::QUANT;
  const int d = ro.head_dim, half_d = d >> 1, h = o / d, j = (o - h * d) >> 1;
  const bool is_q = h < ro.hq, is_k = !is_q && h < ro.hq + ro.hkv;
  const int g = is_q ? h : is_k ? h - ro.hq : h - ro.hq - ro.hkv;
  const int cls = LSERVE && !is_q ? ro.head_class[g] : 0;
  const int hrow = LSERVE && !is_q ? ro.head_slot[g] : g;
  const bool staged = QUANT && (!is_q || ro.hadamard);  // rope_finish writes the head's rows whole
  // plain-basis keys' statistics here (the same values for every format); rotated keys' in rope_finish
  const bool stats = LSERVE && is_k && cls == 0 && ro.kmax != nullptr && !(QUANT && ro.hadamard);
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
    if (staged) {
      __half* st = ro.stage + ((long long)r * (ro.hq + 2 * ro.hkv) + h) * d;
      st[j] = ha, st[j + half_d] = hb;
      if (!stats) continue;
    }
    if (is_q || is_k) {  // rotated as rope_pairs8 rotates
      const long long p = ro.positions[r];
      const float af = __half2float(ha), bf = __half2float(hb);
      const float c = __half2float(ro.cos_t[p * half_d + j]), s = __half2float(ro.sin_t[p * half_d + j]);
      ha = __float2half(rope_lo(af, bf, c, s));
      hb = __float2half(rope_hi(af, bf, c, s));
    }
    __half* dst = nullptr;
    if (is_q) {
      dst = ro.q_out + ((long long)r * ro.hq + h) * d;
    } else {
      const long long slot = ro.slots[cls ? ro.n_rows + r : r];
      if (slot < 0) {
        prev = -1;
        continue;
      }
      const long long page = slot / ro.page_size, off = slot - page * ro.page_size;
      if (!QUANT) {
        void* pool = is_k ? (cls ? ro.ks : ro.k_cache) : (cls ? ro.vs : ro.v_cache);
        dst = static_cast<__half*>(pool) + ((page * (cls ? ro.ns : ro.nd) + hrow) * ro.page_size + off) * d;
      }
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
    if (dst != nullptr) {
      dst[j] = ha;
      dst[j + half_d] = hb;
    }
  }
  if (!staged) return -1;
  __threadfence();  // the staged halves before the ticket (release)
  return atomicAdd(ro.ticket + h, 1) == half_d - 1 ? h : -1;
}

// The whole warp, after rope_store_rows (its lane 0's result in `fin`): the warp that took a head's last ticket
// writes the head's rows r < n from the stage as rope_write_kv(_sparse) would: a q row in the Hadamard basis
// (write_q_hadamard) or a quantized K / V row (write_kv_quant), and LServe's statistics of a rotated key
// (page_stats_rotated, by the batch's last row in its logical page); then resets the ticket. Nothing for fp16.
template <int NMAX, int ROPE>
__device__ __forceinline__ void rope_finish(const RopeOut& ro, int n, int fin) {
  typedef typename RopeKind<ROPE>::KV KV;
  if constexpr (KV::QUANT) {
    const int h = __shfl_sync(0xffffffffu, fin, 0);
    if (h < 0) return;
    __threadfence();  // the other pairs' staged halves after their tickets (acquire)
    const int lane = threadIdx.x & 31, d = ro.head_dim, half_d = d >> 1, hq = ro.hq, hkv = ro.hkv;
    const int ps = ro.page_size, item = h - hq;  // item: K head item (< hkv) or V head item - hkv
    if (lane == 0) ro.ticket[h] = 0;
#pragma unroll 1
    for (int r = 0; r < n; ++r) {
      const long long pos = ro.positions[r];
      const __half* x = ro.stage + (long long)r * (hq + 2 * hkv) * d;
      const __half *cos_row = ro.cos_t + pos * half_d, *sin_row = ro.sin_t + pos * half_d;
      if (item < 0) {
        write_q_hadamard(x + h * d, d, cos_row, sin_row, ro.q_out + ((long long)r * hq + h) * d);
      } else if constexpr (RopeKind<ROPE>::LSERVE) {
        const long long dslot = ro.slots[r], sslot = ro.slots[ro.n_rows + r];
        write_kv_quant<KV>(x, item, hq, hkv, d, cos_row, sin_row, ro.hadamard,
                           [&](bool is_k, int g, unsigned char*& vals, unsigned short*& sc) {
                             const int cls = ro.head_class[g];
                             const long long slot = cls ? sslot : dslot;
                             if (slot < 0) return false;
                             const long long row = ((slot / ps) * (cls ? ro.ns : ro.nd) + ro.head_slot[g]) * ps +
                                                   slot % ps;
                             kv_row<KV>(is_k ? (cls ? ro.ks : ro.k_cache) : (cls ? ro.vs : ro.v_cache),
                                        is_k ? (cls ? ro.ks_sc : ro.k_sc) : (cls ? ro.vs_sc : ro.v_sc), row, d, vals,
                                        sc);
                             return true;
                           });
        const int lp = ps / ro.sub;
        if (item < hkv && ro.hadamard && ro.kmax != nullptr && dslot >= 0 && ro.nd > 0 &&
            !(r + 1 < n && ro.slots[r + 1] == dslot + 1 && (dslot + 1) / lp == dslot / lp))
          page_stats_rotated(ro.stage, ro.positions, ro.slots, ro.cos_t, ro.sin_t, ro.head_class, ro.head_slot,
                             ro.kmax, ro.kmin, item, r, dslot, hq, hkv, ro.nd, d, ps, ro.sub);
      } else {
        const long long slot = ro.slots[r];
        if (slot < 0) continue;
        write_kv_quant<KV>(x, item, hq, hkv, d, cos_row, sin_row, ro.hadamard,
                           [&](bool is_k, int g, unsigned char*& vals, unsigned short*& sc) {
                             kv_row<KV>(is_k ? ro.k_cache : ro.v_cache, is_k ? ro.k_sc : ro.v_sc,
                                        ((slot / ps) * hkv + g) * ps + slot % ps, d, vals, sc);
                             return true;
                           });
      }
    }
  }
}

}  // namespace lserve
