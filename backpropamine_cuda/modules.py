"""nn.Modules of the plastic recurrent layers, on the ops specified in
backpropamine_cuda/reference.py (docs/design.md explains them)."""

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import reference
from ._checks import is_int, is_real
from .params import PlasticParams

ALPHA_OPTIONS = ("full", "neuron", "scalar")
MODULATION_OPTIONS = ("none", "simple", "fanout")
ETA_SHAPES = ("scalar", "full")
IMPLS = ("auto", "fused", "reference")
TRACES = ("hebb", "elig")  # the (B, N, N) fields of a state, always its last two


class PlasticState(NamedTuple):
    """Recurrent state: h (B, N); hebb (B, N, N); elig (B, N, N) for rule 'retroactive', else None.
    For plastic=False layers hebb and elig are None."""

    h: torch.Tensor
    hebb: Optional[torch.Tensor] = None
    elig: Optional[torch.Tensor] = None


class PlasticLSTMState(NamedTuple):
    """LSTM state: h and the cell state c (B, N); hebb and elig as in PlasticState (the traces of
    the plastic h -> g weights)."""

    h: torch.Tensor
    c: torch.Tensor
    hebb: Optional[torch.Tensor] = None
    elig: Optional[torch.Tensor] = None


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _is_count(value):
    return is_int(value) and value >= 1


def _is_finite_number(value):
    return is_real(value) and math.isfinite(value)


def _factory_kwargs(device, dtype):
    """The device and dtype a layer creates its parameters with (PyTorch's `factory_kwargs`)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")
    return dict(device=device, dtype=dtype)


def _fused_module(x):
    """The fused implementation when it has kernels for x's device and dtype, else None."""
    if x.device.type not in ("cpu", "cuda") or x.dtype not in (torch.float32, torch.float64):
        return None
    from . import fused  # builds or loads the extension; raises if that fails

    return fused if x.device.type == "cpu" or fused.has_cuda_kernels() else None


def _autocast_input(x):
    """x in float32 where autocast is on for its device and x is in a lower precision (e.g. from
    a Linear under autocast): the plastic ops run in float32 under autocast, as PyTorch's
    recurrent layers, and so do the state and the choice of kernels."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


class _PlasticLayer(nn.Module):
    """The options, plastic parameters, state checks and backend choice that every plastic layer
    shares. A layer's __init__ checks and stores the options (this __init__), creates its own
    weights (``_own_weights``, in that order), then calls _add_plastic_parameters;
    ``_state_type`` is its state NamedTuple, ``_w_range`` and ``_alpha_high`` the uniform
    initialisation ranges of w and alpha."""

    _PLASTIC_PARAMETERS = ("alpha", "eta", "h2mod", "fanout", "elig_rate")  # in creation order

    def __init__(
        self,
        input_size,
        hidden_size,
        alpha,
        modulation,
        rule,
        clip,
        n_modulators,
        eta_shape,
        plastic,
        impl,
    ):
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("n_modulators", n_modulators),
        ):
            if not _is_count(value):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        _check_choice("alpha", alpha, ALPHA_OPTIONS)
        _check_choice("modulation", modulation, MODULATION_OPTIONS)
        _check_choice("rule", rule, reference.RULES)
        _check_choice("eta_shape", eta_shape, ETA_SHAPES)
        if not (_is_finite_number(clip) and clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
        if plastic and rule == "retroactive" and modulation == "none":
            raise ValueError("rule 'retroactive' needs modulation 'simple' or 'fanout', got 'none'")
        if modulation == "simple" and n_modulators != 1:
            raise ValueError(
                f"modulation 'simple' takes n_modulators=1, got {n_modulators}; "
                "use modulation='fanout' for several modulators"
            )
        self.input_size, self.hidden_size = input_size, hidden_size
        self.alpha_mode, self.modulation, self.rule = alpha, modulation, rule
        self.clip = float(clip)
        self.n_modulators, self.eta_shape, self.plastic, self.impl = (
            n_modulators,
            eta_shape,
            plastic,
            impl,
        )

    def _add_plastic_parameters(self, eta_init, elig_rate_init, factory):
        """alpha, eta (modulation "none"), elig_rate (rule "retroactive") and the modulator's
        Linears, created with `factory` (_factory_kwargs); none for plastic=False."""
        if not _is_finite_number(eta_init):
            raise ValueError(f"eta_init must be a finite number, got {eta_init!r}")
        # Outside [0, 1] the eligibility trace is no longer an average (clamp_elig_rate_).
        if not (_is_finite_number(elig_rate_init) and 0 <= elig_rate_init <= 1):
            raise ValueError(f"elig_rate_init must be a number in [0, 1], got {elig_rate_init!r}")
        self._eta_init, self._elig_rate_init = float(eta_init), float(elig_rate_init)
        if not self.plastic:
            return
        N = self.hidden_size
        self.alpha = nn.Parameter(self._fresh("alpha", factory))
        if self.modulation == "none":
            self.eta = nn.Parameter(self._fresh("eta", factory))
        else:
            self.h2mod = nn.Linear(N, self.n_modulators, **factory)
            if self.modulation == "fanout":
                self.fanout = nn.Linear(self.n_modulators, N, **factory)
        if self.rule == "retroactive":
            self.elig_rate = nn.Parameter(self._fresh("elig_rate", factory))

    def _fresh(self, name, factory):
        """An initial value of the parameter `name` (w, alpha, eta or elig_rate): w ~
        U[_w_range), alpha ~ U[0, _alpha_high), eta = eta_init, elig_rate = elig_rate_init."""
        N = self.hidden_size
        if name == "w":
            low, high = self._w_range
            return (high - low) * torch.rand(N, N, **factory) + low
        if name == "alpha":
            shape = {"full": (N, N), "neuron": (N,), "scalar": ()}[self.alpha_mode]
            return self._alpha_high * torch.rand(shape, **factory)
        if name == "eta":
            return torch.full((N, N) if self.eta_shape == "full" else (), self._eta_init, **factory)
        return torch.tensor(self._elig_rate_init, **factory)

    def reset_parameters(self):
        """Draws every parameter anew as the constructor does, in its order: after the same
        seed, the values of a new layer. E.g. for a layer built with ``device="meta"`` and
        materialised with ``to_empty``."""
        with torch.no_grad():
            for name in (*self._own_weights, *self._PLASTIC_PARAMETERS):
                part = getattr(self, name, None)
                if isinstance(part, nn.Linear):
                    part.reset_parameters()
                elif part is not None:
                    part.copy_(self._fresh(name, dict(device=part.device, dtype=part.dtype)))

    @property
    def impl(self):
        """ "auto", "fused" or "reference" (see _backend); checked whenever it is set."""
        return self._impl

    @impl.setter
    def impl(self, value):
        _check_choice("impl", value, IMPLS)
        self._impl = value

    def _options(self):
        """(name, value) of the plastic options, for extra_repr."""
        return [
            ("alpha", self.alpha_mode),
            ("modulation", self.modulation),
            ("rule", self.rule),
            ("clip", self.clip),
            ("n_modulators", self.n_modulators),
            ("eta_shape", self.eta_shape),
        ]

    def extra_repr(self):
        options = [("plastic", False)] if not self.plastic else self._options()
        return ", ".join(
            [f"{self.input_size}, {self.hidden_size}"]
            + [f"{k}={v!r}" for k, v in options + [("impl", self.impl)]]
        )

    @torch.no_grad()
    def clamp_elig_rate_(self):
        """Clamps ``elig_rate`` into [0, 1] (rule "retroactive"; otherwise does nothing). Only
        there is the eligibility trace E_t = (1 - elig_rate) E_{t-1} + elig_rate D_t a running
        average; outside it the trace grows geometrically to inf. Call it after each optimizer
        step when large steps can push the rate out (projected gradient descent)."""
        if self.plastic and self.rule == "retroactive":
            self.elig_rate.clamp_(0.0, 1.0)

    def initial_state(self, batch_size, like):
        """Zeros: the state at the start of an episode."""
        N = self.hidden_size
        vectors = [
            like.new_zeros(batch_size, N) for name in self._state_type._fields if name not in TRACES
        ]
        if not self.plastic:
            return self._state_type(*vectors)
        elig = like.new_zeros(batch_size, N, N) if self.rule == "retroactive" else None
        return self._state_type(*vectors, like.new_zeros(batch_size, N, N), elig)

    def _check_state(self, state, batch_size, x):
        fields = self._state_type._fields
        if not isinstance(state, tuple) or len(state) != len(fields):
            raise ValueError(
                f"state must be a {self._state_type.__name__}({', '.join(fields)}) "
                f"or None, got {type(state).__name__}"
            )
        N = self.hidden_size
        want = {name: (batch_size, N) for name in fields if name not in TRACES}
        if self.plastic:
            want["hebb"] = (batch_size, N, N)
            if self.rule == "retroactive":
                want["elig"] = (batch_size, N, N)
        for name, t in zip(fields, state):
            if name not in want:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[name]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state.{name} must have shape {want[name]}, got {got}")
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(
                    f"state.{name} must have dtype {x.dtype} on {x.device} like the "
                    f"input, got {t.dtype} on {t.device}"
                )
        return self._state_type(*(None if t is None else t.contiguous() for t in state))

    def _check_input(self, x, dims, layout):
        if not isinstance(x, torch.Tensor) or x.dim() != dims or x.shape[-1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"input must have shape {layout} with input_size = {self.input_size}, got {got}"
            )
        if not x.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(
                f"input must have at least one time step and one sample, got shape "
                f"{tuple(x.shape)} for {layout}"
            )

    def _backend(self, x):
        """reference or fused, per `impl` and the input's device and dtype."""
        if self.impl == "reference":
            return reference
        fused = _fused_module(x)
        if fused is None and self.impl == "fused":
            raise RuntimeError(
                f"impl='fused': no fused kernels for {x.dtype} tensors on "
                f"{x.device}; use impl='auto' or 'reference'"
            )
        return fused or reference

    def _prepare(self, x, state):
        """(the checked state, or zeros for None; the backend) for x (..., B, input_size)."""
        if x.dtype != self.w.dtype:  # (on a device mismatch the ops' or torch's error names both)
            raise ValueError(
                f"input must have the dtype of the layer's parameters, {self.w.dtype}, "
                f"got {x.dtype}"
            )
        batch = x.shape[-2]
        if state is None:
            return self.initial_state(batch, x), self._backend(x)
        return self._check_state(state, batch, x), self._backend(x)

    def _plastic_params(self):
        """The PlasticParams of this layer, for the ops."""
        params = PlasticParams(self.w, self.alpha)
        if self.modulation == "none":
            params = params._replace(eta=self.eta)
        else:
            params = params._replace(h2mod_weight=self.h2mod.weight, h2mod_bias=self.h2mod.bias)
        if self.modulation == "fanout":
            params = params._replace(fanout_weight=self.fanout.weight, fanout_bias=self.fanout.bias)
        if self.rule == "retroactive":
            params = params._replace(elig_rate=self.elig_rate)
        return params

    # The sequence layers' (PlasticRNN, PlasticLSTM) options, input and output.

    def _set_sequence_options(self, batch_first, checkpoint_every):
        if checkpoint_every is not None and not _is_count(checkpoint_every):
            raise ValueError(
                f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}"
            )
        self.batch_first = batch_first
        self.checkpoint_every = checkpoint_every

    def _sequence_input(self, x, state):
        """(x checked, in float32 under autocast and time-major (T, B, input_size); the state,
        checked or zeros; the backend)."""
        self._check_input(x, 3, "(B, T, input_size)" if self.batch_first else "(T, B, input_size)")
        x = _autocast_input(x)
        if self.batch_first:
            x = x.transpose(0, 1)
        return (x, *self._prepare(x, state))

    def _sequence_result(self, out, state, m, return_modulation):
        """forward's result for the time-major out and m, in the layout of the input."""
        if self.batch_first:
            out = out.transpose(0, 1)
            m = None if m is None else m.transpose(0, 1)
        return (out, state, m) if return_modulation else (out, state)

    def _step_input(self, x, state):
        """(x checked and in float32 under autocast; the state, checked or zeros; the
        backend)."""
        self._check_input(x, 2, "(B, input_size)")
        x = _autocast_input(x)
        return (x, *self._prepare(x, state))


def _loop(step, x, state):
    """(out, final state) of step(x_t, state) -> state over the time steps of x."""
    outs = []
    for x_t in x.unbind(0):
        state = step(x_t, state)
        outs.append(state.h)
    return torch.stack(outs), state


class _PlasticRNNLayer(_PlasticLayer):
    """The weights, the plastic=False cell and the rollout steps of PlasticRNN and
    PlasticRNNCell; initialisation as documented in PlasticRNN."""

    _state_type = PlasticState
    _own_weights = ("i2h", "w")
    _w_range, _alpha_high = (0.0, 0.001), 0.001

    def __init__(
        self,
        input_size,
        hidden_size,
        alpha,
        modulation,
        rule,
        clip,
        n_modulators,
        eta_shape,
        plastic,
        impl,
        eta_init,
        elig_rate_init,
        factory,
    ):
        super().__init__(
            input_size,
            hidden_size,
            alpha,
            modulation,
            rule,
            clip,
            n_modulators,
            eta_shape,
            plastic,
            impl,
        )
        N = hidden_size
        self.i2h = nn.Linear(input_size, N, **factory)
        self.w = nn.Parameter(self._fresh("w", factory))
        self._add_plastic_parameters(eta_init, elig_rate_init, factory)

    def _fixed_step(self, x, state, backend):
        """The plastic=False cell."""
        if backend is reference:
            return PlasticState(reference.rnn_step(self.i2h(x), state.h, self.w))
        return PlasticState(
            torch.rnn_tanh_cell(x, state.h, self.i2h.weight, self.w.t(), self.i2h.bias)
        )

    @torch.no_grad()
    def rollout_step(self, x, state=None, return_modulation=False):
        """One step for acting without gradients (e.g. RL rollouts; runs under no_grad).

        ``h, state = layer.rollout_step(x, state=None)`` with x (B, I), or ``h, state, m =
        ...(x, state, return_modulation=True)``; ``state`` is None (zeros), a PlasticState (its
        traces are copied) or the RolloutState of the previous call, whose traces are updated in
        place. Same results as the step-by-step forward, but the next step's recurrent drive
        travels in the state, so that the fused kernels sweep the trace once per step, as a
        sequence does, where a one-step forward sweeps it twice and allocates new traces.
        """
        from .rollout import RolloutState

        self._check_input(x, 2, "(B, input_size)")
        x = _autocast_input(x)
        drive, copy = None, False
        if isinstance(state, RolloutState):
            drive = state.drive
            state = PlasticState(*state[:3])
        else:
            copy = state is not None  # the caller's traces are not to be overwritten
        state, backend = self._prepare(x, state)
        if copy:
            state = PlasticState(*(None if t is None else t.clone() for t in state))
        h, new_state, m = self._rollout(x, state, drive, backend)
        return (h, new_state, m) if return_modulation else (h, new_state)

    def _rollout(self, x, state, drive, backend, hebb_out=None, elig_out=None):
        """rollout_step on a checked state: (h, RolloutState, m). The new traces go to hebb_out
        and elig_out when given, else into the state's own."""
        from .rollout import RolloutState

        if not self.plastic:
            h = self._fixed_step(x, state, backend).h
            return h, RolloutState(h), None
        h, drive, m = backend.plastic_rnn_rollout_step(
            self.i2h(x),
            drive,
            state.h,
            state.hebb,
            state.elig,
            *self._plastic_params(),
            rule=self.rule,
            clip=self.clip,
            hebb_out=hebb_out,
            elig_out=elig_out,
        )
        hebb = state.hebb if hebb_out is None else hebb_out
        elig = state.elig if elig_out is None else elig_out
        return h, RolloutState(h, hebb, elig, drive), m

    def recorded_rollout(self, batch_size, steps, like, reuse=None):
        """A RecordedRollout of `steps` steps of `batch_size` samples from the zero state, in
        the dtype and on the device of the tensor `like`. `reuse`: an earlier RecordedRollout
        whose replay is no longer needed (e.g. the previous training iteration's): the new one
        takes over its buffers where they fit, which saves allocating and first touching them;
        the earlier one can then neither step nor replay."""
        from .rollout import RecordedRollout

        return RecordedRollout(self, batch_size, steps, like, reuse)


class PlasticRNN(_PlasticRNNLayer):
    """Plastic tanh RNN over a whole sequence (docs/design.md, 'The plastic tanh RNN').

    ``out, state = rnn(x, state=None)`` with x (T, B, I) (or (B, T, I) when ``batch_first``);
    ``out, state, m = rnn(x, state, return_modulation=True)`` also returns the neuromodulator
    outputs m (T, B, K) (None when modulation is "none"). ``checkpoint_every`` sets how often the
    fused op stores the trace for its backward (default ceil(sqrt(T))).

    Initialisation (as the Backpropamine simplemaze network): ``w`` and ``alpha`` uniform in
    [0, 0.001); ``eta`` (modulation "none") = ``eta_init``; ``elig_rate`` = ``elig_rate_init``;
    ``i2h``, ``h2mod`` and ``fanout`` keep PyTorch's Linear initialisation.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        alpha="full",
        modulation="fanout",
        rule="clip",
        clip=2.0,
        n_modulators=1,
        eta_shape="scalar",
        plastic=True,
        impl="auto",
        eta_init=0.01,
        elig_rate_init=0.1,
        *,
        batch_first=False,
        checkpoint_every=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            input_size,
            hidden_size,
            alpha,
            modulation,
            rule,
            clip,
            n_modulators,
            eta_shape,
            plastic,
            impl,
            eta_init,
            elig_rate_init,
            _factory_kwargs(device, dtype),
        )
        self._set_sequence_options(batch_first, checkpoint_every)

    def forward(self, x, state=None, return_modulation=False):
        x, state, backend = self._sequence_input(x, state)
        if self.plastic:
            out, hebb, elig, m = backend.plastic_rnn_sequence(
                self.i2h(x),
                state.h,
                state.hebb,
                state.elig,
                *self._plastic_params(),
                rule=self.rule,
                clip=self.clip,
                checkpoint_every=self.checkpoint_every,
            )
            state = PlasticState(out[-1], hebb, elig)
        else:
            (out, state), m = self._fixed_sequence(x, state, backend), None
        return self._sequence_result(out, state, m, return_modulation)

    def _fixed_sequence(self, x, state, backend):
        """The plastic=False RNN over the sequence: (out, final state)."""
        if backend is reference:
            return _loop(lambda x_t, s: self._fixed_step(x_t, s, reference), x, state)
        # PyTorch's own fused tanh RNN; w is (pre, post), nn.RNN's weight_hh is (post, pre).
        params = [self.i2h.weight, self.w.t(), self.i2h.bias, torch.zeros_like(self.i2h.bias)]
        out, _ = torch.rnn_tanh(
            x, state.h.unsqueeze(0), params, True, 1, 0.0, self.training, False, False
        )
        return out, PlasticState(out[-1])


class PlasticRNNCell(_PlasticRNNLayer):
    """One step of the plastic tanh RNN, for loops that interact with an environment.

    ``h, state = cell(x, state=None)`` with x (B, I); ``h, state, m = cell(x, state,
    return_modulation=True)``. Options, parameters and initialisation as PlasticRNN.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        alpha="full",
        modulation="fanout",
        rule="clip",
        clip=2.0,
        n_modulators=1,
        eta_shape="scalar",
        plastic=True,
        impl="auto",
        eta_init=0.01,
        elig_rate_init=0.1,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__(
            input_size,
            hidden_size,
            alpha,
            modulation,
            rule,
            clip,
            n_modulators,
            eta_shape,
            plastic,
            impl,
            eta_init,
            elig_rate_init,
            _factory_kwargs(device, dtype),
        )

    def forward(self, x, state=None, return_modulation=False):
        x, state, backend = self._step_input(x, state)
        if self.plastic:
            h, hebb, elig, m = backend.plastic_rnn_step(
                self.i2h(x),
                state.h,
                state.hebb,
                state.elig,
                *self._plastic_params(),
                rule=self.rule,
                clip=self.clip,
            )
            state = PlasticState(h, hebb, elig)
        else:
            state, m = self._fixed_step(x, state, backend), None
        return (state.h, state, m) if return_modulation else (state.h, state)


class _PlasticLSTMLayer(_PlasticLayer):
    """The weights, options and plastic=False cell of PlasticLSTM and PlasticLSTMCell;
    initialisation as documented in PlasticLSTM (docs/design.md, 'The plastic LSTM')."""

    _state_type = PlasticLSTMState
    _own_weights = ("i2g", "h2g", "w")
    _w_range, _alpha_high = (-0.01, 0.01), 0.0001

    def __init__(
        self,
        input_size,
        hidden_size,
        alpha,
        modulation,
        modulator_input,
        rule,
        clip,
        n_modulators,
        eta_shape,
        plastic,
        impl,
        eta_init,
        elig_rate_init,
        post_input,
        factory,
    ):
        reference.check_lstm_options(modulator_input, post_input)
        super().__init__(
            input_size,
            hidden_size,
            alpha,
            modulation,
            rule,
            clip,
            n_modulators,
            eta_shape,
            plastic,
            impl,
        )
        self.modulator_input = modulator_input
        self.post_input = post_input
        N = hidden_size
        self.i2g = nn.Linear(input_size, 4 * N, **factory)  # gates i, f, g, o
        self.h2g = nn.Linear(N, 3 * N, **factory)  # gates i, f, o; the h -> g weight is w
        self.w = nn.Parameter(self._fresh("w", factory))
        self._add_plastic_parameters(eta_init, elig_rate_init, factory)

    def _options(self):
        options = super()._options()
        options[2:2] = [("modulator_input", self.modulator_input), ("post_input", self.post_input)]
        return options

    def _torch_lstm_weights(self):
        """(w_ih, w_hh, b_ih, b_hh) of torch.nn.LSTM computing this (non-plastic) layer: the h -> g
        rows of w_hh are w (pre, post) transposed; our h -> g path has no bias of its own."""
        N = self.hidden_size
        w_hh = torch.cat([self.h2g.weight[: 2 * N], self.w.t(), self.h2g.weight[2 * N :]])
        b_hh = torch.cat(
            [self.h2g.bias[: 2 * N], self.h2g.bias.new_zeros(N), self.h2g.bias[2 * N :]]
        )
        return self.i2g.weight, w_hh, self.i2g.bias, b_hh

    def _fixed_step(self, x, state, backend):
        """The plastic=False cell."""
        if backend is reference:
            return PlasticLSTMState(
                *reference.lstm_step(
                    self.i2g(x), state.h, state.c, self.h2g.weight, self.h2g.bias, self.w
                )
            )
        return PlasticLSTMState(
            *torch.lstm_cell(x, (state.h, state.c), *self._torch_lstm_weights())
        )


class PlasticLSTM(_PlasticLSTMLayer):
    """LSTM with plastic, neuromodulated h -> g weights over a whole sequence (docs/design.md,
    'The plastic LSTM').

    ``PlasticLSTM(input_size, hidden_size, alpha="neuron", modulation="fanout",
    modulator_input="h", rule="clip", clip=2.0, n_modulators=1, eta_shape="scalar",
    plastic=True, impl="auto", eta_init=0.01, elig_rate_init=0.1, post_input="g", *,
    batch_first=False, checkpoint_every=None, device=None, dtype=None)``. ``modulator_input`` is
    what the neuromodulator of step t reads: "h" (h_t), "c" (the cell state c_t) or "h_prev"
    (h_{t-1}); ``post_input`` the post-synaptic term of the Hebbian product h_{t-1}[i] *
    post_t[j]: "g" (the cell candidate g_t), "u" (the plastic path's drive u_t, before x's part
    is added), "c" (c_t) or "h" (h_t). ``device`` and ``dtype``: where and in which
    floating-point dtype the parameters are created, as in torch.nn.

    ``out, state = lstm(x, state=None)`` with x (T, B, I) (or (B, T, I) when ``batch_first``) and
    state a ``PlasticLSTMState(h, c, hebb, elig)``; ``out, state, m = lstm(x, state,
    return_modulation=True)`` also returns m (T, B, K) (None when modulation is "none").

    Parameters: ``i2g`` (Linear I -> 4N, gates i, f, g, o), ``h2g`` (Linear N -> 3N, gates i, f,
    o), ``w`` (N, N, the h -> g weights, no bias), and the plastic ones of PlasticRNN. With
    ``plastic=False`` this is an ordinary LSTM with 7N gate biases, where torch.nn.LSTM and the
    Backpropamine PTB code have 8N: their h -> g bias only adds to i2g's g bias, so the function
    class is the same with N fewer parameters per layer.

    Initialisation (as Backpropamine's plastic LSTM): ``w`` uniform in [-0.01, 0.01); ``alpha``
    uniform in [0, 0.0001); ``eta`` (modulation "none") = ``eta_init``; ``elig_rate`` =
    ``elig_rate_init``; ``i2g``, ``h2g``, ``h2mod`` and ``fanout`` keep PyTorch's Linear
    initialisation.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        alpha="neuron",
        modulation="fanout",
        modulator_input="h",
        rule="clip",
        clip=2.0,
        n_modulators=1,
        eta_shape="scalar",
        plastic=True,
        impl="auto",
        eta_init=0.01,
        elig_rate_init=0.1,
        post_input="g",
        *,
        batch_first=False,
        checkpoint_every=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            input_size,
            hidden_size,
            alpha,
            modulation,
            modulator_input,
            rule,
            clip,
            n_modulators,
            eta_shape,
            plastic,
            impl,
            eta_init,
            elig_rate_init,
            post_input,
            _factory_kwargs(device, dtype),
        )
        self._set_sequence_options(batch_first, checkpoint_every)

    def forward(self, x, state=None, return_modulation=False):
        x, state, backend = self._sequence_input(x, state)
        if self.plastic:
            out, c, hebb, elig, m = backend.plastic_lstm_sequence(
                self.i2g(x),
                state.h,
                state.c,
                state.hebb,
                state.elig,
                self.h2g.weight,
                self.h2g.bias,
                *self._plastic_params(),
                rule=self.rule,
                clip=self.clip,
                modulator_input=self.modulator_input,
                checkpoint_every=self.checkpoint_every,
                post_input=self.post_input,
            )
            state = PlasticLSTMState(out[-1], c, hebb, elig)
        else:
            (out, state), m = self._fixed_sequence(x, state, backend), None
        return self._sequence_result(out, state, m, return_modulation)

    def _fixed_sequence(self, x, state, backend):
        """The plastic=False LSTM over the sequence, (out, final state): PyTorch's own fused
        LSTM, or step by step with the reference."""
        if backend is not reference:
            out, _, c = torch.lstm(
                x,
                (state.h.unsqueeze(0), state.c.unsqueeze(0)),
                list(self._torch_lstm_weights()),
                True,
                1,
                0.0,
                self.training,
                False,
                False,
            )
            return out, PlasticLSTMState(out[-1], c[0])
        return _loop(lambda x_t, s: self._fixed_step(x_t, s, reference), x, state)


class PlasticLSTMCell(_PlasticLSTMLayer):
    """One step of the plastic LSTM: ``h, state = cell(x, state=None)`` with x (B, I);
    ``h, state, m = cell(x, state, return_modulation=True)``. Options, parameters and
    initialisation as PlasticLSTM (without batch_first and checkpoint_every)."""

    def __init__(
        self,
        input_size,
        hidden_size,
        alpha="neuron",
        modulation="fanout",
        modulator_input="h",
        rule="clip",
        clip=2.0,
        n_modulators=1,
        eta_shape="scalar",
        plastic=True,
        impl="auto",
        eta_init=0.01,
        elig_rate_init=0.1,
        post_input="g",
        *,
        device=None,
        dtype=None,
    ):
        super().__init__(
            input_size,
            hidden_size,
            alpha,
            modulation,
            modulator_input,
            rule,
            clip,
            n_modulators,
            eta_shape,
            plastic,
            impl,
            eta_init,
            elig_rate_init,
            post_input,
            _factory_kwargs(device, dtype),
        )

    def forward(self, x, state=None, return_modulation=False):
        x, state, backend = self._step_input(x, state)
        if self.plastic:
            h, c, hebb, elig, m = backend.plastic_lstm_step(
                self.i2g(x),
                state.h,
                state.c,
                state.hebb,
                state.elig,
                self.h2g.weight,
                self.h2g.bias,
                *self._plastic_params(),
                rule=self.rule,
                clip=self.clip,
                modulator_input=self.modulator_input,
                post_input=self.post_input,
            )
            state = PlasticLSTMState(h, c, hebb, elig)
        else:
            state, m = self._fixed_step(x, state, backend), None
        return (state.h, state, m) if return_modulation else (state.h, state)
