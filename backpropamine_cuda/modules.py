"""nn.Modules of the plastic recurrent layers (DESIGN 4)."""
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import reference

ALPHA_OPTIONS = ("full", "neuron", "scalar")
MODULATION_OPTIONS = ("none", "simple", "fanout")
ETA_SHAPES = ("scalar", "full")
IMPLS = ("auto", "fused", "reference")


class PlasticState(NamedTuple):
    """Recurrent state: h (B, N); hebb (B, N, N); elig (B, N, N) for rule 'retroactive', else None.
    For plastic=False layers hebb and elig are None."""
    h: torch.Tensor
    hebb: Optional[torch.Tensor] = None
    elig: Optional[torch.Tensor] = None


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _fused_module(x):
    """The fused implementation when it has kernels for x's device and dtype, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    from . import fused  # builds or loads the extension; raises if that fails
    return fused


class _PlasticRNNBase(nn.Module):
    """Parameters and options shared by PlasticRNN and PlasticRNNCell.

    Initialisation (as the Backpropamine simplemaze network): ``w`` and ``alpha`` uniform in
    [0, 0.001); ``eta`` (modulation "none") = ``eta_init``; ``elig_rate`` = ``elig_rate_init``;
    ``i2h``, ``h2mod`` and ``fanout`` keep PyTorch's Linear initialisation.
    """

    def __init__(self, input_size, hidden_size, alpha="full", modulation="fanout", rule="clip",
                 clip=2.0, n_modulators=1, eta_shape="scalar", plastic=True, impl="auto",
                 eta_init=0.01, elig_rate_init=0.1):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("n_modulators", n_modulators)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        _check_choice("alpha", alpha, ALPHA_OPTIONS)
        _check_choice("modulation", modulation, MODULATION_OPTIONS)
        _check_choice("rule", rule, reference.RULES)
        _check_choice("eta_shape", eta_shape, ETA_SHAPES)
        _check_choice("impl", impl, IMPLS)
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip!r}")
        if plastic and rule == "retroactive" and modulation == "none":
            raise ValueError("rule 'retroactive' needs modulation 'simple' or 'fanout', got 'none'")
        if modulation == "simple" and n_modulators != 1:
            raise ValueError(f"modulation 'simple' takes n_modulators=1, got {n_modulators}; "
                             "use modulation='fanout' for several modulators")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.alpha_mode, self.modulation, self.rule, self.clip = alpha, modulation, rule, float(clip)
        self.n_modulators, self.eta_shape, self.plastic, self.impl = (
            n_modulators, eta_shape, plastic, impl)
        N = hidden_size
        self.i2h = nn.Linear(input_size, N)
        self.w = nn.Parameter(0.001 * torch.rand(N, N))
        if not plastic:
            return
        alpha_shape = {"full": (N, N), "neuron": (N,), "scalar": ()}[alpha]
        self.alpha = nn.Parameter(0.001 * torch.rand(alpha_shape))
        if modulation == "none":
            self.eta = nn.Parameter(torch.full((N, N) if eta_shape == "full" else (), float(eta_init)))
        else:
            self.h2mod = nn.Linear(N, n_modulators)
            if modulation == "fanout":
                self.fanout = nn.Linear(n_modulators, N)
        if rule == "retroactive":
            self.elig_rate = nn.Parameter(torch.tensor(float(elig_rate_init)))

    def extra_repr(self):
        if not self.plastic:
            return f"{self.input_size}, {self.hidden_size}, plastic=False, impl={self.impl!r}"
        return (f"{self.input_size}, {self.hidden_size}, alpha={self.alpha_mode!r}, "
                f"modulation={self.modulation!r}, rule={self.rule!r}, clip={self.clip}, "
                f"n_modulators={self.n_modulators}, eta_shape={self.eta_shape!r}, "
                f"impl={self.impl!r}")

    def initial_state(self, batch_size, like):
        """Zeros: the state at the start of an episode."""
        N = self.hidden_size
        h = like.new_zeros(batch_size, N)
        if not self.plastic:
            return PlasticState(h)
        elig = like.new_zeros(batch_size, N, N) if self.rule == "retroactive" else None
        return PlasticState(h, like.new_zeros(batch_size, N, N), elig)

    def _check_state(self, state, batch_size, x):
        if not isinstance(state, tuple) or len(state) != 3:
            raise ValueError("state must be a PlasticState(h, hebb, elig) or None, got "
                             f"{type(state).__name__}")
        N = self.hidden_size
        want = {"h": (batch_size, N)}
        if self.plastic:
            want["hebb"] = (batch_size, N, N)
            if self.rule == "retroactive":
                want["elig"] = (batch_size, N, N)
        for name, t in zip(PlasticState._fields, state):
            if name not in want:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[name]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state.{name} must have shape {want[name]}, got {got}")
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"state.{name} must have dtype {x.dtype} on {x.device} like the "
                                 f"input, got {t.dtype} on {t.device}")
        return PlasticState(*(None if t is None else t.contiguous() for t in state))

    def _check_input(self, x, dims, layout):
        if not isinstance(x, torch.Tensor) or x.dim() != dims or x.shape[-1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"input must have shape {layout} with input_size = {self.input_size}, "
                             f"got {got}")
        if not x.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"input must have at least one time step and one sample, got shape "
                             f"{tuple(x.shape)} for {layout}")

    def _backend(self, x):
        """reference or fused, per `impl` and the input's device and dtype."""
        if self.impl == "reference":
            return reference
        fused = _fused_module(x)
        if fused is None and self.impl == "fused":
            raise RuntimeError(f"impl='fused': no fused kernels for {x.dtype} tensors on "
                               f"{x.device}; use impl='auto' or 'reference'")
        return fused or reference

    def _plastic_args(self):
        mod = self.modulation
        return (self.w, self.alpha,
                self.eta if mod == "none" else None,
                self.elig_rate if self.rule == "retroactive" else None,
                None if mod == "none" else self.h2mod.weight,
                None if mod == "none" else self.h2mod.bias,
                self.fanout.weight if mod == "fanout" else None,
                self.fanout.bias if mod == "fanout" else None)


class PlasticRNN(_PlasticRNNBase):
    """Plastic tanh RNN over a whole sequence (DESIGN 2.1).

    ``out, state = rnn(x, state=None)`` with x (T, B, I) (or (B, T, I) when ``batch_first``);
    ``out, state, m = rnn(x, state, return_modulation=True)`` also returns the neuromodulator
    outputs m (T, B, K) (None when modulation is "none"). ``checkpoint_every`` sets how often the
    fused op stores the trace for its backward (default ceil(sqrt(T))).
    """

    def __init__(self, input_size, hidden_size, *, batch_first=False, checkpoint_every=None,
                 **options):
        super().__init__(input_size, hidden_size, **options)
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
        self.batch_first = batch_first
        self.checkpoint_every = checkpoint_every

    def forward(self, x, state=None, return_modulation=False):
        self._check_input(x, 3, "(B, T, input_size)" if self.batch_first else "(T, B, input_size)")
        if self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[1]
        state = self.initial_state(batch, x) if state is None else self._check_state(state, batch, x)
        backend = self._backend(x)
        m = None
        if not self.plastic:
            out = self._rnn_sequence(x, state.h, backend)
            new_state = PlasticState(out[-1])
        else:
            out, hebb, elig, m = backend.plastic_rnn_sequence(
                self.i2h(x), state.h, state.hebb, state.elig, *self._plastic_args(),
                rule=self.rule, clip=self.clip, checkpoint_every=self.checkpoint_every)
            new_state = PlasticState(out[-1], hebb, elig)
        if self.batch_first:
            out = out.transpose(0, 1)
            m = None if m is None else m.transpose(0, 1)
        return (out, new_state, m) if return_modulation else (out, new_state)

    def _rnn_sequence(self, x, h, backend):
        if backend is reference:
            outs = []
            for x_t in self.i2h(x).unbind(0):
                h = reference.rnn_step(x_t, h, self.w)
                outs.append(h)
            return torch.stack(outs)
        # PyTorch's own fused tanh RNN; w is (pre, post), nn.RNN's weight_hh is (post, pre).
        params = [self.i2h.weight, self.w.t(), self.i2h.bias, torch.zeros_like(self.i2h.bias)]
        out, _ = torch.rnn_tanh(x, h.unsqueeze(0), params, True, 1, 0.0, self.training, False,
                                False)
        return out


class PlasticRNNCell(_PlasticRNNBase):
    """One step of the plastic tanh RNN, for loops that interact with an environment.

    ``h, state = cell(x, state=None)`` with x (B, I); ``h, state, m = cell(x, state,
    return_modulation=True)``.
    """

    def forward(self, x, state=None, return_modulation=False):
        self._check_input(x, 2, "(B, input_size)")
        batch = x.shape[0]
        state = self.initial_state(batch, x) if state is None else self._check_state(state, batch, x)
        backend = self._backend(x)
        m = None
        if not self.plastic:
            if backend is reference:
                h = reference.rnn_step(self.i2h(x), state.h, self.w)
            else:
                h = torch.rnn_tanh_cell(x, state.h, self.i2h.weight, self.w.t(), self.i2h.bias)
            new_state = PlasticState(h)
        else:
            h, hebb, elig, m = backend.plastic_rnn_step(
                self.i2h(x), state.h, state.hebb, state.elig, *self._plastic_args(),
                rule=self.rule, clip=self.clip)
            new_state = PlasticState(h, hebb, elig)
        return (h, new_state, m) if return_modulation else (h, new_state)
