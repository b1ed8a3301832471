// Flash-decoding over paged KV for one query row per query block: executes an AttentionPlan whose query
// blocks all have length 1 (decode). References: lserve_lite/backends/reference/attention.py::paged_attention_ref (dense),
// lserve_lite/backends/reference/attention.py::paged_attention_sparse_ref (LServe: two pools, per-block streaming
// windows, dense heads visiting the pages the selector picked: sel_idx/sel_cnt, see make_visit);
// launcher: lserve_lite/backends/cuda_attention.py.
//
// Split-KV: the page list of each (query block, KV head) is cut into live * 4 equal ranges of 16-token units,
// one per warp, where live (live_splits) is the grid's split count gridDim.x, or fewer for a short list: at least
// min_units units a warp (the grid is sized for the longest list a captured graph may see; the other CTAs exit).
// A warp computes the partial attention of up to 16 query heads of the GQA group (rows of an m16 tile; more
// heads -> more head tiles in gridDim.z) over its range with mma.sync m16n8k16, streaming its units through its
// own STAGES-deep cp.async ring in shared memory (no CTA barriers in the loop). After the loop each warp parks
// its un-normalized O rows and (max, sum) in its own ring region, one __syncthreads, and the CTA merges its 4
// warps (cta_merge) into one partial per (query block, head), a normalized O and its base-2 log-sum-exp, in
// slots of stride SW = gridDim.x, which `paged_attn_decode_combine` merges into the fp16 output (part_live: how
// many). A single live CTA writes the fp16 output rows itself when the launcher passes `out` (part_live 0: the
// combine leaves the row; a grid of one split launches no combine).
//
// Quantized caches (KV = lskv::Int8 / Int4 / Fp8): a unit travels as stored (values + fp16 scales, through
// the same ring) and the warp dequantizes it into an fp16 K and V tile just before its mma steps.
//
// CUDA Graphs: the grid is sized from the plan's capacity; counts (query blocks, pages per list) are read
// from the device plan, so one captured graph replays for any plan of up to that many query blocks.
// CTAs past the live query blocks exit as a whole (qb is the CTA's, so every thread of a live CTA reaches the
// merge barrier); a warp with an empty range skips its loop and enters the merge with weight 0 (m = -inf);
// a CTA whose 4 ranges are all empty writes O = 0 and lse = -inf.
#include "attention_common.cuh"

namespace lsattn {

constexpr int DC_THREADS = 128;
constexpr int DC_WARPS = DC_THREADS / 32;
constexpr int DC_UNIT = 16;  // keys per unit (the smallest page size)

// Splits that take part for a list of nunits units: at least min_units units a warp, at most the grid's. The
// launcher sizes the grid for the longest list a captured graph may see; on a shorter one the other CTAs exit at
// once instead of writing empty partials, and the combine merges only these (part_live).
__device__ __forceinline__ int live_splits(int nunits, int min_units) {
  const int per_cta = DC_WARPS * max(1, min_units);
  return max(1, min((int)gridDim.x, (nunits + per_cta - 1) / per_cta));
}

// Whether this CTA has nothing to do, decided from the plan alone, which only host copies ordered before the
// launch write: so it may leave before pdl_enter, while the previous kernel still runs, instead of holding an SM
// slot until then (SmolLM2's short lists leave most of a grid sized for its capacity idle). Past the live query
// blocks, or a split past the live ones of a list visited whole; a selected list's length is the selector's output,
// known only after the wait (the body decides those).
__device__ __forceinline__ bool idle_before_wait(const PlanView& pv, const int* head_class, const int* sel_idx,
                                                 int ps_shift, int n_htiles, int min_units) {
  const int qb = blockIdx.y;
  if (qb >= pv.meta[0]) return true;
  const int cls = head_class[blockIdx.z / n_htiles];
  if (sel_idx != nullptr && cls == 0 && pv.qb_keep[qb] > 0) return false;  // make_visit's selected lists
  const int npages = pv.kv_indptr[qb * 2 + cls + 1] - pv.kv_indptr[qb * 2 + cls];
  return blockIdx.x >= live_splits(npages << (ps_shift - 4), min_units);
}

// After the live-split CTAs' merge: the combine's count for (qb, KV head kvh), 0 when the single live CTA wrote
// the output itself (null part_live: a grid of one split, no combine launched).
__device__ __forceinline__ void note_live(int* part_live, int qb, int Hkv, int kvh, int live, const f16_t* out) {
  if (part_live && blockIdx.x == 0 && threadIdx.x == 0) part_live[qb * Hkv + kvh] = live == 1 && out ? 0 : live;
}

// ---- CTA merge of the 4 warps' partials (the epilogue of both decode bodies)
// After its loop a warp stores its un-normalized O rows (fp32, un-permuted dims) and, per row, its running max
// m (base 2, scaled: m_run * scale_log2; -inf when the warp saw no visible key) and sum l into its OWN ring
// region, which only it used (no barrier before the stores); one __syncthreads; then the CTA's threads merge
// float4 chunks of the live rows: M = max_w m_w, a_w = exp2(m_w - M), L = sum_w a_w l_w,
// O = sum_w a_w O_w / (L * ogain), lse = M + log2(L) (ogain: v2's PGAIN folded into O). Empty CTA: O = 0,
// lse = -inf (the combine gives it weight 0). Rows are RS floats apart, RS = D + 8 (v1's float2 stores, a half
// warp = rows g..g+3: 8 banks apart) or, for v2's float4 stores of dims (2 t4 + j) * D/8 + 4 i (a quarter warp =
// rows g, g + 1 x t4 0..3), RS = D + 8 (D 64) / D + 16 (D 128) with chunk q stored at q ^ ((q >> 3) & 3): no bank
// conflicts on the stores, and a quarter warp of the merge reads 8 consecutive chunks of one row.
template <int D, bool V2>
struct MergeSmem {
  static constexpr int RS = D + (V2 && D == 128 ? 16 : 8);  // floats per row
  static constexpr int M_OFF = 16 * RS, L_OFF = M_OFF + 16;  // m[16], l[16] after the 16 rows
  static constexpr int BYTES = (L_OFF + 16) * 4;              // per warp, inside its ring region
  __device__ static __forceinline__ int chunk(int q) { return V2 ? q ^ ((q >> 3) & 3) : q; }
  __device__ static __forceinline__ int at(int r, int d) { return r * RS + 4 * chunk(d >> 2) + (d & 3); }
};

// The merge (see above): warp w's region at base + w * region floats; writes the CTA's one partial of rows
// r < nh (part_o / part_lse slot pslot0 + r * SW) or, with `out` (a single split: nothing to combine), the
// fp16 output rows out + (orow0 + r) * D directly.
template <int D, bool V2>
__device__ __forceinline__ void cta_merge(const float* base, int region, int nh, float ogain, float* part_o,
                                          float* part_lse, size_t pslot0, int SW, f16_t* out, size_t orow0) {
  using M = MergeSmem<D, V2>;
  constexpr int QN = D / 4;
  for (int i = threadIdx.x; i < nh * QN; i += DC_THREADS) {
    const int r = i / QN, q = i % QN;
    float m[DC_WARPS], mx = LSERVE_NEG_INF;
#pragma unroll
    for (int w = 0; w < DC_WARPS; ++w) mx = fmaxf(mx, m[w] = base[w * region + M::M_OFF + r]);
    const float m_use = mx == LSERVE_NEG_INF ? 0.f : mx;
    float lsum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < DC_WARPS; ++w) {
      const float a = fast_exp2(m[w] - m_use);  // 0 for an empty warp (exp2(-inf))
      lsum = fmaf(a, base[w * region + M::L_OFF + r], lsum);
      const float4 v = *reinterpret_cast<const float4*>(base + w * region + r * M::RS + 4 * M::chunk(q));
      acc.x = fmaf(a, v.x, acc.x);
      acc.y = fmaf(a, v.y, acc.y);
      acc.z = fmaf(a, v.z, acc.z);
      acc.w = fmaf(a, v.w, acc.w);
    }
    const float inv = lsum > 0.f ? 1.f / (lsum * ogain) : 0.f;
    if (out) {
      *reinterpret_cast<uint2*>(out + (orow0 + r) * D + 4 * q) =
          make_uint2(pack_half2(acc.x * inv, acc.y * inv), pack_half2(acc.z * inv, acc.w * inv));
    } else {
      const size_t slot = pslot0 + (size_t)r * SW;
      *reinterpret_cast<float4*>(part_o + slot * D + 4 * q) =
          make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      if (q == 0) part_lse[slot] = lsum > 0.f ? mx + fast_log2(lsum) : LSERVE_NEG_INF;
    }
  }
}

template <int D, int STAGES, class KV>
struct DecodeSmem {
  static constexpr int CH = D / 8;
  static constexpr int Q_BYTES = 16 * D * 2;
  static constexpr int UNIT_BYTES = DC_UNIT * D * 2;  // fp16 K (or V) of one unit
  // a unit as stored (K and V alike)
  static constexpr int RAW_BYTES = KV::QUANT ? Staged<KV, D>::UNIT : UNIT_BYTES;
  static constexpr int WARP_BYTES = STAGES * 2 * RAW_BYTES + (KV::QUANT ? 2 * UNIT_BYTES : 0);
  static constexpr int BYTES = Q_BYTES + DC_WARPS * WARP_BYTES;
  static_assert(WARP_BYTES >= MergeSmem<D, false>::BYTES && WARP_BYTES % 16 == 0, "merge: a warp's region");
};

template <int D, int STAGES, class KV>
__device__ __forceinline__ void decode_body(const f16_t* __restrict__ q, const KVPools pools,
                                            float* __restrict__ part_o, float* __restrict__ part_lse,
                                            int* __restrict__ part_live, f16_t* __restrict__ out, const PlanView pv,
                                            const int* __restrict__ sel_idx, const int* __restrict__ sel_cnt,
                                            int sel_cap, int Hq, int Hkv, int ps_shift, int n_htiles,
                                            float scale_log2, int min_units) {
  using L = DecodeSmem<D, STAGES, KV>;
  constexpr int CH = L::CH;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int qb = blockIdx.y;  // a live query block: idle_before_wait sent the others away
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
  const int live = live_splits(nunits, min_units);
  if (blockIdx.x >= live) return;  // CTA-uniform, before any barrier
  const int NWR = live * DC_WARPS, ws = blockIdx.x * DC_WARPS + warp;  // warp ranges, this warp's
  const int u0 = (int)(((long long)ws * nunits) / NWR), u1 = (int)(((long long)(ws + 1) * nunits) / NWR);

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
  __syncwarp();  // every lane's copies into this warp's ring have landed: the region is free

  // ---- this warp's un-normalized O rows, (m, l) -> its ring region; the CTA merges them (cta_merge)
  using M = MergeSmem<D, false>;
  float* const mo = reinterpret_cast<float*>(smem + L::Q_BYTES + warp * L::WARP_BYTES);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = g + 8 * h;
    if (r < nh) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float2*>(mo + M::at(r, n * 8 + 2 * t4)) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
      if (t4 == 0) {
        mo[M::M_OFF + r] = l > 0.f ? m_run[h] * scale_log2 : LSERVE_NEG_INF;
        mo[M::L_OFF + r] = l;
      }
    }
  }
  __syncthreads();
  cta_merge<D, false>(reinterpret_cast<const float*>(smem + L::Q_BYTES), L::WARP_BYTES / 4, nh, 1.f, part_o,
                      part_lse, ((size_t)qb * Hq + head0) * gridDim.x + blockIdx.x, gridDim.x,
                      live == 1 ? out : nullptr, (size_t)pv.qb_start[qb] * Hq + head0);
  note_live(part_live, qb, Hkv, kvh, live, out);
}

// ---- v2 of the quantized decode (LSERVE_KVQ_DECODE=v2, cuda_attention.KVQ_DECODE) --------------------
// The same split-KV flash-decoding and per-warp cp.async ring, but a staged unit is never expanded to an fp16
// tile: each lane reads the stored bytes its mma fragments need (16-, 8- or 4-byte shared loads) and converts
// them in registers (magic-number int8 / int4 -> half, hardware e4m3 -> half on sm_89+).
// - K: the head dimension is permuted (the same permutation for Q and K leaves QK^T unchanged) so that lane
//   (g, t4) needs bytes [t4 * D/4 channels ..) of key rows g and g + 8 only: KV8 (int8 / fp8) are exact in
//   fp16 (no scale), and the per-(token, head) scale multiplies the score (s = (q . k_int) * scale_k);
//   int4 applies its group's scale and min in (q * scale + min, one fp16 FMA per value pair; a lane's D/4
//   channels are KG = 1 (D = 64) or 2 (D = 128) key groups of 16, k-steps 0-3 and 4-7).
// - V: output dim g * D/8 + nt is column g of n-tile nt, so a lane reads D/8 contiguous channels of the four
//   key rows its B fragments hold; KV8's per-token scale is folded into the probabilities (p * scale_v),
//   int4's group scale and min (one group per lane) are applied in by one FMA. A warp stores its O rows for
//   the CTA merge un-permuted (MergeSmem<D, true>), so the merged partial / output is in plain dim order.
// - Values in shared memory: 16-byte chunks XOR-swizzled by (chunk index / 8) % 8, so the K and V fragment
//   loads of a quarter warp hit distinct banks (D = 128); scales stay linear after them.
// No fp16 tiles: 2 * STAGES units of shared memory per warp, so more CTAs fit per SM (the launcher sizes the
// split count for this kernel's own shared memory and registers).
// - Steps of NU units (NU * 16 keys; the kernels instantiate NU = DC_V2_NU = 2): the warp's ring holds STAGES / NU groups of NU units, one
//   cp.async group each; the softmax max (two shuffles), alpha, the O-rescale vote and the loop bookkeeping are
//   paid per step, the page entry is looked up once per step (pages of NU * 16 tokens or more), and the
//   per-key mask runs only for a step with a unit on a visibility boundary (unit_visible).
template <class A, class B>
struct same_t {
  static constexpr bool value = false;
};
template <class A>
struct same_t<A, A> {
  static constexpr bool value = true;
};

template <class KV, int D>
struct FragV2 {
  using R = lskv::Row<KV, D>;                   // a K or V row
  static constexpr bool Q4 = KV::BITS == 4;
  static constexpr int RB = R::BYTES;        // bytes of a stored row's values (K and V alike)
  static constexpr int KB = D / 4 * KV::BITS / 8;  // K bytes of a row a lane reads
  static constexpr int VB = D / 8 * KV::BITS / 8;  // V bytes of a row a lane reads
  static constexpr int KG = Q4 ? D / 4 / KV::GROUP : 1;  // int4 key groups of a lane's K channels
  static constexpr int UNIT = DC_UNIT * (R::BYTES + R::SCALE_BYTES);  // a K or V unit as stored
  static constexpr int VBYTES = DC_UNIT * R::BYTES;  // a unit's values (then its scales)
  static constexpr float UNITS = same_t<KV, lskv::Fp8>::value ? lskv::FP8_UNIT : 1.f;
  // KV8: P carries p * scale_v * PGAIN (O is divided by PGAIN at the end), which keeps small products out of
  // fp16's subnormal range; it cannot overflow: scale_v <= 65504 / 127 (int8), 65504 / 448 (fp8), and the
  // software fp8 path's UNITS = 256 already plays that part.
  static constexpr float PGAIN = (Q4 || UNITS != 1.f) ? 1.f : 64.f;
  // Physical channel of k-index j (0..15) of mma k-step kk: lane t4 = (j & 7) >> 1 owns channels
  // [t4 * D/4, (t4 + 1) * D/4); b0 holds j = 2 t4, 2 t4 + 1, b1 holds j = 2 t4 + 8, 2 t4 + 9.
  __device__ static __forceinline__ int kchan(int kk, int j) {
    const int t = (j & 7) >> 1, hi = j >> 3, lo = j & 1;
    return t * (D / 4) + (Q4 ? 8 * (kk >> 1) + 2 * (kk & 1) + hi + 4 * lo : 4 * kk + 2 * hi + lo);
  }
};

// Every key of the 16-key unit at kbase visible (key_visible of each, the unit decided at once): causal and in
// the context up to its last key; streaming heads: all in the sink or all in the local window. False is not
// "none visible": the caller then masks key by key, so units on a boundary keep the exact mask.
__device__ __forceinline__ bool unit_visible(int kbase, int qp, int ctx, int cls, int sink, int local) {
  const int last = kbase + DC_UNIT - 1;
  return last <= qp && last < ctx && (!cls || last < sink || qp - kbase < local);
}

__device__ __forceinline__ u32 swz_v2(int i) { return (u32)((i ^ ((i >> 3) & 7)) << 4); }

// NB bytes at byte b of stored row r of a unit's values (RB bytes per row), as words.
template <int RB, int NB>
__device__ __forceinline__ void lds_v2(const unsigned char* base, int r, int b, u32 (&w)[NB / 4]) {
  const int i = r * (RB / 16) + (b >> 4);
  if constexpr (NB >= 16) {
#pragma unroll
    for (int c = 0; c < NB / 16; ++c) {
      const uint4 x = *reinterpret_cast<const uint4*>(base + swz_v2(i + c));
      w[4 * c] = x.x, w[4 * c + 1] = x.y, w[4 * c + 2] = x.z, w[4 * c + 3] = x.w;
    }
  } else if constexpr (NB == 8) {
    const uint2 x = *reinterpret_cast<const uint2*>(base + swz_v2(i) + (b & 15));
    w[0] = x.x, w[1] = x.y;
  } else {
    w[0] = *reinterpret_cast<const u32*>(base + swz_v2(i) + (b & 15));
  }
}

// int4: the nibbles at bits 6..9 and 22..25 of x under the magic 0x4C00 (= 16, mantissa step 1/64: one lop3)
// are the halves 16 + q, exact; one FMA with (scale, min - 16 scale) gives q * scale + min (nib4_v2). The bias is
// rounded to fp16 once per group (|error| <= 2^-11 |min - 16 scale|, about 3 fp16 roundings of a value of the
// group, see docs/KV_QUANT.md): the top of the mantissa keeps the bias smallest (nibbles at bits 0..3 would need
// min - 1024 scale, up to half a quantization step of error; bits 4..7, min - 64 scale). A word's nibble pairs
// (m, m + 4) reach bits 6..9 by one shift each: x << 6, x << 2, x >> 2, x >> 6 (m = 0, 1, 2, 3).
constexpr u32 NIB4_MASK = 0x03C003C0u, MAGIC2 = 0x4C004C00u, H2_MINUS16 = 0xCC00CC00u;  // (-16, -16)
constexpr u32 H2_ONES = 0x3C003C00u;  // (1, 1)
// (x & NIB4_MASK) | MAGIC2 as one lop3 (LUT 0xEA = (a & b) | c): written as C, ptxas emits two LOP3s (a SASS
// LOP3 takes one immediate); given both constants, it keeps one in a register.
__device__ __forceinline__ u32 nib4_v2(u32 x, u32 s2, u32 c2) {
  u32 y;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(y) : "r"(x), "n"(NIB4_MASK), "n"(MAGIC2));
  return lskv::hfma2(y, s2, c2);
}
// (scale, min) half2s -> nib4_v2's bias min - 16 scale (the scale is used as it is).
__device__ __forceinline__ u32 nib4_bias(u32 sc2, u32 mn2) { return lskv::hfma2(sc2, H2_MINUS16, mn2); }
// Word x's nibbles m and m + 4 (m = 0..3) moved to bits 6..9 and 22..25.
template <int M>
__device__ __forceinline__ u32 nib_at6(u32 x) {
  return M < 2 ? x << (6 - 4 * M) : x >> (4 * M - 6);
}
// int8 stored bytes -> 1152 + value halves (bytes of prmt selector sel: 0x4140 bytes 0, 1; 0x4342 bytes 2, 3):
// the value offset by 1152, exact; K leaves the offset in (the score's accumulator starts at -1152 * sum(q)).
__device__ __forceinline__ u32 i8off_h2(u32 x80, u32 sel) { return lskv::prmt(x80, 0x64646464u, sel); }

// B fragments (b0, b1) of QK^T k-step kk from a lane's K words of one key row; s2, c2: int4's nib4_v2
// coefficients of the row's group (half2, both halves equal).
template <class KV>
__device__ __forceinline__ void kfrag_v2(const u32* w, int kk, u32 s2, u32 c2, u32& b0, u32& b1) {
  if constexpr (KV::BITS == 4) {  // word kk / 2, nibbles m, m + 4 (b0) and m + 1, m + 5 (b1), m = 2 (kk & 1)
    const u32 x = w[kk >> 1];
    b0 = nib4_v2((kk & 1) ? nib_at6<2>(x) : nib_at6<0>(x), s2, c2);
    b1 = nib4_v2((kk & 1) ? nib_at6<3>(x) : nib_at6<1>(x), s2, c2);
  } else if constexpr (same_t<KV, lskv::Int8>::value) {  // bytes 0, 1 and 2, 3 of word kk, + 1152
    const u32 x = w[kk] ^ 0x80808080u;
    b0 = i8off_h2(x, 0x4140u);
    b1 = i8off_h2(x, 0x4342u);
  } else {
    b0 = lskv::e4m3x2_to_h2(w[kk]);
    b1 = lskv::e4m3x2_to_h2(w[kk] >> 16);
  }
}

// The PV B fragments of n-tiles 4 i .. 4 i + 3 (KV8) or 8 i .. 8 i + 7 (int4) from word i of two key rows
// (a: key 2 t4 (+8), b: key 2 t4 + 1 (+9)); s2, c2: int4's nib4_v2 coefficients of the two keys (half2). int8:
// 1152 + v, exact (no subtraction per value pair): decode_body_v2 subtracts 1152 sum(P) from O once, after the loop.
template <class KV>
__device__ __forceinline__ void vfrag_v2(u32 a, u32 b, u32 s2, u32 c2, u32* out) {
  if constexpr (KV::BITS == 4) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // bytes 2 i, 2 i + 1 of both rows -> [a_2i, a_2i+1, b_2i, b_2i+1]
      const u32 y = lskv::prmt(a, b, i ? 0x7632u : 0x5410u);
      out[4 * i] = nib4_v2(nib_at6<0>(y), s2, c2);      // channel 4 i: the low nibbles of bytes 0, 2
      out[4 * i + 1] = nib4_v2(nib_at6<1>(y), s2, c2);  // 4 i + 1: the high nibbles of bytes 0, 2
      out[4 * i + 2] = nib4_v2(nib_at6<2>(y), s2, c2);  // 4 i + 2: the low nibbles of bytes 1, 3
      out[4 * i + 3] = nib4_v2(nib_at6<3>(y), s2, c2);  // 4 i + 3: the high nibbles of bytes 1, 3
    }
  } else {
    const u32 x0 = lskv::prmt(a, b, 0x5140u), x1 = lskv::prmt(a, b, 0x7362u);  // [a0 b0 a1 b1], [a2 b2 a3 b3]
    if constexpr (same_t<KV, lskv::Int8>::value) {  // 1152 + v: the offset leaves O after the loop (V_OFF)
      const u32 y0 = x0 ^ 0x80808080u, y1 = x1 ^ 0x80808080u;
      out[0] = i8off_h2(y0, 0x4140u);
      out[1] = i8off_h2(y0, 0x4342u);
      out[2] = i8off_h2(y1, 0x4140u);
      out[3] = i8off_h2(y1, 0x4342u);
    } else {
      out[0] = lskv::e4m3x2_to_h2(x0);
      out[1] = lskv::e4m3x2_to_h2(x0 >> 16);
      out[2] = lskv::e4m3x2_to_h2(x1);
      out[3] = lskv::e4m3x2_to_h2(x1 >> 16);
    }
  }
}

template <int D, int STAGES, class KV>
struct DecodeSmemV2 {
  static constexpr int WARP_BYTES = STAGES * 2 * FragV2<KV, D>::UNIT;
  static constexpr int BYTES = DC_WARPS * WARP_BYTES;
  static_assert(WARP_BYTES >= MergeSmem<D, true>::BYTES && WARP_BYTES % 16 == 0, "merge: a warp's region");
};

template <int D, int STAGES, class KV, int NU>
__device__ __forceinline__ void decode_body_v2(const f16_t* __restrict__ q, const KVPools pools,
                                               float* __restrict__ part_o, float* __restrict__ part_lse,
                                               int* __restrict__ part_live, f16_t* __restrict__ out,
                                               const PlanView pv, const int* __restrict__ sel_idx,
                                               const int* __restrict__ sel_cnt, int sel_cap, int Hq, int Hkv,
                                               int ps_shift, int n_htiles, float scale_log2, int min_units) {
  static_assert(KV::QUANT, "v2 is the quantized decode");
  using F = FragV2<KV, D>;
  using R = typename F::R;
  constexpr int UNIT = F::UNIT, KW = F::KB / 4, VW = F::VB / 4, NT = D / 8;
  static_assert(STAGES % NU == 0 && STAGES / NU >= 2, "the ring: whole groups of NU units, two groups at least");
  constexpr int GS = STAGES / NU;  // groups of the ring: one computed, GS - 1 in flight
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int qb = blockIdx.y;  // a live query block: idle_before_wait sent the others away
  const int kvh = blockIdx.z / n_htiles, ht = blockIdx.z % n_htiles;
  const int group = Hq / Hkv;
  const int nh = min(16, group - ht * 16);
  const int head0 = kvh * group + ht * 16;
  const int tok = pv.qb_start[qb], qpos = pv.qb_pos[qb];
  const int ctx = pv.seq_ctx[pv.qb_seq[qb]];
  const int sink = pv.qb_sink[qb], local = pv.qb_local[qb];
  const int cls = pools.head_class[kvh];
  const unsigned char* __restrict__ kc = cls ? pools.k1 : pools.k0;
  const unsigned char* __restrict__ vc = cls ? pools.v1 : pools.v0;
  const unsigned char* __restrict__ kcs = reinterpret_cast<const unsigned char*>(cls ? pools.sk1 : pools.sk0);
  const unsigned char* __restrict__ vcs = reinterpret_cast<const unsigned char*>(cls ? pools.sv1 : pools.sv0);
  const int pool_heads = cls ? pools.n1 : pools.n0, slot = pools.head_slot[kvh];
  const int lo = pv.kv_indptr[qb * 2 + cls];
  const Visit vis = make_visit(pv, qb, kvh, cls, Hkv, pv.kv_indptr[qb * 2 + cls + 1] - lo, sel_idx, sel_cnt,
                               sel_cap);
  const int npages = vis.npages;
  const int ps = 1 << ps_shift;
  const int units_per_page_shift = ps_shift - 4;
  const int nunits = npages << units_per_page_shift;
  // Warp ranges in steps of NU units (the last step of an odd list of 16-token pages is half empty).
  const int nsteps = (nunits + NU - 1) / NU;
  const int live = live_splits(nunits, min_units);
  if (blockIdx.x >= live) return;  // CTA-uniform, before any barrier
  const int NWR = live * DC_WARPS, ws = blockIdx.x * DC_WARPS + warp;  // warp ranges, this warp's
  const int i0 = (int)(((long long)ws * nsteps) / NWR), i1 = (int)(((long long)(ws + 1) * nsteps) / NWR);

  unsigned char* const wbase = smem + warp * DecodeSmemV2<D, STAGES, KV>::WARP_BYTES;
  const u32 sK = smem_addr(wbase), sV = sK + STAGES * UNIT;

  // Cache row `row` (16 tokens) -> ring slot st: values (swizzled chunks) then scales, K and V. Lane l copies value
  // chunks l + 32 it, at swz_v2(l + 32 it) = 512 it + (swz_v2(l) ^ 64 (it & 1)) (32 chunks on, the XOR key's bit 2
  // flips), so one source offset and two destination offsets per lane serve every chunk (immediate offsets).
  constexpr int VCH = F::VBYTES / 16, SCH = UNIT / 16 - VCH;
  static_assert(VCH % 32 == 0 && SCH <= 32, "loader: whole rounds of value chunks, one of scales");
  const u32 dsw = swz_v2(lane);
  // Cache rows count in 32 bits (a pool of 2^32 rows would take over 300 GB); byte offsets in 64.
  auto copy_unit = [&](u32 row, int st) {
    const size_t vo = (size_t)row * R::BYTES + lane * 16;
    const u32 dk = sK + st * UNIT, dv = sV + st * UNIT;
#pragma unroll
    for (int it = 0; it < VCH / 32; ++it) {
      const u32 d = (dsw ^ ((it & 1) << 6)) + it * 512;
      cp_async16(dk + d, kc + vo + it * 512, 16);
      cp_async16(dv + d, vc + vo + it * 512, 16);
    }
    if (lane < SCH) {
      cp_async16(dk + VCH * 16 + lane * 16, kcs + (size_t)row * R::SCALE_BYTES + lane * 16, 16);
      cp_async16(dv + VCH * 16 + lane * 16, vcs + (size_t)row * R::SCALE_BYTES + lane * 16, 16);
    }
  };
  // Step i (units NU i ..) -> ring slots NU gs ..; kb: each unit's first key position. Pages of NU units or more
  // hold a whole step (one page entry, consecutive rows); 16-token pages look each unit's entry up, and a unit
  // past the list copies the step's first (finite values) with kb = ctx, so that every key of it is masked.
  auto load_step = [&](int i, int gs, int (&kb)[NU]) {
    const int u = i * NU, off = (u << 4) & (ps - 1);
    const int2 pl = pv.kv_pl[lo + vis.entry(u >> units_per_page_shift)];
    const u32 row = ((u32)pl.x * pool_heads + slot) * ps + off;
    kb[0] = (pl.y << ps_shift) + off;
    copy_unit(row, gs * NU);
#pragma unroll
    for (int k = 1; k < NU; ++k) {
      if (ps >= NU * DC_UNIT) {
        kb[k] = kb[0] + k * DC_UNIT;
        copy_unit(row + k * DC_UNIT, gs * NU + k);
      } else if (u + k < nunits) {
        const int2 pk = pv.kv_pl[lo + vis.entry(u + k)];
        kb[k] = pk.y << ps_shift;
        copy_unit(((u32)pk.x * pool_heads + slot) * ps, gs * NU + k);
      } else {
        kb[k] = ctx;
        copy_unit(row, gs * NU + k);
      }
    }
  };
  // Key positions of the steps in the ring (kb[0]: the one computed next), carried in registers so the loop
  // neither looks the page entries up again nor reloads them.
  int kb[GS - 1][NU];
#pragma unroll
  for (int gs = 0; gs < GS - 1; ++gs) {
    if (i0 + gs < i1) load_step(i0 + gs, gs, kb[gs]);
    cp_async_commit();
  }

  const int g = lane >> 2, t4 = lane & 3;
  // Q A fragments in the permuted channel order (rows past the group's heads are zero).
  u32 qa[D / 16][4];
  {
    const f16_t* q0 = q + ((size_t)tok * Hq + head0 + g) * D;
    const f16_t* q1 = q0 + 8 * D;
    const bool ok0 = g < nh, ok1 = g + 8 < nh;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int j = 2 * t4 + 8 * (r >> 1);
        const f16_t* src = (r & 1) ? q1 : q0;
        const bool ok = (r & 1) ? ok1 : ok0;
        const u32 a = ok ? src[F::kchan(kk, j)] : 0u, b = ok ? src[F::kchan(kk, j + 1)] : 0u;
        qa[kk][r] = a | (b << 16);
      }
  }
  // int8 keys enter QK^T as 1152 + k (no subtraction per value): the score accumulators of rows g, g + 8 start
  // at -1152 * sum(q) instead of 0 (q . (k + 1152) - 1152 sum(q): products exact, sums in fp32).
  float s_init[2] = {0.f, 0.f};
  if constexpr (same_t<KV, lskv::Int8>::value) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const u32 x = qa[kk][r + 2 * i];
          sum += lskv::h2f((unsigned short)(x & 0xffffu)) + lskv::h2f((unsigned short)(x >> 16));
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      s_init[r] = -1152.f * sum;
    }
  }

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {LSERVE_NEG_INF, LSERVE_NEG_INF}, l_run[2] = {0.f, 0.f};
  // int8 values enter P V as 1152 + v (vfrag_v2): po accumulates P times a B of ones (one mma per unit), i.e. the
  // row sums of the fp16 P the mmas used, rescaled with O, and O - 1152 po after the loop is P V (fp32: the
  // offset adds an error of about 2^-24 * 1152 sum(P), far below P's own fp16 rounding).
  constexpr bool V_OFF = same_t<KV, lskv::Int8>::value;
  float po[4] = {0.f, 0.f, 0.f, 0.f};

  // Ring groups (NU slots each): gs (computed now) and gs_ld = gs - 1 mod GS (refilled now), advanced without a
  // modulo.
  for (int i = i0, gs = 0, gs_ld = GS - 1; i < i1; ++i) {
    cp_async_wait<GS - 2>();
    __syncwarp();
    int kbase[NU];
#pragma unroll
    for (int k = 0; k < NU; ++k) {
      kbase[k] = kb[0][k];
#pragma unroll
      for (int j = 0; j + 1 < GS - 1; ++j) kb[j][k] = kb[j + 1][k];
    }
    if (i + GS - 1 < i1) load_step(i + GS - 1, gs_ld, kb[GS - 2]);
    cp_async_commit();
    const int cur = gs;
    gs_ld = gs;
    gs = gs + 1 == GS ? 0 : gs + 1;

    // S = Q K^T: 16 heads x 16 keys per unit k (n-tile n: keys 8 n .. 8 n + 7 of the unit; this lane's B column is
    // key g + 8 n)
    float s[NU][2][4];
#pragma unroll
    for (int k = 0; k < NU; ++k) {
      const unsigned char* rk = wbase + (cur * NU + k) * UNIT;
      const f16_t* skh = reinterpret_cast<const f16_t*>(rk + F::VBYTES);
#pragma unroll
      for (int n = 0; n < 2; ++n) s[k][n][0] = s[k][n][1] = s_init[0], s[k][n][2] = s[k][n][3] = s_init[1];
      u32 kw[2][KW];
      u32 ks2[2][F::KG] = {}, kc2[2][F::KG] = {};
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        lds_v2<F::RB, F::KB>(rk, g + 8 * n, t4 * F::KB, kw[n]);
        if constexpr (F::Q4) {  // (scale, min) pairs of key row g + 8 n's groups t4 * KG .. t4 * KG + KG - 1
#pragma unroll
          for (int j = 0; j < F::KG; ++j) {
            const u32 sm = *reinterpret_cast<const u32*>(skh + (g + 8 * n) * R::SCALES + 2 * (t4 * F::KG + j));
            ks2[n][j] = lskv::prmt(sm, 0u, 0x1010u);
            kc2[n][j] = nib4_bias(ks2[n][j], lskv::prmt(sm, 0u, 0x3232u));
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          u32 b0, b1;
          const int j = 8 * (kk >> 1) * F::KG / (D / 4);  // the group of kk's lane channels 8 (kk / 2) .. + 7
          kfrag_v2<KV>(kw[n], kk, ks2[n][j], kc2[n][j], b0, b1);
          mma16816(s[k][n], qa[kk], b0, b1);
        }
      if constexpr (!F::Q4) {  // the per-token K scale of key n * 8 + 2 t4 + j (rows g and g + 8 alike)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const u32 h = *reinterpret_cast<const u32*>(skh + 8 * n + 2 * t4);
          const float k0 = lskv::h2f((unsigned short)(h & 0xffffu)) * F::UNITS;
          const float k1 = lskv::h2f((unsigned short)(h >> 16)) * F::UNITS;
          s[k][n][0] *= k0, s[k][n][2] *= k0, s[k][n][1] *= k1, s[k][n][3] *= k1;
        }
      }
    }
    bool dense = true;  // warp-uniform: key by key only for a step with a unit on a visibility boundary
#pragma unroll
    for (int k = 0; k < NU; ++k) dense &= unit_visible(kbase[k], qpos, ctx, cls, sink, local);
    if (!dense) {
#pragma unroll
      for (int k = 0; k < NU; ++k)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const bool ok = key_visible(kbase[k] + n * 8 + 2 * t4 + j, qpos, ctx, cls, sink, local);
            if (!ok) s[k][n][j] = s[k][n][2 + j] = LSERVE_NEG_INF;
          }
    }
    // Online softmax over the step's NU * 16 keys: one max (two shuffles), one alpha and one O rescale per step.
    float alphas[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m_run[h];
#pragma unroll
      for (int k = 0; k < NU; ++k)
        mx = fmaxf(mx, fmaxf(fmaxf(s[k][0][2 * h], s[k][0][2 * h + 1]), fmaxf(s[k][1][2 * h], s[k][1][2 * h + 1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = mx == LSERVE_NEG_INF ? 0.f : mx;
      const float alpha = fast_exp2((m_run[h] - m_use) * scale_log2);
      const float mb = m_use * scale_log2;
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < NU; ++k)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float p = fast_exp2(fmaf(s[k][n][2 * h + j], scale_log2, -mb));
            s[k][n][2 * h + j] = p;
            sum += p;
          }
      l_run[h] = l_run[h] * alpha + sum;
      m_run[h] = mx;
      alphas[h] = alpha;
    }
    // Rescale O only when a running max of the warp moved (alpha = exp2(0) = 1 exactly otherwise): after the
    // first steps of a range it rarely does, which saves 2 * D / 2 multiplies per step.
    if (__any_sync(0xffffffffu, alphas[0] != 1.f || alphas[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        o[n][0] *= alphas[0];
        o[n][1] *= alphas[0];
        o[n][2] *= alphas[1];
        o[n][3] *= alphas[1];
      }
      if constexpr (V_OFF) po[0] *= alphas[0], po[1] *= alphas[0], po[2] *= alphas[1], po[3] *= alphas[1];
    }
    // O += P V per unit: B fragment of n-tile nt = channel g * D/8 + nt of keys 2 t4, 2 t4 + 1 (b0) and + 8 (b1)
#pragma unroll
    for (int k = 0; k < NU; ++k) {
      const unsigned char* rv = wbase + STAGES * UNIT + (cur * NU + k) * UNIT;
      const f16_t* svh = reinterpret_cast<const f16_t*>(rv + F::VBYTES);
      if constexpr (!F::Q4) {  // fold the per-token V scale into p. A masked key (p = 0) must give exactly 0
        // whatever its row holds: the scale is clamped to [0, 65504] first (fminf returns 65504 for NaN), once per
        // key rather than a select per probability; written rows' scales are finite and >= 0, unchanged by it.
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const u32 h = *reinterpret_cast<const u32*>(svh + 8 * n + 2 * t4);
          constexpr float G = F::UNITS * F::PGAIN;
          const float v0 = fmaxf(fminf(lskv::h2f((unsigned short)(h & 0xffffu)), 65504.f), 0.f) * G;
          const float v1 = fmaxf(fminf(lskv::h2f((unsigned short)(h >> 16)), 65504.f), 0.f) * G;
#pragma unroll
          for (int r = 0; r < 2; ++r) s[k][n][2 * r] *= v0, s[k][n][2 * r + 1] *= v1;
        }
      }
      u32 pa[4];
      pa[0] = pack_half2(s[k][0][0], s[k][0][1]);
      pa[1] = pack_half2(s[k][0][2], s[k][0][3]);
      pa[2] = pack_half2(s[k][1][0], s[k][1][1]);
      pa[3] = pack_half2(s[k][1][2], s[k][1][3]);
      u32 vw[4][VW];
      u32 vs2[2] = {0u, 0u}, vc2[2] = {0u, 0u};
#pragma unroll
      for (int r = 0; r < 4; ++r) lds_v2<F::RB, F::VB>(rv, 2 * t4 + (r & 1) + 8 * (r >> 1), g * F::VB, vw[r]);
      if constexpr (F::Q4) {  // (scale, min) of keys k0 and k0 + 1 in group g * (D/8) / GROUP -> scales, mins
        const int gv = 2 * (g * (D / 8) / KV::GROUP);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int k0 = 2 * t4 + 8 * hh;
          const u32 a = *reinterpret_cast<const u32*>(svh + k0 * R::SCALES + gv);
          const u32 b = *reinterpret_cast<const u32*>(svh + (k0 + 1) * R::SCALES + gv);
          vs2[hh] = lskv::prmt(a, b, 0x5410u);
          vc2[hh] = nib4_bias(vs2[hh], lskv::prmt(a, b, 0x7632u));
        }
      }
      constexpr int PER = F::Q4 ? 8 : 4;  // n-tiles per word
#pragma unroll
      for (int w = 0; w < VW; ++w) {
        u32 b0[PER], b1[PER];
        vfrag_v2<KV>(vw[0][w], vw[1][w], vs2[0], vc2[0], b0);
        vfrag_v2<KV>(vw[2][w], vw[3][w], vs2[1], vc2[1], b1);
#pragma unroll
        for (int ii = 0; ii < PER; ++ii) mma16816(o[w * PER + ii], pa, b0[ii], b1[ii]);
      }
      if constexpr (V_OFF) mma16816(po, pa, H2_ONES, H2_ONES);
    }
    __syncwarp();  // this group is refilled GS - 1 steps later
  }
  cp_async_wait<0>();
  __syncwarp();  // every lane's copies into this warp's ring have landed: the region is free

  // ---- this warp's un-normalized O rows (column c of n-tile nt is dim c * D/8 + nt: stored un-permuted), (m, l)
  // -> its ring region; the CTA merges them (cta_merge; O carries PGAIN, divided out there)
  using M = MergeSmem<D, true>;
  float* const mo = reinterpret_cast<float*>(wbase);
  if constexpr (V_OFF) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) o[n][c] = fmaf(-1152.f, po[c], o[n][c]);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = g + 8 * h;
    if (r < nh) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < NT / 4; ++i)
          *reinterpret_cast<float4*>(mo + M::at(r, (2 * t4 + j) * NT + 4 * i)) =
              make_float4(o[4 * i][2 * h + j], o[4 * i + 1][2 * h + j], o[4 * i + 2][2 * h + j],
                          o[4 * i + 3][2 * h + j]);
      if (t4 == 0) {
        mo[M::M_OFF + r] = l > 0.f ? m_run[h] * scale_log2 : LSERVE_NEG_INF;
        mo[M::L_OFF + r] = l;
      }
    }
  }
  __syncthreads();
  cta_merge<D, true>(reinterpret_cast<const float*>(smem), DecodeSmemV2<D, STAGES, KV>::WARP_BYTES / 4, nh,
                     F::PGAIN, part_o, part_lse, ((size_t)qb * Hq + head0) * gridDim.x + blockIdx.x, gridDim.x,
                     live == 1 ? out : nullptr, (size_t)pv.qb_start[qb] * Hq + head0);
  note_live(part_live, qb, Hkv, kvh, live, out);
}

// Merge the live partials of (query block blockIdx.x, query head blockIdx.y) into the fp16 output: part_live's
// count of the first of SW slots (0: the decode kernel wrote this row itself).
// One round trip to L2: every load of a thread (the plan's two words, the live count, and the first CB_BATCH
// splits' lse and O rows) is issued before any is used. Warp w takes splits w, w + NW, ... in batches of CB_BATCH, keeping a running max
// (online softmax over the partials, as the decode warps do over keys); a lane owns 4 consecutive dims (float4,
// D / 4 lanes busy). One barrier, then thread d merges the NW warps' (max, weight sum, sum of dim d).
// Every live slot was written by the decode kernel (empty warp ranges: O = 0, lse = -inf -> weight 0).
constexpr int CB_THREADS = 256, CB_BATCH = 8;
__device__ __forceinline__ void combine_body(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                             const int* __restrict__ part_live, f16_t* __restrict__ out,
                                             const int* meta, const int* qb_start, int Hq, int Hkv, int SW, int D) {
  constexpr int NW = CB_THREADS / 32;
  extern __shared__ float cb_s[];  // [NW][D] sums | [NW] maxima | [NW] weight sums (D % 4 == 0: float4 aligned)
  float* acc_s = cb_s;
  float* m_s = acc_s + NW * D;
  float* wsum_s = m_s + NW;
  const int qb = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const size_t slot0 = ((size_t)qb * Hq + h) * SW;
  const bool active = lane * 4 < D;
  float l[CB_BATCH];
  float4 v[CB_BATCH];
  auto load = [&](int s0, int n) {  // a batch of slots s0, s0 + NW, ... below n
#pragma unroll
    for (int i = 0; i < CB_BATCH; ++i) {
      const int s = s0 + i * NW;
      l[i] = s < n ? part_lse[slot0 + s] : LSERVE_NEG_INF;
      v[i] = s < n && active ? *reinterpret_cast<const float4*>(part_o + (slot0 + s) * D + lane * 4)
                             : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  // The plan words, the live count and the first batch (slots < SW: inside the workspace, whatever the count) are
  // loaded together; slots past the count are then masked out by selects (they may hold anything, NaN included).
  const int nqb = meta[0], row = qb_start[qb], nlive = part_live[qb * Hkv + h / (Hq / Hkv)];
  load(warp, SW);
  if (qb >= nqb) return;  // CTA-uniform, before the barrier
  const int live = min(SW, nlive);
  if (live == 0) return;
  float m_run = LSERVE_NEG_INF, wsum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = warp;;) {
#pragma unroll
    for (int i = 0; i < CB_BATCH; ++i) {
      const bool in = s0 + i * NW < live;
      l[i] = in ? l[i] : LSERVE_NEG_INF;
      v[i] = in ? v[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float mb = m_run;
#pragma unroll
    for (int i = 0; i < CB_BATCH; ++i) mb = fmaxf(mb, l[i]);
    const float m_use = mb == LSERVE_NEG_INF ? 0.f : mb;  // all -inf so far: every weight below is 0
    const float a = fast_exp2(m_run - m_use);
    wsum *= a;
    acc = make_float4(acc.x * a, acc.y * a, acc.z * a, acc.w * a);
#pragma unroll
    for (int i = 0; i < CB_BATCH; ++i) {
      const float w = fast_exp2(l[i] - m_use);
      wsum += w;
      acc = make_float4(fmaf(w, v[i].x, acc.x), fmaf(w, v[i].y, acc.y), fmaf(w, v[i].z, acc.z),
                        fmaf(w, v[i].w, acc.w));
    }
    m_run = mb;
    s0 += NW * CB_BATCH;
    if (s0 >= live) break;
    load(s0, live);
  }
  if (active) *reinterpret_cast<float4*>(acc_s + warp * D + lane * 4) = acc;
  if (lane == 0) m_s[warp] = m_run, wsum_s[warp] = wsum;
  __syncthreads();
  if (tid < D) {
    float mx = m_s[0];
#pragma unroll
    for (int i = 1; i < NW; ++i) mx = fmaxf(mx, m_s[i]);
    const float m_use = mx == LSERVE_NEG_INF ? 0.f : mx;
    float a = 0.f, ws = 0.f;
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const float f = fast_exp2(m_s[i] - m_use);
      a = fmaf(f, acc_s[i * D + tid], a);
      ws = fmaf(f, wsum_s[i], ws);
    }
    out[((size_t)row * Hq + h) * D + tid] = float_to_half(ws > 0.f ? a / ws : 0.f);
  }
}

}  // namespace lsattn

// One extern "C" entry point per (head dim, ring depth, KV format); the fp16 names carry no format suffix.
// k0/v0/k1/v1: the pools' values; sk0/sv0/sk1/sv1: their fp16 scales (null for fp16).
#define LSERVE_DECODE_KERNEL(D, STAGES, KV, SUFFIX)                                                        \
  extern "C" __global__ void __launch_bounds__(lsattn::DC_THREADS) paged_attn_decode_d##D##_s##STAGES##SUFFIX( \
      const f16_t* q, const unsigned char* k0, const unsigned char* v0, const unsigned char* k1,          \
      const unsigned char* v1, const f16_t* sk0, const f16_t* sv0, const f16_t* sk1, const f16_t* sv1,     \
      float* part_o, float* part_lse, int* part_live, f16_t* out, const int* plan, int cap_qb, int cap_seq, \
      const int* head_class, const int* head_slot, int n0, int n1, const int* sel_idx, const int* sel_cnt, \
      int sel_cap, int Hq, int Hkv, int ps_shift, int n_htiles, float scale_log2, int min_units) {         \
    const lsattn::PlanView pv = lsattn::plan_view(plan, cap_qb, cap_seq);                                  \
    if (lsattn::idle_before_wait(pv, head_class, sel_idx, ps_shift, n_htiles, min_units)) return;          \
    lserve::pdl_enter();                                                                                   \
    const lsattn::KVPools pools{k0, v0, k1, v1, sk0, sv0, sk1, sv1, head_class, head_slot, n0, n1};        \
    lsattn::decode_body<D, STAGES, KV>(q, pools, part_o, part_lse, part_live, out, pv, sel_idx, sel_cnt,   \
                                       sel_cap, Hq, Hkv, ps_shift, n_htiles, scale_log2, min_units);       \
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

// v2 (register-level dequantization, LSERVE_KVQ_DECODE=v2): paged_attn_decode_v2_d<D>_s<STAGES>_<kv>, the same
// arguments; loop steps of DC_V2_NU units (32 keys: on the H200 as fast as 16-key steps for int8 and 10% faster for
// int4 at 256k, docs/KV_QUANT.md). __launch_bounds__ asks for DC_V2_MIN_CTAS CTAs per SM (the launcher reads the real
// occupancy).
constexpr int DC_V2_MIN_CTAS = 3;
constexpr int DC_V2_NU = 2;
#define LSERVE_DECODE_V2_KERNEL(D, STAGES, KV, SUFFIX)                                                     \
  extern "C" __global__ void __launch_bounds__(lsattn::DC_THREADS, DC_V2_MIN_CTAS)                         \
      paged_attn_decode_v2_d##D##_s##STAGES##SUFFIX(                                                       \
          const f16_t* q, const unsigned char* k0, const unsigned char* v0, const unsigned char* k1,      \
          const unsigned char* v1, const f16_t* sk0, const f16_t* sv0, const f16_t* sk1, const f16_t* sv1, \
          float* part_o, float* part_lse, int* part_live, f16_t* out, const int* plan, int cap_qb,        \
          int cap_seq, const int* head_class, const int* head_slot, int n0, int n1, const int* sel_idx,    \
          const int* sel_cnt, int sel_cap, int Hq, int Hkv, int ps_shift, int n_htiles, float scale_log2,  \
          int min_units) {                                                                                 \
    const lsattn::PlanView pv = lsattn::plan_view(plan, cap_qb, cap_seq);                                  \
    if (lsattn::idle_before_wait(pv, head_class, sel_idx, ps_shift, n_htiles, min_units)) return;          \
    lserve::pdl_enter();                                                                                   \
    const lsattn::KVPools pools{k0, v0, k1, v1, sk0, sv0, sk1, sv1, head_class, head_slot, n0, n1};        \
    lsattn::decode_body_v2<D, STAGES, KV, DC_V2_NU>(q, pools, part_o, part_lse, part_live, out, pv, sel_idx, \
                                                    sel_cnt, sel_cap, Hq, Hkv, ps_shift, n_htiles,         \
                                                    scale_log2, min_units);                                \
  }
// Ring depths (cuda_attention.DECODE_V2_STAGES): int8 6 (2 CTAs per SM at D 128; 2% faster than 4 and 3 CTAs, 8 was
// slower), int4 6 (its units are small: 3 CTAs per SM at D 128), fp8 4.
LSERVE_DECODE_V2_KERNEL(64, 6, lskv::Int8, _int8)
LSERVE_DECODE_V2_KERNEL(128, 6, lskv::Int8, _int8)
LSERVE_DECODE_V2_KERNEL(64, 6, lskv::Int4, _int4)
LSERVE_DECODE_V2_KERNEL(128, 6, lskv::Int4, _int4)
LSERVE_DECODE_V2_KERNEL(64, 4, lskv::Fp8, _fp8)
LSERVE_DECODE_V2_KERNEL(128, 4, lskv::Fp8, _fp8)

extern "C" __global__ void __launch_bounds__(lsattn::CB_THREADS)
    paged_attn_decode_combine(const float* part_o, const float* part_lse, const int* part_live, f16_t* out,
                              const int* meta, const int* qb_start, int Hq, int Hkv, int SW, int D) {
  lserve::pdl_enter();
  lsattn::combine_body(part_o, part_lse, part_live, out, meta, qb_start, Hq, Hkv, SW, D);
}
