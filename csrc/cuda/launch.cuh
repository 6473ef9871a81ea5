// Launches a phased kernel (phased.h) on the current CUDA stream: one __global__ wrapper runs the
// phases with a __syncthreads() between them.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "phased.h"

namespace bp::kern {

template <class K>
__global__ void phased_kernel(const K k) {
  using V = typename K::Value;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const Span<V> smem{reinterpret_cast<V*>(shared_bytes), k.shared_size()};
  typename K::Regs regs{};
  const ThreadPos pos{static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x),
                      static_cast<int64_t>(gridDim.x), static_cast<int>(blockDim.x)};
  const int phases = k.phases();
  for (int p = 0; p < phases; ++p) {
    if (p > 0) __syncthreads();
    k.run(p, pos, regs, smem);
  }
}

template <class K>
void launch(const K& k) {
  if (k.grid() == 0) return;
  const size_t shared = static_cast<size_t>(k.shared_size()) * sizeof(typename K::Value);
  phased_kernel<K><<<static_cast<unsigned>(k.grid()), k.block(), shared,
                     c10::cuda::getCurrentCUDAStream()>>>(k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bp::kern
