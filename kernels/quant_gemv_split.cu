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
// scheme; the logits add a second pass on the rounding residual, P = 2), then each warp takes R output rows;
// lane l reads chunks l, l + 32, ... of each row with 16-byte loads (U chunks x R rows in flight before any is
// used; the first of them issued before x is quantized) and sums q * xq with dp4a (exact int32, the sub-scales
// multiplied in as integers); per chunk y += dx * (d * (sum - Z s) + m s) (s times Q4_K's min multiplier; s is
// not used where Z = 0 and there is no m: q8_0, q6_k, int8).

#include <cuda_fp16.h>

#include "block_reduce.cuh"
#include "pdl.cuh"

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

// One chunk of 32 activations f (destroyed) -> P int8 passes: words xq[(p * nchunks + c) * 8 ..] and
// xs[p * nchunks + c] = {dx, sum of the chunk's xq}. P = 2 (the logits): pass 1 rounds the residual
// x - dx * xq of pass 0 the same way, so the two passes together leave each value off by dx' / 2 ~ dx / 508
// (cpu_quant.logits_q's scheme).
// The int8 step of a chunk whose largest |value| is amax, and its inverse (0 for a chunk of zeros).
__device__ __forceinline__ float2 act_step(float amax) {
  return make_float2(amax / 127.f, amax > 0.f ? 127.f / amax : 0.f);
}

template <int P>
__device__ __forceinline__ void quantize_chunk(float (&f)[32], int c, int nchunks, int* xq, float2* xs) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(f[i]));
    const float2 st = act_step(amax);
    const float dx = st.x, id = st.y;
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
      xq[(p * nchunks + c) * 8 + w] = (int)word;
    }
    xs[p * nchunks + c] = make_float2(dx, (float)s);
  }
}

// x rows [n, K] fp16 -> xq [P][n][K / 4] words of int8 and xs [P][n][K / 32] (quantize_chunk), by the block.
template <int P>
__device__ __forceinline__ void quantize_x(const __half* __restrict__ x, int n, int K, int* xq, float2* xs) {
  const int nc = K / 32;
  for (int c = threadIdx.x; c < n * nc; c += blockDim.x) {
    const uint4* src = reinterpret_cast<const uint4*>(x + (long long)c * 32);  // rows are contiguous
    float f[32];
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
    quantize_chunk<P>(f, c, n * nc, xq, xs);
  }
}

// The split GEMV's input made by the kernel before it (XQ): one block per row of x [n, hidden] fp16,
//   r = x + res_in -> res_out (float32; res_in may be res_out), h = fp16(r / sqrt(mean(r^2) + eps) * w),
// h quantized as quantize_x would (xq [n][hidden / 4] words, then xs [n][hidden / 32] {dx, sum}, one pass): a warp
// holds a chunk's 32 values, one a lane, so the chunk's max and sum are warp reductions and the loads coalesce.
// The values are layers.cu's add_rmsnorm's, so the GEMV's result is bit-identical to add_rmsnorm + quantize_x.
// blockDim.x and hidden are multiples of 32.
template <bool HAS_RES>
__global__ void rmsnorm_xq(const __half* __restrict__ x, const float* res_in, float* res_out,
                           const __half* __restrict__ w, int* __restrict__ xq, int n, int hidden, float eps) {
  extern __shared__ int4 smem[];  // 128 bytes (the launch's): block_reduce's scratch
  float* scratch = reinterpret_cast<float*>(smem);
  lserve::pdl_enter();
  const long long off = (long long)blockIdx.x * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float r = __half2float(x[off + i]);
    if (HAS_RES) r += res_in[off + i];
    res_out[off + i] = r;
    ss += r * r;
  }
  ss = lserve::block_reduce(ss, scratch, lserve::SumOp(), 0.f);
  const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
  float2* xs = reinterpret_cast<float2*>(xq + n * (hidden / 4));
  signed char* xb = reinterpret_cast<signed char*>(xq) + off;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {  // a warp: one chunk, i % 32 = lane
    const float h = __half2float(__float2half(res_out[off + i] * inv * __half2float(w[i])));  // as add_rmsnorm
    float amax = fabsf(h);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float2 st = act_step(amax);
    const int v = __float2int_rn(h * st.y);
    xb[i] = (signed char)v;
    int s = v;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) xs[off / 32 + i / 32] = make_float2(st.x, (float)s);
  }
}

// acc + the dot product q . xq of half H of a chunk (values 16H .. 16H + 15, xq words 4H .. 4H + 3): 8-bit words
// 4H .. 4H + 3; 4-bit chunks hold v[i] in the low and v[i + 16] in the high nibble of byte i, so nibble H of
// words 0-3.
template <typename F, int H>
__device__ __forceinline__ int half_dot(const unsigned (&w)[F::WORDS], const int (&xw)[8], int acc) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const unsigned v = F::BITS == 8 ? w[4 * H + j] : (w[j] >> (4 * H)) & 0x0F0F0F0Fu;
    acc = __dp4a((int)v, xw[4 * H + j], acc);
  }
  return acc;
}

// The chunk's q . xq times its integer sub-scales (byte b of `sub`: sub-scale b), exact in int32 and in its
// float: at most 2 * 16 * 32 * 127 * 128 < 2^24 (Q6_K), 32 * 15 * 127 * 63 (Q4_K).
template <typename F>
__device__ __forceinline__ int chunk_dot(const unsigned (&w)[F::WORDS], const int (&xw)[8], int sub) {
  if constexpr (F::SUB == 16)
    return (signed char)sub * half_dot<F, 0>(w, xw, 0) + (signed char)(sub >> 8) * half_dot<F, 1>(w, xw, 0);
  const int dot = half_dot<F, 1>(w, xw, half_dot<F, 0>(w, xw, 0));
  return F::SUB == 32 ? (int)(signed char)sub * dot : dot;
}

// v (the chunk's sum of xq, an exact float, or its additive term) times the chunk's min multiplier (Q4_K's m_j;
// 1 for the other formats): exact, products of small integers / of an fp16 and a 6-bit integer.
template <typename F>
__device__ __forceinline__ float times_min_sub(float v, int sub) {
  return F::SUB == 32 ? (float)(signed char)(sub >> 8) * v : v;
}

// The output a warp's accumulator row i belongs to (m0 + i), and the row of W it reads: the same, or with SILU
// (W = [gate; up], M outputs) the gate rows m0 .. m0 + R/2 - 1 of outputs m0 + i, then their up rows M + m0 ..
template <int R, bool SILU>
__device__ __forceinline__ int acc_output(int m0, int i) {
  return SILU ? m0 + i % (R / 2) : m0 + i;
}
template <int R, bool SILU>
__device__ __forceinline__ int acc_row(int m0, int i, int M) {
  return SILU && i >= R / 2 ? M + m0 + i - R / 2 : m0 + i;
}

// Chunks c0, c0 + 32, ... (U of them) of the warp's R rows (acc_row) into registers: integers, scales, additive
// terms, sub-scales.
template <typename F, int R, int U, bool SILU = false>
__device__ __forceinline__ void load_chunks(const u8* __restrict__ q, const __half* __restrict__ d,
                                            const __half* __restrict__ mn, const unsigned short* __restrict__ sub,
                                            int c0, int nc, int ng, long long qrow, int m0, int M,
                                            unsigned (&w)[U][R][F::WORDS], float (&dd)[U][R], float (&mm)[U][R],
                                            int (&ss)[U][R]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + 32 * u;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int m = acc_row<R, SILU>(m0, i, M);
      if (c < nc && acc_output<R, SILU>(m0, i) < M) {
        const uint4* src = reinterpret_cast<const uint4*>(q + m * qrow + (long long)c * F::WORDS * 4);
#pragma unroll
        for (int h = 0; h < F::WORDS / 4; ++h) {
          const uint4 v = __ldg(src + h);
          w[u][i][4 * h] = v.x, w[u][i][4 * h + 1] = v.y, w[u][i][4 * h + 2] = v.z, w[u][i][4 * h + 3] = v.w;
        }
        const long long g = (long long)m * ng + (F::CPG ? c / F::CPG : 0);
        dd[u][i] = F::CPG ? __half2float(__ldg(d + g)) : 1.f;
        mm[u][i] = F::MIN ? __half2float(__ldg(mn + g)) : 0.f;
        ss[u][i] = F::SUB ? (int)__ldg(sub + (long long)m * nc + c) : 0;
      }
    }
  }
}

// A chunk's 8 xq words and its {dx, sum}, from shared memory.
__device__ __forceinline__ void load_x(const int* xq, const float2* xs, int i, int (&xw)[8], float2& sx) {
  const int4* v = reinterpret_cast<const int4*>(xq + 8 * i);
  const int4 a = v[0], b = v[1];
  sx = xs[i];
  xw[0] = a.x, xw[1] = a.y, xw[2] = a.z, xw[3] = a.w, xw[4] = b.x, xw[5] = b.y, xw[6] = b.z, xw[7] = b.w;
}

// y[r * ldy + m] = sum_k x[r, k] W[m, k] for r < n <= NMAX, R rows of W per warp, x in P int8 passes.
// Dynamic shared memory: P * n * K bytes of xq + P * n * K / 32 float2 of xs, which each block makes from x;
// with XQ (P = 1) x is that buffer already (rmsnorm_xq wrote it) and the block only copies it, instead of every
// block repeating the quantization. K % 32 == 0.
// SILU (R even, TOut = __half, P = 1): W is the row-fused gate/up matrix [2M, K], a warp's R rows are R/2 gate
// rows and their up rows (acc_row), and y[r * ldy + m] = silu(g) * u on the float32 sums, each with int8's
// per-channel scale applied first (CudaOps.gate_up_silu; reference: silu_mul_ref(x @ W^T)).
template <typename F, int R, int NMAX, int P, typename TOut, bool SILU = false, bool XQ = false>
__global__ void __launch_bounds__(SWARPS * 32)
    quant_gemv_split(const u8* __restrict__ q, const __half* __restrict__ d, const __half* __restrict__ mn,
                     const unsigned short* __restrict__ sub, const __half* __restrict__ x, int n,
                     TOut* __restrict__ y, int ldy, int M, int K) {
  static_assert(!SILU || R % 2 == 0, "SILU pairs gate and up rows in a warp");
  static_assert(!XQ || P == 1, "rmsnorm_xq makes one pass");
  constexpr int U = (8 / R) / (F::BITS / 4) > 0 ? (8 / R) / (F::BITS / 4) : 1;  // ~8 16-byte loads a lane
  extern __shared__ int4 smem[];
  int* xq = reinterpret_cast<int*>(smem);
  float2* xs = reinterpret_cast<float2*>(xq + P * n * (K / 4));
  const int nc = K / 32, ng = groups_per_row<F>(K);
  const long long qrow = (long long)K * F::BITS / 8;
  const int lane = threadIdx.x & 31;
  const int m0 = (blockIdx.x * SWARPS + (threadIdx.x >> 5)) * (SILU ? R / 2 : R);  // the warp's first output
  unsigned w[U][R][F::WORDS];
  float dd[U][R], mm[U][R];
  int ss[U][R];
  // in flight while x is quantized
  load_chunks<F, R, U, SILU>(q, d, mn, sub, lane, nc, ng, qrow, m0, M, w, dd, mm, ss);
  lserve::pdl_enter();  // and while the kernel that writes x ends
  if constexpr (XQ) {  // n * K / 32 chunks of 40 bytes (32 int8 + {dx, sum}), in 8-byte words
    const int2* src = reinterpret_cast<const int2*>(x);
    int2* dst = reinterpret_cast<int2*>(smem);
    for (int i = threadIdx.x; i < n * (K / 32) * 5; i += blockDim.x) dst[i] = __ldg(src + i);
  } else {
    quantize_x<P>(x, n, K, xq, xs);
  }
  __syncthreads();
  if (m0 >= M) return;
  float acc[R][NMAX];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int r = 0; r < NMAX; ++r) acc[i][r] = 0.f;
  for (int c0 = lane; c0 < nc; c0 += 32 * U) {
    if (c0 != lane) load_chunks<F, R, U, SILU>(q, d, mn, sub, c0, nc, ng, qrow, m0, M, w, dd, mm, ss);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c < nc) {
#pragma unroll
        for (int r = 0; r < NMAX; ++r) {
          if (r < n) {
#pragma unroll
            for (int p = 0; p < P; ++p) {
              int xw[8];
              float2 sx;
              load_x(xq, xs, (p * n + r) * nc + c, xw, sx);
#pragma unroll
              for (int i = 0; i < R; ++i) {
                const int dot = chunk_dot<F>(w[u][i], xw, ss[u][i]) - F::Z * (int)sx.y;
                float t = dd[u][i] * (float)dot;
                if (F::MIN) t = fmaf(mm[u][i], times_min_sub<F>(sx.y, ss[u][i]), t);
                acc[i][r] = fmaf(sx.x, t, acc[i][r]);
              }
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int r = 0; r < NMAX; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[i][r] += __shfl_xor_sync(0xffffffffu, acc[i][r], o);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < (SILU ? R / 2 : R); ++i) {
      const int m = m0 + i;
      if (m < M) {
        const float rs = F::CPG ? 1.f : __half2float(d[m]);  // int8's per-channel scale, applied once
        if constexpr (SILU) {
          const float ru = F::CPG ? 1.f : __half2float(d[M + m]);  // the up row's
#pragma unroll
          for (int r = 0; r < NMAX; ++r) {
            if (r < n) {
              const float g = rs * acc[i][r];
              y[(long long)r * ldy + m] = __float2half(g / (1.0f + expf(-g)) * (ru * acc[i + R / 2][r]));
            }
          }
        } else {
#pragma unroll
          for (int r = 0; r < NMAX; ++r)
            if (r < n) y[(long long)r * ldy + m] = (TOut)(rs * acc[i][r]);
        }
      }
    }
  }
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
