// Host emulation of kernels/sampling.cu for checking it without a GPU (driven by tools/sampling_host_check.py).
// The kernel source is compiled as host code (tools/host_emu.cuh), unchanged but for sample_rows' `extern
// __shared__` array (the driver points it at emu_dyn_smem). Launches as backends/cuda_sampling.py makes them.
//   sampling_host_emu argmax DIR rows vocab chunk [sound [host]] out.bin (int64 [rows]) <- argmax_rows; with a 5th
//                                                                argument 1, also sound.bin (uint8 [rows]) <- its
//                                                                soundness flags from the same pass; with a 6th
//                                                                argument 1, also host.bin (int64 [rows]) <- the
//                                                                ids it writes into (pinned) host memory
//   sampling_host_emu sound DIR rows vocab chunk                 out.bin (uint8 [rows]) <- sound_rows
//   sampling_host_emu sample DIR rows vocab chunk lists radix    out.bin <- sample_bounds + sample_fill (with the
//                                                                bin lists if lists) + sample_rows; radix:
//                                                                sample_rows alone
//   sampling_host_emu logprobs DIR rows vocab chunk k            lp.bin, ids.bin (int64), top.bin <- logprob_rows
//   sampling_host_emu minp DIR rows vocab chunk                  logits_out.bin (float32 [rows, vocab]) <-
//                                                                min_p_mask over the rows with min_p > 0
// (chunk: logits a block of a row, cuda_sampling.ROW_CHUNK)
// DIR holds logits.bin (float32 [rows, vocab]), params.bin (float64 [4, rows]: sample, minp), chosen.bin (int64:
// logprobs), minp.bin (float64 [rows]: minp).
#include "host_emu.cuh"

#define __fdiv_rn(a, b) ((a) / (b))
#define __ldcg(p) (*(p))
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#include "sampling.inc"

int main(int argc, char** argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: see the header of tools/sampling_host_emu.cu\n");
    return 2;
  }
  const std::string mode = argv[1], dir = argv[2];
  const int rows = atoi(argv[3]), vocab = atoi(argv[4]), chunk = atoi(argv[5]);
  const int g = (vocab + chunk - 1) / chunk;
  auto logits = read_bytes(dir + "/logits.bin");
  const float* x = (const float*)logits.data();
  if (mode == "argmax") {
    const bool with_sound = argc >= 7 && atoi(argv[6]), with_host = argc == 8 && atoi(argv[7]);
    std::vector<u64> part((size_t)rows * g);
    std::vector<float2> pairs((size_t)rows * g);
    std::vector<unsigned> tick(rows, 0u);
    std::vector<long long> out(rows, -7), host(rows, -1);
    std::vector<unsigned char> sound(rows, 7);
    u64* pp = part.data();
    float2* mp = pairs.data();
    unsigned* tp = tick.data();
    long long *op = out.data(), *hp = with_host ? host.data() : nullptr;
    unsigned char* sp = with_sound ? sound.data() : nullptr;
    launch({(unsigned)g, (unsigned)rows, 1}, 256,
           [=] { argmax_rows(x, vocab, vocab, chunk, pp, tp, op, mp, sp, hp); });
    write_bytes(dir + "/out.bin", op, out.size() * 8);
    if (with_sound) write_bytes(dir + "/sound.bin", sp, sound.size());
    if (with_host) write_bytes(dir + "/host.bin", hp, host.size() * 8);
  } else if (mode == "sound") {
    std::vector<float2> part((size_t)rows * g);
    std::vector<unsigned> tick(rows, 0u);
    std::vector<unsigned char> out(rows, 7);
    float2* pp = part.data();
    unsigned* tp = tick.data();
    unsigned char* op = out.data();
    launch({(unsigned)g, (unsigned)rows, 1}, 256, [=] { sound_rows(x, vocab, vocab, chunk, pp, tp, op); });
    write_bytes(dir + "/out.bin", op, out.size());
  } else if (mode == "sample" && argc == 8) {
    const bool lists = atoi(argv[6]), radix = atoi(argv[7]);
    auto params = read_bytes(dir + "/params.bin");
    const double* pa = (const double*)params.data();
    std::vector<double> mass((size_t)rows * (SB + 1), 0.0);
    std::vector<int> count((size_t)rows * (SB + 1), 0), idx(lists ? (size_t)rows * vocab : 0, -7);
    std::vector<int> loc(lists ? (size_t)rows * g * (SB + 2) : 0, -7);
    std::vector<long long> out(rows, -7);
    std::vector<unsigned> stat((size_t)rows * 2, 0u);
    double* mp = mass.data();
    int *cp = count.data(), *ip = lists ? idx.data() : nullptr, *lp = lists ? loc.data() : nullptr;
    long long* op = out.data();
    unsigned* sp = stat.data();
    if (!radix) {
      launch({(unsigned)g, (unsigned)rows, 1}, FILL_THREADS, [=] { sample_bounds(x, vocab, vocab, chunk, pa, sp); });
      launch({(unsigned)g, (unsigned)rows, 1}, FILL_THREADS,
             [=] { sample_fill(x, vocab, vocab, chunk, pa, sp, cp, mp, ip, lp); });
    }
    launch({(unsigned)rows, 1, 1}, SAMPLE_THREADS,
           [=] { sample_rows(x, vocab, vocab, pa, sp, cp, mp, ip, lp, g, chunk, radix, op); });
    write_bytes(dir + "/out.bin", op, out.size() * 8);
  } else if (mode == "logprobs" && argc == 7) {
    const int k = atoi(argv[6]);
    auto chosen = read_bytes(dir + "/chosen.bin");
    const long long* ch = (const long long*)chosen.data();
    std::vector<float> pm((size_t)rows * g), lp(rows, -7.f), top((size_t)rows * k + 1, -7.f);
    std::vector<double> ps((size_t)rows * g);
    std::vector<u64> pk((size_t)rows * g * LP_K);
    std::vector<unsigned> tick(rows, 0u);
    std::vector<long long> ids((size_t)rows * k + 1, -7);
    float *pmp = pm.data(), *lpp = lp.data(), *tp = top.data();
    double* psp = ps.data();
    u64* pkp = pk.data();
    unsigned* tk = tick.data();
    long long* idp = ids.data();
    launch({(unsigned)rows, (unsigned)g, 1}, LP_THREADS,
           [=] { logprob_rows(x, vocab, vocab, chunk, ch, k, pmp, psp, pkp, tk, lpp, idp, tp); });
    write_bytes(dir + "/lp.bin", lpp, rows * 4);
    write_bytes(dir + "/ids.bin", idp, (size_t)rows * k * 8);
    write_bytes(dir + "/top.bin", tp, (size_t)rows * k * 4);
  } else if (mode == "minp") {
    auto params = read_bytes(dir + "/params.bin"), minp = read_bytes(dir + "/minp.bin");
    const double* pa = (const double*)params.data();
    const double* mp = (const double*)minp.data();
    std::vector<int> rl;
    std::vector<double> ml;
    for (int r = 0; r < rows; ++r)
      if (mp[r] > 0) rl.push_back(r), ml.push_back(mp[r]);
    float* xm = (float*)logits.data();
    const int* rp = rl.data();
    const double* mlp = ml.data();
    launch({(unsigned)rl.size(), 1, 1}, MINP_THREADS, [=] { min_p_mask(xm, vocab, vocab, pa, rp, mlp); });
    write_bytes(dir + "/logits_out.bin", xm, (size_t)rows * vocab * 4);
  } else {
    return 2;
  }
  return 0;
}
