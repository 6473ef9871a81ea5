// Types shared by the op implementations (csrc/ops/).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace bp {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

namespace detail {
template <size_t n, typename... Ts>
struct TensorsOf {
  using type = typename TensorsOf<n - 1, Tensor, Ts...>::type;
};
template <typename... Ts>
struct TensorsOf<0, Ts...> {
  using type = std::tuple<Ts...>;
};
}  // namespace detail
// std::tuple of n Tensors: the return type of an op with n outputs.
template <size_t n>
using Tensors = typename detail::TensorsOf<n>::type;

}  // namespace bp
