// The kernels that every backend of the ops shares, registered for both namespaces (the real
// ops and the emulated CUDA ones) above the device kernels in the dispatcher:
//   ADInplaceOrView: the rollout step bumps the version counters of the traces it writes, so
//     that autograd raises on a graph that saved them, as after any in-place op;
//   AutocastCPU, AutocastCUDA: under torch.autocast every op runs in float32.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "ops/register.h"

namespace bp {

namespace {

// The rollout step writes the new traces into hebb_out and elig_out when they are given, else
// into hebb and elig (see reference.plastic_rnn_rollout_step): exactly those are bumped.
void bump_rollout_step_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t first = stack->size() - schema.arguments().size();
  auto argument = [&](const char* name) -> const c10::IValue& {
    return (*stack)[first + *schema.argumentIndexWithName(name)];
  };
  std::vector<at::Tensor> written;
  for (const auto& [trace, out] : {std::pair{"hebb", "hebb_out"}, std::pair{"elig", "elig_out"}}) {
    const c10::IValue& target = argument(out).isTensor() ? argument(out) : argument(trace);
    if (target.isTensor()) written.push_back(target.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

// PyTorch's "fp32" autocast policy, as for its own recurrent ops: floating-point tensors in a
// lower precision are cast to float32 (float64 stays), except the traces that the rollout step
// updates in place, which a cast copy would leave unchanged (the op's dtype check names them).
template <c10::DispatchKey autocast_key, c10::DeviceType device>
void run_in_float32(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                    torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  for (size_t k = 0; k < arguments.size(); ++k) {
    c10::IValue& value = (*stack)[first + k];
    const c10::AliasInfo* alias = arguments[k].alias_info();
    if (value.isTensor() && !(alias != nullptr && alias->isWrite()))
      value = at::autocast::cached_cast(at::kFloat, value.toTensor(), device);
  }
  // Nothing inside the op is autocast again: its own matrix products stay in float32.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, autocast_key),
                     stack);
}

void impl_in_place_versions(torch::Library& m) {
  m.impl("plastic_rnn_rollout_step",
         torch::CppFunction::makeFromBoxedFunction<&bump_rollout_step_versions>());
}

template <c10::DispatchKey autocast_key, c10::DeviceType device>
void impl_autocast(torch::Library& m) {
  for (const char* name : kOpNames)
    m.impl(name,
           torch::CppFunction::makeFromBoxedFunction<&run_in_float32<autocast_key, device>>());
}

}  // namespace

}  // namespace bp

TORCH_LIBRARY_IMPL(backpropamine, ADInplaceOrView, m) { bp::impl_in_place_versions(m); }
TORCH_LIBRARY_IMPL(backpropamine_emulated, ADInplaceOrView, m) { bp::impl_in_place_versions(m); }

TORCH_LIBRARY_IMPL(backpropamine, AutocastCPU, m) {
  bp::impl_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>(m);
}
TORCH_LIBRARY_IMPL(backpropamine, AutocastCUDA, m) {
  bp::impl_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>(m);
}
// The emulated CUDA ops take CPU tensors.
TORCH_LIBRARY_IMPL(backpropamine_emulated, AutocastCPU, m) {
  bp::impl_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>(m);
}
