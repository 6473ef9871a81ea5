// Plastic tanh RNN ops, for any Backend (the device's trace passes): the sequence op and the
// step op (the sequence op with T = 1). Small networks run the whole-sequence path
// (whole_sequence.h), the others step by step: the trace passes, checkpoints and
// plastic-parameter gradients of that path are in trace_sequence.h, and this file adds the cell:
// h_t = tanh(x_t + u_t), the trace's post-synaptic term and the modulator's input both being
// h_t. Where the optional bool mask `clamp` is set, h_t = x_t instead (input neurons pinned to
// their input).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "../checks.h"
#include "../dispatch.h"
#include "../ops.h"
#include "trace_sequence.h"
#include "whole_sequence.h"

namespace bp {

namespace rnn_detail {

// The cell: h = tanh(x + u), or x where `clamp` is set. h may be a step of the output sequence.
inline void cell_forward(Tensor& h, const Tensor& x, const Tensor& u, const OptTensor& clamp) {
  at::add_out(h, x, u).tanh_();
  if (clamp.has_value()) h.copy_(at::where(*clamp, x, h));
}

template <typename T, class Backend>
Tensors<7> sequence_forward(const Backend& be, const PlasticConfig& c, const PlasticInputs& in,
                            const Tensor& x, const Tensor& h0, const OptTensor& clamp, int64_t L,
                            bool whole) {
  if constexpr (Backend::kWholeSequence) {
    if (whole) {
      WholeForward f = whole_sequence_forward<T>(be, c, in, x, h0, clamp, nullptr, L);
      return {f.out, f.hebb_T, f.elig_T, f.m, f.eta_seq, f.ckpt_h, f.ckpt_e};
    }
  }
  const PlasticParams<T> p(c, in);
  Tensor out = at::empty({c.T, c.B, c.N}, x.options());
  Tensor u = at::empty({c.B, c.N}, x.options());
  auto step = [&](int64_t t, const Tensor& u_partial) {
    sum_all_rows(be, u_partial, u);
    Tensor h_t = out.select(0, t - 1);
    cell_forward(h_t, x.select(0, t - 1), u,
                 clamp.has_value() ? OptTensor(clamp->select(0, t - 1)) : std::nullopt);
  };
  auto r = trace_forward<T>(be, c, p, {h0, out, out, out}, L, step);
  return {out, r.hebb_T, r.elig_T, r.m, r.eta_seq, r.ckpt_h, r.ckpt_e};
}

template <typename T, class Backend>
Tensors<12> sequence_backward(const Backend& be, const PlasticConfig& c, const PlasticInputs& in,
                              const OptTensor& grad_out, const TraceSaved& saved, const Tensor& h0,
                              const Tensor& out, const OptTensor& clamp, int64_t L, bool whole) {
  if constexpr (Backend::kWholeSequence) {
    if (whole) {
      const WholeBackward w = whole_sequence_backward<T>(be, c, in, grad_out, saved, h0, out, clamp,
                                                         nullptr, nullptr, L);
      const TraceBackward& r = w.r;
      return {w.g_x,   r.g_h0,   r.g_hebb,    r.g_elig,    r.g_w,     r.g_alpha,
              r.g_eta, r.g_rate, r.g_h2mod_w, r.g_h2mod_b, r.g_fan_w, r.g_fan_b};
    }
  }
  const PlasticParams<T> p(c, in);
  Tensor g_u = at::empty({c.T, c.B, c.N}, out.options());  // dL/du_t
  // dL/dx_t is dL/du_t, except on clamped neurons: there h_t = x_t and u_t is not used.
  Tensor g_x = clamp.has_value() ? at::empty_like(g_u) : g_u;
  // dL/dh_s from every path, then through the tanh (or the clamp).
  auto finish = [&](int64_t s, const StepGrads& g) {
    Tensor g_h = g.post + g.h;
    if (grad_out.has_value()) g_h.add_(grad_out->select(0, s - 1));
    if (g.mod_in.defined()) g_h.add_(g.mod_in);
    const Tensor h = out.select(0, s - 1);
    Tensor g_u_s = g_u.select(0, s - 1);
    at::mul_out(g_u_s, g_h, 1 - h * h);
    if (clamp.has_value()) {
      const Tensor clamp_s = clamp->select(0, s - 1);
      g_u_s.masked_fill_(clamp_s, 0);
      g_x.select(0, s - 1).copy_(at::where(clamp_s, g_h, g_u_s));
    }
  };
  TraceBackward r = trace_backward<T>(be, c, p, {h0, out, out, out}, saved, L, g_u, finish);
  return {g_x,     r.g_h0,   r.g_hebb,    r.g_elig,    r.g_w,     r.g_alpha,
          r.g_eta, r.g_rate, r.g_h2mod_w, r.g_h2mod_b, r.g_fan_w, r.g_fan_b};
}

// One step with the trace (and eligibility trace) updated, in place or into hebb_out (and
// elig_out), and the next step's drive u_{t+1} = h_t @ (w + A * H_t) computed in the same sweep:
// (h_t, u_{t+1}, m_t). `u` is u_t from the previous call; without it a matvec pass computes it
// from h and hebb.
template <typename T, class Backend>
Tensors<3> rollout_step(const Backend& be, const PlasticConfig& c, const PlasticParams<T>& p,
                        const Tensor& x, const OptTensor& u, const Tensor& h,
                        const OptTensor& clamp, const OptTensor& hebb_out,
                        const OptTensor& elig_out) {
  const int64_t B = c.B, N = c.N;
  const PlasticInputs& a = p.in;
  const auto opts = x.options();
  const auto tl = be.tiling(B, N, N);
  ForwardPassParams<T> fp{};
  set_recurrent_layer(fp, B, N, p.w, p.alpha, p.rule_args);
  fp.hebb = a.hebb.data_ptr<T>();
  Tensor u_t = u.has_value() ? *u : at::empty({B, N}, opts);
  if (!u.has_value()) {
    fp.update = false;
    fp.matvec = true;
    fp.matvec_in = h.data_ptr<T>();
    fp.u = u_t.data_ptr<T>();
    be.forward(fp, c.modes, tl);
  }
  Tensor h_new = at::empty({B, N}, opts);
  cell_forward(h_new, x, u_t, clamp);
  Tensor m = at::empty({B, c.K}, opts);
  Tensor eta_t = fixed_rate(c, a.eta);
  if (c.modulation != Modulation::None) {
    eta_t = at::empty({B, N}, opts);
    modulate(c, a, h_new, m, eta_t);
  }
  Tensor u_next = at::empty({B, N}, opts);
  fp.update = true;
  fp.matvec = true;
  // In place or not, the pass reads each element before it writes it.
  fp.hebb_out = (hebb_out.has_value() ? *hebb_out : a.hebb).data_ptr<T>();
  const OptTensor& new_elig = elig_out.has_value() ? elig_out : a.elig;
  fp.elig = a.elig.has_value() ? a.elig->data_ptr<T>() : nullptr;
  fp.elig_out = new_elig.has_value() ? new_elig->data_ptr<T>() : nullptr;
  fp.pre = h.data_ptr<T>();
  fp.post = h_new.data_ptr<T>();
  fp.eta = eta_t.data_ptr<T>();
  fp.matvec_in = h_new.data_ptr<T>();
  fp.u = u_next.data_ptr<T>();
  be.forward(fp, c.modes, tl);
  return {h_new, u_next, m};
}

}  // namespace rnn_detail

template <class Backend>
Tensors<7> plastic_rnn_sequence(const Tensor& x, const Tensor& h0, const Tensor& hebb0,
                                const OptTensor& elig0, const Tensor& w, const Tensor& alpha,
                                const OptTensor& eta, const OptTensor& elig_rate,
                                const OptTensor& h2mod_weight, const OptTensor& h2mod_bias,
                                const OptTensor& fanout_weight, const OptTensor& fanout_bias,
                                const std::string& rule, double clip, int64_t checkpoint_every,
                                const OptTensor& clamp) {
  const char* op = "plastic_rnn_sequence";
  const c10::DeviceGuard guard(x.device());
  const PlasticInputs in{hebb0,     elig0,        w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const PlasticConfig c = check_rnn_inputs(op, x, h0, in, rule, clip, true);
  check_checkpoint_every(op, checkpoint_every);
  check_clamp(op, clamp, x);
  const Backend be(x.options());
  const bool whole = takes_whole_sequence(be, Cell::Tanh, c, x);
  return dispatch_float(x, op, [&]<typename T>() {
    return rnn_detail::sequence_forward<T>(be, c, in, x, h0, clamp, checkpoint_every, whole);
  });
}

template <class Backend>
Tensors<12> plastic_rnn_sequence_backward(
    const OptTensor& grad_out, const OptTensor& grad_hebb, const OptTensor& grad_elig,
    const OptTensor& grad_m, const Tensor& h0, const Tensor& hebb0, const OptTensor& elig0,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip, const Tensor& out,
    const Tensor& m, const Tensor& eta_seq, const Tensor& hebb_checkpoints,
    const Tensor& elig_checkpoints, int64_t checkpoint_every, const OptTensor& clamp) {
  const char* op = "plastic_rnn_sequence_backward";
  const c10::DeviceGuard guard(h0.device());
  const PlasticInputs in{hebb0,     elig0,        w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const PlasticConfig c = check_rnn_inputs(op, out, h0, in, rule, clip, true, "out");
  check_clamp(op, clamp, out);
  check_recurrent_backward(op, c, out,
                           {true,
                            {{"grad_out", grad_out}},
                            grad_hebb,
                            grad_elig,
                            grad_m,
                            {},
                            nullptr,
                            0,
                            {"m", m},
                            {"eta_seq", eta_seq},
                            &hebb_checkpoints,
                            &elig_checkpoints,
                            checkpoint_every});
  const TraceSaved saved{m,         eta_seq, hebb_checkpoints, elig_checkpoints, grad_hebb,
                         grad_elig, grad_m};
  const Backend be(out.options());
  const bool whole = takes_whole_sequence(be, Cell::Tanh, c, out);
  return dispatch_float(out, op, [&]<typename T>() {
    return rnn_detail::sequence_backward<T>(be, c, in, grad_out, saved, h0, out, clamp,
                                            checkpoint_every, whole);
  });
}

template <class Backend>
Tensors<5> plastic_rnn_step(const Tensor& x, const Tensor& h, const Tensor& hebb,
                            const OptTensor& elig, const Tensor& w, const Tensor& alpha,
                            const OptTensor& eta, const OptTensor& elig_rate,
                            const OptTensor& h2mod_weight, const OptTensor& h2mod_bias,
                            const OptTensor& fanout_weight, const OptTensor& fanout_bias,
                            const std::string& rule, double clip, const OptTensor& clamp) {
  const char* op = "plastic_rnn_step";
  const c10::DeviceGuard guard(x.device());
  const PlasticInputs in{hebb,      elig,         w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const PlasticConfig c = check_rnn_inputs(op, x, h, in, rule, clip, false);
  check_clamp(op, clamp, x);
  const Backend be(x.options());
  const bool whole = takes_whole_sequence(be, Cell::Tanh, c, x);
  auto [out, hebb_new, elig_new, m, eta_seq, ckpt_h, ckpt_e] =
      dispatch_float(x, op, [&]<typename T>() {
        return rnn_detail::sequence_forward<T>(be, c, in, x.unsqueeze(0), h, unsqueeze0(clamp), 1,
                                               whole);
      });
  // eta_t (B, N) is kept for the backward only when the rate is computed by the modulator.
  Tensor eta_t = eta_seq.numel() > 0 ? eta_seq.squeeze(0) : at::empty({0}, x.options());
  return {out.squeeze(0), hebb_new, elig_new, m.squeeze(0), eta_t};
}

template <class Backend>
Tensors<12> plastic_rnn_step_backward(const OptTensor& grad_h_new, const OptTensor& grad_hebb,
                                      const OptTensor& grad_elig, const OptTensor& grad_m,
                                      const Tensor& h, const Tensor& hebb, const OptTensor& elig,
                                      const Tensor& w, const Tensor& alpha, const OptTensor& eta,
                                      const OptTensor& elig_rate, const OptTensor& h2mod_weight,
                                      const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
                                      const OptTensor& fanout_bias, const std::string& rule,
                                      double clip, const Tensor& h_new, const Tensor& m,
                                      const Tensor& eta_t, const OptTensor& clamp) {
  const char* op = "plastic_rnn_step_backward";
  const c10::DeviceGuard guard(h.device());
  const PlasticInputs in{hebb,      elig,         w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const PlasticConfig c = check_rnn_inputs(op, h_new, h, in, rule, clip, false, "h_new");
  check_clamp(op, clamp, h_new);
  check_recurrent_backward(op, c, h_new,
                           {false,
                            {{"grad_h_new", grad_h_new}},
                            grad_hebb,
                            grad_elig,
                            grad_m,
                            {},
                            nullptr,
                            0,
                            {"m", m},
                            {"eta_t", eta_t},
                            nullptr,
                            nullptr,
                            0});
  const int64_t B = c.B, N = c.N;
  const Tensor no_ckpt = at::empty({0, B, N, N}, h_new.options());
  const Tensor eta_seq = eta_t.numel() > 0 ? eta_t.unsqueeze(0) : eta_t;
  const Tensor m_seq = m.unsqueeze(0);
  const OptTensor grad_m_seq = unsqueeze0(grad_m);
  const TraceSaved saved{m_seq, eta_seq, no_ckpt, no_ckpt, grad_hebb, grad_elig, grad_m_seq};
  const Backend be(h_new.options());
  const bool whole = takes_whole_sequence(be, Cell::Tanh, c, h_new);
  auto grads = dispatch_float(h_new, op, [&]<typename T>() {
    return rnn_detail::sequence_backward<T>(be, c, in, unsqueeze0(grad_h_new), saved, h,
                                            h_new.unsqueeze(0), unsqueeze0(clamp), 1, whole);
  });
  std::get<0>(grads) = std::get<0>(grads).squeeze(0);
  return grads;
}

// The rollout step: plastic_rnn_step for acting without gradients (RL rollouts), with `hebb` and
// `elig` updated in place (or written to hebb_out and elig_out, e.g. a recording's checkpoint)
// and the next step's drive carried from call to call, so that a loop of these steps sweeps the
// trace once per step, as the sequence op does (the step op sweeps it twice and allocates new
// traces). No autograd.
template <class Backend>
Tensors<3> plastic_rnn_rollout_step(const Tensor& x, const OptTensor& u, const Tensor& h,
                                    const Tensor& hebb, const OptTensor& elig, const Tensor& w,
                                    const Tensor& alpha, const OptTensor& eta,
                                    const OptTensor& elig_rate, const OptTensor& h2mod_weight,
                                    const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
                                    const OptTensor& fanout_bias, const std::string& rule,
                                    double clip, const OptTensor& clamp, const OptTensor& hebb_out,
                                    const OptTensor& elig_out) {
  const char* op = "plastic_rnn_rollout_step";
  const c10::DeviceGuard guard(x.device());
  const PlasticInputs in{hebb,      elig,         w,          alpha,         eta,
                         elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias};
  const PlasticConfig c = check_rnn_inputs(op, x, h, in, rule, clip, false);
  check_clamp(op, clamp, x);
  check_drive(op, u, x);
  check_trace_outputs(op, hebb_out, elig_out, hebb, elig,
                      {{"x", x}, {"h", h}, {"w", w}, {"alpha", alpha}});
  return dispatch_float(x, op, [&]<typename T>() {
    return rnn_detail::rollout_step<T>(Backend(x.options()), c, PlasticParams<T>(c, in), x, u, h,
                                       clamp, hebb_out, elig_out);
  });
}

}  // namespace bp
