// Per-token layer kernels for the CUDA backend (fp16 storage, fp32 math).
// References: lserve_lite/backends/reference/layers.py (embed_ref, rmsnorm_ref, rope_write_kv_ref, silu_mul_ref).
// Launchers: lserve_lite/backends/cuda.py (CudaOps). All kernels: one block per token row unless noted.
#include "block_reduce.cuh"
#include "kv_quant.cuh"
#include "pdl.cuh"
#include "rms_in.cuh"
#include "rope_out.cuh"

using lserve::block_reduce;

// out[n, :] = table[ids[n] - vocab_start, :], zeros for ids outside the table's `rows` (a tensor-parallel
// vocabulary shard). VEC = 8 copies 16 bytes per access (hidden % 8 == 0).
template <int VEC>
__global__ void embed_gather(const __half* __restrict__ table, const long long* __restrict__ ids,
                             __half* __restrict__ out, int hidden, long long vocab_start, long long rows) {
  lserve::pdl_enter();
  const long long row = blockIdx.x;
  const long long id = ids[row] - vocab_start;
  const bool inside = id >= 0 && id < rows;
  const __half* src = table + (inside ? id : 0) * hidden;
  __half* dst = out + row * hidden;
  if (VEC == 8) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) d[i] = inside ? s[i] : make_uint4(0, 0, 0, 0);
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = inside ? src[i] : __float2half(0.f);
  }
}

// res_out = x + res_in (float32 residual stream; res_in may alias res_out, or be absent),
// out = res_out * rsqrt(mean(res_out^2) + eps) * w in fp16. VEC: hidden % 8 == 0, 16-byte aligned rows and at most
// NORM_CHUNKS chunks of 8 a thread (the launcher checks): every load of a thread issued before its first store and
// the sums kept in registers, so the row costs one round trip to memory instead of one per element (a scalar loop
// whose stores may alias its loads issues them one after another: 8 us a row of 4096 on an H200, docs/PERF_e2e.md).
constexpr int NORM_CHUNKS = 4;

template <bool HAS_RES, bool VEC>
__global__ void add_rmsnorm(const __half* __restrict__ x, const float* res_in, float* res_out,
                            const __half* __restrict__ w, __half* __restrict__ out, int hidden, float eps) {
  __shared__ float scratch[32];
  lserve::pdl_enter();
  const long long off = (long long)blockIdx.x * hidden;
  float ss = 0.f;
  if (VEC) {
    const int chunks = hidden / 8;
    float r[NORM_CHUNKS][8];
#pragma unroll
    for (int c = 0; c < NORM_CHUNKS; ++c) {
      const int i = threadIdx.x + c * blockDim.x;
      if (i >= chunks) break;
      const uint4 xv = reinterpret_cast<const uint4*>(x + off)[i];
      const __half* xh = reinterpret_cast<const __half*>(&xv);
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
      if (HAS_RES) {
        a = reinterpret_cast<const float4*>(res_in + off)[2 * i];
        b = reinterpret_cast<const float4*>(res_in + off)[2 * i + 1];
      }
      const float add[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) r[c][e] = __half2float(xh[e]) + add[e];
    }
#pragma unroll
    for (int c = 0; c < NORM_CHUNKS; ++c) {
      const int i = threadIdx.x + c * blockDim.x;
      if (i >= chunks) break;
      float4* dst = reinterpret_cast<float4*>(res_out + off) + 2 * i;
      dst[0] = make_float4(r[c][0], r[c][1], r[c][2], r[c][3]);
      dst[1] = make_float4(r[c][4], r[c][5], r[c][6], r[c][7]);
#pragma unroll
      for (int e = 0; e < 8; ++e) ss += r[c][e] * r[c][e];
    }
    ss = block_reduce(ss, scratch, lserve::SumOp(), 0.f);
    const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
#pragma unroll
    for (int c = 0; c < NORM_CHUNKS; ++c) {
      const int i = threadIdx.x + c * blockDim.x;
      if (i >= chunks) break;
      const uint4 wv = reinterpret_cast<const uint4*>(w)[i];
      const __half* wh = reinterpret_cast<const __half*>(&wv);
      uint4 ov;
      __half* oh = reinterpret_cast<__half*>(&ov);
#pragma unroll
      for (int e = 0; e < 8; ++e) oh[e] = __float2half(r[c][e] * inv * __half2float(wh[e]));
      reinterpret_cast<uint4*>(out + off)[i] = ov;
    }
    return;
  }
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float r = __half2float(x[off + i]);
    if (HAS_RES) r += res_in[off + i];
    res_out[off + i] = r;
    ss += r * r;
  }
  ss = block_reduce(ss, scratch, lserve::SumOp(), 0.f);
  const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[off + i] = __float2half(res_out[off + i] * inv * __half2float(w[i]));
}

// Channels j0 .. j0+7 and j0+half_d .. j0+half_d+7 of head vector x written at the same places of dst, rotated
// (half-split RoPE, each value rounded as rope_channel rounds it) or copied (rotate false): 16-byte accesses, so a
// prefill row of 6,144 channels takes 384 threads (one channel a thread spent most of its time in index math).
// Needs half_d % 8 == 0 and 16-byte aligned rows (CudaOps checks the head dim).
__device__ __forceinline__ void rope_pairs8(const __half* x, int j0, int half_d, const __half* cos_row,
                                            const __half* sin_row, bool rotate, __half* dst) {
  uint4 lo = *reinterpret_cast<const uint4*>(x + j0), hi = *reinterpret_cast<const uint4*>(x + j0 + half_d);
  if (rotate) {
    const uint4 cv = *reinterpret_cast<const uint4*>(cos_row + j0), sv = *reinterpret_cast<const uint4*>(sin_row + j0);
    __half* a = reinterpret_cast<__half*>(&lo);
    __half* b = reinterpret_cast<__half*>(&hi);
    const __half* cs = reinterpret_cast<const __half*>(&cv);
    const __half* sn = reinterpret_cast<const __half*>(&sv);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float af = __half2float(a[k]), bf = __half2float(b[k]), c = __half2float(cs[k]), s = __half2float(sn[k]);
      a[k] = __float2half(lserve::rope_lo(af, bf, c, s));
      b[k] = __float2half(lserve::rope_hi(af, bf, c, s));
    }
  }
  *reinterpret_cast<uint4*>(dst + j0) = lo;
  *reinterpret_cast<uint4*>(dst + j0 + half_d) = hi;
}

// A row's work as one index space over the threads of its gridDim.y blocks, each thread one item at a time, so
// the kinds run side by side instead of one after another in the same threads (a decode row's few threads then wait
// on one round trip to memory, not on one per kind): [0, pairs) rope_pairs8 items, padded to a warp; then
// QUANT_ROWS rows of 32 lanes each (warp-aligned, so every lane of a warp is in the same row): the q heads when they
// go into the Hadamard basis (write_q_hadamard), then the quantized K / V rows (write_kv_quant); then `extra` items
// (the page statistics of rope_write_kv_sparse). cuda.py's _rope_threads counts them.
struct RowItems {
  int pairs, quant0, extra0, end;
  __device__ __forceinline__ RowItems(int pairs_, int quant_rows, int extra)
      : pairs(pairs_), quant0((pairs_ + 31) & ~31), extra0(quant0 + 32 * quant_rows),
        end((quant0 + 32 * quant_rows + extra + 31) & ~31) {}
};

// Half-split RoPE on q and k of the fused qkv row [Hq + 2 Hkv, D], k and v written into their page slot
// (slot = page * page_size + offset; a negative slot writes nothing: padding rows of a captured batch).
// q_out [N, Hq, D]. cos/sin [max_len, D/2] carry any rope scaling (llama3) already. KV: the cache format
// (lskv::Half: fp16 k_cache / v_cache, scales unused; quantized: values + fp16 scales, D % 32 == 0). hadamard
// (quantized only; CudaOps passes KVCache.rotates_keys): q and k in the Hadamard basis (kv/quant.py).
// Grid (N, Y): the row's items (eight channel pairs of a head, rope_pairs8) spread over Y blocks, about one per
// thread (one block per row walked a decode row's channels in a dependent-load chain of ~5 us; cuda.py picks Y).
// The L2 lines of position pos's cos / sin rows (half_d halves each), one a thread of the block's first warps.
__device__ __forceinline__ void prefetch_rope_row(const __half* cos_t, const __half* sin_t, long long pos,
                                                  int half_d) {
  const int lines = (half_d * 2 + 127) / 128;  // 128-byte lines of a row
  if (threadIdx.x < lines) {
    lserve::prefetch_l2(cos_t + pos * half_d + threadIdx.x * 64);
    lserve::prefetch_l2(sin_t + pos * half_d + threadIdx.x * 64);
  }
}

template <class KV>
__global__ void rope_write_kv(const __half* __restrict__ qkv, const long long* __restrict__ positions,
                              const long long* __restrict__ slots, const __half* __restrict__ cos_t,
                              const __half* __restrict__ sin_t, __half* __restrict__ q_out,
                              void* __restrict__ k_cache, void* __restrict__ v_cache, __half* __restrict__ k_scale,
                              __half* __restrict__ v_scale, int hq, int hkv, int head_dim, int page_size,
                              int hadamard) {
  const long long row = blockIdx.x;
  const int half_d = head_dim / 2, nheads = hq + 2 * hkv;
  // the step's plan (host-written) and the RoPE tables' row before the wait, while the GEMV before us still runs
  const long long pos = positions[row], slot = slots[row];
  prefetch_rope_row(cos_t, sin_t, pos, half_d);
  lserve::pdl_enter();
  const long long page = slot / page_size, offset = slot % page_size;
  const __half* x = qkv + row * nheads * head_dim;
  const __half* cos_row = cos_t + pos * half_d;
  const __half* sin_row = sin_t + pos * half_d;
  __half* kc = static_cast<__half*>(k_cache);
  __half* vc = static_cast<__half*>(v_cache);
  const int per_head = half_d / 8, hq_rows = KV::QUANT && hadamard ? hq : 0;
  const RowItems it((KV::QUANT ? hq - hq_rows : nheads) * per_head, KV::QUANT ? hq_rows + 2 * hkv : 0, 0);
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < it.end; i += gridDim.y * blockDim.x) {
    if (i >= it.quant0) {  // a q row in the Hadamard basis or a quantized K / V row: the warp's (i is warp-uniform)
      if constexpr (KV::QUANT) {
        const int item = ((i - it.quant0) >> 5) - hq_rows;
        if (item < 0)
          write_q_hadamard(x + (item + hq_rows) * head_dim, head_dim, cos_row, sin_row,
                           q_out + (row * hq + item + hq_rows) * head_dim);
        else if (slot >= 0)
          write_kv_quant<KV>(x, item, hq, hkv, head_dim, cos_row, sin_row, hadamard,
                             [&](bool is_k, int g, unsigned char*& vals, unsigned short*& sc) {
                               const long long r = (page * hkv + g) * page_size + offset;
                               kv_row<KV>(is_k ? k_cache : v_cache, is_k ? k_scale : v_scale, r, head_dim, vals,
                                          sc);
                               return true;
                             });
      }
      continue;
    }
    if (i >= it.pairs) continue;
    const int h = i / per_head, j0 = (i - h * per_head) * 8;
    __half* dst;
    if (h < hq)
      dst = q_out + (row * hq + h) * head_dim;
    else if (slot < 0)
      continue;
    else if (h < hq + hkv)
      dst = kc + ((page * hkv + (h - hq)) * page_size + offset) * head_dim;
    else
      dst = vc + ((page * hkv + (h - hq - hkv)) * page_size + offset) * head_dim;
    rope_pairs8(x + h * head_dim, j0, half_d, cos_row, sin_row, h < hq + hkv, dst);
  }
}

// Page statistics item i = (KV head g, channel c) of a float cache's or a plain-basis one's row: kmax / kmin over
// the run's keys (recomputed from qkv: other threads write them into the cache), merged with the stats the page
// already has when the run starts past its offset 0. Streaming KV heads have none.
__device__ __forceinline__ void page_stats_item(const __half* __restrict__ qkv, const long long* __restrict__ positions,
                                                const long long* __restrict__ slots, const __half* __restrict__ cos_t,
                                                const __half* __restrict__ sin_t, const int* __restrict__ head_class,
                                                const int* __restrict__ head_slot, __half* __restrict__ kmax,
                                                __half* __restrict__ kmin, int i, int row, long long dslot, int hq,
                                                int hkv, int nd, int head_dim, int page_size, int sub) {
  const int g = i / head_dim, c = i - g * head_dim;
  if (head_class[g] != 0) return;
  const int half_d = head_dim / 2, nheads = hq + 2 * hkv;
  const StatsRun run(slots, head_slot, g, row, dslot, nd, head_dim, page_size, sub);
  const long long st = run.st + c;
  float mx = -__int_as_float(0x7f800000), mn = __int_as_float(0x7f800000);
  if (run.first_off > 0) {  // the stats of offsets 0 .. first_off - 1, written with them
    mx = __half2float(kmax[st]);
    mn = __half2float(kmin[st]);
  }
  auto key_at = [&](int o) -> float {  // this batch's key o of the logical page
    const int r = run.r0 + (o - run.first_off);
    const long long p = positions[r];
    const __half* xr = qkv + (long long)r * nheads * head_dim + (hq + g) * head_dim;
    return __half2float(rope_channel(xr, c, half_d, cos_t + p * half_d, sin_t + p * half_d));
  };
  for (int o0 = run.first_off; o0 <= run.last_off; o0 += 8) {
    float kv[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) kv[u] = o0 + u <= run.last_off ? key_at(o0 + u) : kv[0];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      mx = fmaxf(mx, kv[u]);
      mn = fminf(mn, kv[u]);
    }
  }
  kmax[st] = __float2half(mx);
  kmin[st] = __float2half(mn);
}

// LServe mode: RoPE on q/k; KV head g's k/v go into the pool of its class (0: dense pool kd/vd [P, nd, page, D]
// at dense slot slots[0][n]; 1: streaming pool ks/vs [Ps, ns, page, D] at slots[1][n]) at row head_slot[g];
// a negative slot writes nothing. Then, fused: the key statistics of the dense pool's logical pages
// (kmax/kmin [P, nd, sub, D] fp16, may be null) for every logical page this batch wrote into, by the block of the
// batch's last row in that logical page: the keys of the batch's rows in it (consecutive rows with consecutive
// slots; recomputed from qkv, not read back: other blocks write them) merged with the stats the page already has
// when the run starts past its offset 0 (reference/page_stats.py merge_page_stats: with tokens appended in order,
// the recomputation over the written prefix that update_page_stats defines; a quantized cache holds no
// unquantized keys to recompute from, and a float one is spared reading up to 15 older keys a decode row).
// Grid (N, Y) as rope_write_kv: the row's items (RowItems: channel pairs, quantized rows, statistics) over Y blocks.
// KV: the cache format (quantized: fp16 scales kd_s/vd_s/ks_s/vs_s beside the pools).
// Reference: lserve_lite/backends/reference/layers.py::rope_write_kv_sparse_ref (+ reference/page_stats.py).
template <class KV>
__global__ void rope_write_kv_sparse(const __half* __restrict__ qkv, const long long* __restrict__ positions,
                                     const long long* __restrict__ slots, const __half* __restrict__ cos_t,
                                     const __half* __restrict__ sin_t, __half* __restrict__ q_out,
                                     void* __restrict__ kd_p, void* __restrict__ vd_p, void* __restrict__ ks_p,
                                     void* __restrict__ vs_p, __half* __restrict__ kd_s, __half* __restrict__ vd_s,
                                     __half* __restrict__ ks_s, __half* __restrict__ vs_s,
                                     const int* __restrict__ head_class,
                                     const int* __restrict__ head_slot, __half* __restrict__ kmax,
                                     __half* __restrict__ kmin, int hq, int hkv, int nd, int ns, int head_dim,
                                     int page_size, int sub, int n_rows, int hadamard) {
  const int row = blockIdx.x;
  const int half_d = head_dim / 2, nheads = hq + 2 * hkv;
  // the step's plan (host-written: positions, slots, head classes) and the RoPE tables' row before the wait, while
  // the GEMV before us still runs; the qkv row and the stored statistics (earlier kernels') after it
  const long long pos = positions[row], dslot = slots[row], sslot = slots[n_rows + row];
  prefetch_rope_row(cos_t, sin_t, pos, half_d);
  if (threadIdx.x < hkv) {
    lserve::prefetch_l2(head_class + threadIdx.x);
    lserve::prefetch_l2(head_slot + threadIdx.x);
  }
  const __half* x = qkv + (long long)row * nheads * head_dim;
  const __half* cos_row = cos_t + pos * half_d;
  const __half* sin_row = sin_t + pos * half_d;
  __half *kd = static_cast<__half*>(kd_p), *vd = static_cast<__half*>(vd_p);
  __half *ks = static_cast<__half*>(ks_p), *vs = static_cast<__half*>(vs_p);
  const int per_head = half_d / 8;
  // The page statistics of the logical page holding dslot, by the batch's last row written into it.
  const int lp = page_size / sub;
  const long long lid = dslot / lp;
  const bool stats = kmax != nullptr && dslot >= 0 && nd > 0 &&
                     !(row + 1 < n_rows && slots[row + 1] == dslot + 1 && (dslot + 1) / lp == lid);
  lserve::pdl_enter();
  const bool rotated = KV::QUANT && hadamard;
  const int hq_rows = rotated ? hq : 0;
  const RowItems it((KV::QUANT ? hq - hq_rows : nheads) * per_head, KV::QUANT ? hq_rows + 2 * hkv : 0,
                    stats ? hkv * (rotated ? 32 : head_dim) : 0);
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < it.end; i += gridDim.y * blockDim.x) {
    if (i >= it.extra0) {
      if (rotated) {  // a warp per KV head: extra0 is warp-aligned, the items exactly hkv warps
        page_stats_rotated(qkv, positions, slots, cos_t, sin_t, head_class, head_slot, kmax, kmin,
                           (i - it.extra0) >> 5, row, dslot, hq, hkv, nd, head_dim, page_size, sub);
      } else if (i - it.extra0 < hkv * head_dim) {
        page_stats_item(qkv, positions, slots, cos_t, sin_t, head_class, head_slot, kmax, kmin, i - it.extra0, row,
                        dslot, hq, hkv, nd, head_dim, page_size, sub);
      }
    } else if (i >= it.quant0) {  // a q row in the Hadamard basis or a quantized K / V row: the warp's
      if constexpr (KV::QUANT) {
        const int item = ((i - it.quant0) >> 5) - hq_rows;
        if (item < 0) {
          write_q_hadamard(x + (item + hq_rows) * head_dim, head_dim, cos_row, sin_row,
                           q_out + ((long long)row * hq + item + hq_rows) * head_dim);
          continue;
        }
        write_kv_quant<KV>(x, item, hq, hkv, head_dim, cos_row, sin_row, hadamard,
                           [&](bool is_k, int g, unsigned char*& vals, unsigned short*& sc) {
                             const int cls = head_class[g];
                             const long long slot = cls ? sslot : dslot;
                             if (slot < 0) return false;
                             const long long r = ((slot / page_size) * (cls ? ns : nd) + head_slot[g]) * page_size +
                                                 slot % page_size;
                             kv_row<KV>(is_k ? (cls ? ks_p : kd_p) : (cls ? vs_p : vd_p),
                                        is_k ? (cls ? ks_s : kd_s) : (cls ? vs_s : vd_s), r, head_dim, vals, sc);
                             return true;
                           });
      }
    } else if (i < it.pairs) {
      const int h = i / per_head, j0 = (i - h * per_head) * 8;
      __half* dst;
      if (h < hq) {
        dst = q_out + ((long long)row * hq + h) * head_dim;
      } else {
        const bool is_k = h < hq + hkv;
        const int g = is_k ? h - hq : h - hq - hkv;
        const int cls = head_class[g];
        const long long slot = cls ? sslot : dslot;
        if (slot < 0) continue;
        const long long page = slot / page_size, off = slot % page_size;
        dst = (is_k ? (cls ? ks : kd) : (cls ? vs : vd)) +
              ((page * (cls ? ns : nd) + head_slot[g]) * page_size + off) * head_dim;
      }
      rope_pairs8(x + h * head_dim, j0, half_d, cos_row, sin_row, h < hq + hkv, dst);
    }
  }
}

// Zero whole pages of many pools: a page handed to a sequence reads as a fresh (zeroed) pool's, so no value an
// earlier owner left past the new context (NaN included) meets the attention kernels' 0 weights (0 x NaN = NaN).
// Reference: CpuOps.clear_pages. meta = [npools base addresses, npools page sizes in bytes (multiples of 16),
// the page ids]; grid (pages, pools).
__global__ void clear_pages(const long long* __restrict__ meta, int npools) {
  lserve::pdl_enter();
  const long long bytes = meta[npools + blockIdx.y];
  uint4* page = reinterpret_cast<uint4*>(meta[blockIdx.y] + meta[2 * npools + blockIdx.x] * bytes);
  for (long long i = threadIdx.x; i < bytes / 16; i += blockDim.x) page[i] = make_uint4(0u, 0u, 0u, 0u);
}

// out[n, i] = silu(gu[n, i]) * gu[n, inter + i]; flat grid over N * inter / VEC (VEC = 8 when inter % 8 == 0).
template <int VEC>
__global__ void silu_mul(const __half* __restrict__ gu, __half* __restrict__ out, int inter, long long total) {
  lserve::pdl_enter();
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  const long long e = t * VEC, n = e / inter, i = e - n * inter;
  const __half* g = gu + n * 2 * inter + i;
  const __half* u = g + inter;
  __half* o = out + e;
  if (VEC == 8) {
    uint4 gv = *reinterpret_cast<const uint4*>(g), uv = *reinterpret_cast<const uint4*>(u), ov;
    const __half* gh = reinterpret_cast<const __half*>(&gv);
    const __half* uh = reinterpret_cast<const __half*>(&uv);
    __half* oh = reinterpret_cast<__half*>(&ov);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float gf = __half2float(gh[k]);
      oh[k] = __float2half(gf / (1.0f + expf(-gf)) * __half2float(uh[k]));
    }
    *reinterpret_cast<uint4*>(o) = ov;
  } else {
    const float gf = __half2float(g[0]);
    o[0] = __float2half(gf / (1.0f + expf(-gf)) * __half2float(u[0]));
  }
}

// Small-batch linear for decode: y[n, m] = sum_k x[n, k] w[m, k] for N <= 8 rows, fp32 accumulation.
// S warps per output feature m (blockDim.x / 32 / S features per block; S divides the block's warps), each
// summing every S-th 512-byte stretch of the row; slice 0 adds the others' sums from dynamic shared memory
// (8 x W x N floats after the NORM area) and writes y. S > 1 lets a matrix with fewer rows than the GPU has
// warps (4096 x 4096, 4096 x 14336) keep more loads in flight at once (CudaOps.gemv_slices chooses it; the
// Llama-3-8B decode step 4.5% faster on an H200, docs/PERF_e2e.md).
// 16-byte loads of w (read once) and of x (N * K halves, L1/L2-resident); needs K % 8 == 0. cuBLAS handles
// every other shape (CudaOps.gemm).
// SILU (TOut = __half): w is the row-fused gate/up matrix [2M, K] and y[n, m] = silu(g) * u with g, u the float32
// dot products of rows m and M + m (silu_mul's epilogue on them, without the fp16 round trip of [N, 2M]);
// reference: silu_mul_ref(x @ w^T) (CudaOps.gate_up_silu).
// NORM: x is the layer's stream before its residual add and RMSNorm (rms_in.cuh; res_in, res_out, norm_w, eps), the
// block puts the normed rows in dynamic shared memory (N * K halves, then rms_rows' scratch) and the warps read
// them from there (CudaOps.rmsnorm_linear); the other instantiations ignore those four arguments.
// ROPE (gemv_rows_rope; rope_out.cuh's RopeKind: the cache's kind and KV format): w is the fused q/k/v matrix, M
// counts RoPE pairs, a warp's two rows are outputs 2m and 2m + 1 in rope_out.cuh's paired order, and its epilogue
// rotates them and writes q and the K/V page slots (`ro`; CudaOps.qkv_rope; reference: rope_write_kv_ref of
// x @ w^T). Each row's sum is the one gemv_rows computes at the same S.
// Tuning (compile definitions; CudaOps passes env LSERVE_GEMV_PREFETCH / LSERVE_GEMV_UNROLL): chunks of each row
// prefetched to L2 before the PDL wait, and the K loop's unroll. Measured on an H200 (docs/PERF_e2e.md): any
// prefetch (2-8 KiB a row) was slower, unrolling by 8 faster than by 4 or 16; this build, with the loop at span 0,
// measured 2.7% faster end to end than the same kernel with the loop removed (cause not found).
#ifndef LSERVE_GEMV_PREFETCH
#define LSERVE_GEMV_PREFETCH 0
#endif
#ifndef LSERVE_GEMV_UNROLL
#define LSERVE_GEMV_UNROLL 8
#endif
template <int N, typename TOut, bool SILU, bool NORM, int ROPE>
__device__ __forceinline__ void gemv_rows_body(const __half* __restrict__ x, const __half* __restrict__ w,
                                               TOut* __restrict__ y, int M, int K, int S, const float* res_in,
                                               float* res_out, const __half* __restrict__ norm_w, float eps,
                                               const lserve::RopeOut& ro) {
  static_assert(!(SILU && ROPE), "one epilogue");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m = blockIdx.x * ((blockDim.x >> 5) / S) + warp / S, slice = warp % S;
  constexpr int W = SILU || ROPE ? 2 : 1;  // rows of w per warp: m (and its up row M + m, or its RoPE pair)
  const uint4* wr[W];
  const int kc = K / 8;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    if constexpr (ROPE != 0)  // outputs 2m + i in rope_out.cuh's paired order
      wr[i] = reinterpret_cast<const uint4*>(w + (long long)lserve::rope_row(2 * min(m, M - 1) + i, ro.head_dim) * K);
    else
      wr[i] = reinterpret_cast<const uint4*>(w + ((long long)i * M + min(m, M - 1)) * K);
    for (int c = lane; c < min(kc, LSERVE_GEMV_PREFETCH); c += 32)  // while the previous kernel ends
      lserve::prefetch_l2(wr[i] + c);
  }
  lserve::pdl_enter();
  extern __shared__ uint4 normed[];  // dynamic: with NORM the normed rows and rms scratch; then, S > 1, partial sums
  const __half* xr = x;  // the rows the warps multiply: x, or the normed rows in shared memory
  if constexpr (NORM) {
    float* rstd = reinterpret_cast<float*>(normed + N * kc);
    const lserve::RmsIn in{res_in, res_out, norm_w, eps};
    lserve::rms_rows<N>(x, in, N, K, rstd);
    for (int i = threadIdx.x; i < N * kc; i += blockDim.x) {
      float h[8];
      lserve::rms_normed8(x, in, rstd, i / kc, K, i % kc, h);
      __half2 p[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) p[j] = __floats2half2_rn(h[2 * j], h[2 * j + 1]);
      normed[i] = *reinterpret_cast<const uint4*>(p);
    }
    __syncthreads();
    xr = reinterpret_cast<const __half*>(normed);
  }
  if (m >= M && S == 1) return;  // (with S > 1 every warp reaches the block barrier below)
  float acc[W][N];
#pragma unroll
  for (int i = 0; i < W; ++i)
#pragma unroll
    for (int n = 0; n < N; ++n) acc[i][n] = 0.f;
  constexpr int UNROLL = LSERVE_GEMV_UNROLL;
#pragma unroll UNROLL
  for (int c = lane + 32 * slice; c < kc; c += 32 * S) {
    uint4 wv[W];
#pragma unroll
    for (int i = 0; i < W; ++i) wv[i] = __ldg(wr[i] + c);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const uint4* xp = reinterpret_cast<const uint4*>(xr + (long long)n * K) + c;
      const uint4 xv = NORM ? *xp : __ldg(xp);
      const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const __half2* wh = reinterpret_cast<const __half2*>(&wv[i]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 wf = __half22float2(wh[j]), xf = __half22float2(xh[j]);
          acc[i][n] = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, acc[i][n]));
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < W; ++i)
#pragma unroll
    for (int n = 0; n < N; ++n) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[i][n] += __shfl_xor_sync(0xffffffffu, acc[i][n], o);
    }
  if (S > 1) {  // slices 1..S-1 hand their sums to slice 0 of the same row, added in slice order
    float* part = reinterpret_cast<float*>(normed) + (NORM ? N * kc * 4 + lserve::rms_scratch_floats<N> : 0);
    if (lane == 0 && slice > 0)
#pragma unroll
      for (int i = 0; i < W; ++i)
#pragma unroll
        for (int n = 0; n < N; ++n) part[(warp * W + i) * N + n] = acc[i][n];
    __syncthreads();
    if (lane == 0 && slice == 0)
      for (int s = 1; s < S; ++s)
#pragma unroll
        for (int i = 0; i < W; ++i)
#pragma unroll
          for (int n = 0; n < N; ++n) acc[i][n] += part[((warp + s) * W + i) * N + n];
  }
  if constexpr (ROPE != 0) {
    int fin = -1;
    if (lane == 0 && slice == 0 && m < M) fin = lserve::rope_store_rows<N, ROPE>(ro, N, 2 * m, acc[0], acc[W - 1]);
    lserve::rope_finish<N, ROPE>(ro, N, fin);
  } else if (lane == 0 && slice == 0 && m < M) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      if constexpr (SILU) {
        const float g = acc[0][n];
        y[(long long)n * M + m] = __float2half(g / (1.0f + expf(-g)) * acc[W - 1][n]);
      } else {
        y[(long long)n * M + m] = (TOut)acc[0][n];
      }
    }
  }
}


template <int N, typename TOut, bool SILU = false, bool NORM = false>
__global__ void gemv_rows(const __half* __restrict__ x, const __half* __restrict__ w, TOut* __restrict__ y, int M,
                          int K, int S, const float* res_in, float* res_out, const __half* __restrict__ norm_w,
                          float eps) {
  gemv_rows_body<N, TOut, SILU, NORM, 0>(x, w, y, M, K, S, res_in, res_out, norm_w, eps, lserve::RopeOut{});
}

// The q/k/v GEMV with the RoPE epilogue (ROPE above; CudaOps.qkv_rope): M RoPE pairs, no y; its own kernel so
// that the other instantiations keep their argument list (a struct argument costs CuPy's launcher ~8 scalars').
template <int N, bool NORM, int ROPE>
__global__ void gemv_rows_rope(const __half* __restrict__ x, const __half* __restrict__ w, int M, int K, int S,
                               const float* res_in, float* res_out, const __half* __restrict__ norm_w, float eps,
                               const lserve::RopeOut ro) {
  gemv_rows_body<N, __half, false, NORM, ROPE>(x, w, nullptr, M, K, S, res_in, res_out, norm_w, eps, ro);
}

template __global__ void embed_gather<1>(const __half*, const long long*, __half*, int, long long, long long);
template __global__ void embed_gather<8>(const __half*, const long long*, __half*, int, long long, long long);
template __global__ void add_rmsnorm<false, false>(const __half*, const float*, float*, const __half*, __half*, int, float);
template __global__ void add_rmsnorm<false, true>(const __half*, const float*, float*, const __half*, __half*, int, float);
template __global__ void add_rmsnorm<true, false>(const __half*, const float*, float*, const __half*, __half*, int, float);
template __global__ void add_rmsnorm<true, true>(const __half*, const float*, float*, const __half*, __half*, int, float);
template __global__ void silu_mul<1>(const __half*, __half*, int, long long);
template __global__ void silu_mul<8>(const __half*, __half*, int, long long);
template __global__ void gemv_rows<1, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<2, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<3, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<4, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<5, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<6, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<7, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<8, __half>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<1, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<2, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<3, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<4, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<5, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<6, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<7, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<8, float>(const __half*, const __half*, float*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<1, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<2, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<3, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<4, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<5, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<6, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<7, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<8, __half, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<1, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<1, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<2, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<2, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<3, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<3, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<4, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<4, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<5, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<5, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<6, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<6, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<7, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<7, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<8, __half, false, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
template __global__ void gemv_rows<8, __half, true, true>(const __half*, const __half*, __half*, int, int, int, const float*, float*, const __half*, float);
