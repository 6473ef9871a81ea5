"""Every validation message of the ops (csrc/checks.cpp) and of the Python layer (fused.py,
modules.py): the exception type (RuntimeError for shapes, dtypes, devices and contiguity;
ValueError for option values and missing/extra optional arguments) and a message that names the
argument, the expected and the actual value.

Device mismatches with `meta` are here; between the CPU and a GPU, in test_cuda.py.
"""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backpropamine_cuda as bp
from backpropamine_cuda import reference
from helpers import (LSTM_INPUTS, RNN_INPUTS, TOL, lstm_inputs, rnn_inputs, run_forward_backward,
                     subprocess_env)

OPS = torch.ops.backpropamine
B, N, K, T = 2, 5, 3, 3


@pytest.fixture(autouse=True)
def _ops_loaded(fused_cpu):
    """torch.ops.backpropamine exists once the fused module has loaded the extension."""


def raises(exc_type, *fragments):
    """pytest.raises for exactly `exc_type` (not a subclass, so ValueError vs RuntimeError
    matters) whose message contains every fragment literally."""
    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(exc_type)
            self._info = self._ctx.__enter__()
            return self._info

        def __exit__(self, *exc):
            suppress = self._ctx.__exit__(*exc)
            assert self._info.type is exc_type, f"raised {self._info.type.__name__}"
            message = str(self._info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return suppress
    return _Check()


def shape_str(shape):
    """How c10 prints sizes: [2, 5]."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def non_contiguous(t):
    """Same values and shape, every stride doubled."""
    nc = torch.stack([t, t], dim=-1)[..., 0]
    assert not nc.is_contiguous()
    return nc


# ---------------------------------------------------------------------------------------------
# The RNN ops (sequence and step share their checks; the message starts with the op's name).

def rnn_case(op, modulation="fanout3", rule="retroactive"):
    """(function, valid kwargs) of the fused sequence or step op."""
    inputs = rnn_inputs("full", modulation, rule, B=B, N=N, T=T if op == "sequence" else None)
    fn = bp.fused.plastic_rnn_sequence if op == "sequence" else bp.fused.plastic_rnn_step
    return fn, dict(inputs, rule=rule, clip=1.0)


def op_name(op):
    return f"plastic_rnn_{op}"


OPS_PARAM = pytest.mark.parametrize("op", ["sequence", "step"])


@OPS_PARAM
def test_valid_inputs_pass(op):
    fn, kwargs = rnn_case(op)
    fn(**kwargs)  # the baseline every other test of this section perturbs


# name, wrong shape, fragment naming the expected shape (modulation fanout3 unless given)
RNN_SHAPE_CASES = [
    ("h", (B, N - 1), f"{shape_str((B, N))} (B, N)"),
    ("hebb", (B, N, N - 1), f"{shape_str((B, N, N))} (B, N, N)"),
    ("hebb", (B + 1, N, N), f"{shape_str((B, N, N))} (B, N, N)"),
    ("elig", (B, N - 1, N), f"{shape_str((B, N, N))} (same as hebb)"),
    ("w", (N, N - 1), f"{shape_str((N, N))} (N, N)"),
    ("alpha", (N - 1, N), f"{shape_str((N, N))} (P, N) for alpha 'full'"),
    ("alpha", (N + 1,), f"{shape_str((N,))} (N,) for alpha 'neuron'"),
    ("elig_rate", (1,), "[] (a scalar)"),
    ("h2mod_bias", (K + 1,), f"{shape_str((K,))} (K,)"),
    ("fanout_weight", (N, K - 1), f"{shape_str((N, K))} (N, K)"),
    ("fanout_bias", (N - 1,), f"{shape_str((N,))} (N,)"),
]


@OPS_PARAM
@pytest.mark.parametrize("name,shape,expected", RNN_SHAPE_CASES,
                         ids=[f"{c[0]}{c[1]}" for c in RNN_SHAPE_CASES])
def test_rnn_wrong_shape(op, name, shape, expected):
    fn, kwargs = rnn_case(op)
    kwargs[name] = torch.zeros(shape, dtype=torch.float64)
    with raises(RuntimeError, f"{op_name(op)}: expected {name} to have shape {expected}",
                f"got {shape_str(shape)}"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("shape", [(1, N, N), (N, N, 1)], ids=str)
def test_rnn_alpha_wrong_rank(op, shape):
    fn, kwargs = rnn_case(op)
    kwargs["alpha"] = torch.zeros(shape, dtype=torch.float64)
    with raises(RuntimeError, f"{op_name(op)}: expected alpha of shape (P, N) ('full'), (N,) "
                "('neuron') or () ('scalar')", f"P, N = {N}, {N}", f"got {shape_str(shape)}"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("shape", [(K, N + 1), (0, N), (N,), (1, K, N)], ids=str)
def test_rnn_h2mod_weight_wrong_shape(op, shape):
    fn, kwargs = rnn_case(op)
    kwargs["h2mod_weight"] = torch.zeros(shape, dtype=torch.float64)
    with raises(RuntimeError, f"{op_name(op)}: expected h2mod_weight of shape (K, N) with K >= 1 "
                f"and N = {N}", f"got {shape_str(shape)}"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("shape", [(N,), (N, 1), (1, N, N)], ids=str)
def test_rnn_eta_wrong_shape(op, shape):
    fn, kwargs = rnn_case(op, modulation="none_full", rule="clip")
    kwargs["eta"] = torch.zeros(shape, dtype=torch.float64)
    with raises(RuntimeError, f"{op_name(op)}: expected eta of shape () ('scalar') or (N, N) "
                f"('full') with N = {N}", f"got {shape_str(shape)}"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_x_wrong_rank(op):
    fn, kwargs = rnn_case(op)
    bad = kwargs["x"][0] if op == "sequence" else kwargs["x"].unsqueeze(0)
    kwargs["x"] = bad
    layout = "(T, B, N)" if op == "sequence" else "(B, N)"
    with raises(RuntimeError, f"{op_name(op)}: expected x of shape {layout}",
                f"got {shape_str(bad.shape)}"):
        fn(**kwargs)


@pytest.mark.parametrize("shape", [(0, B, N), (T, 0, N), (T, B, 0)], ids=str)
def test_sequence_empty(shape):
    fn, kwargs = rnn_case("sequence", modulation="none_scalar", rule="clip")
    kwargs.update(x=torch.zeros(shape, dtype=torch.float64),
                  h=torch.zeros(shape[1:], dtype=torch.float64),
                  hebb=torch.zeros(shape[1], shape[2], shape[2], dtype=torch.float64),
                  w=torch.zeros(shape[2], shape[2], dtype=torch.float64),
                  alpha=torch.zeros((), dtype=torch.float64))
    with raises(RuntimeError, "plastic_rnn_sequence: expected x with at least one time step, "
                f"sample and neuron, got shape {shape_str(shape)}"):
        fn(**kwargs)


def test_step_empty_batch():
    fn, kwargs = rnn_case("step", modulation="none_scalar", rule="clip")
    kwargs.update(x=torch.zeros(0, N, dtype=torch.float64), h=torch.zeros(0, N).double(),
                  hebb=torch.zeros(0, N, N, dtype=torch.float64))
    with raises(RuntimeError, "plastic_rnn_step: expected x with at least one time step, "
                f"sample and neuron, got shape {shape_str((0, N))}"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("name", [n for n in RNN_INPUTS if n != "x" and n != "eta"])
def test_rnn_dtype_mismatch(op, name):
    fn, kwargs = rnn_case(op)
    kwargs[name] = kwargs[name].float()
    with raises(RuntimeError, f"{op_name(op)}: expected {name} to have dtype Double (the dtype "
                "of the first argument), got Float"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_eta_dtype_mismatch(op):
    fn, kwargs = rnn_case(op, modulation="none_full", rule="clip")
    kwargs = {k: (v.float() if isinstance(v, torch.Tensor) and k != "eta" else v)
              for k, v in kwargs.items()}
    with raises(RuntimeError, f"{op_name(op)}: expected eta to have dtype Float (the dtype of the "
                "first argument), got Double"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("dtype,printed", [(torch.float16, "Half"), (torch.bfloat16, "BFloat16"),
                                           (torch.int32, "Int"), (torch.int64, "Long")],
                         ids=str)
def test_rnn_x_unsupported_dtype(op, dtype, printed):
    fn, kwargs = rnn_case(op)
    kwargs["x"] = kwargs["x"].to(dtype)
    with raises(RuntimeError, f"{op_name(op)}: expected x to have dtype float32 or float64, got "
                f"{printed}"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("name", [n for n in RNN_INPUTS if n not in ("eta", "elig_rate")])
def test_rnn_non_contiguous(op, name):
    fn, kwargs = rnn_case(op)
    kwargs[name] = non_contiguous(kwargs[name])
    t = kwargs[name]
    with raises(RuntimeError, f"{op_name(op)}: expected {name} to be contiguous, got strides "
                f"{shape_str(t.stride())} for shape {shape_str(t.shape)} (call .contiguous())"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_eta_non_contiguous(op):
    fn, kwargs = rnn_case(op, modulation="none_full", rule="clip")
    kwargs["eta"] = kwargs["eta"].t()
    with raises(RuntimeError, f"{op_name(op)}: expected eta to be contiguous, got strides "
                f"{shape_str((1, N))} for shape {shape_str((N, N))}"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_clamp_not_bool(op):
    fn, kwargs = rnn_case(op)
    with raises(RuntimeError, f"{op_name(op)}: expected clamp to have dtype bool, got Double"):
        fn(**kwargs, clamp=torch.ones_like(kwargs["x"]))


@OPS_PARAM
def test_rnn_clamp_wrong_shape(op):
    fn, kwargs = rnn_case(op)
    shape = (*kwargs["x"].shape[:-1], N + 1)
    with raises(RuntimeError, f"{op_name(op)}: expected clamp to have shape "
                f"{shape_str(kwargs['x'].shape)} (the shape of x), got {shape_str(shape)}"):
        fn(**kwargs, clamp=torch.ones(shape, dtype=torch.bool))


@OPS_PARAM
def test_rnn_clamp_non_contiguous(op):
    fn, kwargs = rnn_case(op)
    clamp = non_contiguous(torch.ones_like(kwargs["x"], dtype=torch.bool))
    with raises(RuntimeError, f"{op_name(op)}: expected clamp to be contiguous"):
        fn(**kwargs, clamp=clamp)


def rollout_case():
    """(fused rollout step, valid kwargs)."""
    _, kwargs = rnn_case("step")
    return bp.fused.plastic_rnn_rollout_step, dict(kwargs, u=torch.zeros_like(kwargs["x"]))


@pytest.mark.parametrize("shape", [(B, N + 1), (N,), (1, B, N)], ids=str)
def test_rollout_step_drive_wrong_shape(shape):
    fn, kwargs = rollout_case()
    fn(**kwargs)
    kwargs["u"] = torch.zeros(shape, dtype=torch.float64)
    with raises(RuntimeError, f"plastic_rnn_rollout_step: expected u to have shape "
                f"{shape_str((B, N))} (B, N), like x, got {shape_str(shape)}"):
        fn(**kwargs)


def test_rollout_step_drive_wrong_dtype():
    fn, kwargs = rollout_case()
    kwargs["u"] = kwargs["u"].float()
    with raises(RuntimeError, "plastic_rnn_rollout_step: expected u to have dtype Double"):
        fn(**kwargs)


def test_rollout_step_trace_outputs():
    fn, kwargs = rollout_case()  # rule retroactive: hebb and elig
    hebb, elig = kwargs["hebb"], kwargs["elig"]
    fn(**kwargs, hebb_out=torch.empty_like(hebb), elig_out=torch.empty_like(elig))
    fn(**kwargs, hebb_out=hebb, elig_out=elig)  # in place, as without them
    with raises(ValueError, "plastic_rnn_rollout_step: with elig and hebb_out, pass elig_out"):
        fn(**kwargs, hebb_out=torch.empty_like(hebb))
    with raises(ValueError, "plastic_rnn_rollout_step: elig_out needs hebb_out"):
        fn(**kwargs, elig_out=torch.empty_like(elig))
    with raises(RuntimeError, "plastic_rnn_rollout_step: expected hebb_out to have shape"):
        fn(**kwargs, hebb_out=hebb.new_empty(B, N, N + 1), elig_out=torch.empty_like(elig))
    with raises(RuntimeError, "plastic_rnn_rollout_step: expected elig_out to have dtype Double"):
        fn(**kwargs, hebb_out=torch.empty_like(hebb), elig_out=elig.float())
    with raises(RuntimeError, "plastic_rnn_rollout_step: expected hebb_out to be contiguous"):
        fn(**kwargs, hebb_out=hebb.new_empty(B, N, N).transpose(1, 2),
           elig_out=torch.empty_like(elig))
    both = hebb.new_empty(2 * B * N * N + 1)
    shifted = both[1:B * N * N + 1].view(B, N, N)
    with raises(RuntimeError, "plastic_rnn_rollout_step: hebb_out overlaps part of hebb"):
        fn(**dict(kwargs, hebb=both[:B * N * N].view(B, N, N)), hebb_out=shifted,
           elig_out=torch.empty_like(elig))
    with raises(RuntimeError, "plastic_rnn_rollout_step: hebb_out overlaps elig"):
        fn(**kwargs, hebb_out=elig, elig_out=torch.empty_like(elig))
    with raises(RuntimeError, "plastic_rnn_rollout_step: elig_out overlaps hebb_out"):
        out = torch.empty_like(hebb)
        fn(**kwargs, hebb_out=out, elig_out=out)
    w_sized = hebb.new_empty(B, N, N)
    with raises(RuntimeError, "plastic_rnn_rollout_step: hebb_out overlaps w"):
        fn(**dict(kwargs, w=w_sized[0]), hebb_out=w_sized, elig_out=torch.empty_like(elig))
    fn, kwargs = rollout_case_without_elig()
    with raises(ValueError, "plastic_rnn_rollout_step: elig_out is only used with elig"):
        fn(**kwargs, hebb_out=torch.empty_like(kwargs["hebb"]),
           elig_out=torch.empty_like(kwargs["hebb"]))
    fn(**kwargs, hebb_out=torch.empty_like(kwargs["hebb"]))


def rollout_case_without_elig():
    _, kwargs = rnn_case("step", rule="clip")
    return bp.fused.plastic_rnn_rollout_step, dict(kwargs, u=None)


def test_rollout_step_checks_like_step():
    """The rollout step shares the step op's checks: e.g. a wrong hebb shape."""
    fn, kwargs = rollout_case()
    kwargs["hebb"] = torch.zeros(B, N, N - 1, dtype=torch.float64)
    with raises(RuntimeError, "plastic_rnn_rollout_step: expected hebb to have shape"):
        fn(**kwargs)


# Option values and missing/extra optional arguments: ValueError.

@OPS_PARAM
@pytest.mark.parametrize("rule", ["hebbian", "", "Clip"])
def test_rnn_unknown_rule(op, rule):
    fn, kwargs = rnn_case(op, modulation="none_scalar", rule="clip")
    kwargs["rule"] = rule
    with raises(ValueError, f"{op_name(op)}: rule must be one of 'clip', 'softclip', 'decay', "
                f"'oja', 'retroactive', got '{rule}'"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("clip,printed", [(0.0, "0"), (-1.0, "-1"), (math.nan, "nan"),
                                          (math.inf, "inf")], ids=str)
def test_rnn_bad_clip(op, clip, printed):
    fn, kwargs = rnn_case(op)
    kwargs["clip"] = clip
    with raises(ValueError, f"{op_name(op)}: clip must be a finite number > 0, got {printed}"):
        fn(**kwargs)


@pytest.mark.parametrize("checkpoint_every", [0, -2])
def test_sequence_bad_checkpoint_every(checkpoint_every):
    fn, kwargs = rnn_case("sequence")
    with raises(ValueError, "plastic_rnn_sequence: checkpoint_every must be >= 1, got "
                f"{checkpoint_every}"):
        fn(**kwargs, checkpoint_every=checkpoint_every)


@OPS_PARAM
def test_rnn_retroactive_without_modulation(op):
    fn, kwargs = rnn_case(op)
    kwargs.update(h2mod_weight=None, h2mod_bias=None, fanout_weight=None, fanout_bias=None,
                  eta=torch.tensor(0.1, dtype=torch.float64))
    with raises(ValueError, f"{op_name(op)}: rule 'retroactive' needs modulation 'simple' or "
                "'fanout' (pass h2mod_weight), got modulation 'none'"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_simple_with_several_modulators(op):
    fn, kwargs = rnn_case(op)
    kwargs.update(fanout_weight=None, fanout_bias=None)
    with raises(ValueError, f"{op_name(op)}: modulation 'simple' takes one modulator "
                f"(h2mod_weight of shape (1, N)), got K = {K}; use 'fanout' for K > 1"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_eta_and_h2mod(op):
    fn, kwargs = rnn_case(op)
    kwargs["eta"] = torch.tensor(0.1, dtype=torch.float64)
    with raises(ValueError, f"{op_name(op)}: pass either eta (modulation 'none') or h2mod_weight "
                "(modulation 'simple'/'fanout'), not both"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_no_eta_no_h2mod(op):
    fn, kwargs = rnn_case(op, modulation="none_scalar", rule="clip")
    kwargs["eta"] = None
    with raises(ValueError, f"{op_name(op)}: without modulation (h2mod_weight None) the learned "
                "rate eta is required, got None"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("name,shape", [("fanout_weight", (N, 1)), ("h2mod_bias", (1,)),
                                        ("fanout_bias", (N,))])
def test_rnn_modulation_parts_without_h2mod_weight(op, name, shape):
    fn, kwargs = rnn_case(op, modulation="none_scalar", rule="clip")
    kwargs[name] = torch.zeros(shape, dtype=torch.float64)
    with raises(ValueError, f"{op_name(op)}: fanout_weight, h2mod_bias and fanout_bias need "
                "h2mod_weight"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_h2mod_bias_missing(op):
    fn, kwargs = rnn_case(op)
    kwargs["h2mod_bias"] = None
    with raises(ValueError, f"{op_name(op)}: h2mod_bias is required with h2mod_weight"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_fanout_bias_missing(op):
    fn, kwargs = rnn_case(op)
    kwargs["fanout_bias"] = None
    with raises(ValueError, f"{op_name(op)}: fanout_bias is required with fanout_weight"):
        fn(**kwargs)


@OPS_PARAM
def test_rnn_fanout_bias_without_fanout_weight(op):
    fn, kwargs = rnn_case(op, modulation="simple")
    kwargs["fanout_bias"] = torch.zeros(N, dtype=torch.float64)
    with raises(ValueError, f"{op_name(op)}: fanout_bias needs fanout_weight"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("missing", ["elig", "elig_rate"])
def test_rnn_retroactive_missing_elig(op, missing):
    fn, kwargs = rnn_case(op)
    kwargs[missing] = None
    expected = (f"needs the eligibility trace elig of shape {shape_str((B, N, N))}, got None"
                if missing == "elig" else "needs elig_rate of shape (), got None")
    with raises(ValueError, f"{op_name(op)}: rule 'retroactive' {expected}"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("given", ["elig", "elig_rate"])
def test_rnn_elig_without_retroactive(op, given):
    fn, kwargs = rnn_case(op)
    kwargs["rule"] = "clip"
    kwargs["elig" if given == "elig_rate" else "elig_rate"] = None
    with raises(ValueError, f"{op_name(op)}: elig and elig_rate are only used by rule "
                "'retroactive'; pass None"):
        fn(**kwargs)


# ---------------------------------------------------------------------------------------------
# Gradients handed to the backward ops (check_grad).

def sequence_backward_args(**grads):
    inputs = rnn_inputs("full", "fanout3", "retroactive", T=T, B=B, N=N)
    fwd = OPS.plastic_rnn_sequence(*[inputs[k] for k in RNN_INPUTS], "retroactive", 1.0, 2)
    out, hebb_T, elig_T, m, eta_seq, ckpt_h, ckpt_e = fwd
    g = dict(grad_out=torch.ones_like(out), grad_hebb=torch.ones_like(hebb_T),
             grad_elig=torch.ones_like(elig_T), grad_m=torch.ones_like(m),
             hebb_checkpoints=ckpt_h)
    g.update(grads)
    return [g["grad_out"], g["grad_hebb"], g["grad_elig"], g["grad_m"],
            *[inputs[k] for k in RNN_INPUTS[1:]], "retroactive", 1.0, out, m, eta_seq,
            g["hebb_checkpoints"], ckpt_e, 2]


@pytest.mark.parametrize("name,shape", [("grad_out", (T, B, N + 1)), ("grad_hebb", (B, N, 1)),
                                        ("grad_elig", (1, N, N)), ("grad_m", (T, B, K + 1)),
                                        ("hebb_checkpoints", (2, B, N, N))])
def test_sequence_backward_wrong_grad_shape(name, shape):
    args = sequence_backward_args(**{name: torch.zeros(shape, dtype=torch.float64)})
    expected = {"grad_out": (T, B, N), "grad_hebb": (B, N, N), "grad_elig": (B, N, N),
                "grad_m": (T, B, K), "hebb_checkpoints": (1, B, N, N)}[name]
    meaning = ("(ceil(T / checkpoint_every) - 1, B, N, N)" if name == "hebb_checkpoints"
               else "(the shape of the forward output it is the gradient of)")
    with raises(RuntimeError, f"plastic_rnn_sequence_backward: expected {name} to have shape "
                f"{shape_str(expected)} {meaning}, got {shape_str(shape)}"):
        OPS.plastic_rnn_sequence_backward(*args)


def test_sequence_backward_grad_dtype_and_contiguity():
    args = sequence_backward_args(grad_out=torch.zeros(T, B, N))
    with raises(RuntimeError, "plastic_rnn_sequence_backward: expected grad_out to have dtype "
                "Double (the dtype of the first argument), got Float"):
        OPS.plastic_rnn_sequence_backward(*args)
    args = sequence_backward_args(grad_hebb=non_contiguous(torch.zeros(B, N, N).double()))
    with raises(RuntimeError, "plastic_rnn_sequence_backward: expected grad_hebb to be "
                "contiguous"):
        OPS.plastic_rnn_sequence_backward(*args)


@pytest.mark.parametrize("name,shape", [("grad_h_new", (B, N + 1)), ("grad_hebb", (B, N, 1)),
                                        ("grad_elig", (1, N, N)), ("grad_m", (B, K + 1))])
def test_step_backward_wrong_grad_shape(name, shape):
    inputs = rnn_inputs("full", "fanout3", "retroactive", B=B, N=N)
    h_new, hebb_new, elig_new, m, eta_t = OPS.plastic_rnn_step(
        *[inputs[k] for k in RNN_INPUTS], "retroactive", 1.0)
    g = dict(grad_h_new=None, grad_hebb=None, grad_elig=None, grad_m=None)
    g[name] = torch.zeros(shape, dtype=torch.float64)
    expected = {"grad_h_new": (B, N), "grad_hebb": (B, N, N), "grad_elig": (B, N, N),
                "grad_m": (B, K)}[name]
    with raises(RuntimeError, f"plastic_rnn_step_backward: expected {name} to have shape "
                f"{shape_str(expected)} (the shape of the forward output it is the gradient of), "
                f"got {shape_str(shape)}"):
        OPS.plastic_rnn_step_backward(*g.values(), *[inputs[k] for k in RNN_INPUTS[1:]],
                                      "retroactive", 1.0, h_new, m, eta_t)


def test_matvec_backward_wrong_grad_shape():
    x, w, alpha, hebb = (torch.zeros(s) for s in ((3, 4), (4, 5), (), (3, 4, 5)))
    with raises(RuntimeError, "plastic_matvec_backward: expected grad_u to have shape [3, 5] "
                "(the shape of the forward output it is the gradient of), got [3, 4]"):
        OPS.plastic_matvec_backward(torch.zeros(3, 4), x, w, alpha, hebb)


@pytest.mark.parametrize("name", ["grad_hebb_new", "grad_elig_new"])
def test_hebb_update_backward_wrong_grad_shape(name):
    hebb, pre, post, eta = (torch.zeros(s) for s in ((3, 4, 5), (3, 4), (3, 5), (3, 1, 5)))
    grads = [None, None]
    grads[name == "grad_elig_new"] = torch.zeros(3, 4, 4)
    with raises(RuntimeError, f"hebb_update_backward: expected {name} to have shape [3, 4, 5] "
                "(the shape of the forward output it is the gradient of), got [3, 4, 4]"):
        OPS.hebb_update_backward(*grads, hebb, pre, post, eta, torch.zeros(3, 4, 5),
                                 torch.tensor(0.5), "retroactive", 1.0)


# ---------------------------------------------------------------------------------------------
# plastic_matvec

def matvec_args(**changes):
    args = dict(x=torch.zeros(3, 4), w=torch.zeros(4, 5), alpha=torch.zeros(4, 5),
                hebb=torch.zeros(3, 4, 5))
    args.update(changes)
    return args


@pytest.mark.parametrize("shape", [(3,), (3, 4, 1), (0, 4), (3, 0)], ids=str)
def test_matvec_x_shape(shape):
    with raises(RuntimeError, "plastic_matvec: expected x of shape (B, P) with B, P >= 1, got "
                f"{shape_str(shape)}"):
        bp.fused.plastic_matvec(**matvec_args(x=torch.zeros(shape)))


@pytest.mark.parametrize("shape", [(3, 5), (4,), (4, 0)], ids=str)
def test_matvec_w_shape(shape):
    with raises(RuntimeError, "plastic_matvec: expected w of shape (P, N) with P = 4, got "
                f"{shape_str(shape)}"):
        bp.fused.plastic_matvec(**matvec_args(w=torch.zeros(shape)))


@pytest.mark.parametrize("name,shape,expected", [
    ("hebb", (3, 4, 4), "[3, 4, 5] (B, P, N)"), ("hebb", (1, 4, 5), "[3, 4, 5] (B, P, N)"),
    ("alpha", (5, 4), "[4, 5] (P, N) for alpha 'full'"),
    ("alpha", (4,), "[5] (N,) for alpha 'neuron'")])
def test_matvec_wrong_shape(name, shape, expected):
    with raises(RuntimeError, f"plastic_matvec: expected {name} to have shape {expected}, got "
                f"{shape_str(shape)}"):
        bp.fused.plastic_matvec(**matvec_args(**{name: torch.zeros(shape)}))


def test_matvec_alpha_wrong_rank():
    with raises(RuntimeError, "plastic_matvec: expected alpha of shape (P, N) ('full'), (N,) "
                "('neuron') or () ('scalar') with P, N = 4, 5, got [1, 4, 5]"):
        bp.fused.plastic_matvec(**matvec_args(alpha=torch.zeros(1, 4, 5)))


@pytest.mark.parametrize("name", ["w", "alpha", "hebb"])
def test_matvec_dtype_and_contiguity(name):
    args = matvec_args()
    with raises(RuntimeError, f"plastic_matvec: expected {name} to have dtype Float (the dtype of "
                "the first argument), got Double"):
        bp.fused.plastic_matvec(**dict(args, **{name: args[name].double()}))
    nc = non_contiguous(args[name])
    with raises(RuntimeError, f"plastic_matvec: expected {name} to be contiguous, got strides "
                f"{shape_str(nc.stride())} for shape {shape_str(nc.shape)}"):
        bp.fused.plastic_matvec(**dict(args, **{name: nc}))


def test_matvec_x_dtype_and_contiguity():
    with raises(RuntimeError, "plastic_matvec: expected x to have dtype float32 or float64, got "
                "Half"):
        bp.fused.plastic_matvec(**matvec_args(x=torch.zeros(3, 4, dtype=torch.float16)))
    with raises(RuntimeError, "plastic_matvec: expected x to be contiguous, got strides [1, 3] "
                "for shape [3, 4]"):
        bp.fused.plastic_matvec(**matvec_args(x=torch.zeros(4, 3).t()))


# ---------------------------------------------------------------------------------------------
# hebb_update (fused wrapper: eta broadcast in Python; raw op: eta (B, 1, N) or (1, P, N))

def update_args(rule="clip", **changes):
    retro = rule == "retroactive"
    args = dict(hebb=torch.zeros(3, 4, 5), pre=torch.zeros(3, 4), post=torch.zeros(3, 5),
                eta=torch.zeros(3, 1, 5), rule=rule, clip=1.0,
                elig=torch.zeros(3, 4, 5) if retro else None,
                elig_rate=torch.tensor(0.5) if retro else None)
    args.update(changes)
    return args


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5, 1), (0, 4, 5), (3, 0, 5), (3, 4, 0)],
                         ids=str)
def test_hebb_update_hebb_shape(shape):
    with raises(RuntimeError, "hebb_update: expected hebb of shape (B, P, N) with B, P, N >= 1, "
                f"got {shape_str(shape)}"):
        OPS.hebb_update(**update_args(hebb=torch.zeros(shape)))


@pytest.mark.parametrize("name,shape,expected", [
    ("pre", (3, 5), "[3, 4] (B, P)"), ("pre", (4,), "[3, 4] (B, P)"),
    ("post", (3, 4), "[3, 5] (B, N)"), ("post", (1, 5), "[3, 5] (B, N)")])
def test_hebb_update_wrong_shape(name, shape, expected):
    with raises(RuntimeError, f"hebb_update: expected {name} to have shape {expected}, got "
                f"{shape_str(shape)}"):
        bp.fused.hebb_update(**update_args(**{name: torch.zeros(shape)}))


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 1, 5), (3, 1, 1), (5,), ()], ids=str)
def test_raw_hebb_update_eta_layout(shape):
    with raises(RuntimeError, "hebb_update: expected eta of shape (B, 1, N) = [3, 1, 5] or "
                f"(1, P, N) = [1, 4, 5], got {shape_str(shape)}"):
        OPS.hebb_update(**update_args(eta=torch.zeros(shape)))


@pytest.mark.parametrize("shape", [(1, 1, 1, 5), (4,), (2, 1, 5), (3, 5, 5)], ids=str)
def test_hebb_update_eta_not_broadcastable(shape):
    with raises(ValueError, "hebb_update: eta must be broadcastable to (B, P, N) = (3, 4, 5), "
                f"got shape {tuple(shape)}"):
        bp.fused.hebb_update(**update_args(eta=torch.zeros(shape)))


@pytest.mark.parametrize("shape", [(3, 4, 1), (3, 4, 5)], ids=str)
def test_hebb_update_eta_varies_over_batch_and_pre(shape):
    with raises(ValueError, "hebb_update: eta may vary over the batch or over pre-synaptic "
                f"neurons, not both; got shape {tuple(shape)} for (B, P, N) = (3, 4, 5)"):
        bp.fused.hebb_update(**update_args(eta=torch.zeros(shape)))


@pytest.mark.parametrize("name", ["pre", "post", "eta", "elig", "elig_rate"])
def test_hebb_update_dtype_mismatch(name):
    args = update_args("retroactive")
    args[name] = args[name].double()
    with raises(RuntimeError, f"hebb_update: expected {name} to have dtype Float (the dtype of "
                "the first argument), got Double"):
        OPS.hebb_update(**args)


@pytest.mark.parametrize("name", ["hebb", "pre", "post", "eta", "elig"])
def test_hebb_update_non_contiguous(name):
    args = update_args("retroactive")
    args[name] = non_contiguous(args[name])
    with raises(RuntimeError, f"hebb_update: expected {name} to be contiguous, got strides "
                f"{shape_str(args[name].stride())} for shape {shape_str(args[name].shape)}"):
        OPS.hebb_update(**args)


@pytest.mark.parametrize("dtype,printed", [(torch.float16, "Half"), (torch.int64, "Long")],
                         ids=str)
def test_hebb_update_unsupported_dtype(dtype, printed):
    args = update_args()
    args = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with raises(RuntimeError, f"hebb_update: expected hebb to have dtype float32 or float64, got "
                f"{printed}"):
        OPS.hebb_update(**args)


@pytest.mark.parametrize("name,shape,expected", [("elig", (3, 4, 4), "[3, 4, 5] (same as hebb)"),
                                                 ("elig_rate", (1,), "[] (a scalar)")])
def test_hebb_update_elig_shapes(name, shape, expected):
    with raises(RuntimeError, f"hebb_update: expected {name} to have shape {expected}, got "
                f"{shape_str(shape)}"):
        bp.fused.hebb_update(**update_args("retroactive", **{name: torch.zeros(shape)}))


def test_hebb_update_options():
    with raises(ValueError, "hebb_update: rule must be one of 'clip', 'softclip', 'decay', 'oja', "
                "'retroactive', got 'bcm'"):
        bp.fused.hebb_update(**update_args(rule="bcm"))
    with raises(ValueError, "rule must be one of ('clip', 'softclip', 'decay', 'oja', "
                "'retroactive'), got 'bcm'"):
        reference.hebb_update(**update_args(rule="bcm"))
    for clip, printed in ((0.0, "0"), (-2.0, "-2"), (math.nan, "nan"), (math.inf, "inf")):
        with raises(ValueError, f"hebb_update: clip must be a finite number > 0, got {printed}"):
            bp.fused.hebb_update(**update_args(clip=clip))
    with raises(ValueError, "hebb_update: rule 'retroactive' needs the eligibility trace elig of "
                "shape [3, 4, 5], got None"):
        bp.fused.hebb_update(**update_args("retroactive", elig=None))
    with raises(ValueError, "hebb_update: rule 'retroactive' needs elig_rate of shape (), got "
                "None"):
        bp.fused.hebb_update(**update_args("retroactive", elig_rate=None))
    with raises(ValueError, "hebb_update: elig and elig_rate are only used by rule "
                "'retroactive'; pass None"):
        bp.fused.hebb_update(**update_args("oja", elig=torch.zeros(3, 4, 5)))


# ---------------------------------------------------------------------------------------------
# Modules

@pytest.mark.parametrize("name", ["input_size", "hidden_size", "n_modulators"])
@pytest.mark.parametrize("value", [0, -1, 2.0, "3"], ids=repr)
def test_module_sizes(name, value):
    kwargs = dict(input_size=4, hidden_size=6, modulation="fanout")
    kwargs[name] = value
    with raises(ValueError, f"{name} must be an int >= 1, got {value!r}"):
        bp.PlasticRNNCell(**kwargs)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
@pytest.mark.parametrize("option,value,choices", [
    ("alpha", "diagonal", ("full", "neuron", "scalar")),
    ("modulation", "dopamine", ("none", "simple", "fanout")),
    ("rule", "bcm", ("clip", "softclip", "decay", "oja", "retroactive")),
    ("eta_shape", "neuron", ("scalar", "full")),
    ("impl", "cuda", ("auto", "fused", "reference"))])
def test_module_unknown_option(cls, option, value, choices):
    with raises(ValueError, f"{option} must be one of {choices}, got {value!r}"):
        cls(4, 6, **{option: value})


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
@pytest.mark.parametrize("clip", [0, -1.0, math.nan, math.inf, "2"], ids=repr)
def test_module_bad_clip(cls, clip):
    with raises(ValueError, f"clip must be a finite number > 0, got {clip!r}"):
        cls(4, 6, clip=clip)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM])
def test_module_impl_checked_when_set(cls):
    layer = cls(4, 6)
    with raises(ValueError, "impl must be one of ('auto', 'fused', 'reference'), got 'fast'"):
        layer.impl = "fast"
    assert layer.impl == "auto"
    layer.impl = "reference"
    assert layer.impl == "reference"


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_module_retroactive_without_modulation(cls):
    with raises(ValueError, "rule 'retroactive' needs modulation 'simple' or 'fanout', got "
                "'none'"):
        cls(4, 6, rule="retroactive", modulation="none")
    cls(4, 6, rule="retroactive", modulation="none", plastic=False)  # no trace: allowed


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_module_simple_with_several_modulators(cls):
    with raises(ValueError, "modulation 'simple' takes n_modulators=1, got 2; use "
                "modulation='fanout' for several modulators"):
        cls(4, 6, modulation="simple", n_modulators=2)


@pytest.mark.parametrize("value", [0, -1, 1.5, "2"], ids=repr)
def test_module_bad_checkpoint_every(value):
    with raises(ValueError, f"checkpoint_every must be None or an int >= 1, got {value!r}"):
        bp.PlasticRNN(4, 6, checkpoint_every=value)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_module_input_checks(impl):
    rnn = bp.PlasticRNN(4, 6, impl=impl)
    with raises(ValueError, "input must have shape (T, B, input_size) with input_size = 4, got "
                "(3, 2, 5)"):
        rnn(torch.zeros(3, 2, 5))
    with raises(ValueError, "input must have shape (T, B, input_size) with input_size = 4, got "
                "(2, 4)"):
        rnn(torch.zeros(2, 4))
    with raises(ValueError, "input must have shape (T, B, input_size) with input_size = 4, got "
                "list"):
        rnn([[0.0] * 4])
    with raises(ValueError, "input must be a floating-point tensor, got torch.int64"):
        rnn(torch.zeros(3, 2, 4, dtype=torch.int64))
    with raises(ValueError, "input must have shape (B, T, input_size) with input_size = 4"):
        bp.PlasticRNN(4, 6, impl=impl, batch_first=True)(torch.zeros(3, 2, 5))
    with raises(ValueError, "input must have shape (B, input_size) with input_size = 4, got "
                "(3, 2, 4)"):
        bp.PlasticRNNCell(4, 6, impl=impl)(torch.zeros(3, 2, 4))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_module_state_checks(impl):
    rnn = bp.PlasticRNN(4, 6, impl=impl, modulation="simple", rule="retroactive")
    x = torch.zeros(3, 2, 4)
    h, hebb = torch.zeros(2, 6), torch.zeros(2, 6, 6)
    with raises(ValueError, "state must be a PlasticState(h, hebb, elig) or None, got Tensor"):
        rnn(x, h)
    with raises(ValueError, "state must be a PlasticState(h, hebb, elig) or None, got tuple"):
        rnn(x, (h, hebb))
    with raises(ValueError, "state.h must have shape (2, 6), got (3, 6)"):
        rnn(x, bp.PlasticState(torch.zeros(3, 6), hebb, hebb))
    with raises(ValueError, "state.hebb must have shape (2, 6, 6), got (2, 6, 5)"):
        rnn(x, bp.PlasticState(h, torch.zeros(2, 6, 5), hebb))
    with raises(ValueError, "state.elig must have shape (2, 6, 6), got NoneType"):
        rnn(x, bp.PlasticState(h, hebb, None))
    with raises(ValueError, "state.hebb must have dtype torch.float32 on cpu like the input, "
                "got torch.float64 on cpu"):
        rnn(x, bp.PlasticState(h, hebb.double(), hebb))


def test_module_impl_fused_without_kernels():
    """impl='fused' raises where the fused ops have no kernels (here: float16 on CPU)."""
    rnn = bp.PlasticRNN(4, 6, impl="fused").half()
    with raises(RuntimeError, "impl='fused': no fused kernels for torch.float16 tensors on cpu; "
                "use impl='auto' or 'reference'"):
        rnn(torch.zeros(3, 2, 4, dtype=torch.float16))


@pytest.mark.parametrize("impl", ["auto", "fused", "reference"])
@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_module_empty_sequence_or_batch(cls, impl):
    """An empty sequence or batch is a clear error (RuntimeError or ValueError) naming the shape:
    the module input's or the projected x (hidden-size wide) the op sees, for every impl."""
    module = cls(4, 6, impl=impl)
    shapes = [(0, 2, 4)] if cls is bp.PlasticRNN else []
    if impl != "reference":  # the reference handles an empty batch (empty outputs)
        shapes.append((3, 0, 4) if cls is bp.PlasticRNN else (0, 4))
    for shape in shapes:
        named = f"{re.escape(shape_str(shape[:-1] + (6,)))}|{re.escape(str(shape))}"
        with pytest.raises((RuntimeError, ValueError), match=named):
            module(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------
# Non-finite inputs

@pytest.mark.parametrize("rule", ["clip", "softclip", "decay", "oja", "retroactive"])
def test_non_finite_inputs_propagate_like_the_reference(fused, rule):
    """Non-finite values in x are not rejected (no validation reads the data) and never crash.

    A NaN in x[t, b, j] makes h_t[b, j] NaN and, through the Hebbian product, the traces and every
    later output of that sample (torch.clamp keeps NaN, it does not clip it to the bound); the
    fused ops put NaN exactly where the reference does, in the outputs and in every gradient.
    +-inf in x is no error either: tanh saturates it to +-1, so outputs and gradients stay finite
    and equal to the reference's.
    """
    modulation = "fanout3" if rule == "retroactive" else "none_full"
    base = rnn_inputs("full", modulation, rule, T=4, B=3, N=5)
    for value in (math.nan, math.inf, -math.inf):
        inputs = dict(base, x=base["x"].clone())
        inputs["x"][1, 0, 2] = value
        kwargs = dict(rule=rule, clip=0.5)
        (out_r, grads_r) = run_forward_backward(reference.plastic_rnn_sequence, inputs, **kwargs)
        (out_f, grads_f) = run_forward_backward(fused.plastic_rnn_sequence, inputs, **kwargs)
        if math.isnan(value):
            assert out_r[0][1:, 0].isnan().any() and not out_r[0][:, 1:].isnan().any()
        else:
            assert all(o is None or o.isfinite().all() for o in out_r)
        for a, e in list(zip(out_f, out_r)) + [(grads_f[k], grads_r[k]) for k in grads_r]:
            if e is not None:
                assert torch.equal(a.isnan(), e.isnan())
                torch.testing.assert_close(a, e, equal_nan=True, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# The LSTM ops: their own inputs (x of width 4N, c, h2g) and options; the plastic part shares
# the RNN ops' checks (one sample of them here).

def lstm_case(op, modulation="fanout3", rule="retroactive"):
    """(function, valid kwargs) of the fused LSTM sequence or step op."""
    inputs = lstm_inputs("full", modulation, rule, B=B, N=N, T=T if op == "sequence" else None)
    fn = bp.fused.plastic_lstm_sequence if op == "sequence" else bp.fused.plastic_lstm_step
    return fn, dict(inputs, rule=rule, clip=1.0, modulator_input="c")


@OPS_PARAM
def test_lstm_valid_inputs_pass(op):
    fn, kwargs = lstm_case(op)
    fn(**kwargs)


LSTM_SHAPE_CASES = [
    ("h", (B, N + 1), f"{shape_str((B, N))} (B, N)"),
    ("c", (B - 1, N), f"{shape_str((B, N))} (B, N)"),
    ("h2g_weight", (4 * N, N), f"{shape_str((3 * N, N))} (3N, N)"),
    ("h2g_bias", (N,), f"{shape_str((3 * N,))} (3N,)"),
    ("hebb", (B, N, N + 1), f"{shape_str((B, N, N))} (B, N, N)"),
    ("fanout_bias", (N - 1,), f"{shape_str((N,))} (N,)"),
]


@OPS_PARAM
@pytest.mark.parametrize("name,shape,expected", LSTM_SHAPE_CASES,
                         ids=[f"{c[0]}{c[1]}" for c in LSTM_SHAPE_CASES])
def test_lstm_wrong_shape(op, name, shape, expected):
    fn, kwargs = lstm_case(op)
    kwargs[name] = torch.zeros(shape, dtype=torch.float64)
    with raises(RuntimeError, f"plastic_lstm_{op}: expected {name} to have shape {expected}",
                f"got {shape_str(shape)}"):
        fn(**kwargs)


@OPS_PARAM
def test_lstm_x_width_not_four_gates(op):
    fn, kwargs = lstm_case(op)
    kwargs["x"] = kwargs["x"][..., :-1].contiguous()
    layout = "(T, B, 4N)" if op == "sequence" else "(B, 4N)"
    with raises(RuntimeError, f"plastic_lstm_{op}: expected x of shape {layout} (the four gates' "
                "inputs)", f"got {shape_str(kwargs['x'].shape)}"):
        fn(**kwargs)


@OPS_PARAM
def test_lstm_x_width_mismatch_with_h(op):
    """x of width 4M with M != N: h (and c, h2g) name the mismatch."""
    fn, kwargs = lstm_case(op)
    kwargs["x"] = torch.cat([kwargs["x"]] * 2, dim=-1)
    with raises(RuntimeError, f"plastic_lstm_{op}: expected h to have shape "
                f"{shape_str((B, 2 * N))} (B, N)", f"got {shape_str((B, N))}"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("modulator_input", ["x", "", "H", "cell"])
def test_lstm_bad_modulator_input(op, modulator_input):
    fn, kwargs = lstm_case(op)
    kwargs["modulator_input"] = modulator_input
    with raises(ValueError, f"plastic_lstm_{op}: modulator_input must be 'h' or 'c', got "
                f"'{modulator_input}'"):
        fn(**kwargs)


@OPS_PARAM
@pytest.mark.parametrize("name", ["c", "h2g_weight", "h2g_bias"])
def test_lstm_dtype_mismatch_and_non_contiguous(op, name):
    fn, kwargs = lstm_case(op)
    good = kwargs[name]
    kwargs[name] = good.float()
    with raises(RuntimeError, f"plastic_lstm_{op}: expected {name} to have dtype Double",
                "got Float"):
        fn(**kwargs)
    if good.dim() == 2:
        kwargs[name] = non_contiguous(good)
        with raises(RuntimeError, f"plastic_lstm_{op}: expected {name} to be contiguous"):
            fn(**kwargs)


def test_lstm_sequence_backward_wrong_grad_shape():
    fn, kwargs = lstm_case("sequence")
    options = (kwargs["rule"], kwargs["clip"], kwargs["modulator_input"])
    tensors = [kwargs[k] for k in LSTM_INPUTS]
    out, c_seq, hebb_T, elig_T, m, eta_seq, gates, ckpt_h, ckpt_e = \
        torch.ops.backpropamine.plastic_lstm_sequence(*tensors, *options, 2)
    bad = torch.zeros(T, B, N + 1, dtype=torch.float64)
    with raises(RuntimeError, "plastic_lstm_sequence_backward: expected grad_c to have shape "
                f"{shape_str((T, B, N))}", f"got {shape_str(bad.shape)}"):
        torch.ops.backpropamine.plastic_lstm_sequence_backward(
            None, bad, None, None, None, *tensors[1:], *options, out, c_seq, m, eta_seq, gates,
            ckpt_h, ckpt_e, 2)


# ---------------------------------------------------------------------------------------------
# Every tensor argument of every registered op, forward, backward and rollout: a wrong shape, an
# empty tensor, a wrong dtype and a non-contiguous tensor are each a RuntimeError that names the
# argument (never a crash or an out-of-bounds read), and so is a tensor on another device
# (`meta`, whose fake kernel would otherwise win the dispatch and return uninitialised memory).

# The sequence ops' initial state is named as the step ops' state in their messages.
MESSAGE_NAME = {"h0": "h", "hebb0": "hebb", "elig0": "elig", "c0": "c"}
# Two configurations: modulated (every optional trace argument given) and without modulation
# (eta given, the saved rates and modulator outputs empty).
CONFIGS = {"modulated": ("full", "fanout3", "retroactive"),
           "unmodulated": ("neuron", "none_full", "clip")}


def _recurrent_kwargs(op, config):
    """Valid keyword arguments (schema names) of the recurrent op `op`, backward ops from their
    forward's outputs."""
    alpha, modulation, rule = CONFIGS[config]
    lstm = "lstm" in op
    sequence = "sequence" in op
    make_inputs = lstm_inputs if lstm else rnn_inputs
    inputs = make_inputs(alpha, modulation, rule, B=B, N=N, T=T if sequence else None)
    names = LSTM_INPUTS if lstm else RNN_INPUTS
    tensors = [inputs[k] for k in names]
    options = [rule, 1.0] + (["c"] if lstm else [])
    forward = op.replace("_backward", "").replace("_rollout_step", "_step")
    schema_names = [a.name for a in getattr(OPS, forward).default._schema.arguments]
    kwargs = dict(zip(schema_names, tensors + options))
    clamp = torch.rand(inputs["x"].shape[:-1] + (N,), generator=torch.Generator().manual_seed(1))
    clamp = clamp < 0.5
    if sequence:
        kwargs["checkpoint_every"] = 2
    if not lstm:
        kwargs["clamp"] = clamp
    if op.endswith("_rollout_step"):
        kwargs.update(u=torch.randn_like(inputs["x"]), hebb=kwargs["hebb"].clone(),
                      hebb_out=torch.empty_like(inputs["hebb"]),
                      elig_out=None if inputs["elig"] is None else torch.empty_like(inputs["elig"]))
        return kwargs
    if not op.endswith("_backward"):
        return kwargs
    outputs = getattr(OPS, forward)(**kwargs)
    modulated = modulation != "none_full"
    retro = rule == "retroactive"
    if lstm and sequence:
        out, c_seq, hebb_T, elig_T, m, eta, gates, ckpt_h, ckpt_e = outputs
        saved = dict(out=out, c_seq=c_seq, m=m, eta_seq=eta, gates=gates, hebb_checkpoints=ckpt_h,
                     elig_checkpoints=ckpt_e)
        grads = dict(grad_out=torch.ones_like(out), grad_c=torch.ones_like(c_seq))
    elif lstm:
        h_new, c_new, hebb_T, elig_T, m, eta, gates = outputs
        saved = dict(h_new=h_new, c_new=c_new, m=m, eta_t=eta, gates=gates)
        grads = dict(grad_h_new=torch.ones_like(h_new), grad_c_new=torch.ones_like(c_new))
    elif sequence:
        out, hebb_T, elig_T, m, eta, ckpt_h, ckpt_e = outputs
        saved = dict(out=out, m=m, eta_seq=eta, hebb_checkpoints=ckpt_h, elig_checkpoints=ckpt_e)
        grads = dict(grad_out=torch.ones_like(out))
    else:
        h_new, hebb_T, elig_T, m, eta = outputs
        saved = dict(h_new=h_new, m=m, eta_t=eta)
        grads = dict(grad_h_new=torch.ones_like(h_new))
    grads.update(grad_hebb=torch.ones_like(hebb_T),
                 grad_elig=torch.ones_like(elig_T) if retro else None,
                 grad_m=torch.ones_like(m) if modulated else None)
    kwargs = {k: v for k, v in kwargs.items() if k != "x"}
    return dict(grads, **kwargs, **saved)


def _primitive_kwargs(op, config):
    gen = torch.Generator().manual_seed(2)
    t = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    Bp, P, Np = 3, 4, 5
    if op.startswith("plastic_matvec"):
        alpha = t(P, Np) if config == "modulated" else t(Np)
        kwargs = dict(x=t(Bp, P), w=t(P, Np), alpha=alpha, hebb=t(Bp, P, Np))
        return dict(grad_u=t(Bp, Np), **kwargs) if op.endswith("_backward") else kwargs
    retro = config == "modulated"
    kwargs = dict(hebb=t(Bp, P, Np), pre=t(Bp, P), post=t(Bp, Np),
                  eta=t(Bp, 1, Np) if retro else t(1, P, Np),
                  elig=t(Bp, P, Np) if retro else None,
                  elig_rate=torch.tensor(0.3, dtype=torch.float64) if retro else None,
                  rule="retroactive" if retro else "clip", clip=1.0)
    if op.endswith("_backward"):
        kwargs = dict(grad_hebb_new=t(Bp, P, Np), grad_elig_new=t(Bp, P, Np) if retro else None,
                      **kwargs)
    return kwargs


REGISTERED_OPS = [
    "plastic_rnn_sequence", "plastic_rnn_sequence_backward", "plastic_rnn_step",
    "plastic_rnn_step_backward", "plastic_rnn_rollout_step", "plastic_lstm_sequence",
    "plastic_lstm_sequence_backward", "plastic_lstm_step", "plastic_lstm_step_backward",
    "plastic_matvec", "plastic_matvec_backward", "hebb_update", "hebb_update_backward"]


def op_kwargs(op, config):
    """Fresh valid keyword arguments of the registered op `op` in `config`."""
    if op.startswith("plastic_matvec") or op.startswith("hebb_update"):
        return _primitive_kwargs(op, config)
    return _recurrent_kwargs(op, config)


def test_registered_ops_are_all_listed():
    defined = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("backpropamine::")} - {"cpu_isa", "cpu_sequence_path"}
    assert defined == set(REGISTERED_OPS)


OP_CONFIGS = [(op, config) for op in REGISTERED_OPS for config in CONFIGS]


def tensor_arguments(op, kwargs):
    """The names of the tensor arguments given in kwargs, in schema order."""
    return [a.name for a in getattr(OPS, op).default._schema.arguments
            if isinstance(kwargs.get(a.name), torch.Tensor)]


def test_every_op_takes_its_valid_arguments():
    for op, config in OP_CONFIGS:
        getattr(OPS, op)(**op_kwargs(op, config))


@pytest.mark.parametrize("op,config", OP_CONFIGS, ids=[f"{o}-{c}" for o, c in OP_CONFIGS])
def test_every_tensor_argument_is_checked(op, config):
    """For each tensor argument: a wrong shape (an extra dimension), an empty tensor (no rows), a
    wrong dtype and a non-contiguous tensor are each a RuntimeError naming the argument."""
    fn = getattr(OPS, op)
    for name in tensor_arguments(op, op_kwargs(op, config)):
        shown = MESSAGE_NAME.get(name, name)
        good = op_kwargs(op, config)[name]
        bad = {"wrong shape": (good.unsqueeze(-1), "shape"),
               "wrong dtype": (good.to(torch.float16), "dtype")}
        if good.numel() > 0:
            bad["empty"] = (good.new_empty((0,) + tuple(good.shape[1:])), "shape")
        if good.numel() > 1:
            bad["non-contiguous"] = (non_contiguous(good), "to be contiguous")
        for what, (tensor, fragment) in bad.items():
            kwargs = op_kwargs(op, config)
            kwargs[name] = tensor
            with pytest.raises(Exception) as info:
                fn(**kwargs)
            message = str(info.value)
            assert type(info.value) is RuntimeError, \
                f"{name}, {what}: raised {type(info.value).__name__}: {message}"
            assert f"{op}: expected {shown} " in message and fragment in message, \
                f"{name}, {what}: {message!r}"


@pytest.mark.parametrize("op,config", OP_CONFIGS, ids=[f"{o}-{c}" for o, c in OP_CONFIGS])
def test_every_tensor_argument_on_another_device(op, config):
    """Each tensor argument in turn on `meta`, the others on the CPU: the usual device message
    (the fake kernel, which serves `meta`, would otherwise return uninitialised CPU memory)."""
    fn = getattr(OPS, op)
    names = tensor_arguments(op, op_kwargs(op, config))
    for name in names:
        kwargs = op_kwargs(op, config)
        kwargs[name] = kwargs[name].to("meta")
        expected = (f"{op}: expected {names[1]} on device meta (the device of the first "
                    "argument), got cpu" if name == names[0] else
                    f"{op}: expected {name} on device cpu (the device of the first argument), "
                    "got meta")
        with raises(RuntimeError, expected):
            fn(**kwargs)
    # all on meta: the fake kernel's shapes, no error
    fn(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v
          for k, v in op_kwargs(op, config).items()})


@pytest.mark.parametrize("cls,name", [(bp.PlasticRNN, "alpha"), (bp.PlasticRNNCell, "w"),
                                      (bp.PlasticLSTM, "h2mod.weight"),
                                      (bp.PlasticLSTMCell, "fanout.bias")])
def test_module_parameter_left_on_meta(cls, name):
    """A module with one parameter left on `meta` (e.g. a half-done meta-device initialisation)
    raises the op's device message instead of computing on uninitialised memory."""
    module = cls(4, 6, impl="fused")
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    setattr(owner, leaf, torch.nn.Parameter(torch.empty_like(getattr(owner, leaf), device="meta")))
    x = torch.zeros(3, 2, 4) if cls in (bp.PlasticRNN, bp.PlasticLSTM) else torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="on device cpu \\(the device of the first argument\\), "
                       "got meta"):
        module(x)


@pytest.mark.parametrize("op", ["plastic_rnn_sequence_backward", "plastic_rnn_step_backward",
                                "plastic_lstm_sequence_backward", "plastic_lstm_step_backward"])
def test_backward_empty_rates_in_a_subprocess(op):
    """The crash this section guards against, reported as such should it come back: an empty
    eta_seq / eta_t of a modulated backward ended the process (SIGSEGV)."""
    code = (
        "import sys, torch, backpropamine_cuda.fused; sys.path.insert(0, %r)\n"
        "import test_validation as tv\n"
        "kwargs = tv.op_kwargs(%r, 'modulated')\n"
        "name = 'eta_seq' if 'sequence' in %r else 'eta_t'\n"
        "kwargs[name] = kwargs[name].new_empty(0)\n"
        "try:\n"
        "    getattr(torch.ops.backpropamine, %r)(**kwargs)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    ) % (str(Path(__file__).parent), op, op, op)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert f"{op}: expected eta_" in result.stdout


def test_backward_grad_elig_without_retroactive():
    kwargs = op_kwargs("plastic_rnn_sequence_backward", "unmodulated")
    kwargs["grad_elig"] = torch.ones_like(kwargs["hebb0"])
    with raises(ValueError, "plastic_rnn_sequence_backward: grad_elig is only used by rule "
                "'retroactive'; pass None"):
        OPS.plastic_rnn_sequence_backward(**kwargs)
    kwargs = op_kwargs("hebb_update_backward", "unmodulated")
    kwargs["grad_elig_new"] = torch.ones_like(kwargs["hebb"])
    with raises(ValueError, "hebb_update_backward: grad_elig_new is only used by rule "
                "'retroactive'; pass None"):
        OPS.hebb_update_backward(**kwargs)
