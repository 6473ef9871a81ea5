// Per-element formulas of the plasticity rules, of the trace as the plastic matvec reads it, and
// their derivatives (docs/design.md, 'Trace rules' and 'Gradients of the trace rules').
// Shared by the CPU and CUDA kernels so that the CPU tests exercise the formulas the GPU runs.
#pragma once

#include <cmath>

// `static`: every translation unit gets its own copy, so the CPU kernels compiled for several
// instruction sets (cpu/trace_tasks_*.cpp) never share one through the linker.
#if defined(__CUDACC__)
#define BP_HOST_DEVICE static __host__ __device__ __forceinline__
#else
#define BP_HOST_DEVICE static inline __attribute__((always_inline))
#endif

namespace bp {

enum class Rule { Clip, SoftClip, Decay, Oja, Retroactive, ClipOnRead };
// Shape of alpha: (P, N), (N,) or ().
enum class AlphaMode { Full, Neuron, Scalar };
// Shape of the plasticity rate seen by the kernels: (B, N) per sample and post neuron (covers
// scalar eta, "simple" and "fanout"), or (P, N) per connection (eta_shape "full").
enum class EtaMode { PerPost, PerConnection };

// tanh in T's own precision (tanhf for float): the same call on the host, in the emulator, and on
// the GPU.
template <typename T>
BP_HOST_DEVICE T typed_tanh(T v) {
  if constexpr (sizeof(T) == sizeof(float))
    return tanhf(v);
  else
    return tanh(v);
}

// Clamp to [-c, c] that lets NaN through, as torch.clamp does.
template <typename T>
BP_HOST_DEVICE T clamp_sym(T s, T c) {
  return s < -c ? -c : (s > c ? c : s);
}

// torch.clamp's gradient mask: passes where -c <= s <= c (false for NaN).
template <typename T>
BP_HOST_DEVICE T clamp_mask(T s, T c) {
  return ((s >= -c) & (s <= c)) ? T(1) : T(0);  // `&`, not `&&`: no branch
}

template <typename T>
struct RuleConsts {
  T clip;       // bound c of clip, softclip, retroactive and clip_on_read
  T elig_rate;  // learned rate of the eligibility trace (retroactive only)
};

// New trace values. hebb/elig: H_{t-1}, E_{t-1}; pre p_i, post q_j, rate eta.
template <Rule R, typename T>
BP_HOST_DEVICE void rule_forward(T hebb, T elig, T pre, T post, T eta, RuleConsts<T> k, T& hebb_out,
                                 T& elig_out) {
  const T prod = pre * post;
  if constexpr (R == Rule::Clip) {
    hebb_out = clamp_sym(hebb + eta * prod, k.clip);
  } else if constexpr (R == Rule::SoftClip) {
    // Both branches computed, then selected: keeps the loop free of branches (vectorisable).
    const T z = eta * prod, h_c = hebb / k.clip;
    const T soft = z * (z > T(0) ? T(1) - h_c : T(1) + h_c);
    hebb_out = clamp_sym(hebb + soft, k.clip);
  } else if constexpr (R == Rule::Decay) {
    hebb_out = (T(1) - eta) * hebb + eta * prod;
  } else if constexpr (R == Rule::Oja) {
    hebb_out = hebb + eta * post * (pre - hebb * post);
  } else if constexpr (R == Rule::Retroactive) {
    // The trace moves along the eligibility trace from *before* this step.
    hebb_out = clamp_sym(hebb + eta * elig, k.clip);
    elig_out = (T(1) - k.elig_rate) * elig + k.elig_rate * prod;
  } else {  // ClipOnRead: unbounded here, clamped where it is read (trace_read)
    hebb_out = hebb + eta * prod;
  }
}

// Gradients of one rule application, given the gradients of its outputs.
template <typename T>
struct RuleGrads {
  T hebb, elig, pre, post, eta, elig_rate;
};

template <Rule R, typename T>
BP_HOST_DEVICE RuleGrads<T> rule_backward(T g_hebb_out, T g_elig_out, T hebb, T elig, T pre, T post,
                                          T eta, RuleConsts<T> k) {
  RuleGrads<T> g{T(0), T(0), T(0), T(0), T(0), T(0)};
  const T prod = pre * post;
  if constexpr (R == Rule::Clip) {
    const T gs = g_hebb_out * clamp_mask(hebb + eta * prod, k.clip);
    const T g_prod = gs * eta;
    g.hebb = gs;
    g.eta = gs * prod;
    g.pre = g_prod * post;
    g.post = g_prod * pre;
  } else if constexpr (R == Rule::SoftClip) {
    const T z = eta * prod, h_c = hebb / k.clip, z_c = z / k.clip;
    const bool positive = z > T(0);
    const T dsoft_dz = positive ? T(1) - h_c : T(1) + h_c;
    const T gs = g_hebb_out * clamp_mask(hebb + z * dsoft_dz, k.clip);
    const T g_z = gs * dsoft_dz;
    g.hebb = gs * (positive ? T(1) - z_c : T(1) + z_c);
    g.eta = g_z * prod;
    g.pre = g_z * eta * post;
    g.post = g_z * eta * pre;
  } else if constexpr (R == Rule::Decay) {
    g.hebb = g_hebb_out * (T(1) - eta);
    g.eta = g_hebb_out * (prod - hebb);
    g.pre = g_hebb_out * eta * post;
    g.post = g_hebb_out * eta * pre;
  } else if constexpr (R == Rule::Oja) {
    g.hebb = g_hebb_out * (T(1) - eta * post * post);
    g.eta = g_hebb_out * post * (pre - hebb * post);
    g.pre = g_hebb_out * eta * post;
    g.post = g_hebb_out * eta * (pre - T(2) * hebb * post);
  } else if constexpr (R == Rule::Retroactive) {
    const T gs = g_hebb_out * clamp_mask(hebb + eta * elig, k.clip);
    const T g_prod = g_elig_out * k.elig_rate;
    g.hebb = gs;
    g.elig = gs * eta + g_elig_out * (T(1) - k.elig_rate);
    g.eta = gs * elig;
    g.elig_rate = g_elig_out * (prod - elig);
    g.pre = g_prod * post;
    g.post = g_prod * pre;
  } else {  // ClipOnRead
    const T g_prod = g_hebb_out * eta;
    g.hebb = g_hebb_out;
    g.eta = g_hebb_out * prod;
    g.pre = g_prod * post;
    g.post = g_prod * pre;
  }
  return g;
}

// The trace as the plastic matvec reads it: w + A * trace_read(H). Every rule but clip_on_read
// reads H itself.
template <Rule R, typename T>
BP_HOST_DEVICE T trace_read(T hebb, RuleConsts<T> k) {
  if constexpr (R == Rule::ClipOnRead) return clamp_sym(hebb, k.clip);
  return hebb;
}

// The gradient g of trace_read(H) carried back to H. As torch.clamp's gradient, it is 0 outside
// the bound, also where g is NaN (a product with the mask would keep the NaN).
template <Rule R, typename T>
BP_HOST_DEVICE T trace_read_backward(T g, T hebb, RuleConsts<T> k) {
  if constexpr (R == Rule::ClipOnRead) return clamp_mask(hebb, k.clip) != T(0) ? g : T(0);
  return g;
}

template <Rule R>
BP_HOST_DEVICE constexpr bool has_elig() {
  return R == Rule::Retroactive;
}

}  // namespace bp
