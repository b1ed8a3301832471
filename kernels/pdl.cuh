// Programmatic dependent launch (sm_90 and newer; no-ops when compiled for older GPUs).
// The launcher (lserve_lite/backends/cuda_launch.py) lets a kernel start while the kernel before it on the
// stream is still running, so its launch and its first weight loads overlap that kernel's tail: each decode
// step is ~10 dependent kernels per layer, and the gaps between them were a large part of the step's time.
// The rule every kernel here follows: pdl_enter() before the first access to memory that an earlier kernel
// writes or reads (activations, the KV cache, selections, outputs). Only constant data (weights, RoPE tables, the
// cache's head classes) and the plan arrays (positions and slots too), which only host copies ordered before the
// launch write, may be read before it (the decode kernel's idle CTAs decide from the plan to leave without waiting;
// rope_write_kv(_sparse) load their row's position and slots and prefetch its cos / sin lines);
// tests/test_cuda_launch.py checks that every __global__ function in kernels/ calls it.
#pragma once

namespace lserve {

// Wait until the previous kernel on the stream has completed and its writes are visible (griddepcontrol.wait),
// then let the next kernel begin launching (griddepcontrol.launch_dependents): at most one grid waits behind us.
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Hint: bring the line at `p` into L2 (constant data to be read after pdl_enter()).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

}  // namespace lserve
