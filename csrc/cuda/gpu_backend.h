// The GPU trace passes (trace_kernels.h) behind the interface the op drivers (csrc/ops/) use,
// for a launch policy: the CUDA launch (ops_cuda.cu) or the CPU emulator
// (cpu/emulated_cuda_ops.cpp), which runs the same kernels on CPU tensors with every memory
// access checked.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../checks.h"
#include "../dispatch.h"
#include "../trace_pass.h"
#include "../sequence_pass.h"
#include "lstm_cell_kernels.h"
#include "sequence_kernels.h"
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
      case AlphaMode::Full:
        return tl.num_chunks * P * N;
      case AlphaMode::Neuron:
        return tl.num_chunks * tl.num_row_blocks * N;
      default:
        return tl.blocks();
    }
  }
  // The whole-sequence path (sequence_kernels.h): one launch per sequence forward, one backward,
  // where a block's shared memory (the trace, or the trace gradient, of one sample) fits the
  // device's opt-in limit per block (Launch::max_shared_bytes()). The tanh cell only: the LSTM
  // runs step by step, whatever BACKPROPAMINE_SEQUENCE_PATH says.
  static constexpr bool kWholeSequence = true;
  // The least shared memory per block of the two kernels (one row slice), bytes.
  static int64_t whole_sequence_shared_bytes(int64_t N, bool retro, int64_t itemsize) {
    const int64_t fwd = kern::sequence_forward_shared(N, retro, 1);
    const int64_t bwd = kern::sequence_backward_shared(N, retro, 1);
    return (fwd > bwd ? fwd : bwd) * itemsize;
  }
  // Row slices per block: as many as fit (sequence_kernels.h).
  template <typename T>
  static int64_t slices(int64_t N, bool retro, bool backward) {
    return kern::sequence_slices(N, retro, sizeof(T), Launch::max_shared_bytes(), backward);
  }
  bool whole_sequence(Cell cell, int64_t /*B*/, int64_t N, bool retro, int64_t itemsize) const {
    return cell == Cell::Tanh &&
           gpu_whole_sequence(N, retro, whole_sequence_shared_bytes(N, retro, itemsize),
                              Launch::max_shared_bytes());
  }
  // One group (block) per sample: accumulators per sample, summed in sample order.
  Tiling sequence_groups(int64_t B, int64_t N, bool, int64_t, bool) const {
    Tiling t{};
    t.chunk_size = 1;
    t.num_chunks = B;
    t.num_tiles = 1;
    t.block_rows = N;
    t.num_row_blocks = 1;
    t.stage_rows = 1;
    return t;
  }

  // out (B, M) = v (B, K) @ w^T + bias (may be undefined), through cuBLAS.
  template <typename T>
  void rows_product(const at::Tensor& v, const at::Tensor& w, const at::Tensor& bias,
                    at::Tensor out) const {
    if (bias.defined())
      at::addmm_out(out, bias, v, w.t());
    else
      at::mm_out(out, v, w.t());
  }

  // The LSTM cell of one step, forward and backward (lstm_cell.h): one launch each.
  template <typename T>
  void lstm_cell_forward(const LstmCellForwardArgs<T>& a) const {
    Launch{}(kern::LstmCellKernel<T, kern::CellPass::Forward>{a});
  }
  template <typename T>
  void lstm_cell_backward(const LstmCellBackwardArgs<T>& a) const {
    Launch{}(kern::LstmCellKernel<T, kern::CellPass::Backward>{a});
  }

  template <typename T>
  void sequence_forward(const SequenceForwardParams<T>& p, const Tiling&) const {
    const SequenceInputs<T>& in = p.in;
    TORCH_INTERNAL_ASSERT(in.cell == Cell::Tanh, "the whole-sequence kernels run the tanh cell");
    const int64_t T_ = in.steps, B = in.B, N = in.N, K = in.K, BN = B * N, BNN = BN * N;
    const int64_t TBN = T_ * BN, n_ckpt = num_checkpoints(T_, in.L);
    const bool modulated = in.modulation != Modulation::None;
    dispatch_modes(in.modes, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
      kern::SequenceForwardKernel<T, R, AM, EM> k{};
      k.slices = slices<T>(N, has_elig<R>(), false);
      set_inputs(k, in);
      k.x = {in.x, TBN};
      k.out = {p.out, TBN};
      k.m = {p.m, T_ * B * K};
      k.eta_seq = {p.eta_seq, modulated ? TBN : 0};
      k.hebb_T = {p.hebb_T, BNN};
      k.ckpt_h = {p.ckpt_h, n_ckpt * BNN};
      if constexpr (has_elig<R>()) {
        k.elig_T = {p.elig_T, BNN};
        k.ckpt_e = {p.ckpt_e, n_ckpt * BNN};
      }
      Launch{}(k);
    });
  }

  template <typename T>
  void sequence_backward(const SequenceBackwardParams<T>& p, const Tiling& groups) const {
    const SequenceInputs<T>& in = p.in;
    TORCH_INTERNAL_ASSERT(in.cell == Cell::Tanh, "the whole-sequence kernels run the tanh cell");
    const int64_t T_ = in.steps, B = in.B, N = in.N, K = in.K, BN = B * N, BNN = BN * N;
    const int64_t TBN = T_ * BN, n_ckpt = num_checkpoints(T_, in.L);
    const int64_t seg = (in.L < T_ ? in.L : T_) - 1;
    const bool modulated = in.modulation != Modulation::None;
    dispatch_modes(in.modes, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
      kern::SequenceBackwardKernel<T, R, AM, EM> k{};
      k.slices = slices<T>(N, has_elig<R>(), true);
      set_inputs(k, in);
      k.out = {p.out, TBN};
      k.m = {p.m, T_ * B * K};
      k.eta_seq = {p.eta_seq, modulated ? TBN : 0};
      k.ckpt_h = {p.ckpt_h, n_ckpt * BNN};
      k.grad_out = {p.grad_out, p.grad_out != nullptr ? TBN : 0};
      k.grad_m = {p.grad_m, p.grad_m != nullptr ? T_ * B * K : 0};
      k.g_hebb = {p.g_hebb, BNN};
      k.g_u = {p.g_u, TBN};
      k.g_x = {p.g_x, TBN};
      k.g_h0 = {p.g_h0, BN};
      k.g_z = {p.g_z, T_ * B * K};
      k.g_eta_seq = {p.g_eta_seq, in.modulation == Modulation::Fanout ? TBN : 0};
      k.g_eta_post = {p.g_eta_post, BN};
      k.g_alpha_acc = {p.g_alpha_acc, alpha_acc_size(AM, groups, N, N)};
      k.g_eta_conn = {p.g_eta_conn, EM == EtaMode::PerConnection ? B * N * N : 0};
      k.seg_h = {p.seg_h, seg * BNN};
      if constexpr (has_elig<R>()) {
        k.ckpt_e = {p.ckpt_e, n_ckpt * BNN};
        k.g_elig = {p.g_elig, BNN};
        k.g_rate_acc = {p.g_rate_acc, B};
        k.seg_e = {p.seg_e, seg * BNN};
      }
      Launch{}(k);
    });
  }

  // What a trace kernel (forward or backward) takes from its pass's parameters besides the
  // tensors: the sizes, the tiling and the rule's constants.
  template <class Kernel, class PassParams>
  static void set_pass_constants(Kernel& k, const PassParams& p, const Tiling& tl) {
    k.B = p.B;
    k.P = p.P;
    k.N = p.N;
    k.tl = tl;
    k.clip = p.rule_args.clip;
    k.elig_rate = {p.rule_args.elig_rate, p.rule_args.elig_rate ? 1 : 0};
  }

  int64_t eta_acc_rows(const Tiling& tl) const { return tl.num_chunks; }
  int64_t rate_acc_size(const Tiling& tl) const { return tl.blocks(); }
  template <typename T>
  void forward(const ForwardPassParams<T>& p, const PassModes& m, const Tiling& tl) const {
    at::Tensor u_partial = at::empty({p.matvec ? u_partial_rows(tl) * p.B * p.N : 0}, opts);
    ForwardPassParams<T> partial = p;
    partial.u = u_partial.data_ptr<T>();
    forward_u_partials(partial, m, tl);
    if (p.matvec) sum_rows(partial.u, u_partial_rows(tl), p.B * p.N, p.u);
  }
  // Rows of the matvec's partial sums of u that forward_u_partials leaves: one per row block.
  int64_t u_partial_rows(const Tiling& tl) const { return tl.num_row_blocks; }
  // The forward pass, with the matvec's u left as its partial sums: p.u (u_partial_rows(tl), B, N),
  // whose column sums in row order (sum_rows) are u; for a consumer that sums them itself (the
  // LSTM cell), one launch fewer.
  template <typename T>
  void forward_u_partials(const ForwardPassParams<T>& p, const PassModes& m,
                          const Tiling& tl) const {
    const int64_t B = p.B, P = p.P, N = p.N, BPN = B * P * N;
    dispatch_modes(m, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
      auto run = [&]<bool UPDATE, bool MATVEC>() {
        kern::ForwardKernel<T, R, AM, EM, UPDATE, MATVEC> k{};
        set_pass_constants(k, p, tl);
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
          k.u_partial = {p.u, u_partial_rows(tl) * B * N};
        }
        Launch{}(k);
      };
      if (p.update && p.matvec)
        run.template operator()<true, true>();
      else if (p.update)
        run.template operator()<true, false>();
      else if (p.matvec)
        run.template operator()<false, true>();
    });
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
        set_pass_constants(k, p, tl);
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
      if (p.do_b && p.do_a)
        run.template operator()<true, true>();
      else if (p.do_b)
        run.template operator()<true, false>();
      else if (p.do_a)
        run.template operator()<false, true>();
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

  // The sizes, options and inputs both whole-sequence kernels read (inputs with their sizes).
  template <class K, typename T>
  static void set_inputs(K& k, const SequenceInputs<T>& in) {
    const int64_t B = in.B, N = in.N, K_ = in.K, NN = N * N;
    k.steps = in.steps;
    k.B = B;
    k.N = N;
    k.K = K_;
    k.L = in.L;
    k.modulation = in.modulation;
    k.clip = in.clip;
    k.clamp = {in.clamp, in.clamp != nullptr ? in.steps * B * N : 0};
    const bool retro = in.modes.rule == Rule::Retroactive;
    const Modulation mod = in.modulation;
    k.elig_rate = {in.elig_rate, retro ? 1 : 0};
    k.h0 = {in.h0, B * N};
    k.hebb0 = {in.hebb0, B * NN};
    k.elig0 = {in.elig0, retro ? B * NN : 0};
    k.w = {in.w, NN};
    k.alpha = {in.alpha, alpha_size(in.modes.alpha, N, N)};
    const int64_t eta_size = in.modes.eta == EtaMode::PerPost ? B * N : NN;
    k.eta_fixed = {in.eta_fixed, mod == Modulation::None ? eta_size : 0};
    k.h2mod_w = {in.h2mod_w, mod != Modulation::None ? K_ * N : 0};
    k.fanout_w = {in.fanout_w, mod == Modulation::Fanout ? N * K_ : 0};
    if constexpr (requires { k.h2mod_b; }) {
      k.h2mod_b = {in.h2mod_b, mod != Modulation::None ? K_ : 0};
      k.fanout_b = {in.fanout_b, mod == Modulation::Fanout ? N : 0};
    }
  }
};

}  // namespace bp
