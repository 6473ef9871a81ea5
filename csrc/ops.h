// Backend implementations behind the schemas of ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace bp {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

namespace detail {
template <size_t... I>
auto tensor_tuple(std::index_sequence<I...>) -> std::tuple<std::enable_if_t<(I, true), Tensor>...>;
}
// std::tuple of n Tensors: the return type of an op with n outputs.
template <size_t n>
using Tensors = decltype(detail::tensor_tuple(std::make_index_sequence<n>{}));

// plastic_rnn_sequence -> (out, hebb_T, elig_T, m, eta_seq, hebb_checkpoints, elig_checkpoints)
Tensors<7> plastic_rnn_sequence_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& hebb0, const OptTensor& elig0,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip, int64_t checkpoint_every);

// -> (grad x, h0, hebb0, elig0, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias,
//     fanout_weight, fanout_bias); gradients of absent inputs are empty tensors.
Tensors<12> plastic_rnn_sequence_backward_cpu(
    const OptTensor& grad_out, const OptTensor& grad_hebb, const OptTensor& grad_elig,
    const OptTensor& grad_m, const Tensor& h0, const Tensor& hebb0, const OptTensor& elig0,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip, const Tensor& out,
    const Tensor& m, const Tensor& eta_seq, const Tensor& hebb_checkpoints,
    const Tensor& elig_checkpoints, int64_t checkpoint_every);

// plastic_rnn_step -> (h_new, hebb_new, elig_new, m, eta_t)
Tensors<5> plastic_rnn_step_cpu(
    const Tensor& x, const Tensor& h, const Tensor& hebb, const OptTensor& elig, const Tensor& w,
    const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip);

Tensors<12> plastic_rnn_step_backward_cpu(
    const OptTensor& grad_h_new, const OptTensor& grad_hebb, const OptTensor& grad_elig,
    const OptTensor& grad_m, const Tensor& h, const Tensor& hebb, const OptTensor& elig,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip, const Tensor& h_new,
    const Tensor& m, const Tensor& eta_t);

// plastic_lstm_sequence -> (out, c_seq, hebb_T, elig_T, m, eta_seq, gates (T, 4, B, N),
//                           hebb_checkpoints, elig_checkpoints)
Tensors<9> plastic_lstm_sequence_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& hebb0,
    const OptTensor& elig0, const Tensor& h2g_weight, const Tensor& h2g_bias, const Tensor& w,
    const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip,
    const std::string& modulator_input, int64_t checkpoint_every);

// -> (grad x, h0, c0, hebb0, elig0, h2g_weight, h2g_bias, w, alpha, eta, elig_rate,
//     h2mod_weight, h2mod_bias, fanout_weight, fanout_bias); empty tensors for absent inputs.
Tensors<15> plastic_lstm_sequence_backward_cpu(
    const OptTensor& grad_out, const OptTensor& grad_c, const OptTensor& grad_hebb,
    const OptTensor& grad_elig, const OptTensor& grad_m, const Tensor& h0, const Tensor& c0,
    const Tensor& hebb0, const OptTensor& elig0, const Tensor& h2g_weight, const Tensor& h2g_bias,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip,
    const std::string& modulator_input, const Tensor& out, const Tensor& c_seq, const Tensor& m,
    const Tensor& eta_seq, const Tensor& gates, const Tensor& hebb_checkpoints,
    const Tensor& elig_checkpoints, int64_t checkpoint_every);

// plastic_lstm_step -> (h_new, c_new, hebb_new, elig_new, m, eta_t, gates (4, B, N))
Tensors<7> plastic_lstm_step_cpu(
    const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& hebb, const OptTensor& elig,
    const Tensor& h2g_weight, const Tensor& h2g_bias, const Tensor& w, const Tensor& alpha,
    const OptTensor& eta, const OptTensor& elig_rate, const OptTensor& h2mod_weight,
    const OptTensor& h2mod_bias, const OptTensor& fanout_weight, const OptTensor& fanout_bias,
    const std::string& rule, double clip, const std::string& modulator_input);

Tensors<15> plastic_lstm_step_backward_cpu(
    const OptTensor& grad_h_new, const OptTensor& grad_c_new, const OptTensor& grad_hebb,
    const OptTensor& grad_elig, const OptTensor& grad_m, const Tensor& h, const Tensor& c,
    const Tensor& hebb, const OptTensor& elig, const Tensor& h2g_weight, const Tensor& h2g_bias,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip,
    const std::string& modulator_input, const Tensor& h_new, const Tensor& c_new,
    const Tensor& m, const Tensor& eta_t, const Tensor& gates);

Tensor plastic_matvec_cpu(const Tensor& x, const Tensor& w, const Tensor& alpha,
                          const Tensor& hebb);

// -> (grad x, w, alpha, hebb)
Tensors<4> plastic_matvec_backward_cpu(const Tensor& grad_u, const Tensor& x,
                                                const Tensor& w, const Tensor& alpha,
                                                const Tensor& hebb);

// -> (hebb_new, elig_new); elig_new is empty unless rule == "retroactive"
Tensors<2> hebb_update_cpu(const Tensor& hebb, const Tensor& pre, const Tensor& post,
                                    const Tensor& eta, const OptTensor& elig,
                                    const OptTensor& elig_rate, const std::string& rule,
                                    double clip);

// -> (grad hebb, pre, post, eta, elig, elig_rate)
Tensors<6> hebb_update_backward_cpu(const OptTensor& grad_hebb_new,
                                             const OptTensor& grad_elig_new, const Tensor& hebb,
                                             const Tensor& pre, const Tensor& post,
                                             const Tensor& eta, const OptTensor& elig,
                                             const OptTensor& elig_rate, const std::string& rule,
                                             double clip);

}  // namespace bp
