"""The fused ops: same signatures and results as backpropamine_cuda.reference, computed by the
C++ (and, where built, CUDA) kernels registered under ``torch.ops.backpropamine``.

This file holds the glue that makes the ops first-class PyTorch ops: fake implementations (for
torch.compile and meta tensors) and autograd formulas that call the hand-written backward ops.
"""

import functools
import math
import types
from typing import NamedTuple

import torch

from . import _extension, reference
from ._checks import is_int, is_real
from .params import PlasticParams

_extension.load()
# The ops' namespaces: the real ones (CPU and, where built, CUDA kernels), and the CUDA kernels
# run by the CPU emulator on CPU tensors (for the tests; see csrc/cpu/emulated_cuda_ops.cpp).
NAMESPACES = ("backpropamine", "backpropamine_emulated")


def has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels (torch with CUDA and nvcc at build time)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "backpropamine::plastic_rnn_sequence", "CUDA"
    )


def sequence_path(
    batch_size: int,
    hidden_size: int,
    rule: str = "clip",
    dtype: torch.dtype = torch.float32,
    cell: str = "rnn",
) -> str:
    """The path the RNN (`cell` "rnn") or LSTM ("lstm") sequence op takes on the CPU at these
    sizes: "whole" (each group of samples runs all T steps in one task) or "steps" (one parallel
    pass over the trace per step); docs/design.md explains the choice. The environment variable
    BACKPROPAMINE_SEQUENCE_PATH=whole|steps forces one (auto, or unset, decides)."""
    if cell not in ("rnn", "lstm"):
        raise ValueError(f"cell must be 'rnn' or 'lstm', got {cell!r}")
    return torch.ops.backpropamine.cpu_sequence_path(
        batch_size,
        hidden_size,
        rule == "retroactive",
        torch.empty(0, dtype=dtype).element_size(),
        cell == "lstm",
    )


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
# Fake implementations: output shapes and dtypes only. Each takes the op's arguments as the
# attributes of one object, named as in the op's schema (csrc/ops/register.h).


def _schema(namespace, name):
    return getattr(getattr(torch.ops, namespace), name).default._schema


def _tensor_argument_names(schema):
    return tuple(
        argument.name
        for argument in schema.arguments
        if str(argument.type) in ("Tensor", "Optional[Tensor]")
    )


def _differentiable_inputs(name):
    """The inputs of recurrent op `name` that its backward op returns gradients for after that
    of x: its tensor arguments but x and the bool mask clamp, in schema order."""
    return tuple(
        arg
        for arg in _tensor_argument_names(_schema("backpropamine", name))
        if arg not in ("x", "clamp")
    )


def _named_arguments(schema, args, kwargs):
    """The arguments of a call of the op of `schema`, by name, in schema order."""
    named = {}
    for k, argument in enumerate(schema.arguments):
        if k < len(args):
            named[argument.name] = args[k]
        elif argument.name in kwargs:
            named[argument.name] = kwargs[argument.name]
        else:
            named[argument.name] = argument.default_value if argument.has_default_value() else None
    return named


def _check_one_device(name, arguments):
    """Raises unless every tensor argument is on the device of the first, with the message of
    the kernels' checks (csrc/checks.cpp). The fakes also serve the `meta` device: without this,
    one meta tensor among CPU tensors would win the dispatch and return uninitialised memory."""
    first = None
    for arg, value in arguments.items():
        if not isinstance(value, torch.Tensor):
            continue
        if first is None:
            first = value.device
        elif value.device != first:
            raise RuntimeError(
                f"{name}: expected {arg} on device {first} (the device of the "
                f"first argument), got {value.device}"
            )


def _register_fake(name):
    def register(fn):
        for namespace in NAMESPACES:
            schema = _schema(namespace, name)

            def fake(*args, schema=schema, **kwargs):
                arguments = _named_arguments(schema, args, kwargs)
                _check_one_device(name, arguments)
                return fn(types.SimpleNamespace(**arguments))

            torch.library.register_fake(f"{namespace}::{name}")(fake)
        return fn

    return register


def _n_modulators(h2mod_weight):
    return 0 if h2mod_weight is None else h2mod_weight.shape[0]


def _trace_fakes(new, T, B, N, K, rule, checkpoint_every):
    """(hebb_T, elig_T, m, eta_seq, hebb_checkpoints, elig_checkpoints) of a sequence op."""
    retro = rule == "retroactive"
    n_ckpt = -(-T // checkpoint_every) - 1
    return (
        new(B, N, N),
        new(B if retro else 0, N, N),
        new(T, B, K),
        new(T if K else 0, B, N),
        new(n_ckpt, B, N, N),
        new(n_ckpt if retro else 0, B, N, N),
    )


def _step_trace_fakes(new, B, N, K, rule):
    """(hebb_new, elig_new, m, eta_t) of a step op; eta_t is empty without modulation."""
    return (
        new(B, N, N),
        new(B if rule == "retroactive" else 0, N, N),
        new(B, K),
        new(B, N) if K else new(0),
    )


@_register_fake("plastic_rnn_sequence")
def _(a):
    T, B, N = a.x.shape
    hebb_t, elig_t, m, eta_seq, ckpt_h, ckpt_e = _trace_fakes(
        a.x.new_empty, T, B, N, _n_modulators(a.h2mod_weight), a.rule, a.checkpoint_every
    )
    return a.x.new_empty(T, B, N), hebb_t, elig_t, m, eta_seq, ckpt_h, ckpt_e


@_register_fake("plastic_rnn_step")
def _(a):
    B, N = a.x.shape
    return (
        a.x.new_empty(B, N),
        *_step_trace_fakes(a.x.new_empty, B, N, _n_modulators(a.h2mod_weight), a.rule),
    )


@_register_fake("plastic_rnn_rollout_step")
def _(a):
    B, N = a.x.shape
    new = a.x.new_empty
    return new(B, N), new(B, N), new(B, _n_modulators(a.h2mod_weight))


def _gate_slots(post_input):
    """Slots per step of the LSTM ops' saved gates: i, f, g, o, and the plastic drive u_t where
    it is the trace's post-synaptic term (csrc/sequence_pass.h, lstm_gate_slots)."""
    return 5 if post_input == "u" else 4


@_register_fake("plastic_lstm_sequence")
def _(a):
    T, B, N = a.x.shape[0], a.x.shape[1], a.x.shape[2] // 4
    hebb_t, elig_t, m, eta_seq, ckpt_h, ckpt_e = _trace_fakes(
        a.x.new_empty, T, B, N, _n_modulators(a.h2mod_weight), a.rule, a.checkpoint_every
    )
    new = a.x.new_empty
    gates = new(T, _gate_slots(a.post_input), B, N)
    return (new(T, B, N), new(T, B, N), hebb_t, elig_t, m, eta_seq, gates, ckpt_h, ckpt_e)


@_register_fake("plastic_lstm_step")
def _(a):
    B, N = a.x.shape[0], a.x.shape[1] // 4
    new = a.x.new_empty
    return (
        new(B, N),
        new(B, N),
        *_step_trace_fakes(new, B, N, _n_modulators(a.h2mod_weight), a.rule),
        new(_gate_slots(a.post_input), B, N),
    )


def _grads_fake(grad_x, a, forward):
    """The backward op's outputs: grad_x, then one per differentiable input of the op `forward`
    (empty where it is None)."""
    inputs = [getattr(a, name) for name in _differentiable_inputs(forward)]
    return (grad_x, *[grad_x.new_empty(0) if t is None else torch.empty_like(t) for t in inputs])


@_register_fake("plastic_rnn_sequence_backward")
def _(a):
    return _grads_fake(torch.empty_like(a.out), a, "plastic_rnn_sequence")


@_register_fake("plastic_rnn_step_backward")
def _(a):
    return _grads_fake(torch.empty_like(a.h_new), a, "plastic_rnn_step")


@_register_fake("plastic_lstm_sequence_backward")
def _(a):
    T, B, N = a.out.shape
    return _grads_fake(a.out.new_empty(T, B, 4 * N), a, "plastic_lstm_sequence")


@_register_fake("plastic_lstm_step_backward")
def _(a):
    B, N = a.h_new.shape
    return _grads_fake(a.h_new.new_empty(B, 4 * N), a, "plastic_lstm_step")


@_register_fake("plastic_matvec")
def _(a):
    return a.x.new_empty(a.x.shape[0], a.w.shape[1])


@_register_fake("plastic_matvec_backward")
def _(a):
    return (
        torch.empty_like(a.x),
        torch.empty_like(a.w),
        torch.empty_like(a.alpha),
        torch.empty_like(a.hebb),
    )


@_register_fake("hebb_update")
def _(a):
    return torch.empty_like(a.hebb), (
        torch.empty_like(a.hebb) if a.rule == "retroactive" else a.hebb.new_empty(0)
    )


@_register_fake("hebb_update_backward")
def _(a):
    retro = a.rule == "retroactive"
    hebb = a.hebb
    return (
        torch.empty_like(hebb),
        torch.empty_like(a.pre),
        torch.empty_like(a.post),
        torch.empty_like(a.eta),
        torch.empty_like(hebb) if retro else hebb.new_empty(0),
        hebb.new_empty(()) if retro else hebb.new_empty(0),
    )


# ----------------------------------------------------------------------------------------------
# Autograd: the backward of each op is its hand-written backward op.

DOUBLE_BACKWARD_MESSAGE = (
    "double backward through the fused ops is not supported: their gradients come from "
    "hand-written backward kernels that autograd cannot differentiate. Use impl='reference' "
    "(or backpropamine_cuda.reference) for higher-order gradients."
)


def _once_differentiable(backward):
    """A backward (whose arguments include its ctx) that runs without recording a graph. Under
    create_graph=True (which gradient-penalty code passes even for first-order use) its
    gradients are the same, made to depend on everything they were computed from (the saved
    tensors and the incoming gradients) through a node that raises DOUBLE_BACKWARD_MESSAGE when
    autograd reaches it: differentiating them again, by backward() or autograd.grad with respect
    to any of those inputs, raises instead of giving wrong (missing) terms."""

    @functools.wraps(backward)
    def wrapper(*args):
        with torch.no_grad():
            grads = backward(*args)
        if not torch.is_grad_enabled():
            return grads
        ctx = next(a for a in args if isinstance(a, torch.autograd.function.FunctionCtx))
        sources = [
            t
            for t in (*ctx.saved_tensors, *args)
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        given = [k for k, g in enumerate(grads) if g is not None]
        if not given or not sources:
            return grads
        error = torch._C._functions.DelayedError(
            DOUBLE_BACKWARD_MESSAGE.encode(), len(given) + len(sources)
        )
        marked = error(*[grads[k].detach() for k in given], *sources)
        grads = list(grads)
        for k, g in zip(given, marked):
            grads[k] = g
        return tuple(grads)

    return wrapper


class _RecurrentAutograd:
    """Autograd of a recurrent op (RNN or LSTM, sequence or step) through its backward op, every
    tensor matched by name: the forward's inputs by the names of its schema, its outputs by
    `outputs` (the schemas' returns have no names). The backward op's arguments are looked up by
    their own names: ``grad_<x>`` takes the incoming gradient of the output `grads[grad_<x>]`,
    any other argument the forward's input or output of that name. It returns the gradient of
    x, then those of _differentiable_inputs."""

    def __init__(self, namespace, name, outputs, grads):
        self.backward_op = getattr(getattr(torch.ops, namespace), name + "_backward")
        self.inputs = tuple(argument.name for argument in _schema(namespace, name).arguments)
        self.outputs = outputs
        self.grads = grads
        self.saved = tuple(
            argument.name
            for argument in _schema(namespace, name + "_backward").arguments
            if argument.name not in grads
        )
        self.grad_inputs = ("x", *_differentiable_inputs(name))
        unknown = [arg for arg in self.saved if arg not in self.inputs and arg not in outputs]
        assert not unknown, f"{name}_backward: no input or output of {name} named {unknown}"

    def setup_context(self, ctx, inputs, output):
        values = {**dict(zip(self.inputs, inputs)), **dict(zip(self.outputs, output))}
        ctx.retro = values["rule"] == "retroactive"
        ctx.modulated = values["h2mod_weight"] is not None
        ctx.given = {name: values[name] is not None for name in self.grad_inputs}
        ctx.tensor_names = tuple(
            name for name in self.saved if isinstance(values[name], torch.Tensor)
        )
        ctx.options = {name: values[name] for name in self.saved if name not in ctx.tensor_names}
        ctx.save_for_backward(*(values[name] for name in ctx.tensor_names))
        ctx.mark_non_differentiable(
            *(values[name] for name in self.outputs if name not in self.grads.values())
        )
        ctx.set_materialize_grads(False)  # no zero-filled trace-sized gradients for unused outputs

    def backward(self, ctx, *output_grads):
        incoming = dict(zip(self.outputs, output_grads))
        arguments = {**dict(zip(ctx.tensor_names, ctx.saved_tensors)), **ctx.options}
        for grad_name, output in self.grads.items():
            arguments[grad_name] = _contiguous(incoming[output])
        if not ctx.retro:
            arguments["grad_elig"] = None
        if not ctx.modulated:
            arguments["grad_m"] = None
        grads = dict(zip(self.grad_inputs, self.backward_op(**arguments)))
        # None for the inputs that were None, and for the options and the clamp mask
        return tuple(grads[name] if ctx.given.get(name) else None for name in self.inputs)


# The outputs of each recurrent op, and the output whose gradient each grad_ argument of its
# backward op takes.
_RECURRENT_OUTPUTS = {
    "plastic_rnn_sequence": (
        ("out", "hebb_new", "elig_new", "m", "eta_seq", "hebb_checkpoints", "elig_checkpoints"),
        {"grad_out": "out", "grad_hebb": "hebb_new", "grad_elig": "elig_new", "grad_m": "m"},
    ),
    "plastic_rnn_step": (
        ("h_new", "hebb_new", "elig_new", "m", "eta_t"),
        {"grad_h_new": "h_new", "grad_hebb": "hebb_new", "grad_elig": "elig_new", "grad_m": "m"},
    ),
    "plastic_lstm_sequence": (
        (
            "out",
            "c_seq",
            "hebb_new",
            "elig_new",
            "m",
            "eta_seq",
            "gates",
            "hebb_checkpoints",
            "elig_checkpoints",
        ),
        {
            "grad_out": "out",
            "grad_c": "c_seq",
            "grad_hebb": "hebb_new",
            "grad_elig": "elig_new",
            "grad_m": "m",
        },
    ),
    "plastic_lstm_step": (
        ("h_new", "c_new", "hebb_new", "elig_new", "m", "eta_t", "gates"),
        {
            "grad_h_new": "h_new",
            "grad_c_new": "c_new",
            "grad_hebb": "hebb_new",
            "grad_elig": "elig_new",
            "grad_m": "m",
        },
    ),
}

for _namespace in NAMESPACES:
    for _name, (_outputs, _grads) in _RECURRENT_OUTPUTS.items():
        _autograd = _RecurrentAutograd(_namespace, _name, _outputs, _grads)
        torch.library.register_autograd(
            f"{_namespace}::{_name}",
            _once_differentiable(_autograd.backward),
            setup_context=_autograd.setup_context,
        )


def _matvec_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@_once_differentiable
def _matvec_backward(ops, ctx, g_u):
    return ops.plastic_matvec_backward(g_u.contiguous(), *ctx.saved_tensors)


def _update_setup(ctx, inputs, output):
    hebb, pre, post, eta, elig, elig_rate, rule, clip = inputs
    ctx.options = (rule, clip)
    ctx.has_elig = elig is not None
    ctx.save_for_backward(hebb, pre, post, eta, elig, elig_rate)
    ctx.set_materialize_grads(False)


@_once_differentiable
def _update_backward(ops, ctx, g_hebb, g_elig):
    hebb, pre, post, eta, elig, elig_rate = ctx.saved_tensors
    g = ops.hebb_update_backward(
        _contiguous(g_hebb),
        _contiguous(g_elig) if ctx.has_elig else None,
        hebb,
        pre,
        post,
        eta,
        elig,
        elig_rate,
        *ctx.options,
    )
    g_hebb_old, g_pre, g_post, g_eta, g_elig_old, g_rate = g
    if not ctx.has_elig:
        g_elig_old = g_rate = None
    return g_hebb_old, g_pre, g_post, g_eta, g_elig_old, g_rate, None, None


for _namespace in NAMESPACES:
    _ops = getattr(torch.ops, _namespace)
    torch.library.register_autograd(
        f"{_namespace}::plastic_matvec",
        functools.partial(_matvec_backward, _ops),
        setup_context=_matvec_setup,
    )
    torch.library.register_autograd(
        f"{_namespace}::hebb_update",
        functools.partial(_update_backward, _ops),
        setup_context=_update_setup,
    )


class SequenceRecord(NamedTuple):
    """What the sequence op's backward needs of a forward that has already run, e.g. a loop of
    rollout steps: out (T, B, N), m (T, B, K) (K = 0 without modulation), the traces after steps
    L, 2L, ... (hebb_checkpoints (ceil(T / L) - 1, B, N, N); elig_checkpoints likewise for rule
    "retroactive", else empty) and L = checkpoint_every."""

    out: torch.Tensor
    m: torch.Tensor
    hebb_checkpoints: torch.Tensor
    elig_checkpoints: torch.Tensor
    checkpoint_every: int


def _rates(m, h2mod_weight, fanout_weight, fanout_bias, N):
    """eta_seq (T, B, N) of the modulator outputs m (T, B, K): as the ops compute it (empty
    without modulation)."""
    if h2mod_weight is None:
        return m.new_empty(0, m.shape[1], N)
    if fanout_weight is None:
        return m[..., :1].expand(*m.shape[:2], N).contiguous()
    return torch.nn.functional.linear(m, fanout_weight, fanout_bias)


class _ReplayedSequence(torch.autograd.Function):
    """The recorded out and m of a sequence, in the autograd graph of (x, the initial state, the
    parameters) through the sequence op's hand-written backward: a replay without a forward."""

    # The tensors after x, as plastic_rnn_sequence_backward names them.
    INPUTS = ("h0", "hebb0", "elig0", *PlasticParams._fields)

    @staticmethod
    def forward(ctx, ops, record, rule, clip, x, *tensors):
        inputs = dict(zip(_ReplayedSequence.INPUTS, tensors))
        with torch.no_grad():
            eta_seq = _rates(
                record.m,
                inputs["h2mod_weight"],
                inputs["fanout_weight"],
                inputs["fanout_bias"],
                x.shape[2],
            )
        ctx.ops = ops
        ctx.options = dict(rule=rule, clip=clip, checkpoint_every=record.checkpoint_every)
        ctx.modulated = inputs["h2mod_weight"] is not None
        ctx.given = tuple(t is not None for t in tensors)
        ctx.save_for_backward(
            *tensors,
            record.out,
            record.m,
            eta_seq,
            record.hebb_checkpoints,
            record.elig_checkpoints,
        )
        ctx.set_materialize_grads(False)
        out, m = record.out.clone(), record.m.clone()
        if not ctx.modulated:
            ctx.mark_non_differentiable(m)
        return out, m

    @staticmethod
    @_once_differentiable
    def backward(ctx, g_out, g_m):
        names = (
            *_ReplayedSequence.INPUTS,
            "out",
            "m",
            "eta_seq",
            "hebb_checkpoints",
            "elig_checkpoints",
        )
        g_x, *g_inputs = ctx.ops.plastic_rnn_sequence_backward(
            grad_out=_contiguous(g_out),
            grad_hebb=None,
            grad_elig=None,
            # without modulation m is not an output of the model
            grad_m=_contiguous(g_m) if ctx.modulated else None,
            **dict(zip(names, ctx.saved_tensors)),
            **ctx.options,
        )
        return (
            None,
            None,
            None,
            None,
            g_x,
            *[g if given else None for g, given in zip(g_inputs, ctx.given)],
        )


# ----------------------------------------------------------------------------------------------
# Public functions, with the signatures of backpropamine_cuda.reference.


def _clip(op, clip):
    """clip as the kernels take it, a float (they check its range): not a bool or a string."""
    if not is_real(clip):
        raise ValueError(f"{op}: clip must be a finite number > 0, got {clip!r}")
    return float(clip)


def _sequence_checkpoint_every(op, x, checkpoint_every, tensors):
    """The checkpoint interval to pass: ceil(sqrt(T)) by default, and no checkpoints (T) when
    no backward is to come (the kernels check its range)."""
    if checkpoint_every is not None and not is_int(checkpoint_every):
        raise ValueError(
            f"{op}: checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}"
        )
    steps = x.shape[0] if x.dim() == 3 else 1
    if checkpoint_every is None:
        checkpoint_every = default_checkpoint_every(steps)
    if checkpoint_every >= 1 and not _needs_grad(*tensors):
        checkpoint_every = steps
    return checkpoint_every


def _modulation_output(m, h2mod_weight):
    return None if h2mod_weight is None else m


def _canonical_eta(eta, hebb):
    """eta broadcastable to (B, P, N) -> (B, 1, N) or (1, P, N), the two layouts of the kernels."""
    B, P, N = hebb.shape
    if not isinstance(eta, torch.Tensor):
        eta = torch.tensor(float(eta), dtype=hebb.dtype, device=hebb.device)
    not_broadcastable = ValueError(
        f"hebb_update: eta must be broadcastable to (B, P, N) = "
        f"{(B, P, N)}, got shape {tuple(eta.shape)}"
    )
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
    raise ValueError(
        f"hebb_update: eta may vary over the batch or over pre-synaptic neurons, not "
        f"both; got shape {tuple(eta.shape)} for (B, P, N) = {(B, P, N)}"
    )


class FusedOps:
    """The fused functions, with the signatures and results of backpropamine_cuda.reference, on
    the ops of one namespace."""

    def __init__(self, namespace):
        self._ops = getattr(torch.ops, namespace)

    def plastic_rnn_sequence(
        self,
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
        """Fused sequence op; see reference.plastic_rnn_sequence. ``checkpoint_every`` defaults
        to ceil(sqrt(T))."""
        params = PlasticParams(
            w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
        )
        tensors = (x, h, hebb, elig, *params)
        out, hebb_t, elig_t, m, *_ = self._ops.plastic_rnn_sequence(
            *tensors,
            rule,
            _clip("plastic_rnn_sequence", clip),
            _sequence_checkpoint_every("plastic_rnn_sequence", x, checkpoint_every, tensors),
            clamp,
        )
        return out, hebb_t, _none_if_empty(elig_t), _modulation_output(m, h2mod_weight)

    def plastic_rnn_step(
        self,
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
        """Fused step op; see reference.plastic_rnn_step."""
        params = PlasticParams(
            w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
        )
        h_new, hebb_new, elig_new, m, _ = self._ops.plastic_rnn_step(
            x, h, hebb, elig, *params, rule, _clip("plastic_rnn_step", clip), clamp
        )
        return h_new, hebb_new, _none_if_empty(elig_new), _modulation_output(m, h2mod_weight)

    def plastic_rnn_rollout_step(
        self,
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
        """Fused rollout step, no autograd; see reference.plastic_rnn_rollout_step."""
        params = PlasticParams(
            w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
        )
        tensors = (x, u, h, hebb, elig, *params)
        reference.check_no_grad("plastic_rnn_rollout_step", tensors)
        h_new, u_next, m = self._ops.plastic_rnn_rollout_step(
            *tensors, rule, _clip("plastic_rnn_rollout_step", clip), clamp, hebb_out, elig_out
        )
        return h_new, u_next, _modulation_output(m, h2mod_weight)

    def plastic_rnn_sequence_replay(
        self,
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
        *,
        record,
    ):
        """``(out, m)`` of plastic_rnn_sequence on these inputs, taken from ``record`` (a
        SequenceRecord of a forward that already ran on them, e.g. a loop of rollout steps),
        with the sequence op's gradients: the replay of a rollout without running it again.
        ``m`` is None without modulation. The record must come from these very inputs: it is
        not checked against them."""
        params = PlasticParams(
            w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
        )
        out, m = _ReplayedSequence.apply(
            self._ops,
            record,
            rule,
            _clip("plastic_rnn_sequence_replay", clip),
            x,
            h,
            hebb,
            elig,
            *params,
        )
        return out, _modulation_output(m, h2mod_weight)

    def plastic_lstm_sequence(
        self,
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
        """Fused plastic LSTM sequence op; see reference.plastic_lstm_sequence.
        ``checkpoint_every`` defaults to ceil(sqrt(T))."""
        params = PlasticParams(
            w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
        )
        tensors = (x, h, c, hebb, elig, h2g_weight, h2g_bias, *params)
        out, c_seq, hebb_t, elig_t, m, *_ = self._ops.plastic_lstm_sequence(
            *tensors,
            rule,
            _clip("plastic_lstm_sequence", clip),
            modulator_input,
            _sequence_checkpoint_every("plastic_lstm_sequence", x, checkpoint_every, tensors),
            post_input,
        )
        return (out, c_seq[-1], hebb_t, _none_if_empty(elig_t), _modulation_output(m, h2mod_weight))

    def plastic_lstm_step(
        self,
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
        """Fused plastic LSTM step op; see reference.plastic_lstm_step."""
        params = PlasticParams(
            w, alpha, eta, elig_rate, h2mod_weight, h2mod_bias, fanout_weight, fanout_bias
        )
        h_new, c_new, hebb_new, elig_new, m, *_ = self._ops.plastic_lstm_step(
            x,
            h,
            c,
            hebb,
            elig,
            h2g_weight,
            h2g_bias,
            *params,
            rule,
            _clip("plastic_lstm_step", clip),
            modulator_input,
            post_input,
        )
        return (
            h_new,
            c_new,
            hebb_new,
            _none_if_empty(elig_new),
            _modulation_output(m, h2mod_weight),
        )

    def plastic_matvec(self, x, w, alpha, hebb):
        """Fused ``x @ (w + alpha * hebb)`` per sample; see reference.plastic_matvec."""
        return self._ops.plastic_matvec(x, w, alpha, hebb)

    def hebb_update(self, hebb, pre, post, eta, rule, clip, elig=None, elig_rate=None):
        """Fused plasticity step; see reference.hebb_update. Returns ``(new_hebb, new_elig)``."""
        if elig_rate is not None and not isinstance(elig_rate, torch.Tensor):
            elig_rate = torch.tensor(float(elig_rate), dtype=hebb.dtype, device=hebb.device)
        new_hebb, new_elig = self._ops.hebb_update(
            hebb,
            pre,
            post,
            _canonical_eta(eta, hebb),
            elig,
            elig_rate,
            rule,
            _clip("hebb_update", clip),
        )
        return new_hebb, (new_elig if elig is not None else None)


_fused = FusedOps("backpropamine")
plastic_rnn_sequence = _fused.plastic_rnn_sequence
plastic_rnn_step = _fused.plastic_rnn_step
plastic_rnn_rollout_step = _fused.plastic_rnn_rollout_step
plastic_rnn_sequence_replay = _fused.plastic_rnn_sequence_replay
plastic_lstm_sequence = _fused.plastic_lstm_sequence
plastic_lstm_step = _fused.plastic_lstm_step
plastic_matvec = _fused.plastic_matvec
hebb_update = _fused.hebb_update
# The CUDA kernels run by the CPU emulator, on CPU tensors: what the tests check them with.
emulated_cuda = FusedOps("backpropamine_emulated")
