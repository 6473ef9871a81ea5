#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace bp {

namespace {

Rule parse_rule(const char* op, const std::string& rule) {
  if (rule == "clip") return Rule::Clip;
  if (rule == "softclip") return Rule::SoftClip;
  if (rule == "decay") return Rule::Decay;
  if (rule == "oja") return Rule::Oja;
  if (rule == "retroactive") return Rule::Retroactive;
  if (rule == "clip_on_read") return Rule::ClipOnRead;
  TORCH_CHECK_VALUE(false, op,
                    ": rule must be one of 'clip', 'softclip', 'decay', 'oja', "
                    "'retroactive', 'clip_on_read', got '",
                    rule, "'");
}

ModulatorInput parse_modulator_input(const char* op, const std::string& input) {
  if (input == "h") return ModulatorInput::H;
  if (input == "c") return ModulatorInput::C;
  if (input == "h_prev") return ModulatorInput::HPrev;
  TORCH_CHECK_VALUE(false, op, ": modulator_input must be one of 'h', 'c', 'h_prev', got '", input,
                    "'");
}

PostInput parse_post_input(const char* op, const std::string& input) {
  if (input == "g") return PostInput::G;
  if (input == "u") return PostInput::U;
  if (input == "c") return PostInput::C;
  if (input == "h") return PostInput::H;
  TORCH_CHECK_VALUE(false, op, ": post_input must be one of 'g', 'u', 'c', 'h', got '", input, "'");
}

void check_clip(const char* op, double clip) {
  TORCH_CHECK_VALUE(clip > 0 && clip < INFINITY, op, ": clip must be a finite number > 0, got ",
                    clip);
}

// dtype, device and contiguity, all relative to `like` (the op's first tensor argument).
void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " to have dtype ",
              like.scalar_type(), " (the dtype of the first argument), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, " on device ", like.device(),
              " (the device of the first argument), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes(), " (call .contiguous())");
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 const char* meaning) {
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " to have shape ", shape, " ", meaning,
              ", got ", t.sizes());
}

void check_first(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": expected ",
              name, " to have dtype float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes(), " (call .contiguous())");
}

AlphaMode check_alpha(const char* op, const at::Tensor& alpha, int64_t P, int64_t N,
                      const at::Tensor& like) {
  check_tensor(op, "alpha", alpha, like);
  if (alpha.dim() == 2) {
    check_shape(op, "alpha", alpha, {P, N}, "(P, N) for alpha 'full'");
    return AlphaMode::Full;
  }
  if (alpha.dim() == 1) {
    check_shape(op, "alpha", alpha, {N}, "(N,) for alpha 'neuron'");
    return AlphaMode::Neuron;
  }
  TORCH_CHECK(alpha.dim() == 0, op,
              ": expected alpha of shape (P, N) ('full'), (N,) ('neuron') "
              "or () ('scalar') with P, N = ",
              P, ", ", N, ", got ", alpha.sizes());
  return AlphaMode::Scalar;
}

void check_elig(const char* op, Rule rule, const OptTensor& elig, const OptTensor& elig_rate,
                at::IntArrayRef trace_shape, const at::Tensor& like) {
  if (rule != Rule::Retroactive) {
    TORCH_CHECK_VALUE(!elig.has_value() && !elig_rate.has_value(), op,
                      ": elig and elig_rate are only used by rule 'retroactive'; pass None");
    return;
  }
  TORCH_CHECK_VALUE(elig.has_value(), op,
                    ": rule 'retroactive' needs the eligibility trace elig "
                    "of shape ",
                    trace_shape, ", got None");
  TORCH_CHECK_VALUE(elig_rate.has_value(), op,
                    ": rule 'retroactive' needs elig_rate of shape (), "
                    "got None");
  check_tensor(op, "elig", *elig, like);
  check_shape(op, "elig", *elig, trace_shape, "(same as hebb)");
  check_tensor(op, "elig_rate", *elig_rate, like);
  check_shape(op, "elig_rate", *elig_rate, {}, "(a scalar)");
}

// Shape (T, B, width * N) of x, or (B, width * N) for a step: returns T, B and N.
struct XSizes {
  int64_t T, B, N;
};
XSizes check_x(const char* op, const char* name, const at::Tensor& x, int64_t width,
               bool sequence) {
  check_first(op, name, x);
  const char* layout =
      sequence ? (width == 1 ? "(T, B, N)" : "(T, B, 4N)") : (width == 1 ? "(B, N)" : "(B, 4N)");
  const int64_t want_dim = sequence ? 3 : 2;
  TORCH_CHECK(x.dim() == want_dim, op, ": expected ", name, " of shape ", layout, ", got ",
              x.sizes());
  const int64_t cols = x.size(want_dim - 1);
  XSizes s{sequence ? x.size(0) : 1, x.size(want_dim - 2), cols / width};
  TORCH_CHECK(s.T >= 1 && s.B >= 1 && cols >= 1, op, ": expected ", name,
              " with at least one "
              "time step, sample and neuron, got shape ",
              x.sizes());
  TORCH_CHECK(cols == width * s.N, op, ": expected ", name, " of shape ", layout,
              " (the four gates' inputs), got ", x.sizes());
  return s;
}

// A gradient handed to a backward op (grad_<output>): same dtype/device as `like`, the shape of
// the forward output it is the gradient of, contiguous.
void check_grad(const char* op, const char* name, const at::Tensor& grad, at::IntArrayRef shape,
                const at::Tensor& like) {
  check_tensor(op, name, grad, like);
  check_shape(op, name, grad, shape, "(the shape of the forward output it is the gradient of)");
}

void check_grad(const char* op, const char* name, const OptTensor& grad, at::IntArrayRef shape,
                const at::Tensor& like) {
  if (grad.has_value()) check_grad(op, name, *grad, shape, like);
}

// A gradient of the eligibility trace, which only rule "retroactive" has.
void check_elig_grad(const char* op, const char* name, const OptTensor& grad, bool retro,
                     at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK_VALUE(retro || !grad.has_value(), op, ": ", name,
                    " is only used by rule 'retroactive'; pass None");
  check_grad(op, name, grad, shape, like);
}

// A forward output that the backward op reads, with its layout for the message.
void check_saved(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 const std::string& layout, const at::Tensor& like) {
  check_tensor(op, name, t, like);
  check_shape(op, name, t, shape, layout.c_str());
}

PlasticConfig check_plastic_inputs(const char* op, const at::Tensor& x, const XSizes& sizes,
                                   const PlasticInputs& in, const std::string& rule, double clip) {
  PlasticConfig cfg{};
  cfg.modes.rule = parse_rule(op, rule);
  check_clip(op, clip);
  cfg.clip = clip;
  cfg.T = sizes.T;
  cfg.B = sizes.B;
  cfg.N = sizes.N;
  const int64_t B = cfg.B, N = cfg.N;

  check_tensor(op, "hebb", in.hebb, x);
  check_shape(op, "hebb", in.hebb, {B, N, N}, "(B, N, N)");
  check_tensor(op, "w", in.w, x);
  check_shape(op, "w", in.w, {N, N}, "(N, N)");
  cfg.modes.alpha = check_alpha(op, in.alpha, N, N, x);

  cfg.modes.eta = EtaMode::PerPost;
  if (!in.h2mod_weight.has_value()) {
    cfg.modulation = Modulation::None;
    TORCH_CHECK_VALUE(in.eta.has_value(), op,
                      ": without modulation (h2mod_weight None) the "
                      "learned rate eta is required, got None");
    TORCH_CHECK_VALUE(
        !in.fanout_weight.has_value() && !in.h2mod_bias.has_value() && !in.fanout_bias.has_value(),
        op, ": fanout_weight, h2mod_bias and fanout_bias need h2mod_weight");
    check_tensor(op, "eta", *in.eta, x);
    TORCH_CHECK(in.eta->dim() == 0 || in.eta->sizes() == at::IntArrayRef({N, N}), op,
                ": expected eta of shape () ('scalar') or (N, N) ('full') with N = ", N, ", got ",
                in.eta->sizes());
    if (in.eta->dim() == 2) cfg.modes.eta = EtaMode::PerConnection;
    TORCH_CHECK_VALUE(cfg.modes.rule != Rule::Retroactive, op,
                      ": rule 'retroactive' needs modulation 'simple' or 'fanout' (pass "
                      "h2mod_weight), got modulation 'none'");
  } else {
    TORCH_CHECK_VALUE(!in.eta.has_value(), op,
                      ": pass either eta (modulation 'none') or "
                      "h2mod_weight (modulation 'simple'/'fanout'), not both");
    const at::Tensor& hw = *in.h2mod_weight;
    check_tensor(op, "h2mod_weight", hw, x);
    TORCH_CHECK(hw.dim() == 2 && hw.size(1) == N && hw.size(0) >= 1, op,
                ": expected h2mod_weight of shape (K, N) with K >= 1 and N = ", N, ", got ",
                hw.sizes());
    cfg.K = hw.size(0);
    TORCH_CHECK_VALUE(in.h2mod_bias.has_value(), op, ": h2mod_bias is required with h2mod_weight");
    check_tensor(op, "h2mod_bias", *in.h2mod_bias, x);
    check_shape(op, "h2mod_bias", *in.h2mod_bias, {cfg.K}, "(K,)");
    if (in.fanout_weight.has_value()) {
      cfg.modulation = Modulation::Fanout;
      check_tensor(op, "fanout_weight", *in.fanout_weight, x);
      check_shape(op, "fanout_weight", *in.fanout_weight, {N, cfg.K}, "(N, K)");
      TORCH_CHECK_VALUE(in.fanout_bias.has_value(), op,
                        ": fanout_bias is required with fanout_weight");
      check_tensor(op, "fanout_bias", *in.fanout_bias, x);
      check_shape(op, "fanout_bias", *in.fanout_bias, {N}, "(N,)");
    } else {
      cfg.modulation = Modulation::Simple;
      TORCH_CHECK_VALUE(!in.fanout_bias.has_value(), op, ": fanout_bias needs fanout_weight");
      TORCH_CHECK_VALUE(cfg.K == 1, op,
                        ": modulation 'simple' takes one modulator (h2mod_weight "
                        "of shape (1, N)), got K = ",
                        cfg.K, "; use 'fanout' for K > 1");
    }
  }
  check_elig(op, cfg.modes.rule, in.elig, in.elig_rate, {B, N, N}, x);
  return cfg;
}

}  // namespace

PlasticConfig check_rnn_inputs(const char* op, const at::Tensor& x, const at::Tensor& h,
                               const PlasticInputs& in, const std::string& rule, double clip,
                               bool sequence, const char* x_name) {
  const XSizes sizes = check_x(op, x_name, x, 1, sequence);
  check_tensor(op, "h", h, x);
  check_shape(op, "h", h, {sizes.B, sizes.N}, "(B, N)");
  return check_plastic_inputs(op, x, sizes, in, rule, clip);
}

LstmConfig check_lstm_inputs(const char* op, const at::Tensor& x, int64_t x_width,
                             const at::Tensor& h, const at::Tensor& c, const at::Tensor& h2g_weight,
                             const at::Tensor& h2g_bias, const PlasticInputs& in,
                             const std::string& rule, double clip,
                             const std::string& modulator_input, const std::string& post_input,
                             bool sequence, const char* x_name) {
  const LstmOptions options{parse_post_input(op, post_input),
                            parse_modulator_input(op, modulator_input)};
  const XSizes sizes = check_x(op, x_name, x, x_width, sequence);
  const int64_t B = sizes.B, N = sizes.N;
  check_tensor(op, "h", h, x);
  check_shape(op, "h", h, {B, N}, "(B, N)");
  check_tensor(op, "c", c, x);
  check_shape(op, "c", c, {B, N}, "(B, N)");
  check_tensor(op, "h2g_weight", h2g_weight, x);
  check_shape(op, "h2g_weight", h2g_weight, {3 * N, N}, "(3N, N)");
  check_tensor(op, "h2g_bias", h2g_bias, x);
  check_shape(op, "h2g_bias", h2g_bias, {3 * N}, "(3N,)");
  return {check_plastic_inputs(op, x, sizes, in, rule, clip), options};
}

void check_clamp(const char* op, const OptTensor& clamp, const at::Tensor& x) {
  if (!clamp.has_value()) return;
  TORCH_CHECK(clamp->scalar_type() == at::kBool, op, ": expected clamp to have dtype bool, got ",
              clamp->scalar_type());
  TORCH_CHECK(clamp->device() == x.device(), op, ": expected clamp on device ", x.device(),
              " (the device of the first argument), got ", clamp->device());
  check_shape(op, "clamp", *clamp, x.sizes(), "(the shape of x)");
  TORCH_CHECK(clamp->is_contiguous(), op, ": expected clamp to be contiguous, got strides ",
              clamp->strides(), " for shape ", clamp->sizes(), " (call .contiguous())");
}

void check_drive(const char* op, const OptTensor& u, const at::Tensor& x) {
  if (!u.has_value()) return;
  check_tensor(op, "u", *u, x);
  check_shape(op, "u", *u, x.sizes(), "(B, N), like x");
}

void check_trace_outputs(const char* op, const OptTensor& hebb_out, const OptTensor& elig_out,
                         const at::Tensor& hebb, const OptTensor& elig,
                         const std::vector<NamedTensor>& others) {
  if (!hebb_out.has_value()) {
    TORCH_CHECK_VALUE(!elig_out.has_value(), op,
                      ": elig_out needs hebb_out (pass both or "
                      "neither)");
    return;
  }
  TORCH_CHECK_VALUE(elig_out.has_value() == elig.has_value(), op,
                    elig.has_value() ? ": with elig and hebb_out, pass elig_out too"
                                     : ": elig_out is only used with elig; pass None");
  std::vector<NamedTensor> outs{{"hebb_out", *hebb_out}}, traces{{"hebb", hebb}};
  if (elig.has_value()) {
    outs.emplace_back("elig_out", *elig_out);
    traces.emplace_back("elig", *elig);
  }
  for (size_t k = 0; k < outs.size(); ++k) {
    const auto& [name, out] = outs[k];
    check_tensor(op, name, out, hebb);
    check_shape(op, name, out, hebb.sizes(), "(same as hebb)");
    std::vector<NamedTensor> apart(others);
    if (k == 1) apart.push_back(outs[0]);
    for (size_t l = 0; l < traces.size(); ++l) {
      if (l != k) {
        apart.push_back(traces[l]);
        continue;
      }
      const auto status = at::get_overlap_status(out, traces[l].second);
      TORCH_CHECK(status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::No, op,
                  ": ", name, " overlaps part of ", traces[l].first, "; it must be ",
                  traces[l].first, " itself (in place) or memory of its own");
    }
    for (const auto& [other_name, other] : apart)
      TORCH_CHECK(at::get_overlap_status(out, other) == at::MemOverlapStatus::No, op, ": ", name,
                  " overlaps ", other_name, "; it must be memory of its own");
  }
}

void check_checkpoint_every(const char* op, int64_t checkpoint_every) {
  TORCH_CHECK_VALUE(checkpoint_every >= 1, op, ": checkpoint_every must be >= 1, got ",
                    checkpoint_every);
}

void check_recurrent_backward(const char* op, const PlasticConfig& c, const at::Tensor& like,
                              const RecurrentBackwardArgs& a) {
  const int64_t T = c.T, B = c.B, N = c.N, K = c.K;
  const bool retro = c.modes.rule == Rule::Retroactive;
  // A per-step shape and its layout: (T, dims...) for a sequence, (dims...) for a step.
  auto per_step = [&](std::vector<int64_t> dims) {
    if (a.sequence) dims.insert(dims.begin(), T);
    return dims;
  };
  auto layout = [&](const char* dims) {
    return std::string(a.sequence ? "(T, " : "(") + dims + ")";
  };
  for (const auto& [name, grad] : a.step_grads) check_grad(op, name, grad, per_step({B, N}), like);
  check_grad(op, "grad_hebb", a.grad_hebb, {B, N, N}, like);
  check_elig_grad(op, "grad_elig", a.grad_elig, retro, {B, N, N}, like);
  check_grad(op, "grad_m", a.grad_m, per_step({B, K}), like);
  for (const auto& [name, t] : a.step_saved)
    check_saved(op, name, t, per_step({B, N}), layout("B, N"), like);
  if (a.gates != nullptr) {
    const std::string slots = std::to_string(a.gate_slots);
    check_saved(
        op, "gates", *a.gates, per_step({a.gate_slots, B, N}),
        layout((slots + ", B, N").c_str()) + (a.gate_slots == 5 ? " with post_input 'u'" : ""),
        like);
  }
  check_saved(op, a.m.first, a.m.second, per_step({B, K}), layout("B, K"), like);
  if (c.modulation != Modulation::None) {
    check_saved(op, a.eta.first, a.eta.second, per_step({B, N}), layout("B, N") + ", the rates",
                like);
  } else if (a.sequence) {
    check_saved(op, a.eta.first, a.eta.second, {0, B, N}, "(0, B, N) without modulation", like);
  } else {
    check_saved(op, a.eta.first, a.eta.second, {0}, "(0,) without modulation", like);
  }
  if (!a.sequence) return;
  check_checkpoint_every(op, a.checkpoint_every);
  const int64_t n_ckpt = num_checkpoints(T, a.checkpoint_every);
  const char* every_l = "(ceil(T / checkpoint_every) - 1, B, N, N)";
  check_saved(op, "hebb_checkpoints", *a.hebb_checkpoints, {n_ckpt, B, N, N}, every_l, like);
  if (retro)
    check_saved(op, "elig_checkpoints", *a.elig_checkpoints, {n_ckpt, B, N, N}, every_l, like);
  else
    check_saved(op, "elig_checkpoints", *a.elig_checkpoints, {0, B, N, N},
                "(0, B, N, N) without rule 'retroactive'", like);
}

AlphaMode check_matvec_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& alpha, const at::Tensor& hebb) {
  check_first(op, "x", x);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) >= 1, op,
              ": expected x of shape (B, P) with B, P >= 1, got ", x.sizes());
  const int64_t B = x.size(0), P = x.size(1);
  check_tensor(op, "w", w, x);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == P && w.size(1) >= 1, op,
              ": expected w of shape (P, N) with P = ", P, ", got ", w.sizes());
  const int64_t N = w.size(1);
  check_tensor(op, "hebb", hebb, x);
  check_shape(op, "hebb", hebb, {B, P, N}, "(B, P, N)");
  return check_alpha(op, alpha, P, N, x);
}

AlphaMode check_matvec_backward_inputs(const char* op, const at::Tensor& grad_u,
                                       const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& alpha, const at::Tensor& hebb) {
  const AlphaMode mode = check_matvec_inputs(op, x, w, alpha, hebb);
  check_grad(op, "grad_u", grad_u, {x.size(0), w.size(1)}, x);
  return mode;
}

PassModes check_hebb_update_inputs(const char* op, const at::Tensor& hebb, const at::Tensor& pre,
                                   const at::Tensor& post, const at::Tensor& eta,
                                   const OptTensor& elig, const OptTensor& elig_rate,
                                   const std::string& rule, double clip) {
  PassModes modes{parse_rule(op, rule), AlphaMode::Scalar, EtaMode::PerPost};
  check_clip(op, clip);
  check_first(op, "hebb", hebb);
  TORCH_CHECK(hebb.dim() == 3 && hebb.numel() > 0, op,
              ": expected hebb of shape (B, P, N) with B, P, N >= 1, got ", hebb.sizes());
  const int64_t B = hebb.size(0), P = hebb.size(1), N = hebb.size(2);
  check_tensor(op, "pre", pre, hebb);
  check_shape(op, "pre", pre, {B, P}, "(B, P)");
  check_tensor(op, "post", post, hebb);
  check_shape(op, "post", post, {B, N}, "(B, N)");
  check_tensor(op, "eta", eta, hebb);
  if (eta.sizes() == at::IntArrayRef({B, 1, N})) {
    modes.eta = EtaMode::PerPost;
  } else {
    TORCH_CHECK(eta.sizes() == at::IntArrayRef({1, P, N}), op,
                ": expected eta of shape (B, 1, N) "
                "= ",
                at::IntArrayRef({B, 1, N}), " or (1, P, N) = ", at::IntArrayRef({1, P, N}),
                ", got ", eta.sizes());
    modes.eta = EtaMode::PerConnection;
  }
  check_elig(op, modes.rule, elig, elig_rate, hebb.sizes(), hebb);
  return modes;
}

PassModes check_hebb_update_backward_inputs(const char* op, const OptTensor& grad_hebb_new,
                                            const OptTensor& grad_elig_new, const at::Tensor& hebb,
                                            const at::Tensor& pre, const at::Tensor& post,
                                            const at::Tensor& eta, const OptTensor& elig,
                                            const OptTensor& elig_rate, const std::string& rule,
                                            double clip) {
  const PassModes modes =
      check_hebb_update_inputs(op, hebb, pre, post, eta, elig, elig_rate, rule, clip);
  check_grad(op, "grad_hebb_new", grad_hebb_new, hebb.sizes(), hebb);
  check_elig_grad(op, "grad_elig_new", grad_elig_new, modes.rule == Rule::Retroactive, hebb.sizes(),
                  hebb);
  return modes;
}

}  // namespace bp
