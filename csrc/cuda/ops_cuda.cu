// The ops on CUDA tensors: the drivers of csrc/ops/ with the GPU trace passes (trace_kernels.h)
// launched on the current stream, registered under the CUDA dispatch key.
#include <torch/library.h>

#include "../ops/register.h"
#include "gpu_backend.h"
#include "launch.cuh"

namespace bp {

struct CudaLaunch {
  template <class K>
  void operator()(const K& k) const {
    kern::launch(k);
  }
  static int64_t max_shared_bytes() { return kern::max_shared_bytes_per_block(); }
};

}  // namespace bp

TORCH_LIBRARY_IMPL(backpropamine, CUDA, m) { bp::impl_ops<bp::GpuBackend<bp::CudaLaunch>>(m); }
