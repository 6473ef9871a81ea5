// The per-group loops of the CPU whole-sequence path (sequence_pass.h): a group of samples runs
// all T steps of the forward or the backward, calling the trace passes' per-task loops
// (trace_tasks.h) on its samples directly, and the cell and the modulator inline.
//
// Included after trace_tasks.h by cpu/trace_tasks_<isa>.cpp (same rules: no ATen, nothing inline
// shared with other translation units).
#include "../lstm_cell_math.h"
#include "../sequence_pass.h"

namespace bp {
namespace BP_CPU_ISA {
namespace {

// exp, tanh and the logistic sigmoid in float, so that the loops over a row vectorise: libm's
// tanhf is a call per element and took two thirds of the forward's time at N = 100.
// exp by the usual range reduction to 2^n exp(r), |r| <= ln(2) / 2, with Cephes' expf polynomial;
// the argument is clamped to [-87, 88], where 2^n stays a normal float.
inline float exp_of(float v) {
  const float e = v < -87.f ? -87.f : (v < 88.f ? v : 88.f);
  const float n = __builtin_floorf(e * 1.44269504088896341f + 0.5f);
  const float r = (e - n * 0.693359375f) - n * -2.12194440e-4f;
  const float r2 = r * r;
  const float exp_r = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                         4.1665795894e-2f) *
                            r +
                        1.6666665459e-1f) *
                           r +
                       5.0000001201e-1f) *
                          r2 +
                      r + 1.f;
  return exp_r * __builtin_bit_cast(float, (static_cast<int>(n) + 127) << 23);
}

// tanh: Cephes' tanhf odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above (about 2 ulp;
// tanh(44) rounds to 1). Both branches are computed and one selected.
inline float tanh_of(float v) {
  const float a = v < 0.f ? -v : v;
  const float z2 = v * v;
  const float small =
      ((((-5.70498872745e-3f * z2 + 2.06390887954e-2f) * z2 - 5.37397155531e-2f) * z2 +
        1.33314422036e-1f) *
           z2 -
       3.33332819422e-1f) *
          z2 * v +
      v;
  const float large = 1.f - 2.f / (exp_of(2.f * a) + 1.f);
  return a > 0.625f ? (v < 0.f ? -large : large) : small;
}
inline float sigmoid_of(float v) { return 1.f / (1.f + exp_of(-v)); }
// libm in double: double is for checks.
inline double tanh_of(double v) { return __builtin_tanh(v); }
inline double sigmoid_of(double v) { return 1.0 / (1.0 + __builtin_exp(-v)); }

// The LSTM cell's activations here (lstm_cell_math.h's Act).
struct VectorActivations {
  template <typename T>
  static T sigmoid(T v) {
    return sigmoid_of(v);
  }
  template <typename T>
  static T tanh(T v) {
    return tanh_of(v);
  }
};

template <typename T>
RuleArgs<T> rule_args_of(const SequenceInputs<T>& in) {
  return {in.clip, in.elig_rate};
}

// sum_k a[k] * b[k], with kLanes partial sums added pairwise (fixed order).
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T lanes[kLanes<T>] = {};
  int64_t k = 0;
  for (; k + kLanes<T> <= n; k += kLanes<T>) {
#pragma omp simd
    for (int l = 0; l < kLanes<T>; ++l) lanes[l] += a[k + l] * b[k + l];
  }
  T rest = 0;
  for (; k < n; ++k) rest += a[k] * b[k];
  return sum_lanes(lanes) + rest;
}

// out[g * ld_out + r] = bias[r] + dot(W + r * n, v + g * n, n) for `rows` rows of W (rows, n)
// and G vectors v (bias null: 0): the same sums as dot's, so the result does not depend on G or
// on how the rows are split. Each row of W is read from memory once for all G vectors (and each
// load of it serves up to four). The LSTM's h2g products: three per step on the whole-sequence
// path, its forward's largest part after the trace; rows_product_task on the step-by-step path.
template <typename T>
void matvec_bias(const T* W, const T* bias, const T* v, int64_t G, int64_t rows, int64_t n,
                 int64_t ld_out, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* w = W + r * n;
    const T b = bias != nullptr ? bias[r] : T(0);
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
      const T *v0 = v + g * n, *v1 = v0 + n, *v2 = v1 + n, *v3 = v2 + n;
      T l0[kLanes<T>] = {}, l1[kLanes<T>] = {}, l2[kLanes<T>] = {}, l3[kLanes<T>] = {};
      int64_t k = 0;
      for (; k + kLanes<T> <= n; k += kLanes<T>) {
#pragma omp simd
        for (int l = 0; l < kLanes<T>; ++l) {
          const T x = w[k + l];
          l0[l] += x * v0[k + l];
          l1[l] += x * v1[k + l];
          l2[l] += x * v2[k + l];
          l3[l] += x * v3[k + l];
        }
      }
      T r0 = 0, r1 = 0, r2 = 0, r3 = 0;
      for (; k < n; ++k) {
        r0 += w[k] * v0[k];
        r1 += w[k] * v1[k];
        r2 += w[k] * v2[k];
        r3 += w[k] * v3[k];
      }
      out[g * ld_out + r] = b + (sum_lanes(l0) + r0);
      out[(g + 1) * ld_out + r] = b + (sum_lanes(l1) + r1);
      out[(g + 2) * ld_out + r] = b + (sum_lanes(l2) + r2);
      out[(g + 3) * ld_out + r] = b + (sum_lanes(l3) + r3);
    }
    for (; g < G; ++g) out[g * ld_out + r] = b + dot(w, v + g * n, n);
  }
}

// Step t's gates (and slot u) of the LSTM's gate sequence, (S, B, N); G is T or const T.
template <typename T, typename G>
G* gates_at(const SequenceInputs<T>& in, G* gates, int64_t t) {
  return gates + lstm_gate_slots(in.lstm) * (t - 1) * in.B * in.N;
}

// Where step t's trace update reads its post-synaptic term (h_t; the LSTM's post_input: g_t,
// u_t, c_t or h_t) and the modulator its input (h_t; the LSTM's modulator_input: h_t, c_t or
// h_{t-1}), as (B, N) blocks.
template <typename T>
const T* post_at(const SequenceInputs<T>& in, const T* out, const T* c_seq, const T* gates,
                 int64_t t) {
  const int64_t BN = in.B * in.N;
  if (in.cell == Cell::Tanh) return out + (t - 1) * BN;
  switch (in.lstm.post) {
    case PostInput::G:
      return gates_at(in, gates, t) + kGateG * BN;
    case PostInput::U:
      return gates_at(in, gates, t) + kSlotU * BN;
    case PostInput::C:
      return c_seq + (t - 1) * BN;
    default:
      return out + (t - 1) * BN;
  }
}
template <typename T>
const T* mod_in_at(const SequenceInputs<T>& in, const T* out, const T* c_seq, int64_t t) {
  const int64_t BN = in.B * in.N;
  if (in.cell == Cell::Tanh) return out + (t - 1) * BN;
  switch (in.lstm.modulator) {
    case ModulatorInput::C:
      return c_seq + (t - 1) * BN;
    case ModulatorInput::HPrev:
      return t == 1 ? in.h0 : out + (t - 2) * BN;
    default:
      return out + (t - 1) * BN;
  }
}

// Step t's tanh cell for sample b: h_t = tanh(x_t + u_t) (x_t where clamped).
template <typename T>
void tanh_cell(const SequenceForwardParams<T>& p, int64_t t, int64_t b) {
  const SequenceInputs<T>& in = p.in;
  const int64_t N = in.N, row = ((t - 1) * in.B + b) * N;
  const T* x = in.x + row;
  const T* u = p.u + b * N;
  T* h = p.out + row;
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) h[j] = tanh_of(x[j] + u[j]);
  if (in.clamp != nullptr) {
    const bool* clamp = in.clamp + row;
    for (int64_t j = 0; j < N; ++j) h[j] = clamp[j] ? x[j] : h[j];
  }
}

// Step t's LSTM cell for samples [b0, b1) (reference.lstm_gates): gates i, f, o from x_t and
// h2g(h_{t-1}), g = tanh(x_g + u_t), c_t = f c_{t-1} + i g, h_t = o tanh(c_t); u_t kept in
// slot u where it is the trace's post-synaptic term.
template <typename T>
void lstm_cells(const SequenceForwardParams<T>& p, int64_t t, int64_t b0, int64_t b1) {
  const SequenceInputs<T>& in = p.in;
  const int64_t N = in.N, BN = in.B * N, G = b1 - b0;
  T* gate = gates_at(in, p.gates, t) + b0 * N;
  // h2g(h_{t-1}): the recurrent parts of the pre-activations of i, f, o.
  const T* h_prev = (t == 1 ? in.h0 : p.out + (t - 2) * BN) + b0 * N;
  for (int64_t k : {kGateI, kGateF, kGateO}) {
    const int64_t part = k == kGateO ? 2 : k;  // h2g's rows: i, f, o
    matvec_bias(in.h2g_w + part * N * N, in.h2g_b + part * N, h_prev, G, N, N, N, gate + k * BN);
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = ((t - 1) * in.B + b) * N;
    const T* x = in.x + 4 * row;
    const T* c_prev = t == 1 ? in.c0 + b * N : p.c_seq + row - BN;
    const T* u = p.u + b * N;
    T* i = gates_at(in, p.gates, t) + b * N;
    T *f = i + kGateF * BN, *g = i + kGateG * BN, *o = i + kGateO * BN;
    T* c = p.c_seq + row;
    T* h = p.out + row;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const LstmCellState<T> cell = lstm_cell_state<VectorActivations>(
          x[j] + i[j], x[N + j] + f[j], x[2 * N + j] + u[j], x[3 * N + j] + o[j], c_prev[j]);
      i[j] = cell.i;
      f[j] = cell.f;
      g[j] = cell.g;
      o[j] = cell.o;
      c[j] = cell.c;
      h[j] = cell.h;
    }
    if (in.lstm.post == PostInput::U) {
      T* u_kept = i + kSlotU * BN;
      for (int64_t j = 0; j < N; ++j) u_kept[j] = u[j];
    }
  }
}

// Step t's modulator for sample b: m_t = tanh(h2mod(its input)) and the rate eta_t it sets.
template <typename T>
void modulator(const SequenceForwardParams<T>& p, int64_t t, int64_t b) {
  const SequenceInputs<T>& in = p.in;
  const int64_t N = in.N, K = in.K, step = (t - 1) * in.B;
  const T* input = mod_in_at(in, p.out, p.c_seq, t) + b * N;
  T* m = p.m + (step + b) * K;
  for (int64_t k = 0; k < K; ++k) m[k] = tanh_of(in.h2mod_b[k] + dot(in.h2mod_w + k * N, input, N));
  T* eta = p.eta_seq + (step + b) * N;
  if (in.modulation == Modulation::Simple) {
    for (int64_t j = 0; j < N; ++j) eta[j] = m[0];
  } else {
    for (int64_t j = 0; j < N; ++j) eta[j] = in.fanout_b[j] + dot(in.fanout_w + j * K, m, K);
  }
}

template <typename T, Rule R, AlphaMode AM, EtaMode EM>
void sequence_forward_group(const SequenceForwardParams<T>& p, const Tiling& tl, int64_t group,
                            T* acc) {
  const SequenceInputs<T>& in = p.in;
  const int64_t T_ = in.steps, B = in.B, N = in.N, BN = B * N, BNN = BN * N;
  const bool modulated = in.modulation != Modulation::None;
  const TaskRange r = task_range(tl, B, N, group);
  ForwardPassParams<T> fp{};
  set_recurrent_layer(fp, B, N, in.w, in.alpha, rule_args_of(in));
  fp.u = p.u;
  fp.hebb = in.hebb0;
  fp.matvec_in = in.h0;
  forward_task<T, R, AM, EM, false, true>(fp, r, acc, N);  // u_1
  fp.elig = in.elig0;
  for (int64_t t = 1; t <= T_; ++t) {
    if (in.cell == Cell::Lstm) lstm_cells(p, t, r.b0, r.b1);
    for (int64_t b = r.b0; b < r.b1; ++b) {
      if (in.cell == Cell::Tanh) tanh_cell(p, t, b);
      if (modulated) modulator(p, t, b);
    }
    fp.hebb_out = trace_destination(t, T_, in.L, p.hebb_T, p.ckpt_h, p.work_h, BNN);
    if constexpr (has_elig<R>())
      fp.elig_out = trace_destination(t, T_, in.L, p.elig_T, p.ckpt_e, p.work_e, BNN);
    fp.pre = t == 1 ? in.h0 : p.out + (t - 2) * BN;
    fp.post = post_at(in, p.out, p.c_seq, p.gates, t);
    fp.eta = modulated ? p.eta_seq + (t - 1) * BN : in.eta_fixed;
    fp.matvec_in = p.out + (t - 1) * BN;  // h_t
    if (t < T_)
      forward_task<T, R, AM, EM, true, true>(fp, r, acc, N);
    else
      forward_task<T, R, AM, EM, true, false>(fp, r, acc, N);
    fp.hebb = fp.hebb_out;
    fp.elig = fp.elig_out;
  }
}

// The backward of a group: backward_schedule with the trace passes on the group's samples and
// the modulator's and the cell's backward inline.
template <typename T, Rule R, AlphaMode AM, EtaMode EM>
struct GroupBackward {
  const SequenceBackwardParams<T>& p;
  const SequenceInputs<T>& in;
  const Tiling& tl;
  int64_t group;
  TaskRange r;
  T* scratch;     // backward_task's (2 * chunk_size * N)
  T* g_mod_in;    // (N,): dL/d(the modulator's input) of a sample's step
  T* g_h_sum;     // (chunk_size, N): LSTM: dL/dh of the group's samples' step, every path
  T* g_h_prev;    // (chunk_size, N): modulator_input "h_prev": dL/dh_{s-1} through step s's
                  // modulator, from rule_done(s) to matvec_done(s)
  bool mod_prev;  // the modulator reads h_{t-1}
  int64_t BN, BNN;
  bool modulated;
  SegmentTraces<T> hebb, elig;
  BackwardPassParams<T> bp;
  const T* g_pre_pending;  // dL/dh_{s} through the rule of step s + 1 (last rule adjoint)

  GroupBackward(const SequenceBackwardParams<T>& p_, const Tiling& tl_, int64_t g, T* scr)
      : p(p_),
        in(p_.in),
        tl(tl_),
        group(g),
        r(task_range(tl_, in.B, in.N, g)),
        scratch(scr),
        g_mod_in(scr + 2 * tl_.chunk_size * in.N),
        g_h_sum(g_mod_in + in.N),
        g_h_prev(g_h_sum + tl_.chunk_size * in.N),
        mod_prev(in.cell == Cell::Lstm && in.lstm.modulator == ModulatorInput::HPrev &&
                 in.modulation != Modulation::None),
        BN(in.B * in.N),
        BNN(BN * in.N),
        modulated(in.modulation != Modulation::None),
        hebb{in.hebb0, p_.ckpt_h, p_.seg_h, BNN, in.L},
        elig{in.elig0, p_.ckpt_e, p_.seg_e, BNN, in.L},
        bp{},
        g_pre_pending(p_.g_pre_a) {
    set_recurrent_layer(bp, in.B, in.N, in.w, in.alpha, rule_args_of(in));
    bp.g_hebb = p.g_hebb;
    bp.g_elig = p.g_elig;
    bp.g_in_partial = p.g_in;  // one column tile: the partial sums are the sums
    bp.g_alpha_acc = p.g_alpha_acc;
    bp.g_pre_partial = p.g_pre_a;
    bp.g_post = p.g_post;
    bp.g_eta = EM == EtaMode::PerConnection ? p.g_eta_conn : p.g_eta;
    bp.g_elig_rate_acc = p.g_rate_acc;
    // Nothing reaches h_T from a step T + 1.
    fill_zero(p.g_h + r.b0 * in.N, (r.b1 - r.b0) * in.N);
  }

  const T* h_at(int64_t t) const { return t == 0 ? in.h0 : p.out + (t - 1) * BN; }
  const T* post_of(int64_t t) const { return post_at(in, p.out, p.c_seq, p.gates, t); }
  const T* eta_at(int64_t t) const { return modulated ? p.eta_seq + (t - 1) * BN : in.eta_fixed; }

  void load_segment(int64_t k) {
    hebb.select(k);
    elig.select(k);
    const int64_t end = hebb.start + in.L < in.steps ? hebb.start + in.L : in.steps;
    ForwardPassParams<T> fp{};
    set_recurrent_layer(fp, in.B, in.N, in.w, in.alpha, bp.rule_args);
    for (int64_t t = hebb.start + 1; t < end; ++t) {
      fp.hebb = hebb.at(t - 1);
      fp.hebb_out = hebb.slot(t);
      if constexpr (has_elig<R>()) {
        fp.elig = elig.at(t - 1);
        fp.elig_out = elig.slot(t);
      }
      fp.pre = h_at(t - 1);
      fp.post = post_of(t);
      fp.eta = eta_at(t);
      forward_task<T, R, AM, EM, true, false>(fp, r, nullptr, in.N);
    }
  }

  void adjoints(int64_t t, int64_t s) {
    if (t > 0) {
      bp.g_u = p.g_u + (t - 1) * BN;
      bp.b_in = h_at(t - 1);
      bp.b_hebb = hebb.at(t - 1);
    }
    if (s > 0) {
      // The other buffer than the pending one: A(s) must not overwrite what matvec_done reads.
      bp.g_pre_partial = g_pre_pending == p.g_pre_a ? p.g_pre_b : p.g_pre_a;
      bp.a_hebb = hebb.at(s - 1);
      if constexpr (has_elig<R>()) bp.a_elig = elig.at(s - 1);
      bp.a_pre = h_at(s - 1);
      bp.a_post = post_of(s);
      bp.a_eta = eta_at(s);
    }
    if (t > 0 && s > 0)
      backward_task<T, R, AM, EM, true, true>(bp, tl, r, group, scratch);
    else if (t > 0)
      backward_task<T, R, AM, EM, true, false>(bp, tl, r, group, scratch);
    else
      backward_task<T, R, AM, EM, false, true>(bp, tl, r, group, scratch);
  }

  // g_h = dL/dh_{t-1} through step t: its matvec (g_in), its rule (pending) and, for
  // modulator_input "h_prev", its modulator.
  void matvec_done(int64_t t) {
    T* g_h = t == 1 ? p.g_h0 : p.g_h;
    for (int64_t j = r.b0 * in.N; j < r.b1 * in.N; ++j) g_h[j] = p.g_in[j] + g_pre_pending[j];
    if (mod_prev) {
      const T* g_mod = g_h_prev - r.b0 * in.N;
      for (int64_t j = r.b0 * in.N; j < r.b1 * in.N; ++j) g_h[j] += g_mod[j];
    }
  }

  // The rule adjoint of step s has run (rate and post gradients): the modulator's and the cell's
  // backward of step s give dL/du_s and dL/dx_s.
  void rule_done(int64_t s) {
    if (in.cell == Cell::Lstm) recurrent_gate_grads(s);
    for (int64_t b = r.b0; b < r.b1; ++b) {
      modulator_backward(s, b);
      if (in.cell == Cell::Lstm)
        lstm_cell_backward(s, b);
      else
        tanh_cell_backward(s, b);
    }
    g_pre_pending = bp.g_pre_partial;
  }

  // The rate's gradient of step s, and through the modulator dL/dz_s and g_mod_in.
  void modulator_backward(int64_t s, int64_t b) {
    const int64_t N = in.N, K = in.K, step = (s - 1) * in.B, row = (step + b) * N;
    const T* g_eta = p.g_eta + b * N;
    if (!modulated && EM == EtaMode::PerPost) {
      for (int64_t j = 0; j < N; ++j) p.g_eta_post[b * N + j] += g_eta[j];
    }
    if (in.modulation == Modulation::Fanout) {
      for (int64_t j = 0; j < N; ++j) p.g_eta_seq[row + j] = g_eta[j];
    }
    if (!modulated) return;
    const T* m = p.m + (step + b) * K;
    T* g_z = p.g_z + (step + b) * K;
    for (int64_t k = 0; k < K; ++k) {
      T g_m = 0;  // dL/dm_s through eta = m ("simple") or fanout(m)
      if (in.modulation == Modulation::Simple) {
        for (int64_t j = 0; j < N; ++j) g_m += g_eta[j];
      } else {
        for (int64_t j = 0; j < N; ++j) g_m += g_eta[j] * in.fanout_w[j * K + k];
      }
      if (p.grad_m != nullptr) g_m += p.grad_m[(step + b) * K + k];
      g_z[k] = g_m * (T(1) - m[k] * m[k]);
    }
    for (int64_t j = 0; j < N; ++j) {
      T g = 0;
      for (int64_t k = 0; k < K; ++k) g += g_z[k] * in.h2mod_w[k * N + j];
      g_mod_in[j] = g;
    }
  }

  // dL/dh_s from every path, through the tanh (or the clamp).
  void tanh_cell_backward(int64_t s, int64_t b) {
    const int64_t N = in.N, row = ((s - 1) * in.B + b) * N;
    const T* h = p.out + row;
    const T* g_post = p.g_post + b * N;
    const T* g_hs = p.g_h + b * N;
    T* g_u = p.g_u + row;
    for (int64_t j = 0; j < N; ++j) {
      T g = g_post[j] + g_hs[j];
      if (p.grad_out != nullptr) g += p.grad_out[row + j];
      if (modulated) g += g_mod_in[j];
      g_u[j] = g * (T(1) - h[j] * h[j]);
      if (in.clamp != nullptr) {
        // Clamped: h_s = x_s, so the gradient goes to x_s and none to u_s.
        const bool clamped = in.clamp[row + j];
        p.g_x[row + j] = clamped ? g : g_u[j];
        g_u[j] = clamped ? T(0) : g_u[j];
      }
    }
  }

  // g_h_sum = dL/dh_s through the gates i, f, o of step s + 1 (g_ifo_{s+1} @ h2g_w) for the
  // group's samples: each row of h2g_w is read from memory once for all of them.
  void recurrent_gate_grads(int64_t s) {
    const int64_t N = in.N, G = r.b1 - r.b0;
    fill_zero(g_h_sum, G * N);
    if (s == in.steps) return;
    const T* g_next = p.g_ifo + (s * in.B + r.b0) * 3 * N;
    for (int64_t q = 0; q < 3 * N; ++q) {
      const T* w_row = in.h2g_w + q * N;
      for (int64_t g = 0; g < G; ++g) {
        const T coef = g_next[g * 3 * N + q];
        T* dh = g_h_sum + g * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) dh[j] += coef * w_row[j];
      }
    }
  }

  // The LSTM cell's backward of step s (as lstm.h's per-step path): dL/dh_s from the gates i, f,
  // o of step s + 1 (recurrent_gate_grads), the trace, the output, the modulator and the rule
  // (post_input "h"); dL/dc_s from h_s, c_{s+1}, the output c, the modulator and the rule ("c");
  // then the gates' pre-activation gradients (g's is dL/du_s, which the rule's post gradient
  // reaches through tanh' for "g", directly for "u").
  void lstm_cell_backward(int64_t s, int64_t b) {
    const int64_t N = in.N, B = in.B, row = ((s - 1) * B + b) * N;
    const bool last = s == in.steps;
    const PostInput post = in.lstm.post;
    const ModulatorInput mod_input = in.lstm.modulator;
    const T* gate = gates_at(in, p.gates, s) + b * N;
    const T *i = gate + kGateI * BN, *f = gate + kGateF * BN, *g = gate + kGateG * BN,
            *o = gate + kGateO * BN;
    const T* c = p.c_seq + row;
    const T* c_prev = s == 1 ? in.c0 + b * N : p.c_seq + row - BN;
    const T* f_next = last ? nullptr : gates_at(in, p.gates, s + 1) + kGateF * BN + b * N;
    const T* g_post = p.g_post + b * N;
    T* dh = g_h_sum + (b - r.b0) * N;
    const T* g_hs = p.g_h + b * N;
    for (int64_t j = 0; j < N; ++j) dh[j] += g_hs[j];
    if (p.grad_out != nullptr) {
      for (int64_t j = 0; j < N; ++j) dh[j] += p.grad_out[row + j];
    }
    const bool mod_h = modulated && mod_input == ModulatorInput::H;
    const bool mod_c = modulated && mod_input == ModulatorInput::C;
    T* g_c = p.g_c + b * N;
    T* g_u = p.g_u + row;
    T* g_ifo = p.g_ifo + ((s - 1) * B + b) * 3 * N;
    for (int64_t j = 0; j < N; ++j) {
      const LstmCellGrads<T> d = lstm_cell_grads<VectorActivations>(
          i[j], f[j], g[j], o[j], c[j], c_prev[j], mod_h ? dh[j] + g_mod_in[j] : dh[j],
          last ? T(0) : g_c[j] * f_next[j], p.grad_c != nullptr ? p.grad_c[row + j] : T(0),
          mod_c ? g_mod_in[j] : T(0), g_post[j], post);
      p.g_x[row + j] = d.pre_g;
      g_u[j] = d.u;
      g_ifo[j] = d.pre_i;
      g_ifo[N + j] = d.pre_f;
      g_ifo[2 * N + j] = d.pre_o;
      g_c[j] = d.dc;
    }
    if (s == 1) {
      for (int64_t j = 0; j < N; ++j) p.g_c0[b * N + j] = g_c[j] * f[j];
    }
    if (mod_prev) {
      T* g_prev = g_h_prev + (b - r.b0) * N;
      for (int64_t j = 0; j < N; ++j) g_prev[j] = g_mod_in[j];
    }
  }
};

template <typename T, Rule R, AlphaMode AM, EtaMode EM>
void sequence_backward_group(const SequenceBackwardParams<T>& p, const Tiling& tl, int64_t group,
                             T* scratch) {
  GroupBackward<T, R, AM, EM> ops(p, tl, group, scratch);
  backward_schedule(p.in.steps, p.in.L, ops);
}

}  // namespace

// Runs group `group` of the forward; scratch holds chunk_size * N values.
template <typename T>
void sequence_forward_group_any(const SequenceForwardParams<T>& p, const Tiling& tl, int64_t group,
                                T* scratch) {
  dispatch_modes(p.in.modes, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
    sequence_forward_group<T, R, AM, EM>(p, tl, group, scratch);
  });
}

// Runs group `group` of the backward; scratch holds (4 * chunk_size + 1) * N values.
template <typename T>
void sequence_backward_group_any(const SequenceBackwardParams<T>& p, const Tiling& tl,
                                 int64_t group, T* scratch) {
  dispatch_modes(p.in.modes, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
    sequence_backward_group<T, R, AM, EM>(p, tl, group, scratch);
  });
}

// Rows [r0, r0 + rows) of out (B, M) = v (B, K) @ w^T (M, K) + bias (M,) (bias may be null).
template <typename T>
void rows_product_task(const T* w, const T* bias, const T* v, int64_t B, int64_t M, int64_t K,
                       int64_t r0, int64_t rows, T* out) {
  matvec_bias(w + r0 * K, bias != nullptr ? bias + r0 : nullptr, v, B, rows, K, M, out + r0);
}

template void rows_product_task<float>(const float*, const float*, const float*, int64_t, int64_t,
                                       int64_t, int64_t, int64_t, float*);
template void rows_product_task<double>(const double*, const double*, const double*, int64_t,
                                        int64_t, int64_t, int64_t, int64_t, double*);
template void sequence_forward_group_any<float>(const SequenceForwardParams<float>&, const Tiling&,
                                                int64_t, float*);
template void sequence_forward_group_any<double>(const SequenceForwardParams<double>&,
                                                 const Tiling&, int64_t, double*);
template void sequence_backward_group_any<float>(const SequenceBackwardParams<float>&,
                                                 const Tiling&, int64_t, float*);
template void sequence_backward_group_any<double>(const SequenceBackwardParams<double>&,
                                                  const Tiling&, int64_t, double*);

}  // namespace BP_CPU_ISA
}  // namespace bp
