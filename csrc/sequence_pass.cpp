// The choice of path of the sequence ops (sequence_pass.h), shared by the CPU and GPU backends.
#include "sequence_pass.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace bp {

SequencePath requested_sequence_path() {
  const char* path = std::getenv("BACKPROPAMINE_SEQUENCE_PATH");
  const std::string want = path == nullptr ? "" : path;
  if (want == "whole") return SequencePath::Whole;
  if (want == "steps") return SequencePath::Steps;
  TORCH_CHECK_VALUE(want.empty() || want == "auto",
                    "BACKPROPAMINE_SEQUENCE_PATH must be one of "
                    "auto, whole, steps, got '",
                    want, "'");
  return SequencePath::Auto;
}

bool gpu_whole_sequence(int64_t N, bool retro, int64_t need, int64_t limit) {
  const SequencePath want = requested_sequence_path();
  if (want == SequencePath::Steps) return false;
  if (want == SequencePath::Auto) return need <= limit;
  TORCH_CHECK_VALUE(need <= limit,
                    "BACKPROPAMINE_SEQUENCE_PATH=whole: the whole-sequence "
                    "kernels at N = ",
                    N, (retro ? " with an eligibility trace" : ""), " need ", need,
                    " bytes of shared memory per block, the device allows ", limit,
                    " (use auto or steps)");
  return true;
}

}  // namespace bp
