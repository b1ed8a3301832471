// KV-cache formats (--kv-dtype) as template parameters of the K/V-write and attention kernels.
// The rule, and its float64 reference: lserve_lite/kv/quant.py. A quantized pool is values
// [pages, heads, page, D * BITS / 8] plus fp16 scales [pages, heads, page, SCALES] indexed by the same page id.
// int8: one scale per (token, head) = amax / 127, values round(x / scale) in [-127, 127].
// int4: asymmetric, per group of 16 channels a (scale, min) pair of halves, scale = (max - min) / 15,
//       value scale * q + min with q in 0..15, channel 2i in the low nibble of byte i.
// fp8:  one scale per (token, head) = amax / 448, values the nearest e4m3 (ties to even), converted in
//       software here (bit-exact with the reference; no sm_89 instruction needed to compile).
// Scales (and int4's min) are rounded to fp16 first and the values quantized against them, as the reference.
// Self-contained (inline PTX conversions on raw 16-bit words), so layers.cu and the attention kernels share it.
#pragma once

namespace lskv {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float h2f(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ unsigned short f2h(float x) {
  unsigned short r;
  asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
  return r;
}
#else  // compiled as host code (tools/layers_host_emu.cu): cuda_fp16.h's conversions, the same rounding
__device__ __forceinline__ float h2f(unsigned short h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ unsigned short f2h(float x) { return __half_as_ushort(__float2half_rn(x)); }
#endif
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {  // half2, lo in the low 16 bits
  unsigned int r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// e4m3 (fn) bits -> float; code 127 (NaN) is never written.
__device__ __forceinline__ float e4m3_to_float(unsigned int b) {
  const unsigned int e = (b >> 3) & 15u, m = b & 7u;
  const float v = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;
  return (b & 128u) ? -v : v;
}
// float -> nearest e4m3 bits, ties to even, saturating at 448 (kv/quant.py::e4m3_encode).
__device__ __forceinline__ unsigned int float_to_e4m3(float x) {
  const float a = fminf(fabsf(x), 448.f);
  unsigned int code;
  if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (a result of 8 is the smallest normal)
    code = (unsigned int)rintf(a * 512.f);
  } else {
    const int e = (int)((__float_as_uint(a) >> 23) & 255u) - 127;  // -6 .. 8
    const float q = rintf(a * __uint_as_float((unsigned int)(127 + 3 - e) << 23));  // 8 .. 16
    code = (unsigned int)((e + 7) << 3) + (unsigned int)q - 8u;
  }
  return code | (signbit(x) ? 128u : 0u);
}

// The formats. QUANT: values + scales; BITS per stored value; GROUP channels per scale (0: the whole head);
// ASYM: a (scale, min) pair per group (int4) instead of a scale; BF16: 16-bit values are bf16, not fp16. The K and
// V pools share the format; kernels are instantiated per format.
struct Half {
  static constexpr bool QUANT = false, ASYM = false, BF16 = false;
  static constexpr int BITS = 16, GROUP = 0;
};
// bf16 values, queries and output: Half's path with bf16 products and conversions (the Hopper prefill kernel only).
struct BHalf : Half {
  static constexpr bool BF16 = true;
};
struct Int8 {
  static constexpr bool QUANT = true, ASYM = false, BF16 = false;
  static constexpr int BITS = 8, GROUP = 0;
  static constexpr float QMAX = 127.f;
  __device__ static float value(unsigned int byte) { return (float)(signed char)byte; }
  __device__ static unsigned int encode(float y) { return (unsigned int)(int)fminf(fmaxf(rintf(y), -127.f), 127.f) & 255u; }
};
struct Fp8 {
  static constexpr bool QUANT = true, ASYM = false, BF16 = false;
  static constexpr int BITS = 8, GROUP = 0;
  static constexpr float QMAX = 448.f;
  __device__ static float value(unsigned int byte) { return e4m3_to_float(byte); }
  __device__ static unsigned int encode(float y) { return float_to_e4m3(y); }
};
struct Int4 {
  static constexpr bool QUANT = true, ASYM = true, BF16 = false;
  static constexpr int BITS = 4, GROUP = 16;
  static constexpr float QMAX = 15.f;
};

// fp16 scale entries of one (token, head) row: a scale (or a (scale, min) pair) per group.
template <class KV>
__host__ __device__ constexpr int scale_cols(int head_dim) {
  return (KV::GROUP ? head_dim / KV::GROUP : 1) * (KV::ASYM ? 2 : 1);
}

// One (token, head) row of D channels in format KV.
template <class KV, int D>
struct Row {
  static constexpr int BYTES = D * KV::BITS / 8;                     // stored values
  static constexpr int GROUPS = KV::GROUP ? D / KV::GROUP : 1;        // scale groups
  static constexpr int SCALES = scale_cols<KV>(D);                   // fp16 entries: (scale, min) per group if ASYM
  static constexpr int SCALE_BYTES = 2 * SCALES;
  static constexpr int CHUNKS = BYTES / 16;                          // 16-byte value chunks
  static constexpr int CHUNK_CH = 128 / KV::BITS;                    // channels per chunk: 16, or 32 (int4)
  static constexpr int OUT_CHUNKS = CHUNK_CH / 8;                    // 16-byte fp16 chunks it expands to
  static_assert(!KV::QUANT || GROUPS == 1 || CHUNK_CH % KV::GROUP == 0, "a value chunk holds whole groups");
};

// ---- Register-level conversions (decode v2's fragments in attention_decode.cu; dequant16<KV, true>) ----
// Magic-number conversions: the half whose bits are 0x6400 | b is 1024 + b for b < 1024, so a byte or nibble
// placed in the low mantissa bits and 1024 (+ the storage offset) subtracted gives the value exactly.
__device__ __forceinline__ unsigned int prmt(unsigned int a, unsigned int b, unsigned int sel) {
  unsigned int d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
__device__ __forceinline__ unsigned int hsub2(unsigned int a, unsigned int b) {
  unsigned int d;
  asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ unsigned int hfma2(unsigned int a, unsigned int b, unsigned int c) {
  unsigned int d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
// The two e4m3 bytes in the low 16 bits of x -> half2 (byte 0 in the low half). sm_89+: the hardware
// conversion (exact). Elsewhere: the bits moved into a half, which is then the value / 256 exactly (normal and
// subnormal alike); FP8_UNIT is that factor, folded by the caller into the scales.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
constexpr float FP8_UNIT = 1.f;
__device__ __forceinline__ unsigned int e4m3x2_to_h2(unsigned int x) {
  unsigned int d;
  asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n}\n" : "=r"(d) : "r"(x));
  return d;
}
#else
constexpr float FP8_UNIT = 256.f;
__device__ __forceinline__ unsigned int e4m3x2_to_h2(unsigned int x) {
  const unsigned int y = prmt(x, 0u, 0x1404u);  // [0, byte 0, 0, byte 1]: sign at bits 15 / 31
  return ((y >> 1) & 0x3F803F80u) | (y & 0x80008000u);
}
#endif

__device__ __forceinline__ unsigned int hmul2(unsigned int a, unsigned int b) {
  unsigned int d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
// The two bytes of x that prmt selector sel picks (0x4140: bytes 0, 1; 0x4342: bytes 2, 3), each in the low
// mantissa of a half 1024 + byte, minus bias2 (0x64006400: 1024, unsigned; 0x64806480: 1152, int8 stored ^ 0x80).
__device__ __forceinline__ unsigned int bytes_h2(unsigned int x, unsigned int sel, unsigned int bias2) {
  return hsub2(prmt(x, 0x64646464u, sel), bias2);
}

template <class A, class B>
constexpr bool same_fmt = false;
template <class A>
constexpr bool same_fmt<A, A> = true;

// A 16-byte value chunk -> fp16 channels, as OUT_CHUNKS 16-byte words; sc: the fp16 scale entries of the
// chunk's first group (int4: (scale, min) pairs, 32 / GROUP groups per chunk).
// H2 = false: each value and scale in fp32 (the mma.sync prefill kernel). H2 = true: in packed halves (the wgmma
// prefill kernel): the values exact in fp16 (magic numbers, fp8 by the hardware conversion), then one f16x2
// multiply (fma with the min for int4), so int8 / fp8 give the fp32 path's bits (value * scale is exact in fp32
// and rounded once either way) and int4 rounds q * scale + min once instead of twice; fewer instructions, and no
// integer-to-float conversions (a low-throughput unit).
template <class KV, bool H2 = false>
__device__ __forceinline__ void dequant16(const uint4 w, const unsigned short* sc, uint4* out) {
  const unsigned int word[4] = {w.x, w.y, w.z, w.w};
  unsigned int h[KV::BITS == 4 ? 16 : 8];
  if constexpr (H2 && KV::BITS == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: channels 8i .. 8i + 7, byte j the nibbles of 8i + 2j, 8i + 2j + 1
      const int g = 8 * i / KV::GROUP;
      const unsigned int s2 = sc[2 * g] * 0x10001u, m2 = sc[2 * g + 1] * 0x10001u;
      const unsigned int lo = word[i] & 0x0F0F0F0Fu, hi = (word[i] >> 4) & 0x0F0F0F0Fu;
      const unsigned int a = prmt(lo, hi, 0x5140u), b = prmt(lo, hi, 0x7362u);  // [l0 h0 l1 h1], [l2 h2 l3 h3]
      h[4 * i] = hfma2(bytes_h2(a, 0x4140u, 0x64006400u), s2, m2);
      h[4 * i + 1] = hfma2(bytes_h2(a, 0x4342u, 0x64006400u), s2, m2);
      h[4 * i + 2] = hfma2(bytes_h2(b, 0x4140u, 0x64006400u), s2, m2);
      h[4 * i + 3] = hfma2(bytes_h2(b, 0x4342u, 0x64006400u), s2, m2);
    }
  } else if constexpr (H2) {
    static_assert(!same_fmt<KV, Fp8> || FP8_UNIT == 1.f, "packed-half fp8: the hardware conversion (sm_89+)");
    const unsigned int s2 = sc[0] * 0x10001u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: channels 4i .. 4i + 3
      if constexpr (same_fmt<KV, Fp8>) {
        h[2 * i] = hmul2(e4m3x2_to_h2(word[i]), s2);
        h[2 * i + 1] = hmul2(e4m3x2_to_h2(word[i] >> 16), s2);
      } else {
        const unsigned int x = word[i] ^ 0x80808080u;
        h[2 * i] = hmul2(bytes_h2(x, 0x4140u, 0x64806480u), s2);
        h[2 * i + 1] = hmul2(bytes_h2(x, 0x4342u, 0x64806480u), s2);
      }
    }
  } else if constexpr (KV::BITS == 4) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {  // byte i: channels 2i, 2i + 1 of group 2i / GROUP
      const unsigned int b = (word[i >> 2] >> (8 * (i & 3))) & 255u;
      const float s = h2f(sc[2 * (2 * i / KV::GROUP)]), m = h2f(sc[2 * (2 * i / KV::GROUP) + 1]);
      h[i] = pack2(fmaf((float)(b & 15u), s, m), fmaf((float)(b >> 4), s, m));
    }
  } else {
    const float s = h2f(sc[0]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const unsigned int pair = word[i >> 1] >> (16 * (i & 1));
      h[i] = pack2(KV::value(pair & 255u) * s, KV::value((pair >> 8) & 255u) * s);
    }
  }
#pragma unroll
  for (int k = 0; k < (KV::BITS == 4 ? 4 : 2); ++k) out[k] = make_uint4(h[4 * k], h[4 * k + 1], h[4 * k + 2], h[4 * k + 3]);
}

// The randomized Hadamard basis of int4's keys and queries (kv/quant.py::hadamard; CudaOps passes `hadamard` where
// KVCache.rotates_keys). Channel c's sign: negative where bit c % 64 of word c / 64 is set (kv/quant.py's
// HADAMARD_SIGN_WORDS, the same words: tests/test_kv_quant.py reads them here).
__device__ __forceinline__ float hadamard_sign(int c) {
  const unsigned long long w = c < 64    ? 0x81191FF5899001F8ull
                               : c < 128 ? 0x2AA2ACD7368C93C2ull
                               : c < 192 ? 0x1607075CC4F70B22ull
                                         : 0xDE4E9C5C92664F53ull;
  return (w >> (c & 63)) & 1ull ? -1.f : 1.f;
}

// The row held as quantize_row holds it (lane l: channel i * 32 + l in x[i], i < ni = D / 32, D a power of two)
// into that basis: the signs, the butterflies a + b, a - b at channel strides 1, 2, 4, ... (the lane bits, then
// the bits of i), then one multiply by 1 / sqrt(D): the reference's order, so its bits.
__device__ __forceinline__ void hadamard_row(float (&x)[8], int ni, int lane) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < ni) x[i] *= hadamard_sign(i * 32 + lane);
#pragma unroll
  for (int s = 1; s < 32; s <<= 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i < ni) {  // ni is warp-uniform
        const float p = __shfl_xor_sync(0xffffffffu, x[i], s);
        x[i] = (lane & s) ? p - x[i] : x[i] + p;
      }
    }
  }
#pragma unroll
  for (int s = 1; s < 8; s <<= 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (!(i & s) && i + s < ni) {
        const float a = x[i], b = x[i + s];
        x[i] = a + b;
        x[i + s] = a - b;
      }
    }
  }
  const float r = 1.f / sqrtf((float)(32 * ni));
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < ni) x[i] *= r;
}

// Warp-cooperative quantization of one (token, head) row: lane l holds channel i * 32 + l in x[i]
// (i < ni = D / 32); writes the row's values and fp16 scales. Every lane of the warp must call it. A NaN in a row
// (or in an int4 group) gives it a NaN scale (and (scale, min)), so it reads as NaN, as kv/quant.quantize and a float
// cache keep it: fmaxf / fminf skip a NaN, which then stored a finite row.
template <class KV>
__device__ __forceinline__ void quantize_row(const float (&x)[8], int ni, unsigned char* vals,
                                             unsigned short* scales, int lane) {
  if constexpr (KV::GROUP == 0) {
    float a = 0.f;
    int bad = 0;
    for (int i = 0; i < ni; ++i) a = fmaxf(a, fabsf(x[i])), bad |= isnan(x[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if (__any_sync(0xffffffffu, bad)) a = __int_as_float(0x7fc00000);
    const unsigned short sh = f2h(a / KV::QMAX);
    const float s = h2f(sh);
    if (lane == 0) scales[0] = sh;
    for (int i = 0; i < ni; ++i) vals[i * 32 + lane] = (unsigned char)KV::encode(s > 0.f ? x[i] / s : 0.f);
  } else {
    static_assert(KV::ASYM && 32 % KV::GROUP == 0, "int4: (scale, min) pairs of groups of lanes");
    for (int i = 0; i < ni; ++i) {  // channel i * 32 + lane, of group (i * 32 + lane) / GROUP
      float lo = x[i], hi = x[i];
      int bad = isnan(x[i]);
#pragma unroll
      for (int o = KV::GROUP / 2; o > 0; o >>= 1) {  // within the lane's group
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
      }
      if (bad) lo = hi = __int_as_float(0x7fc00000);
      const unsigned short mh = f2h(lo);
      const float m = h2f(mh);
      const unsigned short sh = f2h((hi - m) / KV::QMAX);  // the range from the stored min, as the reference
      const float s = h2f(sh);
      const int grp = (i * 32 + lane) / KV::GROUP;
      if (lane % KV::GROUP == 0) scales[2 * grp] = sh, scales[2 * grp + 1] = mh;
      const int q = s > 0.f ? (int)fminf(fmaxf(rintf((x[i] - m) / s), 0.f), KV::QMAX) : 0;
      const int q1 = __shfl_down_sync(0xffffffffu, q, 1);  // the odd neighbour: the byte's high nibble
      if (!(lane & 1)) vals[(i * 32 + lane) >> 1] = (unsigned char)(q | (q1 << 4));
    }
  }
}

}  // namespace lskv
