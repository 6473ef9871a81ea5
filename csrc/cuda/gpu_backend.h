// The GPU trace passes (trace_kernels.h) behind the interface the op drivers (csrc/ops/) use,
// for a launch policy: the CUDA launch (ops_cuda.cu) or the CPU emulator (emulated_ops.cpp),
// which runs the same kernels on CPU tensors with every memory access checked.
#pragma once

#include <ATen/ATen.h>

#include "../dispatch.h"
#include "../trace_pass.h"
#include "trace_kernels.h"

namespace bp {

template <class Launch>
struct GpuBackend {
  using Tiling = kern::GpuTiling;
  at::TensorOptions opts;  // device and dtype of the scratch buffers

  explicit GpuBackend(const at::TensorOptions& o) : opts(o) {}

  Tiling tiling(int64_t B, int64_t P, int64_t N) const { return kern::make_gpu_tiling(B, P, N); }
  int64_t column_tiles(const Tiling& tl) const { return tl.num_tiles; }
  int64_t alpha_acc_size(AlphaMode mode, const Tiling& tl, int64_t P, int64_t N) const {
    switch (mode) {
      case AlphaMode::Full: return tl.num_chunks * P * N;
      case AlphaMode::Neuron: return tl.num_chunks * tl.num_row_blocks * N;
      default: return tl.blocks();
    }
  }
  // No whole-sequence kernel yet: the sequence ops run step by step.
  static constexpr bool kWholeSequence = false;
  int64_t eta_acc_rows(const Tiling& tl) const { return tl.num_chunks; }
  int64_t rate_acc_size(const Tiling& tl) const { return tl.blocks(); }

  template <typename T>
  void forward(const ForwardPassParams<T>& p, const PassModes& m, const Tiling& tl) const {
    const int64_t B = p.B, P = p.P, N = p.N, BPN = B * P * N;
    at::Tensor u_partial = at::empty({p.matvec ? tl.num_row_blocks * B * N : 0}, opts);
    dispatch_modes(m, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
      auto run = [&]<bool UPDATE, bool MATVEC>() {
        kern::ForwardKernel<T, R, AM, EM, UPDATE, MATVEC> k{};
        k.B = B; k.P = P; k.N = N; k.tl = tl; k.consts = p.consts;
        k.hebb = {p.hebb, BPN};
        if constexpr (UPDATE) {
          k.hebb_out = {p.hebb_out, BPN};
          if constexpr (has_elig<R>()) {
            k.elig = {p.elig, BPN};
            k.elig_out = {p.elig_out, BPN};
          }
          k.pre = {p.pre, B * P};
          k.post = {p.post, B * N};
          k.eta = {p.eta, EM == EtaMode::PerPost ? B * N : P * N};
        }
        if constexpr (MATVEC) {
          k.matvec_in = {p.matvec_in, B * P};
          k.w = {p.w, P * N};
          k.alpha = {p.alpha, alpha_size(AM, P, N)};
          k.u_partial = {u_partial.data_ptr<T>(), u_partial.numel()};
        }
        Launch{}(k);
      };
      if (p.update && p.matvec) run.template operator()<true, true>();
      else if (p.update) run.template operator()<true, false>();
      else if (p.matvec) run.template operator()<false, true>();
    });
    if (p.matvec) sum_rows(u_partial.data_ptr<T>(), tl.num_row_blocks, B * N, p.u);
  }

  template <typename T>
  void backward(const BackwardPassParams<T>& p, const PassModes& m, const Tiling& tl) const {
    const int64_t B = p.B, P = p.P, N = p.N, BPN = B * P * N, rows = tl.num_row_blocks;
    const bool per_post = m.eta == EtaMode::PerPost;
    at::Tensor post_partial = at::empty({p.do_a ? rows * B * N : 0}, opts);
    at::Tensor eta_partial = at::empty({p.do_a && per_post ? rows * B * N : 0}, opts);
    dispatch_modes(m, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
      auto run = [&]<bool DO_B, bool DO_A>() {
        kern::BackwardKernel<T, R, AM, EM, DO_B, DO_A> k{};
        k.B = B; k.P = P; k.N = N; k.tl = tl; k.consts = p.consts;
        k.g_hebb = {p.g_hebb, BPN};
        if constexpr (DO_B) {
          k.g_u = {p.g_u, B * N};
          k.b_in = {p.b_in, B * P};
          k.b_hebb = {p.b_hebb, BPN};
          k.w = {p.w, P * N};
          k.alpha = {p.alpha, alpha_size(AM, P, N)};
          k.g_in_partial = {p.g_in_partial, tl.num_tiles * B * P};
          k.g_alpha_acc = {p.g_alpha_acc, alpha_acc_size(AM, tl, P, N)};
        }
        if constexpr (DO_A) {
          if constexpr (has_elig<R>()) {
            k.g_elig = {p.g_elig, BPN};
            k.a_elig = {p.a_elig, BPN};
            k.g_rate_acc = {p.g_elig_rate_acc, rate_acc_size(tl)};
          }
          k.a_hebb = {p.a_hebb, BPN};
          k.a_pre = {p.a_pre, B * P};
          k.a_post = {p.a_post, B * N};
          k.a_eta = {p.a_eta, EM == EtaMode::PerPost ? B * N : P * N};
          k.g_pre_partial = {p.g_pre_partial, tl.num_tiles * B * P};
          k.g_post_partial = {post_partial.data_ptr<T>(), post_partial.numel()};
          if constexpr (EM == EtaMode::PerPost)
            k.g_eta_partial = {eta_partial.data_ptr<T>(), eta_partial.numel()};
          else
            k.g_eta_conn = {p.g_eta, eta_acc_rows(tl) * P * N};
        }
        Launch{}(k);
      };
      if (p.do_b && p.do_a) run.template operator()<true, true>();
      else if (p.do_b) run.template operator()<true, false>();
      else if (p.do_a) run.template operator()<false, true>();
    });
    if (p.do_a) {
      sum_rows(post_partial.data_ptr<T>(), rows, B * N, p.g_post);
      if (per_post) sum_rows(eta_partial.data_ptr<T>(), rows, B * N, p.g_eta);
    }
  }

  template <typename T>
  void sum_rows(const T* src, int64_t rows, int64_t cols, T* dst) const {
    Launch{}(kern::ColumnSumKernel<T>{{src, rows * cols}, {dst, cols}, rows, cols});
  }

 private:
  static int64_t alpha_size(AlphaMode mode, int64_t P, int64_t N) {
    return mode == AlphaMode::Full ? P * N : mode == AlphaMode::Neuron ? N : 1;
  }
};

}  // namespace bp
