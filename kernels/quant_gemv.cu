// Quantized weights read straight from their packed blocks (GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K, our int8 / int4).
// Launchers: lserve_lite/backends/cuda_quant.py (QuantKernels). References: the block layouts and the float
// dequantization of lserve_lite/weights/qtensor.py (checked against gguf.quants.dequantize), and the Numba
// block decoders of lserve_lite/backends/cpu_quant.py (_block_dequant); harness rows: harness/quant.py.
//
// Each format is a trait struct (the one place its byte layout lives on the GPU), and the kernels are
// templates over it:
//   quant_gemv<F, NMAX, TOut>  decode GEMV, y[r, m] = sum_k x[r, k] W[m, k] for n <= NMAX rows of fp16 x.
//   quant_gemv2<F, NMAX, TOut> the same product, another kernel (LSERVE_QGEMV=v2 / auto; docs/QUANT.md has the
//                             H200 figures of both): no shared memory, the trait's v2 members (UPB, WORDS,
//                             GROUPS, unit, gk, q8) decode per-lane units, scales applied once per 8 values.
//   quant_dequant<F>          rows of W as fp16 (prefill tiles for cuBLAS, and the embedding gather).
// A trait gives BLOCK values per BYTES bytes after a HEAD-byte row header (int8's fp16 row scale), SEG blocks
// per GEMV segment (a multiple of 16 bytes where the block size allows), `row_scale(row)` and
// `decode8(block, e, row_scale, v)`: the float values of elements e..e+7 of a block (e % 8 == 0). Decoding is
// exact float32 arithmetic on the stored fields, as the CPU's _block_dequant.

#include <cuda_fp16.h>

#include "pdl.cuh"

typedef unsigned char u8;

// A little-endian IEEE half at any byte address.
__device__ __forceinline__ float f16_at(const u8* p) {
  return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

// Bytes p[0..7] as two little-endian words, from aligned 32-bit loads and funnel shifts (p may have any
// alignment; up to 4 bytes past p + 8 are read: the GEMV stage and the device weights have that slack).
__device__ __forceinline__ void load8(const u8* p, unsigned& lo, unsigned& hi) {
  const unsigned long long a = reinterpret_cast<unsigned long long>(p);
  const unsigned* w = reinterpret_cast<const unsigned*>(a & ~3ull);
  const unsigned sh = (unsigned)(a & 3) * 8;
  const unsigned w0 = w[0], w1 = w[1], w2 = w[2];
  lo = __funnelshift_r(w0, w1, sh);
  hi = __funnelshift_r(w1, w2, sh);
}

// Integers to floats without a conversion instruction (I2F runs at a fraction of the FMA rate): 2^23 + u for a
// small unsigned u is the float whose mantissa bits are u; subtracting (2^23 + offset) leaves u - offset exactly.
constexpr float MAGIC = 8388608.f;  // 2^23
__device__ __forceinline__ float magic_u(unsigned u) { return __uint_as_float(0x4B000000u | u); }
// 2^23 + byte t of w (a byte permute puts it under 2^23's exponent bits)
__device__ __forceinline__ float magic_byte(unsigned w, int t) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | t));
}

// q4_0 / q4_1 / int4 nibble order: value i < H is qs[i] & 15, value i >= H is qs[i - H] >> 4.
// v[t] = d * (nib(e + t) - z) + mn, with zo = 2^23 + z.
template <int H>
__device__ __forceinline__ void nibbles8(const u8* qs, int e, float d, float zo, float mn, float (&v)[8]) {
  unsigned lo, hi;
  load8(qs + (e < H ? e : e - H), lo, hi);
  const int sh = e < H ? 0 : 4;
  lo = (lo >> sh) & 0x0F0F0F0Fu;
  hi = (hi >> sh) & 0x0F0F0F0Fu;
#pragma unroll
  for (int t = 0; t < 8; ++t) v[t] = d * (magic_byte(t < 4 ? lo : hi, t & 3) - zo) + mn;
}

// v[t] = s * (signed byte p[t]): the bytes flipped to offset binary (q + 128) for magic_byte.
__device__ __forceinline__ void int8x8(const u8* p, float s, float (&v)[8]) {
  unsigned lo, hi;
  load8(p, lo, hi);
  lo ^= 0x80808080u;
  hi ^= 0x80808080u;
#pragma unroll
  for (int t = 0; t < 8; ++t) v[t] = s * (magic_byte(t < 4 ? lo : hi, t & 3) - (MAGIC + 128.f));
}


// ---- v2 (quant_gemv2) helpers: no shared-memory stage; each lane reads its own unit of the packed row ----

// An fp16 field (every fp16 field of every format sits at an even byte offset of a row: one 16-bit load).
__device__ __forceinline__ float h16(const u8* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// NW little-endian words of bytes p[0 .. 4 NW) at any alignment: NW + 1 aligned 32-bit read-only loads (all
// issued before any use) and funnel shifts. Reads up to 4 bytes past p + 4 NW (the weights have 16 of slack).
template <int NW>
__device__ __forceinline__ void loadw(const u8* p, unsigned* w) {
  const unsigned long long a = reinterpret_cast<unsigned long long>(p);
  const unsigned* b = reinterpret_cast<const unsigned*>(a & ~3ull);
  const unsigned sh = (unsigned)(a & 3) * 8;
  unsigned r[NW + 1];
#pragma unroll
  for (int i = 0; i <= NW; ++i) r[i] = __ldg(b + i);
#pragma unroll
  for (int i = 0; i < NW; ++i) w[i] = __funnelshift_r(r[i], r[i + 1], sh);
}

// Byte i of little-endian words w.
__device__ __forceinline__ unsigned byte_of(const unsigned* w, int i) { return (w[i >> 2] >> (8 * (i & 3))) & 255u; }

// What one lane decodes at a time in quant_gemv2: GROUPS groups of 8 values from WORDS words, value t of
// group g = d[g] * q[t] + m[g] with q[t] a small integer (exact in float32).
template <int WORDS, int GROUPS>
struct UnitT {
  unsigned w[WORDS];
  float d[GROUPS], m[GROUPS];
};

// 8 nibbles of a unit whose words hold GROUPS / 2 groups in their low nibbles then GROUPS / 2 in their high ones
// (q4_0 / q4_1 / int4 / q4_k order), as 2^23 + nibble - z (q is exact: the caller subtracts nothing more).
template <int GROUPS>
__device__ __forceinline__ void nib_q8(const unsigned* w, int g, float z, float (&q)[8]) {
  const int pr = g & (GROUPS / 2 - 1), sh = 4 * (g / (GROUPS / 2));
  const unsigned lo = (w[2 * pr] >> sh) & 0x0F0F0F0Fu, hi = (w[2 * pr + 1] >> sh) & 0x0F0F0F0Fu;
#pragma unroll
  for (int t = 0; t < 8; ++t) q[t] = magic_byte(t < 4 ? lo : hi, t & 3) - (MAGIC + z);
}

// 8 signed bytes (words w[2g], w[2g + 1]) as floats.
__device__ __forceinline__ void i8_q8(const unsigned* w, int g, float (&q)[8]) {
  const unsigned lo = w[2 * g] ^ 0x80808080u, hi = w[2 * g + 1] ^ 0x80808080u;
#pragma unroll
  for (int t = 0; t < 8; ++t) q[t] = magic_byte(t < 4 ? lo : hi, t & 3) - (MAGIC + 128.f);
}

// v2 trait members: UPB units per block, each GROUPS groups of 8 values read from WORDS words; MIN: the format
// has an additive term m. unit(block, s, row scale, U) loads unit s; gk(s, g) is the element of group g of unit s
// in its block; q8(U, g, q) its 8 integers.

struct Q8_0 {  // d:f16, q[32]:i8; w = d * q
  static constexpr int BLOCK = 32, BYTES = 34, HEAD = 0, SEG = 32;
  static __device__ float row_scale(const u8*) { return 1.f; }
  static __device__ void decode8(const u8* b, int e, float, float (&v)[8]) { int8x8(b + 2 + e, f16_at(b), v); }
  static constexpr int UPB = 1, WORDS = 8, GROUPS = 4;
  static constexpr bool MIN = false;
  typedef UnitT<WORDS, GROUPS> U;
  static __device__ void unit(const u8* b, int, float, U& u) {
    loadw<8>(b + 2, u.w);
    const float d = h16(b);
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) u.d[g] = d, u.m[g] = 0.f;
  }
  static __device__ int gk(int, int g) { return 8 * g; }
  static __device__ void q8(const U& u, int g, float (&q)[8]) { i8_q8(u.w, g, q); }
};

struct Q4_0 {  // d:f16, qs[16]; w = d * (nib - 8)
  static constexpr int BLOCK = 32, BYTES = 18, HEAD = 0, SEG = 64;
  static __device__ float row_scale(const u8*) { return 1.f; }
  static __device__ void decode8(const u8* b, int e, float, float (&v)[8]) {
    nibbles8<16>(b + 2, e, f16_at(b), MAGIC + 8.f, 0.f, v);
  }
  static constexpr int UPB = 1, WORDS = 4, GROUPS = 4;
  static constexpr bool MIN = false;
  typedef UnitT<WORDS, GROUPS> U;
  static __device__ void unit(const u8* b, int, float, U& u) {
    loadw<4>(b + 2, u.w);
    const float d = h16(b);
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) u.d[g] = d, u.m[g] = 0.f;
  }
  static __device__ int gk(int, int g) { return 8 * (g & 1) + 16 * (g >> 1); }
  static __device__ void q8(const U& u, int g, float (&q)[8]) { nib_q8<GROUPS>(u.w, g, 8.f, q); }
};

struct Q4_1 {  // d:f16, m:f16, qs[16]; w = d * nib + m
  static constexpr int BLOCK = 32, BYTES = 20, HEAD = 0, SEG = 64;
  static __device__ float row_scale(const u8*) { return 1.f; }
  static __device__ void decode8(const u8* b, int e, float, float (&v)[8]) {
    nibbles8<16>(b + 4, e, f16_at(b), MAGIC, f16_at(b + 2), v);
  }
  static constexpr int UPB = 1, WORDS = 4, GROUPS = 4;
  static constexpr bool MIN = true;
  typedef UnitT<WORDS, GROUPS> U;
  static __device__ void unit(const u8* b, int, float, U& u) {
    loadw<4>(b + 4, u.w);
    const float d = h16(b), m = h16(b + 2);
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) u.d[g] = d, u.m[g] = m;
  }
  static __device__ int gk(int, int g) { return 8 * (g & 1) + 16 * (g >> 1); }
  static __device__ void q8(const U& u, int g, float (&q)[8]) { nib_q8<GROUPS>(u.w, g, 0.f, q); }
};

struct Q4_K {  // d:f16, dmin:f16, scales[12] (8 x 6-bit scale, 6-bit min), qs[128]; w = d*sc[s]*q - dmin*m[s]
  static constexpr int BLOCK = 256, BYTES = 144, HEAD = 0, SEG = 8;
  static __device__ float row_scale(const u8*) { return 1.f; }
  static __device__ void decode8(const u8* b, int e, float, float (&v)[8]) {
    const int s = e >> 5;  // sub-block of 32 values
    const u8* sc = b + 4;  // ggml's get_scale_min_k4
    unsigned scale, mn;
    if (s < 4) {
      scale = sc[s] & 63;
      mn = sc[s + 4] & 63;
    } else {
      scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
      mn = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
    const float ds = f16_at(b) * (magic_u(scale) - MAGIC), dm = f16_at(b + 2) * (magic_u(mn) - MAGIC);
    unsigned lo, hi;  // sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles) share 32 bytes
    load8(b + 16 + 32 * (s >> 1) + (e & 31), lo, hi);
    const int sh = 4 * (s & 1);
    lo = (lo >> sh) & 0x0F0F0F0Fu;
    hi = (hi >> sh) & 0x0F0F0F0Fu;
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = ds * (magic_byte(t < 4 ? lo : hi, t & 3) - MAGIC) - dm;
  }
  // v2 unit j < 4: the 32 bytes of sub-blocks 2j (low nibbles, groups 0-3) and 2j + 1 (high, groups 4-7)
  static constexpr int UPB = 4, WORDS = 8, GROUPS = 8;
  static constexpr bool MIN = true;
  typedef UnitT<WORDS, GROUPS> U;
  static __device__ void unit(const u8* b, int j, float, U& u) {
    unsigned sw[3];
    loadw<3>(b + 4, sw);
    loadw<8>(b + 16 + 32 * j, u.w);
    const float d = h16(b), dmin = h16(b + 2);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int s = 2 * j + h;
      unsigned scale, mn;
      if (s < 4) {
        scale = byte_of(sw, s) & 63;
        mn = byte_of(sw, s + 4) & 63;
      } else {
        scale = (byte_of(sw, s + 4) & 15) | ((byte_of(sw, s - 4) >> 6) << 4);
        mn = (byte_of(sw, s + 4) >> 4) | ((byte_of(sw, s) >> 6) << 4);
      }
      const float ds = d * (magic_u(scale) - MAGIC), dm = dmin * (magic_u(mn) - MAGIC);
#pragma unroll
      for (int g = 4 * h; g < 4 * h + 4; ++g) u.d[g] = ds, u.m[g] = -dm;
    }
  }
  static __device__ int gk(int j, int g) { return 64 * j + 8 * g; }
  static __device__ void q8(const U& u, int g, float (&q)[8]) { nib_q8<GROUPS>(u.w, g, 0.f, q); }
};

struct Q6_K {  // ql[128], qh[64], sc[16]:i8, d:f16; w = d * sc[i / 16] * (q6(i) - 32)
  static constexpr int BLOCK = 256, BYTES = 210, HEAD = 0, SEG = 8;
  static __device__ float row_scale(const u8*) { return 1.f; }
  static __device__ void decode8(const u8* b, int e, float, float (&v)[8]) {
    const int h = e >> 7, g = (e >> 5) & 3, i = e & 31;  // half of 128, quarter of 32, index in it
    unsigned l0, l1, h0, h1;
    load8(b + 64 * h + 32 * (g & 1) + i, l0, l1);  // ql: 4 low bits
    load8(b + 128 + 32 * h + i, h0, h1);           // qh: 2 high bits
    const int shl = 4 * (g >> 1), shh = 2 * g;
    l0 = ((l0 >> shl) & 0x0F0F0F0Fu) | (((h0 >> shh) & 0x03030303u) << 4);
    l1 = ((l1 >> shl) & 0x0F0F0F0Fu) | (((h1 >> shh) & 0x03030303u) << 4);
    const float dsc = f16_at(b + 208) * (magic_u(b[192 + (e >> 4)] ^ 0x80u) - (MAGIC + 128.f));
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = dsc * (magic_byte(t < 4 ? l0 : l1, t & 3) - (MAGIC + 32.f));
  }
  // v2 unit s = 2h + p: ql[64h + 32p ..] (quarters p and p + 2 of half h) and qh[32h ..]; group i: quarter
  // p + 2 (i >> 2), elements 8 (i & 3) .. of it
  static constexpr int UPB = 4, WORDS = 16, GROUPS = 8;
  static constexpr bool MIN = false;
  typedef UnitT<WORDS, GROUPS> U;
  static __device__ void unit(const u8* b, int s, float, U& u) {
    const int h = s >> 1, p = s & 1;
    loadw<8>(b + 64 * h + 32 * p, u.w);  // ql
    loadw<8>(b + 128 + 32 * h, u.w + 8);  // qh
#pragma unroll
    for (int i = 8; i < 16; ++i) u.w[i] >>= 2 * p;  // quarter p's 2 bits at bit 0 of each byte, p + 2's at bit 4
    const float d = h16(b + 208);
    const unsigned short* sc = reinterpret_cast<const unsigned short*>(b + 192 + 8 * h + 2 * p);
    const unsigned s0 = __ldg(sc), s1 = __ldg(sc + 2);  // scales of quarter p, then quarter p + 2 (2 each)
#pragma unroll
    for (int i = 0; i < GROUPS; ++i) {
      const unsigned sb = ((i < 4 ? s0 : s1) >> (8 * ((i & 3) >> 1))) & 255u;
      u.d[i] = d * (magic_u(sb ^ 0x80u) - (MAGIC + 128.f));
      u.m[i] = 0.f;
    }
  }
  static __device__ int gk(int s, int i) { return 128 * (s >> 1) + 32 * ((s & 1) + 2 * (i >> 2)) + 8 * (i & 3); }
  static __device__ void q8(const U& u, int i, float (&q)[8]) {
    const int pr = i & 3, sh = 4 * (i >> 2);  // quarter p + 2 (i >> 2): nibble i >> 2, qh bits 2p + sh
    const unsigned q0 = ((u.w[2 * pr] >> sh) & 0x0F0F0F0Fu) | (((u.w[8 + 2 * pr] >> sh) & 0x03030303u) << 4);
    const unsigned q1 = ((u.w[2 * pr + 1] >> sh) & 0x0F0F0F0Fu) | (((u.w[9 + 2 * pr] >> sh) & 0x03030303u) << 4);
#pragma unroll
    for (int t = 0; t < 8; ++t) q[t] = magic_byte(t < 4 ? q0 : q1, t & 3) - (MAGIC + 32.f);
  }

};

struct INT8 {  // row: s:f16, then q[32]:i8 blocks; w = s * q (per output channel)
  static constexpr int BLOCK = 32, BYTES = 32, HEAD = 2, SEG = 32;
  static __device__ float row_scale(const u8* row) { return f16_at(row); }
  static __device__ void decode8(const u8* b, int e, float s, float (&v)[8]) { int8x8(b + e, s, v); }
  static constexpr int UPB = 1, WORDS = 8, GROUPS = 4;
  static constexpr bool MIN = false;
  typedef UnitT<WORDS, GROUPS> U;
  static __device__ void unit(const u8* b, int, float rs, U& u) {
    loadw<8>(b, u.w);
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) u.d[g] = rs, u.m[g] = 0.f;
  }
  static __device__ int gk(int, int g) { return 8 * g; }
  static __device__ void q8(const U& u, int g, float (&q)[8]) { i8_q8(u.w, g, q); }
};

struct INT4 {  // d:f16, qs[64]; w = d * (nib - 8): q4_0 with blocks of 128
  static constexpr int BLOCK = 128, BYTES = 66, HEAD = 0, SEG = 16;
  static __device__ float row_scale(const u8*) { return 1.f; }
  static __device__ void decode8(const u8* b, int e, float, float (&v)[8]) {
    nibbles8<64>(b + 2, e, f16_at(b), MAGIC + 8.f, 0.f, v);
  }
  // v2 unit s < 2: qs[32s ..], low nibbles = elements 32s + .. (groups 0-3), high = 64 + 32s + .. (groups 4-7)
  static constexpr int UPB = 2, WORDS = 8, GROUPS = 8;
  static constexpr bool MIN = false;
  typedef UnitT<WORDS, GROUPS> U;
  static __device__ void unit(const u8* b, int s, float, U& u) {
    loadw<8>(b + 2 + 32 * s, u.w);
    const float d = h16(b);
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) u.d[g] = d, u.m[g] = 0.f;
  }
  static __device__ int gk(int s, int g) { return 32 * s + 8 * g + (g >= 4 ? 32 : 0); }
  static __device__ void q8(const U& u, int g, float (&q)[8]) { nib_q8<GROUPS>(u.w, g, 8.f, q); }
};

constexpr int QWARPS = 4;  // output rows (one per warp) per block of quant_gemv; cuda_quant.GEMV_WARPS

// The 16-byte words covering one segment of SEG blocks at any byte offset, and each lane's share of them.
template <typename F>
struct Segment {
  static constexpr int BYTES = F::SEG * F::BYTES;
  static constexpr int WORDS = (BYTES + 30) / 16;
  static constexpr int PER_LANE = (WORDS + 31) / 32;
};

// Issue the loads of the aligned words covering bytes [p, p + nbytes) (lane's share into r); returns the count.
template <typename F>
__device__ __forceinline__ int load_words(const u8* p, int nbytes, int lane, uint4 (&r)[Segment<F>::PER_LANE]) {
  const unsigned long long addr = reinterpret_cast<unsigned long long>(p);
  const uint4* a = reinterpret_cast<const uint4*>(addr & ~15ull);
  const int words = (int)((addr & 15) + nbytes + 15) >> 4;
#pragma unroll
  for (int i = 0; i < Segment<F>::PER_LANE; ++i) {
    const int wi = lane + 32 * i;
    if (wi < words) r[i] = __ldg(a + wi);
  }
  return words;
}

// One warp per output row m. The row's packed bytes stream through a per-warp shared-memory stage in segments
// of SEG blocks: coalesced 16-byte loads (the next segment's are issued before the current one is decoded),
// then each lane decodes groups of 8 values and multiplies them with the n rows of x (fp32 accumulation).
// Needs the weight buffer readable 15 bytes past its last row (cuda_quant.DeviceQuant pads 16) and K % 8 == 0.
// y[r * ldy + m] (ldy >= M: a column block of a wider output).
template <typename F, int NMAX, typename TOut>
__global__ void __launch_bounds__(QWARPS * 32)
    quant_gemv(const u8* __restrict__ w, long long row_bytes, const __half* __restrict__ x, int n,
               TOut* __restrict__ y, int ldy, int M, int K) {
  typedef Segment<F> S;
  __shared__ uint4 stage[QWARPS][S::PER_LANE * 32 + 1];  // + 1: load8's slack
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int m = blockIdx.x * QWARPS + wid;
  if (m >= M) return;
  const u8* row = w + (long long)m * row_bytes;
  const u8* blocks = row + F::HEAD;
  const float rs = F::row_scale(row);
  const int nb = K / F::BLOCK;
  uint4* buf = stage[wid];
  float acc[NMAX];
#pragma unroll
  for (int r = 0; r < NMAX; ++r) acc[r] = 0.f;
  uint4 regs[S::PER_LANE];
  int words = load_words<F>(blocks, min(F::SEG, nb) * F::BYTES, lane, regs);
  lserve::pdl_enter();  // the first weights are in flight; x comes from the previous kernel
  for (int b0 = 0; b0 < nb; b0 += F::SEG) {
    const int nblk = min(F::SEG, nb - b0);
    const int off = (int)(reinterpret_cast<unsigned long long>(blocks + (long long)b0 * F::BYTES) & 15);
    __syncwarp();  // every lane is done reading the previous segment
#pragma unroll
    for (int i = 0; i < S::PER_LANE; ++i) {
      const int wi = lane + 32 * i;
      if (wi < words) buf[wi] = regs[i];
    }
    __syncwarp();
    if (b0 + F::SEG < nb) {
      const int b1 = b0 + F::SEG;
      words = load_words<F>(blocks + (long long)b1 * F::BYTES, min(F::SEG, nb - b1) * F::BYTES, lane, regs);
    }
    const u8* seg = reinterpret_cast<const u8*>(buf) + off;
    const int groups = nblk * (F::BLOCK / 8);
#pragma unroll 2
    for (int g = lane; g < groups; g += 32) {
      const int blk = g / (F::BLOCK / 8), e = (g % (F::BLOCK / 8)) * 8;
      float v[8];
      F::decode8(seg + blk * F::BYTES, e, rs, v);
      const long long k0 = (long long)(b0 + blk) * F::BLOCK + e;
#pragma unroll
      for (int r = 0; r < NMAX; ++r) {
        if (r < n) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + r * (long long)K + k0));
          const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 xf = __half22float2(xh[j]);
            acc[r] = fmaf(v[2 * j], xf.x, fmaf(v[2 * j + 1], xf.y, acc[r]));
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < NMAX; ++r) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < NMAX; ++r)
      if (r < n) y[(long long)r * ldy + m] = (TOut)acc[r];
  }
}

constexpr int QWARPS2 = 8;  // output rows (one per warp) per block of quant_gemv2; cuda_quant.GEMV2_WARPS

// v2 (LSERVE_QGEMV=v2 in cuda_quant.py): one warp per output row m, no shared memory. The row is cut into units
// (F::UPB per block, 32-128 values: whole blocks for q8_0 / q4_0 / q4_1 / int8); lane l takes units l, l + 32,
// ...: consecutive lanes read consecutive bytes (coalesced), each lane issues the read-only 32-bit loads of UNR
// units (F::WORDS + 1 words and its scales each) before decoding any, so a warp keeps ~UNR * 32 * WORDS * 4 bytes
// in flight. A group of 8 values is decoded once to small integers q (exact floats), dotted with each of the n
// rows of x in float32 (exact products q * x), and the group's partial sum is scaled once: acc += d * sum(q x)
// (+ m * sum(x) for q4_1 / q4_k's additive term). Warp-shuffle reduction, y[r * ldy + m].
// Needs the weights readable 4 bytes past the last row (16 padded) and K % F::BLOCK == 0.
template <typename F, int NMAX, typename TOut>
__global__ void __launch_bounds__(QWARPS2 * 32)
    quant_gemv2(const u8* __restrict__ w, long long row_bytes, const __half* __restrict__ x, int n,
                TOut* __restrict__ y, int ldy, int M, int K) {
  constexpr int UNR = F::WORDS <= 4 ? 4 : (F::WORDS <= 8 ? (NMAX <= 4 ? 4 : 2) : 2);
  const int lane = threadIdx.x & 31;
  const int m = blockIdx.x * QWARPS2 + (threadIdx.x >> 5);
  lserve::pdl_enter();
  if (m >= M) return;
  const u8* row = w + (long long)m * row_bytes;
  const u8* blocks = row + F::HEAD;
  const float rs = F::HEAD ? F::row_scale(row) : 1.f;
  const int nu = (K / F::BLOCK) * F::UPB;
  float acc[NMAX];
#pragma unroll
  for (int r = 0; r < NMAX; ++r) acc[r] = 0.f;
  for (int u0 = 0; u0 < nu; u0 += 32 * UNR) {
    typename F::U un[UNR];
#pragma unroll
    for (int j = 0; j < UNR; ++j) {
      const int u = u0 + lane + 32 * j;
      if (u < nu) F::unit(blocks + (long long)(u / F::UPB) * F::BYTES, u % F::UPB, rs, un[j]);
    }
#pragma unroll
    for (int j = 0; j < UNR; ++j) {
      const int u = u0 + lane + 32 * j;
      if (u < nu) {
        const long long kb = (long long)(u / F::UPB) * F::BLOCK;
#pragma unroll
        for (int g = 0; g < F::GROUPS; ++g) {
          float q[8];
          F::q8(un[j], g, q);
          const long long k0 = kb + F::gk(u % F::UPB, g);
#pragma unroll
          for (int r = 0; r < NMAX; ++r) {
            if (r < n) {
              const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + r * (long long)K + k0));
              const __half2* xh = reinterpret_cast<const __half2*>(&xv);
              float p0 = 0.f, p1 = 0.f, sx = 0.f;
#pragma unroll
              for (int t = 0; t < 4; ++t) {
                const float2 xf = __half22float2(xh[t]);
                p0 = fmaf(q[2 * t], xf.x, p0);
                p1 = fmaf(q[2 * t + 1], xf.y, p1);
                if (F::MIN) sx += xf.x + xf.y;
              }
              acc[r] = fmaf(un[j].d[g], p0 + p1, acc[r]);
              if (F::MIN) acc[r] = fmaf(un[j].m[g], sx, acc[r]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < NMAX; ++r) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < NMAX; ++r)
      if (r < n) y[(long long)r * ldy + m] = (TOut)acc[r];
  }
}

// out[j, :] = W's row (rows ? rows[j] : r0 + j) as fp16, for j < nrows; one thread per 8 values (a 16-byte store).
// Prefill tiles for cuBLAS (rows null) and the embedding gather of a quantized table (rows = token ids).
template <typename F>
__global__ void quant_dequant(const u8* __restrict__ w, long long row_bytes, const long long* __restrict__ rows,
                              long long r0, int nrows, int K, __half* __restrict__ out) {
  lserve::pdl_enter();
  const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const int per_row = K / 8;
  if (idx >= (long long)nrows * per_row) return;
  const long long j = idx / per_row;
  const int k0 = (int)(idx % per_row) * 8;
  const u8* row = w + (rows ? rows[j] : r0 + j) * row_bytes;
  float v[8];
  F::decode8(row + F::HEAD + (k0 / F::BLOCK) * F::BYTES, k0 % F::BLOCK, F::row_scale(row), v);
  __align__(16) __half h[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) h[t] = __float2half_rn(v[t]);
  *reinterpret_cast<uint4*>(out + j * K + k0) = *reinterpret_cast<const uint4*>(h);
}
