// The plastic feed-forward primitives (DESIGN 2.4): one matvec pass and one update pass, and
// their adjoints.
#include <ATen/ATen.h>

#include "../checks.h"
#include "../ops.h"
#include "../trace_pass.h"
#include "cpu_utils.h"

namespace bp {

Tensor plastic_matvec_cpu(const Tensor& x, const Tensor& w, const Tensor& alpha,
                          const Tensor& hebb) {
  const char* op = "plastic_matvec";
  const AlphaMode am = check_matvec_inputs(op, x, w, alpha, hebb);
  const int64_t B = x.size(0), P = x.size(1), N = w.size(1);
  Tensor u = at::empty({B, N}, x.options());
  dispatch_float(x, op, [&]<typename T>() {
    ForwardPassParams<T> fp{};
    fp.B = B; fp.P = P; fp.N = N;
    fp.matvec = true;
    fp.hebb = hebb.data_ptr<T>();
    fp.matvec_in = x.data_ptr<T>();
    fp.w = w.data_ptr<T>();
    fp.alpha = alpha.data_ptr<T>();
    fp.u = u.data_ptr<T>();
    forward_pass_cpu(fp, {Rule::Clip, am, EtaMode::PerPost}, make_tiling(B, N));
  });
  return u;
}

Tensors<4> plastic_matvec_backward_cpu(const Tensor& grad_u, const Tensor& x,
                                                const Tensor& w, const Tensor& alpha,
                                                const Tensor& hebb) {
  const char* op = "plastic_matvec_backward";
  const AlphaMode am = check_matvec_inputs(op, x, w, alpha, hebb);
  const int64_t B = x.size(0), P = x.size(1), N = w.size(1);
  check_grad(op, "grad_u", grad_u, {B, N}, x);
  const Tiling tl = make_tiling(B, N);
  Tensor g_hebb = at::zeros_like(hebb);
  Tensor g_x_part = at::empty({tl.num_tiles, B, P}, x.options());
  Tensor g_alpha_acc = at::zeros({alpha_acc_size(am, tl, P, N)}, x.options());
  Tensor g_x = at::empty({B, P}, x.options());
  Tensor g_alpha;
  dispatch_float(x, op, [&]<typename T>() {
    BackwardPassParams<T> p{};
    p.B = B; p.P = P; p.N = N;
    p.do_b = true;
    p.g_hebb = g_hebb.data_ptr<T>();
    p.g_u = grad_u.data_ptr<T>();
    p.b_in = x.data_ptr<T>();
    p.b_hebb = hebb.data_ptr<T>();
    p.w = w.data_ptr<T>();
    p.alpha = alpha.data_ptr<T>();
    p.g_in_partial = g_x_part.data_ptr<T>();
    p.g_alpha_acc = g_alpha_acc.data_ptr<T>();
    backward_pass_cpu(p, {Rule::Clip, am, EtaMode::PerPost}, tl);
    sum_rows(g_x_part.data_ptr<T>(), tl.num_tiles, B * P, g_x.data_ptr<T>());
    g_alpha = reduce_alpha_acc<T>(g_alpha_acc, am, tl, alpha.sizes());
  });
  return {g_x, at::mm(x.t(), grad_u), g_alpha, g_hebb};
}

Tensors<2> hebb_update_cpu(const Tensor& hebb, const Tensor& pre, const Tensor& post,
                                    const Tensor& eta, const OptTensor& elig,
                                    const OptTensor& elig_rate, const std::string& rule,
                                    double clip) {
  const char* op = "hebb_update";
  const PassModes modes =
      check_hebb_update_inputs(op, hebb, pre, post, eta, elig, elig_rate, rule, clip);
  const bool retro = modes.rule == Rule::Retroactive;
  Tensor hebb_new = at::empty_like(hebb);
  Tensor elig_new = retro ? at::empty_like(hebb) : at::empty({0}, hebb.options());
  dispatch_float(hebb, op, [&]<typename T>() {
    ForwardPassParams<T> fp{};
    fp.B = hebb.size(0); fp.P = hebb.size(1); fp.N = hebb.size(2);
    fp.update = true;
    fp.hebb = hebb.data_ptr<T>();
    fp.hebb_out = hebb_new.data_ptr<T>();
    fp.elig = retro ? elig->data_ptr<T>() : nullptr;
    fp.elig_out = retro ? elig_new.data_ptr<T>() : nullptr;
    fp.pre = pre.data_ptr<T>();
    fp.post = post.data_ptr<T>();
    fp.eta = eta.data_ptr<T>();
    fp.consts = {static_cast<T>(clip), retro ? elig_rate->item<T>() : T(0)};
    forward_pass_cpu(fp, modes, make_tiling(fp.B, fp.N));
  });
  return {hebb_new, elig_new};
}

Tensors<6> hebb_update_backward_cpu(const OptTensor& grad_hebb_new,
                                             const OptTensor& grad_elig_new, const Tensor& hebb,
                                             const Tensor& pre, const Tensor& post,
                                             const Tensor& eta, const OptTensor& elig,
                                             const OptTensor& elig_rate, const std::string& rule,
                                             double clip) {
  const char* op = "hebb_update_backward";
  const PassModes modes =
      check_hebb_update_inputs(op, hebb, pre, post, eta, elig, elig_rate, rule, clip);
  const bool retro = modes.rule == Rule::Retroactive;
  const bool eta_conn = modes.eta == EtaMode::PerConnection;
  const int64_t B = hebb.size(0), P = hebb.size(1), N = hebb.size(2);
  if (grad_hebb_new.has_value()) check_grad(op, "grad_hebb_new", *grad_hebb_new, hebb.sizes(), hebb);
  if (retro && grad_elig_new.has_value())
    check_grad(op, "grad_elig_new", *grad_elig_new, hebb.sizes(), hebb);
  const Tiling tl = make_tiling(B, N);
  const auto opts = hebb.options();
  Tensor g_hebb = grad_hebb_new.has_value() ? grad_hebb_new->clone() : at::zeros_like(hebb);
  Tensor g_elig = !retro ? at::empty({0}, opts)
                  : grad_elig_new.has_value() ? grad_elig_new->clone() : at::zeros_like(hebb);
  Tensor g_pre_part = at::empty({tl.num_tiles, B, P}, opts);
  Tensor g_post = at::empty({B, N}, opts);
  Tensor g_eta_acc = eta_conn ? at::zeros({tl.num_chunks, P, N}, opts) : at::empty({B, N}, opts);
  Tensor g_rate_acc = at::zeros({tl.num_chunks * tl.num_tiles}, opts);
  Tensor g_pre = at::empty({B, P}, opts);
  Tensor g_eta = eta_conn ? at::empty({1, P, N}, opts) : g_eta_acc.view({B, 1, N});
  Tensor g_rate = retro ? at::empty({}, opts) : at::empty({0}, opts);
  dispatch_float(hebb, op, [&]<typename T>() {
    BackwardPassParams<T> p{};
    p.B = B; p.P = P; p.N = N;
    p.do_a = true;
    p.g_hebb = g_hebb.data_ptr<T>();
    p.g_elig = retro ? g_elig.data_ptr<T>() : nullptr;
    p.a_hebb = hebb.data_ptr<T>();
    p.a_elig = retro ? elig->data_ptr<T>() : nullptr;
    p.a_pre = pre.data_ptr<T>();
    p.a_post = post.data_ptr<T>();
    p.a_eta = eta.data_ptr<T>();
    p.consts = {static_cast<T>(clip), retro ? elig_rate->item<T>() : T(0)};
    p.g_pre_partial = g_pre_part.data_ptr<T>();
    p.g_post = g_post.data_ptr<T>();
    p.g_eta = g_eta_acc.data_ptr<T>();
    p.g_elig_rate_acc = g_rate_acc.data_ptr<T>();
    backward_pass_cpu(p, modes, tl);
    sum_rows(g_pre_part.data_ptr<T>(), tl.num_tiles, B * P, g_pre.data_ptr<T>());
    if (eta_conn) sum_rows(g_eta_acc.data_ptr<T>(), tl.num_chunks, P * N, g_eta.data_ptr<T>());
    if (retro) sum_rows(g_rate_acc.data_ptr<T>(), g_rate_acc.numel(), 1, g_rate.data_ptr<T>());
  });
  return {g_hebb, g_pre, g_post, g_eta, g_elig, g_rate};
}

}  // namespace bp
