// LServe's query-aware page selector for dense KV heads at decode, on the GPU (no host round trip).
// Reference: lserve_lite/backends/reference/page_select.py::select_pages_ref (scores: sparse/selector.py::page_scores,
// top-k: sparse/selector.py::top_pages); launcher: lserve_lite/backends/cuda_attention.py::select_pages.
//
// Two launches per layer, both graph-capturable (every count and flag is read from the device plan, so the
// same graph serves refresh steps and reuse steps: blocks without qb_keep > 0 and qb_refresh = 1 exit):
//   page_score<D>: per (query block, dense KV head, physical page of its class-0 list):
//       logical bound = sum_c max(q_c * kmax_c, q_c * kmin_c) per query head, page bound = max over its
//       logical pages holding a valid token. group_reduce max (plan meta[4] = 0): the max over the GQA group
//       -> scores[g][0][lo + e]; mass (1): each head's bound / sqrt(D) -> scores[g][h][lo + e] (fp32).
//       One warp per physical page, grid-stride; a lane reads 8 channels (16 bytes) of kmax and of kmin.
//   page_topk: per (query block, dense KV head): (mass: per head the logsumexp over the list, then each
//       entry's logsumexp over the group of bound - that, in place into scores[g][0]) radix select of the
//       (keep - 1)-th largest score among all entries but the newest (4 passes of 8 bits), then the entries
//       above it and the lowest-index ties, in index order, then the newest entry -> sel_idx[slot, g, :keep]
//       (ascending), sel_cnt = keep. When the list fits the budget: every entry.
// Key statistics kmax/kmin [pages, n_dense, sub_pages, D] are fp16 (exact: keys are stored in fp16).
#include "attention_common.cuh"

namespace lsattn {

__device__ __forceinline__ float h2f(f16_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// Early exit shared by both kernels: does (qb, g) refresh its selection this step? Sets lo, npages, keep.
__device__ __forceinline__ bool selects_now(const PlanView& pv, const int* head_class, int qb, int g, int& lo,
                                            int& npages, int& keep) {
  if (qb >= pv.meta[0] || head_class[g] != 0) return false;
  keep = pv.qb_keep[qb];
  if (keep <= 0 || pv.qb_refresh[qb] == 0) return false;
  lo = pv.kv_indptr[qb * 2];
  npages = pv.kv_indptr[qb * 2 + 1] - lo;
  return true;
}

constexpr int PS_THREADS = 128;

template <int D>
__device__ __forceinline__ void page_score_body(const f16_t* __restrict__ q, const f16_t* __restrict__ kmax,
                                                const f16_t* __restrict__ kmin, const PlanView pv,
                                                const int* __restrict__ head_class,
                                                const int* __restrict__ head_slot, int nd, int sub,
                                                float* __restrict__ scores, int cap_nnz, int Hq, int Hkv,
                                                int ps_shift) {
  static_assert(D / 8 <= 32, "a logical page's channels fit one warp");
  constexpr int LP = D / 8;         // lanes per logical page (16 bytes of channels each)
  constexpr int PER_IT = 32 / LP;   // logical pages per warp iteration
  extern __shared__ float qs[];     // [group][D] fp32
  const int qb = blockIdx.y, g = blockIdx.z;
  int lo, npages, keep;
  if (!selects_now(pv, head_class, qb, g, lo, npages, keep) || npages <= keep) return;
  const int group = Hq / Hkv, tok = pv.qb_start[qb];
  const int ctx = pv.seq_ctx[pv.qb_seq[qb]];
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) qs[i] = h2f(q[((size_t)tok * Hq + g * group) * D + i]);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int lp_shift = ps_shift - (31 - __clz(sub));  // log2 tokens per logical page
  const int slot = head_slot[g], c8 = lane % LP;
  const bool mass = pv.meta[4] == 1;  // uniform: the head bounds are kept apart (lane h keeps head h's)
  float* out = scores + (size_t)g * group * cap_nnz + lo;
  for (int e = blockIdx.x * nwarps + warp; e < npages; e += gridDim.x * nwarps) {
    const int2 pl = pv.kv_pl[lo + e];
    const size_t base = ((size_t)pl.x * nd + slot) * sub * D;
    float best = LSERVE_NEG_INF, mine = LSERVE_NEG_INF;
#pragma unroll 4
    for (int s0 = 0; s0 < sub; s0 += PER_IT) {
      const int ls = s0 + lane / LP;
      const bool in = ls < sub;
      const bool valid = in && (pl.y << ps_shift) + (ls << lp_shift) < ctx;
      uint4 hx = make_uint4(0, 0, 0, 0), hn = make_uint4(0, 0, 0, 0);
      if (in) {
        hx = *reinterpret_cast<const uint4*>(kmax + base + ls * D + c8 * 8);
        hn = *reinterpret_cast<const uint4*>(kmin + base + ls * D + c8 * 8);
      }
      float kx[8], kn[8];
      const u32 wx[4] = {hx.x, hx.y, hx.z, hx.w}, wn[4] = {hn.x, hn.y, hn.z, hn.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        kx[2 * j] = h2f((f16_t)(wx[j] & 0xffff));
        kx[2 * j + 1] = h2f((f16_t)(wx[j] >> 16));
        kn[2 * j] = h2f((f16_t)(wn[j] & 0xffff));
        kn[2 * j + 1] = h2f((f16_t)(wn[j] >> 16));
      }
      float lbest = LSERVE_NEG_INF;
      for (int h = 0; h < group; ++h) {
        const float* qh = qs + h * D + c8 * 8;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc += fmaxf(qh[j] * kx[j], qh[j] * kn[j]);
#pragma unroll
        for (int o = LP / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        lbest = fmaxf(lbest, acc);
        if (mass) {  // head h's bound over this iteration's valid logical pages, kept by lane h
          float v = valid ? acc : LSERVE_NEG_INF;
#pragma unroll
          for (int o = 16; o >= LP; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
          if (lane == h) mine = fmaxf(mine, v);
        }
      }
      if (valid) best = fmaxf(best, lbest);
    }
    if (mass) {
      if (lane < group) out[(size_t)lane * cap_nnz + e] = mine * rsqrtf((float)D);
      continue;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
    if (lane == 0) out[e] = best;
  }
}

constexpr int TK_THREADS = 512;
constexpr int TK_WARPS = TK_THREADS / 32;

// Order-preserving map float -> u32 (a larger float gets a larger key).
__device__ __forceinline__ u32 order_key(float f) {
  const u32 u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive count of `flag` over the threads before this one (thread order); `total` = the CTA's count.
__device__ __forceinline__ int cta_exclusive_count(bool flag, int* warp_sums, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const u32 b = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_sums[warp] = __popc(b);
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < TK_WARPS; ++w) {
    const int c = warp_sums[w];
    before += w < warp ? c : 0;
    all += c;
  }
  __syncthreads();
  total = all;
  return before + __popc(b & ((1u << lane) - 1u));
}

// (m, z) of a logsumexp m + log z, merged with another.
__device__ __forceinline__ void lse_merge(float& m, float& z, float m2, float z2) {
  const float mx = fmaxf(m, m2);
  if (mx == LSERVE_NEG_INF) return;
  z = z * expf(m - mx) + z2 * expf(m2 - mx);
  m = mx;
}

// group_reduce mass: rows h = 0..group-1 of bounds b[h][i] (i < n) -> row 0 holds
// logsumexp_h(b[h][i] - logsumexp_i b[h][i]), the log of the group's summed softmax weight of entry i.
__device__ void group_mass_scores(float* __restrict__ s, int n, int group, int cap_nnz, float* red) {
  __shared__ float s_lse[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int h = 0; h < group; ++h) {
    const float* b = s + (size_t)h * cap_nnz;
    float m = LSERVE_NEG_INF, z = 0.f;
    for (int i = tid; i < n; i += TK_THREADS) lse_merge(m, z, b[i], 1.f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      lse_merge(m, z, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, z, o));
    if (lane == 0) red[2 * warp] = m, red[2 * warp + 1] = z;
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < TK_WARPS; ++w) lse_merge(m, z, red[2 * w], red[2 * w + 1]);
      s_lse[h] = m + logf(z);
    }
    __syncthreads();
  }
  for (int i = tid; i < n; i += TK_THREADS) {
    float m = LSERVE_NEG_INF, z = 0.f;
    for (int h = 0; h < group; ++h) lse_merge(m, z, s[(size_t)h * cap_nnz + i] - s_lse[h], 1.f);
    s[i] = m + logf(z);
  }
  __syncthreads();
}

__device__ __forceinline__ void page_topk_body(const PlanView pv, const int* __restrict__ head_class,
                                               float* __restrict__ scores, int cap_nnz, int Hkv, int group,
                                               int* __restrict__ sel_idx, int* __restrict__ sel_cnt, int sel_cap) {
  __shared__ int hist[256];
  __shared__ int warp_sums[TK_WARPS];
  __shared__ u32 s_prefix;
  __shared__ int s_need;
  const int qb = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;
  int lo, npages, keep;
  if (!selects_now(pv, head_class, qb, g, lo, npages, keep)) return;
  keep = min(keep, sel_cap);
  const int row = pv.qb_slot[qb] * Hkv + g;
  int* out = sel_idx + (size_t)row * sel_cap;
  if (npages <= keep) {  // the context fits the budget: every page
    for (int i = tid; i < npages; i += TK_THREADS) out[i] = i;
    if (tid == 0) sel_cnt[row] = npages;
    return;
  }
  float* s = scores + (size_t)g * group * cap_nnz + lo;
  const int n = npages - 1, k = keep - 1;  // candidates (all but the newest), how many of them to keep
  if (pv.meta[4] == 1) {
    __shared__ float red[2 * TK_WARPS];
    group_mass_scores(s, npages, group, cap_nnz, red);
  }
  if (k > 0) {
    // ---- radix select: the key of the k-th largest candidate, and how many of its ties to take
    u32 prefix = 0, mask = 0;
    int need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += TK_THREADS) hist[i] = 0;
      __syncthreads();
      for (int i = tid; i < n; i += TK_THREADS) {
        const u32 key = order_key(s[i]);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1);
      }
      __syncthreads();
      if (tid < 32) {  // bins from the top: lane l sums bins 255 - 8l .. 248 - 8l
        int c[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += (c[j] = hist[255 - 8 * tid - j]);
        int incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int t = __shfl_up_sync(0xffffffffu, incl, o);
          if (tid >= o) incl += t;
        }
        const bool hit = incl >= need && incl - sum < need;
        if (hit) {
          int above = incl - sum, j = 0;
          while (above + c[j] < need) above += c[j++];
          s_prefix = prefix | ((u32)(255 - 8 * tid - j) << shift);
          s_need = need - above;
        }
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
      mask |= 255u << shift;
      __syncthreads();
    }
    // ---- compaction in index order: keys above the threshold, and the first `need` ties
    int taken = 0, ties = 0;
    for (int b0 = 0; b0 < n; b0 += TK_THREADS) {
      const int i = b0 + tid;
      const u32 key = i < n ? order_key(s[i]) : 0u;
      const bool tie = i < n && key == prefix;
      int nt;
      const int tie_rank = ties + cta_exclusive_count(tie, warp_sums, nt);
      ties += nt;
      const bool take = i < n && (key > prefix || (tie && tie_rank < need));
      int nk;
      const int pos = taken + cta_exclusive_count(take, warp_sums, nk);
      if (take) out[pos] = i;
      taken += nk;
    }
  }
  if (tid == 0) {
    out[k] = n;  // the newest page, always
    sel_cnt[row] = k + 1;
  }
}

}  // namespace lsattn

#define LSERVE_PAGE_SCORE_KERNEL(D)                                                                         \
  extern "C" __global__ void __launch_bounds__(lsattn::PS_THREADS) page_score_d##D(                          \
      const f16_t* q, const f16_t* kmax, const f16_t* kmin, const int* plan, int cap_qb, int cap_seq,       \
      const int* head_class, const int* head_slot, int nd, int sub, float* scores, int cap_nnz, int Hq,     \
      int Hkv, int ps_shift) {                                                                             \
    lserve::pdl_enter();                                                                                   \
    lsattn::page_score_body<D>(q, kmax, kmin, lsattn::plan_view(plan, cap_qb, cap_seq), head_class,         \
                               head_slot, nd, sub, scores, cap_nnz, Hq, Hkv, ps_shift);                    \
  }

LSERVE_PAGE_SCORE_KERNEL(64)
LSERVE_PAGE_SCORE_KERNEL(128)

extern "C" __global__ void __launch_bounds__(lsattn::TK_THREADS)
    page_topk(const int* plan, int cap_qb, int cap_seq, const int* head_class, float* scores, int cap_nnz,
              int Hkv, int group, int* sel_idx, int* sel_cnt, int sel_cap) {
  lserve::pdl_enter();
  lsattn::page_topk_body(lsattn::plan_view(plan, cap_qb, cap_seq), head_class, scores, cap_nnz, Hkv, group,
                         sel_idx, sel_cnt, sel_cap);
}
