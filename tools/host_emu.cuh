// Host emulation of CUDA kernels, shared by the tools/*_host_emu.cu drivers: a kernel source compiled as host code,
// one coroutine (ucontext) per CUDA thread of a block on one OS thread, blocks one after another, a barrier per warp
// for the warp intrinsics and one per block for __syncthreads; the shared memory of a block as statics (its dynamic
// array: emu_dyn_smem, which the drivers point `extern __shared__` arrays at). A thread runs until it waits at a
// barrier or ends, then the next one; a block whose live threads all wait at barriers that cannot open (a barrier
// in divergent code) stops the program with a message. Not a performance model, and blind to the GPU's memory
// model. Include it before the kernel's text. (An OS thread per CUDA thread, the first form, spent most of its time
// in the kernel's futexes: a 2-core CI host took minutes per check.)
#pragma once
#include <cuda_fp16.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct Dim3 {
  unsigned x, y, z;
};
Dim3 emu_thread, emu_block;  // the running CUDA thread's (set at every switch)
Dim3 emu_block_dim, emu_grid_dim;
unsigned long long emu_slot[1024];  // a warp intrinsic's operand of each thread
alignas(16) unsigned char emu_dyn_smem[1 << 17];

// A barrier of `count` threads; `gen` counts its openings, which release the threads waiting at it.
struct EmuBarrier {
  int count = 0, arrived = 0;
  unsigned gen = 0;
};
// The block's coroutines: the scheduler's context, each thread's, whether it ended, and a count of events (a barrier
// arrival, a thread's end) by which the scheduler tells progress from a deadlock.
ucontext_t emu_main;
std::vector<ucontext_t> emu_ctx;
std::vector<char> emu_done;
int emu_cur = 0;
unsigned long long emu_events = 0;
EmuBarrier emu_warp_bar[32], emu_block_bar;

static void emu_wait(EmuBarrier& b) {
  const unsigned gen = b.gen;
  ++emu_events;
  if (++b.arrived == b.count) {  // the last to arrive opens it and goes on
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) swapcontext(&emu_ctx[emu_cur], &emu_main);
}
static void emu_syncwarp() { emu_wait(emu_warp_bar[emu_thread.x >> 5]); }

// Every lane publishes v, then reads lane src(lane)'s (the warp meets twice: before reading, before reuse).
template <class T, class Src>
static T emu_exchange(T v, Src src) {
  static_assert(sizeof(T) <= 8, "one slot per thread");
  const int t = emu_thread.x, base = t & ~31;
  memcpy(&emu_slot[t], &v, sizeof(T));
  emu_syncwarp();
  T r;
  memcpy(&r, &emu_slot[base + (src(t & 31) & 31)], sizeof(T));
  emu_syncwarp();
  return r;
}

// Every lane publishes v, then folds all 32 with op.
template <class T, class Op>
static T emu_fold(T v, Op op) {
  const int t = emu_thread.x, base = t & ~31;
  memcpy(&emu_slot[t], &v, sizeof(T));
  emu_syncwarp();
  T acc;
  memcpy(&acc, &emu_slot[base], sizeof(T));
  for (int l = 1; l < 32; ++l) {
    T x;
    memcpy(&x, &emu_slot[base + l], sizeof(T));
    acc = op(acc, x);
  }
  emu_syncwarp();
  return acc;
}

template <class T>
static T emu_shfl_xor(T v, int o) {
  return emu_exchange(v, [o](int l) { return l ^ o; });
}
template <class T>
static T emu_shfl_up(T v, int o) {
  return emu_exchange(v, [o](int l) { return l >= o ? l - o : l; });
}
template <class T>
static T emu_shfl_down(T v, int o) {
  return emu_exchange(v, [o](int l) { return l + o < 32 ? l + o : l; });
}
template <class T>
static T emu_shfl(T v, int src) {
  return emu_exchange(v, [src](int) { return src; });
}
static unsigned emu_ballot(bool p) {
  const unsigned bit = p ? 1u << (emu_thread.x & 31) : 0u;
  return emu_fold(bit, [](unsigned a, unsigned b) { return a | b; });
}
template <class T>
static T emu_reduce_add(T v) {
  return emu_fold(v, [](T a, T b) { return a + b; });
}
template <class T>
static T emu_reduce_min(T v) {
  return emu_fold(v, [](T a, T b) { return a < b ? a : b; });
}
template <class T>
static T emu_reduce_max(T v) {
  return emu_fold(v, [](T a, T b) { return a > b ? a : b; });
}
static unsigned emu_float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
static float emu_uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static float emu_int_as_float(int i) { return emu_uint_as_float((unsigned)i); }
static float emu_h2f(unsigned short h) {
  __half x;
  memcpy(&x, &h, 2);
  return __half2float(x);
}
static int emu_atomic_add(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static unsigned emu_atomic_add(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static double emu_atomic_add(double* p, double v) {  // a compare-and-swap loop on the bits
  unsigned long long* b = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = __atomic_load_n(b, __ATOMIC_RELAXED), next;
  do {
    double d;
    memcpy(&d, &old, 8);
    d += v;
    memcpy(&next, &d, 8);
  } while (!__atomic_compare_exchange_n(b, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  double r;
  memcpy(&r, &old, 8);
  return r;
}
static unsigned emu_atomic_max(unsigned* p, unsigned v) {
  unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

#undef __device__
#define __device__ __host__
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx emu_thread
#define blockIdx emu_block
#define blockDim emu_block_dim
#define gridDim emu_grid_dim
#define __syncthreads() emu_wait(emu_block_bar)
#define __shfl_xor_sync(mask, v, o) emu_shfl_xor(v, o)
#define __shfl_up_sync(mask, v, o) emu_shfl_up(v, o)
#define __shfl_down_sync(mask, v, o) emu_shfl_down(v, o)
#define __shfl_sync(mask, v, l) emu_shfl(v, l)
#define __ballot_sync(mask, p) emu_ballot(p)
#define __any_sync(mask, p) (emu_ballot(p) != 0u)
#define __reduce_add_sync(mask, v) emu_reduce_add(v)
#define __reduce_min_sync(mask, v) emu_reduce_min(v)
#define __reduce_max_sync(mask, v) emu_reduce_max(v)
#define __popc(x) __builtin_popcount(x)
#define __ffs(x) __builtin_ffs(x)
#define __clz(x) ((x) ? __builtin_clz(x) : 32)
#define __float_as_uint emu_float_as_uint
#define __uint_as_float emu_uint_as_float
#define __int_as_float emu_int_as_float
#define rsqrtf(x) (1.f / sqrtf(x))
#define atomicAdd emu_atomic_add
#define atomicMax emu_atomic_max
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)

void* emu_kernel;  // the launched kernel (a lambda), for emu_entry

template <typename Fn>
static void emu_entry() {
  (*static_cast<Fn*>(emu_kernel))();
  emu_done[emu_cur] = 1;
  ++emu_events;
}  // returns to emu_main (uc_link)

// `blocks` = grid (x, y, z) of `threads` each: a block's threads take turns (each runs to its next barrier), blocks
// one after another; the dynamic shared memory is poisoned before each block.
template <typename Fn>
static void launch(Dim3 grid, int threads, Fn kernel) {
  constexpr size_t STACK = 256 << 10;
  std::vector<char*> stacks(threads);
  for (auto& st : stacks) st = static_cast<char*>(malloc(STACK));  // untouched pages cost nothing
  emu_ctx.assign(threads, ucontext_t{});
  emu_kernel = &kernel;
  emu_block_dim = {(unsigned)threads, 1, 1};
  emu_grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        memset(emu_dyn_smem, 0xFF, sizeof(emu_dyn_smem));  // NaN floats, -1 ints
        for (int i = 0; i < threads / 32; ++i) emu_warp_bar[i] = EmuBarrier{32};
        emu_block_bar = EmuBarrier{threads};
        emu_done.assign(threads, 0);
        for (int t = 0; t < threads; ++t) {
          getcontext(&emu_ctx[t]);
          emu_ctx[t].uc_stack = {stacks[t], 0, STACK};
          emu_ctx[t].uc_link = &emu_main;
          makecontext(&emu_ctx[t], emu_entry<Fn>, 0);
        }
        emu_block = {x, y, z};
        for (int live = threads; live > 0;) {
          const unsigned long long before = emu_events;
          live = 0;
          for (int t = 0; t < threads; ++t) {
            if (emu_done[t]) continue;
            emu_cur = t;
            emu_thread = {(unsigned)t, 0, 0};
            swapcontext(&emu_main, &emu_ctx[t]);
            live += !emu_done[t];
          }
          if (live && emu_events == before) {
            fprintf(stderr, "host emulation: block (%u, %u, %u): every live thread waits at a barrier that cannot open\n",
                    x, y, z);
            exit(4);
          }
        }
      }
  for (char* st : stacks) free(st);
}

static std::vector<unsigned char> read_bytes(const std::string& path) {
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) exit(3);
  fseek(f, 0, SEEK_END);
  const long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  std::vector<unsigned char> b(n);
  if (fread(b.data(), 1, n, f) != (size_t)n) exit(3);
  fclose(f);
  return b;
}

static void write_bytes(const std::string& path, const void* p, size_t n) {
  FILE* f = fopen(path.c_str(), "wb");
  fwrite(p, 1, n, f);
  fclose(f);
}
