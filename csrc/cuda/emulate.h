// The CPU emulator of phased kernels (phased.h): runs a launch block by block and, inside a
// block, phase by phase, each phase thread by thread. Barriers are the phase boundaries, so the
// result equals the GPU's for any kernel whose threads only communicate through shared memory
// across barriers. Every memory access goes through a bounds-checked Span; shared memory starts
// as NaN (or a poison integer) in every block, so reading it before writing shows up.
//
// A race (a thread reading, within one phase, what another thread of the block writes in that
// phase) makes the result depend on the order the threads run in. The emulator can run them in
// reverse order (set_reverse_thread_order): a test compares both orders bitwise.
#pragma once

#include <limits>
#include <vector>

#include "phased.h"

namespace bp::kern {

// Thread order inside a phase: 0..n-1, or n-1..0 (for race checks).
inline bool& reverse_thread_order() {
  static bool reverse = false;
  return reverse;
}

template <typename V>
V poison() {
  if constexpr (std::numeric_limits<V>::has_quiet_NaN) return std::numeric_limits<V>::quiet_NaN();
  return std::numeric_limits<V>::min();
}

template <class K>
void emulate(const K& k) {
  using V = typename K::Value;
  const int64_t grid = k.grid();
  const int block = k.block();
  const int phases = k.phases();
  std::vector<V> shared(k.shared_size());
  std::vector<typename K::Regs> regs(block);
  const Span<V> smem{shared.data(), static_cast<int64_t>(shared.size())};
  for (int64_t b = 0; b < grid; ++b) {
    std::fill(shared.begin(), shared.end(), poison<V>());
    std::fill(regs.begin(), regs.end(), typename K::Regs{});
    const bool reverse = reverse_thread_order();
    for (int p = 0; p < phases; ++p) {
      for (int n = 0; n < block; ++n) {
        const int t = reverse ? block - 1 - n : n;
        k.run(p, ThreadPos{b, t, grid, block}, regs[t], smem);
      }
    }
  }
}

}  // namespace bp::kern
