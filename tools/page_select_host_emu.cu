// Host emulation of kernels/page_select.cu for checking it without a GPU (driven by
// tools/page_select_host_check.py). The kernel source is compiled as host code (tools/host_emu.cuh), unchanged
// but for its `extern __shared__` arrays (the driver points them at emu_dyn_smem).
//   page_select_host_emu select|topk DIR D cap_qb cap_seq hkv hq nd sub cap_nnz ps_shift gx sel_cap stage_cap
// DIR holds plan.bin (int32, the packed device plan), hc.bin, hs.bin (int32 [hkv]), q.bin, kmax.bin, kmin.bin
// (fp16; select only), scores.bin (float32 [hq * cap_nnz]: read for topk, written by select), lse.bin
// (float32 (m, z) pairs [cap_qb * hq * gx]: mass's partials, likewise), sel.bin and cnt.bin (int32, read and
// written back). select: page_score_d{D} over the grid (gx, cap_qb, hkv), then
// page_topk over (cap_qb, hkv); topk: page_topk alone on the given scores.
#include "host_emu.cuh"

#define LSERVE_HOST_H2F emu_h2f
#include "page_select.inc"

int main(int argc, char** argv) {
  if (argc != 15) {
    fprintf(stderr, "usage: see the header of tools/page_select_host_emu.cu\n");
    return 2;
  }
  const std::string mode = argv[1], dir = argv[2];
  int a[12];
  for (int i = 0; i < 12; ++i) a[i] = atoi(argv[3 + i]);
  const int D = a[0], cap_qb = a[1], cap_seq = a[2], hkv = a[3], hq = a[4], nd = a[5], sub = a[6];
  const int cap_nnz = a[7], ps_shift = a[8], gx = a[9], sel_cap = a[10], stage_cap = a[11];
  auto plan = read_bytes(dir + "/plan.bin"), hc = read_bytes(dir + "/hc.bin"), hs = read_bytes(dir + "/hs.bin");
  auto scores = read_bytes(dir + "/scores.bin"), sel = read_bytes(dir + "/sel.bin");
  auto lse = read_bytes(dir + "/lse.bin");
  auto cnt = read_bytes(dir + "/cnt.bin");
  const int* pl = (const int*)plan.data();
  const int *hcp = (const int*)hc.data(), *hsp = (const int*)hs.data();
  float* sc = (float*)scores.data();
  float2* lp = (float2*)lse.data();
  int *selp = (int*)sel.data(), *cntp = (int*)cnt.data();
  if (mode == "select") {
    auto q = read_bytes(dir + "/q.bin"), kx = read_bytes(dir + "/kmax.bin"), kn = read_bytes(dir + "/kmin.bin");
    const f16_t *qp = (const f16_t*)q.data(), *kxp = (const f16_t*)kx.data(), *knp = (const f16_t*)kn.data();
    launch({(unsigned)gx, (unsigned)cap_qb, (unsigned)hkv}, lsattn::PS_THREADS, [=] {
      if (D == 64)
        page_score_d64(qp, kxp, knp, pl, cap_qb, cap_seq, hcp, hsp, nd, sub, sc, lp, cap_nnz, hq, hkv, ps_shift);
      else
        page_score_d128(qp, kxp, knp, pl, cap_qb, cap_seq, hcp, hsp, nd, sub, sc, lp, cap_nnz, hq, hkv, ps_shift);
    });
  } else if (mode != "topk") {
    return 2;
  }
  launch({(unsigned)cap_qb, (unsigned)hkv, 1}, lsattn::TK_THREADS, [=] {
    page_topk(pl, cap_qb, cap_seq, hcp, sc, lp, gx, cap_nnz, hkv, hq / hkv, selp, cntp, sel_cap, stage_cap);
  });
  write_bytes(dir + "/scores.bin", sc, scores.size());
  write_bytes(dir + "/sel.bin", selp, sel.size());
  write_bytes(dir + "/cnt.bin", cntp, cnt.size());
  return 0;
}
