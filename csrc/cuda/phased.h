// Kernels written as barrier-separated phases of per-thread functions, so that one source runs
// on a GPU and, compiled by the host compiler, in a CPU emulator that checks every access.
//
// A kernel is a copyable struct K (its parameters are its members) with
//   using Value = ...;                   element type of its shared memory
//   struct Regs { ... };                 per-thread values that live across phases (registers)
//   BP_KERNEL int64_t grid() const;      number of blocks (1-D grid)
//   BP_KERNEL int block() const;         threads per block (1-D)
//   static constexpr int kMaxThreads;    the most block() may be: launch.cuh compiles the kernel
//                                        for it (__launch_bounds__), so that its registers never
//                                        make a launch fail, and checks it at every launch
//   static constexpr int kMinBlocksPerSM;  optional: the blocks of kMaxThreads that must fit on
//                                        an SM at once (launch.cuh: the second __launch_bounds__
//                                        argument, which caps the registers per thread)
//   BP_KERNEL int64_t shared_size() const;  shared memory, in Values
//   BP_KERNEL int phases() const;        number of phases
//   BP_KERNEL void run(int phase, const ThreadPos&, Regs&, Span<Value> shared) const;
// Every thread runs phase 0, then all threads of the block meet at a barrier, then phase 1, ...
// Memory is reached only through Span (global arrays are Span members of K): on the host every
// index is checked against the span's size. No warp intrinsics: the emulator runs the threads of
// a phase one after the other, which is only equivalent when threads communicate through shared
// memory across barriers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BP_KERNEL __host__ __device__ __forceinline__
#else
#define BP_KERNEL inline
#endif

// Unrolls the loop that follows on the device, so that a per-thread array indexed by its counter
// stays in registers (indexed at run time, an array lives in local memory: a stack frame).
#if defined(__CUDA_ARCH__)
#define BP_UNROLL _Pragma("unroll")
#else
#define BP_UNROLL
#endif

#if !defined(__CUDA_ARCH__)
#include <stdexcept>
#include <string>
#endif

namespace bp::kern {

// Where a thread is: block `block` of `grid_dim`, thread `thread` of `block_dim`.
struct ThreadPos {
  int64_t block;
  int thread;
  int64_t grid_dim;
  int block_dim;
};

#if !defined(__CUDA_ARCH__)
[[noreturn]] inline void out_of_bounds(const char* what, int64_t index, int64_t size) {
  throw std::out_of_range(std::string("bp kernel emulator: ") + what + " index " +
                          std::to_string(index) + " out of bounds for size " +
                          std::to_string(size));
}
#endif

// A bounds-checked view of global or shared memory (checked in host code only).
template <typename T>
struct Span {
  T* data = nullptr;
  int64_t size = 0;

  BP_KERNEL T& operator[](int64_t i) const {
#if !defined(__CUDA_ARCH__)
    if (i < 0 || i >= size) out_of_bounds("memory", i, size);
#endif
    return data[i];
  }

  // The n elements from `offset` on.
  BP_KERNEL Span<T> sub(int64_t offset, int64_t n) const {
#if !defined(__CUDA_ARCH__)
    if (offset < 0 || n < 0 || offset + n > size) out_of_bounds("sub-span end", offset + n, size);
#endif
    return {data + offset, n};
  }

  BP_KERNEL bool empty() const { return size == 0; }
};

template <typename T>
Span<T> span_of(T* data, int64_t size) {
  return {data, size};
}

// The sum of column k of src (rows x cols, row-major), from zero in row order: the fixed-order
// reduction of a kernel's partial sums (ColumnSumKernel; the LSTM cell's u, lstm_cell.h).
template <typename T>
BP_KERNEL T column_sum(Span<const T> src, int64_t rows, int64_t cols, int64_t k) {
  T s = T(0);
  for (int64_t r = 0; r < rows; ++r) s += src[r * cols + k];
  return s;
}

}  // namespace bp::kern
