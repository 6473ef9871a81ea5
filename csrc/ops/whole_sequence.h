// The whole-sequence path of the RNN and LSTM sequence ops, for any Backend that has one
// (sequence_pass.h): the tensors it reads and writes, one backend call per forward and one per
// backward, and the plastic parameters' gradients from what that call leaves (shared with the
// per-step path, trace_sequence.h). The cell is the tanh RNN's, or the LSTM's gates when `lstm`
// is given; the LSTM's own gate parameters are lstm.h's.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "../sequence_pass.h"
#include "trace_sequence.h"

namespace bp {

// Whether a sequence op takes the whole-sequence path at these sizes (sequence_pass.h). The op
// decides it once, before its dtype dispatch: a path forced where it cannot run fails there.
template <class Backend>
bool takes_whole_sequence(const Backend& be, Cell cell, const PlasticConfig& c,
                          const Tensor& like) {
  if constexpr (Backend::kWholeSequence) {
    return be.whole_sequence(cell, c.B, c.N, c.modes.rule == Rule::Retroactive,
                             like.element_size());
  }
  return false;
}

// The LSTM cell's fixed inputs.
struct LstmCellInputs {
  const Tensor& c0;          // (B, N)
  const Tensor& h2g_weight;  // (3N, N), gates i, f, o
  const Tensor& h2g_bias;    // (3N,)
  LstmOptions options;
};

// The LSTM's trace post-synaptic terms post_t (post_input) of a forward's per-step sequences,
// (T, B, N), possibly strided over steps.
inline Tensor lstm_post_sequence(const LstmOptions& o, const Tensor& out, const Tensor& c_seq,
                                 const Tensor& gates) {
  switch (o.post) {
    case PostInput::G:
      return gates.select(1, kGateG);
    case PostInput::U:
      return gates.select(1, kSlotU);
    case PostInput::C:
      return c_seq;
    default:
      return out;
  }
}

// The LSTM modulator's inputs of all steps (modulator_input), (T, B, N), once h_1 .. h_T are
// known (for the forward of "h_prev", lstm.h fills them as it goes).
inline Tensor lstm_modulator_inputs(const LstmOptions& o, const Tensor& h0, const Tensor& out,
                                    const Tensor& c_seq) {
  switch (o.modulator) {
    case ModulatorInput::C:
      return c_seq;
    case ModulatorInput::HPrev:
      return previous_h(h0, out).view(out.sizes());
    default:
      return out;
  }
}

// What the LSTM's backward reads beside the RNN's: the forward's c and gates, dL/dc_t.
struct LstmCellSaved {
  const Tensor& c_seq;
  const Tensor& gates;
  const OptTensor& grad_c;
};

// The forward's outputs; c_seq and gates are empty for the tanh cell.
struct WholeForward {
  Tensor out, hebb_T, elig_T, m, eta_seq, ckpt_h, ckpt_e, c_seq, gates;
};

// The backward's: dL/du_t and dL/dx_t (the RNN's; for the LSTM dL/dx_g,t, which with g_ifo makes
// its input gradient), dL/d(pre-activations of the LSTM's gates i, f, o) and dL/dc_0, and the
// trace half's gradients.
struct WholeBackward {
  Tensor g_u, g_x, g_ifo, g_c0;
  TraceBackward r;
};

// x may be undefined (backward).
template <typename T>
SequenceInputs<T> sequence_inputs(const PlasticConfig& c, const PlasticInputs& a, const Tensor& x,
                                  const OptTensor& clamp, const Tensor& h0, const Tensor& eta_fixed,
                                  const LstmCellInputs* lstm, int64_t L) {
  auto ptr = [](const OptTensor& t) -> const T* {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
  };
  SequenceInputs<T> in{};
  in.steps = c.T;
  in.B = c.B;
  in.N = c.N;
  in.K = c.K;
  in.L = L;
  in.modes = c.modes;
  in.modulation = c.modulation;
  in.cell = lstm != nullptr ? Cell::Lstm : Cell::Tanh;
  in.clip = static_cast<T>(c.clip);
  in.elig_rate = ptr(a.elig_rate);
  in.x = x.defined() ? x.data_ptr<T>() : nullptr;
  in.clamp = clamp.has_value() ? clamp->data_ptr<bool>() : nullptr;
  in.h0 = h0.data_ptr<T>();
  in.hebb0 = a.hebb.data_ptr<T>();
  in.elig0 = ptr(a.elig);
  in.w = a.w.data_ptr<T>();
  in.alpha = a.alpha.data_ptr<T>();
  in.eta_fixed = eta_fixed.defined() ? eta_fixed.data_ptr<T>() : nullptr;
  in.h2mod_w = ptr(a.h2mod_weight);
  in.h2mod_b = ptr(a.h2mod_bias);
  in.fanout_w = ptr(a.fanout_weight);
  in.fanout_b = ptr(a.fanout_bias);
  if (lstm != nullptr) {
    in.lstm = lstm->options;
    in.c0 = lstm->c0.data_ptr<T>();
    in.h2g_w = lstm->h2g_weight.data_ptr<T>();
    in.h2g_b = lstm->h2g_bias.data_ptr<T>();
  }
  return in;
}

template <typename T, class Backend>
WholeForward whole_sequence_forward(const Backend& be, const PlasticConfig& c,
                                    const PlasticInputs& a, const Tensor& x, const Tensor& h0,
                                    const OptTensor& clamp, const LstmCellInputs* lstm, int64_t L) {
  const int64_t T_ = c.T, B = c.B, N = c.N, K = c.K;
  const bool retro = c.modes.rule == Rule::Retroactive;
  const bool modulated = c.modulation != Modulation::None;
  const int64_t n_ckpt = num_checkpoints(T_, L);
  const auto opts = x.options();
  WholeForward f;
  f.out = at::empty({T_, B, N}, opts);
  f.m = at::empty({T_, B, K}, opts);
  f.eta_seq = at::empty({modulated ? T_ : 0, B, N}, opts);
  f.hebb_T = at::empty({B, N, N}, opts);
  f.elig_T = at::empty({retro ? B : 0, N, N}, opts);
  f.ckpt_h = at::empty({n_ckpt, B, N, N}, opts);
  f.ckpt_e = at::empty({retro ? n_ckpt : 0, B, N, N}, opts);
  f.c_seq = at::empty({lstm != nullptr ? T_ : 0, B, N}, opts);
  f.gates = at::empty(
      {lstm != nullptr ? T_ : 0, lstm != nullptr ? lstm_gate_slots(lstm->options) : 4, B, N}, opts);
  Tensor work_h = at::empty({T_ > 1 ? B : 0, N, N}, opts);
  Tensor work_e = at::empty({retro && T_ > 1 ? B : 0, N, N}, opts);
  Tensor u = at::empty({B, N}, opts);
  const Tensor eta_fixed = fixed_rate(c, a.eta);
  SequenceForwardParams<T> p{};
  p.in = sequence_inputs<T>(c, a, x, clamp, h0, eta_fixed, lstm, L);
  p.out = f.out.data_ptr<T>();
  p.m = f.m.data_ptr<T>();
  p.eta_seq = f.eta_seq.data_ptr<T>();
  p.hebb_T = f.hebb_T.data_ptr<T>();
  p.elig_T = f.elig_T.data_ptr<T>();
  p.ckpt_h = f.ckpt_h.data_ptr<T>();
  p.ckpt_e = f.ckpt_e.data_ptr<T>();
  p.work_h = work_h.data_ptr<T>();
  p.work_e = work_e.data_ptr<T>();
  p.u = u.data_ptr<T>();
  p.c_seq = f.c_seq.data_ptr<T>();
  p.gates = f.gates.data_ptr<T>();
  be.sequence_forward(p, be.sequence_groups(B, N, retro, sizeof(T), false));
  return f;
}

template <typename T, class Backend>
WholeBackward whole_sequence_backward(const Backend& be, const PlasticConfig& c,
                                      const PlasticInputs& a, const OptTensor& grad_out,
                                      const TraceSaved& saved, const Tensor& h0, const Tensor& out,
                                      const OptTensor& clamp, const LstmCellInputs* lstm,
                                      const LstmCellSaved* lstm_saved, int64_t L) {
  const int64_t T_ = c.T, B = c.B, N = c.N, K = c.K;
  const bool retro = c.modes.rule == Rule::Retroactive;
  const bool eta_conn = c.modes.eta == EtaMode::PerConnection;
  const auto opts = out.options();
  const auto groups = be.sequence_groups(B, N, retro, sizeof(T), true);
  auto trace_grad = [&](const OptTensor& given) {
    return given.has_value() ? given->clone() : at::zeros({B, N, N}, opts);
  };
  WholeBackward w;
  Tensor g_hebb = trace_grad(saved.grad_hebb);
  Tensor g_elig = retro ? trace_grad(saved.grad_elig) : at::empty({0}, opts);
  w.g_u = at::empty({T_, B, N}, opts);
  const bool own_g_x = clamp.has_value() || (lstm != nullptr && lstm->options.post == PostInput::U);
  w.g_x = own_g_x ? at::empty_like(w.g_u) : w.g_u;
  w.g_ifo = at::empty({lstm != nullptr ? T_ : 0, B, 3 * N}, opts);
  w.g_c0 = at::empty({lstm != nullptr ? B : 0, N}, opts);
  Tensor g_h0 = at::empty({B, N}, opts);
  Tensor g_z = at::empty({T_, B, K}, opts);
  Tensor g_eta_seq = at::empty({c.modulation == Modulation::Fanout ? T_ : 0, B, N}, opts);
  Tensor g_eta_sum = at::zeros({B, N}, opts);
  Tensor g_alpha_acc = at::zeros({be.alpha_acc_size(c.modes.alpha, groups, N, N)}, opts);
  Tensor g_eta_conn = at::zeros({eta_conn ? groups.num_chunks : 0, N, N}, opts);
  Tensor g_rate_acc = at::zeros({groups.num_chunks}, opts);
  const int64_t seg_len = std::min(L, T_);
  Tensor seg_h = at::empty({seg_len - 1, B, N, N}, opts);
  Tensor seg_e = at::empty({retro ? seg_len - 1 : 0, B, N, N}, opts);
  // The backward's step vectors: six, and the LSTM's dL/dc.
  Tensor steps = at::empty({lstm != nullptr ? 7 : 6, B, N}, opts);
  const Tensor eta_fixed = fixed_rate(c, a.eta);
  auto contiguous = [](const OptTensor& t) { return t.has_value() ? t->contiguous() : Tensor(); };
  const Tensor grad_out_c = contiguous(grad_out);
  const Tensor grad_m_c = contiguous(saved.grad_m);
  const Tensor grad_c_c = lstm_saved != nullptr ? contiguous(lstm_saved->grad_c) : Tensor();
  auto ptr = [](const Tensor& t) -> T* { return t.defined() ? t.data_ptr<T>() : nullptr; };

  SequenceBackwardParams<T> p{};
  p.in = sequence_inputs<T>(c, a, Tensor(), clamp, h0, eta_fixed, lstm, L);
  p.out = out.data_ptr<T>();
  p.m = saved.m.data_ptr<T>();
  p.eta_seq = saved.eta_seq.data_ptr<T>();
  p.ckpt_h = saved.ckpt_h.data_ptr<T>();
  p.ckpt_e = saved.ckpt_e.data_ptr<T>();
  p.grad_out = ptr(grad_out_c);
  p.grad_m = ptr(grad_m_c);
  p.grad_c = ptr(grad_c_c);
  if (lstm_saved != nullptr) {
    p.c_seq = lstm_saved->c_seq.data_ptr<T>();
    p.gates = lstm_saved->gates.data_ptr<T>();
  }
  p.g_hebb = g_hebb.data_ptr<T>();
  p.g_elig = ptr(g_elig);
  p.g_u = w.g_u.data_ptr<T>();
  p.g_x = w.g_x.data_ptr<T>();
  p.g_h0 = g_h0.data_ptr<T>();
  p.g_z = g_z.data_ptr<T>();
  p.g_eta_seq = g_eta_seq.data_ptr<T>();
  p.g_eta_post = g_eta_sum.data_ptr<T>();
  p.g_ifo = w.g_ifo.data_ptr<T>();
  p.g_c0 = w.g_c0.data_ptr<T>();
  p.g_alpha_acc = g_alpha_acc.data_ptr<T>();
  p.g_eta_conn = g_eta_conn.data_ptr<T>();
  p.g_rate_acc = g_rate_acc.data_ptr<T>();
  p.seg_h = seg_h.data_ptr<T>();
  p.seg_e = seg_e.data_ptr<T>();
  T* step = steps.data_ptr<T>();
  const int64_t BN = B * N;
  p.g_in = step;
  p.g_pre_a = step + BN;
  p.g_pre_b = step + 2 * BN;
  p.g_h = step + 3 * BN;
  p.g_post = step + 4 * BN;
  p.g_eta = step + 5 * BN;
  if (lstm != nullptr) p.g_c = step + 6 * BN;
  be.sequence_backward(p, groups);

  w.r.g_h0 = g_h0;
  w.r.g_hebb = g_hebb;
  w.r.g_elig = g_elig;
  const Tensor post =
      lstm != nullptr ? lstm_post_sequence(lstm->options, out, lstm_saved->c_seq, lstm_saved->gates)
                      : out;
  const Tensor mod_in =
      lstm != nullptr ? lstm_modulator_inputs(lstm->options, h0, out, lstm_saved->c_seq) : out;
  parameter_grads(be, c, a, {h0, out, post, mod_in},
                  {saved.m, w.g_u, g_z, g_eta_seq, g_eta_sum, g_alpha_acc, g_eta_conn, g_rate_acc},
                  w.r);
  return w;
}

}  // namespace bp
