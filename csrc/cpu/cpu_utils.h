// Small helpers shared by the CPU op implementations.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

#include "../trace_pass.h"

namespace bp {

// Sum of `rows` rows of length `cols`, in row order: deterministic reductions of partial buffers.
template <typename T>
void sum_rows(const T* src, int64_t rows, int64_t cols, T* dst) {
  std::fill(dst, dst + cols, T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c] += src[r * cols + c];
}

// The gradient of alpha (of shape alpha_shape) from the passes' accumulator: per chunk for a full
// or per-neuron alpha, per task for a scalar one (see alpha_acc_size), summed in a fixed order.
template <typename T>
at::Tensor reduce_alpha_acc(const at::Tensor& acc, AlphaMode mode, const Tiling& tl,
                            at::IntArrayRef alpha_shape) {
  const int64_t rows = mode == AlphaMode::Scalar ? acc.numel() : tl.num_chunks;
  at::Tensor grad = at::empty(alpha_shape, acc.options());
  TORCH_INTERNAL_ASSERT(grad.numel() * rows == acc.numel());
  sum_rows(acc.data_ptr<T>(), rows, grad.numel(), grad.data_ptr<T>());
  return grad;
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Calls f.template operator()<float or double>() for the dtype of `like` (validated before).
template <typename F>
auto dispatch_float(const at::Tensor& like, const char* op, F&& f) {
  if (like.scalar_type() == at::kDouble) return f.template operator()<double>();
  TORCH_CHECK(like.scalar_type() == at::kFloat, op, ": unsupported dtype ", like.scalar_type());
  return f.template operator()<float>();
}

}  // namespace bp
