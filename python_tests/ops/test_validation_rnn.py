"""Validation of the RNN ops (backpropamine_cuda/fused.py; the checks are in csrc/checks.cpp):
the sequence, step and rollout step ops and their backward ops reject bad input with the right
exception type (RuntimeError for shapes, dtypes and contiguity; ValueError for option values and
missing/extra optional arguments) and a message that starts with the op's name and names the
argument, the expected and the actual value. Non-finite inputs are no error: they propagate as in
the reference.

Device mismatches with `meta` are in test_validation_registered_ops.py; between the CPU and a GPU,
in test_cuda.py.
"""

import math
import re

import pytest
import torch

import backpropamine_cuda as bp
from backpropamine_cuda import reference

from helpers import (
    RNN_INPUTS,
    SEQUENCE_OR_STEP,
    TOL,
    non_contiguous,
    rnn_inputs,
    run_forward_backward,
    shape_str,
)

OPS = torch.ops.backpropamine
B, N, K, T = 2, 5, 3, 3
# torch.ops.backpropamine exists once the fused module has loaded the extension.
pytestmark = pytest.mark.usefixtures("fused_cpu")


# ---------------------------------------------------------------------------------------------
# The RNN ops (sequence and step share their checks; the message starts with the op's name).


def rnn_case(op, modulation="fanout3", rule="retroactive"):
    """(function, valid kwargs) of the fused sequence or step op."""
    inputs = rnn_inputs("full", modulation, rule, B=B, N=N, T=T if op == "sequence" else None)
    fn = bp.fused.plastic_rnn_sequence if op == "sequence" else bp.fused.plastic_rnn_step
    return fn, dict(inputs, rule=rule, clip=1.0)


def op_name(op):
    return f"plastic_rnn_{op}"


@SEQUENCE_OR_STEP
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


@SEQUENCE_OR_STEP
@pytest.mark.parametrize(
    "name,shape,expected", RNN_SHAPE_CASES, ids=[f"{c[0]}{c[1]}" for c in RNN_SHAPE_CASES]
)
def test_rnn_wrong_shape(op, name, shape, expected):
    fn, kwargs = rnn_case(op)
    kwargs[name] = torch.zeros(shape, dtype=torch.float64)
    pattern = (
        re.escape(f"{op_name(op)}: expected {name} to have shape {expected}")
        + ".*"
        + re.escape(f"got {shape_str(shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("shape", [(1, N, N), (N, N, 1)], ids=str)
def test_rnn_alpha_wrong_rank(op, shape):
    fn, kwargs = rnn_case(op)
    kwargs["alpha"] = torch.zeros(shape, dtype=torch.float64)
    pattern = (
        re.escape(
            f"{op_name(op)}: expected alpha of shape (P, N) ('full'), (N,) "
            "('neuron') or () ('scalar')"
        )
        + ".*"
        + re.escape(f"P, N = {N}, {N}")
        + ".*"
        + re.escape(f"got {shape_str(shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("shape", [(K, N + 1), (0, N), (N,), (1, K, N)], ids=str)
def test_rnn_h2mod_weight_wrong_shape(op, shape):
    fn, kwargs = rnn_case(op)
    kwargs["h2mod_weight"] = torch.zeros(shape, dtype=torch.float64)
    pattern = (
        re.escape(f"{op_name(op)}: expected h2mod_weight of shape (K, N) with K >= 1 and N = {N}")
        + ".*"
        + re.escape(f"got {shape_str(shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("shape", [(N,), (N, 1), (1, N, N)], ids=str)
def test_rnn_eta_wrong_shape(op, shape):
    fn, kwargs = rnn_case(op, modulation="none_full", rule="clip")
    kwargs["eta"] = torch.zeros(shape, dtype=torch.float64)
    pattern = (
        re.escape(
            f"{op_name(op)}: expected eta of shape () ('scalar') or (N, N) ('full') with N = {N}"
        )
        + ".*"
        + re.escape(f"got {shape_str(shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_x_wrong_rank(op):
    fn, kwargs = rnn_case(op)
    bad = kwargs["x"][0] if op == "sequence" else kwargs["x"].unsqueeze(0)
    kwargs["x"] = bad
    layout = "(T, B, N)" if op == "sequence" else "(B, N)"
    pattern = (
        re.escape(f"{op_name(op)}: expected x of shape {layout}")
        + ".*"
        + re.escape(f"got {shape_str(bad.shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@pytest.mark.parametrize("shape", [(0, B, N), (T, 0, N), (T, B, 0)], ids=str)
def test_sequence_empty(shape):
    fn, kwargs = rnn_case("sequence", modulation="none_scalar", rule="clip")
    kwargs.update(
        x=torch.zeros(shape, dtype=torch.float64),
        h=torch.zeros(shape[1:], dtype=torch.float64),
        hebb=torch.zeros(shape[1], shape[2], shape[2], dtype=torch.float64),
        w=torch.zeros(shape[2], shape[2], dtype=torch.float64),
        alpha=torch.zeros((), dtype=torch.float64),
    )
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "plastic_rnn_sequence: expected x with at least one time step, sample and neuron, got "
            f"shape {shape_str(shape)}"
        ),
    ):
        fn(**kwargs)


def test_step_empty_batch():
    fn, kwargs = rnn_case("step", modulation="none_scalar", rule="clip")
    kwargs.update(
        x=torch.zeros(0, N, dtype=torch.float64),
        h=torch.zeros(0, N).double(),
        hebb=torch.zeros(0, N, N, dtype=torch.float64),
    )
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "plastic_rnn_step: expected x with at least one time step, sample and neuron, got "
            f"shape {shape_str((0, N))}"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("name", [n for n in RNN_INPUTS if n != "x" and n != "eta"])
def test_rnn_dtype_mismatch(op, name):
    fn, kwargs = rnn_case(op)
    kwargs[name] = kwargs[name].float()
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"{op_name(op)}: expected {name} to have dtype Double (the dtype of the first "
            "argument), got Float"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_eta_dtype_mismatch(op):
    fn, kwargs = rnn_case(op, modulation="none_full", rule="clip")
    kwargs = {
        k: (v.float() if isinstance(v, torch.Tensor) and k != "eta" else v)
        for k, v in kwargs.items()
    }
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"{op_name(op)}: expected eta to have dtype Float (the dtype of the first argument), "
            "got Double"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize(
    "dtype,printed",
    [
        (torch.float16, "Half"),
        (torch.bfloat16, "BFloat16"),
        (torch.int32, "Int"),
        (torch.int64, "Long"),
    ],
    ids=str,
)
def test_rnn_x_unsupported_dtype(op, dtype, printed):
    fn, kwargs = rnn_case(op)
    kwargs["x"] = kwargs["x"].to(dtype)
    with pytest.raises(
        RuntimeError,
        match=f"{op_name(op)}: expected x to have dtype float32 or float64, got {printed}",
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("name", [n for n in RNN_INPUTS if n not in ("eta", "elig_rate")])
def test_rnn_non_contiguous(op, name):
    fn, kwargs = rnn_case(op)
    kwargs[name] = non_contiguous(kwargs[name])
    t = kwargs[name]
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"{op_name(op)}: expected {name} to be contiguous, got strides {shape_str(t.stride())} "
            f"for shape {shape_str(t.shape)} (call .contiguous())"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_eta_non_contiguous(op):
    fn, kwargs = rnn_case(op, modulation="none_full", rule="clip")
    kwargs["eta"] = kwargs["eta"].t()
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"{op_name(op)}: expected eta to be contiguous, got strides {shape_str((1, N))} for "
            f"shape {shape_str((N, N))}"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_clamp_not_bool(op):
    fn, kwargs = rnn_case(op)
    with pytest.raises(
        RuntimeError, match=f"{op_name(op)}: expected clamp to have dtype bool, got Double"
    ):
        fn(**kwargs, clamp=torch.ones_like(kwargs["x"]))


@SEQUENCE_OR_STEP
def test_rnn_clamp_wrong_shape(op):
    fn, kwargs = rnn_case(op)
    shape = (*kwargs["x"].shape[:-1], N + 1)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"{op_name(op)}: expected clamp to have shape {shape_str(kwargs['x'].shape)} (the "
            f"shape of x), got {shape_str(shape)}"
        ),
    ):
        fn(**kwargs, clamp=torch.ones(shape, dtype=torch.bool))


@SEQUENCE_OR_STEP
def test_rnn_clamp_non_contiguous(op):
    fn, kwargs = rnn_case(op)
    clamp = non_contiguous(torch.ones_like(kwargs["x"], dtype=torch.bool))
    with pytest.raises(RuntimeError, match=f"{op_name(op)}: expected clamp to be contiguous"):
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
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_rnn_rollout_step: expected u to have shape {shape_str((B, N))} (B, N), like "
            f"x, got {shape_str(shape)}"
        ),
    ):
        fn(**kwargs)


def test_rollout_step_drive_wrong_dtype():
    fn, kwargs = rollout_case()
    kwargs["u"] = kwargs["u"].float()
    with pytest.raises(
        RuntimeError, match="plastic_rnn_rollout_step: expected u to have dtype Double"
    ):
        fn(**kwargs)


def test_rollout_step_trace_outputs():
    fn, kwargs = rollout_case()  # rule retroactive: hebb and elig
    hebb, elig = kwargs["hebb"], kwargs["elig"]
    fn(**kwargs, hebb_out=torch.empty_like(hebb), elig_out=torch.empty_like(elig))
    fn(**kwargs, hebb_out=hebb, elig_out=elig)  # in place, as without them
    with pytest.raises(
        ValueError, match="plastic_rnn_rollout_step: with elig and hebb_out, pass elig_out"
    ):
        fn(**kwargs, hebb_out=torch.empty_like(hebb))
    with pytest.raises(ValueError, match="plastic_rnn_rollout_step: elig_out needs hebb_out"):
        fn(**kwargs, elig_out=torch.empty_like(elig))
    with pytest.raises(
        RuntimeError, match="plastic_rnn_rollout_step: expected hebb_out to have shape"
    ):
        fn(**kwargs, hebb_out=hebb.new_empty(B, N, N + 1), elig_out=torch.empty_like(elig))
    with pytest.raises(
        RuntimeError, match="plastic_rnn_rollout_step: expected elig_out to have dtype Double"
    ):
        fn(**kwargs, hebb_out=torch.empty_like(hebb), elig_out=elig.float())
    with pytest.raises(
        RuntimeError, match="plastic_rnn_rollout_step: expected hebb_out to be contiguous"
    ):
        fn(
            **kwargs,
            hebb_out=hebb.new_empty(B, N, N).transpose(1, 2),
            elig_out=torch.empty_like(elig),
        )
    both = hebb.new_empty(2 * B * N * N + 1)
    shifted = both[1 : B * N * N + 1].view(B, N, N)
    with pytest.raises(
        RuntimeError, match="plastic_rnn_rollout_step: hebb_out overlaps part of hebb"
    ):
        fn(
            **dict(kwargs, hebb=both[: B * N * N].view(B, N, N)),
            hebb_out=shifted,
            elig_out=torch.empty_like(elig),
        )
    with pytest.raises(RuntimeError, match="plastic_rnn_rollout_step: hebb_out overlaps elig"):
        fn(**kwargs, hebb_out=elig, elig_out=torch.empty_like(elig))
    with pytest.raises(RuntimeError, match="plastic_rnn_rollout_step: elig_out overlaps hebb_out"):
        out = torch.empty_like(hebb)
        fn(**kwargs, hebb_out=out, elig_out=out)
    w_sized = hebb.new_empty(B, N, N)
    with pytest.raises(RuntimeError, match="plastic_rnn_rollout_step: hebb_out overlaps w"):
        fn(**dict(kwargs, w=w_sized[0]), hebb_out=w_sized, elig_out=torch.empty_like(elig))
    fn, kwargs = rollout_case_without_elig()
    with pytest.raises(
        ValueError, match="plastic_rnn_rollout_step: elig_out is only used with elig"
    ):
        fn(
            **kwargs,
            hebb_out=torch.empty_like(kwargs["hebb"]),
            elig_out=torch.empty_like(kwargs["hebb"]),
        )
    fn(**kwargs, hebb_out=torch.empty_like(kwargs["hebb"]))


def rollout_case_without_elig():
    _, kwargs = rnn_case("step", rule="clip")
    return bp.fused.plastic_rnn_rollout_step, dict(kwargs, u=None)


def test_rollout_step_checks_like_step():
    """The rollout step shares the step op's checks: e.g. a wrong hebb shape."""
    fn, kwargs = rollout_case()
    kwargs["hebb"] = torch.zeros(B, N, N - 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="plastic_rnn_rollout_step: expected hebb to have shape"):
        fn(**kwargs)


# Option values and missing/extra optional arguments: ValueError.


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("rule", ["hebbian", "", "Clip"])
def test_rnn_unknown_rule(op, rule):
    fn, kwargs = rnn_case(op, modulation="none_scalar", rule="clip")
    kwargs["rule"] = rule
    with pytest.raises(
        ValueError,
        match=f"{op_name(op)}: rule must be one of 'clip', 'softclip', "
        f"'decay', 'oja', 'retroactive', 'clip_on_read', got '{rule}'",
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize(
    "clip,printed",
    [(0.0, "0"), (-1.0, "-1"), (math.nan, "nan"), (math.inf, "inf"), (True, "True"), ("2", "'2'")],
    ids=str,
)
def test_rnn_bad_clip(op, clip, printed):
    fn, kwargs = rnn_case(op)
    kwargs["clip"] = clip
    with pytest.raises(
        ValueError, match=f"{op_name(op)}: clip must be a finite number > 0, got {printed}"
    ):
        fn(**kwargs)


@pytest.mark.parametrize("checkpoint_every", [0, -2])
def test_sequence_bad_checkpoint_every(checkpoint_every):
    fn, kwargs = rnn_case("sequence")
    with pytest.raises(
        ValueError,
        match=f"plastic_rnn_sequence: checkpoint_every must be >= 1, got {checkpoint_every}",
    ):
        fn(**kwargs, checkpoint_every=checkpoint_every)


@pytest.mark.parametrize("checkpoint_every", [True, 2.0, "2"], ids=repr)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_sequence_checkpoint_every_not_an_int(checkpoint_every, grad):
    # with and without a backward to come: without, the op used to ignore the value
    fn, kwargs = rnn_case("sequence")
    kwargs["x"].requires_grad_(grad)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "plastic_rnn_sequence: checkpoint_every must be None or an int >= 1, "
            f"got {checkpoint_every!r}"
        ),
    ):
        fn(**kwargs, checkpoint_every=checkpoint_every)


@SEQUENCE_OR_STEP
def test_rnn_retroactive_without_modulation(op):
    fn, kwargs = rnn_case(op)
    kwargs.update(
        h2mod_weight=None,
        h2mod_bias=None,
        fanout_weight=None,
        fanout_bias=None,
        eta=torch.tensor(0.1, dtype=torch.float64),
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{op_name(op)}: rule 'retroactive' needs modulation 'simple' or 'fanout' (pass "
            "h2mod_weight), got modulation 'none'"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_simple_with_several_modulators(op):
    fn, kwargs = rnn_case(op)
    kwargs.update(fanout_weight=None, fanout_bias=None)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{op_name(op)}: modulation 'simple' takes one modulator (h2mod_weight of shape (1, "
            f"N)), got K = {K}; use 'fanout' for K > 1"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_eta_and_h2mod(op):
    fn, kwargs = rnn_case(op)
    kwargs["eta"] = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{op_name(op)}: pass either eta (modulation 'none') or h2mod_weight (modulation "
            "'simple'/'fanout'), not both"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_no_eta_no_h2mod(op):
    fn, kwargs = rnn_case(op, modulation="none_scalar", rule="clip")
    kwargs["eta"] = None
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{op_name(op)}: without modulation (h2mod_weight None) the learned rate eta is "
            "required, got None"
        ),
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize(
    "name,shape", [("fanout_weight", (N, 1)), ("h2mod_bias", (1,)), ("fanout_bias", (N,))]
)
def test_rnn_modulation_parts_without_h2mod_weight(op, name, shape):
    fn, kwargs = rnn_case(op, modulation="none_scalar", rule="clip")
    kwargs[name] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=f"{op_name(op)}: fanout_weight, h2mod_bias and fanout_bias need h2mod_weight",
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_h2mod_bias_missing(op):
    fn, kwargs = rnn_case(op)
    kwargs["h2mod_bias"] = None
    with pytest.raises(
        ValueError, match=f"{op_name(op)}: h2mod_bias is required with h2mod_weight"
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_fanout_bias_missing(op):
    fn, kwargs = rnn_case(op)
    kwargs["fanout_bias"] = None
    with pytest.raises(
        ValueError, match=f"{op_name(op)}: fanout_bias is required with fanout_weight"
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_rnn_fanout_bias_without_fanout_weight(op):
    fn, kwargs = rnn_case(op, modulation="simple")
    kwargs["fanout_bias"] = torch.zeros(N, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{op_name(op)}: fanout_bias needs fanout_weight"):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("missing", ["elig", "elig_rate"])
def test_rnn_retroactive_missing_elig(op, missing):
    fn, kwargs = rnn_case(op)
    kwargs[missing] = None
    expected = (
        f"needs the eligibility trace elig of shape {shape_str((B, N, N))}, got None"
        if missing == "elig"
        else "needs elig_rate of shape (), got None"
    )
    with pytest.raises(
        ValueError, match=re.escape(f"{op_name(op)}: rule 'retroactive' {expected}")
    ):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("given", ["elig", "elig_rate"])
def test_rnn_elig_without_retroactive(op, given):
    fn, kwargs = rnn_case(op)
    kwargs["rule"] = "clip"
    kwargs["elig" if given == "elig_rate" else "elig_rate"] = None
    with pytest.raises(
        ValueError,
        match=f"{op_name(op)}: elig and elig_rate are only used by rule 'retroactive'; pass None",
    ):
        fn(**kwargs)


# ---------------------------------------------------------------------------------------------
# Gradients handed to the backward ops (check_grad).


def sequence_backward_args(**grads):
    inputs = rnn_inputs("full", "fanout3", "retroactive", T=T, B=B, N=N)
    fwd = OPS.plastic_rnn_sequence(*[inputs[k] for k in RNN_INPUTS], "retroactive", 1.0, 2)
    out, hebb_T, elig_T, m, eta_seq, ckpt_h, ckpt_e = fwd
    g = dict(
        grad_out=torch.ones_like(out),
        grad_hebb=torch.ones_like(hebb_T),
        grad_elig=torch.ones_like(elig_T),
        grad_m=torch.ones_like(m),
        hebb_checkpoints=ckpt_h,
    )
    g.update(grads)
    return [
        g["grad_out"],
        g["grad_hebb"],
        g["grad_elig"],
        g["grad_m"],
        *[inputs[k] for k in RNN_INPUTS[1:]],
        "retroactive",
        1.0,
        out,
        m,
        eta_seq,
        g["hebb_checkpoints"],
        ckpt_e,
        2,
    ]


@pytest.mark.parametrize(
    "name,shape",
    [
        ("grad_out", (T, B, N + 1)),
        ("grad_hebb", (B, N, 1)),
        ("grad_elig", (1, N, N)),
        ("grad_m", (T, B, K + 1)),
        ("hebb_checkpoints", (2, B, N, N)),
    ],
)
def test_sequence_backward_wrong_grad_shape(name, shape):
    args = sequence_backward_args(**{name: torch.zeros(shape, dtype=torch.float64)})
    expected = {
        "grad_out": (T, B, N),
        "grad_hebb": (B, N, N),
        "grad_elig": (B, N, N),
        "grad_m": (T, B, K),
        "hebb_checkpoints": (1, B, N, N),
    }[name]
    meaning = (
        "(ceil(T / checkpoint_every) - 1, B, N, N)"
        if name == "hebb_checkpoints"
        else "(the shape of the forward output it is the gradient of)"
    )
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_rnn_sequence_backward: expected {name} to have shape {shape_str(expected)} "
            f"{meaning}, got {shape_str(shape)}"
        ),
    ):
        OPS.plastic_rnn_sequence_backward(*args)


def test_sequence_backward_grad_dtype_and_contiguity():
    args = sequence_backward_args(grad_out=torch.zeros(T, B, N))
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "plastic_rnn_sequence_backward: expected grad_out to have dtype Double (the dtype of "
            "the first argument), got Float"
        ),
    ):
        OPS.plastic_rnn_sequence_backward(*args)
    args = sequence_backward_args(grad_hebb=non_contiguous(torch.zeros(B, N, N).double()))
    with pytest.raises(
        RuntimeError, match="plastic_rnn_sequence_backward: expected grad_hebb to be contiguous"
    ):
        OPS.plastic_rnn_sequence_backward(*args)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("grad_h_new", (B, N + 1)),
        ("grad_hebb", (B, N, 1)),
        ("grad_elig", (1, N, N)),
        ("grad_m", (B, K + 1)),
    ],
)
def test_step_backward_wrong_grad_shape(name, shape):
    inputs = rnn_inputs("full", "fanout3", "retroactive", B=B, N=N)
    h_new, hebb_new, elig_new, m, eta_t = OPS.plastic_rnn_step(
        *[inputs[k] for k in RNN_INPUTS], "retroactive", 1.0
    )
    g = dict(grad_h_new=None, grad_hebb=None, grad_elig=None, grad_m=None)
    g[name] = torch.zeros(shape, dtype=torch.float64)
    expected = {
        "grad_h_new": (B, N),
        "grad_hebb": (B, N, N),
        "grad_elig": (B, N, N),
        "grad_m": (B, K),
    }[name]
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_rnn_step_backward: expected {name} to have shape {shape_str(expected)} (the "
            f"shape of the forward output it is the gradient of), got {shape_str(shape)}"
        ),
    ):
        OPS.plastic_rnn_step_backward(
            *g.values(), *[inputs[k] for k in RNN_INPUTS[1:]], "retroactive", 1.0, h_new, m, eta_t
        )


# ---------------------------------------------------------------------------------------------
# Non-finite inputs


@pytest.mark.parametrize(
    "rule", ["clip", "softclip", "decay", "oja", "retroactive", "clip_on_read"]
)
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
