// The CPU trace passes behind the interface the op drivers (csrc/ops/) use; the CUDA one is
// csrc/cuda/gpu_backend.h.
#pragma once

#include <ATen/core/TensorBody.h>

#include <algorithm>

#include "../lstm_cell.h"
#include "../sequence_pass.h"
#include "../trace_pass.h"

namespace bp {

struct CpuBackend {
  using Tiling = bp::Tiling;

  explicit CpuBackend(const at::TensorOptions&) {}

  Tiling tiling(int64_t B, int64_t /*P*/, int64_t N) const { return make_tiling(B, N); }
  // Rows of the partial sums over columns (g_in_partial, g_pre_partial).
  int64_t column_tiles(const Tiling& tl) const { return tl.num_tiles; }
  int64_t alpha_acc_size(AlphaMode mode, const Tiling& tl, int64_t P, int64_t N) const {
    return bp::alpha_acc_size(mode, tl, P, N);
  }
  // Rows of the (rows, P, N) accumulator of a per-connection rate's gradient.
  int64_t eta_acc_rows(const Tiling& tl) const { return tl.num_chunks; }
  int64_t rate_acc_size(const Tiling& tl) const { return tl.num_chunks * tl.num_tiles; }

  template <typename T>
  void forward(const ForwardPassParams<T>& p, const PassModes& m, const Tiling& tl) const {
    forward_pass_cpu(p, m, tl);
  }
  // The pass writes u whole: its one row of partial sums (GpuBackend::forward_u_partials).
  int64_t u_partial_rows(const Tiling&) const { return 1; }
  template <typename T>
  void forward_u_partials(const ForwardPassParams<T>& p, const PassModes& m,
                          const Tiling& tl) const {
    forward_pass_cpu(p, m, tl);
  }
  template <typename T>
  void backward(const BackwardPassParams<T>& p, const PassModes& m, const Tiling& tl) const {
    backward_pass_cpu(p, m, tl);
  }
  // The whole-sequence path (sequence_pass.h), for both cells, where use_whole_sequence takes it.
  static constexpr bool kWholeSequence = true;
  bool whole_sequence(Cell cell, int64_t B, int64_t N, bool retro, int64_t itemsize) const {
    return use_whole_sequence(cell, B, N, retro, itemsize);
  }
  Tiling sequence_groups(int64_t B, int64_t N, bool retro, int64_t itemsize, bool backward) const {
    return bp::sequence_groups(B, N, retro, itemsize, backward);
  }
  template <typename T>
  void sequence_forward(const SequenceForwardParams<T>& p, const Tiling& groups) const {
    sequence_forward_cpu(p, groups);
  }
  template <typename T>
  void sequence_backward(const SequenceBackwardParams<T>& p, const Tiling& groups) const {
    sequence_backward_cpu(p, groups);
  }
  // out (B, M) = v (B, K) @ w^T + bias (may be undefined); all contiguous. BLAS ran these
  // products of a few samples (the LSTM's h2g) on one thread.
  template <typename T>
  void rows_product(const at::Tensor& v, const at::Tensor& w, const at::Tensor& bias,
                    const at::Tensor& out) const {
    rows_product_cpu(w.data_ptr<T>(), bias.defined() ? bias.data_ptr<T>() : nullptr,
                     v.data_ptr<T>(), v.size(0), w.size(0), w.size(1), out.data_ptr<T>());
  }
  // The LSTM cell of one step, forward and backward (lstm_cell.h), element by element.
  template <typename T>
  void lstm_cell_forward(const LstmCellForwardArgs<T>& a) const {
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t j = 0; j < a.N; ++j) lstm_cell_forward_element(a, b, j);
  }
  template <typename T>
  void lstm_cell_backward(const LstmCellBackwardArgs<T>& a) const {
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t j = 0; j < a.N; ++j) lstm_cell_backward_element(a, b, j);
  }
  // dst[k] = sum over r of src[r * cols + k], in row order: the fixed-order reduction of the
  // passes' partial buffers.
  template <typename T>
  void sum_rows(const T* src, int64_t rows, int64_t cols, T* dst) const {
    std::fill(dst, dst + cols, T(0));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[c] += src[r * cols + c];
  }
};

}  // namespace bp
