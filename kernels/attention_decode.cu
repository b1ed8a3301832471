// Flash-decoding over paged KV for one query row per query block: executes an AttentionPlan whose query
// blocks all have length 1 (decode). References: lserve_lite/backends/reference/attention.py::paged_attention_ref (dense),
// lserve_lite/backends/reference/attention.py::paged_attention_sparse_ref (LServe: two pools, per-block streaming
// windows, dense heads visiting the pages the selector picked: sel_idx/sel_cnt, see make_visit);
// launcher: lserve_lite/backends/cuda_attention.py.
//
// Split-KV: the page list of each (query block, KV head) is cut into SW = gridDim.x * 4 equal ranges of
// 16-token units, one per warp. A warp computes the partial attention of up to 16 query heads of the GQA
// group (rows of an m16 tile; more heads -> more head tiles in gridDim.z) over its range with
// mma.sync m16n8k16, streaming its units through its own STAGES-deep cp.async ring in shared memory
// (no CTA barriers in the loop), and writes the normalized partial output and its base-2 log-sum-exp.
// `paged_attn_decode_combine` merges the SW partials of each (query block, head) into the fp16 output.
//
// Quantized caches (KV = lskv::Int8 / Int4 / Fp8): a unit travels as stored (values + fp16 scales, through
// the same ring) and the warp dequantizes it into an fp16 K and V tile just before its mma steps.
//
// CUDA Graphs: the grid is sized from the plan's capacity; counts (query blocks, pages per list) are read
// from the device plan, so one captured graph replays for any plan of up to that many query blocks.
// CTAs past the live query blocks exit; warps with an empty range write O = 0 and lse = -inf.
#include "attention_common.cuh"

namespace lsattn {

constexpr int DC_THREADS = 128;
constexpr int DC_WARPS = DC_THREADS / 32;
constexpr int DC_UNIT = 16;  // keys per unit (the smallest page size)

template <int D, int STAGES, class KV>
struct DecodeSmem {
  static constexpr int CH = D / 8;
  static constexpr int Q_BYTES = 16 * D * 2;
  static constexpr int UNIT_BYTES = DC_UNIT * D * 2;  // fp16 K (or V) of one unit
  static constexpr int RAW_BYTES = KV::QUANT ? Staged<KV, D>::UNIT : UNIT_BYTES;  // a unit as stored
  static constexpr int WARP_BYTES = STAGES * 2 * RAW_BYTES + (KV::QUANT ? 2 * UNIT_BYTES : 0);
  static constexpr int BYTES = Q_BYTES + DC_WARPS * WARP_BYTES;
};

template <int D, int STAGES, class KV>
__device__ __forceinline__ void decode_body(const f16_t* __restrict__ q, const KVPools pools,
                                            float* __restrict__ part_o, float* __restrict__ part_lse,
                                            const PlanView pv, const int* __restrict__ sel_idx,
                                            const int* __restrict__ sel_cnt, int sel_cap, int Hq, int Hkv,
                                            int ps_shift, int n_htiles, float scale_log2) {
  using L = DecodeSmem<D, STAGES, KV>;
  constexpr int CH = L::CH;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int qb = blockIdx.y;
  if (qb >= pv.meta[0]) return;
  const int kvh = blockIdx.z / n_htiles, ht = blockIdx.z % n_htiles;
  const int group = Hq / Hkv;
  const int nh = min(16, group - ht * 16);  // query heads in this tile
  const int head0 = kvh * group + ht * 16;
  const int tok = pv.qb_start[qb], qpos = pv.qb_pos[qb];
  const int ctx = pv.seq_ctx[pv.qb_seq[qb]];
  const int sink = pv.qb_sink[qb], local = pv.qb_local[qb];
  const int cls = pools.head_class[kvh];
  const unsigned char* __restrict__ kc = cls ? pools.k1 : pools.k0;
  const unsigned char* __restrict__ vc = cls ? pools.v1 : pools.v0;
  const f16_t* __restrict__ kcs = cls ? pools.sk1 : pools.sk0;
  const f16_t* __restrict__ vcs = cls ? pools.sv1 : pools.sv0;
  const int pool_heads = cls ? pools.n1 : pools.n0, slot = pools.head_slot[kvh];
  const int lo = pv.kv_indptr[qb * 2 + cls];
  // Dense heads of a block with a page budget visit the selected entries of their list (+ the newest).
  const Visit vis = make_visit(pv, qb, kvh, cls, Hkv, pv.kv_indptr[qb * 2 + cls + 1] - lo, sel_idx, sel_cnt,
                               sel_cap);
  const int npages = vis.npages;
  const int ps = 1 << ps_shift;
  const int units_per_page_shift = ps_shift - 4;
  const int nunits = npages << units_per_page_shift;
  const int SW = gridDim.x * DC_WARPS, ws = blockIdx.x * DC_WARPS + warp;
  const int u0 = (int)(((long long)ws * nunits) / SW), u1 = (int)(((long long)(ws + 1) * nunits) / SW);

  const u32 sQ = smem_addr(smem);
  const u32 sK = sQ + L::Q_BYTES + warp * L::WARP_BYTES, sV = sK + STAGES * L::RAW_BYTES;
  unsigned char* const tiles = smem + L::Q_BYTES + warp * L::WARP_BYTES + 2 * STAGES * L::RAW_BYTES;  // quantized

  // ---- Q (16 rows, zero past the group's heads) -> smem, then A fragments in registers
#pragma unroll
  for (int it = 0; it < 16 * CH / DC_THREADS + (16 * CH % DC_THREADS ? 1 : 0); ++it) {
    const int idx = tid + it * DC_THREADS, r = idx / CH, c = idx % CH;
    if (idx < 16 * CH) {
      const bool ok = r < nh;
      const f16_t* src = ok ? q + ((size_t)tok * Hq + head0 + r) * D + c * 8 : q;
      cp_async16(sQ + swz<CH>(r, c), src, ok ? 16 : 0);
    }
  }
  cp_async_commit();

  auto load_unit = [&](int u, int st) {  // unit u of the list -> this warp's ring stage st
    const int e = vis.entry(u >> units_per_page_shift);
    const int off = (u << 4) & (ps - 1);
    const int page = pv.kv_pl[lo + e].x;
    const size_t row = ((size_t)page * pool_heads + slot) * ps + off;
    if constexpr (KV::QUANT) {
      stage_unit<KV, D>(sK + st * L::RAW_BYTES, kc, kcs, row, true, lane, 32);
      stage_unit<KV, D>(sV + st * L::RAW_BYTES, vc, vcs, row, true, lane, 32);
    } else {
      const f16_t* kh = reinterpret_cast<const f16_t*>(kc) + row * D;
      const f16_t* vh = reinterpret_cast<const f16_t*>(vc) + row * D;
#pragma unroll
      for (int it = 0; it < DC_UNIT * CH / 32; ++it) {
        const int idx = lane + it * 32, r = idx / CH, c = idx % CH;
        const u32 dst = swz<CH>(r, c) + st * L::UNIT_BYTES;
        cp_async16(sK + dst, kh + idx * 8, 16);
        cp_async16(sV + dst, vh + idx * 8, 16);
      }
    }
  };
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (u0 + st < u1) load_unit(u0 + st, st);
    cp_async_commit();
  }

  const int g = lane >> 2, t4 = lane & 3, lm = lane >> 3, lr = lane & 7;
  cp_async_wait<STAGES - 1>();  // the Q group (the oldest) has landed for this thread
  __syncthreads();
  u32 qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qa[kk], sQ + swz<CH>(lane & 15, kk * 2 + (lane >> 4)));

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {LSERVE_NEG_INF, LSERVE_NEG_INF}, l_run[2] = {0.f, 0.f};

  for (int u = u0, it = 0; u < u1; ++u, ++it) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();
    if (u + STAGES - 1 < u1) load_unit(u + STAGES - 1, (it + STAGES - 1) % STAGES);
    cp_async_commit();
    const int st = it % STAGES;
    u32 sKst = sK + st * L::UNIT_BYTES, sVst = sV + st * L::UNIT_BYTES;
    if constexpr (KV::QUANT) {  // the staged unit -> this warp's fp16 K and V tiles
      const unsigned char* raw = smem + L::Q_BYTES + warp * L::WARP_BYTES + st * L::RAW_BYTES;
      dequant_tile<KV, D, DC_UNIT>(raw, tiles, lane, 32);
      dequant_tile<KV, D, DC_UNIT>(raw + STAGES * L::RAW_BYTES, tiles + L::UNIT_BYTES, lane, 32);
      __syncwarp();
      sKst = smem_addr(tiles);
      sVst = sKst + L::UNIT_BYTES;
    }

    // S = Q K^T: 16 heads x 16 keys
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 b[4];
      ldmatrix_x4(b, sKst + swz<CH>((lm >> 1) * 8 + lr, kk * 2 + (lm & 1)));
      mma16816(s[0], qa[kk], b[0], b[1]);
      mma16816(s[1], qa[kk], b[2], b[3]);
    }
    // Mask every element (cheap here): key position of column n*8 + 2*t4 + j.
    const int kbase = (pv.kv_pl[lo + vis.entry(u >> units_per_page_shift)].y << ps_shift) + ((u << 4) & (ps - 1));
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool ok = key_visible(kbase + n * 8 + 2 * t4 + j, qpos, ctx, cls, sink, local);
        if (!ok) s[n][j] = s[n][2 + j] = LSERVE_NEG_INF;  // same key for rows g and g + 8
      }
    // Online softmax for rows g (h = 0) and g + 8 (h = 1).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = fmaxf(m_run[h], fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = mx == LSERVE_NEG_INF ? 0.f : mx;
      const float alpha = fast_exp2((m_run[h] - m_use) * scale_log2);
      const float mb = m_use * scale_log2;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float p = fast_exp2(fmaf(s[n][2 * h + j], scale_log2, -mb));
          s[n][2 * h + j] = p;
          sum += p;
        }
      l_run[h] = l_run[h] * alpha + sum;
      m_run[h] = mx;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * h] *= alpha;
        o[n][2 * h + 1] *= alpha;
      }
    }
    // O += P V (one k16 step over the unit's 16 keys)
    u32 pa[4];
    pa[0] = pack_half2(s[0][0], s[0][1]);
    pa[1] = pack_half2(s[0][2], s[0][3]);
    pa[2] = pack_half2(s[1][0], s[1][1]);
    pa[3] = pack_half2(s[1][2], s[1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      u32 b[4];
      ldmatrix_x4_trans(b, sVst + swz<CH>((lm & 1) * 8 + lr, dp * 2 + (lm >> 1)));
      mma16816(o[2 * dp], pa, b[0], b[1]);
      mma16816(o[2 * dp + 1], pa, b[2], b[3]);
    }
    __syncwarp();  // this stage is refilled STAGES - 1 iterations later
  }
  cp_async_wait<0>();

  // ---- partial output (normalized) and base-2 log-sum-exp of this warp's range
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = g + 8 * h;
    if (r < nh) {
      const size_t slot = ((size_t)qb * Hq + head0 + r) * SW + ws;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float* dst = part_o + slot * D + 2 * t4;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
      if (t4 == 0) part_lse[slot] = l > 0.f ? m_run[h] * scale_log2 + fast_log2(l) : LSERVE_NEG_INF;
    }
  }
}

// Merge the SW partials of (query block blockIdx.x, query head blockIdx.y) into the fp16 output.
// Warps take interleaved splits; a lane owns 4 consecutive dims (float4 loads, D / 4 lanes busy).
// Every split slot was written by the decode kernel (empty ranges: O = 0, lse = -inf -> weight 0).
constexpr int CB_THREADS = 256;
__device__ __forceinline__ void combine_body(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                             f16_t* __restrict__ out, const int* meta, const int* qb_start,
                                             int Hq, int SW, int D) {
  constexpr int NW = CB_THREADS / 32;
  extern __shared__ float cb_s[];  // [SW] weights | [NW] partial max | [NW] weight sums | [NW][D] sums
  float* w_s = cb_s;
  float* red = cb_s + SW;
  float* wsum_s = red + NW;
  float* acc_s = wsum_s + NW;
  const int qb = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (qb >= meta[0]) return;
  const size_t slot0 = ((size_t)qb * Hq + h) * SW;
  float mx = LSERVE_NEG_INF;
  for (int s = tid; s < SW; s += CB_THREADS) {
    const float l = part_lse[slot0 + s];
    w_s[s] = l;
    mx = fmaxf(mx, l);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int i = 1; i < NW; ++i) mx = fmaxf(mx, red[i]);
  const float m_use = mx == LSERVE_NEG_INF ? 0.f : mx;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float wsum = 0.f;
  const bool active = lane * 4 < D;
#pragma unroll 4
  for (int s = warp; s < SW; s += NW) {
    const float w = fast_exp2(w_s[s] - m_use);
    wsum += w;
    if (active) {
      const float4 v = *reinterpret_cast<const float4*>(part_o + (slot0 + s) * D + lane * 4);
      acc.x = fmaf(w, v.x, acc.x);
      acc.y = fmaf(w, v.y, acc.y);
      acc.z = fmaf(w, v.z, acc.z);
      acc.w = fmaf(w, v.w, acc.w);
    }
  }
  if (active) *reinterpret_cast<float4*>(acc_s + warp * D + lane * 4) = acc;
  if (lane == 0) wsum_s[warp] = wsum;
  __syncthreads();
  if (tid < D) {
    float a = 0.f, ws = 0.f;
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      a += acc_s[i * D + tid];
      ws += wsum_s[i];
    }
    out[((size_t)qb_start[qb] * Hq + h) * D + tid] = float_to_half(ws > 0.f ? a / ws : 0.f);
  }
}

}  // namespace lsattn

// One extern "C" entry point per (head dim, ring depth, KV format); the fp16 names carry no format suffix.
// k0/v0/k1/v1: the pools' values; sk0/sv0/sk1/sv1: their fp16 scales (null for fp16).
#define LSERVE_DECODE_KERNEL(D, STAGES, KV, SUFFIX)                                                        \
  extern "C" __global__ void __launch_bounds__(lsattn::DC_THREADS) paged_attn_decode_d##D##_s##STAGES##SUFFIX( \
      const f16_t* q, const unsigned char* k0, const unsigned char* v0, const unsigned char* k1,          \
      const unsigned char* v1, const f16_t* sk0, const f16_t* sv0, const f16_t* sk1, const f16_t* sv1,     \
      float* part_o, float* part_lse, const int* plan, int cap_qb, int cap_seq, const int* head_class,     \
      const int* head_slot, int n0, int n1, const int* sel_idx, const int* sel_cnt, int sel_cap, int Hq,   \
      int Hkv, int ps_shift, int n_htiles, float scale_log2) {                                             \
    const lsattn::KVPools pools{k0, v0, k1, v1, sk0, sv0, sk1, sv1, head_class, head_slot, n0, n1};        \
    lsattn::decode_body<D, STAGES, KV>(q, pools, part_o, part_lse, lsattn::plan_view(plan, cap_qb, cap_seq), \
                                       sel_idx, sel_cnt, sel_cap, Hq, Hkv, ps_shift, n_htiles, scale_log2); \
  }

// Ring depth (units per warp; STAGES - 1 in flight while one is computed): the launcher's DECODE_STAGES
// picks one per head dim; the others are there to be measured (docs/PERF_attention.md).
LSERVE_DECODE_KERNEL(64, 4, lskv::Half, )
LSERVE_DECODE_KERNEL(128, 2, lskv::Half, )
LSERVE_DECODE_KERNEL(128, 3, lskv::Half, )
LSERVE_DECODE_KERNEL(128, 4, lskv::Half, )
// Quantized caches: the launcher's ring depth only.
LSERVE_DECODE_KERNEL(64, 4, lskv::Int8, _int8)
LSERVE_DECODE_KERNEL(128, 4, lskv::Int8, _int8)
LSERVE_DECODE_KERNEL(64, 4, lskv::Int4, _int4)
LSERVE_DECODE_KERNEL(128, 4, lskv::Int4, _int4)
LSERVE_DECODE_KERNEL(64, 4, lskv::Fp8, _fp8)
LSERVE_DECODE_KERNEL(128, 4, lskv::Fp8, _fp8)

extern "C" __global__ void __launch_bounds__(lsattn::CB_THREADS) paged_attn_decode_combine(const float* part_o, const float* part_lse, f16_t* out,
                                                     const int* meta, const int* qb_start, int Hq, int SW, int D) {
  lsattn::combine_body(part_o, part_lse, out, meta, qb_start, Hq, SW, D);
}
