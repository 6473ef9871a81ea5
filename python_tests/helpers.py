"""Shared helpers of the test suite: random inputs for every option combination, running an op
forward and backward with a loss that weights every output, and comparing two runs.

Option names used by the tests (the ops themselves infer the modulation from which tensors are
given, see backpropamine_cuda/reference.py):

* alpha: "full" (N, N), "neuron" (N,), "scalar" ().
* modulation: "none_scalar" (eta ()), "none_full" (eta (N, N)), "simple" (K = 1, no fanout),
  "fanout1" (K = 1), "fanout3" (K = 3).
* rule: "clip", "softclip", "decay", "oja", "retroactive" (needs a modulation), "clip_on_read".
"""

import csv
import itertools
import math
import os
from pathlib import Path

import pytest
import torch

import backpropamine_cuda
from backpropamine_cuda import params, reference

ALPHAS = ("full", "neuron", "scalar")
MODULATIONS = ("none_scalar", "none_full", "simple", "fanout1", "fanout3")
RULES = reference.RULES
CLIP_RULES = ("clip", "softclip", "retroactive")  # rules whose trace is clamped to [-clip, clip]
READ_CLAMP_RULES = ("clip_on_read",)  # rules whose trace is clamped where a recurrent step reads it

# This folder (subprocesses put it on sys.path to import helpers) and the repository root.
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Argument names of plastic_rnn_sequence / plastic_rnn_step and of plastic_lstm_sequence /
# plastic_lstm_step (identical in reference and fused).
RNN_INPUTS, LSTM_INPUTS = params.RNN_INPUTS, params.LSTM_INPUTS

# float64 results are compared element by element with the float64 reference (TOL). Results in
# float32 are judged norm-wise (see assert_tensor_close): err(t) = ||t - e|| / ||e|| against the
# float64 reference e on the same, exactly upcast, inputs must stay within LOWP_FACTOR times the
# error of the float32 reference, measured the same way, or the floor LOWP_FLOOR_ROUNDOFFS * u
# (u = 2^-24, float32's unit roundoff) where the reference happens to round almost exactly (a
# single-number gradient). A kernel sums in another order than ATen (blocked reductions, FMA,
# MKL's choices per CPU), so its error differs from the reference's by a small factor, not by
# orders of magnitude; a real bug errs by 1e-3 or more of the norm. Element-wise float32 bounds
# failed on some CPUs: one element of a cancellation-prone gradient can lose most of its digits
# in either implementation. TOL[torch.float32] is for two float32 runs of the same kernels
# (eager and compiled).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
LOWP_FACTOR = 10
LOWP_FLOOR_ROUNDOFFS = 64

# One representative (alpha, modulation) per rule, so that a sweep over the rules (sizes,
# checkpointing, float32) still visits every alpha and modulation.
RULE_CONFIG = {
    "clip": ("full", "fanout3"),
    "softclip": ("neuron", "simple"),
    "decay": ("scalar", "none_full"),
    "oja": ("full", "none_scalar"),
    "retroactive": ("neuron", "fanout1"),
    "clip_on_read": ("scalar", "fanout3"),
}


def valid_combo(modulation, rule):
    return not (rule == "retroactive" and modulation.startswith("none"))


def all_combos():
    """Every valid (alpha, modulation, rule)."""
    return [c for c in itertools.product(ALPHAS, MODULATIONS, RULES) if valid_combo(c[1], c[2])]


def n_modulators(modulation):
    return {"simple": 1, "fanout1": 1, "fanout3": 3}.get(modulation, 0)


def rnn_inputs(
    alpha,
    modulation,
    rule,
    *,
    B,
    N,
    T=None,
    dtype=torch.float64,
    seed=0,
    hebb_scale=1.0,
    eta_scale=0.5,
):
    """Random inputs of plastic_rnn_sequence (T given) or plastic_rnn_step (T None), as a dict
    keyed by argument name (absent options are None).

    The default scales make the clip engage with clip = 0.5: hebb ~ N(0, 1), |eta * D| ~ 0.5.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    K = n_modulators(modulation)
    d = dict.fromkeys(RNN_INPUTS)
    d["x"] = randn(B, N) if T is None else randn(T, B, N)
    d["h"] = torch.tanh(randn(B, N))
    d["hebb"] = randn(B, N, N, scale=hebb_scale)
    d["w"] = randn(N, N, scale=0.5 / math.sqrt(N))
    d["alpha"] = {
        "full": lambda: randn(N, N, scale=0.5),
        "neuron": lambda: randn(N, scale=0.5),
        "scalar": lambda: randn(scale=0.5),
    }[alpha]()
    if modulation == "none_scalar":
        d["eta"] = randn(scale=eta_scale)
    elif modulation == "none_full":
        d["eta"] = randn(N, N, scale=eta_scale)
    else:
        d["h2mod_weight"] = randn(K, N)
        d["h2mod_bias"] = randn(K)
        if modulation.startswith("fanout"):
            d["fanout_weight"] = randn(N, K, scale=eta_scale)
            d["fanout_bias"] = randn(N, scale=eta_scale)
    if rule == "retroactive":
        d["elig"] = randn(B, N, N, scale=hebb_scale)
        d["elig_rate"] = (0.1 + 0.8 * torch.rand((), generator=gen, dtype=torch.float64)).to(dtype)
    return d


def lstm_inputs(
    alpha,
    modulation,
    rule,
    *,
    B,
    N,
    T=None,
    dtype=torch.float64,
    seed=0,
    hebb_scale=1.0,
    eta_scale=0.5,
):
    """Random inputs of plastic_lstm_sequence (T given) or plastic_lstm_step (T None): those of
    rnn_inputs for the plastic part, plus x (.., B, 4N), c and the h2g Linear."""
    rnn = rnn_inputs(
        alpha,
        modulation,
        rule,
        B=B,
        N=N,
        T=T,
        dtype=dtype,
        seed=seed,
        hebb_scale=hebb_scale,
        eta_scale=eta_scale,
    )
    gen = torch.Generator().manual_seed(seed + 7919)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    extra = dict(
        x=randn(*rnn["x"].shape[:-1], 4 * N),
        c=randn(B, N),
        h2g_weight=randn(3 * N, N, scale=1 / math.sqrt(N)),
        h2g_bias=randn(3 * N),
    )
    return {k: extra[k] if k in extra else rnn[k] for k in LSTM_INPUTS}


def with_grad(inputs, requires_grad=True):
    """Fresh leaf copies of the tensors of `inputs` (requires_grad: True, False, or a set of
    names)."""
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
            continue
        want = requires_grad if isinstance(requires_grad, bool) else k in requires_grad
        out[k] = v.detach().clone().requires_grad_(want)
    return out


def loss_weights(outputs, seed=1234):
    """Fixed random weights, one tensor per non-None output (same for every implementation)."""
    gen = torch.Generator().manual_seed(seed)
    # float32 values, exactly representable in float64: float32 and float64 runs see the same loss
    return [
        None if o is None else torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.dtype)
        for o in outputs
    ]


def run_forward_backward(fn, inputs, *, use=None, requires_grad=True, seed=1234, **kwargs):
    """Calls fn(**inputs, **kwargs), backpropagates sum_k <weight_k, output_k> over the outputs
    whose index is in `use` (all by default).

    Returns (outputs, grads): outputs a tuple with None where the op returned None, grads a dict
    name -> gradient for every given input that requires grad (zeros where autograd gave None,
    i.e. the loss does not depend on it).
    """
    leaves = with_grad(inputs, requires_grad)
    outputs = fn(**leaves, **kwargs)
    weights = loss_weights(outputs, seed)
    used = range(len(outputs)) if use is None else use
    terms = [(outputs[k] * weights[k]).sum() for k in used if outputs[k] is not None]
    assert terms, "the loss uses no output"
    sum(terms).backward()
    grads = {
        k: (torch.zeros_like(v) if v.grad is None else v.grad)
        for k, v in leaves.items()
        if v is not None and v.requires_grad
    }
    return tuple(None if o is None else o.detach() for o in outputs), grads


def upcast(inputs):
    """float64 copy of a dict of inputs (exact for float32 values)."""
    return {k: None if v is None else v.double() for k, v in inputs.items()}


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (the absolute error when expected is 0)."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale > 0 else diff


def assert_tensor_close(actual, expected, name, dtype, baseline=None):
    """actual (computed in `dtype`) against expected (the float64 reference).

    float64: element-wise, TOL. Lower precision: norm-wise against `baseline`, the reference
    computed in `dtype` on the same inputs (required): relative_error(actual, expected) <=
    LOWP_FACTOR * max(relative_error(baseline, expected), LOWP_FLOOR_ROUNDOFFS * eps / 2).
    """
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        return
    assert baseline is not None, f"{name}: a {dtype} comparison needs the reference in {dtype}"
    assert expected.dtype == torch.float64, f"{name}: expected must be the float64 reference"
    err = relative_error(actual, expected)
    reference_err = relative_error(baseline, expected)
    floor = LOWP_FLOOR_ROUNDOFFS * torch.finfo(dtype).eps / 2
    bound = LOWP_FACTOR * max(reference_err, floor)
    assert err <= bound, (
        f"{name}: norm-wise relative error {err:.3g} against the float64 reference exceeds "
        f"{bound:.3g} = {LOWP_FACTOR} x max(the {dtype} reference's own error {reference_err:.3g}, "
        f"{LOWP_FLOOR_ROUNDOFFS} unit roundoffs {floor:.3g})"
    )


def assert_results_close(expected, actual, dtype, names=None, baseline=None):
    """expected/actual: (outputs tuple, grads dict) from run_forward_backward; `actual` was
    computed in `dtype`, `expected` by the reference in float64; `baseline` (required below
    float64) by the reference in `dtype` on the same inputs (see assert_tensor_close)."""
    (out_e, grad_e), (out_a, grad_a) = expected, actual
    out_b, grad_b = baseline if baseline is not None else (None, None)
    assert len(out_e) == len(out_a)
    for k, (e, a) in enumerate(zip(out_e, out_a)):
        name = names[k] if names else f"output {k}"
        assert (e is None) == (a is None), (
            f"{name}: expected {'None' if e is None else 'a tensor'}, got {type(a).__name__}"
        )
        if e is not None:
            assert_tensor_close(a, e, name, dtype, None if out_b is None else out_b[k])
    assert grad_e.keys() == grad_a.keys()
    for k in grad_e:
        assert_tensor_close(
            grad_a[k], grad_e[k], f"grad of {k}", dtype, None if grad_b is None else grad_b[k]
        )


def compare_with_reference(ref_fn, fn, inputs, *, names=None, fused_options=None, **options):
    """fn in the inputs' dtype against ref_fn in float64 (and, below float64, ref_fn in the
    inputs' dtype as the baseline of its own rounding), forward and every gradient; `options`
    go to both, `fused_options` to fn only. Returns the float64 reference's (outputs, grads)."""
    dtype = next(v.dtype for v in inputs.values() if v is not None)
    expected = run_forward_backward(ref_fn, upcast(inputs), **options)
    actual = run_forward_backward(fn, inputs, **options, **(fused_options or {}))
    baseline = None if dtype == torch.float64 else run_forward_backward(ref_fn, inputs, **options)
    assert_results_close(expected, actual, dtype, names=names, baseline=baseline)
    return expected


def assert_results_equal(expected, actual, keys=None):
    """Bitwise equality of two run_forward_backward results (grads restricted to `keys`)."""
    (out_e, grad_e), (out_a, grad_a) = expected, actual
    for k, (e, a) in enumerate(zip(out_e, out_a)):
        assert (e is None) == (a is None)
        assert e is None or torch.equal(e, a), f"output {k} differs bitwise"
    for k in grad_e.keys() if keys is None else [k for k in keys if k in grad_e]:
        assert torch.equal(grad_e[k], grad_a[k]), (
            f"grad of {k} differs bitwise (max diff {(grad_e[k] - grad_a[k]).abs().max()})"
        )


def clamp_engaged(hebb, clip):
    """True when some entries of the trace sit on the bound and some are strictly inside."""
    on_bound = hebb.abs() == clip
    return bool(on_bound.any()) and bool((~on_bound).any())


def read_clamp_engaged(hebb, clip):
    """True when some entries of a trace lie beyond the bound (clamped where a clip_on_read layer
    reads them) and some strictly inside."""
    beyond = hebb.abs() > clip
    return bool(beyond.any()) and bool((hebb.abs() < clip).any())


def subprocess_env(**extra):
    """Environment for a Python subprocess that imports the same backpropamine_cuda as the tests
    (also from a source checkout on a relative PYTHONPATH), plus `extra` variables."""
    root = str(Path(backpropamine_cuda.__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


# ---------------------------------------------------------------------------------------------
# Modules (modules/test_modules.py, test_lstm_modules.py): small layers, I inputs and N neurons.

I, N = 4, 6


def opt_id(options):
    return "-".join(f"{v}" for v in options.values())


def expected_param_shapes(alpha, modulation, rule, n_modulators, eta_shape, plastic=True):
    shapes = {"i2h.weight": (N, I), "i2h.bias": (N,), "w": (N, N)}
    if not plastic:
        return shapes
    shapes["alpha"] = {"full": (N, N), "neuron": (N,), "scalar": ()}[alpha]
    if modulation == "none":
        shapes["eta"] = (N, N) if eta_shape == "full" else ()
    else:
        shapes["h2mod.weight"] = (n_modulators, N)
        shapes["h2mod.bias"] = (n_modulators,)
        if modulation == "fanout":
            shapes["fanout.weight"] = (N, n_modulators)
            shapes["fanout.bias"] = (N,)
    if rule == "retroactive":
        shapes["elig_rate"] = ()
    return shapes


def make(cls, options, impl="fused", seed=0, **kwargs):
    torch.manual_seed(seed)
    module = cls(I, N, impl=impl, **options, **kwargs).double()
    with torch.no_grad():  # larger plastic parameters than the init, so that plasticity matters
        for name, p in module.named_parameters():
            if name in ("alpha", "w"):
                p.normal_(0, 0.5)
            elif name == "eta":
                p.normal_(0, 0.3)
    return module


def grads_of(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def assert_dicts_close(actual, expected, **tol):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# Experiments (the tests in experiments/)


def log_rows_without_timings(path):
    """The rows of an experiment's CSV log, without the "seconds" column (a resumed run
    reproduces every other field exactly)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_parser_error(parse, flags, message, capsys):
    """parse(flags) exits with a usage error whose text contains `message`."""
    with pytest.raises(SystemExit):
        parse(flags)
    assert message in capsys.readouterr().err


class OnCuda:
    """The fused functions of `ops` with every tensor argument (also inside a tuple, such as a
    SequenceRecord) moved to the GPU and every result moved back (differentiably), so that tests
    written for CPU tensors run the CUDA kernels. A tensor the op updates in place (the rollout
    step's traces) is copied back into the caller's tensor."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        fn = getattr(self._ops, name)

        def on_cuda(*args, **kwargs):
            moved = []  # (caller's tensor, its GPU copy, the copy's version before the call)

            def move(v):
                if isinstance(v, torch.Tensor):
                    copy = v.cuda()
                    moved.append((v, copy, copy._version))
                    return copy
                if isinstance(v, tuple):
                    items = [move(item) for item in v]
                    return type(v)(*items) if hasattr(v, "_fields") else tuple(items)
                return v

            out = fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
            with torch.no_grad():
                for original, copy, version in moved:
                    if copy._version != version:
                        original.copy_(copy)
            return (
                tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in out)
                if isinstance(out, tuple)
                else out.cpu()
            )

        return on_cuda


# Argument validation (test_validation_*.py): c10's way of printing sizes, inputs that break one
# requirement, and the ops that come as a sequence op and a step op.


def shape_str(shape):
    """How c10 prints sizes: [2, 5]."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def non_contiguous(t):
    """Same values and shape, every stride doubled."""
    nc = torch.stack([t, t], dim=-1)[..., 0]
    assert not nc.is_contiguous()
    return nc


# The RNN and LSTM ops come as a sequence op and a step op that share their checks.
SEQUENCE_OR_STEP = pytest.mark.parametrize("op", ["sequence", "step"])
