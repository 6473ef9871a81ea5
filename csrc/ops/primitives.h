// The plastic feed-forward primitives (docs/design.md, 'Feed-forward primitives'): one matvec
// pass and one update pass, and their adjoints, for any Backend.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "../checks.h"
#include "../dispatch.h"
#include "../ops.h"
#include "../trace_pass.h"
#include "trace_sequence.h"

namespace bp {

template <class Backend>
Tensor plastic_matvec(const Tensor& x, const Tensor& w, const Tensor& alpha, const Tensor& hebb) {
  const char* op = "plastic_matvec";
  const c10::DeviceGuard guard(x.device());
  const AlphaMode am = check_matvec_inputs(op, x, w, alpha, hebb);
  const int64_t B = x.size(0), P = x.size(1), N = w.size(1);
  Tensor u = at::empty({B, N}, x.options());
  const Backend be(x.options());
  dispatch_float(x, op, [&]<typename T>() {
    ForwardPassParams<T> fp{};
    fp.B = B;
    fp.P = P;
    fp.N = N;
    fp.matvec = true;
    fp.hebb = hebb.data_ptr<T>();
    fp.matvec_in = x.data_ptr<T>();
    fp.w = w.data_ptr<T>();
    fp.alpha = alpha.data_ptr<T>();
    fp.u = u.data_ptr<T>();
    be.forward(fp, {Rule::Clip, am, EtaMode::PerPost}, be.tiling(B, P, N));
  });
  return u;
}

template <class Backend>
Tensors<4> plastic_matvec_backward(const Tensor& grad_u, const Tensor& x, const Tensor& w,
                                   const Tensor& alpha, const Tensor& hebb) {
  const char* op = "plastic_matvec_backward";
  const c10::DeviceGuard guard(x.device());
  const AlphaMode am = check_matvec_backward_inputs(op, grad_u, x, w, alpha, hebb);
  const int64_t B = x.size(0), P = x.size(1), N = w.size(1);
  const Backend be(x.options());
  const auto tl = be.tiling(B, P, N);
  Tensor g_hebb = at::zeros_like(hebb);
  Tensor g_x_part = at::empty({be.column_tiles(tl), B, P}, x.options());
  Tensor g_alpha_acc = at::zeros({be.alpha_acc_size(am, tl, P, N)}, x.options());
  Tensor g_x = at::empty({B, P}, x.options());
  Tensor g_alpha = at::empty(alpha.sizes(), x.options());
  dispatch_float(x, op, [&]<typename T>() {
    BackwardPassParams<T> p{};
    p.B = B;
    p.P = P;
    p.N = N;
    p.do_b = true;
    p.g_hebb = g_hebb.data_ptr<T>();
    p.g_u = grad_u.data_ptr<T>();
    p.b_in = x.data_ptr<T>();
    p.b_hebb = hebb.data_ptr<T>();
    p.w = w.data_ptr<T>();
    p.alpha = alpha.data_ptr<T>();
    p.g_in_partial = g_x_part.data_ptr<T>();
    p.g_alpha_acc = g_alpha_acc.data_ptr<T>();
    be.backward(p, {Rule::Clip, am, EtaMode::PerPost}, tl);
    be.sum_rows(g_x_part.data_ptr<T>(), be.column_tiles(tl), B * P, g_x.data_ptr<T>());
    sum_all_rows(be, g_alpha_acc, g_alpha);
  });
  return {g_x, at::mm(x.t(), grad_u), g_alpha, g_hebb};
}

template <class Backend>
Tensors<2> hebb_update(const Tensor& hebb, const Tensor& pre, const Tensor& post, const Tensor& eta,
                       const OptTensor& elig, const OptTensor& elig_rate, const std::string& rule,
                       double clip) {
  const char* op = "hebb_update";
  const c10::DeviceGuard guard(hebb.device());
  const PassModes modes =
      check_hebb_update_inputs(op, hebb, pre, post, eta, elig, elig_rate, rule, clip);
  const bool retro = modes.rule == Rule::Retroactive;
  Tensor hebb_new = at::empty_like(hebb);
  Tensor elig_new = retro ? at::empty_like(hebb) : at::empty({0}, hebb.options());
  dispatch_float(hebb, op, [&]<typename T>() {
    ForwardPassParams<T> fp{};
    fp.B = hebb.size(0);
    fp.P = hebb.size(1);
    fp.N = hebb.size(2);
    fp.update = true;
    fp.hebb = hebb.data_ptr<T>();
    fp.hebb_out = hebb_new.data_ptr<T>();
    fp.elig = retro ? elig->data_ptr<T>() : nullptr;
    fp.elig_out = retro ? elig_new.data_ptr<T>() : nullptr;
    fp.pre = pre.data_ptr<T>();
    fp.post = post.data_ptr<T>();
    fp.eta = eta.data_ptr<T>();
    fp.rule_args = {static_cast<T>(clip), retro ? elig_rate->data_ptr<T>() : nullptr};
    const Backend be(hebb.options());
    be.forward(fp, modes, be.tiling(fp.B, fp.P, fp.N));
  });
  return {hebb_new, elig_new};
}

template <class Backend>
Tensors<6> hebb_update_backward(const OptTensor& grad_hebb_new, const OptTensor& grad_elig_new,
                                const Tensor& hebb, const Tensor& pre, const Tensor& post,
                                const Tensor& eta, const OptTensor& elig,
                                const OptTensor& elig_rate, const std::string& rule, double clip) {
  const char* op = "hebb_update_backward";
  const c10::DeviceGuard guard(hebb.device());
  const PassModes modes = check_hebb_update_backward_inputs(
      op, grad_hebb_new, grad_elig_new, hebb, pre, post, eta, elig, elig_rate, rule, clip);
  const bool retro = modes.rule == Rule::Retroactive;
  const bool eta_conn = modes.eta == EtaMode::PerConnection;
  const int64_t B = hebb.size(0), P = hebb.size(1), N = hebb.size(2);
  const Backend be(hebb.options());
  const auto tl = be.tiling(B, P, N);
  const auto opts = hebb.options();
  Tensor g_hebb = grad_hebb_new.has_value() ? grad_hebb_new->clone() : at::zeros_like(hebb);
  Tensor g_elig = !retro                      ? at::empty({0}, opts)
                  : grad_elig_new.has_value() ? grad_elig_new->clone()
                                              : at::zeros_like(hebb);
  Tensor g_pre_part = at::empty({be.column_tiles(tl), B, P}, opts);
  Tensor g_post = at::empty({B, N}, opts);
  Tensor g_eta_acc =
      eta_conn ? at::zeros({be.eta_acc_rows(tl), P, N}, opts) : at::empty({B, N}, opts);
  Tensor g_rate_acc = at::zeros({be.rate_acc_size(tl)}, opts);
  Tensor g_pre = at::empty({B, P}, opts);
  Tensor g_eta = eta_conn ? at::empty({1, P, N}, opts) : g_eta_acc.view({B, 1, N});
  Tensor g_rate = retro ? at::empty({}, opts) : at::empty({0}, opts);
  dispatch_float(hebb, op, [&]<typename T>() {
    BackwardPassParams<T> p{};
    p.B = B;
    p.P = P;
    p.N = N;
    p.do_a = true;
    p.g_hebb = g_hebb.data_ptr<T>();
    p.g_elig = retro ? g_elig.data_ptr<T>() : nullptr;
    p.a_hebb = hebb.data_ptr<T>();
    p.a_elig = retro ? elig->data_ptr<T>() : nullptr;
    p.a_pre = pre.data_ptr<T>();
    p.a_post = post.data_ptr<T>();
    p.a_eta = eta.data_ptr<T>();
    p.rule_args = {static_cast<T>(clip), retro ? elig_rate->data_ptr<T>() : nullptr};
    p.g_pre_partial = g_pre_part.data_ptr<T>();
    p.g_post = g_post.data_ptr<T>();
    p.g_eta = g_eta_acc.data_ptr<T>();
    p.g_elig_rate_acc = g_rate_acc.data_ptr<T>();
    be.backward(p, modes, tl);
    be.sum_rows(g_pre_part.data_ptr<T>(), be.column_tiles(tl), B * P, g_pre.data_ptr<T>());
    if (eta_conn) sum_all_rows(be, g_eta_acc, g_eta);
    if (retro) sum_all_rows(be, g_rate_acc, g_rate);
  });
  return {g_hebb, g_pre, g_post, g_eta, g_elig, g_rate};
}

}  // namespace bp
