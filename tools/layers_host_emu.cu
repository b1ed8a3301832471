// Host emulation of kernels/layers.cu's K/V writes into quantized caches, for checking them without a GPU (driven by
// tools/layers_host_check.py). The kernel source is compiled as host code (tools/host_emu.cuh) and launched as
// CudaOps.rope_write_kv launches it: grid (n, Y) of `block` threads, the launcher's _row_grid.
//   layers_host_emu rope FMT DIR n hq hkv d page pages Y block hadamard            rope_write_kv<FMT>
//   layers_host_emu srope FMT DIR n hq hkv d page pages spages nd ns sub Y block hadamard
//                                                                                  rope_write_kv_sparse<FMT>
//   layers_host_emu qrope FMT DIR 1 hq hkv d page pages [spages nd ns sub] K S hadamard Y block
//        the q/k/v GEMV with the quantized K/V write in its epilogue (gemv_rows_rope<1, false, ROPE>, S warps a pair)
//        against gemv_rows<1, __half> (the plain GEMV, qkv) then rope_write_kv(_sparse)<FMT> on grid (1, Y): DIR
//        also holds w.bin (fp16 [(hq + 2 hkv) d, K], the fused q/k/v matrix) and x.bin (fp16 [1, K]); writes every
//        output twice, as
//        NAME_ref.bin and NAME_fused.bin (each run from the sentinels below and the same kmax / kmin), and exits 3 if
//        a ticket is left nonzero.
// FMT: int8 / int4 / fp8. DIR holds qkv.bin (fp16 [n, (hq + 2 hkv) d]), pos.bin and slots.bin (int64 [n]; sparse:
// [2, n], dense-pool then streaming-pool slots), cos.bin and sin.bin (fp16 [L, d / 2]); sparse also hc.bin and
// hs.bin (int32 [hkv]) and kmax.bin / kmin.bin (fp16 [pages, nd, sub, d], read and written back). Writes q.bin
// (fp16 [n, hq, d]) and the pools' values and fp16 scales: k.bin v.bin k_sc.bin v_sc.bin (dense), kd vd ks vs and
// their _sc (sparse). Pools start as 0x5A bytes, scales and q as 0xFFFF (a NaN half): what no write touches stays so.
#include "host_emu.cuh"

#include <type_traits>

#define __ldg(p) (*(p))
#define __fmul_rn(a, b) ((a) * (b))  // host float arithmetic rounds each operation to nearest (no contraction)
#define __fadd_rn(a, b) ((a) + (b))
#define __fsub_rn(a, b) ((a) - (b))
#include "layers.inc"

template <class T>
static std::vector<T> load(const std::string& path) {
  auto b = read_bytes(path);
  std::vector<T> v(b.size() / sizeof(T));
  memcpy(v.data(), b.data(), v.size() * sizeof(T));
  return v;
}

// A pool of `rows` (token, head) rows as the writes find it: values 0x5A bytes, scales 0xFFFF (a NaN half).
template <class KV>
static std::vector<unsigned char> sentinel_pool(size_t rows, int d) {
  return std::vector<unsigned char>(rows * (d * KV::BITS / 8), 0x5A);
}
template <class KV>
static std::vector<__half> sentinel_scales(size_t rows, int d) {
  return std::vector<__half>(rows * lskv::scale_cols<KV>(d), __ushort_as_half(0xFFFF));
}

template <class KV>
static int run(int argc, char** argv);
template <class KV>
static int run_qrope(int argc, char** argv);

template <class KV>
static int run(int argc, char** argv) {
  if (std::string(argv[1]) == "qrope") return run_qrope<KV>(argc, argv);
  const std::string mode = argv[1], dir = argv[3];
  auto a = [&](int i) { return atoi(argv[i]); };
  auto qkv = load<__half>(dir + "/qkv.bin"), cs = load<__half>(dir + "/cos.bin"), sn = load<__half>(dir + "/sin.bin");
  auto pos = load<long long>(dir + "/pos.bin"), slots = load<long long>(dir + "/slots.bin");
  const int n = a(4), hq = a(5), hkv = a(6), d = a(7), page = a(8), pages = a(9);
  std::vector<__half> q((size_t)n * hq * d, __ushort_as_half(0xFFFF));
  auto pool = [&](int np, int heads) { return sentinel_pool<KV>((size_t)np * heads * page, d); };
  auto scales = [&](int np, int heads) { return sentinel_scales<KV>((size_t)np * heads * page, d); };
  __half* qo = q.data();
  const __half *x = qkv.data(), *cp = cs.data(), *sp = sn.data();
  const long long *pp = pos.data(), *sl = slots.data();
  if (mode == "rope") {
    const int gy = a(10), block = a(11), had = a(12);
    auto k = pool(pages, hkv), v = pool(pages, hkv);
    auto ksc = scales(pages, hkv), vsc = scales(pages, hkv);
    void *kp = k.data(), *vp = v.data();
    __half *kscp = ksc.data(), *vscp = vsc.data();
    launch({(unsigned)n, (unsigned)gy, 1}, block,
           [=] { rope_write_kv<KV>(x, pp, sl, cp, sp, qo, kp, vp, kscp, vscp, hq, hkv, d, page, had); });
    write_bytes(dir + "/k.bin", k.data(), k.size());
    write_bytes(dir + "/v.bin", v.data(), v.size());
    write_bytes(dir + "/k_sc.bin", ksc.data(), ksc.size() * 2);
    write_bytes(dir + "/v_sc.bin", vsc.data(), vsc.size() * 2);
  } else {
    const int spages = a(10), nd = a(11), ns = a(12), sub = a(13), gy = a(14), block = a(15), had = a(16);
    auto hc = load<int>(dir + "/hc.bin"), hs = load<int>(dir + "/hs.bin");
    auto kmax = load<__half>(dir + "/kmax.bin"), kmin = load<__half>(dir + "/kmin.bin");
    auto kd = pool(pages, nd), vd = pool(pages, nd);
    auto ks = pool(spages, ns), vs = pool(spages, ns);
    auto kds = scales(pages, nd), vds = scales(pages, nd), kss = scales(spages, ns),
         vss = scales(spages, ns);
    void *kdp = kd.data(), *vdp = vd.data(), *ksp = ks.data(), *vsp = vs.data();
    __half *kdsp = kds.data(), *vdsp = vds.data(), *kssp = kss.data(), *vssp = vss.data();
    __half *mx = kmax.data(), *mn = kmin.data();
    const int *hcp = hc.data(), *hsp = hs.data();
    launch({(unsigned)n, (unsigned)gy, 1}, block, [=] {
      rope_write_kv_sparse<KV>(x, pp, sl, cp, sp, qo, kdp, vdp, ksp, vsp, kdsp, vdsp, kssp, vssp, hcp, hsp, mx, mn, hq,
                               hkv, nd, ns, d, page, sub, n, had);
    });
    const char* names[] = {"kd", "vd", "ks", "vs"};
    const std::vector<unsigned char>* pools[] = {&kd, &vd, &ks, &vs};
    const std::vector<__half>* scs[] = {&kds, &vds, &kss, &vss};
    for (int i = 0; i < 4; ++i) {
      write_bytes(dir + "/" + names[i] + ".bin", pools[i]->data(), pools[i]->size());
      write_bytes(dir + "/" + names[i] + "_sc.bin", scs[i]->data(), scs[i]->size() * 2);
    }
    write_bytes(dir + "/kmax.bin", kmax.data(), kmax.size() * 2);
    write_bytes(dir + "/kmin.bin", kmin.data(), kmin.size() * 2);
  }
  write_bytes(dir + "/q.bin", q.data(), q.size() * 2);
  return 0;
}

// The fused write (ROPE = kind + 2 fmt) and the unfused pair on the same x and W, each from fresh sentinels.
template <class KV>
static int run_qrope(int argc, char** argv) {
  const std::string dir = argv[3];
  auto a = [&](int i) { return atoi(argv[i]); };
  const int n = a(4), hq = a(5), hkv = a(6), d = a(7), page = a(8), pages = a(9);
  const bool sparse = argc == 19;
  const int spages = sparse ? a(10) : 0, nd = sparse ? a(11) : hkv, ns = sparse ? a(12) : 0, sub = sparse ? a(13) : 1;
  const int o = sparse ? 14 : 10, K = a(o), S = a(o + 1), had = a(o + 2), gy = a(o + 3), block = a(o + 4);
  const int heads = hq + 2 * hkv, M = heads * d;
  constexpr int F = std::is_same<KV, lskv::Int8>::value ? 1 : std::is_same<KV, lskv::Int4>::value ? 2 : 3;
  auto w = load<__half>(dir + "/w.bin"), xin = load<__half>(dir + "/x.bin");
  auto cs = load<__half>(dir + "/cos.bin"), sn = load<__half>(dir + "/sin.bin");
  auto pos = load<long long>(dir + "/pos.bin"), slots = load<long long>(dir + "/slots.bin");
  const size_t dense_rows = (size_t)pages * nd * page, stream_rows = (size_t)spages * ns * page;
  std::vector<int> hc(hkv, 0), hs(hkv);
  for (int g = 0; g < hkv; ++g) hs[g] = g;
  if (sparse) hc = load<int>(dir + "/hc.bin"), hs = load<int>(dir + "/hs.bin");
  for (const char* run : {"ref", "fused"}) {
    const bool fused = std::string(run) == "fused";
    std::vector<__half> q((size_t)n * hq * d, __ushort_as_half(0xFFFF));
    std::vector<unsigned char> pool[4] = {sentinel_pool<KV>(dense_rows, d), sentinel_pool<KV>(dense_rows, d),
                                          sentinel_pool<KV>(stream_rows, d), sentinel_pool<KV>(stream_rows, d)};
    std::vector<__half> scs[4] = {sentinel_scales<KV>(dense_rows, d), sentinel_scales<KV>(dense_rows, d),
                                  sentinel_scales<KV>(stream_rows, d), sentinel_scales<KV>(stream_rows, d)};
    std::vector<__half> kmax, kmin;
    if (sparse) kmax = load<__half>(dir + "/kmax.bin"), kmin = load<__half>(dir + "/kmin.bin");
    const __half *xp = xin.data(), *wp = w.data(), *cp = cs.data(), *sp = sn.data();
    const long long *pp = pos.data(), *sl = slots.data();
    __half* qo = q.data();
    std::vector<int> ticket(heads, 0);
    if (fused) {
      std::vector<__half> stage((size_t)n * M);
      lserve::RopeOut ro{};
      ro.positions = pp, ro.slots = sl, ro.cos_t = cp, ro.sin_t = sp, ro.q_out = qo;
      ro.k_cache = pool[0].data(), ro.v_cache = pool[1].data(), ro.bias = nullptr;
      ro.ks = sparse ? pool[2].data() : nullptr, ro.vs = sparse ? pool[3].data() : nullptr;
      ro.head_class = sparse ? hc.data() : nullptr, ro.head_slot = sparse ? hs.data() : nullptr;
      ro.kmax = sparse ? kmax.data() : nullptr, ro.kmin = sparse ? kmin.data() : nullptr;
      ro.k_sc = scs[0].data(), ro.v_sc = scs[1].data();
      ro.ks_sc = sparse ? scs[2].data() : nullptr, ro.vs_sc = sparse ? scs[3].data() : nullptr;
      ro.stage = stage.data(), ro.ticket = ticket.data();
      ro.hq = hq, ro.hkv = hkv, ro.head_dim = d, ro.page_size = page;
      ro.nd = nd, ro.ns = ns, ro.sub = sub, ro.n_rows = n, ro.hadamard = had;
      ro.rope = (sparse ? 2 : 1) + 2 * F;
      const int pairs = M / 2;
      launch({(unsigned)((pairs * S + 7) / 8), 1, 1}, 256, [=] {
        if (sparse) gemv_rows_rope<1, false, 2 + 2 * F>(xp, wp, pairs, K, S, nullptr, nullptr, nullptr, 0.f, ro);
        else gemv_rows_rope<1, false, 1 + 2 * F>(xp, wp, pairs, K, S, nullptr, nullptr, nullptr, 0.f, ro);
      });
      for (int h = 0; h < heads; ++h)
        if (ticket[h] != 0) {
          fprintf(stderr, "qrope: ticket of head %d left at %d\n", h, ticket[h]);
          return 3;
        }
    } else {  // the plain GEMV, then the write kernel
      std::vector<__half> qkv((size_t)n * M);
      __half* y = qkv.data();
      launch({(unsigned)((M * S + 7) / 8), 1, 1}, 256,
             [=] { gemv_rows<1, __half>(xp, wp, y, M, K, S, nullptr, nullptr, nullptr, 0.f); });
      const __half* x = qkv.data();
      void *p0 = pool[0].data(), *p1 = pool[1].data(), *p2 = pool[2].data(), *p3 = pool[3].data();
      __half *s0 = scs[0].data(), *s1 = scs[1].data(), *s2 = scs[2].data(), *s3 = scs[3].data();
      const int *hcp = hc.data(), *hsp = hs.data();
      __half *mx = sparse ? kmax.data() : nullptr, *mn = sparse ? kmin.data() : nullptr;
      if (sparse)
        launch({(unsigned)n, (unsigned)gy, 1}, block, [=] {
          rope_write_kv_sparse<KV>(x, pp, sl, cp, sp, qo, p0, p1, p2, p3, s0, s1, s2, s3, hcp, hsp, mx, mn, hq, hkv,
                                   nd, ns, d, page, sub, n, had);
        });
      else
        launch({(unsigned)n, (unsigned)gy, 1}, block,
               [=] { rope_write_kv<KV>(x, pp, sl, cp, sp, qo, p0, p1, s0, s1, hq, hkv, d, page, had); });
    }
    const std::string suf = std::string("_") + run + ".bin";
    write_bytes(dir + "/q" + suf, q.data(), q.size() * 2);
    const char* names[] = {"k", "v", "ks", "vs"};
    for (int i = 0; i < (sparse ? 4 : 2); ++i) {
      write_bytes(dir + "/" + names[i] + suf, pool[i].data(), pool[i].size());
      write_bytes(dir + "/" + names[i] + "_sc" + suf, scs[i].data(), scs[i].size() * 2);
    }
    if (sparse) {
      write_bytes(dir + "/kmax" + suf, kmax.data(), kmax.size() * 2);
      write_bytes(dir + "/kmin" + suf, kmin.data(), kmin.size() * 2);
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 13) {
    fprintf(stderr, "usage: see the header of tools/layers_host_emu.cu\n");
    return 2;
  }
  const std::string fmt = argv[2];
  if (fmt == "int8") return run<lskv::Int8>(argc, argv);
  if (fmt == "int4") return run<lskv::Int4>(argc, argv);
  if (fmt == "fp8") return run<lskv::Fp8>(argc, argv);
  return 2;
}
