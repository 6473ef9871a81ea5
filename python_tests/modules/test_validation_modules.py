"""Validation in the nn.Module classes (backpropamine_cuda/modules.py): constructor sizes and
options, the impl setter, the input and the state given to forward, and what reaches the ops (a
parameter left on `meta`, an empty sequence or batch, a dtype without fused kernels). Each is a
ValueError or RuntimeError with a message that names the argument and what it must be.
"""

import math
import re

import pytest
import torch

import backpropamine_cuda as bp

from helpers import shape_str

# torch.ops.backpropamine exists once the fused module has loaded the extension.
pytestmark = pytest.mark.usefixtures("fused_cpu")


@pytest.mark.parametrize("name", ["input_size", "hidden_size", "n_modulators"])
@pytest.mark.parametrize("value", [0, -1, 2.0, "3", True], ids=repr)
def test_module_sizes(name, value):
    kwargs = dict(input_size=4, hidden_size=6, modulation="fanout")
    kwargs[name] = value
    with pytest.raises(ValueError, match=re.escape(f"{name} must be an int >= 1, got {value!r}")):
        bp.PlasticRNNCell(**kwargs)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
@pytest.mark.parametrize(
    "option,value,choices",
    [
        ("alpha", "diagonal", ("full", "neuron", "scalar")),
        ("modulation", "dopamine", ("none", "simple", "fanout")),
        ("rule", "bcm", ("clip", "softclip", "decay", "oja", "retroactive", "clip_on_read")),
        ("eta_shape", "neuron", ("scalar", "full")),
        ("impl", "cuda", ("auto", "fused", "reference")),
    ],
)
def test_module_unknown_option(cls, option, value, choices):
    with pytest.raises(
        ValueError, match=re.escape(f"{option} must be one of {choices}, got {value!r}")
    ):
        cls(4, 6, **{option: value})


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
@pytest.mark.parametrize("clip", [0, -1.0, math.nan, math.inf, "2", True], ids=repr)
def test_module_bad_clip(cls, clip):
    with pytest.raises(
        ValueError, match=re.escape(f"clip must be a finite number > 0, got {clip!r}")
    ):
        cls(4, 6, clip=clip)


@pytest.mark.parametrize(
    "cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM, bp.PlasticLSTMCell]
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float64"], ids=repr)
def test_module_bad_dtype(cls, dtype):
    with pytest.raises(
        ValueError,
        match=re.escape(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}"),
    ):
        cls(4, 6, dtype=dtype)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticLSTMCell])
@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("eta_init", math.nan, "a finite number"),
        ("eta_init", "0.1", "a finite number"),
        ("eta_init", True, "a finite number"),
        ("elig_rate_init", -0.1, "a number in [0, 1]"),
        ("elig_rate_init", 1.5, "a number in [0, 1]"),
        ("elig_rate_init", math.inf, "a number in [0, 1]"),
    ],
    ids=repr,
)
def test_module_bad_initial_values(cls, name, value, expected):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be {expected}, got {value!r}")):
        cls(4, 6, modulation="simple", rule="retroactive", **{name: value})


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM])
def test_module_impl_checked_when_set(cls):
    layer = cls(4, 6)
    with pytest.raises(
        ValueError,
        match=re.escape("impl must be one of ('auto', 'fused', 'reference'), got 'fast'"),
    ):
        layer.impl = "fast"
    assert layer.impl == "auto"
    layer.impl = "reference"
    assert layer.impl == "reference"


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_module_retroactive_without_modulation(cls):
    with pytest.raises(
        ValueError, match="rule 'retroactive' needs modulation 'simple' or 'fanout', got 'none'"
    ):
        cls(4, 6, rule="retroactive", modulation="none")
    cls(4, 6, rule="retroactive", modulation="none", plastic=False)  # no trace: allowed


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_module_simple_with_several_modulators(cls):
    with pytest.raises(
        ValueError,
        match="modulation 'simple' takes n_modulators=1, got 2; use "
        "modulation='fanout' for several modulators",
    ):
        cls(4, 6, modulation="simple", n_modulators=2)


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True], ids=repr)
def test_module_bad_checkpoint_every(value):
    with pytest.raises(
        ValueError, match=re.escape(f"checkpoint_every must be None or an int >= 1, got {value!r}")
    ):
        bp.PlasticRNN(4, 6, checkpoint_every=value)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_module_input_checks(impl):
    rnn = bp.PlasticRNN(4, 6, impl=impl)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "input must have shape (T, B, input_size) with input_size = 4, got (3, 2, 5)"
        ),
    ):
        rnn(torch.zeros(3, 2, 5))
    with pytest.raises(
        ValueError,
        match=re.escape("input must have shape (T, B, input_size) with input_size = 4, got (2, 4)"),
    ):
        rnn(torch.zeros(2, 4))
    with pytest.raises(
        ValueError,
        match=re.escape("input must have shape (T, B, input_size) with input_size = 4, got list"),
    ):
        rnn([[0.0] * 4])
    with pytest.raises(
        ValueError, match=re.escape("input must be a floating-point tensor, got torch.int64")
    ):
        rnn(torch.zeros(3, 2, 4, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=re.escape("input must have shape (B, T, input_size) with input_size = 4")
    ):
        bp.PlasticRNN(4, 6, impl=impl, batch_first=True)(torch.zeros(3, 2, 5))
    with pytest.raises(
        ValueError,
        match=re.escape("input must have shape (B, input_size) with input_size = 4, got (3, 2, 4)"),
    ):
        bp.PlasticRNNCell(4, 6, impl=impl)(torch.zeros(3, 2, 4))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_module_state_checks(impl):
    rnn = bp.PlasticRNN(4, 6, impl=impl, modulation="simple", rule="retroactive")
    x = torch.zeros(3, 2, 4)
    h, hebb = torch.zeros(2, 6), torch.zeros(2, 6, 6)
    with pytest.raises(
        ValueError,
        match=re.escape("state must be a PlasticState(h, hebb, elig) or None, got Tensor"),
    ):
        rnn(x, h)
    with pytest.raises(
        ValueError,
        match=re.escape("state must be a PlasticState(h, hebb, elig) or None, got tuple"),
    ):
        rnn(x, (h, hebb))
    with pytest.raises(ValueError, match=re.escape("state.h must have shape (2, 6), got (3, 6)")):
        rnn(x, bp.PlasticState(torch.zeros(3, 6), hebb, hebb))
    with pytest.raises(
        ValueError, match=re.escape("state.hebb must have shape (2, 6, 6), got (2, 6, 5)")
    ):
        rnn(x, bp.PlasticState(h, torch.zeros(2, 6, 5), hebb))
    with pytest.raises(
        ValueError, match=re.escape("state.elig must have shape (2, 6, 6), got NoneType")
    ):
        rnn(x, bp.PlasticState(h, hebb, None))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "state.hebb must have dtype torch.float32 on cpu like the input, got torch.float64 on "
            "cpu"
        ),
    ):
        rnn(x, bp.PlasticState(h, hebb.double(), hebb))


@pytest.mark.parametrize(
    "cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM, bp.PlasticLSTMCell]
)
def test_module_input_dtype_unlike_parameters(cls):
    """A float64 input to a float32 layer is named as such, not as a matmul's operands."""
    layer = cls(4, 6)
    x = torch.zeros((3, 2, 4) if cls in (bp.PlasticRNN, bp.PlasticLSTM) else (2, 4))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "input must have the dtype of the layer's parameters, torch.float32, got torch.float64"
        ),
    ):
        layer(x.double())


def test_module_impl_fused_without_kernels():
    """impl='fused' raises where the fused ops have no kernels (here: float16 on CPU)."""
    rnn = bp.PlasticRNN(4, 6, impl="fused").half()
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "impl='fused': no fused kernels for torch.float16 tensors on cpu; use impl='auto' or "
            "'reference'"
        ),
    ):
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


@pytest.mark.parametrize(
    "cls,name",
    [
        (bp.PlasticRNN, "alpha"),
        (bp.PlasticRNNCell, "w"),
        (bp.PlasticLSTM, "h2mod.weight"),
        (bp.PlasticLSTMCell, "fanout.bias"),
    ],
)
def test_module_parameter_left_on_meta(cls, name):
    """A module with one parameter left on `meta` (e.g. a half-done meta-device initialisation)
    raises the op's device message instead of computing on uninitialised memory."""
    module = cls(4, 6, impl="fused")
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    setattr(owner, leaf, torch.nn.Parameter(torch.empty_like(getattr(owner, leaf), device="meta")))
    x = torch.zeros(3, 2, 4) if cls in (bp.PlasticRNN, bp.PlasticLSTM) else torch.zeros(2, 4)
    with pytest.raises(
        RuntimeError, match="on device cpu \\(the device of the first argument\\), got meta"
    ):
        module(x)
