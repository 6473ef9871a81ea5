// Input validation of every op, in one place. Each check names the argument, the expected and
// the actual value. Shapes, dtypes, devices and contiguity raise RuntimeError; option values
// (rule names, clip, checkpoint_every) raise ValueError.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "trace_pass.h"

namespace bp {

enum class Modulation { None, Simple, Fanout };

// Everything the tensors and option strings of a plastic recurrent call select.
struct PlasticConfig {
  PassModes modes;
  Modulation modulation;
  int64_t T, B, N, K;  // K: number of modulators (0 without modulation)
  double clip;
};

using OptTensor = std::optional<at::Tensor>;

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

// x (T, B, N) for sequences, (B, N) for a step; h (B, N).
PlasticConfig check_rnn_inputs(const char* op, const at::Tensor& x, const at::Tensor& h,
                               const PlasticInputs& in, const std::string& rule, double clip,
                               bool sequence);

struct LstmConfig {
  PlasticConfig plastic;
  bool modulate_c;  // the modulator reads c_t (modulator_input "c"), else h_t
};

// x: the gates' inputs (T, B, 4N) for sequences, (B, 4N) for a step (x_width 4), or, for the
// backward ops, the output (T, B, N) or (B, N) (x_width 1); h, c (B, N); h2g_weight (3N, N),
// h2g_bias (3N,).
LstmConfig check_lstm_inputs(const char* op, const at::Tensor& x, int64_t x_width,
                             const at::Tensor& h,
                             const at::Tensor& c, const at::Tensor& h2g_weight,
                             const at::Tensor& h2g_bias, const PlasticInputs& in,
                             const std::string& rule, double clip,
                             const std::string& modulator_input, bool sequence);

// The RNN's optional clamp mask: bool, on x's device, x's shape ((T, B, N) or (B, N)).
void check_clamp(const char* op, const OptTensor& clamp, const at::Tensor& x);

// The rollout step's optional drive u: x's dtype, device and shape (B, N), contiguous.
void check_drive(const char* op, const OptTensor& u, const at::Tensor& x);

// A tensor argument and its name, for messages.
using NamedTensor = std::pair<const char*, at::Tensor>;

// The rollout step's optional outputs for the new traces, hebb_out and elig_out: both or neither
// (elig_out only with elig), each like the trace it replaces, and either that trace itself (in
// place) or apart from it, from each other and from every tensor in `others`.
void check_trace_outputs(const char* op, const OptTensor& hebb_out, const OptTensor& elig_out,
                         const at::Tensor& hebb, const OptTensor& elig,
                         const std::vector<NamedTensor>& others);

void check_checkpoint_every(const char* op, int64_t checkpoint_every);

// Plastic feed-forward primitives (DESIGN 2.4).
AlphaMode check_matvec_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& alpha, const at::Tensor& hebb);

// eta: (B, 1, N) -> EtaMode::PerPost, or (1, P, N) -> EtaMode::PerConnection.
PassModes check_hebb_update_inputs(const char* op, const at::Tensor& hebb, const at::Tensor& pre,
                                   const at::Tensor& post, const at::Tensor& eta,
                                   const OptTensor& elig, const OptTensor& elig_rate,
                                   const std::string& rule, double clip);

// Gradients handed to a backward op: defined, same dtype/device, expected shape, contiguous.
void check_grad(const char* op, const char* name, const at::Tensor& grad, at::IntArrayRef shape,
                const at::Tensor& like);

}  // namespace bp
