// Host emulation of CUDA kernels, shared by tools/page_select_host_emu.cu and tools/sampling_host_emu.cu: a kernel
// source compiled as host code, one std::thread per CUDA thread of a block, blocks one after another, a pthread
// barrier per warp for the warp intrinsics and one per block for __syncthreads; the shared memory of a block as
// statics (its dynamic array: emu_dyn_smem, which the drivers point `extern __shared__` arrays at). Not a
// performance model, and blind to the GPU's memory model. Include it before the kernel's text.
#pragma once
#include <cuda_fp16.h>
#include <pthread.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

struct Dim3 {
  unsigned x, y, z;
};
thread_local Dim3 emu_thread, emu_block;
Dim3 emu_block_dim, emu_grid_dim;
pthread_barrier_t emu_warp_bar[32], emu_block_bar;
unsigned long long emu_slot[1024];  // a warp intrinsic's operand of each thread
alignas(16) unsigned char emu_dyn_smem[1 << 17];

static void emu_syncwarp() { pthread_barrier_wait(&emu_warp_bar[emu_thread.x >> 5]); }

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
#define __syncthreads() pthread_barrier_wait(&emu_block_bar)
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

// `blocks` = grid (x, y, z) of `threads` each: a block's threads run concurrently (std::thread, so the
// barriers meet), blocks one after another; the dynamic shared memory is poisoned before each block.
template <typename Fn>
static void launch(Dim3 grid, int threads, Fn kernel) {
  for (int i = 0; i < threads / 32; ++i) pthread_barrier_init(&emu_warp_bar[i], nullptr, 32);
  pthread_barrier_init(&emu_block_bar, nullptr, threads);
  emu_block_dim = {(unsigned)threads, 1, 1};
  emu_grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        memset(emu_dyn_smem, 0xFF, sizeof(emu_dyn_smem));  // NaN floats, -1 ints
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([=] {
            emu_thread = {(unsigned)t, 0, 0};
            emu_block = {x, y, z};
            kernel();
          });
        for (auto& t : ts) t.join();
      }
  for (int i = 0; i < threads / 32; ++i) pthread_barrier_destroy(&emu_warp_bar[i]);
  pthread_barrier_destroy(&emu_block_bar);
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
