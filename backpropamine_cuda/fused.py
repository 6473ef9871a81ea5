"""The fused ops: same signatures and results as backpropamine_cuda.reference, computed by the
C++ (and, where built, CUDA) kernels registered under ``torch.ops.backpropamine``.

This file holds the glue that makes the ops first-class PyTorch ops: fake implementations (for
torch.compile and meta tensors) and autograd formulas that call the hand-written backward ops.
"""
import math

import torch

from . import _extension

_extension.load()
_ops = torch.ops.backpropamine


def default_checkpoint_every(steps: int) -> int:
    """Store the trace every ~sqrt(T) steps: memory ~ (T / L + L) traces, recompute one pass."""
    return max(1, math.ceil(math.sqrt(steps)))


def _none_if_empty(t):
    return None if t.numel() == 0 else t


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contiguous(t):
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------------------------
# Fake implementations: output shapes and dtypes only.

def _n_modulators(h2mod_weight):
    return 0 if h2mod_weight is None else h2mod_weight.shape[0]


@torch.library.register_fake("backpropamine::plastic_rnn_sequence")
def _(x, h0, hebb0, elig0, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight,
      fanout_bias, rule, clip, checkpoint_every):
    T, B, N = x.shape
    K = _n_modulators(h2mod_weight)
    retro = rule == "retroactive"
    n_ckpt = -(-T // checkpoint_every) - 1
    new = x.new_empty
    return (new(T, B, N), new(B, N, N), new(B if retro else 0, N, N), new(T, B, K),
            new(T if K else 0, B, N), new(n_ckpt, B, N, N), new(n_ckpt if retro else 0, B, N, N))


@torch.library.register_fake("backpropamine::plastic_rnn_step")
def _(x, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight,
      fanout_bias, rule, clip):
    B, N = x.shape
    K = _n_modulators(h2mod_weight)
    new = x.new_empty
    return (new(B, N), new(B, N, N), new(B if rule == "retroactive" else 0, N, N), new(B, K),
            new(B, N) if K else new(0))


def _rnn_param_grads_fake(like, h0, hebb0, elig0, w, alpha, eta, elig_rate, h2mod_weight,
                          h2mod_bias, fanout_weight, fanout_bias):
    like_or_empty = [like.new_empty(0) if t is None else torch.empty_like(t)
                     for t in (elig0, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias,
                               fanout_weight, fanout_bias)]
    return (torch.empty_like(like), torch.empty_like(h0), torch.empty_like(hebb0), *like_or_empty)


@torch.library.register_fake("backpropamine::plastic_rnn_sequence_backward")
def _(grad_out, grad_hebb, grad_elig, grad_m, h0, hebb0, elig0, w, alpha, eta, elig_rate,
      h2mod_weight, h2mod_bias, fanout_weight, fanout_bias, rule, clip, out, m, eta_seq,
      hebb_checkpoints, elig_checkpoints, checkpoint_every):
    return _rnn_param_grads_fake(out, h0, hebb0, elig0, w, alpha, eta, elig_rate, h2mod_weight,
                                 h2mod_bias, fanout_weight, fanout_bias)


@torch.library.register_fake("backpropamine::plastic_rnn_step_backward")
def _(grad_h_new, grad_hebb, grad_elig, grad_m, h, hebb, elig, w, alpha, eta, elig_rate,
      h2mod_weight, h2mod_bias, fanout_weight, fanout_bias, rule, clip, h_new, m, eta_t):
    return _rnn_param_grads_fake(h_new, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight,
                                 h2mod_bias, fanout_weight, fanout_bias)


@torch.library.register_fake("backpropamine::plastic_matvec")
def _(x, w, alpha, hebb):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.register_fake("backpropamine::plastic_matvec_backward")
def _(grad_u, x, w, alpha, hebb):
    return (torch.empty_like(x), torch.empty_like(w), torch.empty_like(alpha),
            torch.empty_like(hebb))


@torch.library.register_fake("backpropamine::hebb_update")
def _(hebb, pre, post, eta, elig, elig_rate, rule, clip):
    return torch.empty_like(hebb), (torch.empty_like(hebb) if rule == "retroactive"
                                    else hebb.new_empty(0))


@torch.library.register_fake("backpropamine::hebb_update_backward")
def _(grad_hebb_new, grad_elig_new, hebb, pre, post, eta, elig, elig_rate, rule, clip):
    retro = rule == "retroactive"
    return (torch.empty_like(hebb), torch.empty_like(pre), torch.empty_like(post),
            torch.empty_like(eta), torch.empty_like(hebb) if retro else hebb.new_empty(0),
            hebb.new_empty(()) if retro else hebb.new_empty(0))


# ----------------------------------------------------------------------------------------------
# Autograd: the backward of each op is its hand-written backward op.

_RNN_INPUTS = ("h0", "hebb0", "elig0", "w", "alpha", "eta", "elig_rate", "h2mod_weight",
               "h2mod_bias", "fanout_weight", "fanout_bias")


def _rnn_grads(grads, inputs):
    """Maps the backward op's outputs to the op's inputs: None where an input was None."""
    gx, *rest = grads
    return (gx, *[None if t is None else g for g, t in zip(rest, inputs)])


def _sequence_setup(ctx, inputs, output):
    x, *params, rule, clip, checkpoint_every = inputs
    out, _, _, m, eta_seq, ckpt_h, ckpt_e = output
    ctx.options = (rule, clip, checkpoint_every)
    ctx.retro = rule == "retroactive"
    ctx.modulated = params[7] is not None  # h2mod_weight
    ctx.save_for_backward(*params, out, m, eta_seq, ckpt_h, ckpt_e)
    ctx.mark_non_differentiable(eta_seq, ckpt_h, ckpt_e)
    ctx.set_materialize_grads(False)  # no zero-filled trace-sized gradients for unused outputs


def _sequence_backward(ctx, g_out, g_hebb, g_elig, g_m, *_):
    *params, out, m, eta_seq, ckpt_h, ckpt_e = ctx.saved_tensors
    rule, clip, checkpoint_every = ctx.options
    grads = _ops.plastic_rnn_sequence_backward(
        _contiguous(g_out), _contiguous(g_hebb), _contiguous(g_elig) if ctx.retro else None,
        _contiguous(g_m) if ctx.modulated else None, *params, rule, clip, out, m, eta_seq, ckpt_h,
        ckpt_e, checkpoint_every)
    return (*_rnn_grads(grads, params), None, None, None)


torch.library.register_autograd("backpropamine::plastic_rnn_sequence", _sequence_backward,
                                setup_context=_sequence_setup)


def _step_setup(ctx, inputs, output):
    x, *params, rule, clip = inputs
    h_new, _, _, m, eta_t = output
    ctx.options = (rule, clip)
    ctx.retro = rule == "retroactive"
    ctx.modulated = params[7] is not None
    ctx.save_for_backward(*params, h_new, m, eta_t)
    ctx.mark_non_differentiable(eta_t)
    ctx.set_materialize_grads(False)


def _step_backward(ctx, g_h, g_hebb, g_elig, g_m, _):
    *params, h_new, m, eta_t = ctx.saved_tensors
    rule, clip = ctx.options
    grads = _ops.plastic_rnn_step_backward(
        _contiguous(g_h), _contiguous(g_hebb), _contiguous(g_elig) if ctx.retro else None,
        _contiguous(g_m) if ctx.modulated else None, *params, rule, clip, h_new, m, eta_t)
    return (*_rnn_grads(grads, params), None, None)


torch.library.register_autograd("backpropamine::plastic_rnn_step", _step_backward,
                                setup_context=_step_setup)


def _matvec_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _matvec_backward(ctx, g_u):
    return _ops.plastic_matvec_backward(g_u.contiguous(), *ctx.saved_tensors)


torch.library.register_autograd("backpropamine::plastic_matvec", _matvec_backward,
                                setup_context=_matvec_setup)


def _update_setup(ctx, inputs, output):
    hebb, pre, post, eta, elig, elig_rate, rule, clip = inputs
    ctx.options = (rule, clip)
    ctx.has_elig = elig is not None
    ctx.save_for_backward(hebb, pre, post, eta, elig, elig_rate)
    ctx.set_materialize_grads(False)


def _update_backward(ctx, g_hebb, g_elig):
    hebb, pre, post, eta, elig, elig_rate = ctx.saved_tensors
    g = _ops.hebb_update_backward(_contiguous(g_hebb), _contiguous(g_elig) if ctx.has_elig else None,
                                  hebb, pre, post, eta, elig, elig_rate, *ctx.options)
    g_hebb_old, g_pre, g_post, g_eta, g_elig_old, g_rate = g
    if not ctx.has_elig:
        g_elig_old = g_rate = None
    return g_hebb_old, g_pre, g_post, g_eta, g_elig_old, g_rate, None, None


torch.library.register_autograd("backpropamine::hebb_update", _update_backward,
                                setup_context=_update_setup)


# ----------------------------------------------------------------------------------------------
# Public functions, with the signatures of backpropamine_cuda.reference.

def plastic_rnn_sequence(x, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias,
                         fanout_weight, fanout_bias, rule="clip", clip=2.0, checkpoint_every=None):
    """Fused sequence op; see reference.plastic_rnn_sequence. ``checkpoint_every`` defaults to
    ceil(sqrt(T))."""
    steps = x.shape[0] if x.dim() == 3 else 1
    if checkpoint_every is None:
        checkpoint_every = default_checkpoint_every(steps)
    if checkpoint_every >= 1 and not _needs_grad(x, h, hebb, elig, w, alpha, eta, elig_rate,
                                                 h2mod_weight, h2mod_bias, fanout_weight,
                                                 fanout_bias):
        checkpoint_every = steps  # no backward to come: store no checkpoints
    out, hebb_t, elig_t, m, *_ = _ops.plastic_rnn_sequence(
        x, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight,
        fanout_bias, rule, float(clip), checkpoint_every)
    return out, hebb_t, _none_if_empty(elig_t), (None if h2mod_weight is None else m)


def plastic_rnn_step(x, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias,
                     fanout_weight, fanout_bias, rule="clip", clip=2.0):
    """Fused step op; see reference.plastic_rnn_step."""
    h_new, hebb_new, elig_new, m, _ = _ops.plastic_rnn_step(
        x, h, hebb, elig, w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight,
        fanout_bias, rule, float(clip))
    return h_new, hebb_new, _none_if_empty(elig_new), (None if h2mod_weight is None else m)


def plastic_matvec(x, w, alpha, hebb):
    """Fused ``x @ (w + alpha * hebb)`` per sample; see reference.plastic_matvec."""
    return _ops.plastic_matvec(x, w, alpha, hebb)


def _canonical_eta(eta, hebb):
    """eta broadcastable to (B, P, N) -> (B, 1, N) or (1, P, N), the two layouts of the kernels."""
    B, P, N = hebb.shape
    if not isinstance(eta, torch.Tensor):
        eta = torch.tensor(float(eta), dtype=hebb.dtype, device=hebb.device)
    not_broadcastable = ValueError(f"hebb_update: eta must be broadcastable to (B, P, N) = "
                                   f"{(B, P, N)}, got shape {tuple(eta.shape)}")
    if eta.dim() > 3:
        raise not_broadcastable
    eta3 = eta.reshape((1,) * (3 - eta.dim()) + tuple(eta.shape))
    try:
        torch.broadcast_shapes(eta3.shape, (B, P, N))
    except RuntimeError:
        raise not_broadcastable from None
    if eta3.shape[1] == 1:
        return eta3.expand(B, 1, N).contiguous()
    if eta3.shape[0] == 1:
        return eta3.expand(1, P, N).contiguous()
    raise ValueError(f"hebb_update: eta may vary over the batch or over pre-synaptic neurons, not "
                     f"both; got shape {tuple(eta.shape)} for (B, P, N) = {(B, P, N)}")


def hebb_update(hebb, pre, post, eta, rule, clip, elig=None, elig_rate=None):
    """Fused plasticity step; see reference.hebb_update. Returns ``(new_hebb, new_elig)``."""
    if elig_rate is not None and not isinstance(elig_rate, torch.Tensor):
        elig_rate = torch.tensor(float(elig_rate), dtype=hebb.dtype, device=hebb.device)
    new_hebb, new_elig = _ops.hebb_update(hebb, pre, post, _canonical_eta(eta, hebb), elig,
                                          elig_rate, rule, float(clip))
    return new_hebb, (new_elig if elig is not None else None)
