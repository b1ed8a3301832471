// Host emulation of kernels/quant_gemv.cu for checking it without a GPU (driven by tools/quant_host_check.py).
// The kernel source is compiled unchanged as host code (tools/host_emu.cuh), with host versions of the few
// intrinsics it adds. Not a performance model.
//   quant_host_emu gemv FMT n M K ldy W X Y     y[n, ldy] (float) = x[n, K] (fp16) @ W^T through quant_gemv
//   quant_host_emu gemv2 FMT n M K ldy W X Y    the same through quant_gemv2 (LSERVE_QGEMV=v2)
//   quant_host_emu dequant FMT M K n W IDS OUT  out[n, K] (fp16) = rows IDS (int64) of W through quant_dequant
// and of kernels/quant_gemv_split.cu (the split layout's arrays Q D MN SUB as written by quant_split.split):
//   quant_host_emu split FMT n M K ldy R P G Q D MN SUB X Y   y through quant_gemv_split: R rows per warp (-2: 2,
//                                                            with the deep register sets, UX = 2), P passes,
//                                                            G blocks (0: a row group per warp; fewer: each warp
//                                                            loops over several, as LSERVE_QGEMV_SPLIT=persist)
//   quant_host_emu ssilu FMT n M K ldy R G Q D MN SUB X Y     y[n, ldy] (fp16) = silu(x Wg^T) * (x Wu^T) through
//                                                            quant_gemv_split with SILU (W = [Wg; Wu]: 2M rows)
//   quant_host_emu dsplit FMT M K n Q D MN SUB IDS OUT      rows IDS through quant_dequant_split
// and of gemv_rows in kernels/layers.cu (its text, cut out by quant_host_check.py into gemv_rows.inc: the rest
// of layers.cu has inline PTX), W fp16:
//   quant_host_emu grows - n M K W X Y                  y[n, M] (float) = x W^T through gemv_rows<n, float>
//   quant_host_emu gsilu - n M K W X Y                  y[n, M] (fp16) through gemv_rows<n, __half, true>
// The spread norm (spread_norm.cuh), one row of x:
//   quant_host_emu sadd FMT M K R G Q D MN SUB X RES PART   quant_gemv_split_spread with SPREAD_ADD (R as split's:
//                                                          -2 the deep sets): RES [M] float32 updated in place,
//                                                          PART [blocks] written (NaN-poisoned first)
// and an ssilu / srope run of n = 1 may start with `spread RES PARTS NP LNW EPS` (X "-"): the SPREAD_NORM kernels
// (quant_gemv_split_spread with SILU, quant_gemv_split_rope_spread) over RMSNorm(RES [K]) from NP partials.
// A grows / gsilu run may start with `norm RES LNW RESOUT EPS` (RES "-": no residual): gemv_rows' NORM
// instantiation (rms_in.cuh's residual add and RMSNorm of x in the prologue; fp16 outputs), with the residual
// stream it writes in RESOUT.
// The q/k/v GEMVs with rope_out.cuh's epilogue (W: (Hq + 2 Hkv) D rows; int64 POS [n] and SLOTS ([2n] with HC:
// dense-pool then streaming-pool slots), fp16 COS / SIN [L, D / 2], QOUT [n, Hq, D], KC / VC [P, nd, page, D],
// KS / VS [P, ns, page, D], int32 HC / HS [Hkv] (head class, pool row), KMAX / KMIN [P, nd, sub, D]; "-" for
// KS .. KMIN: none (a dense cache: nd = Hkv); the outputs are read first (their sentinels) and written back):
//   quant_host_emu srope FMT n Hq Hkv D K page L P nd ns sub G Q D MN SUB X POS SLOTS COS SIN QOUT KC VC KS VS HC
//                        HS KMAX KMIN          quant_gemv_split_rope, G blocks as above
//   quant_host_emu grope - n Hq Hkv D K page L P nd ns sub W X POS SLOTS ... KMIN   gemv_rows_rope<n, false, ROPE>
//                                                            (EMU_GEMV_SLICES warps per pair)
#include "host_emu.cuh"

#include <type_traits>

static unsigned emu_byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
}
static unsigned emu_funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
  return (unsigned)((((unsigned long long)hi << 32) | lo) >> (sh & 31));
}
#define __syncwarp() emu_syncwarp()
#define __ldg(p) (*(p))
#define __byte_perm emu_byte_perm
#define __funnelshift_r emu_funnelshift_r
#include "quant_gemv.cu"

// quant_gemv_split.cu: a block barrier for __syncthreads, its dynamic shared memory as one global array (the
// emulator runs one block at a time), host dp4a and rounding.
static int emu_dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
  return c;
}
#define __dp4a emu_dp4a
#define __float2int_rn(f) ((int)nearbyintf(f))
#define __fmul_rn(a, b) ((a) * (b))  // host float arithmetic rounds each operation to nearest (no contraction)
#define __fadd_rn(a, b) ((a) + (b))
#define __fsub_rn(a, b) ((a) - (b))
#undef __shared__
#define __shared__
#include "quant_gemv_split.cu"
int4 smem[1 << 15];
#include "rms_in.cuh"
#include "rope_out.cuh"
#include "gemv_rows.inc"
uint4 normed[1 << 13];  // gemv_rows' dynamic shared memory with NORM

// The `norm` arguments: files named on the command line, read once n and K are known.
struct EmuNorm {
  bool on = false;
  const char *res_path, *w_path, *out_path;
  float eps;
  const float* res = nullptr;
  float* res_out = nullptr;
  const __half* w = nullptr;
};
EmuNorm emu_norm;

struct EmuSpread {  // the `spread` prefix's files, read when K is known
  bool on = false;
  const char *res_path, *part_path, *w_path;
  int parts = 0;
  float eps = 0.f;
};
EmuSpread emu_spread;

template <typename T>
static T* read_file(const char* path, size_t count, size_t pad) {
  T* p = (T*)aligned_alloc(256, (count * sizeof(T) + pad + 255) / 256 * 256);
  memset(p, 0xA5, (count * sizeof(T) + pad + 255) / 256 * 256);  // garbage past the end, as on the device
  FILE* f = fopen(path, "rb");
  if (!f || fread(p, sizeof(T), count, f) != count) exit(3);
  fclose(f);
  return p;
}

// The SPREAD_NORM kernels' argument from the `spread` prefix's files, for one row of K.
static lserve::Spread spread_norm_args(int K) {
  lserve::Spread sp{};
  sp.res = read_file<float>(emu_spread.res_path, K, 0);
  sp.part = read_file<float>(emu_spread.part_path, emu_spread.parts, 0);
  sp.w = read_file<__half>(emu_spread.w_path, K, 0);
  sp.ld = K, sp.parts = emu_spread.parts, sp.eps = emu_spread.eps;
  return sp;
}

// A kernel with barriers: `blocks` blocks of `warps` warps (host_emu.cuh's launch).
template <typename Fn>
static void launch_blocks(int blocks, int warps, Fn kernel) {
  launch({(unsigned)blocks, 1, 1}, warps * 32, kernel);
}

template <typename T>
static void write_file(const char* path, const T* p, size_t count) {
  FILE* f = fopen(path, "wb");
  fwrite(p, sizeof(T), count, f);
  fclose(f);
}

// Reads the norm's inputs for n rows of K (res_out poisoned with NaN: block 0 must write every value).
static void norm_load(int n, int K) {
  if (!emu_norm.on) return;
  if (strcmp(emu_norm.res_path, "-")) emu_norm.res = read_file<float>(emu_norm.res_path, (size_t)n * K, 0);
  emu_norm.w = read_file<__half>(emu_norm.w_path, K, 0);
  float* r = (float*)aligned_alloc(256, ((size_t)n * K * 4 + 255) / 256 * 256);
  for (size_t i = 0; i < (size_t)n * K; ++i) r[i] = NAN;
  emu_norm.res_out = r;
}
static void norm_save(int n, int K) {
  if (emu_norm.on) write_file(emu_norm.out_path, emu_norm.res_out, (size_t)n * K);
}

template <typename F, int NMAX, int V>
static void gemv(int n, int M, int K, int ldy, char** a) {
  constexpr int WARPS = V == 2 ? QWARPS2 : QWARPS;
  const long long rb = F::HEAD + (long long)(K / F::BLOCK) * F::BYTES;
  const u8* w = read_file<u8>(a[0], (size_t)M * rb, 16);
  const __half* x = read_file<__half>(a[1], (size_t)n * K, 0);
  std::vector<float> y((size_t)n * ldy, 12345.f);  // a sentinel: columns past M must stay untouched
  float* yp = y.data();
  launch_blocks((M + WARPS - 1) / WARPS, WARPS, [=] {
    if (V == 2)
      quant_gemv2<F, NMAX, float>(w, rb, x, n, yp, ldy, M, K);
    else
      quant_gemv<F, NMAX, float>(w, rb, x, n, yp, ldy, M, K);
  });
  write_file(a[2], yp, y.size());
}

template <typename F, int V>
static void gemv_n(int n, int M, int K, int ldy, char** a) {
  if (n <= 1) return gemv<F, 1, V>(n, M, K, ldy, a);
  if (n <= 2) return gemv<F, 2, V>(n, M, K, ldy, a);
  if (n <= 4) return gemv<F, 4, V>(n, M, K, ldy, a);
  gemv<F, 8, V>(n, M, K, ldy, a);
}

// A one-thread-per-item kernel (no barriers) over `total` items in blocks of 256, run sequentially.
template <typename Fn>
static void launch_threads(long long total, Fn kernel) {
  emu_block_dim = {256, 1, 1};
  emu_grid_dim = {(unsigned)((total + 255) / 256), 1, 1};
  for (long long g = 0; g < (total + 255) / 256; ++g)
    for (unsigned t = 0; t < 256; ++t) {
      emu_block = {(unsigned)g, 0, 0};
      emu_thread = {t, 0, 0};
      kernel();
    }
}

template <typename F>
static void dequant(int M, int K, int n, char** a) {
  const long long rb = F::HEAD + (long long)(K / F::BLOCK) * F::BYTES;
  const u8* w = read_file<u8>(a[0], (size_t)M * rb, 16);
  const long long* rows = read_file<long long>(a[1], n, 0);
  __half* out = (__half*)aligned_alloc(256, ((size_t)n * K * 2 + 255) / 256 * 256);
  launch_threads((long long)n * (K / 8), [&] { quant_dequant<F>(w, rb, rows, 0, n, K, out); });
  write_file(a[2], out, (size_t)n * K);
}

// The split arrays of a rows x K matrix from files a[0..3] (Q D MN SUB; MN / SUB: the scales again where the
// format has none, never read).
template <typename S>
struct SplitArrays {
  const u8* q;
  const __half *d, *mn;
  const unsigned short* sub;
  SplitArrays(char** a, int rows, int K) {
    const int groups = S::CPG ? K / (32 * S::CPG) : 1;
    q = read_file<u8>(a[0], (size_t)rows * K * S::BITS / 8, 16);
    d = read_file<__half>(a[1], (size_t)rows * groups, 16);
    mn = S::MIN ? read_file<__half>(a[2], (size_t)rows * groups, 16) : d;
    sub = S::SUB ? read_file<unsigned short>(a[3], (size_t)rows * (K / 32), 16) : (const unsigned short*)d;
  }
};

// The grid of a split launch: G blocks, at most the one that gives each warp one row group of `outs` outputs.
static int split_grid(int outs, int per_warp, int G) {
  const int full = (outs + SWARPS * per_warp - 1) / (SWARPS * per_warp);
  return G > 0 && G < full ? G : full;
}

template <typename S, int R, int NMAX, int P, int UX>
static void gemv_split(int n, int M, int K, int ldy, int G, char** a) {
  const SplitArrays<S> w(a, M, K);
  const __half* x = read_file<__half>(a[4], (size_t)n * K, 0);
  std::vector<float> y((size_t)n * ldy, 12345.f);
  float* yp = y.data();
  launch_blocks(split_grid(M, R, G), SWARPS,
                [=] { quant_gemv_split<S, R, NMAX, P, float, false, UX>(w.q, w.d, w.mn, w.sub, x, n, yp, ldy, M, K); });
  write_file(a[5], yp, y.size());
}

template <typename S, int R, int P, int UX>
static void gemv_split_n(int n, int M, int K, int ldy, int G, char** a) {
  if (n <= 1) return gemv_split<S, R, 1, P, UX>(n, M, K, ldy, G, a);
  if (n <= 2) return gemv_split<S, R, 2, P, UX>(n, M, K, ldy, G, a);
  if (n <= 4) return gemv_split<S, R, 4, P, UX>(n, M, K, ldy, G, a);
  gemv_split<S, R, 8, P, UX>(n, M, K, ldy, G, a);
}

template <typename S, int R, int UX = 1>
static void gemv_split_p(int n, int M, int K, int ldy, int P, int G, char** a) {
  if (P == 2) return gemv_split_n<S, R, 2, UX>(n, M, K, ldy, G, a);
  gemv_split_n<S, R, 1, UX>(n, M, K, ldy, G, a);
}

// quant_gemv_split with SILU: M outputs from 2M rows of W; y fp16 with a sentinel (12344) everywhere.
template <typename S, int R, int NMAX>
static void gemv_split_silu(int n, int M, int K, int ldy, int G, char** a) {
  const SplitArrays<S> w(a, 2 * M, K);
  const __half* x = read_file<__half>(a[4], (size_t)n * K, 0);
  std::vector<__half> y((size_t)n * ldy, __float2half(12344.f));
  __half* yp = y.data();
  launch_blocks(split_grid(M, R / 2, G), SWARPS, [=] {
    quant_gemv_split<S, R, NMAX, 1, __half, true>(w.q, w.d, w.mn, w.sub, x, n, yp, ldy, M, K);
  });
  write_file(a[5], yp, y.size());
}

// quant_gemv_split_spread with SILU and SPREAD_NORM: one row, its input RMSNorm(RES) from the partials.
template <typename S, int R>
static void gemv_split_silu_spread(int M, int K, int ldy, int G, char** a) {
  const SplitArrays<S> w(a, 2 * M, K);
  const lserve::Spread sp = spread_norm_args(K);
  std::vector<__half> y((size_t)ldy, __float2half(12344.f));
  __half* yp = y.data();
  launch_blocks(split_grid(M, R / 2, G), SWARPS, [=] {
    quant_gemv_split_spread<S, R, true, 1, lserve::SPREAD_NORM>(w.q, w.d, w.mn, w.sub, nullptr, yp, ldy, M, K, sp);
  });
  write_file(a[5], yp, y.size());
}

// quant_gemv_split_spread with SPREAD_ADD: RES [M] += fp16(x W^T), PART [blocks] the blocks' sums of squares.
template <typename S, int R, int UX>
static void gemv_split_add(int M, int K, int G, char** a) {
  const SplitArrays<S> w(a, M, K);
  const int blocks = split_grid(M, R, G);
  lserve::Spread sp{};
  sp.res = read_file<float>(a[5], M, 0);
  std::vector<float> part(blocks, NAN);
  sp.part = part.data(), sp.ld = M;
  const __half* x = read_file<__half>(a[4], K, 0);
  launch_blocks(blocks, SWARPS, [=] {
    quant_gemv_split_spread<S, R, false, UX, lserve::SPREAD_ADD>(w.q, w.d, w.mn, w.sub, x, nullptr, 0, M, K, sp);
  });
  write_file(a[5], sp.res, M);
  write_file(a[6], part.data(), blocks);
}

template <typename S, int R>
static void gemv_split_silu_n(int n, int M, int K, int ldy, int G, char** a) {
  if (n <= 1) return gemv_split_silu<S, R, 1>(n, M, K, ldy, G, a);
  if (n <= 4) return gemv_split_silu<S, R, 4>(n, M, K, ldy, G, a);
  gemv_split_silu<S, R, 8>(n, M, K, ldy, G, a);
}

template <typename S>
static void dequant_split(int M, int K, int n, char** a) {
  const SplitArrays<S> w(a, M, K);
  const long long* rows = read_file<long long>(a[4], n, 0);
  __half* out = (__half*)aligned_alloc(256, ((size_t)n * K * 2 + 255) / 256 * 256);
  launch_threads((long long)n * (K / 8), [&] { quant_dequant_split<S>(w.q, w.d, w.mn, w.sub, rows, 0, n, K, out); });
  write_file(a[5], out, (size_t)n * K);
}

// The epilogue's arrays (srope / grope): sizes n Hq Hkv D K page L P nd ns sub, then files POS SLOTS COS SIN QOUT
// KC VC KS VS HC HS KMAX KMIN ("-": a null pointer, the dense cache's); save() writes the written ones back.
struct EmuRope {
  lserve::RopeOut ro{};
  __half *kc, *vc, *ks, *vs;  // ro's fp16 pools, typed
  size_t nq, nkv, nst, nstream;
  char** a;
  template <typename T>
  static T* opt(const char* path, size_t count) {
    return strcmp(path, "-") ? read_file<T>(path, count, 0) : nullptr;
  }
  EmuRope(int n, int hq, int hkv, int d, int page, int L, int P, int nd, int ns, int sub, char** files) : a(files) {
    nq = (size_t)n * hq * d, nkv = (size_t)P * nd * page * d, nstream = (size_t)P * ns * page * d;
    nst = (size_t)P * nd * sub * d;
    const bool sparse = strcmp(a[9], "-") != 0;
    ro.positions = read_file<long long>(a[0], n, 0);
    ro.slots = read_file<long long>(a[1], (size_t)(sparse ? 2 : 1) * n, 0);
    ro.cos_t = read_file<__half>(a[2], (size_t)L * d / 2, 0);
    ro.sin_t = read_file<__half>(a[3], (size_t)L * d / 2, 0);
    ro.q_out = read_file<__half>(a[4], nq, 0);
    ro.k_cache = kc = read_file<__half>(a[5], nkv, 0);
    ro.v_cache = vc = read_file<__half>(a[6], nkv, 0);
    ro.ks = ks = opt<__half>(a[7], nstream);
    ro.vs = vs = opt<__half>(a[8], nstream);
    ro.rope = sparse ? 2 : 1;
    ro.head_class = opt<int>(a[9], hkv);
    ro.head_slot = opt<int>(a[10], hkv);
    ro.kmax = opt<__half>(a[11], nst);
    ro.kmin = opt<__half>(a[12], nst);
    ro.hq = hq, ro.hkv = hkv, ro.head_dim = d, ro.page_size = page;
    ro.nd = nd, ro.ns = ns, ro.sub = sub, ro.n_rows = n;
  }
  void save() const {
    write_file(a[4], ro.q_out, nq);
    write_file(a[5], kc, nkv);
    write_file(a[6], vc, nkv);
    if (ks) write_file(a[7], ks, nstream), write_file(a[8], vs, nstream);
    if (ro.kmax) write_file(a[11], ro.kmax, nst), write_file(a[12], ro.kmin, nst);
  }
};

template <typename S, int NMAX, int KIND>
static void gemv_split_rope(const int* s, char** a) {  // s: n Hq Hkv D K page L P nd ns sub G
  const int n = s[0], K = s[4], M = (s[1] + 2 * s[2]) * s[3], G = s[11];
  const SplitArrays<S> w(a, M, K);
  const __half* x = read_file<__half>(a[4], (size_t)n * K, 0);
  const EmuRope e(n, s[1], s[2], s[3], s[5], s[6], s[7], s[8], s[9], s[10], a + 5);
  const lserve::RopeOut ro = e.ro;
  launch_blocks(split_grid(M, 2, G), SWARPS, [=] {
    quant_gemv_split_rope<S, NMAX, KIND>(w.q, w.d, w.mn, w.sub, x, n, M, K, ro);
  });
  e.save();
}

// quant_gemv_split_rope_spread: srope's arguments (n = 1, X "-") over RMSNorm(RES) from the `spread` partials.
template <typename S, int KIND>
static void gemv_split_rope_spread(const int* s, char** a) {
  const int K = s[4], M = (s[1] + 2 * s[2]) * s[3], G = s[11];
  const SplitArrays<S> w(a, M, K);
  const EmuRope e(1, s[1], s[2], s[3], s[5], s[6], s[7], s[8], s[9], s[10], a + 5);
  const lserve::RopeOut ro = e.ro;
  const lserve::Spread sp = spread_norm_args(K);
  launch_blocks(split_grid(M, 2, G), SWARPS, [=] {
    quant_gemv_split_rope_spread<S, KIND>(w.q, w.d, w.mn, w.sub, M, K, ro, sp);
  });
  e.save();
}

template <int N, int KIND>
static void rows_rope(const int* s, char** a) {  // s: n Hq Hkv D K page L P nd ns sub
  const int K = s[4], M = (s[1] + 2 * s[2]) * s[3] / 2;  // RoPE pairs
  const __half* w = read_file<__half>(a[0], (size_t)2 * M * K, 0);
  const __half* x = read_file<__half>(a[1], (size_t)N * K, 0);
  const EmuRope e(N, s[1], s[2], s[3], s[5], s[6], s[7], s[8], s[9], s[10], a + 2);
  const lserve::RopeOut ro = e.ro;
  const char* env = getenv("EMU_GEMV_SLICES");
  const int S = env ? atoi(env) : 1;
  launch_blocks((M * S + 7) / 8, 8, [=] {
    gemv_rows_rope<N, false, KIND>(x, w, M, K, S, nullptr, nullptr, nullptr, 0.f, ro);
  });
  e.save();
}

template <typename S>
static void run_split(const std::string& mode, char** v) {
  if (mode == "srope") {
    int s[12];
    for (int i = 0; i < 12; ++i) s[i] = atoi(v[i]);  // n Hq Hkv D K page L P nd ns sub G
    const bool ls = strcmp(v[12 + 5 + 9], "-") != 0;  // HC given: an LServe cache (ROPE = 2)
    if (emu_spread.on) return ls ? gemv_split_rope_spread<S, 2>(s, v + 12) : gemv_split_rope_spread<S, 1>(s, v + 12);
    if (s[0] <= 1) return ls ? gemv_split_rope<S, 1, 2>(s, v + 12) : gemv_split_rope<S, 1, 1>(s, v + 12);
    if (s[0] <= 4) return ls ? gemv_split_rope<S, 4, 2>(s, v + 12) : gemv_split_rope<S, 4, 1>(s, v + 12);
    return ls ? gemv_split_rope<S, 8, 2>(s, v + 12) : gemv_split_rope<S, 8, 1>(s, v + 12);
  }
  if (mode == "dsplit") return dequant_split<S>(atoi(v[0]), atoi(v[1]), atoi(v[2]), v + 3);
  if (mode == "sadd") {
    const int M = atoi(v[0]), K = atoi(v[1]), R = atoi(v[2]), G = atoi(v[3]);
    if (R == 1) return gemv_split_add<S, 1, 1>(M, K, G, v + 4);
    if (R == 2) return gemv_split_add<S, 2, 1>(M, K, G, v + 4);
    if (R == -2) return gemv_split_add<S, 2, 2>(M, K, G, v + 4);
    return gemv_split_add<S, 4, 1>(M, K, G, v + 4);
  }
  if (mode == "ssilu") {
    const int n = atoi(v[0]), M = atoi(v[1]), K = atoi(v[2]), ldy = atoi(v[3]), R = atoi(v[4]), G = atoi(v[5]);
    if (emu_spread.on) return R == 2 ? gemv_split_silu_spread<S, 2>(M, K, ldy, G, v + 6)
                                     : gemv_split_silu_spread<S, 4>(M, K, ldy, G, v + 6);
    if (R == 2) return gemv_split_silu_n<S, 2>(n, M, K, ldy, G, v + 6);
    return gemv_split_silu_n<S, 4>(n, M, K, ldy, G, v + 6);
  }
  const int n = atoi(v[0]), M = atoi(v[1]), K = atoi(v[2]), ldy = atoi(v[3]), R = atoi(v[4]), P = atoi(v[5]);
  const int G = atoi(v[6]);
  if (R == 1) return gemv_split_p<S, 1>(n, M, K, ldy, P, G, v + 7);
  if (R == 2) return gemv_split_p<S, 2>(n, M, K, ldy, P, G, v + 7);
  if (R == -2) return gemv_split_p<S, 2, 2>(n, M, K, ldy, P, G, v + 7);  // the deep sets (UX = 2)
  gemv_split_p<S, 4>(n, M, K, ldy, P, G, v + 7);
}

// gemv_rows<N, TOut, SILU[, NORM]> over blocks of 8 warps, as CudaOps launches it, with EMU_GEMV_SLICES warps per
// row (default 1); y without a stride (NaN-filled); fp16 outputs with SILU or NORM.
template <int N, bool SILU, bool NORM>
static void rows_gemv(int M, int K, char** a) {
  typedef typename std::conditional<SILU || NORM, __half, float>::type T;
  const __half* w = read_file<__half>(a[0], (size_t)(SILU ? 2 : 1) * M * K, 0);
  const __half* x = read_file<__half>(a[1], (size_t)N * K, 0);
  norm_load(N, K);
  const EmuNorm nm = emu_norm;
  std::vector<T> y((size_t)N * M, (T)__float2half(NAN));
  T* yp = y.data();
  const char* env = getenv("EMU_GEMV_SLICES");  // warps per row (CudaOps.gemv_slices), 1 unless set
  const int S = env ? atoi(env) : 1;
  launch_blocks((M * S + 7) / 8, 8,
                [=] { gemv_rows<N, T, SILU, NORM>(x, w, yp, M, K, S, nm.res, nm.res_out, nm.w, nm.eps); });
  write_file(a[2], yp, y.size());
  norm_save(N, K);
}

template <bool SILU, bool NORM>
static void rows_gemv_n(int n, int M, int K, char** a) {
  switch (n) {
    case 1: return rows_gemv<1, SILU, NORM>(M, K, a);
    case 2: return rows_gemv<2, SILU, NORM>(M, K, a);
    case 3: return rows_gemv<3, SILU, NORM>(M, K, a);
    case 4: return rows_gemv<4, SILU, NORM>(M, K, a);
    case 5: return rows_gemv<5, SILU, NORM>(M, K, a);
    case 6: return rows_gemv<6, SILU, NORM>(M, K, a);
    case 7: return rows_gemv<7, SILU, NORM>(M, K, a);
    default: return rows_gemv<8, SILU, NORM>(M, K, a);
  }
}

template <typename F>
static void run(const std::string& mode, char** v) {
  if (mode == "dequant") return dequant<F>(atoi(v[0]), atoi(v[1]), atoi(v[2]), v + 3);
  const int n = atoi(v[0]), M = atoi(v[1]), K = atoi(v[2]), ldy = atoi(v[3]);
  if (mode == "gemv2") return gemv_n<F, 2>(n, M, K, ldy, v + 4);
  gemv_n<F, 1>(n, M, K, ldy, v + 4);
}

int main(int argc, char** argv) {
  if (argc > 6 && !strcmp(argv[1], "norm")) {
    emu_norm.on = true;
    emu_norm.res_path = argv[2], emu_norm.w_path = argv[3], emu_norm.out_path = argv[4];
    emu_norm.eps = (float)atof(argv[5]);
    argc -= 5, argv += 5;
  }
  if (argc > 6 && !strcmp(argv[1], "spread")) {
    emu_spread.on = true;
    emu_spread.res_path = argv[2], emu_spread.part_path = argv[3], emu_spread.parts = atoi(argv[4]);
    emu_spread.w_path = argv[5], emu_spread.eps = (float)atof(argv[6]);
    argc -= 6, argv += 6;
  }
  if (argc < 4) return 2;
  const std::string mode = argv[1], fmt = argv[2];
  char** v = argv + 3;
  if (mode == "grows" || mode == "gsilu") {
    const int n = atoi(v[0]), M = atoi(v[1]), K = atoi(v[2]);
    const bool silu = mode == "gsilu";
    if (emu_norm.on) silu ? rows_gemv_n<true, true>(n, M, K, v + 3) : rows_gemv_n<false, true>(n, M, K, v + 3);
    else silu ? rows_gemv_n<true, false>(n, M, K, v + 3) : rows_gemv_n<false, false>(n, M, K, v + 3);
    return 0;
  }
  if (mode == "grope") {
    int s[11];
    for (int i = 0; i < 11; ++i) s[i] = atoi(v[i]);  // n Hq Hkv D K page L P nd ns sub
    const bool ls = strcmp(v[11 + 2 + 9], "-") != 0;  // HC given: an LServe cache (ROPE = 2)
    if (s[0] == 1) ls ? rows_rope<1, 2>(s, v + 11) : rows_rope<1, 1>(s, v + 11);
    else if (s[0] == 3) ls ? rows_rope<3, 2>(s, v + 11) : rows_rope<3, 1>(s, v + 11);
    else ls ? rows_rope<8, 2>(s, v + 11) : rows_rope<8, 1>(s, v + 11);
    return 0;
  }
  if (mode == "split" || mode == "dsplit" || mode == "ssilu" || mode == "srope" || mode == "sadd") {
    if (fmt == "q8_0") run_split<SQ8_0>(mode, v);
    else if (fmt == "q4_0") run_split<SQ4_0>(mode, v);
    else if (fmt == "q4_1") run_split<SQ4_1>(mode, v);
    else if (fmt == "int8") run_split<SINT8>(mode, v);
    else if (fmt == "int4") run_split<SINT4>(mode, v);
    else if (fmt == "q4_k") run_split<SQ4_K>(mode, v);
    else if (fmt == "q6_k") run_split<SQ6_K>(mode, v);
    else return 2;
    return 0;
  }
  if (fmt == "q8_0") run<Q8_0>(mode, v);
  else if (fmt == "q4_0") run<Q4_0>(mode, v);
  else if (fmt == "q4_1") run<Q4_1>(mode, v);
  else if (fmt == "q4_k") run<Q4_K>(mode, v);
  else if (fmt == "q6_k") run<Q6_K>(mode, v);
  else if (fmt == "int8") run<INT8>(mode, v);
  else if (fmt == "int4") run<INT4>(mode, v);
  else return 2;
  return 0;
}
