// The plastic LSTM's cell on the per-step path as one phased kernel (phased.h) per step forward
// and one backward: a thread per element (sample, neuron) runs lstm_cell.h's math, which the CPU
// backend runs in a loop. In place of the ~16 pointwise ATen ops (launches) of the cell forward
// and ~30 of its backward (csrc/cuda/NOTES.md, "The LSTM cell kernel").
#pragma once

#include <cstdint>
#include <type_traits>

#include "../lstm_cell.h"
#include "phased.h"

namespace bp::kern {

constexpr int kCellThreads = 256;  // threads per block, one element each

enum class CellPass { Forward, Backward };

template <typename T, CellPass P>
struct LstmCellKernel {
  using Value = T;
  using Args =
      std::conditional_t<P == CellPass::Forward, LstmCellForwardArgs<T>, LstmCellBackwardArgs<T>>;
  static constexpr int kMaxThreads = kCellThreads;
  struct Regs {};
  Args args;

  BP_KERNEL int64_t grid() const { return (args.B * args.N + kCellThreads - 1) / kCellThreads; }
  BP_KERNEL int block() const { return kCellThreads; }
  BP_KERNEL int64_t shared_size() const { return 0; }
  BP_KERNEL int phases() const { return 1; }

  BP_KERNEL void run(int, const ThreadPos& pos, Regs&, Span<T>) const {
    const int64_t k = pos.block * kCellThreads + pos.thread;
    if (k >= args.B * args.N) return;
    if constexpr (P == CellPass::Forward)
      lstm_cell_forward_element(args, k / args.N, k % args.N);
    else
      lstm_cell_backward_element(args, k / args.N, k % args.N);
  }
};

}  // namespace bp::kern
