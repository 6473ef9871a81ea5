// The plastic LSTM's cell on the per-step path, one element (sample b, neuron j) at a time: the
// forward of reference.lstm_gates and the cell update, and its backward (the gradients of
// reference.plastic_lstm_step's cell), gathering each element's terms for lstm_cell_math.h. The
// CPU backend runs them in a loop (cpu/cpu_backend.h), the GPU backend as one kernel per step
// (cuda/lstm_cell_kernels.h), which the CPU emulator also runs. Inputs are contiguous; an empty
// Span is an absent term.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/phased.h"
#include "lstm_cell_math.h"
#include "sequence_pass.h"

namespace bp {

// Step t's cell: the gates from x_t, h2g(h_{t-1}) and u_t, c_t and h_t.
template <typename T>
struct LstmCellForwardArgs {
  int64_t B, N;
  PostInput post;
  kern::Span<const T> x;     // (B, 4N) x_t: the input parts of gates i, f, g, o
  kern::Span<const T> rec;   // (B, 3N) h_{t-1} @ h2g_weight^T, without the bias: i, f, o
  kern::Span<const T> bias;  // (3N,) h2g_bias: i, f, o
  // (rows, B, N) the trace pass's partial sums of the plastic drive u_t, which is their column
  // sum in row order (kern::column_sum; one row, u_t itself, from the CPU pass)
  kern::Span<const T> u_partial;
  kern::Span<const T> h_prev;  // (B, N) h_{t-1}
  kern::Span<const T> c_prev;  // (B, N) c_{t-1}
  kern::Span<T> gates;         // (S, B, N) step t's gates (LstmGate), and u_t for post_input "u"
  kern::Span<T> c, h;          // (B, N) c_t, h_t
  kern::Span<T> mod_in;        // (B, N) a copy of h_{t-1} for modulator_input "h_prev"; or empty
};

template <typename T>
BP_HOST_DEVICE void lstm_cell_forward_element(const LstmCellForwardArgs<T>& a, int64_t b,
                                              int64_t j) {
  const int64_t N = a.N, BN = a.B * N, k = b * N + j;
  const int64_t x_row = b * 4 * N + j, rec_row = b * 3 * N + j;
  const T u = kern::column_sum(a.u_partial, a.u_partial.size / BN, BN, k);
  const LstmCellState<T> s = lstm_cell_state<TypedActivations>(
      a.x[x_row] + (a.bias[j] + a.rec[rec_row]),
      a.x[x_row + N] + (a.bias[N + j] + a.rec[rec_row + N]), a.x[x_row + 2 * N] + u,
      a.x[x_row + 3 * N] + (a.bias[2 * N + j] + a.rec[rec_row + 2 * N]), a.c_prev[k]);
  a.gates[kGateI * BN + k] = s.i;
  a.gates[kGateF * BN + k] = s.f;
  a.gates[kGateG * BN + k] = s.g;
  a.gates[kGateO * BN + k] = s.o;
  if (a.post == PostInput::U) a.gates[kSlotU * BN + k] = u;
  a.c[k] = s.c;
  a.h[k] = s.h;
  if (!a.mod_in.empty()) a.mod_in[k] = a.h_prev[k];
}

// Step s's cell backward: dL/dh_s and dL/dc_s from every path that reaches them, then the gates'
// pre-activation gradients; dL/dc_s is carried down to step s - 1 in g_c.
template <typename T>
struct LstmCellBackwardArgs {
  int64_t B, N;
  PostInput post;
  kern::Span<const T> gates;      // (S, B, N) step s's gates
  kern::Span<const T> f_next;     // (B, N) gate f of step s + 1; empty for s = T
  kern::Span<const T> c, c_prev;  // (B, N) c_s, c_{s-1}
  kern::Span<const T> g_h;        // (B, N) dL/dh_s through the trace half (StepGrads::h)
  kern::Span<const T> g_h_gates;  // (B, N) dL/dh_s through step s + 1's gates i, f, o; or empty
  kern::Span<const T> grad_out;   // (B, N) the gradient of the output h_s; or empty
  kern::Span<const T> grad_c;     // (B, N) the gradient of the output c_s; or empty
  // dL/dh_s through a modulator (step s's for modulator_input "h", step s + 1's for "h_prev"),
  // dL/dc_s through step s's (for "c"); or empty.
  kern::Span<const T> g_h_mod, g_c_mod;
  kern::Span<const T> g_post;  // (B, N) dL/dpost_s through the rule of step s
  kern::Span<T> g_c;           // (B, N) in: dL/dc_{s+1} (read where f_next is given); out: dL/dc_s
  kern::Span<T> g_pre_g;       // (B, N) dL/d(pre-activation of g), x_g's gradient
  kern::Span<T> g_u;           // (B, N) dL/du_s for post_input "u" (else it is g_pre_g); or empty
  kern::Span<T> g_ifo;         // (B, 3N) dL/d(pre-activations of i, f, o)
  kern::Span<T> g_c0;          // (B, N) dL/dc_0 = dL/dc_1 f_1, for s = 1; or empty
};

template <typename T>
BP_HOST_DEVICE void lstm_cell_backward_element(const LstmCellBackwardArgs<T>& a, int64_t b,
                                               int64_t j) {
  const int64_t N = a.N, BN = a.B * N, k = b * N + j;
  // dL/dh_s through the trace half, step s + 1's gates, the output and a modulator.
  T dh = a.g_h[k];
  if (!a.g_h_gates.empty()) dh += a.g_h_gates[k];
  if (!a.grad_out.empty()) dh += a.grad_out[k];
  if (!a.g_h_mod.empty()) dh += a.g_h_mod[k];
  const T f = a.gates[kGateF * BN + k];
  const LstmCellGrads<T> d = lstm_cell_grads<TypedActivations>(
      a.gates[kGateI * BN + k], f, a.gates[kGateG * BN + k], a.gates[kGateO * BN + k], a.c[k],
      a.c_prev[k], dh, a.f_next.empty() ? T(0) : a.g_c[k] * a.f_next[k],
      a.grad_c.empty() ? T(0) : a.grad_c[k], a.g_c_mod.empty() ? T(0) : a.g_c_mod[k], a.g_post[k],
      a.post);
  a.g_pre_g[k] = d.pre_g;
  if (a.post == PostInput::U) a.g_u[k] = d.u;
  const int64_t row = b * 3 * N + j;
  a.g_ifo[row] = d.pre_i;
  a.g_ifo[row + N] = d.pre_f;
  a.g_ifo[row + 2 * N] = d.pre_o;
  a.g_c[k] = d.dc;
  if (!a.g_c0.empty()) a.g_c0[k] = d.dc * f;
}

}  // namespace bp
