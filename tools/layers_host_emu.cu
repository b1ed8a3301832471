// Host emulation of kernels/layers.cu's K/V writes into quantized caches, for checking them without a GPU (driven by
// tools/layers_host_check.py). The kernel source is compiled as host code (tools/host_emu.cuh) and launched as
// CudaOps.rope_write_kv launches it: grid (n, Y) of `block` threads, the launcher's _row_grid.
//   layers_host_emu rope FMT DIR n hq hkv d page pages Y block hadamard            rope_write_kv<FMT>
//   layers_host_emu srope FMT DIR n hq hkv d page pages spages nd ns sub Y block hadamard
//                                                                                  rope_write_kv_sparse<FMT>
// FMT: int8 / int4 / fp8. DIR holds qkv.bin (fp16 [n, (hq + 2 hkv) d]), pos.bin and slots.bin (int64 [n]; sparse:
// [2, n], dense-pool then streaming-pool slots), cos.bin and sin.bin (fp16 [L, d / 2]); sparse also hc.bin and
// hs.bin (int32 [hkv]) and kmax.bin / kmin.bin (fp16 [pages, nd, sub, d], read and written back). Writes q.bin
// (fp16 [n, hq, d]) and the pools' values and fp16 scales: k.bin v.bin k_sc.bin v_sc.bin (dense), kd vd ks vs and
// their _sc (sparse). Pools start as 0x5A bytes, scales and q as 0xFFFF (a NaN half): what no write touches stays so.
#include "host_emu.cuh"

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

template <class KV>
static int run(int argc, char** argv) {
  const std::string mode = argv[1], dir = argv[3];
  auto a = [&](int i) { return atoi(argv[i]); };
  auto qkv = load<__half>(dir + "/qkv.bin"), cs = load<__half>(dir + "/cos.bin"), sn = load<__half>(dir + "/sin.bin");
  auto pos = load<long long>(dir + "/pos.bin"), slots = load<long long>(dir + "/slots.bin");
  const int n = a(4), hq = a(5), hkv = a(6), d = a(7), page = a(8), pages = a(9);
  std::vector<__half> q((size_t)n * hq * d, __ushort_as_half(0xFFFF));
  const size_t rb = d * KV::BITS / 8;  // a row's values (K and V share the format)
  const int sc = lskv::scale_cols<KV>(d);
  auto pool = [&](int np, int heads) { return std::vector<unsigned char>((size_t)np * heads * page * rb, 0x5A); };
  auto scales = [&](int np, int heads) {
    return std::vector<__half>((size_t)np * heads * page * sc, __ushort_as_half(0xFFFF));
  };
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
