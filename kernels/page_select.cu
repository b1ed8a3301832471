// LServe's query-aware page selector for dense KV heads at decode, on the GPU (no host round trip).
// Reference: lserve_lite/backends/reference/page_select.py::select_pages_ref (scores: sparse/selector.py::page_scores,
// top-k: sparse/selector.py::top_pages); launcher: lserve_lite/backends/cuda_attention.py::select_pages.
//
// Two launches per layer, both graph-capturable (every count and flag is read from the device plan, so the
// same graph serves refresh steps and reuse steps: blocks without qb_keep > 0 and qb_refresh = 1 exit; the
// launch shapes depend on the plan's capacity only):
//   page_score<D>: per (query block, dense KV head, physical page of its class-0 list):
//       logical bound = sum_c max(q_c * kmax_c, q_c * kmin_c) per query head, page bound = max over its
//       logical pages holding a valid token. group_reduce max (plan meta[4] = 0): the max over the GQA group
//       -> scores[g][0][lo + e]; mass (1): each head's bound / sqrt(D) -> scores[g][h][lo + e] (fp32), and
//       the CTA's logsumexp partial (m, z) of each head over the pages it scored -> lse_part[qb][g][h][cta].
//       CTAs of 8 warps, one warp per physical page (grid-stride; the launcher sizes the grid so that the
//       lists of every dense head share one wave of CTAs: score_grid_x). The plan fields come in one round of loads, then the
//       context length, the query and the page-table entries of a warp's next 32 pages in a second; each
//       page is then one DRAM round trip: a lane issues all of its 16-byte loads of kmax / kmin for the page
//       (up to PS_BATCH warp iterations) before any math. The query sits in shared memory as fp32
//       max(q, 0) / min(q, 0) (two FMAs a channel), laid out without bank conflicts and read once per head
//       for the whole batch, whose two half-page sums are reduced together (sum_pair): shared-memory and
//       shuffle traffic, not DRAM, bounded the previous version.
//   page_topk: one CTA of 512 threads per (query block, dense KV head), over the n = npages - 1 candidates
//       (all entries but the newest), keeping k = keep - 1 of them.
//       0. mass: each query head's logsumexp over the list, merged from page_score's partials (one barrier);
//          an entry's score is then the logsumexp over the group of its bounds minus those, as
//          sparse/selector.py, computed in a coalesced pass into shared memory (the stage) that the top-k reads.
//       1. Each thread owns a contiguous run of ceil(n / 512) entries. n <= 4096 (a 256k-token context at
//          page 64): the runs stay in registers for every step (the fast path). Longer lists (and every list
//          with mass): staged in shared memory (the launcher sizes it from the capacity, up to 16384
//          candidates) and read from there; past that every step rereads the scores from L2 (correct,
//          slower). The min and max score.
//       2. A coarse pass: 256 bins of equal width over [min, max] (a monotone map: equal scores share a bin;
//          real score distributions spread over the bins, so few shared-memory atomics collide, and the k-th
//          largest usually lands in a sparse tail bin; a thread adds a run of equal bins with one atomic, for
//          clustered lists). Warp 0 scans the histogram from the top for the bin holding the k-th largest; if
//          that bin is taken whole, the cut is known.
//       3. Otherwise refine inside that bin: radix select of 8 bits a pass on (order key - the bin's smallest
//          key), over the bits where the bin's keys differ only, stopping once a digit's bucket is taken whole
//          (at most 4 passes; usually 1). One histogram per pass, zeroed up front: a pass is its atomics and
//          two barriers (histogram complete, warp 0's answer published).
//       4. Compaction with ONE block-wide exclusive scan of per-thread (above the cut, ties) counts: entries
//          above the cut and the `need` lowest-index ties, in index order, then the newest entry
//          -> sel_idx[slot, g, :keep] (ascending), sel_cnt = keep (lists past the register tile: one scan
//          per tile of 4096, counts carried over). When the list fits the budget: every entry.
//       Scores are canonical before any comparison: NaN ranks as -inf (numpy's argsort of -scores puts it
//       last) and -0 equals +0, so ties are numpy's ties. tests/test_page_topk_plan.py emulates steps 1-4.
// Key statistics kmax/kmin [pages, n_dense, sub_pages, D] are fp16 (exact: keys are stored in fp16).
#include "attention_common.cuh"

namespace lsattn {

__device__ __forceinline__ float h2f(f16_t h) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else  // compiled as host code by tools/page_select_host_emu.cu
  return LSERVE_HOST_H2F(h);
#endif
}

// The selection job of (query block qb, KV head g), read from the device plan in one round of independent
// loads (every index is within the plan's capacity, so nothing waits on a branch): the fields of blocks past
// meta[0] are stale and are never trusted; `on` says whether g is dense and qb selects pages this step.
struct SelectJob {
  int lo, npages, keep, tok, seq, slot;
  bool on, mass;  // mass: group_reduce mass (plan meta[4] = 1), else max
};

__device__ __forceinline__ SelectJob select_job(const PlanView& pv, const int* head_class, int qb, int g) {
  const int nqb = pv.meta[0], reduce = pv.meta[4], cls = head_class[g], keep = pv.qb_keep[qb];
  const int refresh = pv.qb_refresh[qb];
  const int lo = pv.kv_indptr[qb * 2], hi = pv.kv_indptr[qb * 2 + 1];
  SelectJob j;
  j.tok = pv.qb_start[qb];
  j.seq = pv.qb_seq[qb];
  j.slot = pv.qb_slot[qb];
  j.on = qb < nqb && cls == 0 && keep > 0 && refresh != 0;
  j.mass = reduce == 1;
  j.lo = lo;
  j.npages = hi - lo;
  j.keep = keep;
  return j;
}

// ------------------------------------------------------------------------------------------------ page_score

constexpr int MASS_MAX_GROUP = 32;  // config.MASS_MAX_GROUP: query heads per KV head with group_reduce mass

// e^x for x <= 0 (e^-inf = 0): one ex2.approx on the GPU (relative error ~2^-22; the selection's tie rule
// already allows fp32 summation error), expf in the host emulation.
__device__ __forceinline__ float exp_le0(float x) {
#ifdef __CUDA_ARCH__
  return fast_exp2(x * 1.44269504088896341f);
#else
  return expf(x);
#endif
}

// (m, z) of a logsumexp m + log z, merged with another: one exponential (of minus the gap), branch-free so that
// the loads feeding a run of merges all go out before the first. m2 = -inf leaves (m, z); a NaN makes z NaN
// (the score then ranks as -inf, as numpy's would).
__device__ __forceinline__ void lse_merge(float& m, float& z, float m2, float z2) {
  const float d = m2 - m;
  const float e = m2 == LSERVE_NEG_INF ? 0.f : exp_le0(-fabsf(d));
  z = d > 0.f ? fmaf(z, e, z2) : fmaf(z2, e, z);
  m = fmaxf(m, m2);
}

__device__ __forceinline__ void warp_lse_merge(float& m, float& z) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    lse_merge(m, z, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, z, o));
}

constexpr int PS_THREADS = 256;
constexpr int PS_WARPS = PS_THREADS / 32;
constexpr int PS_BATCH = 2;  // warp iterations of a page whose loads a lane issues before any math

// The query in shared memory, fp32, as float4s [group][qp = max(q, 0) | qn = min(q, 0)][half][D / 8]: lane
// chunk c8 (channels 8 c8 .. 8 c8 + 7) reads index c8 of each of its head's four rows, so the 8 lanes of a
// 128-bit load phase read 128 consecutive bytes (no bank conflict).
template <int D>
__device__ __forceinline__ int q_at(int h, int part, int c) {  // the float index of channel c
  return ((((2 * h + part) * 2 + (c >> 2) % 2) * (D / 8) + (c >> 3)) << 2) + (c & 3);
}

// One lane's part of a logical page's bound for one query head: its 8 channels of
// sum_c max(q_c kmax_c, q_c kmin_c) = sum_c max(q_c, 0) kmax_c + min(q_c, 0) kmin_c (kmax >= kmin).
__device__ __forceinline__ float bound_part(const float4 (&q)[4], const float* kx, const float* kn) {
  const float p[8] = {q[0].x, q[0].y, q[0].z, q[0].w, q[1].x, q[1].y, q[1].z, q[1].w};
  const float m[8] = {q[2].x, q[2].y, q[2].z, q[2].w, q[3].x, q[3].y, q[3].z, q[3].w};
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) acc = fmaf(m[j], kn[j], fmaf(p[j], kx[j], acc));
  return acc;
}

__device__ __forceinline__ void unpack8(const uint4 h, float* f) {
  const u32 w[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = h2f((f16_t)(w[j] & 0xffff));
    f[2 * j + 1] = h2f((f16_t)(w[j] >> 16));
  }
}

// Sums a0 (a lane's part for batch iteration 0) and a1 (iteration 1) over the LP lanes of each logical page
// in log2(LP) shuffles, not 2 log2(LP): the first step trades halves, so lanes with bit LP / 2 set end with
// iteration 1's sum and the others with iteration 0's (shuffles share the shared-memory pipe, the score
// kernel's busiest resource).
template <int LP>
__device__ __forceinline__ float sum_pair(float a0, float a1) {
  const bool upper = threadIdx.x & (LP / 2);
  float v = (upper ? a1 : a0) + __shfl_xor_sync(0xffffffffu, upper ? a0 : a1, LP / 2);
#pragma unroll
  for (int o = LP / 4; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One physical page of a list for the whole group, by one warp: LP lanes per logical page (16 bytes of
// channels each), PER_IT logical pages per warp iteration, two iterations at a time: their loads all go out
// before any math, and each head's query (shared memory) is read once for both. Returns (through `best`)
// the group max over valid logical pages; with `mass`, lane h returns head h's own bound in `mine`.
template <int D>
__device__ __forceinline__ void score_page(const f16_t* __restrict__ kmax, const f16_t* __restrict__ kmin,
                                           size_t base, const float4* qs, int group, int sub, int first_tok,
                                           int lp_shift, int ctx, bool mass, float& best, float& mine) {
  static_assert(PS_BATCH == 2, "sum_pair reduces two iterations");
  constexpr int LP = D / 8, PER_IT = 32 / LP, ROW = D / 8;  // ROW: float4s of one q row half
  const int lane = threadIdx.x & 31, c8 = lane % LP;
  const int mb = (lane & (LP / 2)) ? 1 : 0;  // the iteration whose sums this lane holds after sum_pair
  best = mine = LSERVE_NEG_INF;
  for (int s0 = 0; s0 < sub; s0 += PER_IT * PS_BATCH) {
    uint4 hx[PS_BATCH], hn[PS_BATCH];
#pragma unroll
    for (int b = 0; b < PS_BATCH; ++b) {  // every load first: a page is one DRAM round trip, not PS_BATCH
      const int ls = s0 + b * PER_IT + lane / LP;
      hx[b] = hn[b] = make_uint4(0, 0, 0, 0);
      if (ls < sub) {
        hx[b] = *reinterpret_cast<const uint4*>(kmax + base + ls * D + c8 * 8);
        hn[b] = *reinterpret_cast<const uint4*>(kmin + base + ls * D + c8 * 8);
      }
    }
    const bool two = s0 + PER_IT < sub;  // uniform: iteration 1 has a logical page
    float kx[PS_BATCH][8], kn[PS_BATCH][8];
#pragma unroll
    for (int b = 0; b < PS_BATCH; ++b) {
      unpack8(hx[b], kx[b]);
      unpack8(hn[b], kn[b]);
    }
    const int ls = s0 + mb * PER_IT + lane / LP;  // the logical page of the sums this lane holds
    const bool valid = ls < sub && first_tok + (ls << lp_shift) < ctx;
    float lbest = LSERVE_NEG_INF;
    for (int h = 0; h < group; ++h) {
      const float4* qh = qs + 4 * h * ROW + c8;
      const float4 q[4] = {qh[0], qh[ROW], qh[2 * ROW], qh[3 * ROW]};  // qp: halves 0, 1; qn: halves 0, 1
      const float acc = sum_pair<LP>(bound_part(q, kx[0], kn[0]), two ? bound_part(q, kx[1], kn[1]) : 0.f);
      lbest = fmaxf(lbest, acc);
      if (mass) {  // head h's bound over the valid logical pages of both iterations, kept by lane h
        float v = valid ? acc : LSERVE_NEG_INF;
#pragma unroll
        for (int o = 16; o >= LP / 2; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == h) mine = fmaxf(mine, v);
      }
    }
    if (valid) best = fmaxf(best, lbest);
  }
#pragma unroll
  for (int o = 16; o >= LP / 2; o >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
}

// Pins a loaded value at this point of the program: the compiler would otherwise sink loads whose values are
// used only after the early exit below it, turning one round of loads into a chain of round trips.
__device__ __forceinline__ void issue_now(int v) { asm volatile("" ::"r"(v)); }

// mass: a logsumexp partial (m, z) per (warp, query head), lane h of a warp keeping head h's over the scores it
// writes (in shared memory: registers across score_page spill); cta_lse_part merges the warps' partials ->
// dst[h * gridDim.x + blockIdx.x], so that page_topk merges a list's gridDim.x partials instead of rereading
// every score (tools/results/gpu_2026-12-06/).
struct LsePart {
  float2 v[PS_WARPS][32];
  __device__ __forceinline__ void init() { v[threadIdx.x >> 5][threadIdx.x & 31] = make_float2(LSERVE_NEG_INF, 0.f); }
  __device__ __forceinline__ void add(float x) {
    float2& p = v[threadIdx.x >> 5][threadIdx.x & 31];
    float m = p.x, z = p.y;
    lse_merge(m, z, x, 1.f);
    p = make_float2(m, z);
  }
};

__device__ __forceinline__ void cta_lse_part(const LsePart& part, int group, float2* __restrict__ dst) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (warp == 0 && lane < group) {
    float pm = LSERVE_NEG_INF, pz = 0.f;
#pragma unroll
    for (int w = 0; w < PS_WARPS; ++w) lse_merge(pm, pz, part.v[w][lane].x, part.v[w][lane].y);
    dst[(size_t)lane * gridDim.x + blockIdx.x] = make_float2(pm, pz);
  }
}

template <int D>
__device__ __forceinline__ void page_score_body(const f16_t* __restrict__ q, const f16_t* __restrict__ kmax,
                                                const f16_t* __restrict__ kmin, const PlanView pv,
                                                const int* __restrict__ head_class,
                                                const int* __restrict__ head_slot, int nd, int sub,
                                                float* __restrict__ scores, float2* __restrict__ lse_part,
                                                int cap_nnz, int Hq, int Hkv, int ps_shift) {
  static_assert(D / 8 <= 32, "a logical page's channels fit one warp");
  extern __shared__ float4 qs[];  // the group's query, fp32 (q_at)
  const int qb = blockIdx.y, g = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Round trip 1: the job and the head's pool row. Round trip 2: the context length (qb_seq of a stale block
  // is still a sequence index below the capacity: the plan buffer only ever holds valid plans), the query and
  // the warp's first 32 page-table entries. Then each page's statistics: one round trip per page.
  const SelectJob job = select_job(pv, head_class, qb, g);
  const int slot = head_slot[g];
  issue_now(slot);
  issue_now(job.seq);
  issue_now(job.tok);
  issue_now(job.mass);
  const int ctx = pv.seq_ctx[job.seq];
  if (!job.on || job.npages <= job.keep) return;
  const int group = Hq / Hkv, npages = job.npages;
  const int stride = gridDim.x * PS_WARPS;  // warps on one list
  // lane j holds the page-table entry of the warp's j-th page from e0 (32 pages per load)
  auto fetch_pl = [&](int e0) {
    const int e = e0 + lane * stride;
    return e < npages ? pv.kv_pl[job.lo + e] : make_int2(0, 0);
  };
  int e0 = blockIdx.x * PS_WARPS + warp;
  int2 my_pl = fetch_pl(e0);
  float* qf = reinterpret_cast<float*>(qs);
  const f16_t* qg = q + ((size_t)job.tok * Hq + g * group) * D;  // the group's heads, contiguous
  for (int i = threadIdx.x * 8; i < group * D; i += blockDim.x * 8) {  // 16 bytes a thread: one round trip
    float v[8];
    unpack8(*reinterpret_cast<const uint4*>(qg + i), v);
    const int h = i / D, c = i % D;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      qf[q_at<D>(h, 0, c + j)] = fmaxf(v[j], 0.f);
      qf[q_at<D>(h, 1, c + j)] = fminf(v[j], 0.f);
    }
  }
  __syncthreads();
  const int lp_shift = ps_shift - (31 - __clz(sub));  // log2 tokens per logical page
  const bool mass = job.mass;  // uniform: the head bounds are kept apart
  float* out = scores + (size_t)g * group * cap_nnz + job.lo;
  __shared__ LsePart part;
  if (mass) part.init();
  for (; e0 < npages; e0 += 32 * stride) {
    for (int j = 0; j < 32; ++j) {
      const int e = e0 + j * stride;
      if (e >= npages) break;
      const int phys = __shfl_sync(0xffffffffu, my_pl.x, j), logical = __shfl_sync(0xffffffffu, my_pl.y, j);
      float best, mine;
      score_page<D>(kmax, kmin, ((size_t)phys * nd + slot) * sub * D, qs, group, sub, logical << ps_shift,
                    lp_shift, ctx, mass, best, mine);
      if (mass) {
        if (lane < group) {
          const float x = mine * rsqrtf((float)D);
          out[(size_t)lane * cap_nnz + e] = x;
          part.add(x);
        }
      } else if (lane == 0) {
        out[e] = best;
      }
    }
    my_pl = fetch_pl(e0 + 32 * stride);
  }
  if (mass) cta_lse_part(part, group, lse_part + ((size_t)qb * Hq + g * group) * gridDim.x);
}

// ------------------------------------------------------------------------------------------------ page_topk

constexpr int TK_THREADS = 512;
constexpr int TK_WARPS = TK_THREADS / 32;
constexpr int TK_BINS = 256;
constexpr int TK_PASSES = 5;       // the coarse pass, then at most 4 refinement passes of 8 bits (32-bit keys)
constexpr int TK_RUN = 8;          // scores per thread in registers: lists up to 4096 candidates stay there
struct TopkSmem {
  int hist[TK_PASSES][TK_BINS];  // one histogram per pass, zeroed once: no clearing barrier between passes
  u32 red[2][TK_WARPS];          // per-warp min / max keys
  int scan[2][TK_WARPS][2];      // per-warp (above, ties) counts, double-buffered over tiles
  int cut[3];                    // find_cut's answer: bin, entries in higher bins, entries in the bin
  float lse[MASS_MAX_GROUP];     // mass: each query head's logsumexp over the list
  float2 part[MASS_MAX_GROUP][TK_WARPS];  // mass: head_lse's per-warp (m, z) of each head's slices
};

// Canonical score: NaN -> -inf (ranks lowest, as numpy's argsort of -scores puts it last), -0 -> +0.
__device__ __forceinline__ float canonical(float x) {
  x = fmaxf(x, LSERVE_NEG_INF);  // fmaxf returns the other operand for a NaN
  return x == 0.f ? 0.f : x;
}

// Order-preserving map float -> u32 (a larger float gets a larger key), and back.
__device__ __forceinline__ u32 order_key(float f) {
  const u32 u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(u32 k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The candidates' scores in row 0 of the scores workspace: max's bounds as page_score wrote them, or mass's
// scores once stage_mass has turned the rows into them in place.
struct ListScores {
  const float* s;

  __device__ __forceinline__ float operator()(int i) const { return canonical(s[i]); }

  // v[j] = score of entry first + j (j < cnt <= R)
  template <int R>
  __device__ __forceinline__ void fill(float* v, int first, int cnt) const {
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (j < cnt) v[j] = canonical(s[first + j]);
  }
};

// Scores staged in shared memory (canonical already), one pad word after every 32 so that the contiguous
// runs of compact() (thread stride TK_RUN words) hit distinct banks.
__device__ __forceinline__ int staged_at(int i) { return i + (i >> 5); }

struct StagedScores {
  const float* v;
  __device__ __forceinline__ float operator()(int i) const { return v[staged_at(i)]; }
  template <int R>
  __device__ __forceinline__ void fill(float* out, int first, int cnt) const {
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (j < cnt) out[j] = v[staged_at(first + j)];
  }
};

// group_reduce mass, step 1: each query head's logsumexp over the list -> sm.lse[h], merged from page_score's
// `parts` per-CTA (m, z) partials (rows h of `part`, `parts` apart), every warp taking a slice of a head's row so
// that a lane's loads are one round trip; two barriers. Rereading every score here instead cost 9k cycles of the
// top-k's 28k at 256k (an H100, tools/results/gpu_2026-12-06/).
constexpr int LSE_RUN = 4;  // loads a lane issues before their merges
__device__ void head_lse(const float2* __restrict__ part, int parts, int group, TopkSmem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slices = max(1, TK_WARPS / group);  // warps on one head's row
  for (int t = warp; t < group * slices; t += TK_WARPS) {
    const int h = t % group, sl = t / group;
    const float2* row = part + (size_t)h * parts;
    float m = LSERVE_NEG_INF, z = 0.f;
    for (int j0 = sl * 32 + lane; j0 < parts; j0 += LSE_RUN * 32 * slices) {
      float2 x[LSE_RUN];
#pragma unroll
      for (int r = 0; r < LSE_RUN; ++r) {
        const int j = j0 + r * 32 * slices;
        x[r] = j < parts ? row[j] : make_float2(LSERVE_NEG_INF, 0.f);
      }
#pragma unroll
      for (int r = 0; r < LSE_RUN; ++r) lse_merge(m, z, x[r].x, x[r].y);
    }
    warp_lse_merge(m, z);
    if (lane == 0) sm.part[h][sl] = make_float2(m, z);
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float m = LSERVE_NEG_INF, z = 0.f;
    for (int sl = 0; sl < slices; ++sl) lse_merge(m, z, sm.part[threadIdx.x][sl].x, sm.part[threadIdx.x][sl].y);
    sm.lse[threadIdx.x] = m + logf(z);
  }
  __syncthreads();
}

// group_reduce mass, step 2: the candidates' scores, the log of the group's summed softmax weight
// logsumexp_h(s[h][i] - lse[h]) (sparse/selector.py::page_scores), coalesced (thread t takes entries t,
// t + TK_THREADS, ...; a chunk's 4 heads x LSE_RUN loads go out before its merges) into the stage (Staged: the
// top-k then reads its runs from shared memory; contiguous runs read straight from L2 were 8k cycles) or, for a
// list past the stage, into row 0 of `s` in place (entry i is read and written by one thread only).
template <bool Staged>
__device__ void stage_mass(const float* s, int n, int group, int cap_nnz, const float* lse, float* stage) {
  for (int base = threadIdx.x; base < n; base += LSE_RUN * TK_THREADS) {
    float v[LSE_RUN], z[LSE_RUN];
#pragma unroll
    for (int r = 0; r < LSE_RUN; ++r) v[r] = LSERVE_NEG_INF, z[r] = 0.f;
    for (int h0 = 0; h0 < group; h0 += 4) {
      float x[4][LSE_RUN];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int r = 0; r < LSE_RUN; ++r) {
          const int i = base + r * TK_THREADS;
          x[u][r] = h0 + u < group && i < n ? s[(size_t)(h0 + u) * cap_nnz + i] : LSERVE_NEG_INF;
        }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float l = h0 + u < group ? lse[h0 + u] : 0.f;
#pragma unroll
        for (int r = 0; r < LSE_RUN; ++r) lse_merge(v[r], z[r], x[u][r] - l, 1.f);
      }
    }
#pragma unroll
    for (int r = 0; r < LSE_RUN; ++r)
      if (base + r * TK_THREADS < n) {
        const int i = base + r * TK_THREADS;
        stage[Staged ? staged_at(i) : i] = canonical(v[r] + logf(z[r]));
      }
  }
  __syncthreads();
}

// The entries a thread owns in a tile of the list: [first, first + cnt), contiguous so that one exclusive
// scan over threads of per-thread counts orders the output by index; their scores in registers.
struct Run {
  float v[TK_RUN];
  int first, cnt;

  template <class Src>
  __device__ __forceinline__ void load(const Src& src, int base, int tile_n) {
    const int per = (tile_n + TK_THREADS - 1) / TK_THREADS;  // <= TK_RUN
    first = base + threadIdx.x * per;
    cnt = max(0, min(per, base + tile_n - first));
    src.template fill<TK_RUN>(v, first, cnt);
  }

  template <class F>
  __device__ __forceinline__ void each(F&& f) const {  // f(score, list index, j) in index order
#pragma unroll
    for (int j = 0; j < TK_RUN; ++j) {
      if (j >= cnt) break;
      f(v[j], first + j, j);
    }
  }
};

// A list of n candidates, read from `src`. RESIDENT (n <= TILE): loaded once into the threads' runs, every
// sweep reads registers. Otherwise a sweep reads src again (shared memory or L2) in a coalesced stride, and
// compact() loads the list as tiles of TILE contiguous runs.
template <class Src, bool RESIDENT>
struct Tiles {
  static constexpr int TILE = TK_THREADS * TK_RUN;
  Src src;
  int n;
  Run run;

  __device__ __forceinline__ Tiles(const Src& s, int n_) : src(s), n(n_) {
    if constexpr (RESIDENT) run.load(src, 0, n);
  }

  template <class F>
  __device__ __forceinline__ void sweep(F&& f) {  // f(score) over every entry this thread owns, any order
    if constexpr (RESIDENT) {
      run.each([&](float x, int, int) { f(x); });
    } else {
#pragma unroll 4
      for (int i = threadIdx.x; i < n; i += TK_THREADS) f(src(i));
    }
  }
};

// Block-wide min and max of u32 values (one barrier; sm.red is free again after the next barrier).
__device__ __forceinline__ void cta_min_max(u32& lo, u32& hi, TopkSmem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  if (lane == 0) sm.red[0][warp] = lo, sm.red[1][warp] = hi;
  __syncthreads();
  lo = __reduce_min_sync(0xffffffffu, lane < TK_WARPS ? sm.red[0][lane] : ~0u);
  hi = __reduce_max_sync(0xffffffffu, lane < TK_WARPS ? sm.red[1][lane] : 0u);
}

// Block-wide exclusive scan of per-thread (a, t) counts in thread order (one barrier); `total` = the sums.
__device__ __forceinline__ int2 cta_exclusive_scan(int a, int t, int (*buf)[2], int2& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int ia = a, it = t;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int xa = __shfl_up_sync(0xffffffffu, ia, o), xt = __shfl_up_sync(0xffffffffu, it, o);
    if (lane >= o) ia += xa, it += xt;
  }
  if (lane == 31) buf[warp][0] = ia, buf[warp][1] = it;
  __syncthreads();
  const int wa = lane < TK_WARPS ? buf[lane][0] : 0, wt = lane < TK_WARPS ? buf[lane][1] : 0;
  total = make_int2(__reduce_add_sync(0xffffffffu, wa), __reduce_add_sync(0xffffffffu, wt));
  const int ba = __reduce_add_sync(0xffffffffu, lane < warp ? wa : 0);
  const int bt = __reduce_add_sync(0xffffffffu, lane < warp ? wt : 0);
  return make_int2(ba + ia - a, bt + it - t);
}

struct Cut {
  int bin, above, count;  // the bin holding the need-th largest, entries in higher bins, entries in it
};

// Once the histogram is complete: warp 0 scans it from the top bin down (lane l holds bins 255 - 8l ..
// 248 - 8l) and finds the bin where the running count reaches `need`; every thread gets the answer.
__device__ __forceinline__ Cut find_cut(const int* hist, int need, TopkSmem& sm) {
  __syncthreads();  // every atomic of the pass is in
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int4 lo4 = reinterpret_cast<const int4*>(hist)[(TK_BINS - 8 - 8 * lane) / 4];
    const int4 hi4 = reinterpret_cast<const int4*>(hist)[(TK_BINS - 4 - 8 * lane) / 4];
    const int c[8] = {hi4.w, hi4.z, hi4.y, hi4.x, lo4.w, lo4.z, lo4.y, lo4.x};  // bins 255 - 8l - j
    int sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) sum += c[j];
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    const u32 hit = __ballot_sync(0xffffffffu, incl >= need);
    if (lane == (hit ? __ffs(hit) - 1 : 31)) {  // counts are consistent, so some lane hits
      int above = incl - sum, pick = 7, count = c[7];
      bool found = false;
#pragma unroll
      for (int j = 0; j < 7; ++j) {  // unrolled: c[] stays in registers
        if (!found && above + c[j] >= need) pick = j, count = c[j], found = true;
        if (!found) above += c[j];
      }
      sm.cut[0] = TK_BINS - 1 - 8 * lane - pick;
      sm.cut[1] = above;
      sm.cut[2] = count;
    }
  }
  __syncthreads();
  return Cut{sm.cut[0], sm.cut[1], sm.cut[2]};
}

// 256 bins of equal width over [xmin, xmax]. Monotone in x (equal scores share a bin; x <= y -> bin(x) <=
// bin(y)), which is all that exactness needs; one bin for every score when the range is 0 or not finite.
struct Coarse {
  float xmin, scale;
  __device__ __forceinline__ int bin(float x) const {
    return scale == 0.f ? 0 : (int)fminf((x - xmin) * scale, 255.f);
  }
};

__device__ __forceinline__ Coarse make_coarse(float lo, float hi) {
  const float s = 255.f / (hi - lo);
  return Coarse{lo, (s > 0.f && s < __int_as_float(0x7f800000)) ? s : 0.f};
}

// Where the k-th largest candidate sits: coarse bin `bin`; inside it (unless `whole`: the bin is taken whole),
// keys minus kmin compared on their bits from `lo` up with `thr`. rank(): 2 above the cut (taken), 1 a tie
// of it (the `need` lowest-index ties are taken), 0 below.
struct Threshold {
  Coarse cb;
  int bin, need, lo;
  bool whole;
  u32 kmin, thr;
  __device__ __forceinline__ int rank(float x) const {
    const int b = cb.bin(x);
    if (b != bin) return b > bin ? 2 : 0;
    if (whole) return 1;
    const u32 a = (order_key(x) - kmin) >> lo, t = thr >> lo;
    return a > t ? 2 : (a == t ? 1 : 0);
  }
};

// Adds every entry's bin digit(x) (< 0: not counted) to hist. A thread adds a run of equal consecutive digits
// with one atomic: clustered scores (one outlier stretching the range, or many ties) would otherwise send most
// of the list's atomics to one shared-memory address, where a warp's lanes serialize.
template <class Src, bool RESIDENT, class Digit>
__device__ __forceinline__ void histogram(Tiles<Src, RESIDENT>& tiles, int* hist, Digit digit) {
  int cur = -1, cnt = 0;
  tiles.sweep([&](float x) {
    const int d = digit(x);
    if (d < 0) return;
    if (d == cur) {
      ++cnt;
      return;
    }
    if (cnt > 0) atomicAdd(&hist[cur], cnt);
    cur = d;
    cnt = 1;
  });
  if (cnt > 0) atomicAdd(&hist[cur], cnt);
}

// Step 3: radix select inside the cut's coarse bin, 8 bits per pass over the bits where its keys differ.
template <class Src, bool RESIDENT>
__device__ void refine(Tiles<Src, RESIDENT>& tiles, Threshold& t, TopkSmem& sm) {
  u32 lo = ~0u, hi = 0u;
  tiles.sweep([&](float x) {
    if (t.cb.bin(x) != t.bin) return;
    const u32 key = order_key(x);
    lo = min(lo, key);
    hi = max(hi, key);
  });
  cta_min_max(lo, hi, sm);
  t.kmin = lo;
  t.thr = 0u;
  t.lo = 0;
  int top = hi > lo ? 32 - __clz(hi - lo) : 0;  // bits [top, 32) of every (key - kmin) in the bin are 0
  for (int pass = 1; top > 0; ++pass) {
    const int shift = max(top - 8, 0);
    const u32 fixed = top >= 32 ? 0u : ~0u << top;  // bits already decided (thr holds them)
    int* hist = sm.hist[pass];
    histogram(tiles, hist, [&](float x) {
      if (t.cb.bin(x) != t.bin) return -1;
      const u32 nk = order_key(x) - t.kmin;
      return ((nk ^ t.thr) & fixed) == 0u ? (int)((nk >> shift) & (TK_BINS - 1)) : -1;
    });
    const Cut c = find_cut(hist, t.need, sm);
    t.need -= c.above;
    t.thr |= (u32)c.bin << shift;  // a digit's bits above `top` (last pass) equal thr's: OR is exact
    t.lo = top = shift;
    if (c.count == t.need) break;  // the digit's bucket is taken whole
  }
}

// Step 4: entries above the cut and the first t.need ties, in index order -> out[0, k).
template <class Src, bool RESIDENT>
__device__ void compact(Tiles<Src, RESIDENT>& tiles, const Threshold& t, int k, int* __restrict__ out,
                        TopkSmem& sm) {
  int above = 0, ties = 0;  // over the tiles before this one
  for (int base = 0, tile = 0; base < tiles.n; base += tiles.TILE, ++tile) {
    if constexpr (!RESIDENT) tiles.run.load(tiles.src, base, min(tiles.n - base, tiles.TILE));
    u32 up = 0u, eq = 0u;  // bit j: entry j of the run is above the cut / a tie
    tiles.run.each([&](float x, int, int j) {
      const int r = t.rank(x);
      up |= (u32)(r == 2) << j;
      eq |= (u32)(r == 1) << j;
    });
    int2 total;
    const int2 before = cta_exclusive_scan(__popc(up), __popc(eq), sm.scan[tile & 1], total);
    int a = above + before.x, e = ties + before.y;
    tiles.run.each([&](float, int i, int j) {
      int pos = -1;  // before entry i: a entries above the cut, e ties (min(e, need) of them taken)
      if ((up >> j) & 1u) {
        pos = a + min(e, t.need);
        ++a;
      } else if ((eq >> j) & 1u) {
        if (e < t.need) pos = a + e;
        ++e;
      }
      if (pos >= 0 && pos < k) out[pos] = i;  // always < k when the counts are consistent
    });
    above += total.x;
    ties += total.y;
  }
}

// Steps 1-4 for n candidates, keeping k (0 < k < n) -> out[0, k) ascending.
template <bool RESIDENT, class Src>
__device__ void select_top(const Src& src, int n, int k, int* __restrict__ out, TopkSmem& sm) {
  Tiles<Src, RESIDENT> tiles(src, n);
  u32 lo = ~0u, hi = 0u;
  tiles.sweep([&](float x) {
    const u32 key = order_key(x);
    lo = min(lo, key);
    hi = max(hi, key);
  });
  cta_min_max(lo, hi, sm);  // also publishes the zeroed histograms
  Threshold t;
  t.cb = make_coarse(key_float(lo), key_float(hi));
  histogram(tiles, sm.hist[0], [&](float x) { return t.cb.bin(x); });
  const Cut c = find_cut(sm.hist[0], k, sm);
  t.bin = c.bin;
  t.need = k - c.above;
  t.whole = c.count == t.need;
  if (!t.whole) refine(tiles, t, sm);
  compact(tiles, t, k, out, sm);
}

// stage: dynamic shared memory for staged_at(stage_cap) scores (the launcher sizes it from the plan's capacity:
// every list with mass, lists past one register tile with max). lse_part: page_score's `parts` (m, z) partials
// per (query block, query head) with mass.
__device__ __forceinline__ void page_topk_body(const PlanView pv, const int* __restrict__ head_class,
                                               float* __restrict__ scores, const float2* __restrict__ lse_part,
                                               int parts, int cap_nnz, int Hkv, int group,
                                               int* __restrict__ sel_idx, int* __restrict__ sel_cnt, int sel_cap,
                                               float* stage, int stage_cap) {
  __shared__ __align__(16) TopkSmem sm;
  const int qb = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;
  const SelectJob job = select_job(pv, head_class, qb, g);
  if (!job.on) return;
  const int keep = min(job.keep, sel_cap), npages = job.npages;
  const int row = job.slot * Hkv + g;
  int* out = sel_idx + (size_t)row * sel_cap;
  if (npages <= keep) {  // the context fits the budget: every page
    for (int i = tid; i < npages; i += TK_THREADS) out[i] = i;
    if (tid == 0) sel_cnt[row] = npages;
    return;
  }
  const int n = npages - 1, k = keep - 1;  // candidates (all but the newest), how many of them to keep
  if (k > 0) {
    for (int i = tid; i < TK_PASSES * TK_BINS; i += TK_THREADS) (&sm.hist[0][0])[i] = 0;
    float* s = scores + (size_t)g * group * cap_nnz + job.lo;
    const ListScores src{s};
    constexpr int TILE = Tiles<ListScores, true>::TILE;
    if (job.mass) head_lse(lse_part + ((size_t)qb * Hkv + g) * group * parts, parts, group, sm);
    if (n <= stage_cap && (job.mass || n > TILE)) {  // shared memory: every sweep after the first reads it
      if (job.mass) {
        stage_mass<true>(s, n, group, cap_nnz, sm.lse, stage);
      } else {
        for (int i = tid; i < n; i += TK_THREADS) stage[staged_at(i)] = src(i);
        __syncthreads();
      }
      if (n <= TILE)
        select_top<true>(StagedScores{stage}, n, k, out, sm);
      else
        select_top<false>(StagedScores{stage}, n, k, out, sm);
    } else if (!job.mass && n <= TILE) {  // max, the fast path: registers
      select_top<true>(src, n, k, out, sm);
    } else {  // every sweep rereads L2; mass: turn the bounds into scores once, in place
      if (job.mass) stage_mass<false>(s, n, group, cap_nnz, sm.lse, s);
      select_top<false>(src, n, k, out, sm);
    }
  }
  if (tid == 0) {
    out[k] = n;  // the newest page, always
    sel_cnt[row] = k + 1;
  }
}

}  // namespace lsattn

#define LSERVE_PAGE_SCORE_KERNEL(D)                                                                         \
  extern "C" __global__ void __launch_bounds__(lsattn::PS_THREADS, 3) page_score_d##D(                          \
      const f16_t* q, const f16_t* kmax, const f16_t* kmin, const int* plan, int cap_qb, int cap_seq,       \
      const int* head_class, const int* head_slot, int nd, int sub, float* scores, float2* lse_part,       \
      int cap_nnz, int Hq, int Hkv, int ps_shift) {                                                        \
    lserve::pdl_enter();                                                                                   \
    lsattn::page_score_body<D>(q, kmax, kmin, lsattn::plan_view(plan, cap_qb, cap_seq), head_class,         \
                               head_slot, nd, sub, scores, lse_part, cap_nnz, Hq, Hkv, ps_shift);          \
  }

LSERVE_PAGE_SCORE_KERNEL(64)
LSERVE_PAGE_SCORE_KERNEL(128)

extern "C" __global__ void __launch_bounds__(lsattn::TK_THREADS, 2)
    page_topk(const int* plan, int cap_qb, int cap_seq, const int* head_class, float* scores,
              const float2* lse_part, int parts, int cap_nnz, int Hkv, int group, int* sel_idx, int* sel_cnt,
              int sel_cap, int stage_cap) {
  extern __shared__ float stage[];
  lserve::pdl_enter();
  lsattn::page_topk_body(lsattn::plan_view(plan, cap_qb, cap_seq), head_class, scores, lse_part, parts, cap_nnz,
                         Hkv, group, sel_idx, sel_cnt, sel_cap, stage, stage_cap);
}
