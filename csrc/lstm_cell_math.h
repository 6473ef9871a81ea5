// The plastic LSTM cell's math for one element (reference.lstm_gates and the cell update of
// reference.plastic_lstm_step, and their gradients), written once for every path: the per-step
// element functions (lstm_cell.h: CPU backend, GPU kernel, emulator) and the CPU whole-sequence
// loops (cpu/sequence_tasks.h), which pass their own vectorising activations. Plain scalar code
// with internal linkage, so the per-ISA CPU translation units may include it.
#pragma once

#include "plastic_math.h"
#include "sequence_pass.h"

namespace bp {

// The activations in T's own precision (expf, tanhf for float): the same calls on the host, in
// the emulator and on the GPU. The CPU whole-sequence path passes its vectorising ones instead.
struct TypedActivations {
  template <typename T>
  BP_HOST_DEVICE T sigmoid(T v) {
    if constexpr (sizeof(T) == sizeof(float))
      return T(1) / (T(1) + expf(-v));
    else
      return T(1) / (T(1) + exp(-v));
  }
  template <typename T>
  BP_HOST_DEVICE T tanh(T v) {
    return typed_tanh(v);
  }
};

// From the gates' pre-activations and c_{t-1}: the gates, c_t = f c_{t-1} + i g and
// h_t = o tanh(c_t).
template <typename T>
struct LstmCellState {
  T i, f, g, o, c, h;
};

template <typename Act, typename T>
BP_HOST_DEVICE LstmCellState<T> lstm_cell_state(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmCellState<T> s;
  s.i = Act::sigmoid(pre_i);
  s.f = Act::sigmoid(pre_f);
  s.g = Act::tanh(pre_g);
  s.o = Act::sigmoid(pre_o);
  s.c = s.f * c_prev + s.i * s.g;
  s.h = Act::tanh(s.c) * s.o;
  return s;
}

// Its backward: dc = dL/dc_t and the gradients of the pre-activations; u = dL/du_t (the plastic
// drive's), which is pre_g except for post_input "u", where the rule's gradient adds directly.
template <typename T>
struct LstmCellGrads {
  T dc, pre_i, pre_f, pre_g, pre_o, u;
};

// dh: dL/dh_t through every path but the rule's (which g_post brings for post_input "h", "c",
// "g", "u"); dc_next, dc_out, dc_mod: dL/dc_t through c_{t+1}, the output c and a modulator that
// reads c_t (0 where absent).
template <typename Act, typename T>
BP_HOST_DEVICE LstmCellGrads<T> lstm_cell_grads(T i, T f, T g, T o, T c, T c_prev, T dh, T dc_next,
                                                T dc_out, T dc_mod, T g_post, PostInput post) {
  if (post == PostInput::H) dh += g_post;
  const T tc = Act::tanh(c);
  LstmCellGrads<T> d;
  d.dc = dh * o * (T(1) - tc * tc) + dc_next + dc_out + dc_mod;
  if (post == PostInput::C) d.dc += g_post;
  // Through g (whose tanh the rule's gradient also passes for "g").
  d.pre_g = (post == PostInput::G ? g_post + d.dc * i : d.dc * i) * (T(1) - g * g);
  d.u = post == PostInput::U ? d.pre_g + g_post : d.pre_g;
  d.pre_i = d.dc * g * (i * (T(1) - i));
  d.pre_f = d.dc * c_prev * (f * (T(1) - f));
  d.pre_o = dh * tc * (o * (T(1) - o));
  return d;
}

}  // namespace bp
