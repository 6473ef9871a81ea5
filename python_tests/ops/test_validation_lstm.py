"""Validation of the LSTM ops (backpropamine_cuda/fused.py; the checks are in csrc/checks.cpp):
their own inputs (x of width 4N, c, h2g) and options; the plastic part shares the RNN ops' checks
(test_validation_rnn.py), of which a sample is here. RuntimeError for shapes, dtypes and
contiguity, ValueError for option values, with a message that starts with the op's name.
"""

import re

import pytest
import torch

import backpropamine_cuda as bp

from helpers import LSTM_INPUTS, SEQUENCE_OR_STEP, lstm_inputs, non_contiguous, shape_str

B, N, T = 2, 5, 3
# torch.ops.backpropamine exists once the fused module has loaded the extension.
pytestmark = pytest.mark.usefixtures("fused_cpu")


def lstm_case(op, modulation="fanout3", rule="retroactive"):
    """(function, valid kwargs) of the fused LSTM sequence or step op."""
    inputs = lstm_inputs("full", modulation, rule, B=B, N=N, T=T if op == "sequence" else None)
    fn = bp.fused.plastic_lstm_sequence if op == "sequence" else bp.fused.plastic_lstm_step
    return fn, dict(inputs, rule=rule, clip=1.0, modulator_input="c")


@SEQUENCE_OR_STEP
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


@SEQUENCE_OR_STEP
@pytest.mark.parametrize(
    "name,shape,expected", LSTM_SHAPE_CASES, ids=[f"{c[0]}{c[1]}" for c in LSTM_SHAPE_CASES]
)
def test_lstm_wrong_shape(op, name, shape, expected):
    fn, kwargs = lstm_case(op)
    kwargs[name] = torch.zeros(shape, dtype=torch.float64)
    pattern = (
        re.escape(f"plastic_lstm_{op}: expected {name} to have shape {expected}")
        + ".*"
        + re.escape(f"got {shape_str(shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_lstm_x_width_not_four_gates(op):
    fn, kwargs = lstm_case(op)
    kwargs["x"] = kwargs["x"][..., :-1].contiguous()
    layout = "(T, B, 4N)" if op == "sequence" else "(B, 4N)"
    pattern = (
        re.escape(f"plastic_lstm_{op}: expected x of shape {layout} (the four gates' inputs)")
        + ".*"
        + re.escape(f"got {shape_str(kwargs['x'].shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@SEQUENCE_OR_STEP
def test_lstm_x_width_mismatch_with_h(op):
    """x of width 4M with M != N: h (and c, h2g) name the mismatch."""
    fn, kwargs = lstm_case(op)
    kwargs["x"] = torch.cat([kwargs["x"]] * 2, dim=-1)
    pattern = (
        re.escape(f"plastic_lstm_{op}: expected h to have shape {shape_str((B, 2 * N))} (B, N)")
        + ".*"
        + re.escape(f"got {shape_str((B, N))}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("modulator_input", ["x", "", "H", "cell", "h_next"])
def test_lstm_bad_modulator_input(op, modulator_input):
    fn, kwargs = lstm_case(op)
    kwargs["modulator_input"] = modulator_input
    message = (
        f"plastic_lstm_{op}: modulator_input must be one of 'h', 'c', 'h_prev', "
        f"got '{modulator_input}'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("post_input", ["x", "", "G", "i2c", "hidden"])
def test_lstm_bad_post_input(op, post_input):
    fn, kwargs = lstm_case(op)
    kwargs["post_input"] = post_input
    message = f"plastic_lstm_{op}: post_input must be one of 'g', 'u', 'c', 'h', got '{post_input}'"
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("clip", [True, "2"], ids=repr)
def test_lstm_clip_not_a_number(op, clip):
    fn, kwargs = lstm_case(op)
    kwargs["clip"] = clip
    message = f"plastic_lstm_{op}: clip must be a finite number > 0, got {clip!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(**kwargs)


def test_lstm_checkpoint_every_not_an_int():
    fn, kwargs = lstm_case("sequence")
    message = "plastic_lstm_sequence: checkpoint_every must be None or an int >= 1, got 1.5"
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(**kwargs, checkpoint_every=1.5)


def sequence_backward_kwargs(post_input):
    """Valid keyword arguments of plastic_lstm_sequence_backward, from a forward with
    `post_input` (no incoming gradients)."""
    _, kwargs = lstm_case("sequence")
    schema = torch.ops.backpropamine.plastic_lstm_sequence.default._schema
    tensors = dict(zip((a.name for a in schema.arguments), (kwargs[k] for k in LSTM_INPUTS)))
    options = dict(rule="retroactive", clip=1.0, modulator_input="c", post_input=post_input)
    outputs = torch.ops.backpropamine.plastic_lstm_sequence(
        **tensors, **options, checkpoint_every=2
    )
    saved = ("out", "c_seq", None, None, "m", "eta_seq", "gates", "hebb_checkpoints")
    saved += ("elig_checkpoints",)
    del tensors["x"]
    grads = ("grad_out", "grad_c", "grad_hebb", "grad_elig", "grad_m")
    return dict(
        dict.fromkeys(grads),
        **tensors,
        **options,
        **{name: t for name, t in zip(saved, outputs) if name},
        checkpoint_every=2,
    )


@pytest.mark.parametrize("name", ["post_input", "modulator_input"])
def test_lstm_bad_option_in_backward_op(name):
    """The backward ops check the options too (their callers may not be the forward's glue)."""
    kwargs = sequence_backward_kwargs("g")
    kwargs[name] = "q"
    with pytest.raises(ValueError, match=f"plastic_lstm_sequence_backward: {name} must be one of"):
        torch.ops.backpropamine.plastic_lstm_sequence_backward(**kwargs)


@pytest.mark.parametrize("forward_post,backward_post", [("g", "u"), ("u", "h")])
def test_lstm_backward_gates_of_another_post_input(forward_post, backward_post):
    """post_input "u" saves a fifth gate slot: a backward told another post_input than its
    forward's names the gates' shape."""
    kwargs = sequence_backward_kwargs(forward_post)
    kwargs["post_input"] = backward_post
    slots = 5 if backward_post == "u" else 4
    layout = f"(T, {slots}, B, N)" + (" with post_input 'u'" if slots == 5 else "")
    expected = (
        f"plastic_lstm_sequence_backward: expected gates to have shape "
        f"{shape_str((T, slots, B, N))} {layout}, got {shape_str(kwargs['gates'].shape)}"
    )
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        torch.ops.backpropamine.plastic_lstm_sequence_backward(**kwargs)


@SEQUENCE_OR_STEP
@pytest.mark.parametrize("name", ["c", "h2g_weight", "h2g_bias"])
def test_lstm_dtype_mismatch_and_non_contiguous(op, name):
    fn, kwargs = lstm_case(op)
    good = kwargs[name]
    kwargs[name] = good.float()
    with pytest.raises(
        RuntimeError, match=f"plastic_lstm_{op}: expected {name} to have dtype Double.*got Float"
    ):
        fn(**kwargs)
    if good.dim() == 2:
        kwargs[name] = non_contiguous(good)
        with pytest.raises(
            RuntimeError, match=f"plastic_lstm_{op}: expected {name} to be contiguous"
        ):
            fn(**kwargs)


def test_lstm_sequence_backward_wrong_grad_shape():
    fn, kwargs = lstm_case("sequence")
    options = (kwargs["rule"], kwargs["clip"], kwargs["modulator_input"])
    tensors = [kwargs[k] for k in LSTM_INPUTS]
    out, c_seq, hebb_T, elig_T, m, eta_seq, gates, ckpt_h, ckpt_e = (
        torch.ops.backpropamine.plastic_lstm_sequence(*tensors, *options, 2)
    )
    bad = torch.zeros(T, B, N + 1, dtype=torch.float64)
    pattern = (
        re.escape(
            f"plastic_lstm_sequence_backward: expected grad_c to have shape {shape_str((T, B, N))}"
        )
        + ".*"
        + re.escape(f"got {shape_str(bad.shape)}")
    )
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.backpropamine.plastic_lstm_sequence_backward(
            None,
            bad,
            None,
            None,
            None,
            *tensors[1:],
            *options,
            out,
            c_seq,
            m,
            eta_seq,
            gates,
            ckpt_h,
            ckpt_e,
            2,
        )
