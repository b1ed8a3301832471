// Decode GEMV over fp16 weights that streams them with bulk copies (sm_90): y[n, m] = sum_k x[n, k] w[m, k] for
// N <= 8 rows, float32 accumulation; the same contract (SILU, NORM, outputs) as gemv_rows in layers.cu, which
// is its reference in the harness (and float64 x @ w^T behind both).
//
// Why not gemv_rows: it gives each warp one weight row and holds its loads in registers, so the rows are
// quantized in waves of resident warps (28,672 rows over 8,448 warps: 3.4 waves, the last 40% full) and deeper
// loads cost occupancy. Here a persistent grid of a few blocks per SM takes groups of rows round robin (so the
// loads in flight cover one contiguous stretch of the matrix, spread over all DRAM channels: contiguous row
// ranges per block measured 1.2-1.9x slower) and one producer thread per block streams them through a ring of
// shared-memory stages with cp.async.bulk (bulk_copy.cuh): the bytes in flight no longer depend on registers,
// and the weights (constant) start streaming before the programmatic-dependent-launch wait, overlapping the
// previous kernel and this one's RMSNorm prologue.
//
// Layout: a stage holds P = 4 row pieces of KC = 2048 columns (16 KB): G = P / W units (W = 2 rows, gate and up,
// with SILU) over one chunk of K. The 256 consumer threads split a stage's columns (16 bytes of each piece per
// thread), accumulate per piece over a unit group's chunks, then reduce across the block and write the G units.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "gemv_stream.cu uses cp.async.bulk and mbarrier transaction counts: compile it for sm_90"
#endif
#include <cuda_fp16.h>

#include "block_reduce.cuh"
#include "bulk_copy.cuh"
#include "pdl.cuh"
#include "rms_in.cuh"

namespace gemv_stream_cfg {

constexpr int CONSUMERS = 256;           // 8 consumer warps; warp 8 is the producer
constexpr int THREADS = CONSUMERS + 32;  // the launcher's block size (gemv_stream.THREADS)
constexpr int P = 4;                     // row pieces per stage
constexpr int KC = 2048;                 // columns per piece: a stage is P * KC halves = 16 KB
constexpr int WARPS = CONSUMERS / 32;

// Dynamic shared memory, in order: `stages` stages of P * KC halves; 2 x WARPS x P x N float partial sums;
// 2 x stages mbarriers (full, empty); with NORM the normed rows (N * K halves) and rms_rows' scratch (33 * N
// floats). The launcher's gemv_stream.smem_bytes mirrors bytes() (a CI test compares them).
struct Smem {
  __host__ __device__ static constexpr long long part(int stages) { return (long long)stages * P * KC * 2; }
  __host__ __device__ static constexpr long long bars(int stages, int n) { return part(stages) + 2LL * WARPS * P * n * 4; }
  __host__ __device__ static constexpr long long normed(int stages, int n) { return bars(stages, n) + 16LL * stages; }
  __host__ __device__ static constexpr long long bytes(int stages, int n, int k, bool norm) {
    return normed(stages, n) + (norm ? 2LL * n * k + 4LL * 33 * n : 0);
  }
};

}  // namespace gemv_stream_cfg

using namespace gemv_stream_cfg;

// How the producer warp fills a stage: 0, one bulk copy per row piece (cp.async.bulk, the TMA unit); 1, 16-byte
// cp.async copies by its 32 lanes, each lane's arrival counted when its copies land.
#ifndef LSERVE_STREAM_LDGSTS
#define LSERVE_STREAM_LDGSTS 0
#endif

// M units (output rows, or gate/up row pairs with SILU) in groups of G; block b takes groups b, b + gridDim.x, ...
// (the launcher sizes the grid so that every block gets the same count, but for the last few blocks).
template <int N, typename TOut, bool SILU = false, bool NORM = false>
__global__ void __launch_bounds__(THREADS) gemv_stream(const __half* __restrict__ x, const __half* __restrict__ w,
                                                       TOut* __restrict__ y, int M, int K, int stages,
                                                       const float* res_in, float* res_out,
                                                       const __half* __restrict__ norm_w, float eps) {
  constexpr int W = SILU ? 2 : 1;  // weight rows per unit: m (and its up row M + m)
  constexpr int G = P / W;         // units per group
  extern __shared__ __align__(128) unsigned char smem[];
  __half* ring = reinterpret_cast<__half*>(smem);
  float* part = reinterpret_cast<float*>(smem + Smem::part(stages));
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + Smem::bars(stages, N));
  unsigned long long* empty = full + stages;
  __half* normed = reinterpret_cast<__half*>(smem + Smem::normed(stages, N));

  const int groups = (M + G - 1) / G, chunks = (K + KC - 1) / KC;
  const int total = (groups > (int)blockIdx.x ? (groups - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0) * chunks;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      lserve::mbar_init(full + s, LSERVE_STREAM_LDGSTS ? 32 : 1);
      lserve::mbar_init(empty + s, WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();  // the last barrier of all THREADS threads: the producer warp leaves below

  if (threadIdx.x >= CONSUMERS) {  // producer: weights only (constant), so before the PDL wait
    const int lane = threadIdx.x & 31;
    if (LSERVE_STREAM_LDGSTS || lane == 0) {
      for (int s = 0; s < total; ++s) {
        const int slot = s % stages, lg = s / chunks, c = s - lg * chunks;
        const int u0 = (blockIdx.x + lg * gridDim.x) * G;  // the group's first unit
        if (s >= stages) lserve::mbar_wait(empty + slot, (s / stages - 1) & 1);
        const int col = c * KC, bytes = 2 * min(KC, K - col);
        const int valid = min(G, M - u0);
        if (!LSERVE_STREAM_LDGSTS) lserve::mbar_arrive_tx(full + slot, (unsigned)(valid * W * bytes));
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const int i = p % G, j = p / G, unit = u0 + i;  // piece p: row j of unit i
          if (i >= valid) continue;
          __half* dst = ring + ((size_t)slot * P + p) * KC;
          const __half* src = w + ((long long)j * M + unit) * K + col;
          if (LSERVE_STREAM_LDGSTS) {
            for (int v = lane; v < bytes / 16; v += 32) lserve::cp_async16(dst + 8 * v, src + 8 * v);
          } else {
            lserve::bulk_load(dst, src, bytes, full + slot);
          }
        }
        if (LSERVE_STREAM_LDGSTS) lserve::mbar_arrive_cp_async(full + slot);
      }
    }
    return;
  }

  lserve::pdl_enter();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const __half* xr = x;  // the rows multiplied: x, or the normed rows in shared memory
  if constexpr (NORM) {
    const int kc = K / 8;
    float* rstd = reinterpret_cast<float*>(normed + (size_t)N * K);
    const lserve::RmsIn in{res_in, res_out, norm_w, eps};
    lserve::rms_rows<N>(x, in, N, K, rstd, CONSUMERS);
    for (int i = tid; i < N * kc; i += CONSUMERS) {
      float h[8];
      lserve::rms_normed8(x, in, rstd, i / kc, K, i % kc, h);
      __half2 p2[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) p2[j] = __floats2half2_rn(h[2 * j], h[2 * j + 1]);
      reinterpret_cast<uint4*>(normed)[i] = *reinterpret_cast<const uint4*>(p2);
    }
    lserve::bar_sync_first(CONSUMERS);
    xr = normed;
  }

  float acc[P][N];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int n = 0; n < N; ++n) acc[p][n] = 0.f;
  for (int s = 0; s < total; ++s) {
    const int slot = s % stages, lg = s / chunks, c = s - lg * chunks;
    const int u0 = (blockIdx.x + lg * gridDim.x) * G;
    const int col = c * KC, vecs = min(KC, K - col) / 8;
    const int valid = min(G, M - u0);
    lserve::mbar_wait(full + slot, (s / stages) & 1);
    const uint4* st = reinterpret_cast<const uint4*>(ring + (size_t)slot * P * KC);
    for (int v = tid; v < vecs; v += CONSUMERS) {
      uint4 xv[N];
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const uint4* xp = reinterpret_cast<const uint4*>(xr + (long long)n * K + col) + v;
        xv[n] = NORM ? *xp : __ldg(xp);
      }
#pragma unroll
      for (int p = 0; p < P; ++p) {
        if (p % G >= valid) continue;
        const uint4 wv = st[p * (KC / 8) + v];
        const __half2* wh = reinterpret_cast<const __half2*>(&wv);
#pragma unroll
        for (int n = 0; n < N; ++n) {
          const __half2* xh = reinterpret_cast<const __half2*>(&xv[n]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 wf = __half22float2(wh[j]), xf = __half22float2(xh[j]);
            acc[p][n] = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, acc[p][n]));
          }
        }
      }
    }
    __syncwarp();
    if (lane == 0) lserve::mbar_arrive(empty + slot);  // this warp is done reading the stage
    if (c != chunks - 1) continue;

    // Group complete: reduce each piece's sums over the block, write its units, start the next group at 0.
    float* pb = part + (lg & 1) * WARPS * P * N;  // two buffers: the next group's writes skip this one's reads
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int n = 0; n < N; ++n) {
        float v = acc[p][n];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) pb[(warp * P + p) * N + n] = v;
        acc[p][n] = 0.f;
      }
    lserve::bar_sync_first(CONSUMERS);
    if (tid < valid * N) {
      const int i = tid / N, n = tid - i * N, unit = u0 + i;
      float r[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        r[j] = 0.f;
        for (int q = 0; q < WARPS; ++q) r[j] += pb[(q * P + j * G + i) * N + n];
      }
      if constexpr (SILU) {
        y[(long long)n * M + unit] = __float2half(r[0] / (1.0f + expf(-r[0])) * r[1]);
      } else {
        y[(long long)n * M + unit] = (TOut)r[0];
      }
    }
  }
}

#define GEMV_STREAM(N, TOut, SILU, NORM)                                                               \
template __global__ void gemv_stream<N, TOut, SILU, NORM>(const __half*, const __half*, TOut*, int, int, int, \
                                                          const float*, float*, const __half*, float);
#define GEMV_STREAM_ROWS(N)                \
  GEMV_STREAM(N, __half, false, false)     \
  GEMV_STREAM(N, float, false, false)      \
  GEMV_STREAM(N, __half, true, false)      \
  GEMV_STREAM(N, __half, false, true)      \
  GEMV_STREAM(N, __half, true, true)
GEMV_STREAM_ROWS(1)
GEMV_STREAM_ROWS(2)
GEMV_STREAM_ROWS(3)
GEMV_STREAM_ROWS(4)
GEMV_STREAM_ROWS(5)
GEMV_STREAM_ROWS(6)
GEMV_STREAM_ROWS(7)
GEMV_STREAM_ROWS(8)
