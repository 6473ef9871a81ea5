// Plastic LSTM ops (reference.plastic_lstm_step), for any Backend: the sequence op and the step
// op (the sequence op with T = 1). Only the h -> g path is plastic: the trace half computes
// u_t = h_{t-1} @ (w + A * H_{t-1}) and updates the trace with post = g_t (or u_t, c_t, h_t: the
// post_input option; the modulator reads h_t, c_t or h_{t-1}: modulator_input). Small networks run
// the whole-sequence path (whole_sequence.h, the gates inside the backend's per-sample loop), the
// others step by step (trace_sequence.h), with the gates around the trace passes: the input
// projection of all steps arrives precomputed (x = i2g(input), one GEMM), the recurrent products
// of gates i, f, o are one GEMM per step (h2g, through ATen's BLAS), and the cell's pointwise
// math is one call of the backend per step forward and one backward (lstm_cell.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "../checks.h"
#include "../dispatch.h"
#include "../lstm_cell.h"
#include "../ops.h"
#include "trace_sequence.h"
#include "whole_sequence.h"

namespace bp {

namespace lstm_detail {

// A contiguous tensor's elements as the cell reads (in_span) or writes (out_span) them; an
// undefined tensor is an absent (empty) term.
template <typename T>
kern::Span<const T> in_span(const Tensor& t) {
  if (!t.defined()) return {};
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  return {t.data_ptr<T>(), t.numel()};
}
template <typename T>
kern::Span<T> out_span(const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  return {t.data_ptr<T>(), t.numel()};
}

// The forward's per-step sequences, saved for the backward.
struct LstmSequences {
  const Tensor& out;    // h_t (T, B, N)
  const Tensor& c_seq;  // c_t (T, B, N)
  const Tensor& gates;  // i, f, g, o after their nonlinearities, and u_t for post_input "u"
                        // (T, S, B, N), lstm_gate_slots
};

struct LstmWeights {
  const Tensor& h2g_weight;  // (3N, N), gates i, f, o
  const Tensor& h2g_bias;    // (3N,)
};

// Gradients of the gate parameters and of x, and h_0's through step 1's gates i, f, o, from the
// pre-activation gradients of all steps: g_pre_g (gate g: x_g + u) and g_ifo (gates i, f, o).
inline Tensors<4> gate_grads(const Tensor& h0, const Tensor& out, const LstmWeights& lw,
                             const Tensor& g_pre_g, const Tensor& g_ifo, const Tensor& g_h0_trace,
                             const auto& be) {
  const int64_t T_ = out.size(0), B = out.size(1), N = out.size(2);
  Tensor g_h0 = at::addmm(g_h0_trace, g_ifo.select(0, 0), lw.h2g_weight);
  Tensor g_x = at::cat({g_ifo.narrow(2, 0, 2 * N), g_pre_g, g_ifo.narrow(2, 2 * N, N)}, 2);
  Tensor g_ifo_flat = g_ifo.reshape({T_ * B, 3 * N});
  Tensor g_h2g_w = at::mm(g_ifo_flat.t(), previous_h(h0, out));
  Tensor g_h2g_b = at::empty({3 * N}, out.options());
  sum_all_rows(be, g_ifo_flat, g_h2g_b);
  return {g_x, g_h0, g_h2g_w, g_h2g_b};
}

template <typename T, class Backend>
Tensors<9> sequence_forward(const Backend& be, const LstmConfig& lc, const PlasticInputs& in,
                            const Tensor& x, const Tensor& h0, const Tensor& c0,
                            const LstmWeights& lw, int64_t L, bool whole) {
  const PlasticConfig& c = lc.plastic;
  if constexpr (Backend::kWholeSequence) {
    if (whole) {
      const LstmCellInputs cell{c0, lw.h2g_weight, lw.h2g_bias, lc.options};
      WholeForward f = whole_sequence_forward<T>(be, c, in, x, h0, std::nullopt, &cell, L);
      return {f.out, f.c_seq, f.hebb_T, f.elig_T, f.m, f.eta_seq, f.gates, f.ckpt_h, f.ckpt_e};
    }
  }
  const PlasticParams<T> p(c, in);
  const int64_t N = c.N;
  const auto opts = x.options();
  Tensor out = at::empty({c.T, c.B, N}, opts);
  Tensor c_seq = at::empty({c.T, c.B, N}, opts);
  Tensor gates = at::empty({c.T, lstm_gate_slots(lc.options), c.B, N}, opts);
  Tensor rec = at::empty({c.B, 3 * N}, opts);  // h_{t-1} @ h2g_weight^T, the bias left to the cell
  // The modulator's inputs; for "h_prev" a copy of h_{t-1} made at each step.
  const bool mod_prev = lc.options.modulator == ModulatorInput::HPrev;
  const Tensor mod_in =
      mod_prev ? at::empty({c.T, c.B, N}, opts) : lstm_modulator_inputs(lc.options, h0, out, c_seq);
  auto step = [&](int64_t t, const Tensor& u_partial) {
    const Tensor h_prev = t == 1 ? h0 : out.select(0, t - 2);
    be.template rows_product<T>(h_prev, lw.h2g_weight, Tensor(), rec);
    be.lstm_cell_forward(LstmCellForwardArgs<T>{
        .B = c.B,
        .N = N,
        .post = lc.options.post,
        .x = in_span<T>(x.select(0, t - 1)),
        .rec = in_span<T>(rec),
        .bias = in_span<T>(lw.h2g_bias),
        .u_partial = in_span<T>(u_partial),
        .h_prev = in_span<T>(h_prev),
        .c_prev = in_span<T>(t == 1 ? c0 : c_seq.select(0, t - 2)),
        .gates = out_span<T>(gates.select(0, t - 1)),
        .c = out_span<T>(c_seq.select(0, t - 1)),
        .h = out_span<T>(out.select(0, t - 1)),
        .mod_in = mod_prev ? out_span<T>(mod_in.select(0, t - 1)) : kern::Span<T>{}});
  };
  const Tensor post = lstm_post_sequence(lc.options, out, c_seq, gates);
  TraceForward r = trace_forward<T>(be, c, p, {h0, out, post, mod_in}, L, step);
  return {out, c_seq, r.hebb_T, r.elig_T, r.m, r.eta_seq, gates, r.ckpt_h, r.ckpt_e};
}

template <typename T, class Backend>
Tensors<15> sequence_backward(const Backend& be, const LstmConfig& lc, const PlasticInputs& in,
                              const OptTensor& grad_out, const OptTensor& grad_c,
                              const TraceSaved& saved, const Tensor& h0, const Tensor& c0,
                              const LstmWeights& lw, const LstmSequences& seq, int64_t L,
                              bool whole) {
  const PlasticConfig& c = lc.plastic;
  if constexpr (Backend::kWholeSequence) {
    if (whole) {
      const LstmCellInputs cell{c0, lw.h2g_weight, lw.h2g_bias, lc.options};
      const LstmCellSaved cell_saved{seq.c_seq, seq.gates, grad_c};
      const WholeBackward w = whole_sequence_backward<T>(be, c, in, grad_out, saved, h0, seq.out,
                                                         std::nullopt, &cell, &cell_saved, L);
      const TraceBackward& r = w.r;
      auto [g_x, g_h0, g_h2g_w, g_h2g_b] = gate_grads(h0, seq.out, lw, w.g_x, w.g_ifo, r.g_h0, be);
      return {g_x,       g_h0,    w.g_c0,   r.g_hebb,    r.g_elig,    g_h2g_w,   g_h2g_b,  r.g_w,
              r.g_alpha, r.g_eta, r.g_rate, r.g_h2mod_w, r.g_h2mod_b, r.g_fan_w, r.g_fan_b};
    }
  }
  const PlasticParams<T> p(c, in);
  const int64_t T_ = c.T, B = c.B, N = c.N;
  const auto opts = seq.out.options();
  Tensor g_u = at::empty({T_, B, N}, opts);  // dL/du
  // dL/d(pre-activation of g), x_g's gradient: dL/du but for post_input "u"'s direct term.
  const bool post_u = lc.options.post == PostInput::U;
  const Tensor g_pre_g = post_u ? at::empty_like(g_u) : g_u;
  Tensor g_ifo = at::empty({T_, B, 3 * N}, opts);  // dL/d(pre-activations of i, f, o)
  // dL/dh_s through step s + 1's gates i, f, o: g_ifo_{s+1} @ h2g, as a product with the rows of
  // h2g^T, made contiguous once.
  const Tensor h2g_w_t = T_ > 1 ? lw.h2g_weight.t().contiguous() : Tensor();
  Tensor g_h_gates = at::empty({T_ > 1 ? B : 0, N}, opts);
  Tensor g_c = at::empty({B, N}, opts);   // dL/dc_s, carried down to step s - 1
  Tensor g_c0 = at::empty({B, N}, opts);  // dL/dc_0, from step 1's cell
  // modulator_input "h_prev": dL/dh_{s-1} through step s's modulator, carried down likewise.
  Tensor g_h_prev;
  const ModulatorInput mod_input = lc.options.modulator;

  auto finish = [&](int64_t s, const StepGrads& g) {
    const bool last = s == T_;
    if (!last) be.template rows_product<T>(g_ifo.select(0, s), h2g_w_t, Tensor(), g_h_gates);
    const kern::Span<const T> none{};
    be.lstm_cell_backward(LstmCellBackwardArgs<T>{
        .B = B,
        .N = N,
        .post = lc.options.post,
        .gates = in_span<T>(seq.gates.select(0, s - 1)),
        .f_next = last ? none : in_span<T>(seq.gates.select(0, s).select(0, kGateF)),
        .c = in_span<T>(seq.c_seq.select(0, s - 1)),
        .c_prev = in_span<T>(s == 1 ? c0 : seq.c_seq.select(0, s - 2)),
        .g_h = in_span<T>(g.h),
        .g_h_gates = last ? none : in_span<T>(g_h_gates),
        .grad_out = grad_out.has_value() ? in_span<T>(grad_out->select(0, s - 1)) : none,
        .grad_c = grad_c.has_value() ? in_span<T>(grad_c->select(0, s - 1)) : none,
        .g_h_mod = in_span<T>(mod_input == ModulatorInput::H ? g.mod_in : g_h_prev),
        .g_c_mod = in_span<T>(mod_input == ModulatorInput::C ? g.mod_in : Tensor()),
        .g_post = in_span<T>(g.post),
        .g_c = out_span<T>(g_c),
        .g_pre_g = out_span<T>(g_pre_g.select(0, s - 1)),
        .g_u = post_u ? out_span<T>(g_u.select(0, s - 1)) : kern::Span<T>{},
        .g_ifo = out_span<T>(g_ifo.select(0, s - 1)),
        .g_c0 = s == 1 ? out_span<T>(g_c0) : kern::Span<T>{}});
    if (mod_input == ModulatorInput::HPrev) g_h_prev = g.mod_in;
  };
  const Tensor post = lstm_post_sequence(lc.options, seq.out, seq.c_seq, seq.gates);
  const Tensor mod_in = lstm_modulator_inputs(lc.options, h0, seq.out, seq.c_seq);
  TraceBackward r = trace_backward<T>(be, c, p, {h0, seq.out, post, mod_in}, saved, L, g_u, finish);

  // h_0 also feeds step 1's modulator for "h_prev".
  const Tensor g_h0_trace = g_h_prev.defined() ? r.g_h0 + g_h_prev : r.g_h0;
  auto [g_x, g_h0, g_h2g_w, g_h2g_b] = gate_grads(h0, seq.out, lw, g_pre_g, g_ifo, g_h0_trace, be);
  return {g_x,       g_h0,    g_c0,     r.g_hebb,    r.g_elig,    g_h2g_w,   g_h2g_b,  r.g_w,
          r.g_alpha, r.g_eta, r.g_rate, r.g_h2mod_w, r.g_h2mod_b, r.g_fan_w, r.g_fan_b};
}

}  // namespace lstm_detail

template <class Backend>
Tensors<9> plastic_lstm_sequence(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                 const Tensor& hebb0, const OptTensor& elig0,
                                 const Tensor& h2g_weight, const Tensor& h2g_bias, const Tensor& w,
                                 const Tensor& alpha, const OptTensor& eta,
                                 const OptTensor& elig_rate, const OptTensor& h2mod_weight,
                                 const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
                                 const OptTensor& fanout_bias, const std::string& rule, double clip,
                                 const std::string& modulator_input, int64_t checkpoint_every,
                                 const std::string& post_input) {
  const char* op = "plastic_lstm_sequence";
  const c10::DeviceGuard guard(x.device());
  const PlasticInputs in{hebb0,     elig0,        w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const LstmConfig lc = check_lstm_inputs(op, x, 4, h0, c0, h2g_weight, h2g_bias, in, rule, clip,
                                          modulator_input, post_input, true);
  check_checkpoint_every(op, checkpoint_every);
  const Backend be(x.options());
  const bool whole = takes_whole_sequence(be, Cell::Lstm, lc.plastic, x);
  return dispatch_float(x, op, [&]<typename T>() {
    return lstm_detail::sequence_forward<T>(be, lc, in, x, h0, c0, {h2g_weight, h2g_bias},
                                            checkpoint_every, whole);
  });
}

template <class Backend>
Tensors<15> plastic_lstm_sequence_backward(
    const OptTensor& grad_out, const OptTensor& grad_c, const OptTensor& grad_hebb,
    const OptTensor& grad_elig, const OptTensor& grad_m, const Tensor& h0, const Tensor& c0,
    const Tensor& hebb0, const OptTensor& elig0, const Tensor& h2g_weight, const Tensor& h2g_bias,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip,
    const std::string& modulator_input, const Tensor& out, const Tensor& c_seq, const Tensor& m,
    const Tensor& eta_seq, const Tensor& gates, const Tensor& hebb_checkpoints,
    const Tensor& elig_checkpoints, int64_t checkpoint_every, const std::string& post_input) {
  const char* op = "plastic_lstm_sequence_backward";
  const c10::DeviceGuard guard(h0.device());
  const PlasticInputs in{hebb0,     elig0,        w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const LstmConfig lc = check_lstm_inputs(op, out, 1, h0, c0, h2g_weight, h2g_bias, in, rule, clip,
                                          modulator_input, post_input, true, "out");
  const PlasticConfig& c = lc.plastic;
  check_recurrent_backward(op, c, out,
                           {true,
                            {{"grad_out", grad_out}, {"grad_c", grad_c}},
                            grad_hebb,
                            grad_elig,
                            grad_m,
                            {{"c_seq", c_seq}},
                            &gates,
                            lstm_gate_slots(lc.options),
                            {"m", m},
                            {"eta_seq", eta_seq},
                            &hebb_checkpoints,
                            &elig_checkpoints,
                            checkpoint_every});
  const TraceSaved saved{m,         eta_seq, hebb_checkpoints, elig_checkpoints, grad_hebb,
                         grad_elig, grad_m};
  const Backend be(out.options());
  const bool whole = takes_whole_sequence(be, Cell::Lstm, c, out);
  return dispatch_float(out, op, [&]<typename T>() {
    return lstm_detail::sequence_backward<T>(be, lc, in, grad_out, grad_c, saved, h0, c0,
                                             {h2g_weight, h2g_bias}, {out, c_seq, gates},
                                             checkpoint_every, whole);
  });
}

template <class Backend>
Tensors<7> plastic_lstm_step(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& hebb,
                             const OptTensor& elig, const Tensor& h2g_weight,
                             const Tensor& h2g_bias, const Tensor& w, const Tensor& alpha,
                             const OptTensor& eta, const OptTensor& elig_rate,
                             const OptTensor& h2mod_weight, const OptTensor& h2mod_bias,
                             const OptTensor& fanout_weight, const OptTensor& fanout_bias,
                             const std::string& rule, double clip,
                             const std::string& modulator_input, const std::string& post_input) {
  const char* op = "plastic_lstm_step";
  const c10::DeviceGuard guard(x.device());
  const PlasticInputs in{hebb,      elig,         w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const LstmConfig lc = check_lstm_inputs(op, x, 4, h, c, h2g_weight, h2g_bias, in, rule, clip,
                                          modulator_input, post_input, false);
  const Backend be(x.options());
  const bool whole = takes_whole_sequence(be, Cell::Lstm, lc.plastic, x);
  auto [out, c_seq, hebb_new, elig_new, m, eta_seq, gates, ckpt_h, ckpt_e] =
      dispatch_float(x, op, [&]<typename T>() {
        return lstm_detail::sequence_forward<T>(be, lc, in, x.unsqueeze(0), h, c,
                                                {h2g_weight, h2g_bias}, 1, whole);
      });
  // eta_t (B, N) is kept for the backward only when the rate is computed by the modulator.
  Tensor eta_t = eta_seq.numel() > 0 ? eta_seq.squeeze(0) : at::empty({0}, x.options());
  return {out.squeeze(0), c_seq.squeeze(0), hebb_new, elig_new, m.squeeze(0),
          eta_t,          gates.squeeze(0)};
}

template <class Backend>
Tensors<15> plastic_lstm_step_backward(
    const OptTensor& grad_h_new, const OptTensor& grad_c_new, const OptTensor& grad_hebb,
    const OptTensor& grad_elig, const OptTensor& grad_m, const Tensor& h, const Tensor& c,
    const Tensor& hebb, const OptTensor& elig, const Tensor& h2g_weight, const Tensor& h2g_bias,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip,
    const std::string& modulator_input, const Tensor& h_new, const Tensor& c_new, const Tensor& m,
    const Tensor& eta_t, const Tensor& gates, const std::string& post_input) {
  const char* op = "plastic_lstm_step_backward";
  const c10::DeviceGuard guard(h.device());
  const PlasticInputs in{hebb,      elig,         w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const LstmConfig lc = check_lstm_inputs(op, h_new, 1, h, c, h2g_weight, h2g_bias, in, rule, clip,
                                          modulator_input, post_input, false, "h_new");
  const PlasticConfig& pc = lc.plastic;
  check_recurrent_backward(op, pc, h_new,
                           {false,
                            {{"grad_h_new", grad_h_new}, {"grad_c_new", grad_c_new}},
                            grad_hebb,
                            grad_elig,
                            grad_m,
                            {{"c_new", c_new}},
                            &gates,
                            lstm_gate_slots(lc.options),
                            {"m", m},
                            {"eta_t", eta_t},
                            nullptr,
                            nullptr,
                            0});
  const Tensor out = h_new.unsqueeze(0), c_seq = c_new.unsqueeze(0), m_seq = m.unsqueeze(0);
  const Tensor gates_seq = gates.unsqueeze(0);
  const OptTensor g_out = unsqueeze0(grad_h_new), g_c = unsqueeze0(grad_c_new),
                  g_m = unsqueeze0(grad_m);
  const Tensor no_ckpt = at::empty({0, pc.B, pc.N, pc.N}, h_new.options());
  const Tensor eta_seq = eta_t.numel() > 0 ? eta_t.unsqueeze(0) : eta_t;
  const TraceSaved saved{m_seq, eta_seq, no_ckpt, no_ckpt, grad_hebb, grad_elig, g_m};
  const Backend be(h_new.options());
  const bool whole = takes_whole_sequence(be, Cell::Lstm, pc, h_new);
  auto grads = dispatch_float(h_new, op, [&]<typename T>() {
    return lstm_detail::sequence_backward<T>(be, lc, in, g_out, g_c, saved, h, c,
                                             {h2g_weight, h2g_bias}, {out, c_seq, gates_seq}, 1,
                                             whole);
  });
  std::get<0>(grads) = std::get<0>(grads).squeeze(0);
  return grads;
}

}  // namespace bp
