// Plastic tanh RNN on the CPU: the sequence op (forward, and backward with trace checkpoints
// recomputed segment by segment) and the step op (the sequence op with T = 1).
//
// Per step the trace is swept once forward (update H_t and compute u_{t+1} together) and, in
// backward, once per step (adjoint of the matvec of step t and of the rule of step t-1 together),
// plus once per step to recompute the segment's traces from its checkpoint.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "../trace_pass.h"
#include "cpu_utils.h"

namespace bp {

namespace {

// The parameters the passes and the backward's per-step loops read.
template <typename T>
struct RnnParams {
  const T *w, *alpha, *h2mod_w, *fanout_w;
  RuleConsts<T> consts;
};

template <typename T>
RnnParams<T> rnn_params(const RnnConfig& c, const Tensor& w, const Tensor& alpha,
                        const OptTensor& elig_rate, const OptTensor& h2mod_weight,
                        const OptTensor& fanout_weight) {
  const T rate = elig_rate.has_value() ? elig_rate->item<T>() : T(0);
  return {w.data_ptr<T>(), alpha.data_ptr<T>(), data_or_null<T>(h2mod_weight),
          data_or_null<T>(fanout_weight), RuleConsts<T>{static_cast<T>(c.clip), rate}};
}

// Without modulation the rate is the parameter itself: the scalar broadcast to (B, N)
// (EtaMode::PerPost), or the (N, N) per-connection rates (EtaMode::PerConnection).
Tensor fixed_rate(const RnnConfig& c, const OptTensor& eta) {
  if (c.modulation != Modulation::None) return Tensor();
  return eta->dim() == 0 ? eta->expand({c.B, c.N}).contiguous() : *eta;
}

// The modulator's parameters (absent without modulation).
struct Modulator {
  const OptTensor& h2mod_weight;
  const OptTensor& h2mod_bias;
  const OptTensor& fanout_weight;
  const OptTensor& fanout_bias;
};

// h_t = tanh(x_t + u_t); m_t = tanh(h2mod(h_t)); eta_t from m_t ("simple" or "fanout").
// O(B N K) per step against the passes' O(B N^2): ATen's vectorised tanh and GEMMs do it.
void activate_step(const RnnConfig& c, const Modulator& mod, const Tensor& x_t, const Tensor& u,
                   Tensor h_t, Tensor m_t, Tensor eta_t) {
  at::add_out(h_t, x_t, u).tanh_();
  if (c.modulation == Modulation::None) return;
  at::addmm_out(m_t, *mod.h2mod_bias, h_t, mod.h2mod_weight->t()).tanh_();
  if (c.modulation == Modulation::Simple) eta_t.copy_(m_t.expand({c.B, c.N}));
  else at::addmm_out(eta_t, *mod.fanout_bias, m_t, mod.fanout_weight->t());
}

// Gradient of the pre-activation of step s from everything that reached h_s.
//   grad_h = grad_out + (terms through later steps and through this step's rule, summed by the
//   caller into grad_h) + the modulator path of grad_eta.
// Writes grad_z (B, K) of the modulator pre-activation and grad_a = grad_h * (1 - h^2).
template <typename T>
void backprop_activation(const RnnConfig& c, const RnnParams<T>& p, const T* h, const T* m,
                         const T* grad_m, const T* grad_eta, T* grad_h, T* grad_z, T* grad_a) {
  const int64_t N = c.N, K = c.K;
  for (int64_t b = 0; b < c.B; ++b) {
    T* gh = grad_h + b * N;
    if (c.modulation != Modulation::None) {
      const T* ge = grad_eta + b * N;
      for (int64_t k = 0; k < K; ++k) {
        T gm = grad_m ? grad_m[b * K + k] : T(0);
        if (c.modulation == Modulation::Simple) {
          for (int64_t j = 0; j < N; ++j) gm += ge[j];
        } else {
          for (int64_t j = 0; j < N; ++j) gm += ge[j] * p.fanout_w[j * K + k];
        }
        const T mk = m[b * K + k];
        const T gz = gm * (T(1) - mk * mk);
        grad_z[b * K + k] = gz;
        const T* row = p.h2mod_w + k * N;
        for (int64_t j = 0; j < N; ++j) gh[j] += gz * row[j];
      }
    }
    const T* hb = h + b * N;
    for (int64_t j = 0; j < N; ++j) grad_a[b * N + j] = gh[j] * (T(1) - hb[j] * hb[j]);
  }
}

int64_t num_segments(int64_t T, int64_t L) { return (T + L - 1) / L; }

template <typename T>
Tensors<7> sequence_forward(const RnnConfig& c, const RnnParams<T>& p, const Tensor& x,
                            const Tensor& h0, const Tensor& hebb0, const OptTensor& elig0,
                            const OptTensor& eta, const Modulator& mod, int64_t L) {
  const int64_t T_ = c.T, B = c.B, N = c.N, K = c.K, BN = B * N, BNN = B * N * N;
  const bool retro = c.modes.rule == Rule::Retroactive;
  const bool modulated = c.modulation != Modulation::None;
  const auto opts = x.options();
  const Tiling tl = make_tiling(B, N);

  Tensor out = at::empty({T_, B, N}, opts);
  Tensor hebb_T = at::empty({B, N, N}, opts);
  Tensor elig_T = at::empty({retro ? B : 0, N, N}, opts);
  Tensor m = at::empty({T_, B, K}, opts);
  Tensor eta_seq = at::empty({modulated ? T_ : 0, B, N}, opts);
  const int64_t n_ckpt = num_segments(T_, L) - 1;
  Tensor ckpt_h = at::empty({n_ckpt, B, N, N}, opts);
  Tensor ckpt_e = at::empty({retro ? n_ckpt : 0, B, N, N}, opts);
  Tensor work_h = at::empty({T_ > 1 ? B : 0, N, N}, opts);
  Tensor work_e = at::empty({retro && T_ > 1 ? B : 0, N, N}, opts);
  Tensor u = at::empty({B, N}, opts);
  const Tensor eta_fixed = fixed_rate(c, eta);

  ForwardPassParams<T> fp{};
  fp.B = B; fp.P = N; fp.N = N;
  fp.w = p.w; fp.alpha = p.alpha; fp.consts = p.consts; fp.u = u.data_ptr<T>();
  fp.update = false; fp.matvec = true;
  fp.hebb = hebb0.data_ptr<T>();
  fp.matvec_in = h0.data_ptr<T>();
  forward_pass_cpu(fp, c.modes, tl);

  const T* hebb_in = hebb0.data_ptr<T>();
  const T* elig_in = retro ? elig0->data_ptr<T>() : nullptr;
  T* out_p = out.data_ptr<T>();
  for (int64_t t = 1; t <= T_; ++t) {
    T* h_t = out_p + (t - 1) * BN;
    T* eta_t = modulated ? eta_seq.data_ptr<T>() + (t - 1) * BN : nullptr;
    activate_step(c, mod, x.select(0, t - 1), u, out.select(0, t - 1), m.select(0, t - 1),
                  modulated ? eta_seq.select(0, t - 1) : Tensor());
    T* hebb_out;
    T* elig_out = nullptr;
    if (t == T_) {
      hebb_out = hebb_T.data_ptr<T>();
      if (retro) elig_out = elig_T.data_ptr<T>();
    } else if (t % L == 0) {  // start of segment t / L: keep the trace as its checkpoint
      hebb_out = ckpt_h.data_ptr<T>() + (t / L - 1) * BNN;
      if (retro) elig_out = ckpt_e.data_ptr<T>() + (t / L - 1) * BNN;
    } else {
      hebb_out = work_h.data_ptr<T>();
      if (retro) elig_out = work_e.data_ptr<T>();
    }
    fp.update = true;
    fp.matvec = t < T_;
    fp.hebb = hebb_in; fp.hebb_out = hebb_out;
    fp.elig = elig_in; fp.elig_out = elig_out;
    fp.pre = t == 1 ? h0.data_ptr<T>() : h_t - BN;
    fp.post = h_t;
    fp.eta = modulated ? eta_t : eta_fixed.data_ptr<T>();
    fp.matvec_in = h_t;
    forward_pass_cpu(fp, c.modes, tl);
    hebb_in = hebb_out;
    elig_in = elig_out;
  }
  return {out, hebb_T, elig_T, m, eta_seq, ckpt_h, ckpt_e};
}

template <typename T>
Tensors<12> sequence_backward(const RnnConfig& c, const RnnParams<T>& p, const OptTensor& grad_out,
                              const OptTensor& grad_hebb, const OptTensor& grad_elig,
                              const OptTensor& grad_m, const Tensor& h0, const Tensor& hebb0,
                              const OptTensor& elig0, const OptTensor& eta, const Tensor& out,
                              const Tensor& m, const Tensor& eta_seq, const Tensor& ckpt_h,
                              const Tensor& ckpt_e, int64_t L) {
  const int64_t T_ = c.T, B = c.B, N = c.N, K = c.K, BN = B * N, BNN = B * N * N;
  const bool retro = c.modes.rule == Rule::Retroactive;
  const bool modulated = c.modulation != Modulation::None;
  const bool eta_conn = c.modes.eta == EtaMode::PerConnection;
  const auto opts = out.options();
  const Tiling tl = make_tiling(B, N);

  Tensor g_hebb = grad_hebb.has_value() ? grad_hebb->clone() : at::zeros({B, N, N}, opts);
  Tensor g_elig = !retro ? at::empty({0}, opts)
                  : grad_elig.has_value() ? grad_elig->clone() : at::zeros({B, N, N}, opts);
  Tensor seg_h = at::empty({L - 1, B, N, N}, opts);
  Tensor seg_e = at::empty({retro ? L - 1 : 0, B, N, N}, opts);
  Tensor g_alpha_acc = at::zeros({alpha_acc_size(c.modes.alpha, tl, N, N)}, opts);
  Tensor g_eta_conn = at::zeros({eta_conn ? tl.num_chunks : 0, N, N}, opts);
  Tensor g_rate_acc = at::zeros({tl.num_chunks * tl.num_tiles}, opts);
  Tensor g_in_part = at::empty({tl.num_tiles, B, N}, opts);
  Tensor g_pre_part = at::empty({tl.num_tiles, B, N}, opts);
  Tensor g_post = at::empty({B, N}, opts);
  Tensor g_eta_bj = at::empty({B, N}, opts);
  Tensor g_in = at::empty({B, N}, opts);            // dL/d(pre of step t) through B(t)
  Tensor g_pre_pending = at::zeros({B, N}, opts);   // dL/d(pre of step s+1) through A(s+1)
  Tensor g_h = at::empty({B, N}, opts);
  Tensor g_a = at::empty({T_, B, N}, opts);         // dL/du_t == dL/dx_t
  Tensor g_z = at::zeros({T_, B, K}, opts);
  Tensor g_eta_seq = at::empty({c.modulation == Modulation::Fanout ? T_ : 0, B, N}, opts);
  const Tensor eta_fixed = fixed_rate(c, eta);
  double g_eta_scalar = 0;

  const T* out_p = out.data_ptr<T>();
  auto h_at = [&](int64_t t) { return t == 0 ? h0.data_ptr<T>() : out_p + (t - 1) * BN; };
  auto eta_at = [&](int64_t t) -> const T* {
    return modulated ? eta_seq.data_ptr<T>() + (t - 1) * BN : eta_fixed.data_ptr<T>();
  };

  // The segment in memory: traces H_s .. H_{e-1}, H_s being its checkpoint.
  int64_t seg = -1, seg_start = 0;
  auto hebb_at = [&](int64_t t) -> T* {
    if (t == seg_start)
      return seg == 0 ? hebb0.data_ptr<T>() : ckpt_h.data_ptr<T>() + (seg - 1) * BNN;
    return seg_h.data_ptr<T>() + (t - seg_start - 1) * BNN;
  };
  auto elig_at = [&](int64_t t) -> T* {
    if (!retro) return nullptr;
    if (t == seg_start)
      return seg == 0 ? elig0->data_ptr<T>() : ckpt_e.data_ptr<T>() + (seg - 1) * BNN;
    return seg_e.data_ptr<T>() + (t - seg_start - 1) * BNN;
  };
  auto load_segment = [&](int64_t k) {
    seg = k;
    seg_start = k * L;
    const int64_t end = std::min(seg_start + L, T_);
    ForwardPassParams<T> fp{};
    fp.B = B; fp.P = N; fp.N = N;
    fp.update = true; fp.matvec = false; fp.consts = p.consts;
    for (int64_t t = seg_start + 1; t < end; ++t) {
      fp.hebb = hebb_at(t - 1); fp.hebb_out = hebb_at(t);
      fp.elig = elig_at(t - 1); fp.elig_out = elig_at(t);
      fp.pre = h_at(t - 1); fp.post = h_at(t); fp.eta = eta_at(t);
      forward_pass_cpu(fp, c.modes, tl);
    }
  };

  BackwardPassParams<T> bp{};
  bp.B = B; bp.P = N; bp.N = N;
  bp.g_hebb = g_hebb.data_ptr<T>();
  bp.g_elig = retro ? g_elig.data_ptr<T>() : nullptr;
  bp.w = p.w; bp.alpha = p.alpha; bp.consts = p.consts;
  bp.g_in_partial = g_in_part.data_ptr<T>();
  bp.g_alpha_acc = g_alpha_acc.data_ptr<T>();
  bp.g_pre_partial = g_pre_part.data_ptr<T>();
  bp.g_post = g_post.data_ptr<T>();
  bp.g_eta = eta_conn ? g_eta_conn.data_ptr<T>() : g_eta_bj.data_ptr<T>();
  bp.g_elig_rate_acc = g_rate_acc.data_ptr<T>();
  auto set_b = [&](int64_t t) {  // adjoint of the matvec of step t
    bp.do_b = true;
    bp.g_u = g_a.data_ptr<T>() + (t - 1) * BN;
    bp.b_in = h_at(t - 1);
    bp.b_hebb = hebb_at(t - 1);
  };
  auto set_a = [&](int64_t s) {  // adjoint of the rule of step s
    bp.do_a = true;
    bp.a_hebb = hebb_at(s - 1);
    bp.a_elig = elig_at(s - 1);
    bp.a_pre = h_at(s - 1);
    bp.a_post = h_at(s);
    bp.a_eta = eta_at(s);
  };
  auto run = [&] {
    backward_pass_cpu(bp, c.modes, tl);
    bp.do_a = bp.do_b = false;
  };

  const T* g_out_p = grad_out.has_value() ? grad_out->data_ptr<T>() : nullptr;
  const T* g_m_p = grad_m.has_value() ? grad_m->data_ptr<T>() : nullptr;
  // Everything that reaches h_s once A(s) (and B(s+1)) have run: fills g_a[s - 1].
  auto finish_step = [&](int64_t s, bool has_b) {
    T* gh = g_h.data_ptr<T>();
    const T* gq = g_post.data_ptr<T>();
    const T* gpend = g_pre_pending.data_ptr<T>();
    const T* gin = g_in.data_ptr<T>();
    for (int64_t e = 0; e < BN; ++e) {
      T v = gq[e] + gpend[e];
      if (has_b) v += gin[e];
      if (g_out_p) v += g_out_p[(s - 1) * BN + e];
      gh[e] = v;
    }
    const T* ge = g_eta_bj.data_ptr<T>();
    if (!modulated && !eta_conn) {
      for (int64_t e = 0; e < BN; ++e) g_eta_scalar += ge[e];
    }
    if (c.modulation == Modulation::Fanout)
      std::copy_n(ge, BN, g_eta_seq.data_ptr<T>() + (s - 1) * BN);
    backprop_activation(c, p, h_at(s), m.data_ptr<T>() + (s - 1) * B * K,
                        g_m_p ? g_m_p + (s - 1) * B * K : nullptr, ge, gh,
                        g_z.data_ptr<T>() + (s - 1) * B * K, g_a.data_ptr<T>() + (s - 1) * BN);
  };

  load_segment((T_ - 1) / L);
  set_a(T_);
  run();
  finish_step(T_, false);
  sum_rows(g_pre_part.data_ptr<T>(), tl.num_tiles, BN, g_pre_pending.data_ptr<T>());
  for (int64_t t = T_; t >= 1; --t) {
    const int64_t s = t - 1;
    set_b(t);
    if (s >= 1 && s - 1 >= seg_start) {
      set_a(s);
      run();
    } else {
      run();
      if (s >= 1) {
        load_segment(seg - 1);
        set_a(s);
        run();
      }
    }
    sum_rows(g_in_part.data_ptr<T>(), tl.num_tiles, BN, g_in.data_ptr<T>());
    if (s >= 1) {
      finish_step(s, true);
      sum_rows(g_pre_part.data_ptr<T>(), tl.num_tiles, BN, g_pre_pending.data_ptr<T>());
    }
  }
  Tensor g_h0 = g_in + g_pre_pending;

  // Parameter gradients: sums over steps and samples, as GEMMs or fixed-order sums.
  Tensor pre_seq = at::cat({h0.unsqueeze(0), out.narrow(0, 0, T_ - 1)}).reshape({T_ * B, N});
  Tensor g_a_flat = g_a.reshape({T_ * B, N});
  Tensor g_w = at::mm(pre_seq.t(), g_a_flat);
  const std::vector<int64_t> alpha_shape =
      c.modes.alpha == AlphaMode::Full     ? std::vector<int64_t>{N, N}
      : c.modes.alpha == AlphaMode::Neuron ? std::vector<int64_t>{N}
                                           : std::vector<int64_t>{};
  Tensor g_alpha = reduce_alpha_acc<T>(g_alpha_acc, c.modes.alpha, tl, alpha_shape);

  Tensor g_eta = at::empty({0}, opts);
  if (!modulated) {
    if (eta_conn) {
      g_eta = at::empty({N, N}, opts);
      sum_rows(g_eta_conn.data_ptr<T>(), tl.num_chunks, N * N, g_eta.data_ptr<T>());
    } else {
      g_eta = at::full({}, g_eta_scalar, opts);
    }
  }
  Tensor g_rate = at::empty({0}, opts);
  if (retro) {
    g_rate = at::empty({}, opts);
    sum_rows(g_rate_acc.data_ptr<T>(), g_rate_acc.numel(), 1, g_rate.data_ptr<T>());
  }
  Tensor g_h2mod_w = at::empty({0}, opts), g_h2mod_b = at::empty({0}, opts);
  Tensor g_fan_w = at::empty({0}, opts), g_fan_b = at::empty({0}, opts);
  if (modulated) {
    Tensor g_z_flat = g_z.reshape({T_ * B, K});
    g_h2mod_w = at::mm(g_z_flat.t(), out.reshape({T_ * B, N}));
    g_h2mod_b = at::empty({K}, opts);
    sum_rows(g_z_flat.data_ptr<T>(), T_ * B, K, g_h2mod_b.data_ptr<T>());
    if (c.modulation == Modulation::Fanout) {
      Tensor g_e_flat = g_eta_seq.reshape({T_ * B, N});
      g_fan_w = at::mm(g_e_flat.t(), m.reshape({T_ * B, K}));
      g_fan_b = at::empty({N}, opts);
      sum_rows(g_e_flat.data_ptr<T>(), T_ * B, N, g_fan_b.data_ptr<T>());
    }
  }
  return {g_a,   g_h0,   g_hebb,    g_elig,    g_w,     g_alpha,
          g_eta, g_rate, g_h2mod_w, g_h2mod_b, g_fan_w, g_fan_b};
}

}  // namespace

Tensors<7> plastic_rnn_sequence_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& hebb0, const OptTensor& elig0,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip, int64_t checkpoint_every) {
  const char* op = "plastic_rnn_sequence";
  const RnnConfig c = check_rnn_inputs(
      op, {x, h0, hebb0, elig0, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias,
           fanout_weight, fanout_bias}, rule, clip, true);
  check_checkpoint_every(op, checkpoint_every);
  return dispatch_float(x, op, [&]<typename T>() {
    const auto p = rnn_params<T>(c, w, alpha, elig_rate, h2mod_weight, fanout_weight);
    return sequence_forward<T>(c, p, x, h0, hebb0, elig0, eta,
                               {h2mod_weight, h2mod_bias, fanout_weight, fanout_bias},
                               checkpoint_every);
  });
}

Tensors<12> plastic_rnn_sequence_backward_cpu(
    const OptTensor& grad_out, const OptTensor& grad_hebb, const OptTensor& grad_elig,
    const OptTensor& grad_m, const Tensor& h0, const Tensor& hebb0, const OptTensor& elig0,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip, const Tensor& out,
    const Tensor& m, const Tensor& eta_seq, const Tensor& hebb_checkpoints,
    const Tensor& elig_checkpoints, int64_t checkpoint_every) {
  const char* op = "plastic_rnn_sequence_backward";
  const RnnConfig c = check_rnn_inputs(
      op, {out, h0, hebb0, elig0, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias,
           fanout_weight, fanout_bias}, rule, clip, true);
  check_checkpoint_every(op, checkpoint_every);
  const int64_t T_ = c.T, B = c.B, N = c.N;
  if (grad_out.has_value()) check_grad(op, "grad_out", *grad_out, {T_, B, N}, out);
  if (grad_hebb.has_value()) check_grad(op, "grad_hebb", *grad_hebb, {B, N, N}, out);
  if (grad_elig.has_value() && c.modes.rule == Rule::Retroactive)
    check_grad(op, "grad_elig", *grad_elig, {B, N, N}, out);
  if (grad_m.has_value()) check_grad(op, "grad_m", *grad_m, {T_, B, c.K}, out);
  const int64_t n_ckpt = num_segments(T_, checkpoint_every) - 1;
  check_grad(op, "hebb_checkpoints", hebb_checkpoints, {n_ckpt, B, N, N}, out);
  return dispatch_float(out, op, [&]<typename T>() {
    const auto p = rnn_params<T>(c, w, alpha, elig_rate, h2mod_weight, fanout_weight);
    return sequence_backward<T>(c, p, grad_out, grad_hebb, grad_elig, grad_m, h0, hebb0, elig0,
                                eta, out, m, eta_seq, hebb_checkpoints, elig_checkpoints,
                                checkpoint_every);
  });
}

Tensors<5> plastic_rnn_step_cpu(
    const Tensor& x, const Tensor& h, const Tensor& hebb, const OptTensor& elig, const Tensor& w,
    const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip) {
  const char* op = "plastic_rnn_step";
  const RnnConfig c = check_rnn_inputs(
      op, {x, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight,
           fanout_bias}, rule, clip, false);
  auto [out, hebb_new, elig_new, m, eta_seq, ckpt_h, ckpt_e] =
      dispatch_float(x, op, [&]<typename T>() {
    const auto p = rnn_params<T>(c, w, alpha, elig_rate, h2mod_weight, fanout_weight);
    return sequence_forward<T>(c, p, x.unsqueeze(0), h, hebb, elig, eta,
                               {h2mod_weight, h2mod_bias, fanout_weight, fanout_bias}, 1);
  });
  // eta_t (B, N) is kept for the backward only when the rate is computed by the modulator.
  Tensor eta_t = eta_seq.numel() > 0 ? eta_seq.squeeze(0) : at::empty({0}, x.options());
  return {out.squeeze(0), hebb_new, elig_new, m.squeeze(0), eta_t};
}

Tensors<12> plastic_rnn_step_backward_cpu(
    const OptTensor& grad_h_new, const OptTensor& grad_hebb, const OptTensor& grad_elig,
    const OptTensor& grad_m, const Tensor& h, const Tensor& hebb, const OptTensor& elig,
    const Tensor& w, const Tensor& alpha, const OptTensor& eta, const OptTensor& elig_rate,
    const OptTensor& h2mod_weight, const OptTensor& h2mod_bias, const OptTensor& fanout_weight,
    const OptTensor& fanout_bias, const std::string& rule, double clip, const Tensor& h_new,
    const Tensor& m, const Tensor& eta_t) {
  const char* op = "plastic_rnn_step_backward";
  const RnnConfig c = check_rnn_inputs(
      op, {h_new, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias,
           fanout_weight, fanout_bias}, rule, clip, false);
  const int64_t B = c.B, N = c.N;
  if (grad_h_new.has_value()) check_grad(op, "grad_h_new", *grad_h_new, {B, N}, h_new);
  if (grad_hebb.has_value()) check_grad(op, "grad_hebb", *grad_hebb, {B, N, N}, h_new);
  if (grad_elig.has_value() && c.modes.rule == Rule::Retroactive)
    check_grad(op, "grad_elig", *grad_elig, {B, N, N}, h_new);
  if (grad_m.has_value()) check_grad(op, "grad_m", *grad_m, {B, c.K}, h_new);
  auto unsq = [](const OptTensor& t) -> OptTensor {
    return t.has_value() ? OptTensor(t->unsqueeze(0)) : std::nullopt;
  };
  auto grads = dispatch_float(h_new, op, [&]<typename T>() {
    const auto p = rnn_params<T>(c, w, alpha, elig_rate, h2mod_weight, fanout_weight);
    return sequence_backward<T>(c, p, unsq(grad_h_new), grad_hebb, grad_elig, unsq(grad_m), h,
                                hebb, elig, eta, h_new.unsqueeze(0), m.unsqueeze(0),
                                eta_t.numel() > 0 ? eta_t.unsqueeze(0) : eta_t,
                                at::empty({0, B, N, N}, h_new.options()),
                                at::empty({0}, h_new.options()), 1);
  });
  std::get<0>(grads) = std::get<0>(grads).squeeze(0);
  return grads;
}

}  // namespace bp
