// The whole-sequence path of the plastic RNN and LSTM sequence ops, for small networks
// (docs/design.md, "The sequence ops: two paths"). The per-step path (ops/trace_sequence.h) runs
// one parallel trace pass per step and the cell and modulator as ATen ops between them: at N = 100
// the step is a few microseconds of work, and the barrier of every pass and the ATen calls
// dominate. Samples are independent (each sample's trace, h and modulator depend only on its own
// past and the shared weights), so here a task owns a group of samples and runs all T steps, the
// trace passes, the cell and the modulator in one loop: one parallel region per call, groups handed
// out dynamically so that a descheduled thread delays only the group it holds.
//
// Both paths compute the same quantities, store the same checkpoints (every L steps) and use the
// same per-task loops of the trace passes (cpu/trace_tasks.h), so either one's backward accepts
// either one's forward. Reductions over samples go through per-group buffers summed in a fixed
// order: results are bitwise reproducible for any thread count.
#pragma once

#include <cstdint>

#include "trace_pass.h"

namespace bp {

// The cell around the plastic drive u_t: the tanh RNN's h_t = tanh(x_t + u_t), or the LSTM's
// gates (plastic_lstm_sequence).
enum class Cell { Tanh, Lstm };

// The LSTM's gates in its (T, S, B, N) gate sequence, each step's gates after their
// nonlinearities, gate-major so that each is a contiguous (B, N) block; with post_input "u" a
// fifth slot (S = 5) keeps the plastic drive u_t, the trace's post-synaptic term.
enum LstmGate : int64_t { kGateI = 0, kGateF = 1, kGateG = 2, kGateO = 3, kSlotU = 4 };

// The LSTM's options (docs/design.md, 'The plastic LSTM'): the post-synaptic term of the Hebbian
// product (post_input "g": g_t, "u": u_t, "c": c_t, "h": h_t) and what the modulator of step t
// reads (modulator_input "h": h_t, "c": c_t, "h_prev": h_{t-1}).
enum class PostInput { G, U, C, H };
enum class ModulatorInput { H, C, HPrev };
struct LstmOptions {
  PostInput post = PostInput::G;
  ModulatorInput modulator = ModulatorInput::H;
};

// Slots per step of the gate sequence: i, f, g, o, and u_t where it is the post-synaptic term.
// In an unnamed namespace, as the templates below: no copy compiled for another instruction set
// may be shared through the linker.
namespace {
inline int64_t lstm_gate_slots(const LstmOptions& o) { return o.post == PostInput::U ? 5 : 4; }
}  // namespace

// The fixed inputs of a sequence: x, the initial state and the parameters. Shapes as in
// plastic_rnn_sequence and plastic_lstm_sequence: P = N; K modulators (0 without modulation).
template <typename T>
struct SequenceInputs {
  int64_t steps, B, N, K;  // steps: T
  int64_t L;               // checkpoint interval
  PassModes modes;
  Modulation modulation;
  Cell cell;
  LstmOptions lstm;  // LSTM: the trace's post-synaptic term and the modulator's input
  T clip;
  const T* elig_rate;  // (), retroactive only: read where the kernels run (no host sync)
  const T* x;          // (T, B, N); LSTM (T, B, 4N), gates i, f, g, o
  const bool* clamp;   // (T, B, N), or null
  const T* h0;         // (B, N)
  const T* hebb0;      // (B, N, N)
  const T* elig0;      // (B, N, N), retroactive only
  const T* w;          // (N, N)
  const T* alpha;      // (N, N), (N,) or ()
  const T* eta_fixed;  // without modulation: (B, N) (EtaMode::PerPost) or (N, N)
  const T* h2mod_w;    // (K, N)
  const T* h2mod_b;    // (K,)
  const T* fanout_w;   // (N, K), modulation "fanout"
  const T* fanout_b;   // (N,)
  const T* c0;         // (B, N), LSTM
  const T* h2g_w;      // (3N, N), LSTM: gates i, f, o
  const T* h2g_b;      // (3N,), LSTM
};

template <typename T>
struct SequenceForwardParams {
  SequenceInputs<T> in;
  T* out;      // (T, B, N)
  T* m;        // (T, B, K)
  T* eta_seq;  // (T, B, N), modulated only
  T* hebb_T;   // (B, N, N)
  T* elig_T;   // (B, N, N), retroactive only
  T* ckpt_h;   // (num_checkpoints(T, L), B, N, N): the trace after steps L, 2L, ...
  T* ckpt_e;   // the same for the eligibility trace, retroactive only
  T* work_h;   // (B, N, N) scratch: the traces between checkpoints
  T* work_e;   // (B, N, N) scratch, retroactive only
  T* u;        // (B, N) scratch: the recurrent drive
  T* c_seq;    // (T, B, N), LSTM
  T* gates;    // (T, S, B, N), LSTM (LstmGate, lstm_gate_slots)
};

template <typename T>
struct SequenceBackwardParams {
  SequenceInputs<T> in;
  // The forward's outputs and the gradients of the sequence op's outputs (each may be null).
  const T* out;      // (T, B, N)
  const T* m;        // (T, B, K)
  const T* eta_seq;  // (T, B, N), modulated only
  const T* ckpt_h;   // as SequenceForwardParams
  const T* ckpt_e;
  const T* grad_out;  // (T, B, N)
  const T* grad_m;    // (T, B, K)
  const T* c_seq;     // LSTM: as SequenceForwardParams
  const T* gates;
  const T* grad_c;  // (T, B, N), LSTM, may be null
  // Gradients. g_hebb and g_elig hold dL/dH_T, dL/dE_T on entry (zero where not given) and
  // dL/dH_0, dL/dE_0 on return.
  T* g_hebb;      // (B, N, N)
  T* g_elig;      // (B, N, N), retroactive only
  T* g_u;         // (T, B, N): dL/du_t (for dL/dw, as a GEMM by the caller)
  T* g_x;         // (T, B, N): dL/dx_t (LSTM: dL/dx_g,t); g_u itself without clamp (or, for
                  // the LSTM, without post_input "u")
  T* g_h0;        // (B, N)
  T* g_z;         // (T, B, K): dL/d(pre-activation of m_t), modulated only
  T* g_eta_seq;   // (T, B, N): dL/deta_t, modulation "fanout" only
  T* g_eta_post;  // (B, N): dL/deta summed over steps, scalar eta without modulation
  T* g_ifo;       // (T, B, 3N), LSTM: dL/d(pre-activations of gates i, f, o)
  T* g_c0;        // (B, N), LSTM
  // Per-group accumulators (zeroed by the caller), summed over groups by the caller.
  T* g_alpha_acc;  // alpha_acc_size(mode, groups, N, N)
  T* g_eta_conn;   // (groups, N, N): eta of shape (N, N) without modulation
  T* g_rate_acc;   // (groups,): elig_rate
  // Scratch, (B, N) each unless said: the step vectors of the backward.
  T* seg_h;              // (min(L, T) - 1, B, N, N): one segment's recomputed traces
  T* seg_e;              // the same, retroactive only
  T* g_in;               // dL/dh_{t-1} through the matvec of step t
  T *g_pre_a, *g_pre_b;  // dL/dh_{s-1} through the rule of step s, double-buffered
  T* g_h;                // the sum of both: dL/dh through step s + 1
  T* g_post;             // dL/dpost_s through the rule of step s
  T* g_eta;              // dL/deta_s (EtaMode::PerPost)
  T* g_c;                // LSTM: dL/dc_s, carried down to step s - 1
};

// Samples per group and number of groups of the CPU whole-sequence path's forward or backward
// (as a Tiling of one column tile, so that the trace passes' per-task loops run on a group
// unchanged). Depends on the sizes and the CPU's cache, never on the thread count.
Tiling sequence_groups(int64_t B, int64_t N, bool retro, int64_t itemsize, bool backward);

// Whether the CPU sequence op of this cell runs the whole-sequence path:
// BACKPROPAMINE_SEQUENCE_PATH=whole or steps forces it, auto (or unset) decides from the sizes
// (cpu/trace_pass_cpu.cpp).
bool use_whole_sequence(Cell cell, int64_t B, int64_t N, bool retro, int64_t itemsize);

// The path BACKPROPAMINE_SEQUENCE_PATH asks for, for every backend: "whole", "steps", or "auto"
// (or unset: the backend decides from the sizes). Anything else is a ValueError naming it.
enum class SequencePath { Auto, Whole, Steps };
SequencePath requested_sequence_path();

// The GPU backends' choice for the tanh cell (cuda/gpu_backend.h): the whole-sequence kernels
// where a block's `need` bytes of shared memory fit the device's `limit`, unless
// BACKPROPAMINE_SEQUENCE_PATH=steps; with =whole a size that does not fit is a ValueError.
// Compiled by the host compiler (sequence_pass.cpp), not nvcc: this ValueError thrown from the
// nvcc-compiled ops crashed the process on the first GPU run (torch 2.11), while the input
// checks' errors, thrown from the C++ sources, reached Python.
bool gpu_whole_sequence(int64_t N, bool retro, int64_t need, int64_t limit);

template <typename T>
void sequence_forward_cpu(const SequenceForwardParams<T>& p, const Tiling& groups);

template <typename T>
void sequence_backward_cpu(const SequenceBackwardParams<T>& p, const Tiling& groups);

// ---------------------------------------------------------------------------------------------
// The order of a sequence's work, shared by both paths (and by every backend) so that they store
// and read the same traces. In an unnamed namespace: the CPU task files compile these templates
// once per instruction set, and no copy may be shared through the linker.
namespace {

// Where step t's new trace goes in the forward: the final trace (t = T), checkpoint t / L - 1
// (the start of segment t / L), or the scratch trace between checkpoints.
template <typename T>
inline T* trace_destination(int64_t t, int64_t T_, int64_t L, T* last, T* checkpoints, T* work,
                            int64_t trace_size) {
  if (t == T_) return last;
  if (t % L == 0) return checkpoints + (t / L - 1) * trace_size;
  return work;
}

// The traces of one segment of the backward, steps start .. start + L - 1: H_start is the
// initial trace (segment 0) or a checkpoint, the others are recomputed into `recomputed`.
template <typename T>
struct SegmentTraces {
  const T* initial;      // H_0 (or E_0)
  const T* checkpoints;  // H_L, H_2L, ...
  T* recomputed;         // H_{start+1} .. H_{start+L-1}
  int64_t trace_size;
  int64_t L;
  int64_t index = -1, start = 0;

  void select(int64_t k) {
    index = k;
    start = k * L;
  }
  const T* at(int64_t t) const {
    if (t == start) return index == 0 ? initial : checkpoints + (index - 1) * trace_size;
    return recomputed + (t - start - 1) * trace_size;
  }
  T* slot(int64_t t) const { return recomputed + (t - start - 1) * trace_size; }
};

// The backward's schedule over the steps (ops/trace_sequence.h describes the passes):
//   ops.load_segment(k)     recompute segment k's traces (and select it in the SegmentTraces)
//   ops.adjoints(t, s)      one sweep: the matvec adjoint of step t (t > 0) and the rule adjoint
//                           of step s (s > 0)
//   ops.matvec_done(t)      dL/dh_{t-1} through step t is complete
//   ops.rule_done(s)        the rule adjoint of step s has run: finish step s
template <typename Ops>
inline void backward_schedule(int64_t T_, int64_t L, Ops& ops) {
  int64_t k = (T_ - 1) / L;
  ops.load_segment(k);
  ops.adjoints(0, T_);
  ops.rule_done(T_);
  for (int64_t t = T_; t >= 1; --t) {
    const int64_t s = t - 1;
    if (s >= 1 && s - 1 >= k * L) {
      ops.adjoints(t, s);
    } else {
      ops.adjoints(t, 0);
      if (s >= 1) {
        ops.load_segment(--k);
        ops.adjoints(0, s);
      }
    }
    ops.matvec_done(t);
    if (s >= 1) ops.rule_done(s);
  }
}

}  // namespace
}  // namespace bp
