// Block-sparse paged flash attention for prefill on Hopper (sm_90a): the plan format, arguments and semantics of
// attention_prefill.cu (read that first; its comments on the plan, the pools, GQA packing and the mask hold here),
// with the two products on warpgroup MMA (wgmma.mma_async, fp16 or bf16 in, fp32 accumulate) instead of mma.sync.
// References: lserve_lite/backends/reference/attention.py::paged_attention_ref / paged_attention_sparse_ref;
// launcher: lserve_lite/backends/cuda_attention.py (PREFILL_KERNEL picks this file on compute capability 9.x).
// q and out are fp16; the cache is fp16 or quantized (KV = lskv::Int8 / Int4 / Fp8, kv_quant.cuh), see below. With
// KV = lskv::BHalf q, the cache and out are bf16 (the same tiles and fragments; bf16 wgmmas and conversions).
//
// Design (simple first, measured later):
// - A CTA is NWG warpgroups (128 threads each); warpgroup w owns query rows 64w .. 64w + 63 of the CTA's
//   BM = 64 * NWG rows (the same row -> (head, block row) packing as the mma.sync kernel). Warp k of the CTA
//   owns rows 16k .. 16k + 15, so the per-thread row/column bookkeeping is the mma.sync kernel's with MT = 1.
// - (prefill_body; prefill_ws_body at the end of the file is the warp-specialized variant for fp16 caches: a producer
//   warpgroup and mbarriers instead of CTA barriers, see there.)
// - No producer warps: every thread issues 16-byte cp.async copies of the K/V tiles (BN = 64 keys, gathered from the
//   page list; pages are 16 .. 1024 tokens, so a tile is several pages or part of one) into a ring of STAGES
//   stages; tile j + STAGES - 1 is in flight while tile j is computed, one CTA barrier per tile (quantized caches:
//   two, see below). The TMA path (template TMA; fp16 caches) has warp 0 issue one TMA box per
//   16-row group, column block and K / V instead (a 2D tensor map over each pool's rows writes the 128-byte swizzle
//   itself), completing on an mbarrier per stage; it measured equal to cp.async, which stays the default.
// - S = Q K^T: wgmma m64n64k16 with Q (A) and K (B) both read from shared memory through descriptors, K-major.
//   O += P V: wgmma m64nDk16 with P (A) from registers (the S accumulator re-packed to fp16, no shared-memory
//   round trip) and V (B) from shared memory, N-major ("transposed", imm-trans-b = 1, allowed for 16-bit types).
//   Each product is committed and waited for before the next step (no overlap of softmax with the next QK^T inside
//   a warpgroup; the other warpgroup / CTA on the SM fills the tensor cores meanwhile); quantized caches convert
//   the next operand tile between a product's commit and its wait.
// - Online softmax in fp32, base 2, as the mma.sync kernel (the accumulator fragment of wgmma has the same
//   per-warp layout as mma.sync's m16n8 C fragment, see below).
// - Quantized caches, as attention_prefill.cu does it: the ring holds tiles as stored (BN / 16 units of 16 rows,
//   values then fp16 scales, K and V in the same format), fewer bytes than fp16. The whole
//   CTA dequantizes them (dequant_tile_sw128: packed-half conversions, fp8 by the sm_89+ hardware cvt; a thread's
//   addresses formed once per tile and advanced by constants) into ONE fp16 K and ONE fp16 V tile in the same
//   128B-swizzled layout the fp16 path loads, and each half of that work runs while a wgmma that does not read the
//   tile being written is in flight (issued, not yet waited for), so the conversions overlap the tensor cores
//   inside the warpgroup:
//     [K of tile j in the fp16 K tile]  QK^T(j) issued | V(j) -> fp16 V tile | wait | mask, softmax
//     cp.async.wait (tile j + 1 landed), fence.proxy.async, BARRIER (middle), refill the stage of tile j
//     PV(j) issued | K(j + 1) -> fp16 K tile | wait | fence.proxy.async, BARRIER (end)
//   Two barriers per tile, as before the overlap, and no more shared memory. Why the two buffers are free when
//   written: the V tile's last reader, PV(j - 1), was waited for by every warpgroup before the end barrier of tile
//   j - 1; the K tile's, QK^T(j), before the middle barrier of tile j. Each writer fences its generic-proxy stores
//   to the async proxy before the barrier that precedes the wgmma reading them (middle: V, end: K; the prologue
//   dequantizes tile 0's K and fences Q's landed copies). The raw stage of tile j is read by K(j) (between the middle and
//   end barriers of tile j - 1) and V(j) (before the middle barrier of tile j), so it is refilled with tile
//   j + STAGES right after that barrier; the prologue therefore fills all STAGES
//   stages and tile j + 1 must have landed by the middle barrier of tile j (the same one-tile prefetch distance
//   as the fp16 path's two stages). Key positions of a tile are read before its middle barrier.
//
// Shared-memory layout (every fp16 tile 1024-byte aligned): Q [BM][D], and per stage K [BN][D] and V [BN][D]
// (quantized: per stage K and V tiles as stored, then one fp16 K [BN][D] and V [BN][D] tile pair), all fp16 tiles of
// rows split into column blocks of 64 halves (128 bytes): block b of a tile with R rows is at b * R * 128,
// row r of a block at r * 128, and its 16-byte chunk c stored at chunk position c ^ (r % 8). That is the PTX
// "128-byte swizzle" (swizzle mode 1): the hardware XORs address bits [4:6] with bits [7:9], i.e. within each
// 1024-byte atom of 8 rows x 128 bytes the chunk index with the row index, so the pattern is a function of the
// absolute address and tiles must start 1024-byte aligned (descriptor base offset 0).
//
// PTX ISA rules relied on (9.7.15 "Asynchronous Warpgroup Level Matrix Multiply-Accumulate", sm_90a):
// - Matrix descriptor (64 bits): [0:13] start address >> 4, [16:29] leading dimension byte offset (LBO) >> 4,
//   [32:45] stride dimension byte offset (SBO) >> 4, [49:51] base offset, [62:63] swizzle (1 = 128B).
// - K-major operand (Q as A, K as B; transpose bit 0): "core matrices" of 8 rows x 16 bytes; SBO is the distance
//   between adjacent 8-row groups along M/N (here 8 rows * 128 B = 1024); LBO, the distance between core
//   matrices along K, is not used with a 128-byte swizzle when the instruction's K extent (16 halves = 32 B)
//   stays inside one 128-byte row (set to 16 B, as CUTLASS does). The k-th 16-wide K step inside a 64-half
//   column block starts 32 * k bytes further (the swizzle is applied by the hardware on the resulting
//   addresses); the next column block is R * 128 bytes further.
// - N-major operand (V as B, imm-trans-b = 1, only for .f16/.bf16): the roles swap (CUTLASS make_gmma_desc
//   Major::MN, canonical SW128 layout ((64 halves, n), (8 rows, k)) : ((1, LBO), (128 B, SBO))): SBO is the
//   distance between 8-row groups along K (the keys: 1024 B) and LBO the distance between 64-wide atoms along N
//   (the head dim: the next column block, BN * 128 B; unused for D = 64). The k-th 16-key step starts 16 * 128
//   bytes further (a whole number of atoms: the swizzle phase is unchanged).
// - Register fragments (m64nNk16): thread t of the warpgroup, warp w = t / 32, g = (t % 32) / 4, t4 = t % 4.
//   Accumulator D (f32): d[4i + 2h + e] is row 16w + g + 8h, column 8i + 2 t4 + e. A (f16, four .f16x2):
//   a0 = (row g, k 2t4..+1), a1 = (g + 8, 2t4), a2 = (g, 2t4 + 8), a3 = (g + 8, 2t4 + 8) within the warp's 16
//   rows: the mma.sync m16n8k16 A layout, so S columns 16k .. 16k + 15 become P's k-th A fragment by packing
//   pairs, exactly as in attention_prefill.cu.
// - Ordering: cp.async writes shared memory through the generic proxy and wgmma reads it through the async
//   proxy, so each thread fences (fence.proxy.async.shared::cta) after its copies have landed and before the
//   CTA barrier that precedes the wgmma. wgmma.fence precedes the first wgmma of a batch whose accumulator or A
//   registers were written by ordinary instructions (zeroing, rescaling, packing); the registers are not
//   touched between the wgmma and its wgmma.wait_group (compiler-level fences on them, as CUTLASS does).
#include "attention_common.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "attention_prefill_sm90.cu uses wgmma: compile it for sm_90a (-arch=sm_90a / compute_90a) only"
#endif

namespace lsattn {
namespace sm90 {

// Operand lists of the wrappers below: the accumulator registers and their placeholders.
#define LS_ACC32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define LS_ACC64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define LS_REGS32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define LS_REGS64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
// The instruction, fp32 accumulation of TY x TY products ("f16" or "bf16": the kernel's element type).
#define LS_WGMMA(SHAPE, TY) "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " "

// D[64 x 64] (+)= A[64 x 16] * B[16 x 64]; A and B K-major in shared memory (descriptors). BF16: bf16 operands.
template <bool BF16>
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[32], u64 desc_a, u64 desc_b, int accumulate) {
#define LS_SS(TY)                                                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" LS_WGMMA("m64n64k16", TY) LS_REGS32 "%32, %33, p, 1, 1, 0, 0;\n}\n" \
               : LS_ACC32                                                                                      \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
  if constexpr (BF16) LS_SS("bf16"); else LS_SS("f16");
#undef LS_SS
}

// D[64 x 64] += A[64 x 16] * B[16 x 64]; A in registers (four 16-bit pairs per thread), B N-major ("transposed")
// in shared memory (imm-trans-b = 1).
template <bool BF16>
__device__ __forceinline__ void wgmma_rs_m64n64k16_tb(float (&d)[32], const u32 (&a)[4], u64 desc_b) {
#define LS_RS(TY)                                                                                   \
  asm volatile(LS_WGMMA("m64n64k16", TY) LS_REGS32 "{%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"       \
               : LS_ACC32                                                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
  if constexpr (BF16) LS_RS("bf16"); else LS_RS("f16");
#undef LS_RS
}

// D[64 x 128] += A[64 x 16] * B[16 x 128]; A in registers (four 16-bit pairs per thread), B N-major ("transposed")
// in shared memory (imm-trans-b = 1).
template <bool BF16>
__device__ __forceinline__ void wgmma_rs_m64n128k16_tb(float (&d)[64], const u32 (&a)[4], u64 desc_b) {
#define LS_RS(TY)                                                                                    \
  asm volatile(LS_WGMMA("m64n128k16", TY) LS_REGS64 "{%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"       \
               : LS_ACC64                                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
  if constexpr (BF16) LS_RS("bf16"); else LS_RS("f16");
#undef LS_RS
}

// Two floats -> a packed pair of the kernel's element type (lo in the low 16 bits), round to nearest.
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  if constexpr (!BF16) return pack_half2(lo, hi);
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Barrier `id` (1 .. 15; 0 is __syncthreads) over `n` threads: one warpgroup, or the consumers of a CTA.
__device__ __forceinline__ void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {  // release: this thread's earlier writes are seen by waiters
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {  // until the phase of that parity has completed
  asm volatile(
      "{\n.reg .pred p;\nLAB_WAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@p bra DONE;\nbra LAB_WAIT;\n"
      "DONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// After mbar_init, before the barrier that publishes it: the initialized barriers are seen by the async proxy (TMA).
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival that also expects `bytes` of asynchronous (TMA) writes before the phase completes.
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// TMA: the box at (column x, row y) of the 2D tensor map `tmap` (a CUtensorMap in global memory, written by the host
// before the launch) -> shared memory at dst, completing its bytes on mbarrier `bar`. Rows outside the tensor are
// written as zeros (and still counted).
__device__ __forceinline__ void tma_load_2d(u32 dst, const void* tmap, int x, int y, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(tmap), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void prefetch_tmap(const void* tmap) { asm volatile("prefetch.tensormap [%0];\n" ::"l"(tmap) : "memory"); }
// Register reallocation between the warpgroups of a CTA (all threads of the warpgroup execute it).
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R)); }
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R)); }
// Keeps the compiler from moving reads / writes of accumulator registers across a wgmma issue or wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// The A fragments of an in-flight wgmma: not to be overwritten before its wait.
template <int N>
__device__ __forceinline__ void fence_regs(u32 (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    asm volatile("" : "+r"(r[i][0]), "+r"(r[i][1]), "+r"(r[i][2]), "+r"(r[i][3])::"memory");
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle (mode 1), base offset 0.
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
  return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)((lbo >> 4) & 0x3FFFu) << 16) | ((u64)((sbo >> 4) & 0x3FFFu) << 32) |
         (1ull << 62);
}

template <int D, int NWG, int STAGES, class KV>
struct Smem {
  static constexpr int BM = 64 * NWG, BN = 64, THREADS = 128 * NWG, CH = D / 8;
  static constexpr int Q_BYTES = BM * D * 2;   // multiples of 1024: every tile stays 1024-byte aligned
  static constexpr int KV_BYTES = BN * D * 2;  // one fp16 K (or V) tile
  // One K (or V) stage of the ring: the fp16 tile, or a quantized tile as stored.
  static constexpr int RAW_BYTES = KV::QUANT ? BN / 16 * Staged<KV, D>::UNIT : KV_BYTES;
  static constexpr int OFF_K = Q_BYTES;
  static constexpr int OFF_V = OFF_K + STAGES * RAW_BYTES;
  static constexpr int OFF_KT = (OFF_V + STAGES * RAW_BYTES + 1023) / 1024 * 1024;  // quantized: fp16 K, V tiles
  static constexpr int OFF_KPOS = KV::QUANT ? OFF_KT + 2 * KV_BYTES : OFF_V + STAGES * KV_BYTES;  // STAGES x BN
  static constexpr int OFF_QPOS = OFF_KPOS + STAGES * BN * 4;  // BM query positions
  static constexpr int OFF_BAR = OFF_QPOS + BM * 4;            // TMA loads: an mbarrier per stage
  static constexpr int BYTES = OFF_BAR + STAGES * 8;
};

// Dynamic shared memory rounded up to 1024 bytes (the launcher allocates 1024 extra): the swizzle atom.
__device__ __forceinline__ unsigned char* align_smem1024(unsigned char* raw, u32& addr) {
  const u32 a = smem_addr(raw), pad = (1024u - (a & 1023u)) & 1023u;
  addr = a + pad;
  return raw + pad;
}

// ---- per-CTA plan helpers shared by both kernels of this file
// CTA row r -> (query head, row i of the query block): heads_per_cta heads of rows_per_head rows from row0, head group
// hg of KV head kvh; false: a padding row (no head, or past the block's q_len rows).
__device__ __forceinline__ bool cta_row(int r, int rows_per_head, int row0, int hg, int heads_per_cta, int kvh, int group,
                                        int q_len, int& head, int& i) {
  const int hl = r / rows_per_head;
  i = row0 + r % rows_per_head;
  const int hig = hg * heads_per_cta + hl;
  head = kvh * group + hig;
  return hl < heads_per_cta && hig < group && i < q_len;
}

// Whether key tile j of BN keys (positions kp, sorted; nkeys in the list) needs the per-key mask for query positions
// q_min .. q_max: partial, or crossing the causal diagonal, the context end, or (streaming heads, cls 1) the edge of
// the sink or local window for some row.
template <int BN>
__device__ __forceinline__ bool tile_needs_mask(const int* kp, int j, int nkeys, int q_min, int q_max, int ctx, int cls,
                                                int sink, int local) {
  const int nvalid = min(BN, nkeys - j * BN);
  const int kmin = kp[0], kmax = kp[nvalid - 1];  // lists are sorted by logical page
  bool m = nvalid < BN || kmax > q_min || kmax >= ctx;
  if (cls) m = m || !(kmax < sink || q_max - kmin < local);
  return m;
}

// ---- fp16 tile loads shared by both kernels of this file. Pages are >= 16 tokens (cuda_attention checks), so each
// 16-row group of a key tile lies in one page: lane u < BN / 16 of every warp loads the page-list entry of rows
// 16u .. 16u + 15 (one 8-byte load per warp and tile instead of one per thread and copy row, all of a warp's lanes on
// one address) and returns (pool row of the group's first key, counted from the KV head's rows of page 0; key position
// of its first key); padding groups: page 0 (an in-bounds source for the zero-filling copies). Callers issue it a tile
// ahead, so its latency hides behind a tile's compute instead of stalling the copies (and so the QK^T behind them).
template <int BN>
__device__ __forceinline__ int2 fetch_groups16(const int2* pl_list, int j, int lane, int nkeys, int ps_shift, int ps,
                                               u32 page_rows) {
  const int gq = j * BN + 16 * lane, off = gq & (ps - 1);
  const int2 pl = lane < BN / 16 && gq < nkeys ? pl_list[gq >> ps_shift] : make_int2(0, 0);
  // Rows of the pool from the KV head's rows of page 0: < 2^32 (a row is D * 2 >= 128 bytes)
  return make_int2((int)((u32)pl.x * page_rows + off), (pl.y << ps_shift) + off);
}

// K/V tile j (groups grp = fetch_groups16(j)) -> the swizzled tiles at dk + off / dv + off and its key positions at
// kpos[koff ..] (padding rows zero-filled, position NONE), by threads t = 0 .. NT - 1 (whole warps: a row's group comes
// from lane r / 16 by shuffles).
template <int D, int BN, int NT>
__device__ __forceinline__ void load_tile16(int j, u32 dk, u32 dv, u32 off, int* kpos, int koff, int2 grp, int t,
                                            const f16_t* kc_h, const f16_t* vc_h, int nkeys) {
  constexpr int CH = D / 8, ROWS_PER_PASS = NT / CH;
  const int c_ld = t % CH, r_ld = t / CH;
#pragma unroll
  for (int it = 0; it < BN / ROWS_PER_PASS; ++it) {
    const int r = r_ld + it * ROWS_PER_PASS;
    const bool ok = j * BN + r < nkeys;
    const u32 prow = (u32)__shfl_sync(0xffffffffu, grp.x, r >> 4) + (r & 15);  // the key's row in the pool
    const size_t base = (size_t)prow * D + c_ld * 8;
    const u32 dst = off + sw128<BN>(r, c_ld);
    cp_async16(dk + dst, kc_h + base, ok ? 16 : 0);
    cp_async16(dv + dst, vc_h + base, ok ? 16 : 0);
  }
  // Key positions: threads 0 .. BN - 1, row t (two full-warp stores, not 2 lanes of every warp per copy row)
  const int kp0 = __shfl_sync(0xffffffffu, grp.y, (t >> 4) & (BN / 16 - 1));
  if (t < BN) kpos[koff + t] = j * BN + t < nkeys ? kp0 + (t & 15) : LSERVE_KPOS_NONE;
}

// Q rows r0 .. r0 + R - 1 of a CTA of BM rows -> the swizzled Q tile at sq (padding rows zero-filled), threads t of NT.
template <int D, int BM, int R, int NT, class RowInfo>
__device__ __forceinline__ void load_q_rows(const f16_t* q, int Hq, u32 sq, int r0, int t, int tok0, RowInfo row_info) {
  constexpr int CH = D / 8, ROWS_PER_PASS = NT / CH;
  const int c_ld = t % CH, r_ld = t / CH;
#pragma unroll
  for (int it = 0; it < R / ROWS_PER_PASS; ++it) {
    const int r = r0 + r_ld + it * ROWS_PER_PASS;
    int head, i;
    const bool ok = row_info(r, head, i);
    const f16_t* src = ok ? q + ((size_t)(tok0 + i) * Hq + head) * D + c_ld * 8 : q;
    cp_async16(sq + sw128<BM>(r, c_ld), src, ok ? 16 : 0);
  }
}

// The normalized O rows of one warp (rows wrow .. wrow + 15 of the CTA, accumulator layout) -> out, both kernels of this
// file: staged through shared memory at `stage` (plain swz layout, rows the warp's own), then 16-byte coalesced stores
// of the rows row_info(r, head, i) says are real.
template <int D, bool BF16, class RowInfo>
__device__ __forceinline__ void store_warp_rows(float (&o)[D / 2], const float (&l_run)[2], unsigned char* stage,
                                                int wrow, int lane, f16_t* out, int Hq, int tok0, RowInfo row_info) {
  constexpr int CH = D / 8;
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int r = wrow + g + 8 * h;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const u32 v = pack2<BF16>(o[4 * n + 2 * h] * inv, o[4 * n + 2 * h + 1] * inv);
      *reinterpret_cast<u32*>(stage + swz<CH>(r, n) + t4 * 4) = v;
    }
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 16 * CH / 32; ++it) {
    const int idx = lane + it * 32, r = wrow + idx / CH, c = idx % CH;
    int head, i;
    if (row_info(r, head, i)) {
      const uint4 v = *reinterpret_cast<const uint4*>(stage + swz<CH>(r, c));
      *reinterpret_cast<uint4*>(out + ((size_t)(tok0 + i) * Hq + head) * D + c * 8) = v;
    }
  }
}

// The CTA's share of the plan for the warp-specialized kernel below (as attention_prefill.cu: heaviest query blocks first):
// query block qb, KV head kvh and its head class's page list, the BM rows it packs (heads_per_cta heads of
// rows_per_head rows), and where the 16-row groups of a key tile come from. `valid` false: nothing to do (past the
// live query blocks, or past the block's rows); uniform over the CTA. prefill_body keeps these values in locals of its
// own (it calls the same row, mask, tile, Q and output helpers above): built on this struct it spilled 20 bytes
// instead of 4 at its 128-register cap and ran 4-5% slower at 32k-128k (H200, 2026-12-04; docs/PERF_attention.md).
template <int D, int BM, int BN>
struct Cta {
  int qb, kvh, hg, group, q_len, pos0, tok0, row0, ctx, sink, local, cls, nkeys, ntiles, q_min, q_max;
  int rows_per_head, heads_per_cta, ps_shift, pool_heads, slot;
  const unsigned char* kc;  // this head class's pool (fp16 values)
  const unsigned char* vc;
  const int2* pl_list;      // this head class's page list
  bool valid;

  __device__ __forceinline__ Cta(const PlanView& pv, const KVPools& pools, int Hq, int Hkv, int ps_shift_, int rph,
                                 int hpc, int n_sub, int hgroups)
      : rows_per_head(rph), heads_per_cta(hpc), ps_shift(ps_shift_) {
    const int xi = gridDim.x - 1 - blockIdx.x;
    qb = xi / n_sub;
    valid = qb < pv.meta[0];
    if (!valid) return;
    const int sub = xi % n_sub;
    kvh = blockIdx.y / hgroups;
    hg = blockIdx.y % hgroups;
    group = Hq / Hkv;
    q_len = pv.qb_len[qb];
    pos0 = pv.qb_pos[qb];
    tok0 = pv.qb_start[qb];
    row0 = sub * rows_per_head;
    valid = row0 < q_len;
    if (!valid) return;
    ctx = pv.seq_ctx[pv.qb_seq[qb]];
    sink = pv.qb_sink[qb];
    local = pv.qb_local[qb];
    cls = pools.head_class[kvh];
    kc = cls ? pools.k1 : pools.k0;
    vc = cls ? pools.v1 : pools.v0;
    pool_heads = cls ? pools.n1 : pools.n0;
    slot = pools.head_slot[kvh];
    const int lo = pv.kv_indptr[qb * 2 + cls];
    pl_list = pv.kv_pl + lo;
    nkeys = (pv.kv_indptr[qb * 2 + cls + 1] - lo) << ps_shift;
    ntiles = (nkeys + BN - 1) / BN;
    q_min = pos0 + row0;
    q_max = pos0 + min(q_len, row0 + rows_per_head) - 1;
  }

  __device__ __forceinline__ bool row_info(int r, int& head, int& i) const {
    return cta_row(r, rows_per_head, row0, hg, heads_per_cta, kvh, group, q_len, head, i);
  }

  // fp16: fetch_groups16 / load_tile16 / load_q_rows on this CTA's page list, KV head and rows.
  __device__ __forceinline__ int2 fetch_groups(int j, int lane) const {
    return fetch_groups16<BN>(pl_list, j, lane, nkeys, ps_shift, 1 << ps_shift, (u32)pool_heads << ps_shift);
  }
  template <int NT>
  __device__ __forceinline__ void load_kv16(int j, u32 dk, u32 dv, int* kpos, int2 grp, int t) const {
    const f16_t* kc_h = reinterpret_cast<const f16_t*>(kc) + ((size_t)slot << ps_shift) * D;
    const f16_t* vc_h = reinterpret_cast<const f16_t*>(vc) + ((size_t)slot << ps_shift) * D;
    load_tile16<D, BN, NT>(j, dk, dv, 0, kpos, 0, grp, t, kc_h, vc_h, nkeys);
  }
  template <int R, int NT>
  __device__ __forceinline__ void load_q(const f16_t* q, int Hq, u32 sq, int r0, int t) const {
    load_q_rows<D, BM, R, NT>(q, Hq, sq, r0, t, tok0, [&](int r, int& head, int& i) { return row_info(r, head, i); });
  }

  __device__ __forceinline__ bool need_mask(const int* kp, int j) const {
    return tile_needs_mask<BN>(kp, j, nkeys, q_min, q_max, ctx, cls, sink, local);
  }
};

// Mask (when `mask`) and online softmax of one tile's S (a warpgroup accumulator: this thread's rows g and g + 8, at
// query positions qp), fp32, base 2; P packed into the A fragments of the PV wgmma as it is computed. Returns whether
// some row of the warp moved its max (O must then be scaled by alpha).
template <int BN, bool BF16>
__device__ __forceinline__ bool softmax_tile(float (&s)[BN / 2], const int* kp, bool mask, const int (&qp)[2], int ctx,
                                             int cls, int sink, int local, float scale_log2, float (&m_run)[2],
                                             float (&l_run)[2], u32 (&pa)[BN / 16][4], float (&alpha)[2], int t4) {
  if (mask) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        const int2 k2 = *reinterpret_cast<const int2*>(kp + n * 8 + 2 * t4);
        if (!key_visible(k2.x, qp[h], ctx, cls, sink, local)) s[4 * n + 2 * h] = LSERVE_NEG_INF;
        if (!key_visible(k2.y, qp[h], ctx, cls, sink, local)) s[4 * n + 2 * h + 1] = LSERVE_NEG_INF;
      }
    }
  }
  bool rescale = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = m_run[h];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_use = mx == LSERVE_NEG_INF ? 0.f : mx;
    alpha[h] = fast_exp2((m_run[h] - m_use) * scale_log2);
    rescale |= mx != m_run[h];
    const float mb = m_use * scale_log2;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      const float p0 = fast_exp2(fmaf(s[4 * n + 2 * h], scale_log2, -mb));
      const float p1 = fast_exp2(fmaf(s[4 * n + 2 * h + 1], scale_log2, -mb));
      sum += p0 + p1;
      pa[n >> 1][(n & 1) * 2 + h] = pack2<BF16>(p0, p1);  // keys 16k + 8(n&1) + 2t4, row g + 8h
    }
    l_run[h] = l_run[h] * alpha[h] + sum;
    m_run[h] = mx;
  }
  return __any_sync(0xffffffffu, rescale);
}

template <int N>
__device__ __forceinline__ void scale_rows(float (&o)[N], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < N / 4; ++n) {
    o[4 * n] *= alpha[0];
    o[4 * n + 1] *= alpha[0];
    o[4 * n + 2] *= alpha[1];
    o[4 * n + 3] *= alpha[1];
  }
}

// TMA (fp16 caches): warp 0 brings the K/V tiles in as TMA boxes completing on a `full` mbarrier per stage, instead of
// every thread's cp.async copies; a stage is refilled after a CTA barrier that sits behind the next tile's QK^T issue.
// H200: 0-1.4% faster than the cp.async path at 128k, 4-7% slower at 32k (docs/PERF_attention.md), so cp.async stays
// the default.
template <int D, int NWG, int STAGES, class KV, bool TMA>
__device__ __forceinline__ void prefill_body(const f16_t* __restrict__ q, const KVPools pools, f16_t* __restrict__ out,
                                             const PlanView pv, int Hq, int Hkv, int ps_shift, int rows_per_head,
                                             int heads_per_cta, int n_sub, int hgroups, float scale_log2,
                                             const unsigned char* tmaps) {
  using L = Smem<D, NWG, STAGES, KV>;
  constexpr int BM = L::BM, BN = L::BN, THREADS = L::THREADS;
  static_assert(STAGES >= 2, "a ring of at least two stages");
  static_assert(!TMA || !KV::QUANT, "TMA loads fp16 tiles (quantized ones are dequantized by the CTA)");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  u32 s_base;
  unsigned char* smem = align_smem1024(smem_raw, s_base);
  const u32 sQ = s_base, sK = s_base + L::OFF_K, sV = s_base + L::OFF_V;
  int* kpos_s = reinterpret_cast<int*>(smem + L::OFF_KPOS);
  int* qpos_s = reinterpret_cast<int*>(smem + L::OFF_QPOS);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
  // ---- the CTA's work: as attention_prefill.cu (heaviest query blocks first)
  const int xi = gridDim.x - 1 - blockIdx.x;
  const int qb = xi / n_sub, sub = xi % n_sub;
  if (qb >= pv.meta[0]) return;
  const int kvh = blockIdx.y / hgroups, hg = blockIdx.y % hgroups;
  const int group = Hq / Hkv;
  const int q_len = pv.qb_len[qb], pos0 = pv.qb_pos[qb], tok0 = pv.qb_start[qb];
  const int row0 = sub * rows_per_head;
  if (row0 >= q_len) return;
  const int ctx = pv.seq_ctx[pv.qb_seq[qb]];
  const int sink = pv.qb_sink[qb], local = pv.qb_local[qb];
  const int cls = pools.head_class[kvh];
  const f16_t* __restrict__ kc = reinterpret_cast<const f16_t*>(cls ? pools.k1 : pools.k0);
  const f16_t* __restrict__ vc = reinterpret_cast<const f16_t*>(cls ? pools.v1 : pools.v0);
  const f16_t* __restrict__ kcs = cls ? pools.sk1 : pools.sk0;  // quantized: the fp16 scales
  const f16_t* __restrict__ vcs = cls ? pools.sv1 : pools.sv0;
  const int pool_heads = cls ? pools.n1 : pools.n0, slot = pools.head_slot[kvh];
  const int lo = pv.kv_indptr[qb * 2 + cls], npages = pv.kv_indptr[qb * 2 + cls + 1] - lo;
  const int ps = 1 << ps_shift;
  const int nkeys = npages << ps_shift;
  const int ntiles = (nkeys + BN - 1) / BN;
  const int q_min = pos0 + row0, q_max = pos0 + min(q_len, row0 + rows_per_head) - 1;

  auto row_info = [&](int r, int& head, int& i) -> bool {
    return cta_row(r, rows_per_head, row0, hg, heads_per_cta, kvh, group, q_len, head, i);
  };

  // ---- Q tile -> shared memory (invalid rows zero-filled)
  load_q_rows<D, BM, BM, THREADS>(q, Hq, sQ, 0, tid, tok0, row_info);

  // ---- fp16: where the 16-row groups of tile j come from (fetch_groups16), one tile ahead
  const u32 page_rows = (u32)pool_heads << ps_shift;                     // pool rows per page
  const f16_t* __restrict__ kc_h = kc + ((size_t)slot << ps_shift) * D;  // fp16: this KV head's rows of page 0
  const f16_t* __restrict__ vc_h = vc + ((size_t)slot << ps_shift) * D;
  const int2* __restrict__ pl_list = pv.kv_pl + lo;                      // this head class's page list
  auto fetch_groups = [&](int j) -> int2 {
    return fetch_groups16<BN>(pl_list, j, lane, nkeys, ps_shift, ps, page_rows);
  };

  // ---- TMA (warp 0): tile j -> stage st. Key positions first (rows lane, lane + 32), then one arrival expecting the
  // tile's bytes, then one box of 16 rows x 64 columns per (16-row group, column block, K or V): lane l copies group
  // l % G of column block (l / G) % (D / 64) of V if l >= G * D / 64. Padding groups get a row outside the tensor
  // (zeros). Tensor maps [k0, v0, k1, v1] (backends/cuda_tma.py): rows of the pool [pages * heads * page, D].
  const u32 full0 = s_base + L::OFF_BAR;
  // (Its per-lane values come from opaque(lane), recomputed per tile: hoisted out of the loop they spilled.)
  auto issue_tma = [&](int j, int st, int2 grp) {
    constexpr int G = BN / 16, COPIES = G * (D / 64) * 2;
    static_assert(COPIES <= 32 && BN <= 64, "one copy per lane, two key positions per lane");
    const int l = (int)opaque((u32)lane);
#pragma unroll
    for (int h = 0; h < BN / 32; ++h) {
      const int r = l + 32 * h;
      const int kp0 = __shfl_sync(0xffffffffu, grp.y, r >> 4);
      kpos_s[st * BN + r] = j * BN + r < nkeys ? kp0 + (r & 15) : LSERVE_KPOS_NONE;
    }
    const u32 bar = full0 + 8 * st;
    __syncwarp();
    if (l == 0) mbar_expect_tx(bar, 2 * L::KV_BYTES);
    __syncwarp();
    const int u = l % G, b = (l / G) % (D / 64), isv = l / (G * (D / 64));
    const int prow = __shfl_sync(0xffffffffu, grp.x, u);
    if (l < COPIES) {
      const int row = j * BN + 16 * u < nkeys ? prow + (slot << ps_shift) : -16;
      const unsigned char* tm = tmaps + 256 * cls + 128 * isv;
      tma_load_2d((isv ? sV : sK) + st * L::KV_BYTES + b * BN * 128 + u * 16 * 128, tm, 64 * b, row, bar);
    }
  };

  // ---- K/V tile j of the page list -> stage st (rows past the list zero-filled, key position NONE); fp16: grp is
  // fetch_groups(j)
  auto load_kv = [&](int j, int st, int2 grp) {
    if constexpr (KV::QUANT) {  // as stored: BN / 16 units of 16 rows (one page each), THREADS / 4 threads per unit
      constexpr int NT = THREADS / (BN / 16);
      const int u = tid / NT, t = tid % NT;
      const int g = j * BN + u * 16, e = g >> ps_shift, off = g & (ps - 1);
      const bool ok = g < nkeys;
      const int2 pl = ok ? pv.kv_pl[lo + e] : make_int2(0, 0);
      const size_t row = ((size_t)pl.x * pool_heads + slot) * ps + off;
      const auto* kv8 = reinterpret_cast<const unsigned char*>(kc);
      const auto* vv8 = reinterpret_cast<const unsigned char*>(vc);
      stage_unit<KV, D>(sK + st * L::RAW_BYTES + u * Staged<KV, D>::UNIT, kv8, kcs, row, ok, t, NT);
      stage_unit<KV, D>(sV + st * L::RAW_BYTES + u * Staged<KV, D>::UNIT, vv8, vcs, row, ok, t, NT);
      if (t < 16) kpos_s[st * BN + u * 16 + t] = ok ? (pl.y << ps_shift) + off + t : LSERVE_KPOS_NONE;
    } else {
      load_tile16<D, BN, THREADS>(j, sK, sV, st * L::KV_BYTES, kpos_s, st * BN, grp, tid, kc_h, vc_h, nkeys);
    }
  };

  // Prologue: Q and tiles 0 .. STAGES - 2, one commit group each (Q rides with tile 0); empty groups keep the
  // count uniform, so cp.async.wait_group STAGES - 2 at iteration j means "tile j has landed".
  // Quantized: tiles 0 .. STAGES - 1 (a stage is refilled only once its V has been dequantized, in the middle of
  // the tile), so the same wait in the middle of iteration j means "tile j + 1 has landed".
  // TMA: the barriers initialized and published first; tiles 0 .. STAGES - 1 by warp 0 (a stage is refilled while
  // the next tile's QK^T runs); Q's copies waited for and fenced here (the CTA barrier below publishes them).
  constexpr int PRE = KV::QUANT || TMA ? STAGES : STAGES - 1;
  int2 grp_next = make_int2(0, 0);  // fp16: fetch_groups(j + PRE) at the top of iteration j (TMA: warp 0's)
  if constexpr (TMA) {
    if (tid == 0) {
      prefetch_tmap(tmaps + 256 * cls);
      prefetch_tmap(tmaps + 256 * cls + 128);
#pragma unroll
      for (int st = 0; st < STAGES; ++st) mbar_init(full0 + 8 * st, 1);
      fence_mbar_init();
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int s = 0; s < PRE; ++s)
        if (s < ntiles) issue_tma(s, s, fetch_groups(s));
      grp_next = fetch_groups(PRE);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
  } else {
#pragma unroll
    for (int s = 0; s < PRE; ++s) {
      if (s < ntiles) load_kv(s, s, KV::QUANT ? make_int2(0, 0) : fetch_groups(s));
      cp_async_commit();
    }
    if constexpr (!KV::QUANT) grp_next = fetch_groups(PRE);
  }
  if (tid < BM) {
    int head, i;
    row_info(tid, head, i);
    qpos_s[tid] = pos0 + i;
  }
  if constexpr (TMA) __syncthreads();  // Q and the query positions
  // Quantized: dequantization of K / V into the one fp16 tile pair, overlapped with the wgmmas that do not read the
  // tile being written: V of tile j while the QK^T of tile j runs, K of tile j + 1 while the PV of tile j runs.
  // Tile 0's K first.
  auto dequant_k = [&](int st) {
    if constexpr (KV::QUANT)
      dequant_tile_sw128<KV, D, BN, THREADS>(smem + L::OFF_K + st * L::RAW_BYTES, smem + L::OFF_KT,
                                                          opaque(tid));
  };
  if constexpr (KV::QUANT) {
    cp_async_wait<STAGES - 1>();  // tile 0 (and Q) landed
    __syncthreads();
    if (ntiles > 0) dequant_k(0);
    fence_proxy_async();  // K of tile 0 and this thread's landed Q copies -> the async proxy
    __syncthreads();
  }

  const int g = lane >> 2, t4 = lane & 3;
  const int wrow = warp * 16;  // this warp's first row in the CTA; the thread's rows are wrow + g + 8h
  float o[D / 2];              // O accumulator [64 x D] of the warpgroup: o[4n + 2h + e] = (row g + 8h, col 8n + 2t4 + e)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m_run[2] = {LSERVE_NEG_INF, LSERVE_NEG_INF}, l_run[2] = {0.f, 0.f};
  const u32 q_wg = sQ + wg * 64 * 128;  // this warpgroup's 64 rows in each column block of Q

  for (int j = 0; j < ntiles; ++j) {
    const int st = j % STAGES;
    if constexpr (TMA) {
      mbar_wait(full0 + 8 * st, (j / STAGES) & 1);  // tile j landed (and its key positions are published)
    } else if constexpr (!KV::QUANT) {
      const int jn = j + STAGES - 1;  // refill the stage tile j - 1 used
      cp_async_wait<STAGES - 2>();
      fence_proxy_async();  // this thread's landed copies -> visible to the async proxy
      __syncthreads();      // ... and everyone's; every warpgroup is done with tile j - 1 (its wgmmas were waited for)
      if (jn < ntiles) {
        load_kv(jn, jn % STAGES, grp_next);
        grp_next = fetch_groups(jn + 1);  // lands while this tile is computed
      }
      cp_async_commit();
    }
    u32 kt = sK + st * L::KV_BYTES, vt = sV + st * L::KV_BYTES;
    if constexpr (KV::QUANT) {
      // K of tile j is in the fp16 K tile, fenced to the async proxy before the barrier that ended tile j - 1 (or
      // the prologue's); no barrier here: tile j landed before the middle barrier of tile j - 1.
      kt = s_base + L::OFF_KT;
      vt = kt + L::KV_BYTES;
    }

    const int* kp = kpos_s + st * BN;
    const bool need_mask = tile_needs_mask<BN>(kp, j, nkeys, q_min, q_max, ctx, cls, sink, local);

    // ---- S = Q K^T: [64 rows x 64 keys] per warpgroup, D / 16 k-steps of 16 head-dim columns
    float s[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
    fence_regs(s);
    wgmma_fence();
    const u32 qt = opaque(q_wg);  // Q's descriptors recomputed per tile (fewer registers: no spills)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const u32 col = (kk >> 2) * 128, kin = (kk & 3) * 32;  // column block (x rows x 128 B), 32 B per k-step
      const u64 da = smem_desc(qt + col * BM + kin, 16, 1024);
      const u64 db = smem_desc(kt + col * BN + kin, 16, 1024);
      wgmma_ss_m64n64k16<KV::BF16>(s, da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    if constexpr (TMA) {
      // While the QK^T runs: the stage of tile j - 1 is refilled with tile j + STAGES - 1 once every warp is done
      // with it (its PV waited for, before this barrier). (An `empty` mbarrier per stage that warp 0 waited on
      // instead measured 3-17% slower than the cp.async path.)
      const int jn = j + STAGES - 1, sp = (j + STAGES - 1) % STAGES;
      __syncthreads();
      if (warp == 0 && j > 0 && jn < ntiles) {
        issue_tma(jn, sp, grp_next);
        grp_next = fetch_groups(jn + 1);
      }
    }
    if constexpr (KV::QUANT) {
      // While the QK^T runs: V of tile j -> the fp16 V tile. Free: every warpgroup waited for its PV of tile j - 1
      // before the barrier that ended that tile.
      dequant_tile_sw128<KV, D, BN, THREADS>(smem + L::OFF_V + st * L::RAW_BYTES, smem + L::OFF_KT + L::KV_BYTES,
                                             opaque(tid));
    }
    wgmma_wait0();
    fence_regs(s);

    // ---- mask, online softmax; P packed to the A fragments of the PV wgmma as it is computed
    u32 pa[BN / 16][4];
    float alpha[2];
    const int qp[2] = {qpos_s[wrow + g], qpos_s[wrow + g + 8]};
    if (softmax_tile<BN, KV::BF16>(s, kp, need_mask, qp, ctx, cls, sink, local, scale_log2, m_run, l_run, pa, alpha, t4))
      scale_rows(o, alpha);

    if constexpr (KV::QUANT) {
      // Middle barrier: V of tile j complete (fenced by each writer to the async proxy) before the PV reads it;
      // every warpgroup has waited for its QK^T of tile j, so the fp16 K tile is free; the stage of tile j has been
      // read (K in tile j - 1, V above) and is refilled with tile j + STAGES; tile j + 1 has landed (this thread's
      // copies, waited for here, and everyone's, by the barrier).
      cp_async_wait<STAGES - 2>();
      fence_proxy_async();
      __syncthreads();
      const int jn = j + STAGES;
      if (jn < ntiles) load_kv(jn, st, make_int2(0, 0));
      cp_async_commit();
    }

    // ---- O += P V: BN / 16 k-steps of 16 keys; V N-major (rows = keys, the head dim contiguous)
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const u64 db = smem_desc(vt + kk * 16 * 128, BN * 128, 1024);
      if constexpr (D == 64) {
        wgmma_rs_m64n64k16_tb<KV::BF16>(o, pa[kk], db);
      } else {
        wgmma_rs_m64n128k16_tb<KV::BF16>(o, pa[kk], db);
      }
    }
    wgmma_commit();
    if constexpr (KV::QUANT) {
      if (j + 1 < ntiles) dequant_k((j + 1) % STAGES);  // while the PV runs: K of tile j + 1 -> the fp16 K tile
    }
    wgmma_wait0();
    fence_regs(o);
    if constexpr (KV::QUANT) {
      // End barrier: K of tile j + 1 complete (fenced) before the next QK^T; every warpgroup's PV of tile j has
      // completed, so the fp16 V tile is free for the next tile's V.
      fence_proxy_async();
      __syncthreads();
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // Q has landed (ntiles == 0) and no warpgroup still reads Q before the reuse below

  // ---- normalize, stage this warp's rows through shared memory, 16-byte coalesced stores
  store_warp_rows<D, KV::BF16>(o, l_run, smem, wrow, lane, out, Hq, tok0, row_info);
}


// ---- Warp-specialized variant (fp16 caches): one producer warpgroup, NC consumer warpgroups -------------------------
// The producer (warpgroup 0, registers given up to the consumers by setmaxnreg) streams K/V tiles through a ring of
// STAGES stages with cp.async, LAG = STAGES - 2 tiles ahead of the one it publishes: it waits for its copies of tile
// j - LAG (cp.async.wait_group), fences them to the async proxy and arrives on full[j - LAG]; a stage is refilled once
// every consumer warp has arrived on its empty barrier. No CTA barrier in the loop: the consumer warpgroups drift apart
// and fill the tensor cores in turn. Each consumer warpgroup (64 rows of Q, loaded by itself) overlaps inside itself
// the softmax of tile j + 1 with the PV product of tile j (FlashAttention-3's intra-warpgroup pipelining):
//     issue QK^T(j + 1), issue PV(j) | wait QK^T | mask, softmax(j + 1) -> P' | wait PV | release stage j,
//     O *= alpha(j + 1), P = P'
// The last iteration issues a throwaway QK^T of its own stage so every iteration has the same wgmma groups (ptxas
// serializes wgmmas it cannot match across branches). Registers: O, S, P and P' live at once (224 a consumer, no spills).
constexpr int WS_PRODUCER_REGS = 56, WS_CONSUMER_REGS = 224;  // 128 x 56 + 256 x 224 = 64512 < 64K registers

template <int D, int NC, int STAGES>
struct WsSmem {
  static constexpr int BM = 64 * NC, BN = 64, THREADS = 128 * (NC + 1);
  static constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;  // multiples of 1024
  static constexpr int OFF_K = Q_BYTES, OFF_V = OFF_K + STAGES * KV_BYTES, OFF_KPOS = OFF_V + STAGES * KV_BYTES;
  static constexpr int OFF_BAR = OFF_KPOS + STAGES * BN * 4;  // full[STAGES], then empty[STAGES]: 8 bytes each
  static constexpr int BYTES = OFF_BAR + 2 * STAGES * 8;
};

template <int D, int NC, int STAGES>
__device__ __forceinline__ void prefill_ws_body(const f16_t* __restrict__ q, const KVPools pools,
                                                f16_t* __restrict__ out, const PlanView pv, int Hq, int Hkv,
                                                int ps_shift, int rows_per_head, int heads_per_cta, int n_sub,
                                                int hgroups, float scale_log2) {
  using L = WsSmem<D, NC, STAGES>;
  constexpr int BM = L::BM, BN = L::BN, LAG = STAGES - 2;
  static_assert(STAGES >= 3, "the producer publishes a tile LAG = STAGES - 2 >= 1 tiles behind the one it loads");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  u32 s_base;
  unsigned char* smem = align_smem1024(smem_raw, s_base);
  const u32 sQ = s_base, sK = s_base + L::OFF_K, sV = s_base + L::OFF_V;
  int* kpos_s = reinterpret_cast<int*>(smem + L::OFF_KPOS);
  const u32 full0 = s_base + L::OFF_BAR, empty0 = full0 + STAGES * 8;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
  const Cta<D, BM, BN> w(pv, pools, Hq, Hkv, ps_shift, rows_per_head, heads_per_cta, n_sub, hgroups);
  if (!w.valid) return;
  const int ntiles = w.ntiles;
  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full0 + 8 * st, 128);     // every producer thread, after its copies of the tile landed
      mbar_init(empty0 + 8 * st, 4 * NC);  // one lane of every consumer warp, after its PV of the tile
    }
  }
  __syncthreads();

  if (wg == 0) {  // ---- producer
    setmaxnreg_dec<WS_PRODUCER_REGS>();
    int2 grp = w.fetch_groups(0, lane);
    for (int j = 0; j < ntiles; ++j) {
      const int st = j % STAGES;
      if (j >= STAGES) mbar_wait(empty0 + 8 * st, ((j / STAGES) + 1) & 1);  // released after tile j - STAGES
      w.template load_kv16<128>(j, sK + st * L::KV_BYTES, sV + st * L::KV_BYTES, kpos_s + st * BN, grp, tid);
      grp = w.fetch_groups(j + 1, lane);
      cp_async_commit();
      if (j >= LAG) {
        cp_async_wait<LAG>();  // tile j - LAG landed (this thread's copies)
        fence_proxy_async();
        mbar_arrive(full0 + 8 * ((j - LAG) % STAGES));
      }
    }
    cp_async_wait<0>();
    fence_proxy_async();
    for (int j = max(0, ntiles - LAG); j < ntiles; ++j) mbar_arrive(full0 + 8 * (j % STAGES));
    return;
  }

  // ---- consumers: warpgroup c = wg - 1 owns CTA rows 64c .. 64c + 63
  setmaxnreg_inc<WS_CONSUMER_REGS>();
  const int c = wg - 1, ct = tid - 128 * wg;
  w.template load_q<64, 128>(q, Hq, sQ, 64 * c, ct);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  named_sync(1 + c, 128);  // the warpgroup's Q rows landed, visible to its wgmmas

  const int g = lane >> 2, t4 = lane & 3;
  const int wrow = (warp - 4) * 16;  // this warp's first row in the CTA; the thread's rows are wrow + g + 8h
  int qp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int head, i;
    w.row_info(wrow + g + 8 * h, head, i);
    qp[h] = w.pos0 + i;
  }
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m_run[2] = {LSERVE_NEG_INF, LSERVE_NEG_INF}, l_run[2] = {0.f, 0.f};
  const u32 q_wg = sQ + c * 64 * 128;  // this warpgroup's 64 rows in each column block of Q
  float s[BN / 2] = {};  // first k-step of each product: accumulate off
  u32 pa[BN / 16][4], pn[BN / 16][4];  // P of the tile in the PV product, P of the next tile
  float alpha[2];

  auto issue_qk = [&](int st) {  // S = Q K^T of the tile in stage st (the caller fences and commits)
    const u32 qt = opaque(q_wg), kt = sK + st * L::KV_BYTES;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const u32 col = (kk >> 2) * 128, kin = (kk & 3) * 32;
      wgmma_ss_m64n64k16<false>(s, smem_desc(qt + col * BM + kin, 16, 1024), smem_desc(kt + col * BN + kin, 16, 1024),
                         kk > 0 ? 1 : 0);
    }
  };
  auto softmax = [&](int j, u32 (&p)[BN / 16][4]) -> bool {
    const int* kp = kpos_s + (j % STAGES) * BN;
    return softmax_tile<BN, false>(s, kp, w.need_mask(kp, j), qp, w.ctx, w.cls, w.sink, w.local, scale_log2, m_run, l_run,
                            p, alpha, t4);
  };

  if (ntiles > 0) {
    mbar_wait(full0, 0);
    fence_regs(s);
    wgmma_fence();
    issue_qk(0);
    wgmma_commit();
    wgmma_wait0();
    fence_regs(s);
    softmax(0, pa);  // O is zero: nothing to rescale
  }
  for (int j = 0; j < ntiles; ++j) {
    const int st = j % STAGES, jn = j + 1, stn = jn % STAGES;
    const bool more = jn < ntiles;
    if (more) mbar_wait(full0 + 8 * stn, (jn / STAGES) & 1);
    fence_regs(s);
    fence_regs(o);
    wgmma_fence();
    issue_qk(more ? stn : st);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const u64 db = smem_desc(sV + st * L::KV_BYTES + kk * 16 * 128, BN * 128, 1024);
      if constexpr (D == 64) {
        wgmma_rs_m64n64k16_tb<false>(o, pa[kk], db);
      } else {
        wgmma_rs_m64n128k16_tb<false>(o, pa[kk], db);
      }
    }
    wgmma_commit();
    wgmma_wait1();  // QK^T(j + 1) done; PV(j) may still run
    fence_regs(s);
    const bool rescale = more && softmax(jn, pn);
    wgmma_wait0();
    fence_regs(o);
    fence_regs(pa);
    __syncwarp();
    if (lane == 0) mbar_arrive(empty0 + 8 * st);  // this warp is done with stage st
    if (rescale) scale_rows(o, alpha);
#pragma unroll
    for (int k = 0; k < BN / 16; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) pa[k][e] = pn[k][e];
  }

  named_sync(1 + NC, 128 * NC);  // every consumer is done with Q before its rows are reused for the output
  store_warp_rows<D, false>(o, l_run, smem, wrow, lane, out, Hq, w.tok0,
                     [&](int r, int& head, int& i) { return w.row_info(r, head, i); });
}

}  // namespace sm90
}  // namespace lsattn

// One extern "C" entry point per (head dim, warpgroups, stages, KV format, load path); the argument list is the
// mma.sync kernel's (k0/v0/k1/v1: the pools' values; sk0/sv0/sk1/sv1: their fp16 scales, null for fp16) and `tmaps`,
// the four pools' TMA tensor maps (null unless TMA).
#define LSERVE_PREFILL_SM90_KERNEL_L(D, NWG, STAGES, MINB, KV, TMA, SUFFIX)                                   \
  extern "C" __global__ void __launch_bounds__(128 * NWG, MINB)                                            \
      paged_attn_prefill_sm90_d##D##_w##NWG##_s##STAGES##SUFFIX(                                           \
          const f16_t* q, const unsigned char* k0, const unsigned char* v0, const unsigned char* k1,      \
          const unsigned char* v1, const f16_t* sk0, const f16_t* sv0, const f16_t* sk1, const f16_t* sv1, \
          f16_t* out, const int* plan, int cap_qb, int cap_seq, const int* head_class, const int* head_slot, \
          int n0, int n1, int Hq, int Hkv, int ps_shift, int rows_per_head, int heads_per_cta, int n_sub,  \
          int hgroups, float scale_log2, const unsigned char* tmaps) {                                     \
    lserve::pdl_enter();                                                                                   \
    const lsattn::KVPools pools{k0, v0, k1, v1, sk0, sv0, sk1, sv1, head_class, head_slot, n0, n1};        \
    lsattn::sm90::prefill_body<D, NWG, STAGES, KV, TMA>(q, pools, out, lsattn::plan_view(plan, cap_qb, cap_seq), \
                                                         Hq, Hkv, ps_shift, rows_per_head, heads_per_cta, n_sub,  \
                                                         hgroups, scale_log2, tmaps);                             \
  }
#define LSERVE_PREFILL_SM90_KERNEL(D, NWG, STAGES, MINB, KV, SUFFIX) \
  LSERVE_PREFILL_SM90_KERNEL_L(D, NWG, STAGES, MINB, KV, false, SUFFIX)

// BN = 64 keys per tile throughout. Two CTAs per SM where shared memory allows (d128 w2 s2: 97 KiB each).
LSERVE_PREFILL_SM90_KERNEL(64, 1, 2, 2, lskv::Half, )
LSERVE_PREFILL_SM90_KERNEL(64, 2, 2, 2, lskv::Half, )
LSERVE_PREFILL_SM90_KERNEL(64, 2, 3, 2, lskv::Half, )
LSERVE_PREFILL_SM90_KERNEL(128, 1, 2, 2, lskv::Half, )
LSERVE_PREFILL_SM90_KERNEL(128, 2, 2, 2, lskv::Half, )
LSERVE_PREFILL_SM90_KERNEL(128, 2, 3, 1, lskv::Half, )
// bf16 caches, queries and output (cuda_attention: kv "bf16"): the fp16 configurations with bf16 products.
LSERVE_PREFILL_SM90_KERNEL(64, 1, 2, 2, lskv::BHalf, _bf16)
LSERVE_PREFILL_SM90_KERNEL(64, 2, 2, 2, lskv::BHalf, _bf16)
LSERVE_PREFILL_SM90_KERNEL(128, 1, 2, 2, lskv::BHalf, _bf16)
LSERVE_PREFILL_SM90_KERNEL(128, 2, 2, 2, lskv::BHalf, _bf16)
// fp16 tiles by TMA (cuda_attention.PREFILL_KERNEL "tma").
#define LSERVE_PREFILL_TMA_KERNEL(D, NWG, STAGES, MINB) \
  LSERVE_PREFILL_SM90_KERNEL_L(D, NWG, STAGES, MINB, lskv::Half, true, _tma)
LSERVE_PREFILL_TMA_KERNEL(64, 1, 2, 2)
LSERVE_PREFILL_TMA_KERNEL(64, 2, 2, 2)
LSERVE_PREFILL_TMA_KERNEL(128, 1, 2, 2)
LSERVE_PREFILL_TMA_KERNEL(128, 2, 2, 2)
// Quantized caches: a ring of tiles as stored plus one fp16 K / V tile pair (d128 w2 s2 int8 / fp8: 99 KiB, two CTAs
// per SM; cuda_attention.PREFILL_SM90_STAGES). MINB caps registers where shared memory admits more CTAs than the
// registers the overlapped dequantization would otherwise take (ptxas: no spills at these caps): d64 w1 four CTAs
// per SM (<= 128 registers), d128 w1 int4 three (<= 168).
LSERVE_PREFILL_SM90_KERNEL(64, 1, 2, 4, lskv::Int8, _int8)
LSERVE_PREFILL_SM90_KERNEL(64, 2, 2, 2, lskv::Int8, _int8)
LSERVE_PREFILL_SM90_KERNEL(128, 1, 2, 2, lskv::Int8, _int8)
LSERVE_PREFILL_SM90_KERNEL(128, 2, 2, 2, lskv::Int8, _int8)
LSERVE_PREFILL_SM90_KERNEL(64, 1, 2, 4, lskv::Int4, _int4)
LSERVE_PREFILL_SM90_KERNEL(64, 2, 2, 2, lskv::Int4, _int4)
LSERVE_PREFILL_SM90_KERNEL(128, 1, 2, 3, lskv::Int4, _int4)
LSERVE_PREFILL_SM90_KERNEL(128, 2, 2, 2, lskv::Int4, _int4)
LSERVE_PREFILL_SM90_KERNEL(64, 1, 2, 4, lskv::Fp8, _fp8)
LSERVE_PREFILL_SM90_KERNEL(64, 2, 2, 2, lskv::Fp8, _fp8)
LSERVE_PREFILL_SM90_KERNEL(128, 1, 2, 2, lskv::Fp8, _fp8)
LSERVE_PREFILL_SM90_KERNEL(128, 2, 2, 2, lskv::Fp8, _fp8)

// Warp-specialized entry points (fp16 caches): NC consumer warpgroups of 64 rows plus the producer; one CTA per SM.
#define LSERVE_PREFILL_WS_KERNEL(D, NC, STAGES)                                                                   \
  extern "C" __global__ void __launch_bounds__(128 * (NC + 1), 1) paged_attn_prefill_ws_d##D##_c##NC##_s##STAGES( \
      const f16_t* q, const unsigned char* k0, const unsigned char* v0, const unsigned char* k1,                  \
      const unsigned char* v1, const f16_t* sk0, const f16_t* sv0, const f16_t* sk1, const f16_t* sv1, f16_t* out, \
      const int* plan, int cap_qb, int cap_seq, const int* head_class, const int* head_slot, int n0, int n1, int Hq, \
      int Hkv, int ps_shift, int rows_per_head, int heads_per_cta, int n_sub, int hgroups, float scale_log2) {     \
    lserve::pdl_enter();                                                                                          \
    const lsattn::KVPools pools{k0, v0, k1, v1, sk0, sv0, sk1, sv1, head_class, head_slot, n0, n1};               \
    lsattn::sm90::prefill_ws_body<D, NC, STAGES>(q, pools, out, lsattn::plan_view(plan, cap_qb, cap_seq), Hq, Hkv, \
                                                 ps_shift, rows_per_head, heads_per_cta, n_sub, hgroups,          \
                                                 scale_log2);                                                     \
  }

// Stages: as many as fit 227 KiB with the Q tile (d128 c2: 32 KiB of Q + 5 x 32 KiB).
LSERVE_PREFILL_WS_KERNEL(64, 1, 8)
LSERVE_PREFILL_WS_KERNEL(64, 2, 8)
LSERVE_PREFILL_WS_KERNEL(128, 1, 6)
LSERVE_PREFILL_WS_KERNEL(128, 2, 5)
