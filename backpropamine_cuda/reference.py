"""Pure-PyTorch reference of every op: the readable specification (docs/design.md explains the
math, the gradients and the kernels).

The fused C++/CUDA kernels compute exactly these functions (up to floating-point summation
order) and their autograd gradients. Shapes: batch ``B``, pre-synaptic size ``P``, post-synaptic
size ``N`` (``P == N`` for recurrent layers). ``w[i, j]`` is the weight from pre-synaptic ``i`` to
post-synaptic ``j``; ``hebb[b, i, j]`` the trace of that connection for sample ``b``.

Parameter shapes select the options:

* ``alpha``: ``(P, N)`` "full", ``(N,)`` "neuron" (one per post-synaptic neuron), ``()`` "scalar".
* modulation: ``eta`` given (shape ``()`` or ``(P, N)``) means "none"; ``h2mod_weight`` (K, N)
  given without ``fanout_weight`` means "simple" (K == 1); with ``fanout_weight`` (N, K) "fanout".
* ``rule``: "clip", "softclip", "decay", "oja", "retroactive" (needs ``elig`` and ``elig_rate``),
  "clip_on_read": the trace grows unclipped, ``H_t = H_{t-1} + eta * pre * post``, and the
  recurrent steps clamp it to [-clip, clip] only where they read it, ``u = h @ (w + alpha *
  clamp(H))``. ``hebb_update`` with it is the unclipped update; ``plastic_matvec`` (no rule)
  reads the trace as given.
* ``clamp`` (RNN only): a bool mask shaped like ``x``; where it is True the neuron's output is
  ``x`` itself instead of ``tanh(x + u)`` (input neurons pinned to their input, as in the
  differentiable-plasticity image task). Its Hebbian terms and the modulator then read ``x``.

The plastic LSTM (docs/design.md, 'The plastic LSTM') takes ``x = i2g(input)`` of width 4N
(gates i, f, g, o), ``h2g`` (weight (3N, N), bias (3N,), gates i, f, o) and makes only the h -> g
path plastic: ``w``, ``alpha`` and the trace belong to it. The Hebbian product is
``h_{t-1}[i] * post_t[j]`` with ``post_t`` the cell candidate ``g_t = tanh(x_g + u_t)``
(``post_input="g"``), the plastic path's drive ``u_t = h_{t-1} @ (w + alpha * hebb_{t-1})``
(``"u"``), the cell state ``c_t`` (``"c"``) or ``h_t`` (``"h"``); the modulator of step t reads
``h_t`` (``modulator_input="h"``), the cell state ``c_t`` (``"c"``) or ``h_{t-1}``
(``"h_prev"``, ``h_0`` at the first step).
"""

import torch
import torch.nn.functional as F

from .params import PlasticParams

RULES = ("clip", "softclip", "decay", "oja", "retroactive", "clip_on_read")
MODULATOR_INPUTS = ("h", "c", "h_prev")
POST_INPUTS = ("g", "u", "c", "h")


def plastic_matvec(x, w, alpha, hebb):
    """``u[b, j] = sum_i x[b, i] * (w[i, j] + alpha[i, j] * hebb[b, i, j])``."""
    # alpha of shape (P, N), (N,) or () broadcasts against hebb (B, P, N) along the right axes.
    return torch.bmm(x.unsqueeze(1), w + alpha * hebb).squeeze(1)


def read_trace(hebb, rule, clip):
    """The trace as a recurrent step's plastic matvec reads it: clamped to [-clip, clip] for rule
    "clip_on_read", the trace itself for every other rule."""
    return torch.clamp(hebb, -clip, clip) if rule == "clip_on_read" else hebb


def hebb_update(hebb, pre, post, eta, rule, clip, elig=None, elig_rate=None):
    """One plasticity step. ``pre`` (B, P), ``post`` (B, N), ``eta`` broadcastable to (B, P, N).

    Returns ``(new_hebb, new_elig)``; ``new_elig`` is None unless ``rule == "retroactive"``.
    """
    prod = pre.unsqueeze(2) * post.unsqueeze(1)  # Hebbian product D[b, i, j]
    if rule == "clip":
        return torch.clamp(hebb + eta * prod, -clip, clip), None
    if rule == "softclip":
        z = eta * prod
        # max(z,0)*(1-H/c) + min(z,0)*(1+H/c), written with one branch per sign so that the
        # gradient at z == 0 is that of the z <= 0 branch.
        soft = torch.where(z > 0, z * (1 - hebb / clip), z * (1 + hebb / clip))
        return torch.clamp(hebb + soft, -clip, clip), None
    if rule == "decay":
        return (1 - eta) * hebb + eta * prod, None
    if rule == "oja":
        q = post.unsqueeze(1)
        return hebb + eta * q * (pre.unsqueeze(2) - hebb * q), None
    if rule == "retroactive":
        new_hebb = torch.clamp(hebb + eta * elig, -clip, clip)  # uses E_{t-1}, not this step's D
        new_elig = (1 - elig_rate) * elig + elig_rate * prod
        return new_hebb, new_elig
    if rule == "clip_on_read":
        return hebb + eta * prod, None  # clamped where it is read (read_trace)
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def modulation_of(h2mod_weight, fanout_weight):
    """The modulation option implied by which modulation parameters are given."""
    if h2mod_weight is None:
        return "none"
    return "simple" if fanout_weight is None else "fanout"


def plasticity_rate(post, params):
    """``(eta_t broadcastable to (B, P, N), m_t (B, K) or None)`` for the new output ``post``
    under the PlasticParams ``params``."""
    if params.h2mod_weight is None:
        return params.eta, None
    m = torch.tanh(F.linear(post, params.h2mod_weight, params.h2mod_bias))
    if params.fanout_weight is None:
        return m[:, :1, None], m  # "simple": one rate per sample
    # one rate per post neuron
    return F.linear(m, params.fanout_weight, params.fanout_bias).unsqueeze(1), m


def plastic_rnn_step(
    x,
    h,
    hebb,
    elig,
    w,
    alpha,
    eta,
    elig_rate,
    h2mod_weight,
    h2mod_bias,
    fanout_weight,
    fanout_bias,
    rule="clip",
    clip=2.0,
    clamp=None,
):
    """One step of the plastic tanh RNN (docs/design.md, 'The plastic tanh RNN'). ``x`` is the
    projected input ``i2h(input_t)``; ``clamp`` (B, N) bool, optional, pins the neurons where it
    is True to ``x``.

    Returns ``(h_new, hebb_new, elig_new, m)``; ``m`` (B, K) is None without modulation.
    """
    params = PlasticParams(
        w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
    )
    return _rnn_step(x, h, hebb, elig, params, rule, clip, clamp)


def _rnn_step(x, h, hebb, elig, params, rule, clip, clamp):
    u = plastic_matvec(h, params.w, params.alpha, read_trace(hebb, rule, clip))
    h_new = rnn_cell(x, u, clamp)
    eta_t, m = plasticity_rate(h_new, params)
    hebb_new, elig_new = hebb_update(hebb, h, h_new, eta_t, rule, clip, elig, params.elig_rate)
    return h_new, hebb_new, elig_new, m


def rnn_cell(x, u, clamp=None):
    """``tanh(x + u)``, or ``x`` where ``clamp`` is True."""
    h_new = torch.tanh(x + u)
    return h_new if clamp is None else torch.where(clamp, x, h_new)


def check_no_grad(op, tensors):
    """Raises when autograd would be needed through `op`, which has none."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op}: no autograd (it updates hebb and elig in place); call it "
            "under torch.no_grad(), or use plastic_rnn_step to backpropagate"
        )


def plastic_rnn_rollout_step(
    x,
    u,
    h,
    hebb,
    elig,
    w,
    alpha,
    eta,
    elig_rate,
    h2mod_weight,
    h2mod_bias,
    fanout_weight,
    fanout_bias,
    rule="clip",
    clip=2.0,
    clamp=None,
    hebb_out=None,
    elig_out=None,
):
    """plastic_rnn_step for acting without gradients (RL rollouts): ``hebb`` and ``elig`` are
    updated in place, or, given ``hebb_out`` and ``elig_out`` (both, or hebb_out alone without
    elig), the new traces are written there and ``hebb`` and ``elig`` are left as they were (a
    recording stores a checkpoint this way without copying it). The next step's drive
    ``u_next = h_new @ (w + alpha * read_trace(hebb_new))`` is returned for the next call,
    which takes it as ``u`` (None: computed from ``h`` and ``hebb``). The fused op thereby
    sweeps the trace once per step. Returns ``(h_new, u_next, m)``.
    """
    params = PlasticParams(
        w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
    )
    check_no_grad("plastic_rnn_rollout_step", (x, u, h, hebb, elig, *params))
    if hebb_out is None and elig_out is not None:
        raise ValueError("plastic_rnn_rollout_step: elig_out needs hebb_out (pass both or neither)")
    if hebb_out is not None and (elig_out is None) != (elig is None):
        raise ValueError(
            "plastic_rnn_rollout_step: "
            + (
                "with elig and hebb_out, pass elig_out too"
                if elig is not None
                else "elig_out is only used with elig; pass None"
            )
        )
    if u is None:
        u = plastic_matvec(h, w, alpha, read_trace(hebb, rule, clip))
    h_new = rnn_cell(x, u, clamp)
    eta_t, m = plasticity_rate(h_new, params)
    hebb_new, elig_new = hebb_update(hebb, h, h_new, eta_t, rule, clip, elig, elig_rate)
    (hebb if hebb_out is None else hebb_out).copy_(hebb_new)
    if elig is not None:
        (elig if elig_out is None else elig_out).copy_(elig_new)
    return h_new, plastic_matvec(h_new, w, alpha, read_trace(hebb_new, rule, clip)), m


def plastic_rnn_sequence(
    x,
    h,
    hebb,
    elig,
    w,
    alpha,
    eta,
    elig_rate,
    h2mod_weight,
    h2mod_bias,
    fanout_weight,
    fanout_bias,
    rule="clip",
    clip=2.0,
    checkpoint_every=None,
    clamp=None,
):
    """All T steps: ``x`` (T, B, N) -> ``(out (T, B, N), hebb_T, elig_T, m (T, B, K) or None)``;
    ``clamp`` (T, B, N) bool, optional, as in plastic_rnn_step.

    ``checkpoint_every`` only affects the fused op's memory use; it is accepted for symmetry.
    """
    params = PlasticParams(
        w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
    )
    outs, mods = [], []
    for t, x_t in enumerate(x.unbind(0)):
        h, hebb, elig, m = _rnn_step(
            x_t, h, hebb, elig, params, rule, clip, None if clamp is None else clamp[t]
        )
        outs.append(h)
        mods.append(m)
    m_seq = None if mods[0] is None else torch.stack(mods)
    return torch.stack(outs), hebb, elig, m_seq


def rnn_step(x, h, w):
    """The non-plastic tanh RNN step (``plastic=False``)."""
    return torch.tanh(x + h @ w)


def lstm_gates(x, h, h2g_weight, h2g_bias, u):
    """The four gates (i, f, g, o) from ``x`` (B, 4N), the previous ``h`` and ``u``, the h -> g
    drive (``h @ w``, plus the plastic part when plastic)."""
    x_i, x_f, x_g, x_o = x.chunk(4, dim=1)
    r_i, r_f, r_o = F.linear(h, h2g_weight, h2g_bias).chunk(3, dim=1)
    return (
        torch.sigmoid(x_i + r_i),
        torch.sigmoid(x_f + r_f),
        torch.tanh(x_g + u),
        torch.sigmoid(x_o + r_o),
    )


def lstm_step(x, h, c, h2g_weight, h2g_bias, w):
    """The non-plastic LSTM step (``plastic=False``): ``(h_new, c_new)``."""
    i, f, g, o = lstm_gates(x, h, h2g_weight, h2g_bias, h @ w)
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new


def plastic_lstm_step(
    x,
    h,
    c,
    hebb,
    elig,
    h2g_weight,
    h2g_bias,
    w,
    alpha,
    eta,
    elig_rate,
    h2mod_weight,
    h2mod_bias,
    fanout_weight,
    fanout_bias,
    rule="clip",
    clip=2.0,
    modulator_input="h",
    post_input="g",
):
    """One step of the plastic LSTM (docs/design.md, 'The plastic LSTM'). ``x`` is the projected
    input ``i2g(input_t)``; ``post_input`` and ``modulator_input`` as in the module docstring.

    Returns ``(h_new, c_new, hebb_new, elig_new, m)``; ``m`` (B, K) is None without modulation.
    """
    params = PlasticParams(
        w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
    )
    return _lstm_step(
        x, h, c, hebb, elig, h2g_weight, h2g_bias, params, rule, clip, modulator_input, post_input
    )


def check_lstm_options(modulator_input, post_input):
    """Raises ValueError for an unknown ``modulator_input`` or ``post_input``."""
    for name, value, allowed in (
        ("modulator_input", modulator_input, MODULATOR_INPUTS),
        ("post_input", post_input, POST_INPUTS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _lstm_step(
    x, h, c, hebb, elig, h2g_weight, h2g_bias, params, rule, clip, modulator_input, post_input
):
    check_lstm_options(modulator_input, post_input)
    u = plastic_matvec(h, params.w, params.alpha, read_trace(hebb, rule, clip))
    i, f, g, o = lstm_gates(x, h, h2g_weight, h2g_bias, u)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    mod_in = {"h": h_new, "c": c_new, "h_prev": h}[modulator_input]
    eta_t, m = plasticity_rate(mod_in, params)
    post = {"g": g, "u": u, "c": c_new, "h": h_new}[post_input]
    hebb_new, elig_new = hebb_update(hebb, h, post, eta_t, rule, clip, elig, params.elig_rate)
    return h_new, c_new, hebb_new, elig_new, m


def plastic_lstm_sequence(
    x,
    h,
    c,
    hebb,
    elig,
    h2g_weight,
    h2g_bias,
    w,
    alpha,
    eta,
    elig_rate,
    h2mod_weight,
    h2mod_bias,
    fanout_weight,
    fanout_bias,
    rule="clip",
    clip=2.0,
    modulator_input="h",
    checkpoint_every=None,
    post_input="g",
):
    """All T steps: ``x`` (T, B, 4N) -> ``(out (T, B, N), c_T, hebb_T, elig_T, m (T, B, K) or
    None)``. ``checkpoint_every`` only affects the fused op's memory use."""
    params = PlasticParams(
        w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
    )
    outs, mods = [], []
    for x_t in x.unbind(0):
        h, c, hebb, elig, m = _lstm_step(
            x_t,
            h,
            c,
            hebb,
            elig,
            h2g_weight,
            h2g_bias,
            params,
            rule,
            clip,
            modulator_input,
            post_input,
        )
        outs.append(h)
        mods.append(m)
    m_seq = None if mods[0] is None else torch.stack(mods)
    return torch.stack(outs), c, hebb, elig, m_seq
