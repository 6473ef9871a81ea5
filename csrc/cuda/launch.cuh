// Launches a phased kernel (phased.h) on the current CUDA stream: one __global__ wrapper runs the
// phases with a __syncthreads() between them.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "phased.h"

namespace bp::kern {

// The phases of one block, a barrier between them.
template <class K>
__device__ __forceinline__ void run_phases(const K& k) {
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

// A kernel that sets K::kMinBlocksPerSM (phased.h) is compiled for that many blocks an SM; the
// others with the bound on threads alone: a minimum of 1 block, written out, is not the same
// to ptxas (it spilled more in SequenceBackwardKernel, csrc/cuda/NOTES.md "Kernel resources").
template <class K>
concept SetsMinBlocksPerSM = requires { K::kMinBlocksPerSM; };

template <class K>
  requires(!SetsMinBlocksPerSM<K>)
__global__ void __launch_bounds__(K::kMaxThreads) phased_kernel(const K k) {
  run_phases(k);
}

template <class K>
  requires SetsMinBlocksPerSM<K>
__global__ void __launch_bounds__(K::kMaxThreads, K::kMinBlocksPerSM) phased_kernel(const K k) {
  run_phases(k);
}

// The current device's opt-in limit of dynamic shared memory per block, bytes (227 KB on sm_90,
// 163 KB on sm_80; 48 KB without opting in).
inline int64_t max_shared_bytes_per_block() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

template <class K>
void launch(const K& k) {
  if (k.grid() == 0) return;
  const size_t shared = static_cast<size_t>(k.shared_size()) * sizeof(typename K::Value);
  TORCH_CHECK(k.block() <= K::kMaxThreads, "bp kernel launch: ", k.block(),
              " threads per block exceed the ", K::kMaxThreads, " the kernel is compiled for");
  constexpr size_t kDefaultShared = 48 << 10;  // more needs the kernel's opt-in
  if (shared > kDefaultShared) {
    TORCH_CHECK(static_cast<int64_t>(shared) <= max_shared_bytes_per_block(),
                "bp kernel launch: ", shared,
                " bytes of shared memory per block exceed the device's limit of ",
                max_shared_bytes_per_block());
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        phased_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  }
  phased_kernel<K>
      <<<static_cast<unsigned>(k.grid()), k.block(), shared, c10::cuda::getCurrentCUDAStream()>>>(
          k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bp::kern
