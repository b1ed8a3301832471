// Token sampling on the GPU over rows of float32 logits (a row's passes spread over several blocks, its selections in
// one); only token ids go back.
// Reference: lserve_lite/backends/reference/sampling.py (sample, sample_row, additive_terms, allowed_tokens,
// logprobs_ref). Launchers: lserve_lite/backends/cuda_sampling.py.
// Before sampling, on a copy of the logits: apply_penalty (repetition), add_logits (presence / frequency
// penalties and logit bias, as (row, id, amount) triples), mask_logits (a grammar's allowed-token bitmask), then
// min_p_mask (vLLM's min_p, after temperature).
// logprob_rows reads the raw logits: log-softmax of the chosen id and the top-k, only those numbers go back.
//
// The CPU sampler sorts the tempered logits (descending, ties by index), keeps the top_k, then the
// smallest prefix whose probability reaches top_p, and picks by inverse CDF with one uniform u per row.
// Here no full sort: every element gets a 64-bit sort key (descending value, then ascending index), and a
// selection finds the element where a cumulative weight (count or exp mass) crosses a target -- the k-th
// element, the top-p boundary, the sampled one: by a histogram over value bins and a sort of the one bin it
// crosses in (sample_hist, the default), or by a radix select over the keys (select_key, 8 bits a pass; the
// fallback for a crowded bin).
#include "block_reduce.cuh"
#include "pdl.cuh"

typedef unsigned long long u64;
using lserve::block_reduce;

// Ascending key = descending value, then ascending index (np.argsort(-x, kind="stable")).
__device__ __forceinline__ u64 sort_key(float v, int idx) {
  unsigned int b = __float_as_uint(v);
  if (b == 0x80000000u) b = 0;  // -0 sorts with +0, as in NumPy
  const unsigned int asc = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ((u64)(~asc) << 32) | (unsigned int)idx;
}

struct SelectSmem {
  double w[256];
  int n[256];
  int chosen, count;
  u64 found;
};

// The smallest key B among candidates (key <= bound) whose cumulative weight W(key <= B) reaches target
// (>= target, or > target when strict). Weight: 1 per element (mass == false) or exp(x/T - xmax).
// Returns ~0 when no key qualifies. All threads of the block must call it.
__device__ u64 select_key(const float* x, int vocab, float temp, float xmax, u64 bound, double target, bool strict,
                          bool mass, SelectSmem& sm) {
  u64 prefix = 0;
  double acc = 0.0;  // weight of candidates below the current prefix (thread 0 only)
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) {
      sm.w[d] = 0.0;
      sm.n[d] = 0;
    }
    __syncthreads();
    const u64 hi_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = __fdiv_rn(x[i], temp);
      const u64 k = sort_key(v, i);
      if (k <= bound && (k & hi_mask) == prefix) {
        const int d = (int)((k >> shift) & 255);
        atomicAdd(&sm.w[d], mass ? exp((double)(v - xmax)) : 1.0);
        atomicAdd(&sm.n[d], 1);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1;
      for (int d = 0; d < 256; ++d) {
        if (sm.n[d] == 0) continue;
        const double a2 = acc + sm.w[d];
        if (strict ? a2 > target : a2 >= target) {
          chosen = d;
          break;
        }
        acc = a2;
      }
      sm.chosen = chosen;
      sm.count = chosen >= 0 ? sm.n[chosen] : 0;
    }
    __syncthreads();
    const int chosen = sm.chosen, count = sm.count;
    if (chosen < 0) return ~0ull;
    prefix |= (u64)chosen << shift;
    if (count == 1 && shift > 0) {  // a single candidate left: find it in one more pass
      const u64 mask = ~0ull << shift;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u64 k = sort_key(__fdiv_rn(x[i], temp), i);
        if (k <= bound && (k & mask) == prefix) sm.found = k;
      }
      __syncthreads();
      const u64 found = sm.found;
      __syncthreads();
      return found;
    }
  }
  return prefix;
}

__device__ double mass_below(const float* x, int vocab, float temp, float xmax, u64 bound, double* scratch) {
  double s = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = __fdiv_rn(x[i], temp);
    if (sort_key(v, i) <= bound) s += exp((double)(v - xmax));
  }
  return block_reduce(s, scratch, lserve::SumOp(), 0.0);
}

// sound_rows' rule (reference/sampling.sound_rows_ref): a row can be sampled when its (max, min) over its logits,
// a non-finite logit counting as an infinite maximum, has a finite max above the min. `sound_take` folds one logit
// into a thread's (m, l); `sound_block` reduces them over the block (every thread gets the result); `sound_merge`
// is the row's last block merging its G partials into the flag.
__device__ __forceinline__ void sound_take(float v, float& m, float& l) {
  m = fmaxf(m, isfinite(v) ? v : __int_as_float(0x7f800000));
  l = fminf(l, v);
}

__device__ __forceinline__ void sound_block(float& m, float& l, float* scr) {
  const float inf = __int_as_float(0x7f800000);
  m = block_reduce(m, scr, lserve::MaxOp(), -inf);
  l = block_reduce(l, scr, lserve::MinOp(), inf);
}

__device__ __forceinline__ unsigned char sound_merge(const float2* __restrict__ part, int G, float* scr) {
  const float inf = __int_as_float(0x7f800000);
  float m = -inf, l = inf;
  for (int i = threadIdx.x; i < G; i += blockDim.x) {
    const float2 p = __ldcg(part + i);
    m = fmaxf(m, p.x);
    l = fminf(l, p.y);
  }
  sound_block(m, l, scr);
  return m < inf && m > l;
}

// This thread's smallest sort key over x[lo .. hi) (the block's smallest: the first index of the maximum there). A
// 16-byte aligned stretch is read as float4, four loads in flight per thread (a scalar loop of one load at a time took
// 51 us for a 128k vocabulary on an H200: a chain of L2 round trips). SOUND: also the thread's (max, min) of its
// logits by sound_rows' rule (a non-finite logit an infinite maximum) in m, l, from the same loads.
template <bool SOUND>
__device__ __forceinline__ u64 thread_best(const float* __restrict__ x, int lo, int hi, float& m, float& l) {
  u64 best = ~0ull;
  auto seen = [&](float v) {
    if constexpr (SOUND) sound_take(v, m, l);
  };
  int tail = lo;
  if ((reinterpret_cast<unsigned long long>(x + lo) & 15) == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(x + lo);
    const int n4 = (hi - lo) / 4;
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
      const float4 v = x4[i];
      const int j = lo + 4 * i;
      const u64 a = min(sort_key(v.x, j), sort_key(v.y, j + 1));
      const u64 b = min(sort_key(v.z, j + 2), sort_key(v.w, j + 3));
      best = min(best, min(a, b));
      seen(v.x), seen(v.y), seen(v.z), seen(v.w);
    }
    tail = lo + n4 * 4;
  }
  for (int i = tail + threadIdx.x; i < hi; i += blockDim.x) {
    best = min(best, sort_key(x[i], i));
    seen(x[i]);
  }
  return best;
}

// First index of the row maximum (np.argmax), in two levels: grid (G, rows), block g takes elements
// [g * chunk, (g + 1) * chunk) of its row and leaves its best key in part[row, g]; the row's last block to finish
// (a ticket on tick[row], which it resets to 0) takes the G partials. One block a row read a 128k vocabulary at
// one SM's share of L2 (18.8 us on an H200). tick: zeroed once by the launcher, before the first launch.
// sound (null: not asked): also sound_rows' flag of each row, from the same pass (its (max, min) partials in mm[row,
// g]): a greedy step's overflow check without a second launch over the logits. host_ids (null: not written): also
// each row's id, written where out[row] is (pinned host memory: the step's ids without a device-to-host copy).
template <bool SOUND>
__device__ __forceinline__ void argmax_body(const float* __restrict__ logits, long long stride, int vocab, int chunk,
                                            u64* __restrict__ part, unsigned int* __restrict__ tick,
                                            long long* __restrict__ out, float2* __restrict__ mm,
                                            unsigned char* __restrict__ sound, long long* __restrict__ host_ids) {
  const float inf = __int_as_float(0x7f800000);
  __shared__ u64 scratch[32];
  __shared__ float fscr[32];
  __shared__ bool last;
  const int row = blockIdx.y, g = blockIdx.x, G = gridDim.x;
  const int lo = g * chunk, hi = min(vocab, lo + chunk);
  float m = -inf, l = inf;
  const u64 best = block_reduce(thread_best<SOUND>(logits + row * stride, lo, hi, m, l), scratch, lserve::MinOp(), ~0ull);
  if constexpr (SOUND) sound_block(m, l, fscr);
  if (threadIdx.x == 0) {
    part[(long long)row * G + g] = best;
    if constexpr (SOUND) mm[(long long)row * G + g] = make_float2(m, l);
    __threadfence();  // the partials are visible before the ticket says so
    last = atomicAdd(tick + row, 1u) == (unsigned int)G - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  u64 v = ~0ull;
  for (int i = threadIdx.x; i < G; i += blockDim.x) v = min(v, __ldcg(part + (long long)row * G + i));
  v = block_reduce(v, scratch, lserve::MinOp(), ~0ull);
  unsigned char flag = 0;
  if constexpr (SOUND) flag = sound_merge(mm + (long long)row * G, G, fscr);
  if (threadIdx.x == 0) {
    const long long id = (long long)(v & 0xffffffffu);
    out[row] = id;
    if (host_ids != nullptr) host_ids[row] = id;
    if constexpr (SOUND) sound[row] = flag;
    tick[row] = 0;  // ready for the next launch
  }
}

__global__ void argmax_rows(const float* __restrict__ logits, long long stride, int vocab, int chunk,
                            u64* __restrict__ part, unsigned int* __restrict__ tick, long long* __restrict__ out,
                            float2* __restrict__ mm, unsigned char* __restrict__ sound,
                            long long* __restrict__ host_ids) {
  lserve::pdl_enter();
  if (sound != nullptr) {
    argmax_body<true>(logits, stride, vocab, chunk, part, tick, out, mm, sound, host_ids);
  } else {
    argmax_body<false>(logits, stride, vocab, chunk, part, tick, out, mm, sound, host_ids);
  }
}

// ---- The histogram sampler (the default path of sample_rows) ----
// The radix path above takes one pass over the row per 8 key bits of each selection (about 30 passes for top-k,
// top-p and the pick, scalar loads, float64 shared-memory atomics that all hit one bin in the first passes): 1.7-2.4
// ms a row for a 128k vocabulary on an H200. Here a row costs two passes spread over the GPU (sample_bounds: the
// tempered row's max and smallest finite value; sample_fill: a histogram of count and mass over SB bins of
// z = vmax - v, the bin monotone in the sort order, so bins are visited in it), then in sample_rows' one block a
// pass per selection at most: it scans the bins, gathers the one it crosses in, sorts that bin's keys in shared
// memory and scans them in order. A crossing bin of more than SCAP logits (thousands of equal values, top-k beyond a
// grammar's allowed tokens) sends the row to the radix path.
constexpr int SB = 2048;    // bins of z in [0, R]; bin SB: z > R, -inf logits, NaN
constexpr int SCAP = 4096;  // logits of one bin sorted in shared memory: 4 a thread at SAMPLE_THREADS
constexpr int SAMPLE_THREADS = 1024;  // cuda_sampling.THREADS
constexpr int FILL_THREADS = 256;  // cuda_sampling.FILL_THREADS
constexpr float ZR = 64.f;  // exp(-64): below float64's resolution of a total >= 1, so R = min(ZR, vmax - vmin)

struct HistSmem {  // dynamic shared memory of sample_rows
  double mass[SB + 1];
  int count[SB + 1];
  u64 key[SCAP];
  double w[SCAP];
  double dscr[32];
  int iscr[32];
  int n, bin;
  double before;  // cumulative weight of the bins before the crossing one
};

constexpr int HIST_SMEM = 100 * 1024;  // cuda_sampling.HIST_SMEM: the launch's dynamic shared memory
static_assert(sizeof(HistSmem) <= HIST_SMEM, "HistSmem outgrew the launch's shared memory");

struct Bins {  // z = vmax - v -> bin, non-decreasing in the sort order
  float vmax, r, scale;
  __device__ __forceinline__ int operator()(float v) const {
    const float z = vmax - v;
    return z <= r ? min((int)(z * scale), SB - 1) : SB;
  }
};

// The bins of a row whose tempered logits have maximum vmax and smallest finite value vmin (+inf: none).
__device__ __forceinline__ Bins make_bins(float vmax, float vmin) {
  const float r = isfinite(vmax) && vmin <= vmax ? fminf(ZR, vmax - vmin) : 0.f;
  return Bins{vmax, r, r > 0.f ? (float)SB / r : 0.f};
}

// Floats as unsigned ints in the same order (0 below every float but an all-ones NaN): atomicMax keeps a maximum.
__device__ __forceinline__ unsigned int ordered(float v) {
  const unsigned int b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float unordered(unsigned int o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// The bins of a row from sample_bounds' two words: the ordered maximum and ordered negated smallest finite value.
__device__ __forceinline__ Bins stat_bins(const unsigned int* st) {
  return make_bins(unordered(st[0]), st[1] ? -unordered(st[1]) : __int_as_float(0x7f800000));
}


// f(i, v, ok) for lo <= i < hi with v = x[i] / temp (ok = false past the end), the same number of calls in every
// lane of a warp, so f may use warp collectives. float4 loads, four in flight per thread, where x + lo is 16-byte
// aligned.
template <typename F>
__device__ __forceinline__ void for_row(const float* __restrict__ x, int lo, int hi, float temp, F f) {
  const int lane = threadIdx.x & 31, wbase = threadIdx.x - lane;
  int tail = lo;
  if ((reinterpret_cast<unsigned long long>(x + lo) & 15) == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(x + lo);
    const int n4 = (hi - lo) / 4;
    for (int c = wbase; c < n4; c += 4 * blockDim.x) {
      float4 q[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = c + u * blockDim.x + lane;
        q[u] = i < n4 ? x4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = c + u * blockDim.x + lane, e = lo + 4 * i;
        const bool ok = i < n4;
        f(e, __fdiv_rn(q[u].x, temp), ok);
        f(e + 1, __fdiv_rn(q[u].y, temp), ok);
        f(e + 2, __fdiv_rn(q[u].z, temp), ok);
        f(e + 3, __fdiv_rn(q[u].w, temp), ok);
      }
    }
    tail = lo + 4 * n4;
  }
  for (int c = tail + wbase; c < hi; c += blockDim.x) {
    const int i = c + lane;
    const bool ok = i < hi;
    f(i, ok ? __fdiv_rn(x[i], temp) : 0.f, ok);
  }
}

// The row's maximum tempered logit and smallest finite one over [lo, hi) of this block (block-wide).
__device__ __forceinline__ void row_bounds(const float* x, int lo, int hi, float temp, float& vmax, float& vmin) {
  float m = -__int_as_float(0x7f800000), l = __int_as_float(0x7f800000);
  for_row(x, lo, hi, temp, [&](int, float v, bool ok) {
    if (ok) {
      m = fmaxf(m, v);
      if (isfinite(v)) l = fminf(l, v);
    }
  });
  __shared__ float fscr[32];
  vmax = block_reduce(m, fscr, lserve::MaxOp(), -__int_as_float(0x7f800000));
  vmin = block_reduce(l, fscr, lserve::MinOp(), __int_as_float(0x7f800000));
}

// Whether each row can be sampled (reference/sampling.sound_rows_ref's rule): every logit finite and not all equal
// (overflowed activations give NaN / inf, or zeros where a norm's sum of squares overflowed). Grid (G, rows) as
// argmax_rows: block g leaves its chunk's (max, min) in part[row, g], a non-finite logit counting as an infinite
// maximum; the row's last block (a ticket on tick[row], reset to 0) merges them into out[row] (1: sound).
__global__ void sound_rows(const float* __restrict__ logits, long long stride, int vocab, int chunk,
                           float2* __restrict__ part, unsigned int* __restrict__ tick, unsigned char* __restrict__ out) {
  lserve::pdl_enter();
  const float inf = __int_as_float(0x7f800000);
  __shared__ float scr[32];
  __shared__ bool last;
  const int row = blockIdx.y, g = blockIdx.x, G = gridDim.x;
  const int lo = g * chunk, hi = min(vocab, lo + chunk);
  float m = -inf, l = inf;
  for_row(logits + row * stride, lo, hi, 1.f, [&](int, float v, bool ok) {
    if (ok) sound_take(v, m, l);
  });
  sound_block(m, l, scr);
  if (threadIdx.x == 0) {
    part[(long long)row * G + g] = make_float2(m, l);
    __threadfence();  // the partial is visible before the ticket says so
    last = atomicAdd(tick + row, 1u) == (unsigned int)G - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const unsigned char flag = sound_merge(part + (long long)row * G, G, scr);
  if (threadIdx.x == 0) {
    out[row] = flag;
    tick[row] = 0;  // ready for the next launch
  }
}

// Exclusive prefix sum of v over the block in thread order (scr: 32 shared words of T).
template <typename T>
__device__ __forceinline__ T block_excl_scan(T v, T* scr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  T inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  T ex = __shfl_up_sync(0xffffffffu, inc, 1);
  if (lane == 0) ex = T(0);
  __syncthreads();
  if (lane == 31) scr[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    T t = lane < nw ? scr[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T u = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += u;
    }
    scr[lane] = t;
  }
  __syncthreads();
  const T base = warp ? scr[warp - 1] : T(0);
  __syncthreads();
  return base + ex;
}

// Weight of the gathered logits with key <= bound (1 each, or their mass).
__device__ __forceinline__ double gathered_weight(HistSmem& s, u64 bound, bool mass) {
  double t = 0.0;
  for (int j = threadIdx.x; j < s.n; j += blockDim.x)
    if (s.key[j] <= bound) t += mass ? s.w[j] : 1.0;
  return block_reduce(t, s.dscr, lserve::SumOp(), 0.0);
}

// Where sample_fill listed a row's logits by bin: block g's logits of bin b are idx[g * chunk + loc[g * (SB + 2) + b]
// .. g * chunk + loc[g * (SB + 2) + b + 1]) (their indices in the row).
struct RowLists {
  const int* idx;
  const int* loc;
  int nblk, chunk;
};

// s.key / s.w <- the logits of bin c, sorted by key (bitonic, padded to a power of two with ~0 keys): from the
// row's lists, or without them (rl.idx null) by a pass over the row.
__device__ void gather_bin(HistSmem& s, const float* x, int vocab, float temp, const Bins& bins, const RowLists& rl,
                           int c) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const float vmax = bins.vmax;
  if (threadIdx.x == 0) s.n = 0;
  __syncthreads();
  if (!rl.idx) {  // a pass over the row
    for_row(x, 0, vocab, temp, [&](int i, float v, bool ok) {
      const bool in = ok && bins(v) == c;
      const unsigned m = __ballot_sync(0xffffffffu, in);
      if (m) {
        const int lead = __ffs(m) - 1;
        int base = 0;
        if (lane == lead) base = atomicAdd(&s.n, __popc(m));
        base = __shfl_sync(0xffffffffu, base, lead);
        const int pos = base + __popc(m & ((1u << lane) - 1));
        if (in && pos < SCAP) {
          s.key[pos] = sort_key(v, i);
          s.w[pos] = exp((double)(v - vmax));
        }
      }
    });
  } else {  // each block's list of bin c, a warp a block
    for (int g = warp; g < rl.nblk; g += nw) {
      const int* loc = rl.loc + (long long)g * (SB + 2);
      const int a = __ldcg(loc + c), e = __ldcg(loc + c + 1);
      int base = 0;
      if (lane == 0 && e > a) base = atomicAdd(&s.n, e - a);
      base = __shfl_sync(0xffffffffu, base, 0);
      for (int j = a + lane; j < e; j += 32) {
        const int i = __ldcg(rl.idx + (long long)g * rl.chunk + j), pos = base + j - a;
        const float v = __fdiv_rn(x[i], temp);
        if (pos < SCAP) {
          s.key[pos] = sort_key(v, i);
          s.w[pos] = exp((double)(v - vmax));
        }
      }
    }
  }
  __syncthreads();
  const int n = min(s.n, SCAP);
  int n2 = 1;
  while (n2 < n) n2 <<= 1;
  for (int j = n + threadIdx.x; j < n2; j += blockDim.x) s.key[j] = ~0ull, s.w[j] = 0.0;
  __syncthreads();
  for (int k = 2; k <= n2; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n2; i += blockDim.x) {
        const int l = i ^ j;
        if (l > i && ((s.key[i] > s.key[l]) == ((i & k) == 0))) {
          const u64 tk = s.key[i];
          s.key[i] = s.key[l], s.key[l] = tk;
          const double tw = s.w[i];
          s.w[i] = s.w[l], s.w[l] = tw;
        }
      }
      __syncthreads();
    }
  if (threadIdx.x == 0) s.bin = c;
  __syncthreads();
}

// The smallest key <= bound at which the cumulative weight (1 a logit, or its mass) in the sort order reaches
// target (exceeds it when strict); ~0 when none does. bb: bound's bin, the gathered one (SB + 1: no bound).
// fail: the crossing bin holds more than SCAP logits.
__device__ u64 hist_select(HistSmem& s, const float* x, int vocab, float temp, const Bins& bins, const RowLists& rl,
                           double target, bool strict, bool mass, u64 bound, int bb, bool& fail) {
  const double partial = bb <= SB ? gathered_weight(s, bound, mass) : 0.0;
  constexpr int PER = (SB + SAMPLE_THREADS) / SAMPLE_THREADS;  // bins a thread scans (3)
  double wt[PER], local = 0.0;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int b = PER * threadIdx.x + j;
    wt[j] = b > SB || b > bb ? 0.0 : b == bb ? partial : mass ? s.mass[b] : (double)s.count[b];
    local += wt[j];
  }
  double a = block_excl_scan(local, s.dscr);
  int mine = SB + 1;
  double before = 0.0;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int b = PER * threadIdx.x + j;
    const double a2 = a + wt[j];
    if (mine > SB && b <= SB && s.count[b] > 0 && (strict ? a2 > target : a2 >= target)) mine = b, before = a;
    a = a2;
  }
  const int c = block_reduce(mine, s.iscr, lserve::MinOp(), SB + 1);
  if (c > SB) return ~0ull;
  if (mine == c) s.before = before;
  if (c != s.bin) {
    if (s.count[c] > SCAP) {
      fail = true;
      return ~0ull;
    }
    gather_bin(s, x, vocab, temp, bins, rl, c);
  }
  __syncthreads();
  // the gathered logits in order, 4 a thread: the first whose cumulative weight crosses
  const int n = s.n, j0 = 4 * threadIdx.x;
  double g[4], lsum = 0.0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int q = j0 + j;
    g[j] = q < n && s.key[q] <= bound ? (mass ? s.w[q] : 1.0) : 0.0;
    lsum += g[j];
  }
  double a3 = s.before + block_excl_scan(lsum, s.dscr);
  int hit = SCAP, last = -1;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int q = j0 + j;
    if (q < n && s.key[q] <= bound) {
      last = q;
      const double a4 = a3 + g[j];
      if (hit == SCAP && (strict ? a4 > target : a4 >= target)) hit = q;
      a3 = a4;
    }
  }
  hit = block_reduce(hit, s.iscr, lserve::MinOp(), SCAP);
  if (hit == SCAP) hit = block_reduce(last, s.iscr, lserve::MaxOp(), -1);  // crossed by the bins' rounding only
  return s.key[hit];
}

// Cumulative mass of the logits with key <= bound (bb: its bin; SB + 1: all).
__device__ double hist_mass(HistSmem& s, u64 bound, int bb) {
  double t = 0.0;
  for (int b = threadIdx.x; b <= SB && b < bb; b += blockDim.x) t += s.mass[b];
  t = block_reduce(t, s.dscr, lserve::SumOp(), 0.0);
  return bb <= SB ? t + gathered_weight(s, bound, true) : t;
}

// One row by the histogram path from its bounds (gstat) and histogram (gcount, gmass) that sample_bounds and
// sample_fill made; false when a crossing bin is too large (the caller takes the radix path).
__device__ bool sample_hist(HistSmem& s, const float* x, int vocab, float temp, int k, double p, double u,
                            const unsigned int* gstat, const int* gcount, const double* gmass, const RowLists& rl,
                            long long* out) {
  const Bins bins = stat_bins(gstat);
  for (int b = threadIdx.x; b <= SB; b += blockDim.x) s.count[b] = __ldcg(gcount + b), s.mass[b] = __ldcg(gmass + b);
  if (threadIdx.x == 0) s.bin = -1, s.n = 0;
  __syncthreads();
  bool fail = false;
  u64 bound = ~0ull;
  int bb = SB + 1;
  if (k > 0 && k < vocab) {
    bound = hist_select(s, x, vocab, temp, bins, rl, (double)k, false, false, bound, bb, fail);
    if (fail) return false;
    bb = s.bin;
  }
  double total = hist_mass(s, bound, bb);
  if (p < 1.0) {
    const u64 b = hist_select(s, x, vocab, temp, bins, rl, p * total, false, true, bound, bb, fail);
    if (fail) return false;
    if (b != ~0ull) {
      bound = b, bb = s.bin;
      total = hist_mass(s, bound, bb);
    }
  }
  u64 pick = hist_select(s, x, vocab, temp, bins, rl, u * total, true, true, bound, bb, fail);
  if (fail || (pick == ~0ull && bound == ~0ull)) return false;  // (the last logit of an unbounded row: radix path)
  if (pick == ~0ull) pick = bound;  // u * total beyond the rounded sum: the last kept logit, as the CPU's clamp
  if (threadIdx.x == 0) *out = (long long)(pick & 0xffffffffu);
  return true;
}

// The histogram of sample_hist spread over the GPU: grid (G, rows), block g takes logits [g * chunk, (g + 1) *
// chunk) of a sampled row (temperature != 0). sample_bounds: atomicMax of the ordered maximum and of the ordered
// negated smallest finite value into gstat [rows, 2]; sample_fill: the block's count and mass per bin (bins from
// gstat), added into gcount / gmass [rows, SB + 1] (zeroed by the launcher first, as gstat), and the block's logits
// listed by bin when gidx is not null (RowLists: gidx [rows, vocab], gloc [rows, G, SB + 2]) so that a selection
// gathers its bin without reading the row again (cuda_sampling.LIST_ELEMENTS: for a few rows only; the lists'
// scattered stores cost more than they save in large batches). (sample_rows' own block
// made them at first: 130 us a 128k row at temperature 1 on an H200, most of it these two passes.)
__global__ void sample_bounds(const float* __restrict__ logits, long long stride, int vocab, int chunk,
                              const double* __restrict__ params, unsigned int* __restrict__ gstat) {
  lserve::pdl_enter();
  const int row = blockIdx.y, lo = blockIdx.x * chunk, hi = min(vocab, lo + chunk);
  const float temp = (float)params[row];
  if (temp == 0.f) return;
  float vmax, vmin;
  row_bounds(logits + row * stride, lo, hi, temp, vmax, vmin);
  if (threadIdx.x == 0) {
    if (!isnan(vmax)) atomicMax(gstat + 2 * row, ordered(vmax));
    if (isfinite(vmin)) atomicMax(gstat + 2 * row + 1, ordered(-vmin));
  }
}

__global__ void sample_fill(const float* __restrict__ logits, long long stride, int vocab, int chunk,
                            const double* __restrict__ params, const unsigned int* __restrict__ gstat,
                            int* __restrict__ gcount, double* __restrict__ gmass, int* __restrict__ gidx,
                            int* __restrict__ gloc) {
  lserve::pdl_enter();
  __shared__ int count[SB + 1];  // the block's logits per bin, then its listing's cursors
  __shared__ double mass[SB + 1];
  __shared__ int start[SB + 2];  // where each bin's logits start in the block's list
  __shared__ int iscr[32];
  const int row = blockIdx.y, lo = blockIdx.x * chunk, hi = min(vocab, lo + chunk);
  const float temp = (float)params[row];
  if (temp == 0.f) return;
  const float* x = logits + row * stride;
  const Bins bins = stat_bins(gstat + 2 * row);
  const float vmax = bins.vmax;
  for (int b = threadIdx.x; b <= SB; b += blockDim.x) count[b] = 0, mass[b] = 0.0;
  __syncthreads();
  for_row(x, lo, hi, temp, [&](int, float v, bool ok) {
    if (ok) {
      const int b = bins(v);
      atomicAdd(count + b, 1);
      atomicAdd(mass + b, exp((double)(v - vmax)));
    }
  });
  __syncthreads();
  const long long base = (long long)row * (SB + 1);
  constexpr int PER = (SB + 1 + FILL_THREADS) / FILL_THREADS;  // bins a thread scans (start[SB + 1]: the total)
  int own = 0;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int b = PER * threadIdx.x + j;
    if (b <= SB) {
      own += count[b];
      if (count[b]) {
        atomicAdd(gcount + base + b, count[b]);
        atomicAdd(gmass + base + b, mass[b]);
      }
    }
  }
  if (!gidx) return;  // no lists
  int before = block_excl_scan(own, iscr);  // start: the exclusive prefix of count (thread order = bin order)
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int b = PER * threadIdx.x + j;
    if (b <= SB + 1) start[b] = before;
    if (b <= SB) before += count[b];
  }
  __syncthreads();
  int* loc = gloc + ((long long)row * gridDim.x + blockIdx.x) * (SB + 2);
  for (int b = threadIdx.x; b <= SB + 1; b += blockDim.x) loc[b] = start[b];
  for (int b = threadIdx.x; b <= SB; b += blockDim.x) count[b] = 0;
  __syncthreads();
  int* idx = gidx + (long long)row * vocab + lo;
  for_row(x, lo, hi, temp, [&](int i, float v, bool ok) {
    if (ok) {
      const int b = bins(v);
      idx[start[b] + atomicAdd(count + b, 1)] = i;
    }
  });
}

// params [4, rows] float64: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), uniform u in [0, 1).
// One block of SAMPLE_THREADS a row; dynamic shared memory: HistSmem. gstat / gcount / gmass / gidx / gloc:
// sample_fill's histograms and lists (nblk blocks of chunk logits a row). radix != 0 takes the radix path (the
// pointers unused: the harness checks both paths).
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(const float* __restrict__ logits, long long stride, int vocab, const double* __restrict__ params,
                const unsigned int* __restrict__ gstat, const int* __restrict__ gcount,
                const double* __restrict__ gmass, const int* __restrict__ gidx, const int* __restrict__ gloc,
                int nblk, int chunk, int radix, long long* __restrict__ out) {
  lserve::pdl_enter();
  extern __shared__ double hist_smem[];
  HistSmem& hs = *reinterpret_cast<HistSmem*>(hist_smem);
  __shared__ SelectSmem sm;
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ u64 kscratch[32];
  const int row = blockIdx.x;
  const float* x = logits + row * stride;
  const int rows = gridDim.x;
  const float temp = (float)params[row];  // np.float32(temperature), as the CPU sampler
  if (temp == 0.f) {
    float unused_m, unused_l;
    const u64 best = block_reduce(thread_best<false>(x, 0, vocab, unused_m, unused_l), kscratch, lserve::MinOp(), ~0ull);
    if (threadIdx.x == 0) out[row] = (long long)(best & 0xffffffffu);
    return;
  }
  const int k = (int)params[rows + row];
  const double p = params[2 * rows + row], u = params[3 * rows + row];
  const long long hb = (long long)row * (SB + 1);
  const RowLists rl{gidx ? gidx + (long long)row * vocab : nullptr,
                    gidx ? gloc + (long long)row * nblk * (SB + 2) : nullptr, nblk, chunk};
  if (!radix && sample_hist(hs, x, vocab, temp, k, p, u, gstat + 2 * row, gcount + hb, gmass + hb, rl, out + row))
    return;
  float m = -__int_as_float(0x7f800000);
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, __fdiv_rn(x[i], temp));
  const float xmax = block_reduce(m, fscratch, lserve::MaxOp(), -__int_as_float(0x7f800000));

  u64 bound = ~0ull;
  if (k > 0 && k < vocab) bound = select_key(x, vocab, temp, xmax, bound, (double)k, false, false, sm);
  double total = mass_below(x, vocab, temp, xmax, bound, dscratch);
  if (p < 1.0) {
    const u64 b = select_key(x, vocab, temp, xmax, bound, p * total, false, true, sm);
    if (b != ~0ull) {
      bound = b;
      total = mass_below(x, vocab, temp, xmax, bound, dscratch);
    }
  }
  u64 pick = select_key(x, vocab, temp, xmax, bound, u * total, true, true, sm);
  if (pick == ~0ull) {  // u * total beyond the rounded sum: the last kept element, as the CPU's clamp
    u64 last = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const u64 key = sort_key(__fdiv_rn(x[i], temp), i);
      if (key <= bound) last = max(last, key);
    }
    pick = block_reduce(last, kscratch, lserve::MaxOp(), 0ull);
  }
  if (threadIdx.x == 0) out[row] = (long long)(pick & 0xffffffffu);
}

// logits[rows[i], ids[i]] /= penalty (if > 0) or *= penalty: repetition penalty over each row's unique ids.
__global__ void apply_penalty(float* __restrict__ logits, long long stride, const int* __restrict__ rows,
                              const long long* __restrict__ ids, const float* __restrict__ pens, int n) {
  lserve::pdl_enter();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float* p = logits + rows[i] * stride + ids[i];
  const float v = *p, pen = pens[i];
  *p = v > 0.f ? v / pen : v * pen;
}

// logits[rows[i], ids[i]] += deltas[i]: presence / frequency penalties and logit bias (unique ids per row).
__global__ void add_logits(float* __restrict__ logits, long long stride, const int* __restrict__ rows,
                           const long long* __restrict__ ids, const float* __restrict__ deltas, int n) {
  lserve::pdl_enter();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  logits[rows[i] * stride + ids[i]] += deltas[i];
}

// -inf where bit (i % 32) of word masks[r, i / 32] is 0: a grammar's allowed tokens (llguidance's layout).
// Grid (ceil(vocab / blockDim.x), masked rows); rows[r] is the logit row of mask r.
__global__ void mask_logits(float* __restrict__ logits, long long stride, int vocab, const int* __restrict__ rows,
                            const int* __restrict__ masks, int words) {
  lserve::pdl_enter();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
  if (i >= vocab) return;
  const unsigned int w = (unsigned int)masks[(long long)r * words + (i >> 5)];
  if (!((w >> (i & 31)) & 1u)) logits[rows[r] * stride + i] = -__int_as_float(0x7f800000);
}

// vLLM's min_p: -inf on each listed row's logits less probable, after temperature, than min_p times the most
// probable one, i.e. exp(x / T - max) < min_p, as the reference's _min_p_kept (a float32 difference, a float64 exp).
// A row where none passes (NaN in it, or +inf) keeps only the first of its order, the largest non-NaN value at the
// lowest index (the reference's max(1, count)), as a finite 0 beside -inf everywhere else. One block a listed row (rows[r] of logits, min_p[r]); the
// temperature is the row's in params [4, rows], as sample_rows reads it.
constexpr int MINP_THREADS = 1024;  // cuda_sampling.MINP_THREADS
__global__ void __launch_bounds__(MINP_THREADS)
    min_p_mask(float* __restrict__ logits, long long stride, int vocab, const double* __restrict__ params,
               const int* __restrict__ rows, const double* __restrict__ min_p) {
  lserve::pdl_enter();
  __shared__ float fscratch[32];
  __shared__ int iscratch[32];
  __shared__ u64 kscratch[32];
  const int row = rows[blockIdx.x];
  float* x = logits + row * stride;
  const float temp = (float)params[row], ninf = -__int_as_float(0x7f800000);
  const double mp = min_p[blockIdx.x];
  float m = ninf;
  int nan = 0;
  u64 first = ~0ull;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = __fdiv_rn(x[i], temp);
    if (isnan(v)) {
      nan = 1;
    } else {
      m = fmaxf(m, v);
      first = min(first, sort_key(v, i));
    }
  }
  const float vmax = block_reduce(m, fscratch, lserve::MaxOp(), ninf);
  nan = block_reduce(nan, iscratch, lserve::MaxOp(), 0);
  first = block_reduce(first, kscratch, lserve::MinOp(), ~0ull);
  int kept = 0;
  for (int i = threadIdx.x; i < vocab && !nan; i += blockDim.x) kept += exp((double)(__fdiv_rn(x[i], temp) - vmax)) >= mp;
  kept = block_reduce(kept, iscratch, lserve::SumOp(), 0);
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = __fdiv_rn(x[i], temp);
    const bool keep = kept ? exp((double)(v - vmax)) >= mp : (first == ~0ull ? i == 0 : sort_key(v, i) == first);
    if (!keep || !kept) x[i] = keep ? 0.f : ninf;  // a lone +inf would leave the sampler inf - inf
  }
}

// Log-softmax of each raw row: lp[row] of chosen[row], and the k <= LP_K most likely ids (descending, ties by index,
// as np.argsort(-x, kind="stable")) with their logprobs [rows, k]. Grid (rows, G): block g reads logits [g * chunk,
// (g + 1) * chunk) once, keeping per thread a running max and float64 sum of exp (float exps: about 1e-7 relative
// each) and its k smallest sort keys in registers; the block merges them (max, rescaled sums; k rounds of a block
// minimum) into part_m / part_s / part_k [rows, G (, LP_K)], and the row's last block to finish (a ticket it resets)
// merges the G partials. One block a row with a pass per top-k id took about 50 us a pass at a 128k vocabulary.
constexpr int LP_K = 20;         // sampling_params.MAX_LOGPROBS
constexpr int LP_THREADS = 256;  // cuda_sampling.LP_THREADS

// The LP_K smallest keys seen, ascending (~0: none), in registers (a runtime k would index them dynamically, into
// local memory: the first k of them are used).
struct TopKeys {
  u64 v[LP_K];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < LP_K; ++i) v[i] = ~0ull;
  }
  __device__ __forceinline__ void push(u64 key) {
    if (key >= v[LP_K - 1]) return;
#pragma unroll
    for (int i = 0; i < LP_K; ++i) {  // insertion, the largest drops out
      const u64 lo = min(v[i], key);
      key = max(v[i], key);
      v[i] = lo;
    }
  }
  __device__ __forceinline__ void pop() {
#pragma unroll
    for (int i = 0; i < LP_K - 1; ++i) v[i] = v[i + 1];
    v[LP_K - 1] = ~0ull;
  }
};

// Logit v (index i) into a thread's running max m, sum s of exp(. - m) and k smallest keys.
__device__ __forceinline__ void lp_visit(float v, int i, int k, float& m, double& s, TopKeys& top) {
  if (v > m) {
    s = (m == -__int_as_float(0x7f800000) ? 0.0 : s * (double)expf(m - v)) + 1.0;
    m = v;
  } else {
    s += (double)expf(v - m);
  }
  if (k) top.push(sort_key(v, i));
}

// (m, s) <- the block's max of m and sum of s * exp(m - max) (every thread gets both).
__device__ __forceinline__ void merge_lse(float& m, double& s, float* fscr, double* dscr) {
  const float bm = block_reduce(m, fscr, lserve::MaxOp(), -__int_as_float(0x7f800000));
  s = block_reduce(m == bm ? s : s * exp((double)m - (double)bm), dscr, lserve::SumOp(), 0.0);
  m = bm;
}

__global__ void __launch_bounds__(LP_THREADS)
    logprob_rows(const float* __restrict__ logits, long long stride, int vocab, int chunk,
                 const long long* __restrict__ chosen, int k, float* __restrict__ part_m, double* __restrict__ part_s,
                 u64* __restrict__ part_k, unsigned int* __restrict__ tick, float* __restrict__ lp,
                 long long* __restrict__ top_ids, float* __restrict__ top_lp) {
  lserve::pdl_enter();
  __shared__ float fscr[32];
  __shared__ double dscr[32];
  __shared__ u64 kscr[32];
  __shared__ bool last;
  const int row = blockIdx.x, g = blockIdx.y, G = gridDim.y;
  const float* x = logits + row * stride;
  const int lo = g * chunk, hi = min(vocab, lo + chunk);
  float m = -__int_as_float(0x7f800000);
  double s = 0.0;
  TopKeys top;
  top.init();
  for_row(x, lo, hi, 1.f, [&](int i, float v, bool ok) {  // (v / 1 is v)
    if (ok) lp_visit(v, i, k, m, s, top);
  });
  merge_lse(m, s, fscr, dscr);
  const long long pb = (long long)row * G + g;
  for (int j = 0; j < k; ++j) {  // the block's k smallest keys: k rounds of a block minimum, the owner pops
    const u64 head = top.v[0], best = block_reduce(head, kscr, lserve::MinOp(), ~0ull);
    if (head == best && best != ~0ull) top.pop();
    if (threadIdx.x == 0) part_k[pb * LP_K + j] = best;
  }
  if (threadIdx.x == 0) {
    part_m[pb] = m, part_s[pb] = s;
    __threadfence();  // the partials are visible before the ticket says so
    last = atomicAdd(tick + row, 1u) == (unsigned int)G - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  m = -__int_as_float(0x7f800000), s = 0.0;
  for (int q = threadIdx.x; q < G; q += blockDim.x) {
    const float qm = __ldcg(part_m + (long long)row * G + q);
    const double qs = __ldcg(part_s + (long long)row * G + q);
    if (qm > m) {
      s = (m == -__int_as_float(0x7f800000) ? 0.0 : s * exp((double)m - (double)qm)) + qs;
      m = qm;
    } else {
      s += qs * exp((double)qm - (double)m);
    }
  }
  merge_lse(m, s, fscr, dscr);
  const double lse = (double)m + log(s);
  if (threadIdx.x == 0) {
    lp[row] = (float)((double)x[chosen[row]] - lse);
    tick[row] = 0;  // ready for the next launch
  }
  // the row's k smallest of the G * k candidates: each thread holds its share, k rounds of a block minimum
  TopKeys mine;
  mine.init();
  for (int c = threadIdx.x; c < G * k; c += blockDim.x)
    mine.push(__ldcg(part_k + ((long long)row * G + c / k) * LP_K + c % k));
  for (int j = 0; j < k; ++j) {
    const u64 head = mine.v[0], best = block_reduce(head, kscr, lserve::MinOp(), ~0ull);
    if (head == best && best != ~0ull) mine.pop();
    if (threadIdx.x == 0) {  // (fewer than k logits: id -1, logprob -inf)
      const int id = best == ~0ull ? -1 : (int)(best & 0xffffffffu);
      top_ids[(long long)row * k + j] = id;
      top_lp[(long long)row * k + j] = id < 0 ? -__int_as_float(0x7f800000) : (float)((double)x[id] - lse);
    }
  }
}
