// Input validation of every op, in one place. Each check names the argument, the expected and
// the actual value. Shapes, dtypes, devices and contiguity raise RuntimeError; option values
// (rule names, clip, checkpoint_every) raise ValueError.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "ops.h"
#include "sequence_pass.h"
#include "trace_pass.h"

namespace bp {

// Everything the tensors and option strings of a plastic recurrent call select.
struct PlasticConfig {
  PassModes modes;
  Modulation modulation;
  int64_t T, B, N, K;  // K: number of modulators (0 without modulation)
  double clip;
};

// The plastic part of a recurrent layer: the trace state, its parameters and the modulator.
struct PlasticInputs {
  const at::Tensor& hebb;
  const OptTensor& elig;
  const at::Tensor& w;
  const at::Tensor& alpha;
  const OptTensor& eta;
  const OptTensor& elig_rate;
  const OptTensor& h2mod_weight;
  const OptTensor& h2mod_bias;
  const OptTensor& fanout_weight;
  const OptTensor& fanout_bias;
};

// x (T, B, N) for sequences, (B, N) for a step; h (B, N). The backward ops pass their output
// (out, h_new) as x, named x_name in the messages.
PlasticConfig check_rnn_inputs(const char* op, const at::Tensor& x, const at::Tensor& h,
                               const PlasticInputs& in, const std::string& rule, double clip,
                               bool sequence, const char* x_name = "x");

struct LstmConfig {
  PlasticConfig plastic;
  LstmOptions options;  // modulator_input and post_input
};

// x: the gates' inputs (T, B, 4N) for sequences, (B, 4N) for a step (x_width 4), or, for the
// backward ops, the output (T, B, N) or (B, N) (x_width 1, named x_name); h, c (B, N);
// h2g_weight (3N, N), h2g_bias (3N,); modulator_input "h", "c" or "h_prev"; post_input "g",
// "u", "c" or "h".
LstmConfig check_lstm_inputs(const char* op, const at::Tensor& x, int64_t x_width,
                             const at::Tensor& h, const at::Tensor& c, const at::Tensor& h2g_weight,
                             const at::Tensor& h2g_bias, const PlasticInputs& in,
                             const std::string& rule, double clip,
                             const std::string& modulator_input, const std::string& post_input,
                             bool sequence, const char* x_name = "x");

// The RNN's optional clamp mask: bool, on x's device, x's shape ((T, B, N) or (B, N)).
void check_clamp(const char* op, const OptTensor& clamp, const at::Tensor& x);

// The rollout step's optional drive u: x's dtype, device and shape (B, N), contiguous.
void check_drive(const char* op, const OptTensor& u, const at::Tensor& x);

// A tensor argument and its name, for messages.
using NamedTensor = std::pair<const char*, at::Tensor>;
using NamedOptTensor = std::pair<const char*, OptTensor>;

// What a recurrent backward op takes besides its forward's inputs and the output checked as x
// (check_rnn_inputs, check_lstm_inputs), named as in its schema: the gradients of the forward's
// outputs, each optional, and the forward's outputs saved for the backward. Shapes as the
// sequence ops have them, (T, ...) per step; the step ops' (sequence false) drop the T, and
// they have no checkpoints.
struct RecurrentBackwardArgs {
  bool sequence;
  std::vector<NamedOptTensor> step_grads;  // (T, B, N) each: grad_out (and grad_c)
  const OptTensor& grad_hebb;              // (B, N, N)
  const OptTensor& grad_elig;              // (B, N, N), rule "retroactive" only
  const OptTensor& grad_m;                 // (T, B, K)
  std::vector<NamedTensor> step_saved;     // (T, B, N) each: the LSTM's c_seq
  const at::Tensor* gates;                 // the LSTM's (T, S, B, N), else nullptr
  int64_t gate_slots;                      // S (lstm_gate_slots), with gates
  NamedTensor m;                           // (T, B, K); K = 0 without modulation
  NamedTensor eta;                         // the rates (T, B, N); without modulation (0, B, N),
                                           // for a step (0,)
  const at::Tensor* hebb_checkpoints;      // (ceil(T / L) - 1, B, N, N), sequences only
  const at::Tensor* elig_checkpoints;      // the same for rule "retroactive", else (0, B, N, N)
  int64_t checkpoint_every;                // L, sequences only
};
void check_recurrent_backward(const char* op, const PlasticConfig& c, const at::Tensor& like,
                              const RecurrentBackwardArgs& args);

// The rollout step's optional outputs for the new traces, hebb_out and elig_out: both or neither
// (elig_out only with elig), each like the trace it replaces, and either that trace itself (in
// place) or apart from it, from each other and from every tensor in `others`.
void check_trace_outputs(const char* op, const OptTensor& hebb_out, const OptTensor& elig_out,
                         const at::Tensor& hebb, const OptTensor& elig,
                         const std::vector<NamedTensor>& others);

void check_checkpoint_every(const char* op, int64_t checkpoint_every);

// Traces a sequence op of T >= 1 steps stores, one after every L steps but the last: the
// forward's output and the backward's input. ceil(T / L) - 1, without the overflow of T + L - 1
// for an L near the int64 limit.
inline int64_t num_checkpoints(int64_t T, int64_t L) { return (T - 1) / L; }

// Plastic feed-forward primitives (docs/design.md, 'Feed-forward primitives').
AlphaMode check_matvec_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& alpha, const at::Tensor& hebb);

// matvec's backward: the forward's inputs and grad_u (B, N).
AlphaMode check_matvec_backward_inputs(const char* op, const at::Tensor& grad_u,
                                       const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& alpha, const at::Tensor& hebb);

// eta: (B, 1, N) -> EtaMode::PerPost, or (1, P, N) -> EtaMode::PerConnection.
PassModes check_hebb_update_inputs(const char* op, const at::Tensor& hebb, const at::Tensor& pre,
                                   const at::Tensor& post, const at::Tensor& eta,
                                   const OptTensor& elig, const OptTensor& elig_rate,
                                   const std::string& rule, double clip);

// hebb_update's backward: the forward's inputs and the gradients of its outputs, each optional
// (grad_elig_new for rule "retroactive" only).
PassModes check_hebb_update_backward_inputs(const char* op, const OptTensor& grad_hebb_new,
                                            const OptTensor& grad_elig_new, const at::Tensor& hebb,
                                            const at::Tensor& pre, const at::Tensor& post,
                                            const at::Tensor& eta, const OptTensor& elig,
                                            const OptTensor& elig_rate, const std::string& rule,
                                            double clip);

}  // namespace bp
