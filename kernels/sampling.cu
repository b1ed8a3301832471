// Token sampling on the GPU: one block per row of float32 logits; only token ids go back to the host.
// Reference: lserve_lite/backends/reference/sampling.py (sample, sample_row, additive_terms, allowed_tokens,
// logprobs_ref). Launchers: lserve_lite/backends/cuda_sampling.py.
// Before sampling, on a copy of the logits: apply_penalty (repetition), add_logits (presence / frequency
// penalties and logit bias, as (row, id, amount) triples), mask_logits (a grammar's allowed-token bitmask).
// logprob_rows reads the raw logits: log-softmax of the chosen id and the top-k, only those numbers go back.
//
// The CPU sampler sorts the tempered logits (descending, ties by index), keeps the top_k, then the
// smallest prefix whose probability reaches top_p, and picks by inverse CDF with one uniform u per row.
// Here no sort: every element gets a 64-bit sort key (descending value, then ascending index), and a
// radix select over the keys (8 bits a pass, histograms of counts or of exp masses) finds the element
// where a cumulative weight crosses a target -- the k-th element, the top-p boundary, the sampled one.
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

// This thread's smallest sort key over x[0 .. vocab) (the block's smallest: the first index of the maximum). A
// 16-byte aligned row is read as float4, four loads in flight per thread (a scalar loop of one load at a time took
// 51 us for a 128k vocabulary on an H200: a chain of L2 round trips; this reads it at L2 speed).
__device__ __forceinline__ u64 thread_best(const float* __restrict__ x, int vocab) {
  u64 best = ~0ull;
  int tail = 0;
  if ((reinterpret_cast<unsigned long long>(x) & 15) == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int n4 = vocab / 4;
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
      const float4 v = x4[i];
      const u64 a = min(sort_key(v.x, 4 * i), sort_key(v.y, 4 * i + 1));
      const u64 b = min(sort_key(v.z, 4 * i + 2), sort_key(v.w, 4 * i + 3));
      best = min(best, min(a, b));
    }
    tail = n4 * 4;
  }
  for (int i = tail + threadIdx.x; i < vocab; i += blockDim.x) best = min(best, sort_key(x[i], i));
  return best;
}

// First index of the row maximum (np.argmax). One block per row.
__global__ void argmax_rows(const float* __restrict__ logits, long long stride, int vocab, int* __restrict__ out) {
  lserve::pdl_enter();
  __shared__ u64 scratch[32];
  const float* x = logits + blockIdx.x * stride;
  u64 best = block_reduce(thread_best(x, vocab), scratch, lserve::MinOp(), ~0ull);
  if (threadIdx.x == 0) out[blockIdx.x] = (int)(best & 0xffffffffu);
}

// params [4, rows] float64: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), uniform u in [0, 1).
__global__ void sample_rows(const float* __restrict__ logits, long long stride, int vocab,
                            const double* __restrict__ params, int* __restrict__ out) {
  lserve::pdl_enter();
  __shared__ SelectSmem sm;
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ u64 kscratch[32];
  const int row = blockIdx.x;
  const float* x = logits + row * stride;
  const int rows = gridDim.x;
  const float temp = (float)params[row];  // np.float32(temperature), as the CPU sampler
  if (temp == 0.f) {
    const u64 best = block_reduce(thread_best(x, vocab), kscratch, lserve::MinOp(), ~0ull);
    if (threadIdx.x == 0) out[row] = (int)(best & 0xffffffffu);
    return;
  }
  float m = -__int_as_float(0x7f800000);
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, __fdiv_rn(x[i], temp));
  const float xmax = block_reduce(m, fscratch, lserve::MaxOp(), -__int_as_float(0x7f800000));

  u64 bound = ~0ull;
  const int k = (int)params[rows + row];
  if (k > 0 && k < vocab) bound = select_key(x, vocab, temp, xmax, bound, (double)k, false, false, sm);
  double total = mass_below(x, vocab, temp, xmax, bound, dscratch);
  const double p = params[2 * rows + row];
  if (p < 1.0) {
    const u64 b = select_key(x, vocab, temp, xmax, bound, p * total, false, true, sm);
    if (b != ~0ull) {
      bound = b;
      total = mass_below(x, vocab, temp, xmax, bound, dscratch);
    }
  }
  u64 pick = select_key(x, vocab, temp, xmax, bound, params[3 * rows + row] * total, true, true, sm);
  if (pick == ~0ull) {  // u * total beyond the rounded sum: the last kept element, as the CPU's clamp
    u64 last = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const u64 key = sort_key(__fdiv_rn(x[i], temp), i);
      if (key <= bound) last = max(last, key);
    }
    pick = block_reduce(last, kscratch, lserve::MaxOp(), 0ull);
  }
  if (threadIdx.x == 0) out[row] = (int)(pick & 0xffffffffu);
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

// Log-softmax of each raw row (float64 sum): lp[row] of chosen[row], and the k most likely ids (descending,
// ties by index, as np.argsort(-x, kind="stable")) with their logprobs [rows, k]. One block per row.
__global__ void logprob_rows(const float* __restrict__ logits, long long stride, int vocab,
                             const long long* __restrict__ chosen, int k, float* __restrict__ lp,
                             long long* __restrict__ top_ids, float* __restrict__ top_lp) {
  lserve::pdl_enter();
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ u64 kscratch[32];
  const int row = blockIdx.x;
  const float* x = logits + row * stride;
  float m = -__int_as_float(0x7f800000);
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, x[i]);
  const double xmax = (double)block_reduce(m, fscratch, lserve::MaxOp(), -__int_as_float(0x7f800000));
  double s = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += exp((double)x[i] - xmax);
  const double lse = xmax + log(block_reduce(s, dscratch, lserve::SumOp(), 0.0));
  if (threadIdx.x == 0) lp[row] = (float)((double)x[chosen[row]] - lse);
  u64 prev = 0;
  for (int j = 0; j < k; ++j) {  // the j-th smallest sort key: the smallest above the (j-1)-th
    u64 best = ~0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const u64 key = sort_key(x[i], i);
      if (j == 0 || key > prev) best = min(best, key);
    }
    prev = block_reduce(best, kscratch, lserve::MinOp(), ~0ull);
    if (threadIdx.x == 0) {
      const int id = (int)(prev & 0xffffffffu);
      top_ids[(long long)row * k + j] = id;
      top_lp[(long long)row * k + j] = (float)((double)x[id] - lse);
    }
  }
}
