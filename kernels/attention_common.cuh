// Shared device helpers for the paged attention kernels (attention_prefill.cu, attention_decode.cu).
//
// Everything is inline PTX on raw 16-bit words, so the kernels need no CUDA header (cuda_fp16.h) and
// compile the same under any NVRTC: fp16 values travel as `unsigned short` / packed `unsigned int` pairs.
// Tensor-core instructions: mma.sync m16n8k16 (fp16 x fp16 -> fp32), ldmatrix, cp.async (sm_80+).
//
// Shared-memory tiles of K, V and Q are stored row-major with rows of D halves (D/8 chunks of 16 bytes)
// and the chunk index XOR-swizzled by (row % 8), so the 8 row addresses of one ldmatrix 8x8 matrix fall
// in 8 different bank groups (no conflicts) and cp.async writes stay 16-byte aligned.
#pragma once
#include "kv_quant.cuh"
#include "pdl.cuh"

typedef unsigned short f16_t;  // raw IEEE half
typedef unsigned int u32;
typedef unsigned long long u64;

#define LSERVE_NEG_INF (-__int_as_float(0x7f800000))
#define LSERVE_KPOS_NONE 0x7fffffff  // key position of a padding row: masked by any causal test

namespace lsattn {

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination (padding rows).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D[16x8] += A[16x16] * B[16x8], fp16 inputs, fp32 accumulators (PTX fragment layouts).
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> packed half2 (lo in the low 16 bits), round to nearest.
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ f16_t float_to_half(float x) {
  f16_t r;
  asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx(-inf) = 0
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float fast_log2(float x) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// Hides a value from loop-invariant code motion: addresses recomputed in a loop (one XOR each) instead of
// being hoisted into dozens of live registers.
__device__ __forceinline__ u32 opaque(u32 x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Dynamic shared memory rounded up to a 256-byte boundary (launchers allocate 256 bytes extra), so that
// swizzled addresses can be formed by XOR on the full shared-window address.
__device__ __forceinline__ unsigned char* align_smem256(unsigned char* raw, u32& addr) {
  const u32 a = smem_addr(raw), pad = (256u - (a & 255u)) & 255u;
  addr = a + pad;
  return raw + pad;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile with CHUNKS chunks per row.
template <int CHUNKS>
__device__ __forceinline__ u32 swz(int row, int chunk) {
  return (u32)((row * CHUNKS + (chunk ^ (row & 7))) * 16);
}

// Visibility of key position kp for query position qp (the reference's mask, one element).
// Class 0 (dense): causal and inside the context; class 1 (streaming): also in the sink or the local window.
__device__ __forceinline__ bool key_visible(int kp, int qp, int ctx, int cls, int sink, int local) {
  bool ok = kp <= qp && kp < ctx;
  if (cls) ok = ok && (kp < sink || qp - kp < local);
  return ok;
}

// A plan in device memory (cuda_attention.CudaPlan): one int32 buffer whose layout follows from the capacity
// (cap_qb query blocks, cap_seq sequences):
//   meta[8] | qb_seq | qb_start | qb_len | qb_pos | qb_sink | qb_local | qb_slot | qb_keep | qb_refresh
//   (cap_qb each) | seq_ctx (cap_seq) | kv_indptr (2 cap_qb + 1) | pad to 8 bytes | kv_pl (int2 pairs).
constexpr int PLAN_META = 8;
struct PlanView {
  const int* meta;        // [8]: nqb, num_tokens, sink, local (kernels use qb_*), group_reduce (1: mass)
  const int* qb_seq;      // [cap_qb]
  const int* qb_start;    // [cap_qb]
  const int* qb_len;      // [cap_qb]
  const int* qb_pos;      // [cap_qb]
  const int* qb_sink;     // [cap_qb] streaming window of the block (class 1)
  const int* qb_local;    // [cap_qb]
  const int* qb_slot;     // [cap_qb] selection slot of the block's sequence
  const int* qb_keep;     // [cap_qb] decode page budget (0: dense heads visit their whole list)
  const int* qb_refresh;  // [cap_qb] 1: the selector recomputes this block's selection now
  const int* seq_ctx;     // [cap_seq]
  const int* kv_indptr;   // [2 * cap_qb + 1], CSR over qb * 2 + class
  const int2* kv_pl;      // [cap_nnz] (physical page, logical page)
};

__device__ __forceinline__ PlanView plan_view(const int* buf, int cap_qb, int cap_seq) {
  PlanView p;
  p.meta = buf;
  const int* a = buf + PLAN_META;
  p.qb_seq = a;
  p.qb_start = a + cap_qb;
  p.qb_len = a + 2 * cap_qb;
  p.qb_pos = a + 3 * cap_qb;
  p.qb_sink = a + 4 * cap_qb;
  p.qb_local = a + 5 * cap_qb;
  p.qb_slot = a + 6 * cap_qb;
  p.qb_keep = a + 7 * cap_qb;
  p.qb_refresh = a + 8 * cap_qb;
  p.seq_ctx = a + 9 * cap_qb;
  p.kv_indptr = p.seq_ctx + cap_seq;
  int o = PLAN_META + 9 * cap_qb + cap_seq + 2 * cap_qb + 1;
  o += o & 1;
  p.kv_pl = reinterpret_cast<const int2*>(buf + o);
  return p;
}

// The two KV pools of a layer (LServe): class-0 (dense) KV heads live in pool 0 [pages, n0, page, D],
// class-1 (streaming) heads in pool 1 [pages, n1, page, D]; head_slot[g] is KV head g's row in its pool.
// Dense mode: pool 0 holds every head (head_slot = arange) and pool 1 is unused. Values are fp16, or a
// quantized format (kv_quant.cuh) with fp16 scales s* [pages, n, page, SCALES] beside them (null for fp16).
struct KVPools {
  const unsigned char* k0;
  const unsigned char* v0;
  const unsigned char* k1;
  const unsigned char* v1;
  const f16_t* sk0;
  const f16_t* sv0;
  const f16_t* sk1;
  const f16_t* sv1;
  const int* head_class;
  const int* head_slot;
  int n0, n1;
};

// Decode page selection of one (query block, KV head): the dense head visits sel[0..cnt) (indices into the
// block's class-0 list) plus the newest list entry when the selection lacks it (the context grew since).
struct Visit {
  const int* sel;  // nullptr: the whole list
  int cnt;         // entries of sel
  int npages;      // entries visited
  int last;        // index of the newest entry of the full list
  __device__ __forceinline__ int entry(int e) const { return sel == nullptr ? e : (e < cnt ? sel[e] : last); }
};

// Warp-uniform: the visit of (qb, KV head kvh of class cls) whose full list has `npages` entries.
__device__ __forceinline__ Visit make_visit(const PlanView& pv, int qb, int kvh, int cls, int Hkv, int npages,
                                            const int* sel_idx, const int* sel_cnt, int sel_cap) {
  Visit v{nullptr, npages, npages, npages - 1};
  if (cls != 0 || sel_idx == nullptr || pv.qb_keep[qb] <= 0 || npages == 0) return v;
  const int row = pv.qb_slot[qb] * Hkv + kvh;
  const int* sel = sel_idx + (size_t)row * sel_cap;
  const int cnt = min(sel_cnt[row], sel_cap);
  bool has_last = false;
  for (int i = (threadIdx.x & 31); i < cnt; i += 32) has_last |= sel[i] == npages - 1;
  has_last = __any_sync(0xffffffffu, has_last);
  v.sel = sel;
  v.cnt = cnt;
  v.npages = cnt + (has_last ? 0 : 1);
  return v;
}

// Quantized K/V travel to shared memory as stored, in units of 16 cache rows (16 consecutive tokens of one
// page): the unit's values [16][Row::BYTES], then its fp16 scales [16][Row::SCALES] (UNIT bytes in all; K and V
// share the format).
template <class KV, int D>
struct Staged {
  using R = lskv::Row<KV, D>;
  static constexpr int UNIT = 16 * (R::BYTES + R::SCALE_BYTES);
};

// cp.async of the unit starting at cache row `row` (of its pool) into `dst`; ok = false zero-fills it.
// Threads t = 0 .. nt-1 share the 16-byte copies.
template <class KV, int D>
__device__ __forceinline__ void stage_unit(u32 dst, const unsigned char* vals, const f16_t* scales, size_t row, bool ok,
                                           int t, int nt) {
  using R = lskv::Row<KV, D>;
  constexpr int VCH = 16 * R::BYTES / 16, SCH = 16 * R::SCALE_BYTES / 16;
  const unsigned char* v = vals + (ok ? row * R::BYTES : 0);
  const unsigned char* sc = reinterpret_cast<const unsigned char*>(scales) + (ok ? row * R::SCALE_BYTES : 0);
  for (int i = t; i < VCH + SCH; i += nt) cp_async16(dst + i * 16, i < VCH ? v + i * 16 : sc + (i - VCH) * 16, ok ? 16 : 0);
}

// Byte offset of 16-byte chunk c (of D / 8) of row r in a 128B-swizzled tile of R rows: the wgmma operand layout
// of attention_prefill_sm90.cu (see its header): 64-half column blocks of R rows x 128 bytes, the chunk index
// XORed with r % 8 inside each 1024-byte atom.
template <int R>
__device__ __forceinline__ u32 sw128(int r, int c) {
  return (u32)((c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// ROWS staged rows (ROWS / 16 units) -> the fp16 tile [ROWS][D] in the swizzled rows (swz) the mma.sync kernels'
// ldmatrix loads expect, values converted in fp32. Threads t = 0 .. nt-1 share the work; the caller synchronizes
// before the tile is read.
template <class KV, int D, int ROWS>
__device__ __forceinline__ void dequant_tile(const unsigned char* raw, unsigned char* tile, int t, int nt) {
  using R = lskv::Row<KV, D>;
  for (int i = t; i < ROWS * R::CHUNKS; i += nt) {
    const int c = i % R::CHUNKS, r = i / R::CHUNKS;
    const unsigned char* unit = raw + (r >> 4) * Staged<KV, D>::UNIT;
    const uint4 w = *reinterpret_cast<const uint4*>(unit + (r & 15) * R::BYTES + c * 16);
    const f16_t* scales = reinterpret_cast<const f16_t*>(unit + 16 * R::BYTES);
    const int group0 = R::GROUPS == 1 ? 0 : c * (R::CHUNK_CH / KV::GROUP);  // the chunk's first group
    uint4 out[R::OUT_CHUNKS];
    lskv::dequant16<KV>(w, scales + (r & 15) * R::SCALES + group0 * (KV::ASYM ? 2 : 1), out);
#pragma unroll
    for (int k = 0; k < R::OUT_CHUNKS; ++k) *reinterpret_cast<uint4*>(tile + swz<D / 8>(r, c * R::OUT_CHUNKS + k)) = out[k];
  }
}

// The same for the wgmma kernel (attention_prefill_sm90.cu): the 128-byte-swizzled tile (sw128), values converted
// in packed halves (dequant16<KV, true>), by the NT threads t = 0 .. NT-1 of the CTA (NT a compile-time constant,
// a multiple of 8 and of the chunks per row). Item i = t + NT * step (value chunk c = i % CHUNKS of row
// i / CHUNKS) is mapped so that each 8-thread phase of the 16-byte shared-memory accesses hits 8 distinct bank
// groups, reads and writes alike: 8 / CHUNKS rows of a phase read consecutive chunks; a D = 128 row writes its
// output chunks c and c + 8 into the same bank group (two column blocks), so chunks writing the second block take
// the row of the next group of 8 / CHUNKS rows (r ^ (8 / CHUNKS)) instead (tests/test_prefill_sm90_layout.py
// checks the mapping). A thread's chunk, its row within a unit (r % 16) and its swizzle phase (r % 8) are the same
// in every step (a step is NT / CHUNKS rows, whole units), so its addresses are formed once and advance by
// constants: no per-chunk index arithmetic.
template <class KV, int D, int ROWS, int NT>
__device__ __forceinline__ void dequant_tile_sw128(const unsigned char* raw, unsigned char* tile, u32 t) {
  using R = lskv::Row<KV, D>;
  constexpr int ITEMS = ROWS * R::CHUNKS, RSTEP = NT / R::CHUNKS, UNIT = Staged<KV, D>::UNIT;
  static_assert(NT % 8 == 0 && NT % R::CHUNKS == 0 && RSTEP % 16 == 0, "whole units per step");
  static_assert(ITEMS % NT == 0 || ITEMS < NT, "whole steps");
  static_assert(ROWS % (16 / R::CHUNKS) == 0, "whole pairs of row groups");
  if (ITEMS < NT && t >= (u32)ITEMS) return;
  const u32 c = t % R::CHUNKS;
  const u32 r = (t / R::CHUNKS) ^ ((c * R::OUT_CHUNKS >> 3) * (8 / R::CHUNKS));  // the row of step 0
  const unsigned char* unit = raw + (r >> 4) * UNIT;
  const unsigned char* vals = unit + (r & 15) * R::BYTES + c * 16;
  const u32 group0 = R::GROUPS == 1 ? 0 : c * (R::CHUNK_CH / KV::GROUP);  // the chunk's first group
  const unsigned char* sc = unit + 16 * R::BYTES + 2 * ((r & 15) * R::SCALES + group0 * (KV::ASYM ? 2 : 1));
#pragma unroll
  for (int step = 0; step < (ITEMS + NT - 1) / NT; ++step) {
    const int src = step * (RSTEP / 16) * UNIT, dst = step * RSTEP * 128;
    const uint4 w = *reinterpret_cast<const uint4*>(vals + src);
    uint4 out[R::OUT_CHUNKS];
    lskv::dequant16<KV, true>(w, reinterpret_cast<const f16_t*>(sc + src), out);
#pragma unroll
    for (int k = 0; k < R::OUT_CHUNKS; ++k)
      *reinterpret_cast<uint4*>(tile + sw128<ROWS>(r, c * R::OUT_CHUNKS + k) + dst) = out[k];
  }
}

}  // namespace lsattn
