// The CUDA kernels run by the CPU emulator (cuda/emulate.h), registered for CPU tensors as the
// ops of namespace `backpropamine_emulated`: the same drivers and the same kernel sources as the
// CUDA ops (cuda/ops_cuda.cu), with every memory access bounds-checked. The test suite runs the
// whole op test matrix through them (python_tests/conftest.py, fixture `fused`).
#include <torch/library.h>

#include "../cuda/emulate.h"
#include "../cuda/gpu_backend.h"
#include "../ops/register.h"

namespace bp {

struct EmulatedLaunch {
  template <class K>
  void operator()(const K& k) const {
    // The launch limits a GPU would enforce.
    const int64_t shared = k.shared_size() * static_cast<int64_t>(sizeof(typename K::Value));
    TORCH_CHECK(shared <= kEmulatedSharedBytes && k.block() <= K::kMaxThreads,
                "bp kernel emulator: ", shared, " bytes of shared memory and ", k.block(),
                " threads per block exceed the limits of ", kEmulatedSharedBytes, " bytes and ",
                K::kMaxThreads, " threads");
    ++launches();
    kern::emulate(k);
  }
  // Launches so far, for the tests that count a step's launches.
  static int64_t& launches() {
    static int64_t count = 0;
    return count;
  }
  // The emulator's shared memory per block: that of an sm_90 GPU with the opt-in (227 KB), so
  // that the tests choose the paths an H100 or H200 would.
  static int64_t max_shared_bytes() { return kEmulatedSharedBytes; }
  static constexpr int64_t kEmulatedSharedBytes = 227 << 10;
};

}  // namespace bp

namespace {

// A probe of the emulator itself: the column sums of `src` read as a (rows, cols) matrix, with
// rows and cols taken as given, so that a test can check that an access past the end of `src`
// raises instead of reading memory.
at::Tensor emulator_column_sums(const at::Tensor& src, int64_t rows, int64_t cols) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous() && rows >= 0 && cols >= 0,
              "emulator_column_sums: expected a contiguous float32 src and rows, cols >= 0");
  at::Tensor dst = at::empty({cols}, src.options());
  bp::kern::emulate(bp::kern::ColumnSumKernel<float>{
      {src.data_ptr<float>(), src.numel()}, {dst.data_ptr<float>(), cols}, rows, cols});
  return dst;
}

// Runs the threads of each phase in reverse order from now on (or again in order): results that
// change are a race between threads of one phase.
void emulator_reverse_thread_order(bool reverse) { bp::kern::reverse_thread_order() = reverse; }

// The number of kernel launches the emulator has run so far (the GPU's launches of our kernels;
// ATen's own ops launch the rest).
int64_t emulator_launches() { return bp::EmulatedLaunch::launches(); }

}  // namespace

TORCH_LIBRARY(backpropamine_emulated, m) {
  bp::define_ops(m);
  m.def("emulator_column_sums(Tensor src, int rows, int cols) -> Tensor");
  m.def("emulator_reverse_thread_order(bool reverse) -> ()", &emulator_reverse_thread_order);
  m.def("emulator_launches() -> int", &emulator_launches);
}

TORCH_LIBRARY_IMPL(backpropamine_emulated, CPU, m) {
  bp::impl_ops<bp::GpuBackend<bp::EmulatedLaunch>>(m);
  m.impl("emulator_column_sums", &emulator_column_sums);
}
