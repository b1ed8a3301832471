// Block-sparse paged flash attention for prefill (and chunked prefill): executes an AttentionPlan.
// References: lserve_lite/backends/reference/attention.py::paged_attention_ref (dense mode),
// lserve_lite/backends/reference/attention.py::paged_attention_sparse_ref (two pools); launcher: lserve_lite/backends/cuda_attention.py.
//
// One CTA (4 warps) computes BM = 64 * MT query rows of one query block against the KV pages that the plan
// lists for (query block, class of the KV head). The BM rows are the block's rows for one or several query
// heads of the same GQA group ("rows_per_head" rows each), so each K/V tile loaded into shared memory serves
// every head packed into the CTA. A warp owns 16 * MT rows; tiles of BN keys (64) are gathered from the page
// list (any power-of-two page size >= 16: a tile is several small pages or half a 128-token page) with
// cp.async into a double buffer, so the next tile is in flight while this one is computed (one CTA barrier
// per tile).
// S = Q K^T and O += P V run on mma.sync m16n8k16 (fp16 in, fp32 accumulate); the softmax is online in fp32
// (base 2, scale folded in). The element mask (causal, context end, streaming sink/local window) is applied
// only to tiles that straddle a boundary; a tile that is visible to every row of the CTA skips it.
// LServe: a KV head of class c reads pool c at row head_slot[g] (dense and streaming heads in one launch);
// the streaming window (sink, local) is per query block.
// Quantized caches (KV = lskv::Int8 / Int4 / Fp8): tiles travel as stored (values + fp16 scales) through the
// same double buffer, and after the tile barrier the CTA dequantizes the current one into fp16 K and V tiles
// (a second barrier) that the mma steps read.
#include "attention_common.cuh"

namespace lsattn {

constexpr int PF_THREADS = 128;

template <int D, int MT, int BN, class KV>
struct PrefillSmem {
  static constexpr int CH = D / 8;           // 16-byte chunks per row
  static constexpr int BM = 64 * MT;         // query rows per CTA
  static constexpr int Q_BYTES = BM * D * 2;
  static constexpr int KV_BYTES = BN * D * 2;  // one fp16 K (or V) tile
  // a tile as stored (K and V alike)
  static constexpr int RAW_BYTES = KV::QUANT ? BN / 16 * Staged<KV, D>::UNIT : KV_BYTES;
  static constexpr int OFF_K = Q_BYTES;                    // 2 stages of K
  static constexpr int OFF_V = OFF_K + 2 * RAW_BYTES;      // 2 stages of V
  static constexpr int OFF_KT = (OFF_V + 2 * RAW_BYTES + 255) / 256 * 256;  // quantized: fp16 K, V tiles
  static constexpr int OFF_KPOS = KV::QUANT ? OFF_KT + 2 * KV_BYTES : OFF_V + 2 * KV_BYTES;  // 2 stages x BN key positions
  static constexpr int OFF_QPOS = OFF_KPOS + 2 * BN * 4;  // BM query positions
  static constexpr int BYTES = OFF_QPOS + BM * 4;
};

template <int D, int MT, int BN, class KV>
__device__ __forceinline__ void prefill_body(const f16_t* __restrict__ q, const KVPools pools,
                                             f16_t* __restrict__ out, const PlanView pv, int Hq, int Hkv,
                                             int ps_shift, int rows_per_head, int heads_per_cta,
                                             int n_sub, int hgroups, float scale_log2) {
  using L = PrefillSmem<D, MT, BN, KV>;
  constexpr int CH = L::CH, BM = L::BM;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  u32 s_base;
  unsigned char* smem = align_smem256(smem_raw, s_base);
  const u32 sQ = s_base, sK = s_base + L::OFF_K, sV = s_base + L::OFF_V;
  int* kpos_s = reinterpret_cast<int*>(smem + L::OFF_KPOS);
  int* qpos_s = reinterpret_cast<int*>(smem + L::OFF_QPOS);  // read only in masked tiles

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Heaviest (latest) query blocks first: causal work grows with the block index.
  const int xi = gridDim.x - 1 - blockIdx.x;
  const int qb = xi / n_sub, sub = xi % n_sub;
  if (qb >= pv.meta[0]) return;
  const int kvh = blockIdx.y / hgroups, hg = blockIdx.y % hgroups;
  const int group = Hq / Hkv;
  const int q_len = pv.qb_len[qb], pos0 = pv.qb_pos[qb], tok0 = pv.qb_start[qb];
  const int row0 = sub * rows_per_head;  // first row of the block this CTA handles (per head)
  if (row0 >= q_len) return;
  const int ctx = pv.seq_ctx[pv.qb_seq[qb]];
  const int sink = pv.qb_sink[qb], local = pv.qb_local[qb];
  const int cls = pools.head_class[kvh];
  // This KV head's rows in the pool of its class.
  const unsigned char* __restrict__ kc = cls ? pools.k1 : pools.k0;
  const unsigned char* __restrict__ vc = cls ? pools.v1 : pools.v0;
  const f16_t* __restrict__ kcs = cls ? pools.sk1 : pools.sk0;
  const f16_t* __restrict__ vcs = cls ? pools.sv1 : pools.sv0;
  const int pool_heads = cls ? pools.n1 : pools.n0, slot = pools.head_slot[kvh];
  const int lo = pv.kv_indptr[qb * 2 + cls], npages = pv.kv_indptr[qb * 2 + cls + 1] - lo;
  const int ps = 1 << ps_shift;
  const int nkeys = npages << ps_shift;
  const int ntiles = (nkeys + BN - 1) / BN;
  const int q_min = pos0 + row0, q_max = pos0 + min(q_len, row0 + rows_per_head) - 1;

  // Row r of the CTA -> (head, block row); invalid rows are zero-filled and never written.
  auto row_info = [&](int r, int& head, int& i) -> bool {
    const int hl = r / rows_per_head;
    i = row0 + r % rows_per_head;
    const int hig = hg * heads_per_cta + hl;
    head = kvh * group + hig;
    return hl < heads_per_cta && hig < group && i < q_len;
  };

  // ---- Q tile -> shared memory
  constexpr int ROWS_PER_PASS = PF_THREADS / CH;  // a pass of 16-byte copies covers this many rows
  const int c_ld = tid % CH, r_ld = tid / CH;      // this thread's chunk, and its row in each pass
#pragma unroll
  for (int it = 0; it < BM / ROWS_PER_PASS; ++it) {
    const int r = r_ld + it * ROWS_PER_PASS, c = c_ld;
    int head, i;
    const bool ok = row_info(r, head, i);
    const f16_t* src = ok ? q + ((size_t)(tok0 + i) * Hq + head) * D + c * 8 : q;
    cp_async16(sQ + swz<CH>(r, c), src, ok ? 16 : 0);
  }

  // ---- K/V tile loader: tile j of the page list -> stage st
  auto load_kv = [&](int j, int st) {
    if constexpr (KV::QUANT) {  // BN / 16 units of 16 rows (one page each); threads split 4 units x 32 lanes
      for (int u = warp; u < BN / 16; u += PF_THREADS / 32) {
        const int g = j * BN + u * 16, e = g >> ps_shift, off = g & (ps - 1);
        const bool ok = g < nkeys;
        const int2 pl = ok ? pv.kv_pl[lo + e] : make_int2(0, 0);
        const size_t row = ((size_t)pl.x * pool_heads + slot) * ps + off;
        stage_unit<KV, D>(sK + st * L::RAW_BYTES + u * Staged<KV, D>::UNIT, kc, kcs, row, ok, lane, 32);
        stage_unit<KV, D>(sV + st * L::RAW_BYTES + u * Staged<KV, D>::UNIT, vc, vcs, row, ok, lane, 32);
        if (lane < 16) kpos_s[st * BN + u * 16 + lane] = ok ? (pl.y << ps_shift) + off + lane : LSERVE_KPOS_NONE;
      }
      return;
    }
    const u32 dst0 = swz<CH>(r_ld, c_ld) + st * L::KV_BYTES;  // + it * ROWS_PER_PASS rows (same swizzle)
#pragma unroll
    for (int it = 0; it < BN / ROWS_PER_PASS; ++it) {
      const int r = r_ld + it * ROWS_PER_PASS;
      const int g = j * BN + r, e = g >> ps_shift, off = g & (ps - 1);
      const bool ok = g < nkeys;
      const int2 pl = ok ? pv.kv_pl[lo + e] : make_int2(0, 0);
      const size_t base = (((size_t)pl.x * pool_heads + slot) * ps + off) * D + c_ld * 8;
      const u32 dst = dst0 + it * ROWS_PER_PASS * CH * 16;
      cp_async16(sK + dst, reinterpret_cast<const f16_t*>(kc) + base, ok ? 16 : 0);
      cp_async16(sV + dst, reinterpret_cast<const f16_t*>(vc) + base, ok ? 16 : 0);
      if (c_ld == 0) kpos_s[st * BN + r] = ok ? (pl.y << ps_shift) + off : LSERVE_KPOS_NONE;
    }
  };

  if (ntiles > 0) load_kv(0, 0);
  cp_async_commit();

  if (tid < BM) {
    int head, i;
    row_info(tid, head, i);
    qpos_s[tid] = pos0 + i;
  }

  // Per-thread rows: mt-th m16 tile, h = 0 (row g) or 1 (row g + 8).
  const int g = lane >> 2, t4 = lane & 3;
  const int wrow = warp * 16 * MT;
  float o[MT][D / 8][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = LSERVE_NEG_INF;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  // ldmatrix row addresses of this lane (lm: which 8x8 matrix it addresses, lr: the row in it). With the
  // (row % 8) swizzle, chunk 2*kk + x of a row sits at byte ((2*kk) ^ (x ^ row%8)) * 16 = (x ^ row%8) * 16
  // ^ kk * 32: one per-lane address (tiles are 256-byte aligned), XORed with a constant per k step.
  constexpr int ROW_BYTES = CH * 16;
  const int lm = lane >> 3, lr = lane & 7;
  const u32 q_off = (wrow + (lane & 15)) * ROW_BYTES + (((lane >> 4) ^ lr) * 16);
  const u32 k_off = ((lm >> 1) * 8 + lr) * ROW_BYTES + (((lm & 1) ^ lr) * 16);
  const u32 v_off = ((lm & 1) * 8 + lr) * ROW_BYTES + (((lm >> 1) ^ lr) * 16);

  for (int j = 0; j < ntiles; ++j) {
    // One barrier per tile: after it, tile j has landed for every thread and every warp is done with tile
    // j - 1, whose stage then takes the prefetch of tile j + 1 (in flight while tile j is computed).
    const int st = j & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < ntiles) load_kv(j + 1, st ^ 1);
    cp_async_commit();
    u32 kt = sK + st * L::KV_BYTES, vt = sV + st * L::KV_BYTES;
    if constexpr (KV::QUANT) {  // the staged tile -> fp16 tiles (every warp was done with them at the barrier)
      dequant_tile<KV, D, BN>(smem + L::OFF_K + st * L::RAW_BYTES, smem + L::OFF_KT, tid, PF_THREADS);
      dequant_tile<KV, D, BN>(smem + L::OFF_V + st * L::RAW_BYTES, smem + L::OFF_KT + L::KV_BYTES, tid, PF_THREADS);
      __syncthreads();
      kt = s_base + L::OFF_KT;
      vt = kt + L::KV_BYTES;
    }

    // Does any element of this tile need the mask? (uniform over the CTA)
    const int* kp = kpos_s + st * BN;
    const int nvalid = min(BN, nkeys - j * BN);
    const int kmin = kp[0], kmax = kp[nvalid - 1];  // lists are sorted by logical page
    bool need_mask = nvalid < BN || kmax > q_min || kmax >= ctx;
    if (cls) need_mask = need_mask || !(kmax < sink || q_max - kmin < local);

    // ---- S = Q K^T  (per warp: 16*MT rows x 64 keys)
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
    const u32 q_addr = opaque(sQ + q_off);
    const u32 k_addr = opaque(kt + k_off), v_addr = opaque(vt + v_off);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], (q_addr + mt * 16 * ROW_BYTES) ^ (kk * 32));
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        u32 b[4];
        ldmatrix_x4(b, (k_addr + np * 16 * ROW_BYTES) ^ (kk * 32));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(s[mt][2 * np], a[mt], b[0], b[1]);
          mma16816(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int qp = qpos_s[wrow + mt * 16 + g + 8 * h];
#pragma unroll
          for (int n = 0; n < BN / 8; ++n) {
            const int2 k2 = *reinterpret_cast<const int2*>(kp + n * 8 + 2 * t4);
            if (!key_visible(k2.x, qp, ctx, cls, sink, local)) s[mt][n][2 * h] = LSERVE_NEG_INF;
            if (!key_visible(k2.y, qp, ctx, cls, sink, local)) s[mt][n][2 * h + 1] = LSERVE_NEG_INF;
          }
        }
    }

    // ---- online softmax (fp32, base 2); P is packed to fp16 A fragments as it is computed
    u32 pa[MT][BN / 16][4];
    float alpha[MT][2];
    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = m_run[mt][h];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == LSERVE_NEG_INF ? 0.f : mx;  // a row with nothing visible yet
        alpha[mt][h] = fast_exp2((m_run[mt][h] - m_use) * scale_log2);
        rescale |= mx != m_run[mt][h];
        const float mb = m_use * scale_log2;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
          const float p0 = fast_exp2(fmaf(s[mt][n][2 * h], scale_log2, -mb));
          const float p1 = fast_exp2(fmaf(s[mt][n][2 * h + 1], scale_log2, -mb));
          sum += p0 + p1;
          // C fragment (row g + 8h, keys n*8 + 2*t4 + {0,1}) -> A fragment register (n & 1) * 2 + h
          pa[mt][n >> 1][(n & 1) * 2 + h] = pack_half2(p0, p1);
        }
        l_run[mt][h] = l_run[mt][h] * alpha[mt][h] + sum;
        m_run[mt][h] = mx;
      }
    // Rescale O only when a running max moved in this warp (after the first tiles it rarely does); an
    // unchanged max has alpha == 1 exactly, so skipping is exact.
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[mt][n][0] *= alpha[mt][0];
          o[mt][n][1] *= alpha[mt][0];
          o[mt][n][2] *= alpha[mt][1];
          o[mt][n][3] *= alpha[mt][1];
        }
    }

    // ---- O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        u32 b[4];
        ldmatrix_x4_trans(b, (v_addr + kk * 16 * ROW_BYTES) ^ (dp * 32));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(o[mt][2 * dp], pa[mt][kk], b[0], b[1]);
          mma16816(o[mt][2 * dp + 1], pa[mt][kk], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // Q has landed (ntiles == 0) and no warp still reads K/V before the smem reuse below

  // ---- normalize, stage this warp's rows through its own Q rows in smem, 16-byte coalesced stores
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mt][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int r = wrow + mt * 16 + g + 8 * h;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const u32 v = pack_half2(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
        *reinterpret_cast<u32*>(smem + swz<CH>(r, n) + t4 * 4) = v;
      }
    }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 16 * MT * CH / 32; ++it) {
    const int idx = lane + it * 32, r = wrow + idx / CH, c = idx % CH;
    int head, i;
    if (row_info(r, head, i)) {
      const uint4 v = *reinterpret_cast<const uint4*>(smem + swz<CH>(r, c));
      *reinterpret_cast<uint4*>(out + ((size_t)(tok0 + i) * Hq + head) * D + c * 8) = v;
    }
  }
}

}  // namespace lsattn

// One extern "C" entry point per (head dim, row tiles per warp, key tile): no name mangling.
// k0/v0/k1/v1: the pools' values; sk0/sv0/sk1/sv1: their fp16 scales (null for fp16).
#define LSERVE_PREFILL_KERNEL(D, MT, BN, KV, SUFFIX)                                                        \
  extern "C" __global__ void __launch_bounds__(lsattn::PF_THREADS, 2)                                      \
      paged_attn_prefill_d##D##_m##MT##_n##BN##SUFFIX(                                                     \
          const f16_t* q, const unsigned char* k0, const unsigned char* v0, const unsigned char* k1,      \
          const unsigned char* v1, const f16_t* sk0, const f16_t* sv0, const f16_t* sk1, const f16_t* sv1, \
          f16_t* out, const int* plan, int cap_qb, int cap_seq, const int* head_class, const int* head_slot, \
          int n0, int n1, int Hq, int Hkv, int ps_shift, int rows_per_head, int heads_per_cta, int n_sub,  \
          int hgroups, float scale_log2) {                                                                 \
    lserve::pdl_enter();                                                                                   \
    const lsattn::KVPools pools{k0, v0, k1, v1, sk0, sv0, sk1, sv1, head_class, head_slot, n0, n1};        \
    lsattn::prefill_body<D, MT, BN, KV>(q, pools, out, lsattn::plan_view(plan, cap_qb, cap_seq), Hq, Hkv,   \
                                        ps_shift, rows_per_head, heads_per_cta, n_sub, hgroups, scale_log2); \
  }

// Key tile BN = 64 (one default page); d128_m2_n32 is a register-lighter variant measured beside it.
LSERVE_PREFILL_KERNEL(64, 1, 64, lskv::Half, )
LSERVE_PREFILL_KERNEL(64, 2, 64, lskv::Half, )
LSERVE_PREFILL_KERNEL(128, 1, 64, lskv::Half, )
LSERVE_PREFILL_KERNEL(128, 2, 64, lskv::Half, )
LSERVE_PREFILL_KERNEL(128, 2, 32, lskv::Half, )
// Quantized caches: the launcher's key tiles (PREFILL_BN) only.
LSERVE_PREFILL_KERNEL(64, 1, 64, lskv::Int8, _int8)
LSERVE_PREFILL_KERNEL(64, 2, 64, lskv::Int8, _int8)
LSERVE_PREFILL_KERNEL(128, 1, 64, lskv::Int8, _int8)
LSERVE_PREFILL_KERNEL(128, 2, 64, lskv::Int8, _int8)
LSERVE_PREFILL_KERNEL(64, 1, 64, lskv::Int4, _int4)
LSERVE_PREFILL_KERNEL(64, 2, 64, lskv::Int4, _int4)
LSERVE_PREFILL_KERNEL(128, 1, 64, lskv::Int4, _int4)
LSERVE_PREFILL_KERNEL(128, 2, 64, lskv::Int4, _int4)
LSERVE_PREFILL_KERNEL(64, 1, 64, lskv::Fp8, _fp8)
LSERVE_PREFILL_KERNEL(64, 2, 64, lskv::Fp8, _fp8)
LSERVE_PREFILL_KERNEL(128, 1, 64, lskv::Fp8, _fp8)
LSERVE_PREFILL_KERNEL(128, 2, 64, lskv::Fp8, _fp8)
