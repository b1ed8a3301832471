// Decode GEMV with int8 activations over the "split" device layout of the quantized formats (GGUF Q8_0 / Q4_0 /
// Q4_1 / Q4_K / Q6_K, our int8 / int4). Launchers: lserve_lite/backends/cuda_quant.py;
// the host repacking that makes the layout: lserve_lite/backends/quant_split.py; references: QuantTensor /
// gguf.quants.dequantize times x in float64 (harness/quant.py), with the activation rounding bounded there.
//
// Why another layout: GGUF blocks are 18-210 bytes (scales inline), so a lane cannot read them with aligned
// 16-byte loads, and multiplying fp16 x by each dequantized weight in float32 costs ~4 instructions per weight:
// the H200 measured that at 0.16-0.5x of the copy bandwidth. Split at upload (exact, no float copy):
//   q [M, K * BITS / 8]   the integers: 32 values a 32-BITS/8-byte chunk; 4-bit chunk byte i = v[i] | v[i + 16] << 4
//                         (Q4_0 / Q4_1's own nibble order; int4's 128-blocks and Q4_K's sub-block pairs are
//                         re-nibbled to it); 8-bit: signed bytes (Q6_K: q6 - 32)
//   d [M, NG] fp16        scale per group of CPG chunks (CPG = 0: one per row, int8's per-channel scale)
//   m [M, NG] fp16        additive term (Q4_1; Q4_K's -dmin)
//   sub [M, K / 32] x 2 int8   the k-quants' integer sub-scales, two bytes a chunk (SUB: values per sub-scale):
//                         Q4_K's 6-bit scale and min multiplier of the chunk (SUB = 32), Q6_K's scales of
//                         values 0-15 and 16-31 (SUB = 16)
// and w = d * sub * (q - Z) + m * sub_m (sub = 1 without SUB). Each block first quantizes the n rows of x to
// int8 per 32 values into shared memory (dx = max|x| / 127, xq = round(x / dx), s = sum xq: llama.cpp's q8_1
// scheme; the logits add a second pass on the rounding residual, P = 2), then each warp takes groups of R output
// rows, strided over the grid's warps (a grid of what is resident at once: every warp loops over several);
// lane l reads chunks l, l + 32, ... of each row with 16-byte loads, U chunks x R rows an item, each item's loads
// issued into one of two register sets before the previous item's math (the first before x is quantized), and
// sums q * xq with dp4a (exact int32, the sub-scales multiplied in as integers); per chunk
// y += dx * (d * (sum - Z s) + m s) (s times Q4_K's min multiplier; s is not used where Z = 0 and there is no m:
// q8_0, q6_k, int8).

#include <cuda_fp16.h>

#include "pdl.cuh"
#include "rope_out.cuh"
#include "spread_norm.cuh"

typedef unsigned char u8;

// A split format: BITS per value, CPG chunks of 32 values per scale group (0: one per row), an additive
// term (MIN), the zero point Z subtracted from q, and SUB values per integer sub-scale (0: none; 32: one a chunk,
// with MIN the additive term's multiplier beside it; 16: two a chunk).
template <int BITS_, int CPG_, bool MIN_, int Z_, int SUB_ = 0>
struct Split {
  static constexpr int BITS = BITS_, CPG = CPG_, Z = Z_, SUB = SUB_;
  static constexpr bool MIN = MIN_;
  static constexpr int WORDS = BITS;  // 32-bit words per 32-value chunk (4 for 4-bit, 8 for 8-bit)
  static_assert(SUB == 0 || SUB == 16 || SUB == 32, "sub-scales per chunk or half chunk");
  static_assert(SUB != 16 || (Z == 0 && !MIN), "per-half sub-scales leave no term for Z or m");
};
typedef Split<8, 1, false, 0> SQ8_0;
typedef Split<4, 1, false, 8> SQ4_0;
typedef Split<4, 1, true, 0> SQ4_1;
typedef Split<8, 0, false, 0> SINT8;
typedef Split<4, 4, false, 8> SINT4;
typedef Split<4, 8, true, 0, 32> SQ4_K;
typedef Split<8, 8, false, 0, 16> SQ6_K;

constexpr int SWARPS = 8;  // warps per block; cuda_quant.SPLIT_WARPS

// Groups of scales in a row of K values.
template <typename F>
__device__ __forceinline__ int groups_per_row(int K) {
  return F::CPG ? K / (32 * F::CPG) : 1;
}

// x rows [n, K] fp16 -> xq [P][n][K / 4] words of int8 and xs [P][n][K / 32] {dx, sum of the chunk's xq}.
// P = 2 (the logits): pass 1 rounds the residual x - dx * xq of pass 0 the same way, so the two passes
// together leave each value off by dx' / 2 ~ dx / 508 (cpu_quant.logits_q's scheme).
// NORM (spread_norm.cuh): the rows are r * w of the residual stream sp.res instead of x (rstd applied later).
template <int P, bool NORM = false>
__device__ __forceinline__ void quantize_x(const __half* __restrict__ x, int n, int K, int* xq, float2* xs,
                                           const lserve::Spread& sp) {
  const int nc = K / 32;
  for (int c = threadIdx.x; c < n * nc; c += blockDim.x) {
    float f[32];
    if constexpr (NORM) {
      lserve::spread_normed32(sp, K, c, f);
    } else {
      const uint4* src = reinterpret_cast<const uint4*>(x + (long long)c * 32);  // rows are contiguous
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint4 v = __ldg(src + i);
        const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 p = __half22float2(h[j]);
          f[8 * i + 2 * j] = p.x, f[8 * i + 2 * j + 1] = p.y;
        }
      }
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(f[i]));
      const float dx = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      int s = 0;
#pragma unroll
      for (int w = 0; w < 8; ++w) {
        unsigned word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int v = __float2int_rn(f[4 * w + b] * id);
          f[4 * w + b] -= dx * (float)v;  // the residual, for the next pass
          s += v;
          word |= (unsigned)(v & 255) << (8 * b);
        }
        xq[(p * n * nc + c) * 8 + w] = (int)word;
      }
      xs[p * n * nc + c] = make_float2(dx, (float)s);
    }
  }
}

// acc + the dot product q . xq of half H of a chunk (values 16H .. 16H + 15, xq words 4H .. 4H + 3): 8-bit words
// 4H .. 4H + 3; 4-bit chunks hold v[i] in the low and v[i + 16] in the high nibble of byte i, so nibble H of
// words 0-3.
template <typename F, int H>
__device__ __forceinline__ int half_dot(const unsigned (&w)[F::WORDS], const int* xw, int acc) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const unsigned v = F::BITS == 8 ? w[4 * H + j] : (w[j] >> (4 * H)) & 0x0F0F0F0Fu;
    acc = __dp4a((int)v, xw[4 * H + j], acc);
  }
  return acc;
}

// The chunk's (q - Z) . xq times its integer sub-scales (byte b of `sub`: sub-scale b), exact in int32 and in its
// float: at most 2 * 16 * 32 * 127 * 128 < 2^24 (Q6_K), 32 * 15 * 127 * 63 (Q4_K). zs = Z * (sum of the chunk's
// xq); without sub-scales it starts the dp4a chain (the same integer, one subtraction fewer).
template <typename F>
__device__ __forceinline__ int chunk_dot(const unsigned (&w)[F::WORDS], const int* xw, int sub, int zs) {
  if constexpr (F::SUB == 16)
    return (signed char)sub * half_dot<F, 0>(w, xw, 0) + (signed char)(sub >> 8) * half_dot<F, 1>(w, xw, 0);
  if constexpr (F::SUB == 32) return (int)(signed char)sub * half_dot<F, 1>(w, xw, half_dot<F, 0>(w, xw, 0)) - zs;
  return half_dot<F, 1>(w, xw, half_dot<F, 0>(w, xw, -zs));
}

// v (the chunk's sum of xq, an exact float, or its additive term) times the chunk's min multiplier (Q4_K's m_j;
// 1 for the other formats): exact, products of small integers / of an fp16 and a 6-bit integer.
template <typename F>
__device__ __forceinline__ float times_min_sub(float v, int sub) {
  return F::SUB == 32 ? (float)(signed char)(sub >> 8) * v : v;
}

// The output a warp's accumulator row i belongs to (m0 + i), and the row of W it reads: the same, with SILU
// (W = [gate; up], M outputs) the gate rows m0 .. m0 + R/2 - 1 of outputs m0 + i, then their up rows M + m0 ..,
// with ROPE output m0 + i in rope_out.cuh's paired order (D: the head dim).
template <int R, bool SILU>
__device__ __forceinline__ int acc_output(int m0, int i) {
  return SILU ? m0 + i % (R / 2) : m0 + i;
}
template <int R, bool SILU, int ROPE>
__device__ __forceinline__ int acc_row(int m0, int i, int M, int D) {
  if (ROPE != 0) return lserve::rope_row(m0 + i, D);
  return SILU && i >= R / 2 ? M + m0 + i - R / 2 : m0 + i;
}

// Chunks a lane holds in one register set: ~4 16-byte loads for the R rows (8-bit at R = 4: 8). The kernel keeps
// two sets, one in flight while the other is used, so a set is half of what one load round used to hold.
template <typename F, int R>
constexpr int SPLIT_U = (4 / R) / (F::BITS / 4) > 0 ? (4 / R) / (F::BITS / 4) : 1;

// Blocks per SM ptxas is told to fit (__launch_bounds__): at batch 1 with ~4 loads a set, 3 (<= 80 registers; left
// to itself ptxas aimed several at 64 and spilled; Q4_K with SILU spills at 80); the deep sets (UX = 2) 2 (<= 128
// registers; Q4_K spills there: 1); elsewhere 1 (no cap below 255).
template <typename F, int R, int NMAX, int P, bool SILU, int UX>
constexpr int SPLIT_MIN_BLOCKS =
    UX > 1 ? (F::SUB == 32 ? 1 : 2)
           : (NMAX == 1 && P == 1 && SPLIT_U<F, R> * R * F::WORDS <= 16 && !(SILU && F::SUB == 32) ? 3 : 1);

// One register set: chunks c0, c0 + 32, ... (U of them) of a warp's R rows; integers, scales, additive terms,
// sub-scales, and (CPG = 0) each row's scale, loaded here so that the epilogue waits on no load.
template <typename F, int R, int U>
struct Chunks {
  unsigned w[U][R][F::WORDS];
  float dd[U][R], mm[U][R];
  int ss[U][R];
  float rs[R];
};

// Loads the set of the warp's rows m0.. (acc_row) at chunk c0: rows past M and chunks past nc are left as they are.
template <typename F, int R, int U, bool SILU, int ROPE>
__device__ __forceinline__ void load_chunks(const u8* __restrict__ q, const __half* __restrict__ d,
                                            const __half* __restrict__ mn, const unsigned short* __restrict__ sub,
                                            int c0, int nc, int ng, long long qrow, int m0, int M, int D,
                                            Chunks<F, R, U>& b) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int m = acc_row<R, SILU, ROPE>(m0, i, M, D);
    if (F::CPG == 0) b.rs[i] = acc_output<R, SILU>(m0, i) < M ? __half2float(__ldg(d + m)) : 0.f;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + 32 * u;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int m = acc_row<R, SILU, ROPE>(m0, i, M, D);
      if (c < nc && acc_output<R, SILU>(m0, i) < M) {
        const uint4* src = reinterpret_cast<const uint4*>(q + m * qrow + (long long)c * F::WORDS * 4);
#pragma unroll
        for (int h = 0; h < F::WORDS / 4; ++h) {
          const uint4 v = __ldg(src + h);
          b.w[u][i][4 * h] = v.x, b.w[u][i][4 * h + 1] = v.y, b.w[u][i][4 * h + 2] = v.z, b.w[u][i][4 * h + 3] = v.w;
        }
        const long long g = (long long)m * ng + (F::CPG ? c / F::CPG : 0);
        b.dd[u][i] = F::CPG ? __half2float(__ldg(d + g)) : 1.f;
        b.mm[u][i] = F::MIN ? __half2float(__ldg(mn + g)) : 0.f;
        b.ss[u][i] = F::SUB ? (int)__ldg(sub + (long long)m * nc + c) : 0;
      }
    }
  }
}

// acc += the set's chunks (c0 + 32 u < nc) times the n rows of x, P passes: each lane adds its chunks in the order
// c = lane, lane + 32, ... whatever U and the grid are, so the sums do not depend on them.
template <typename F, int R, int U, int NMAX, int P>
__device__ __forceinline__ void dot_chunks(const Chunks<F, R, U>& b, const int* xq, const float2* xs, int n, int nc,
                                           int c0, float (&acc)[R][NMAX]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + 32 * u;
    if (c < nc) {
#pragma unroll
      for (int r = 0; r < NMAX; ++r) {
        if (r < n) {
#pragma unroll
          for (int p = 0; p < P; ++p) {
            const int* xw = xq + ((p * n + r) * nc + c) * 8;
            const float2 sx = xs[(p * n + r) * nc + c];
            const int zs = F::Z * (int)sx.y;
#pragma unroll
            for (int i = 0; i < R; ++i) {
              float t = b.dd[u][i] * (float)chunk_dot<F>(b.w[u][i], xw, b.ss[u][i], zs);
              if (F::MIN) t = fmaf(b.mm[u][i], times_min_sub<F>(sx.y, b.ss[u][i]), t);
              acc[i][r] = fmaf(sx.x, t, acc[i][r]);
            }
          }
        }
      }
    }
  }
}

// The warp's sums over its lanes into y (outputs m0 .. m0 + R - 1, or R/2 with SILU: silu(gate) * up, each with
// int8's per-channel scale rs applied first), then acc cleared for the warp's next row group. ADD: each output
// (rounded to fp16) added to the stream's value `old` and stored into the stream instead of y, its square summed
// into lane 0's ss.
template <typename F, int R, int NMAX, typename TOut, bool SILU, int ROPE, bool ADD = false>
__device__ __forceinline__ void store_rows(float (&acc)[R][NMAX], const float (&rs)[R], int n, TOut* __restrict__ y,
                                           int ldy, int m0, int M, int lane, const lserve::RopeOut& ro,
                                           const lserve::Spread& sp, const float (&old)[R][NMAX],
                                           float (&ss)[NMAX]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int r = 0; r < NMAX; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[i][r] += __shfl_xor_sync(0xffffffffu, acc[i][r], o);
  if constexpr (ROPE != 0) {  // one RoPE pair (m0 even); int8's per-channel scales first
    static_assert(R == 2, "the RoPE epilogue takes one pair a warp");
    int fin = -1;
    if (lane == 0 && m0 < M) {
      const float ra = F::CPG ? 1.f : rs[0], rb = F::CPG ? 1.f : rs[1];
      float a[NMAX], b[NMAX];
#pragma unroll
      for (int r = 0; r < NMAX; ++r) a[r] = ra * acc[0][r], b[r] = rb * acc[1][r];
      fin = lserve::rope_store_rows<NMAX, ROPE>(ro, n, m0, a, b);
    }
    lserve::rope_finish<NMAX, ROPE>(ro, n, fin);
  } else if (lane == 0) {
#pragma unroll
    for (int i = 0; i < (SILU ? R / 2 : R); ++i) {
      const int m = m0 + i;
      if (m < M) {
        const float rg = F::CPG ? 1.f : rs[i];  // int8's per-channel scale, applied once
        if constexpr (SILU) {
          const float ru = F::CPG ? 1.f : rs[i + R / 2];  // the up row's
#pragma unroll
          for (int r = 0; r < NMAX; ++r) {
            if (r < n) {
              const float g = rg * acc[i][r];
              y[(long long)r * ldy + m] = __float2half(g / (1.0f + expf(-g)) * (ru * acc[i + R / 2][r]));
            }
          }
        } else if constexpr (ADD) {
#pragma unroll
          for (int r = 0; r < NMAX; ++r) {
            if (r < n) {
              const float v = lserve::spread_add(sp, r, m, old[i][r], rg * acc[i][r]);
              ss[r] = fmaf(v, v, ss[r]);
            }
          }
        } else {
#pragma unroll
          for (int r = 0; r < NMAX; ++r)
            if (r < n) y[(long long)r * ldy + m] = (TOut)(rg * acc[i][r]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int r = 0; r < NMAX; ++r) acc[i][r] = 0.f;
}

// A warp's position in its sequence of work items: row group g (outputs g * RO ..), K step s (chunks from
// 32 U s). Groups are strided over all warps of the grid; each group takes `steps` items.
struct SplitItem {
  int g, s;
  __device__ __forceinline__ void next(int steps, int gstride) {
    if (++s == steps) s = 0, g += gstride;
  }
};

// y[r * ldy + m] = sum_k x[r, k] W[m, k] for r < n <= NMAX, R rows of W per warp, x in P int8 passes.
// Dynamic shared memory: P * n * K bytes of xq + P * n * K / 32 float2 of xs. K % 32 == 0.
// Any grid: warp w of the grid takes row groups w, w + warps, ... (cuda_quant sizes it to what is resident at
// once, LSERVE_QGEMV_SPLIT=persist, or one group a warp, =grid); x is quantized once per block. Software
// pipeline: each (row group, K step) item's loads go to one of two register sets before the previous item's
// math and epilogue, so a warp always has loads in flight; the first item's before x is quantized.
// SILU (R even, TOut = __half, P = 1): W is the row-fused gate/up matrix [2M, K], a warp's R rows are R/2 gate
// rows and their up rows (acc_row), and y[r * ldy + m] = silu(g) * u on the float32 sums, each with int8's
// per-channel scale applied first (CudaOps.gate_up_silu; reference: silu_mul_ref(x @ W^T)).
// UX = 2 ("deep"): register sets of twice the chunks, for matrices with fewer row groups than the GPU holds warps
// (o_proj and down of a Llama-3-8B shape: 2,048 groups of 2 rows): their warps are all resident at 2 blocks per SM
// as well, and each keeps twice the bytes in flight (cuda_quant.split_deep decides).
// ROPE (quant_gemv_split_rope; rope_out.cuh's RopeKind: the cache's kind and KV format): W is the fused q/k/v
// matrix, outputs in rope_out.cuh's paired order, and the epilogue rotates each pair and writes q and the K/V page
// slots (`ro`; CudaOps.qkv_rope); every output's sum is quant_gemv_split's at R = 2.
// SP (spread_norm.cuh; quant_gemv_split_spread, quant_gemv_split_rope_spread): ADD adds the outputs into the
// residual stream sp.res and leaves the block's sum of squares in sp.part (no y); NORM reads the rows as
// RMSNorm(sp.res) from the partials (no x). Dynamic shared memory: SWARPS x NMAX floats more (spread_norm.cuh).
template <typename F, int R, int NMAX, int P, typename TOut, bool SILU, int UX, int ROPE, int SP = lserve::SPREAD_OFF>
__device__ __forceinline__ void quant_gemv_split_body(const u8* __restrict__ q, const __half* __restrict__ d,
                                                      const __half* __restrict__ mn,
                                                      const unsigned short* __restrict__ sub,
                                                      const __half* __restrict__ x, int n, TOut* __restrict__ y,
                                                      int ldy, int M, int K, const lserve::RopeOut& ro,
                                                      const lserve::Spread& sp) {
  static_assert(!SILU || R % 2 == 0, "SILU pairs gate and up rows in a warp");
  static_assert(ROPE == 0 || (R % 2 == 0 && !SILU), "ROPE pairs a head's channels j and j + D / 2 in a warp");
  constexpr int U = SPLIT_U<F, R> * UX, RO = SILU ? R / 2 : R;  // chunks per lane and set, outputs per warp
  extern __shared__ int4 smem[];
  int* xq = reinterpret_cast<int*>(smem);
  float2* xs = reinterpret_cast<float2*>(xq + P * n * (K / 4));
  float* spread_s = reinterpret_cast<float*>(xs + P * n * (K / 32));  // SP: rstd (NORM), warp sums (ADD)
  const int nc = K / 32, ng = groups_per_row<F>(K), steps = (nc + 32 * U - 1) / (32 * U);
  const long long qrow = (long long)K * F::BITS / 8;
  const int lane = threadIdx.x & 31, groups = (M + RO - 1) / RO, gstride = gridDim.x * SWARPS;
  const int gw = blockIdx.x * SWARPS + (threadIdx.x >> 5);  // the warp's first row group
  Chunks<F, R, U> a, b;
  SplitItem ld{gw, 0}, cur{gw, 0};  // the next item to load, to use
  if (gw < groups) {  // in flight while x is quantized
    load_chunks<F, R, U, SILU, ROPE>(q, d, mn, sub, lane, nc, ng, qrow, ld.g * RO, M, ro.head_dim, a);
    ld.next(steps, gstride);
  }
  lserve::pdl_enter();  // and while the kernel that writes x ends
  if constexpr (SP == lserve::SPREAD_NORM) lserve::spread_rstd<NMAX>(sp, n, K, spread_s);
  quantize_x<P, SP == lserve::SPREAD_NORM>(x, n, K, xq, xs, sp);
  __syncthreads();
  if (SP != lserve::SPREAD_ADD && gw >= groups) return;  // ADD: every warp reaches spread_part's barrier
  float acc[R][NMAX], ss[NMAX], old[R][NMAX];  // old: ADD's stream values (spread_load)
#pragma unroll
  for (int r = 0; r < NMAX; ++r) {
    ss[r] = 0.f;
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i][r] = 0.f;
  }
  // One item: the next item's loads into `fill`, then `use`'s math (and its row group's epilogue). Two items a
  // trip, one per register set, so each set's loads are in flight during the other's math.
  auto step = [&](Chunks<F, R, U>& use, Chunks<F, R, U>& fill) {
    if (ld.g < groups) {
      load_chunks<F, R, U, SILU, ROPE>(q, d, mn, sub, lane + 32 * U * ld.s, nc, ng, qrow, ld.g * RO, M, ro.head_dim,
                                       fill);
      ld.next(steps, gstride);
    }
    if constexpr (SP == lserve::SPREAD_ADD) {
      if (cur.s == steps - 1) lserve::spread_load<R, NMAX>(sp, n, cur.g * RO, M, old);
    }
    dot_chunks<F, R, U, NMAX, P>(use, xq, xs, n, nc, lane + 32 * U * cur.s, acc);
    if (cur.s == steps - 1) {
      if constexpr (SP == lserve::SPREAD_NORM) {
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int r = 0; r < NMAX; ++r) acc[i][r] *= spread_s[r];
      }
      store_rows<F, R, NMAX, TOut, SILU, ROPE, SP == lserve::SPREAD_ADD>(acc, use.rs, n, y, ldy, cur.g * RO, M, lane,
                                                                         ro, sp, old, ss);
    }
    cur.next(steps, gstride);
    return cur.g < groups;
  };
  if (gw < groups) {
    while (step(a, b) && step(b, a)) {
    }
  }
  if constexpr (SP == lserve::SPREAD_ADD) lserve::spread_part<SWARPS, NMAX>(sp, n, ss, spread_s);
}

template <typename F, int R, int NMAX, int P, typename TOut, bool SILU = false, int UX = 1>
__global__ void __launch_bounds__(SWARPS * 32, (SPLIT_MIN_BLOCKS<F, R, NMAX, P, SILU, UX>))
    quant_gemv_split(const u8* __restrict__ q, const __half* __restrict__ d, const __half* __restrict__ mn,
                     const unsigned short* __restrict__ sub, const __half* __restrict__ x, int n,
                     TOut* __restrict__ y, int ldy, int M, int K) {
  quant_gemv_split_body<F, R, NMAX, P, TOut, SILU, UX, 0>(q, d, mn, sub, x, n, y, ldy, M, K, lserve::RopeOut{},
                                                          lserve::Spread{});
}

// The q/k/v GEMV with the RoPE epilogue (ROPE above; two rows a warp, one pass, fp16; CudaOps.qkv_rope): its own
// kernel so that the others keep their argument list (a struct argument costs CuPy's launcher ~8 scalars').
template <typename F, int NMAX, int ROPE>
__global__ void __launch_bounds__(SWARPS * 32, (SPLIT_MIN_BLOCKS<F, 2, NMAX, 1, false, 1>))
    quant_gemv_split_rope(const u8* __restrict__ q, const __half* __restrict__ d, const __half* __restrict__ mn,
                          const unsigned short* __restrict__ sub, const __half* __restrict__ x, int n, int M, int K,
                          const lserve::RopeOut ro) {
  quant_gemv_split_body<F, 2, NMAX, 1, __half, false, 1, ROPE>(q, d, mn, sub, x, n, nullptr, 0, M, K, ro,
                                                               lserve::Spread{});
}

// Batch-1 launches with the spread norm (SP above; CudaOps.linear_add and its consumers): SPREAD_ADD, the output
// projections (x their input, y unused), or SPREAD_NORM, gate_up with SILU (x unused). One row, one pass, fp16.
template <typename F, int R, bool SILU, int UX, int SP>
__global__ void __launch_bounds__(SWARPS * 32, (SPLIT_MIN_BLOCKS<F, R, 1, 1, SILU, UX>))
    quant_gemv_split_spread(const u8* __restrict__ q, const __half* __restrict__ d, const __half* __restrict__ mn,
                            const unsigned short* __restrict__ sub, const __half* __restrict__ x,
                            __half* __restrict__ y, int ldy, int M, int K, const lserve::Spread sp) {
  static_assert(SP != lserve::SPREAD_ADD || !SILU, "the residual add follows an output projection");
  quant_gemv_split_body<F, R, 1, 1, __half, SILU, UX, 0, SP>(q, d, mn, sub, x, 1, y, ldy, M, K, lserve::RopeOut{},
                                                            sp);
}

// The q/k/v GEMV with the RoPE epilogue over RMSNorm(sp.res) from the partials (SPREAD_NORM; one row).
template <typename F, int ROPE>
__global__ void __launch_bounds__(SWARPS * 32, (SPLIT_MIN_BLOCKS<F, 2, 1, 1, false, 1>))
    quant_gemv_split_rope_spread(const u8* __restrict__ q, const __half* __restrict__ d,
                                 const __half* __restrict__ mn, const unsigned short* __restrict__ sub, int M, int K,
                                 const lserve::RopeOut ro, const lserve::Spread sp) {
  quant_gemv_split_body<F, 2, 1, 1, __half, false, 1, ROPE, lserve::SPREAD_NORM>(q, d, mn, sub, nullptr, 1, nullptr,
                                                                                 0, M, K, ro, sp);
}

// out[j, :] = W's row (rows ? rows[j] : r0 + j) as fp16, for j < nrows; one thread per 8 values (a 16-byte
// store). Prefill tiles for cuBLAS (rows null) and the embedding gather of a quantized table (rows = token ids).
template <typename F>
__global__ void quant_dequant_split(const u8* __restrict__ q, const __half* __restrict__ d,
                                    const __half* __restrict__ mn, const unsigned short* __restrict__ sub,
                                    const long long* __restrict__ rows,
                                    long long r0, int nrows, int K, __half* __restrict__ out) {
  lserve::pdl_enter();
  const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const int per_row = K / 8;
  if (idx >= (long long)nrows * per_row) return;
  const long long j = idx / per_row;
  const int k0 = (int)(idx % per_row) * 8;
  const long long m = rows ? rows[j] : r0 + j;
  const u8* chunk = q + m * ((long long)K * F::BITS / 8) + (k0 / 32) * (F::WORDS * 4);
  const int i0 = k0 % 32;
  unsigned lo, hi;  // the 8 values' bytes: 8-bit values i0.., or the 4-bit bytes (i0 % 16).. and nibble i0 / 16
  if (F::BITS == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(chunk + i0);
    lo = v.x ^ 0x80808080u, hi = v.y ^ 0x80808080u;  // offset binary: byte + 128
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(chunk + (i0 % 16));
    const int sh = 4 * (i0 / 16);
    lo = (v.x >> sh) & 0x0F0F0F0Fu, hi = (v.y >> sh) & 0x0F0F0F0Fu;
  }
  const int off = F::BITS == 8 ? 128 : F::Z;
  const long long g = m * groups_per_row<F>(K) + (F::CPG ? (k0 / 32) / F::CPG : 0);
  const int sc = F::SUB ? (int)sub[m * (K / 32) + k0 / 32] : 0;
  const int sh = F::SUB == 16 ? 8 * (i0 / 16) : 0;  // the 8 values lie in one half of the chunk: its sub-scale
  const float dv = __half2float(d[g]) * (F::SUB ? (float)(signed char)(sc >> sh) : 1.f);
  const float mv = F::MIN ? times_min_sub<F>(__half2float(mn[g]), sc) : 0.f;
  __align__(16) __half h[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const int b = (int)(((t < 4 ? lo : hi) >> (8 * (t & 3))) & 255u) - off;
    h[t] = __float2half_rn(dv * (float)b + mv);
  }
  *reinterpret_cast<uint4*>(out + j * K + k0) = *reinterpret_cast<const uint4*>(h);
}
