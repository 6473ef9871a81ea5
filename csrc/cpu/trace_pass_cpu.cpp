// CPU trace passes: the tiling, the choice of instruction set, and the parallel loop over tasks
// (the task loops themselves are in trace_tasks.h).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

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

#define BP_DECLARE_TASKS(isa)                                                                  \
  namespace isa {                                                                              \
  template <typename T>                                                                        \
  void forward_tasks(const ForwardPassParams<T>&, const PassModes&, const Tiling&, int64_t,    \
                     int64_t, T*);                                                             \
  template <typename T>                                                                        \
  void backward_tasks(const BackwardPassParams<T>&, const PassModes&, const Tiling&, int64_t,  \
                      int64_t, T*);                                                            \
  }
BP_DECLARE_TASKS(isa_default)
#if defined(__x86_64__) && defined(__GNUC__)
BP_DECLARE_TASKS(isa_avx2)
BP_DECLARE_TASKS(isa_avx512)
#endif

namespace {

// The widest instruction set this CPU runs; BACKPROPAMINE_CPU_ISA=default|avx2|avx512 caps it.
CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::Default;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    best = CpuIsa::Avx512;
#endif
  const char* cap = std::getenv("BACKPROPAMINE_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string want(cap);
  const CpuIsa asked = want == "default" ? CpuIsa::Default
                       : want == "avx2"  ? CpuIsa::Avx2
                       : want == "avx512" ? CpuIsa::Avx512
                                          : CpuIsa::Invalid;
  TORCH_CHECK_VALUE(asked != CpuIsa::Invalid, "BACKPROPAMINE_CPU_ISA must be one of default, "
                    "avx2, avx512, got '", want, "'");
  return std::min(asked, best);
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

template <typename T>
using ForwardTasks = void (*)(const ForwardPassParams<T>&, const PassModes&, const Tiling&,
                              int64_t, int64_t, T*);
template <typename T>
using BackwardTasks = void (*)(const BackwardPassParams<T>&, const PassModes&, const Tiling&,
                               int64_t, int64_t, T*);

#if defined(__x86_64__) && defined(__GNUC__)
#define BP_TASK_TABLE(kind, T) \
  {isa_default::kind<T>, isa_avx2::kind<T>, isa_avx512::kind<T>}
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

int64_t alpha_acc_size(AlphaMode mode, const Tiling& tl, int64_t P, int64_t N) {
  switch (mode) {
    case AlphaMode::Full: return tl.num_chunks * P * N;
    case AlphaMode::Neuron: return tl.num_chunks * N;
    default: return tl.num_chunks * tl.num_tiles;
  }
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    default: return "default";
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

template void forward_pass_cpu<float>(const ForwardPassParams<float>&, const PassModes&,
                                      const Tiling&);
template void forward_pass_cpu<double>(const ForwardPassParams<double>&, const PassModes&,
                                       const Tiling&);
template void backward_pass_cpu<float>(const BackwardPassParams<float>&, const PassModes&,
                                       const Tiling&);
template void backward_pass_cpu<double>(const BackwardPassParams<double>&, const PassModes&,
                                        const Tiling&);

}  // namespace bp
