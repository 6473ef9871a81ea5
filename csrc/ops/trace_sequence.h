// The plastic-trace half of a recurrent sequence op, shared by the tanh RNN and the LSTM: the
// order of the trace passes, the checkpoints, the segment recompute in backward, the modulator
// and the gradients of the plastic parameters. The cell supplies the per-step work around it.
//
// In the terms of both cells, step t = 1..T reads u_t = h_{t-1} @ (w + A * H_{t-1}) and makes
// h_t, the trace's post-synaptic term post_t (h_t for the RNN; for the LSTM g_t, u_t, c_t or h_t
// by its post_input) and the modulator's input (h_t; for the LSTM h_t, c_t or h_{t-1} by its
// modulator_input); the trace update of step t uses pre = h_{t-1}, post_t and eta_t.
//
// Forward, per step the trace is swept once: update H_t and compute u_{t+1} together. Backward,
// per step once for the adjoints (matvec of step t and rule of step t-1 together) and once to
// recompute the segment's traces from its checkpoint.
//
// Device-agnostic: the trace passes and the fixed-order partial sums come from a Backend
// (cpu/cpu_backend.h, cuda/gpu_backend.h); everything else is ATen, on the tensors' device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>

#include "../checks.h"
#include "../ops.h"
#include "../sequence_pass.h"
#include "../trace_pass.h"

namespace bp {

// The plastic parameters, as tensors and as the pointers and constants the passes read.
template <typename T>
struct PlasticParams {
  const PlasticInputs& in;
  const T *w, *alpha;
  RuleArgs<T> rule_args;

  PlasticParams(const PlasticConfig& c, const PlasticInputs& in)
      : in(in),
        w(in.w.data_ptr<T>()),
        alpha(in.alpha.data_ptr<T>()),
        rule_args{static_cast<T>(c.clip),
                  in.elig_rate.has_value() ? in.elig_rate->data_ptr<T>() : nullptr} {}
};

// A step op's optional per-step tensor as a sequence of one step.
inline OptTensor unsqueeze0(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->unsqueeze(0)) : std::nullopt;
}

// dst = the sum of src's rows of dst.numel() values each, in row order (src contiguous).
template <class Backend>
void sum_all_rows(const Backend& be, const at::Tensor& src, const at::Tensor& dst) {
  const int64_t cols = dst.numel();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "sum_all_rows", [&] {
    be.sum_rows(src.data_ptr<scalar_t>(), cols ? src.numel() / cols : 0, cols,
                dst.data_ptr<scalar_t>());
  });
}

// Step t's slice (B, N) of a per-step sequence (T, B, N) whose steps may be strided, as the
// candidate gate inside the LSTM's (T, S, B, N) gates.
template <typename T>
T* step_ptr(const at::Tensor& seq, int64_t t) {
  return seq.data_ptr<T>() + (t - 1) * seq.stride(0);
}

// h_0 .. h_{T-1}, the pre-synaptic terms of steps 1..T, as (T B, N).
inline at::Tensor previous_h(const at::Tensor& h0, const at::Tensor& out) {
  const int64_t T = out.size(0);
  return at::cat({h0.unsqueeze(0), out.narrow(0, 0, T - 1)}).reshape({T * h0.size(0), -1});
}

// Without modulation the rate is the parameter itself: the scalar broadcast to (B, N)
// (EtaMode::PerPost), or the (N, N) per-connection rates (EtaMode::PerConnection).
inline at::Tensor fixed_rate(const PlasticConfig& c, const OptTensor& eta) {
  if (c.modulation != Modulation::None) return at::Tensor();
  return eta->dim() == 0 ? eta->expand({c.B, c.N}).contiguous() : *eta;
}

// The modulator of one step: m_t = tanh(h2mod(mod_in_t)) (B, K) and the rate it sets, eta_t (B, N):
// m_t for every neuron ("simple") or fanout(m_t) ("fanout").
inline void modulate(const PlasticConfig& c, const PlasticInputs& a, const at::Tensor& mod_in_t,
                     at::Tensor& m_t, at::Tensor& eta_t) {
  at::addmm_out(m_t, *a.h2mod_bias, mod_in_t, a.h2mod_weight->t());
  m_t.tanh_();
  if (c.modulation == Modulation::Simple)
    eta_t.copy_(m_t.expand({c.B, c.N}));
  else
    at::addmm_out(eta_t, *a.fanout_bias, m_t, a.fanout_weight->t());
}

// The per-step sequences of a cell: h (T, B, N), the trace's post-synaptic terms and the
// modulator's input (each (T, B, N), possibly strided over steps).
struct CellSequences {
  const at::Tensor& h0;
  const at::Tensor& out;
  const at::Tensor& post;
  const at::Tensor& mod_in;
};

// Forward outputs of the trace half. m and eta_seq are filled step by step.
struct TraceForward {
  at::Tensor m, eta_seq, hebb_T, elig_T, ckpt_h, ckpt_e;
};

// Runs a whole sequence. `step(t, u_partial)` must fill step t of seq.out, seq.post and
// seq.mod_in from u_t, as the trace pass leaves it: partial sums (be.u_partial_rows, B, N) whose
// column sums in row order (sum_rows) are u_t; the modulator and the trace pass of step t follow.
// The trace is stored every L steps.
template <typename T, class Backend, typename Step>
TraceForward trace_forward(const Backend& be, const PlasticConfig& c, const PlasticParams<T>& p,
                           const CellSequences& seq, int64_t L, Step&& step) {
  const int64_t T_ = c.T, B = c.B, N = c.N, K = c.K, BNN = B * N * N;
  const bool retro = c.modes.rule == Rule::Retroactive;
  const bool modulated = c.modulation != Modulation::None;
  const auto opts = seq.out.options();
  const auto tl = be.tiling(B, N, N);

  TraceForward r;
  r.m = at::empty({T_, B, K}, opts);
  r.eta_seq = at::empty({modulated ? T_ : 0, B, N}, opts);
  r.hebb_T = at::empty({B, N, N}, opts);
  r.elig_T = at::empty({retro ? B : 0, N, N}, opts);
  const int64_t n_ckpt = num_checkpoints(T_, L);
  r.ckpt_h = at::empty({n_ckpt, B, N, N}, opts);
  r.ckpt_e = at::empty({retro ? n_ckpt : 0, B, N, N}, opts);
  Tensor work_h = at::empty({T_ > 1 ? B : 0, N, N}, opts);
  Tensor work_e = at::empty({retro && T_ > 1 ? B : 0, N, N}, opts);
  Tensor u_partial = at::empty({be.u_partial_rows(tl), B, N}, opts);
  const Tensor eta_fixed = fixed_rate(c, p.in.eta);
  const PlasticInputs& a = p.in;

  ForwardPassParams<T> fp{};
  set_recurrent_layer(fp, B, N, p.w, p.alpha, p.rule_args);
  fp.u = u_partial.data_ptr<T>();
  fp.update = false;
  fp.matvec = true;
  fp.hebb = a.hebb.data_ptr<T>();
  fp.matvec_in = seq.h0.data_ptr<T>();
  be.forward_u_partials(fp, c.modes, tl);

  const T* hebb_in = a.hebb.data_ptr<T>();
  const T* elig_in = retro ? a.elig->data_ptr<T>() : nullptr;
  for (int64_t t = 1; t <= T_; ++t) {
    step(t, u_partial);
    if (modulated) {
      Tensor m_t = r.m.select(0, t - 1), eta_t = r.eta_seq.select(0, t - 1);
      modulate(c, a, seq.mod_in.select(0, t - 1), m_t, eta_t);
    }
    T* hebb_out = trace_destination(t, T_, L, r.hebb_T.data_ptr<T>(), r.ckpt_h.data_ptr<T>(),
                                    work_h.data_ptr<T>(), BNN);
    T* elig_out = retro ? trace_destination(t, T_, L, r.elig_T.data_ptr<T>(),
                                            r.ckpt_e.data_ptr<T>(), work_e.data_ptr<T>(), BNN)
                        : nullptr;
    T* h_t = step_ptr<T>(seq.out, t);
    fp.update = true;
    fp.matvec = t < T_;
    fp.hebb = hebb_in;
    fp.hebb_out = hebb_out;
    fp.elig = elig_in;
    fp.elig_out = elig_out;
    fp.pre = t == 1 ? seq.h0.data_ptr<T>() : step_ptr<T>(seq.out, t - 1);
    fp.post = step_ptr<T>(seq.post, t);
    fp.eta = modulated ? step_ptr<T>(r.eta_seq, t) : eta_fixed.data_ptr<T>();
    fp.matvec_in = h_t;
    be.forward_u_partials(fp, c.modes, tl);
    hebb_in = hebb_out;
    elig_in = elig_out;
  }
  return r;
}

// What reaches step s's outputs from the trace half, for the cell's backward of step s.
struct StepGrads {
  const at::Tensor& post;    // dL/dpost_s (B, N) through the rule of step s
  const at::Tensor& h;       // dL/dh_s through the matvec and rule of step s + 1 (0 for s = T)
  const at::Tensor& mod_in;  // dL/d(mod_in_s) through the modulator; undefined without one
};

// Gradients of the trace half: of h_0 through step 1's matvec and rule, of the initial traces and
// of the plastic parameters (empty for absent ones).
struct TraceBackward {
  at::Tensor g_h0, g_hebb, g_elig, g_w, g_alpha, g_eta, g_rate, g_h2mod_w, g_h2mod_b, g_fan_w,
      g_fan_b;
};

// What the backward sums into the plastic parameters' gradients: per-step gradients (T, B, .)
// and per-task (or per-group) accumulators, as the backward's passes leave them.
struct ParameterGradSources {
  const at::Tensor& m;          // (T, B, K) the forward's modulator outputs
  const at::Tensor& g_u;        // (T, B, N) dL/du_t
  const at::Tensor& g_z;        // (T, B, K) dL/d(pre-activation of m_t), modulated only
  const at::Tensor& g_eta_seq;  // (T, B, N) dL/deta_t, modulation "fanout" only
  const at::Tensor& g_eta_sum;  // (B, N) dL/deta summed over steps, scalar eta only
  const at::Tensor& g_alpha_acc;
  const at::Tensor& g_eta_conn;  // (rows, N, N), eta (N, N) only
  const at::Tensor& g_rate_acc;
};

// Gradients of the plastic parameters: sums over steps and samples, as GEMMs or fixed-order sums
// (empty tensors for absent parameters).
template <class Backend>
void parameter_grads(const Backend& be, const PlasticConfig& c, const PlasticInputs& a,
                     const CellSequences& seq, const ParameterGradSources& g, TraceBackward& r) {
  const int64_t T_ = c.T, B = c.B, N = c.N, K = c.K;
  const bool modulated = c.modulation != Modulation::None;
  const auto opts = seq.out.options();
  r.g_w = at::mm(previous_h(seq.h0, seq.out).t(), g.g_u.reshape({T_ * B, N}));
  r.g_alpha = at::empty(a.alpha.sizes(), opts);
  sum_all_rows(be, g.g_alpha_acc, r.g_alpha);
  r.g_eta = at::empty({0}, opts);
  if (!modulated) {
    r.g_eta = at::empty(a.eta->sizes(), opts);
    if (c.modes.eta == EtaMode::PerConnection)
      sum_all_rows(be, g.g_eta_conn, r.g_eta);
    else
      sum_all_rows(be, g.g_eta_sum, r.g_eta);
  }
  r.g_rate = at::empty({0}, opts);
  if (c.modes.rule == Rule::Retroactive) {
    r.g_rate = at::empty({}, opts);
    sum_all_rows(be, g.g_rate_acc, r.g_rate);
  }
  for (Tensor* t : {&r.g_h2mod_w, &r.g_h2mod_b, &r.g_fan_w, &r.g_fan_b})
    *t = at::empty({0}, opts);  // distinct tensors: op outputs must not alias
  if (modulated) {
    Tensor g_z_flat = g.g_z.reshape({T_ * B, K});
    r.g_h2mod_w = at::mm(g_z_flat.t(), seq.mod_in.reshape({T_ * B, N}));
    r.g_h2mod_b = at::empty({K}, opts);
    sum_all_rows(be, g_z_flat, r.g_h2mod_b);
    if (c.modulation == Modulation::Fanout) {
      Tensor g_e_flat = g.g_eta_seq.reshape({T_ * B, N});
      r.g_fan_w = at::mm(g_e_flat.t(), g.m.reshape({T_ * B, K}));
      r.g_fan_b = at::empty({N}, opts);
      sum_all_rows(be, g_e_flat, r.g_fan_b);
    }
  }
}

// The forward's saved tensors and the gradients of its trace outputs.
struct TraceSaved {
  const at::Tensor& m;
  const at::Tensor& eta_seq;
  const at::Tensor& ckpt_h;
  const at::Tensor& ckpt_e;
  const OptTensor& grad_hebb;
  const OptTensor& grad_elig;
  const OptTensor& grad_m;
};

// The backward over the steps of one sequence, in backward_schedule's order (T down to 1): the
// segment of recomputed traces in memory, the backward pass's parameters, and the gradients that
// flow from step to step. `finish(s, grads)`, called for s = T down to 1, must write dL/du_s into
// step s of g_u (T, B, N) from everything that reaches step s: grads from the trace half, its
// own sequences.
template <typename T, class Backend, typename Finish>
class TraceBackwardSweep {
 public:
  TraceBackwardSweep(const Backend& be, const PlasticConfig& c, const PlasticParams<T>& p,
                     const CellSequences& seq, const TraceSaved& saved, int64_t L,
                     const at::Tensor& g_u, Finish& finish)
      : be_(be),
        c_(c),
        p_(p),
        a_(p.in),
        seq_(seq),
        saved_(saved),
        L_(L),
        g_u_(g_u),
        finish_(finish),
        tl_(be.tiling(c.B, c.N, c.N)),
        tiles_(be.column_tiles(tl_)) {
    const int64_t T_ = c.T, B = c.B, N = c.N;
    const auto opts = seq.out.options();
    g_hebb_ = saved.grad_hebb.has_value() ? saved.grad_hebb->clone() : at::zeros({B, N, N}, opts);
    g_elig_ = !retro()                      ? at::empty({0}, opts)
              : saved.grad_elig.has_value() ? saved.grad_elig->clone()
                                            : at::zeros({B, N, N}, opts);
    // One segment's recomputed traces; no segment is longer than the sequence, whatever L.
    const int64_t seg_len = std::min(L, T_);
    seg_h_ = at::empty({seg_len - 1, B, N, N}, opts);
    seg_e_ = at::empty({retro() ? seg_len - 1 : 0, B, N, N}, opts);
    g_alpha_acc_ = at::zeros({be.alpha_acc_size(c.modes.alpha, tl_, N, N)}, opts);
    g_eta_conn_ = at::zeros({eta_conn() ? be.eta_acc_rows(tl_) : 0, N, N}, opts);
    g_rate_acc_ = at::zeros({be.rate_acc_size(tl_)}, opts);
    // The matvec adjoint's partials, and after them dL/d(pre of step s+1) through the rule:
    // one column sum of all rows makes g_h (matvec_done).
    g_in_part_ = at::empty({tiles_ + 1, B, N}, opts);
    g_pre_pending_ = g_in_part_.select(0, tiles_);
    g_pre_pending_.zero_();
    g_pre_part_ = at::empty({tiles_, B, N}, opts);
    g_post_ = at::empty({B, N}, opts);
    g_eta_bj_ = at::empty({B, N}, opts);
    g_h_ = at::zeros({B, N}, opts);
    g_z_ = at::zeros({T_, B, c.K}, opts);
    g_eta_seq_ = at::empty({c.modulation == Modulation::Fanout ? T_ : 0, B, N}, opts);
    g_eta_sum_ = at::zeros({B, N}, opts);
    eta_fixed_ = fixed_rate(c, a_.eta);
    hebb_ = {a_.hebb.data_ptr<T>(), saved.ckpt_h.data_ptr<T>(), seg_h_.data_ptr<T>(), B * N * N, L};
    elig_ = {retro() ? a_.elig->data_ptr<T>() : nullptr, saved.ckpt_e.data_ptr<T>(),
             seg_e_.data_ptr<T>(), B * N * N, L};
    set_recurrent_layer(bp_, B, N, p.w, p.alpha, p.rule_args);
    bp_.g_hebb = g_hebb_.data_ptr<T>();
    bp_.g_elig = retro() ? g_elig_.data_ptr<T>() : nullptr;
    bp_.g_in_partial = g_in_part_.data_ptr<T>();
    bp_.g_alpha_acc = g_alpha_acc_.data_ptr<T>();
    bp_.g_pre_partial = g_pre_part_.data_ptr<T>();
    bp_.g_post = g_post_.data_ptr<T>();
    bp_.g_eta = eta_conn() ? g_eta_conn_.data_ptr<T>() : g_eta_bj_.data_ptr<T>();
    bp_.g_elig_rate_acc = g_rate_acc_.data_ptr<T>();
  }

  // Recomputes segment k's traces H_s .. H_{e-1} from its checkpoint H_s, and selects it.
  void load_segment(int64_t k) {
    hebb_.select(k);
    elig_.select(k);
    const int64_t end = std::min(hebb_.start + L_, c_.T);
    ForwardPassParams<T> fp{};
    set_recurrent_layer(fp, c_.B, c_.N, p_.w, p_.alpha, p_.rule_args);
    fp.update = true;
    fp.matvec = false;
    for (int64_t t = hebb_.start + 1; t < end; ++t) {
      fp.hebb = hebb_.at(t - 1);
      fp.hebb_out = hebb_.slot(t);
      if (retro()) {
        fp.elig = elig_.at(t - 1);
        fp.elig_out = elig_.slot(t);
      }
      fp.pre = h_at(t - 1);
      fp.post = step_ptr<T>(seq_.post, t);
      fp.eta = eta_at(t);
      be_.forward(fp, c_.modes, tl_);
    }
  }

  // One sweep: the adjoint of the matvec of step t (t > 0) and of the rule of step s (s > 0).
  void adjoints(int64_t t, int64_t s) {
    bp_.do_b = t > 0;
    bp_.do_a = s > 0;
    if (bp_.do_b) {
      bp_.g_u = step_ptr<T>(g_u_, t);
      bp_.b_in = h_at(t - 1);
      bp_.b_hebb = hebb_.at(t - 1);
    }
    if (bp_.do_a) {
      bp_.a_hebb = hebb_.at(s - 1);
      bp_.a_elig = retro() ? elig_.at(s - 1) : nullptr;
      bp_.a_pre = h_at(s - 1);
      bp_.a_post = step_ptr<T>(seq_.post, s);
      bp_.a_eta = eta_at(s);
      if (c_.modulation == Modulation::Fanout) bp_.g_eta = step_ptr<T>(g_eta_seq_, s);
    }
    be_.backward(bp_, c_.modes, tl_);
  }

  // g_h = g_in + g_pre_pending: dL/dh_{t-1} through the matvec and the rule of step t, as one
  // column sum (g_pre_pending is the row after g_in's partials).
  void matvec_done(int64_t) {
    be_.sum_rows(g_in_part_.data_ptr<T>(), tiles_ + 1, c_.B * c_.N, g_h_.data_ptr<T>());
  }

  // Once the rule's adjoint of step s has run: the rate's gradient, through the modulator, then
  // the cell's step s; then dL/d(pre of step s) through the rule, for step s's matvec_done.
  void rule_done(int64_t s) {
    const bool modulated = c_.modulation != Modulation::None;
    if (!modulated && !eta_conn()) g_eta_sum_.add_(g_eta_bj_);
    if (modulated) {
      // dL/dm_s = grad_m + dL/deta_s through eta = m ("simple") or fanout(m) (whose dL/deta_s the
      // rule's adjoint wrote into g_eta_seq), then through m's tanh.
      Tensor g_m = c_.modulation == Modulation::Simple
                       ? g_eta_bj_.sum(1, true)
                       : at::mm(g_eta_seq_.select(0, s - 1), *a_.fanout_weight);
      if (saved_.grad_m.has_value()) g_m.add_(saved_.grad_m->select(0, s - 1));
      Tensor g_z_s = g_z_.select(0, s - 1);
      at::tanh_backward_out(g_z_s, g_m, saved_.m.select(0, s - 1));
      g_mod_in_ = at::mm(g_z_s, *a_.h2mod_weight);
    }
    finish_(s, StepGrads{g_post_, g_h_, g_mod_in_});
    be_.sum_rows(g_pre_part_.data_ptr<T>(), tiles_, c_.B * c_.N, g_pre_pending_.data_ptr<T>());
  }

  // After the schedule: dL/dh_0, the initial traces' and the parameters' gradients.
  TraceBackward result() const {
    TraceBackward r;
    r.g_h0 = g_h_;
    r.g_hebb = g_hebb_;
    r.g_elig = g_elig_;
    parameter_grads(
        be_, c_, a_, seq_,
        {saved_.m, g_u_, g_z_, g_eta_seq_, g_eta_sum_, g_alpha_acc_, g_eta_conn_, g_rate_acc_}, r);
    return r;
  }

 private:
  bool retro() const { return c_.modes.rule == Rule::Retroactive; }
  bool eta_conn() const { return c_.modes.eta == EtaMode::PerConnection; }
  const T* h_at(int64_t t) const {
    return t == 0 ? seq_.h0.data_ptr<T>() : step_ptr<T>(seq_.out, t);
  }
  const T* eta_at(int64_t t) const {
    return c_.modulation != Modulation::None ? step_ptr<T>(saved_.eta_seq, t)
                                             : eta_fixed_.data_ptr<T>();
  }

  const Backend& be_;
  const PlasticConfig& c_;
  const PlasticParams<T>& p_;
  const PlasticInputs& a_;
  const CellSequences& seq_;
  const TraceSaved& saved_;
  const int64_t L_;
  const at::Tensor& g_u_;
  Finish& finish_;
  const typename Backend::Tiling tl_;
  const int64_t tiles_;
  Tensor g_hebb_, g_elig_;                        // dL/d(the traces at the current step)
  Tensor seg_h_, seg_e_;                          // the segment's recomputed traces
  SegmentTraces<T> hebb_{}, elig_{};              // the segment in memory (its checkpoint first)
  Tensor g_alpha_acc_, g_eta_conn_, g_rate_acc_;  // the passes' parameter accumulators
  Tensor g_in_part_, g_pre_part_;                 // per column tile, summed by sum_rows
  Tensor g_post_, g_eta_bj_;  // the rule adjoint's dL/dpost and dL/deta of a step
  Tensor g_pre_pending_;      // dL/d(pre of step s+1) through A(s+1), g_in_part_'s last row
  Tensor g_h_;                // their sum, StepGrads::h
  Tensor g_mod_in_;           // dL/d(modulator input) of one step
  Tensor g_z_;                // dL/d(pre-activation of m), all steps
  Tensor g_eta_seq_;          // fanout: dL/deta_t, all steps
  Tensor g_eta_sum_;          // scalar eta: dL/deta_t summed over steps
  Tensor eta_fixed_;          // the unmodulated rate, as the passes read it
  BackwardPassParams<T> bp_{};
};

template <typename T, class Backend, typename Finish>
TraceBackward trace_backward(const Backend& be, const PlasticConfig& c, const PlasticParams<T>& p,
                             const CellSequences& seq, const TraceSaved& saved, int64_t L,
                             const at::Tensor& g_u, Finish&& finish) {
  TraceBackwardSweep<T, Backend, std::remove_reference_t<Finish>> sweep(be, c, p, seq, saved, L,
                                                                        g_u, finish);
  backward_schedule(c.T, L, sweep);
  return sweep.result();
}

}  // namespace bp
