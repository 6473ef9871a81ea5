// The two passes over the B x P x N plastic trace that every op is built from (docs/design.md,
// 'The two trace passes').
//
// Forward pass over one step:  optionally update the trace with the rule,
//   H_t = rule(H_{t-1}, pre_t, post_t, eta_t)                           ("update")
// and, in the same sweep, optionally compute the next step's recurrent drive
//   u[b, j] = sum_i x[b, i] * (w[i, j] + A[i, j] * H[b, i, j])           ("matvec")
// with H the updated trace (or the input trace when not updating).
//
// Backward pass: the adjoint of "matvec" for step t (part B, needs H_{t-1} and du_t) followed, in
// the same sweep, by the adjoint of "update" for step s (part A, needs H_{s-1}); the sequence op
// runs B(t) and A(t-1) together so the trace gradient is read and written once per step.
//
// Work is split into tasks (batch chunk x column tile). Each task owns its outputs, and
// reductions across tasks go through per-task partial buffers summed in a fixed order, so results
// are bitwise reproducible and do not depend on the number of threads.
#pragma once

#include <cstdint>

#include "plastic_math.h"

namespace bp {

struct Tiling {
  int64_t tile_cols;   // columns (post-synaptic neurons) per tile
  int64_t num_tiles;   // ceil(N / tile_cols)
  int64_t num_chunks;  // batch chunks
  int64_t chunk_size;  // samples per chunk (the last one may be shorter)
};

// Depends only on the shapes, never on the thread count (determinism).
Tiling make_tiling(int64_t batch, int64_t post);

// Where a recurrent op's plasticity rate comes from: the parameter eta itself, or a modulator
// m_t = tanh(h2mod(h_t)) applied to every neuron ("simple") or through fanout(m_t).
enum class Modulation { None, Simple, Fanout };

struct PassModes {
  Rule rule;
  AlphaMode alpha;
  EtaMode eta;
};

// The rule's constants as the passes receive them: elig_rate stays where the op's tensors are (a
// device pointer on the GPU) and is read where the pass runs, so no op waits for a copy to the
// host (and the CUDA ops can be captured in a graph).
template <typename T>
struct RuleArgs {
  T clip;
  const T* elig_rate;  // (), retroactive only (null otherwise)
};

// The constants of rule R, read from the op's host memory (the CPU passes).
template <Rule R, typename T>
RuleConsts<T> load_rule_consts(const RuleArgs<T>& a) {
  return {a.clip, has_elig<R>() ? *a.elig_rate : T(0)};
}

template <typename T>
struct ForwardPassParams {
  int64_t B, P, N;
  bool update, matvec;
  // update: hebb_out (and elig_out) may alias hebb (elig); every element is read, then written.
  const T* hebb;  // (B, P, N)  H_{t-1}
  const T* elig;  // (B, P, N)  E_{t-1}, retroactive only
  T* hebb_out;    // (B, P, N)  H_t
  T* elig_out;    // (B, P, N)  E_t
  const T* pre;   // (B, P)
  const T* post;  // (B, N)
  const T* eta;   // (B, N) or (P, N), see EtaMode
  RuleArgs<T> rule_args;
  // matvec
  const T* matvec_in;  // (B, P)  x
  const T* w;          // (P, N)
  const T* alpha;      // (P, N), (N,) or ()
  T* u;                // (B, N); for a backend's forward_u_partials, its partial sums of u
};

template <typename T>
struct BackwardPassParams {
  int64_t B, P, N;
  bool do_b, do_a;
  // Trace gradients, updated in place. On entry: the part of dL/dH_{t-1} that flows through the
  // rule of step t (and dL/dE_{t-1}); after part B: all of dL/dH_{t-1}; after part A (step s):
  // the part of dL/dH_{s-1} through the rule of step s, and dL/dE_{s-1}.
  T* g_hebb;
  T* g_elig;
  // Part B: adjoint of the matvec of step t.
  const T* g_u;     // (B, N)   dL/du_t
  const T* b_in;    // (B, P)   x of the matvec
  const T* b_hebb;  // (B, P, N) H_{t-1}
  const T* w;
  const T* alpha;
  T* g_in_partial;  // (num_tiles, B, P) partial sums over each tile's columns of dL/dx
  T* g_alpha_acc;   // (num_chunks, P, N) | (num_chunks, N) | (num_chunks, num_tiles), accumulated
  // Part A: adjoint of the update of step s.
  const T* a_hebb;  // (B, P, N) H_{s-1}
  const T* a_elig;  // (B, P, N) E_{s-1}
  const T* a_pre;   // (B, P)
  const T* a_post;  // (B, N)
  const T* a_eta;   // (B, N) or (P, N)
  RuleArgs<T> rule_args;
  T* g_pre_partial;  // (num_tiles, B, P) partial sums over columns of dL/dpre_s
  T* g_post;         // (B, N)   dL/dpost_s (overwritten)
  T* g_eta;  // EtaMode::PerPost: (B, N) overwritten; PerConnection: (num_chunks, P, N) accumulated
  T* g_elig_rate_acc;  // (num_chunks, num_tiles), accumulated
};

// The part of a recurrent layer's pass (P == N) that is the same at every step: the sizes, the
// weights and the rule's arguments, for a ForwardPassParams or a BackwardPassParams.
template <class PassParams, typename T>
void set_recurrent_layer(PassParams& pass, int64_t B, int64_t N, const T* w, const T* alpha,
                         const RuleArgs<T>& rule_args) {
  pass.B = B;
  pass.P = N;
  pass.N = N;
  pass.w = w;
  pass.alpha = alpha;
  pass.rule_args = rule_args;
}

// Size of the g_alpha accumulator for a mode.
int64_t alpha_acc_size(AlphaMode mode, const Tiling& tiling, int64_t P, int64_t N);

// Instruction sets of the CPU kernels, narrowest first.
enum class CpuIsa { Default = 0, Avx2 = 1, Avx512 = 2, Invalid = 3 };
// The one the CPU passes use: the fastest for this CPU (the widest it runs, but AVX2 on AMD), or
// the one BACKPROPAMINE_CPU_ISA asks for, capped by what the CPU runs.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

template <typename T>
void forward_pass_cpu(const ForwardPassParams<T>& p, const PassModes& modes, const Tiling& tiling);

template <typename T>
void backward_pass_cpu(const BackwardPassParams<T>& p, const PassModes& modes,
                       const Tiling& tiling);

// out (B, M) = v (B, K) @ w^T (w: (M, K)) + bias (M,) (bias may be null), all contiguous: the rows
// of w split over the threads, each read once for all of v's rows.
template <typename T>
void rows_product_cpu(const T* w, const T* bias, const T* v, int64_t B, int64_t M, int64_t K,
                      T* out);

}  // namespace bp
