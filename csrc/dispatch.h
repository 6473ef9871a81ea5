// Runtime option values -> compile-time template arguments of the trace kernels.
#pragma once

#include <ATen/core/TensorBody.h>
#include <c10/util/Exception.h>

#include "trace_pass.h"

namespace bp {

template <Rule R, AlphaMode AM, typename F>
void dispatch_eta(EtaMode eta, F&& f) {
  if (eta == EtaMode::PerPost)
    f.template operator()<R, AM, EtaMode::PerPost>();
  else
    f.template operator()<R, AM, EtaMode::PerConnection>();
}

template <Rule R, typename F>
void dispatch_alpha(const PassModes& m, F&& f) {
  switch (m.alpha) {
    case AlphaMode::Full:
      return dispatch_eta<R, AlphaMode::Full>(m.eta, f);
    case AlphaMode::Neuron:
      return dispatch_eta<R, AlphaMode::Neuron>(m.eta, f);
    case AlphaMode::Scalar:
      return dispatch_eta<R, AlphaMode::Scalar>(m.eta, f);
  }
}

// Calls f.template operator()<Rule, AlphaMode, EtaMode>() for the modes in m.
template <typename F>
void dispatch_modes(const PassModes& m, F&& f) {
  switch (m.rule) {
    case Rule::Clip:
      return dispatch_alpha<Rule::Clip>(m, f);
    case Rule::SoftClip:
      return dispatch_alpha<Rule::SoftClip>(m, f);
    case Rule::Decay:
      return dispatch_alpha<Rule::Decay>(m, f);
    case Rule::Oja:
      return dispatch_alpha<Rule::Oja>(m, f);
    case Rule::Retroactive:
      return dispatch_alpha<Rule::Retroactive>(m, f);
    case Rule::ClipOnRead:
      return dispatch_alpha<Rule::ClipOnRead>(m, f);
  }
}

// Calls f.template operator()<float or double>() for the dtype of `like` (validated before).
template <typename F>
auto dispatch_float(const at::Tensor& like, const char* op, F&& f) {
  if (like.scalar_type() == at::kDouble) return f.template operator()<double>();
  TORCH_CHECK(like.scalar_type() == at::kFloat, op, ": unsupported dtype ", like.scalar_type());
  return f.template operator()<float>();
}

}  // namespace bp
