// The op schemas and the registration of their implementations for a Backend, shared by the
// CPU ops (ops.cpp), the CUDA ops (cuda/ops_cuda.cu) and the emulated CUDA ops
// (cpu/emulated_cuda_ops.cpp, namespace backpropamine_emulated).
#pragma once

#include <torch/library.h>

#include <string>

#include "lstm.h"
#include "primitives.h"
#include "rnn.h"

namespace bp {

#define BP_RNN_PARAMS                                                              \
  "Tensor w, Tensor alpha, Tensor? eta, Tensor? elig_rate, Tensor? h2mod_weight, " \
  "Tensor? h2mod_bias, Tensor? fanout_weight, Tensor? fanout_bias, str rule, float clip"
// "<signature> -> (Tensor, ..., Tensor)": the schema of an op with n outputs.
inline std::string returning(const std::string& signature, int n) {
  std::string schema = signature + " -> (Tensor";
  for (int k = 1; k < n; ++k) schema += ", Tensor";
  return schema + ")";
}

// Every op's schema (the autograd glue and fake implementations are in fused.py).
inline void define_ops(torch::Library& m) {
  m.def("plastic_rnn_sequence(Tensor x, Tensor h0, Tensor hebb0, Tensor? elig0, " BP_RNN_PARAMS
        ", int checkpoint_every, Tensor? clamp=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(returning(
            "plastic_rnn_sequence_backward(Tensor? grad_out, Tensor? grad_hebb, Tensor? grad_elig, "
            "Tensor? grad_m, Tensor h0, Tensor hebb0, Tensor? elig0, " BP_RNN_PARAMS
            ", Tensor out, Tensor m, Tensor eta_seq, Tensor hebb_checkpoints, "
            "Tensor elig_checkpoints, int checkpoint_every, Tensor? clamp=None)",
            12)
            .c_str());
  m.def("plastic_rnn_step(Tensor x, Tensor h, Tensor hebb, Tensor? elig, " BP_RNN_PARAMS
        ", Tensor? clamp=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(returning(
            "plastic_rnn_step_backward(Tensor? grad_h_new, Tensor? grad_hebb, Tensor? grad_elig, "
            "Tensor? grad_m, Tensor h, Tensor hebb, Tensor? elig, " BP_RNN_PARAMS
            ", Tensor h_new, Tensor m, Tensor eta_t, Tensor? clamp=None)",
            12)
            .c_str());
  m.def(
      "plastic_rnn_rollout_step(Tensor x, Tensor? u, Tensor h, Tensor(a!) hebb, "
      "Tensor(b!)? elig, " BP_RNN_PARAMS
      ", Tensor? clamp=None, Tensor(c!)? hebb_out=None, "
      "Tensor(d!)? elig_out=None) -> (Tensor, Tensor, Tensor)");
  m.def(returning(
            "plastic_lstm_sequence(Tensor x, Tensor h0, Tensor c0, Tensor hebb0, Tensor? elig0, "
            "Tensor h2g_weight, Tensor h2g_bias, " BP_RNN_PARAMS ", str modulator_input, "
            "int checkpoint_every, str post_input='g')",
            9)
            .c_str());
  m.def(returning(
            "plastic_lstm_sequence_backward(Tensor? grad_out, Tensor? grad_c, Tensor? grad_hebb, "
            "Tensor? grad_elig, Tensor? grad_m, Tensor h0, Tensor c0, Tensor hebb0, Tensor? elig0, "
            "Tensor h2g_weight, Tensor h2g_bias, " BP_RNN_PARAMS ", str modulator_input, "
            "Tensor out, Tensor c_seq, Tensor m, Tensor eta_seq, Tensor gates, "
            "Tensor hebb_checkpoints, Tensor elig_checkpoints, int checkpoint_every, "
            "str post_input='g')",
            15)
            .c_str());
  m.def(returning("plastic_lstm_step(Tensor x, Tensor h, Tensor c, Tensor hebb, Tensor? elig, "
                  "Tensor h2g_weight, Tensor h2g_bias, " BP_RNN_PARAMS
                  ", str modulator_input, str post_input='g')",
                  7)
            .c_str());
  m.def(returning(
            "plastic_lstm_step_backward(Tensor? grad_h_new, Tensor? grad_c_new, Tensor? grad_hebb, "
            "Tensor? grad_elig, Tensor? grad_m, Tensor h, Tensor c, Tensor hebb, Tensor? elig, "
            "Tensor h2g_weight, Tensor h2g_bias, " BP_RNN_PARAMS ", str modulator_input, "
            "Tensor h_new, Tensor c_new, Tensor m, Tensor eta_t, Tensor gates, "
            "str post_input='g')",
            15)
            .c_str());
  m.def("plastic_matvec(Tensor x, Tensor w, Tensor alpha, Tensor hebb) -> Tensor");
  m.def(
      "plastic_matvec_backward(Tensor grad_u, Tensor x, Tensor w, Tensor alpha, Tensor hebb) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "hebb_update(Tensor hebb, Tensor pre, Tensor post, Tensor eta, Tensor? elig, "
      "Tensor? elig_rate, str rule, float clip) -> (Tensor, Tensor)");
  m.def(
      "hebb_update_backward(Tensor? grad_hebb_new, Tensor? grad_elig_new, Tensor hebb, "
      "Tensor pre, Tensor post, Tensor eta, Tensor? elig, Tensor? elig_rate, str rule, "
      "float clip) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The names of the ops of define_ops, for the kernels that serve them all alike
// (csrc/op_wrappers.cpp).
inline constexpr const char* kOpNames[] = {"plastic_rnn_sequence",
                                           "plastic_rnn_sequence_backward",
                                           "plastic_rnn_step",
                                           "plastic_rnn_step_backward",
                                           "plastic_rnn_rollout_step",
                                           "plastic_lstm_sequence",
                                           "plastic_lstm_sequence_backward",
                                           "plastic_lstm_step",
                                           "plastic_lstm_step_backward",
                                           "plastic_matvec",
                                           "plastic_matvec_backward",
                                           "hebb_update",
                                           "hebb_update_backward"};

template <class Backend>
void impl_ops(torch::Library& m) {
  m.impl("plastic_rnn_sequence", &plastic_rnn_sequence<Backend>);
  m.impl("plastic_rnn_sequence_backward", &plastic_rnn_sequence_backward<Backend>);
  m.impl("plastic_rnn_step", &plastic_rnn_step<Backend>);
  m.impl("plastic_rnn_step_backward", &plastic_rnn_step_backward<Backend>);
  m.impl("plastic_rnn_rollout_step", &plastic_rnn_rollout_step<Backend>);
  m.impl("plastic_lstm_sequence", &plastic_lstm_sequence<Backend>);
  m.impl("plastic_lstm_sequence_backward", &plastic_lstm_sequence_backward<Backend>);
  m.impl("plastic_lstm_step", &plastic_lstm_step<Backend>);
  m.impl("plastic_lstm_step_backward", &plastic_lstm_step_backward<Backend>);
  m.impl("plastic_matvec", &plastic_matvec<Backend>);
  m.impl("plastic_matvec_backward", &plastic_matvec_backward<Backend>);
  m.impl("hebb_update", &hebb_update<Backend>);
  m.impl("hebb_update_backward", &hebb_update_backward<Backend>);
}

}  // namespace bp
