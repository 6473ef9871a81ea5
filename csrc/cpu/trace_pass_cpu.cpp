// CPU trace passes and whole sequences: the tiling and grouping, the choice of instruction set
// and of path, and the parallel loops over tasks (the task loops themselves are in trace_tasks.h
// and sequence_tasks.h).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "../sequence_pass.h"
#include "../trace_pass.h"

namespace bp {

namespace {
constexpr int64_t kMinTileCols = 256;
constexpr int64_t kMinTasks = 4;
// Enough tasks to keep the cores busy at small N; fixed so the split never depends on threads.
constexpr int64_t kTargetTasks = 8;
// Trace elements below which a pass is not worth splitting across threads.
constexpr int64_t kMinElemsPerThread = 1 << 15;
}  // namespace

#define BP_DECLARE_TASKS(isa)                                                                     \
  namespace isa {                                                                                 \
  template <typename T>                                                                           \
  void forward_tasks(const ForwardPassParams<T>&, const PassModes&, const Tiling&, int64_t,       \
                     int64_t, T*);                                                                \
  template <typename T>                                                                           \
  void backward_tasks(const BackwardPassParams<T>&, const PassModes&, const Tiling&, int64_t,     \
                      int64_t, T*);                                                               \
  template <typename T>                                                                           \
  void sequence_forward_group_any(const SequenceForwardParams<T>&, const Tiling&, int64_t, T*);   \
  template <typename T>                                                                           \
  void sequence_backward_group_any(const SequenceBackwardParams<T>&, const Tiling&, int64_t, T*); \
  template <typename T>                                                                           \
  void rows_product_task(const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,        \
                         int64_t, T*);                                                            \
  }
BP_DECLARE_TASKS(isa_default)
#if defined(__x86_64__) && defined(__GNUC__)
BP_DECLARE_TASKS(isa_avx2)
BP_DECLARE_TASKS(isa_avx512)
#endif

namespace {

// The fastest instruction set for this CPU: the widest it runs, except AVX-512 on AMD, whose
// cores split 512-bit operations into two 256-bit halves (the AVX2 build measured about 10%
// faster on an AMD EPYC with AVX-512; on Intel, AVX-512 about 10% faster than AVX2).
// BACKPROPAMINE_CPU_ISA=default|avx2|avx512 asks for one, capped by what the CPU runs.
CpuIsa detect_cpu_isa() {
  CpuIsa widest = CpuIsa::Default;
  bool amd = false;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) widest = CpuIsa::Avx2;
  if (widest == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    widest = CpuIsa::Avx512;
  amd = __builtin_cpu_is("amd");
#endif
  const char* cap = std::getenv("BACKPROPAMINE_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return amd ? std::min(widest, CpuIsa::Avx2) : widest;
  const std::string want(cap);
  const CpuIsa asked = want == "default"  ? CpuIsa::Default
                       : want == "avx2"   ? CpuIsa::Avx2
                       : want == "avx512" ? CpuIsa::Avx512
                                          : CpuIsa::Invalid;
  TORCH_CHECK_VALUE(asked != CpuIsa::Invalid,
                    "BACKPROPAMINE_CPU_ISA must be one of default, "
                    "avx2, avx512, got '",
                    want, "'");
  return std::min(asked, widest);
}

// Runs the tasks of a pass in parallel with the kernels of the selected instruction set.
template <typename T, typename Params, typename Tasks>
void run_pass(const Params& p, const PassModes& modes, const Tiling& tl, int64_t scratch_rows,
              Tasks tasks) {
  const auto fn = tasks[static_cast<int>(cpu_isa())];
  // Small passes run on one thread: waking the pool costs more than they take.
  const int64_t task_elems = p.P * tl.chunk_size * tl.tile_cols;
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerThread / task_elems);
  at::parallel_for(0, tl.num_chunks * tl.num_tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(scratch_rows * tl.chunk_size * tl.tile_cols);
    fn(p, modes, tl, begin, end, scratch.data());
  });
}

// Runs the groups of a whole sequence, handed out one at a time: a thread the OS deschedules
// holds up only the group it is running, not every step of the others.
template <typename T, typename Params, typename Group>
void run_groups(const Params& p, const Tiling& tl, int64_t scratch_size, Group group_fn) {
  const auto fn = group_fn[static_cast<int>(cpu_isa())];
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tl.num_chunks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<T> scratch(scratch_size);
    for (int64_t g = next++; g < tl.num_chunks; g = next++) fn(p, tl, g, scratch.data());
  });
}

// The CPU's level-2 cache per core, bytes (512 KiB where the OS does not say).
int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{512} << 10;
  }();
  return bytes;
}

// Traces (B x N x N each) a sample of the whole-sequence path keeps hot per step: the forward
// updates one trace (and the eligibility trace) in place; the backward reads H_{t-1} and H_{t-2}
// and updates dL/dH (each doubled by the eligibility trace).
int64_t hot_traces_per_sample(bool retro, bool backward) {
  return (backward ? 3 : 1) * (retro ? 2 : 1);
}

template <typename T>
using ForwardTasks = void (*)(const ForwardPassParams<T>&, const PassModes&, const Tiling&, int64_t,
                              int64_t, T*);
template <typename T>
using BackwardTasks = void (*)(const BackwardPassParams<T>&, const PassModes&, const Tiling&,
                               int64_t, int64_t, T*);

template <typename T>
using RowsProductTasks = void (*)(const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, T*);
template <typename T>
using SequenceForwardGroups = void (*)(const SequenceForwardParams<T>&, const Tiling&, int64_t, T*);
template <typename T>
using SequenceBackwardGroups = void (*)(const SequenceBackwardParams<T>&, const Tiling&, int64_t,
                                        T*);

#if defined(__x86_64__) && defined(__GNUC__)
#define BP_TASK_TABLE(kind, T) {isa_default::kind<T>, isa_avx2::kind<T>, isa_avx512::kind<T>}
#else
#define BP_TASK_TABLE(kind, T) {isa_default::kind<T>, isa_default::kind<T>, isa_default::kind<T>}
#endif

}  // namespace

Tiling make_tiling(int64_t batch, int64_t post) {
  // Split the batch first: a task then streams whole trace rows, which the hardware prefetchers
  // follow (row pieces separated by jumps are much slower). Split the columns too only when there
  // are fewer than kMinTasks chunks, into tiles of at least kMinTileCols.
  Tiling t;
  t.chunk_size = std::max<int64_t>(1, batch / kTargetTasks);
  t.num_chunks = (batch + t.chunk_size - 1) / t.chunk_size;
  const int64_t want_tiles = (kMinTasks + t.num_chunks - 1) / t.num_chunks;
  const int64_t cols = (post + want_tiles - 1) / want_tiles;
  t.tile_cols = std::min(post, std::max(kMinTileCols, (cols + 15) / 16 * 16));
  t.num_tiles = (post + t.tile_cols - 1) / t.tile_cols;
  return t;
}

Tiling sequence_groups(int64_t B, int64_t N, bool retro, int64_t itemsize, bool backward) {
  // As many samples per group as fit in half of L2 beside w and alpha, so that w and alpha rows
  // are read once per group and step; at least kTargetTasks groups where B allows, for balance.
  const int64_t trace = N * N * itemsize;
  const int64_t room = l2_cache_bytes() / 2 - 2 * trace;
  const int64_t fit = std::max<int64_t>(1, room / (hot_traces_per_sample(retro, backward) * trace));
  Tiling t;
  t.chunk_size = std::min(fit, std::max<int64_t>(1, (B + kTargetTasks - 1) / kTargetTasks));
  t.num_chunks = (B + t.chunk_size - 1) / t.chunk_size;
  t.tile_cols = N;
  t.num_tiles = 1;
  return t;
}

bool use_whole_sequence(Cell cell, int64_t B, int64_t N, bool retro, int64_t itemsize) {
  const SequencePath want = requested_sequence_path();
  if (want != SequencePath::Auto) return want == SequencePath::Whole;
  // The LSTM's h2g (3N x N) is read once per group and step there, against once per step for the
  // whole batch by the step-by-step path's GEMM: only where it stays in the core's cache. (At
  // the PTB layer's size, B = 6 and N = 1149, 16 MB read by each of 6 groups made the forward
  // 1.5x slower.)
  if (cell == Cell::Lstm && 3 * N * N * itemsize > l2_cache_bytes()) return false;
  // Both paths run the same per-task loops; the whole sequence saves a parallel region per step
  // and degrades gracefully when a thread is descheduled. The step-by-step path wins only where
  // it has more tasks to spread: a few samples of a wide layer, whose columns it also splits.
  const Tiling steps = make_tiling(B, N);
  const Tiling groups = sequence_groups(B, N, retro, itemsize, true);
  return groups.num_chunks >= std::min(steps.num_chunks * steps.num_tiles, kTargetTasks);
}

int64_t alpha_acc_size(AlphaMode mode, const Tiling& tl, int64_t P, int64_t N) {
  switch (mode) {
    case AlphaMode::Full:
      return tl.num_chunks * P * N;
    case AlphaMode::Neuron:
      return tl.num_chunks * N;
    default:
      return tl.num_chunks * tl.num_tiles;
  }
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx2:
      return "avx2";
    case CpuIsa::Avx512:
      return "avx512";
    default:
      return "default";
  }
}

template <typename T>
void forward_pass_cpu(const ForwardPassParams<T>& p, const PassModes& modes, const Tiling& tl) {
  static const ForwardTasks<T> tasks[] = BP_TASK_TABLE(forward_tasks, T);
  run_pass<T>(p, modes, tl, 1, tasks);
}

template <typename T>
void backward_pass_cpu(const BackwardPassParams<T>& p, const PassModes& modes, const Tiling& tl) {
  static const BackwardTasks<T> tasks[] = BP_TASK_TABLE(backward_tasks, T);
  run_pass<T>(p, modes, tl, 2, tasks);
}

template <typename T>
void sequence_forward_cpu(const SequenceForwardParams<T>& p, const Tiling& tl) {
  static const SequenceForwardGroups<T> groups[] = BP_TASK_TABLE(sequence_forward_group_any, T);
  run_groups<T>(p, tl, tl.chunk_size * p.in.N, groups);
}

template <typename T>
void sequence_backward_cpu(const SequenceBackwardParams<T>& p, const Tiling& tl) {
  static const SequenceBackwardGroups<T> groups[] = BP_TASK_TABLE(sequence_backward_group_any, T);
  run_groups<T>(p, tl, (4 * tl.chunk_size + 1) * p.in.N, groups);
}

template <typename T>
void rows_product_cpu(const T* w, const T* bias, const T* v, int64_t B, int64_t M, int64_t K,
                      T* out) {
  static const RowsProductTasks<T> tasks[] = BP_TASK_TABLE(rows_product_task, T);
  const auto fn = tasks[static_cast<int>(cpu_isa())];
  // Blocks of rows of about kMinElemsPerThread elements of w; each output element is one dot
  // product in a fixed order, so the split does not change the result.
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerThread / std::max<int64_t>(1, K));
  at::parallel_for(0, M, grain,
                   [&](int64_t r0, int64_t r1) { fn(w, bias, v, B, M, K, r0, r1 - r0, out); });
}

template void rows_product_cpu<float>(const float*, const float*, const float*, int64_t, int64_t,
                                      int64_t, float*);
template void rows_product_cpu<double>(const double*, const double*, const double*, int64_t,
                                       int64_t, int64_t, double*);

template void forward_pass_cpu<float>(const ForwardPassParams<float>&, const PassModes&,
                                      const Tiling&);
template void forward_pass_cpu<double>(const ForwardPassParams<double>&, const PassModes&,
                                       const Tiling&);
template void backward_pass_cpu<float>(const BackwardPassParams<float>&, const PassModes&,
                                       const Tiling&);
template void backward_pass_cpu<double>(const BackwardPassParams<double>&, const PassModes&,
                                        const Tiling&);

template void sequence_forward_cpu<float>(const SequenceForwardParams<float>&, const Tiling&);
template void sequence_forward_cpu<double>(const SequenceForwardParams<double>&, const Tiling&);
template void sequence_backward_cpu<float>(const SequenceBackwardParams<float>&, const Tiling&);
template void sequence_backward_cpu<double>(const SequenceBackwardParams<double>&, const Tiling&);

}  // namespace bp
