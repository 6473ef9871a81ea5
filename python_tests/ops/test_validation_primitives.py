"""Validation of the primitive ops plastic_matvec and hebb_update (backpropamine_cuda/fused.py;
the checks are in csrc/checks.cpp) and of their backward ops: RuntimeError for shapes, dtypes and
contiguity, ValueError for option values and missing/extra optional arguments, with a message that
starts with the op's name and names the argument, the expected and the actual value.
"""

import math
import re

import pytest
import torch

import backpropamine_cuda as bp
from backpropamine_cuda import reference

from helpers import non_contiguous, shape_str

OPS = torch.ops.backpropamine
# torch.ops.backpropamine exists once the fused module has loaded the extension.
pytestmark = pytest.mark.usefixtures("fused_cpu")


# ---------------------------------------------------------------------------------------------
# plastic_matvec


def matvec_args(**changes):
    args = dict(
        x=torch.zeros(3, 4), w=torch.zeros(4, 5), alpha=torch.zeros(4, 5), hebb=torch.zeros(3, 4, 5)
    )
    args.update(changes)
    return args


@pytest.mark.parametrize("shape", [(3,), (3, 4, 1), (0, 4), (3, 0)], ids=str)
def test_matvec_x_shape(shape):
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_matvec: expected x of shape (B, P) with B, P >= 1, got {shape_str(shape)}"
        ),
    ):
        bp.fused.plastic_matvec(**matvec_args(x=torch.zeros(shape)))


@pytest.mark.parametrize("shape", [(3, 5), (4,), (4, 0)], ids=str)
def test_matvec_w_shape(shape):
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_matvec: expected w of shape (P, N) with P = 4, got {shape_str(shape)}"
        ),
    ):
        bp.fused.plastic_matvec(**matvec_args(w=torch.zeros(shape)))


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("hebb", (3, 4, 4), "[3, 4, 5] (B, P, N)"),
        ("hebb", (1, 4, 5), "[3, 4, 5] (B, P, N)"),
        ("alpha", (5, 4), "[4, 5] (P, N) for alpha 'full'"),
        ("alpha", (4,), "[5] (N,) for alpha 'neuron'"),
    ],
)
def test_matvec_wrong_shape(name, shape, expected):
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_matvec: expected {name} to have shape {expected}, got {shape_str(shape)}"
        ),
    ):
        bp.fused.plastic_matvec(**matvec_args(**{name: torch.zeros(shape)}))


def test_matvec_alpha_wrong_rank():
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "plastic_matvec: expected alpha of shape (P, N) ('full'), (N,) ('neuron') or () "
            "('scalar') with P, N = 4, 5, got [1, 4, 5]"
        ),
    ):
        bp.fused.plastic_matvec(**matvec_args(alpha=torch.zeros(1, 4, 5)))


@pytest.mark.parametrize("name", ["w", "alpha", "hebb"])
def test_matvec_dtype_and_contiguity(name):
    args = matvec_args()
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_matvec: expected {name} to have dtype Float (the dtype of the first "
            "argument), got Double"
        ),
    ):
        bp.fused.plastic_matvec(**dict(args, **{name: args[name].double()}))
    nc = non_contiguous(args[name])
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"plastic_matvec: expected {name} to be contiguous, got strides "
            f"{shape_str(nc.stride())} for shape {shape_str(nc.shape)}"
        ),
    ):
        bp.fused.plastic_matvec(**dict(args, **{name: nc}))


def test_matvec_x_dtype_and_contiguity():
    with pytest.raises(
        RuntimeError, match="plastic_matvec: expected x to have dtype float32 or float64, got Half"
    ):
        bp.fused.plastic_matvec(**matvec_args(x=torch.zeros(3, 4, dtype=torch.float16)))
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "plastic_matvec: expected x to be contiguous, got strides [1, 3] for shape [3, 4]"
        ),
    ):
        bp.fused.plastic_matvec(**matvec_args(x=torch.zeros(4, 3).t()))


def test_matvec_backward_wrong_grad_shape():
    x, w, alpha, hebb = (torch.zeros(s) for s in ((3, 4), (4, 5), (), (3, 4, 5)))
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "plastic_matvec_backward: expected grad_u to have shape [3, 5] (the shape of the "
            "forward output it is the gradient of), got [3, 4]"
        ),
    ):
        OPS.plastic_matvec_backward(torch.zeros(3, 4), x, w, alpha, hebb)


# ---------------------------------------------------------------------------------------------
# hebb_update (fused wrapper: eta broadcast in Python; raw op: eta (B, 1, N) or (1, P, N))


def update_args(rule="clip", **changes):
    retro = rule == "retroactive"
    args = dict(
        hebb=torch.zeros(3, 4, 5),
        pre=torch.zeros(3, 4),
        post=torch.zeros(3, 5),
        eta=torch.zeros(3, 1, 5),
        rule=rule,
        clip=1.0,
        elig=torch.zeros(3, 4, 5) if retro else None,
        elig_rate=torch.tensor(0.5) if retro else None,
    )
    args.update(changes)
    return args


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5, 1), (0, 4, 5), (3, 0, 5), (3, 4, 0)], ids=str)
def test_hebb_update_hebb_shape(shape):
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "hebb_update: expected hebb of shape (B, P, N) with B, P, N >= 1, got "
            f"{shape_str(shape)}"
        ),
    ):
        OPS.hebb_update(**update_args(hebb=torch.zeros(shape)))


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("pre", (3, 5), "[3, 4] (B, P)"),
        ("pre", (4,), "[3, 4] (B, P)"),
        ("post", (3, 4), "[3, 5] (B, N)"),
        ("post", (1, 5), "[3, 5] (B, N)"),
    ],
)
def test_hebb_update_wrong_shape(name, shape, expected):
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"hebb_update: expected {name} to have shape {expected}, got {shape_str(shape)}"
        ),
    ):
        bp.fused.hebb_update(**update_args(**{name: torch.zeros(shape)}))


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 1, 5), (3, 1, 1), (5,), ()], ids=str)
def test_raw_hebb_update_eta_layout(shape):
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "hebb_update: expected eta of shape (B, 1, N) = [3, 1, 5] or (1, P, N) = [1, 4, 5], "
            f"got {shape_str(shape)}"
        ),
    ):
        OPS.hebb_update(**update_args(eta=torch.zeros(shape)))


@pytest.mark.parametrize("shape", [(1, 1, 1, 5), (4,), (2, 1, 5), (3, 5, 5)], ids=str)
def test_hebb_update_eta_not_broadcastable(shape):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "hebb_update: eta must be broadcastable to (B, P, N) = (3, 4, 5), got shape "
            f"{tuple(shape)}"
        ),
    ):
        bp.fused.hebb_update(**update_args(eta=torch.zeros(shape)))


@pytest.mark.parametrize("shape", [(3, 4, 1), (3, 4, 5)], ids=str)
def test_hebb_update_eta_varies_over_batch_and_pre(shape):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "hebb_update: eta may vary over the batch or over pre-synaptic neurons, not both; got "
            f"shape {tuple(shape)} for (B, P, N) = (3, 4, 5)"
        ),
    ):
        bp.fused.hebb_update(**update_args(eta=torch.zeros(shape)))


@pytest.mark.parametrize("name", ["pre", "post", "eta", "elig", "elig_rate"])
def test_hebb_update_dtype_mismatch(name):
    args = update_args("retroactive")
    args[name] = args[name].double()
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"hebb_update: expected {name} to have dtype Float (the dtype of the first argument), "
            "got Double"
        ),
    ):
        OPS.hebb_update(**args)


@pytest.mark.parametrize("name", ["hebb", "pre", "post", "eta", "elig"])
def test_hebb_update_non_contiguous(name):
    args = update_args("retroactive")
    args[name] = non_contiguous(args[name])
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"hebb_update: expected {name} to be contiguous, got strides "
            f"{shape_str(args[name].stride())} for shape {shape_str(args[name].shape)}"
        ),
    ):
        OPS.hebb_update(**args)


@pytest.mark.parametrize("dtype,printed", [(torch.float16, "Half"), (torch.int64, "Long")], ids=str)
def test_hebb_update_unsupported_dtype(dtype, printed):
    args = update_args()
    args = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(
        RuntimeError,
        match=f"hebb_update: expected hebb to have dtype float32 or float64, got {printed}",
    ):
        OPS.hebb_update(**args)


@pytest.mark.parametrize(
    "name,shape,expected",
    [("elig", (3, 4, 4), "[3, 4, 5] (same as hebb)"), ("elig_rate", (1,), "[] (a scalar)")],
)
def test_hebb_update_elig_shapes(name, shape, expected):
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"hebb_update: expected {name} to have shape {expected}, got {shape_str(shape)}"
        ),
    ):
        bp.fused.hebb_update(**update_args("retroactive", **{name: torch.zeros(shape)}))


def test_hebb_update_options():
    with pytest.raises(
        ValueError,
        match="hebb_update: rule must be one of 'clip', 'softclip', "
        "'decay', 'oja', 'retroactive', 'clip_on_read', got 'bcm'",
    ):
        bp.fused.hebb_update(**update_args(rule="bcm"))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rule must be one of ('clip', 'softclip', 'decay', 'oja', 'retroactive', "
            "'clip_on_read'), got 'bcm'"
        ),
    ):
        reference.hebb_update(**update_args(rule="bcm"))
    for clip, printed in ((0.0, "0"), (-2.0, "-2"), (math.nan, "nan"), (math.inf, "inf")):
        with pytest.raises(
            ValueError, match=f"hebb_update: clip must be a finite number > 0, got {printed}"
        ):
            bp.fused.hebb_update(**update_args(clip=clip))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "hebb_update: rule 'retroactive' needs the eligibility trace elig of shape [3, 4, 5], "
            "got None"
        ),
    ):
        bp.fused.hebb_update(**update_args("retroactive", elig=None))
    with pytest.raises(
        ValueError,
        match=re.escape("hebb_update: rule 'retroactive' needs elig_rate of shape (), got None"),
    ):
        bp.fused.hebb_update(**update_args("retroactive", elig_rate=None))
    with pytest.raises(
        ValueError,
        match="hebb_update: elig and elig_rate are only used by rule 'retroactive'; pass None",
    ):
        bp.fused.hebb_update(**update_args("oja", elig=torch.zeros(3, 4, 5)))


@pytest.mark.parametrize("name", ["grad_hebb_new", "grad_elig_new"])
def test_hebb_update_backward_wrong_grad_shape(name):
    hebb, pre, post, eta = (torch.zeros(s) for s in ((3, 4, 5), (3, 4), (3, 5), (3, 1, 5)))
    grads = [None, None]
    grads[name == "grad_elig_new"] = torch.zeros(3, 4, 4)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"hebb_update_backward: expected {name} to have shape [3, 4, 5] (the shape of the "
            "forward output it is the gradient of), got [3, 4, 4]"
        ),
    ):
        OPS.hebb_update_backward(
            *grads,
            hebb,
            pre,
            post,
            eta,
            torch.zeros(3, 4, 5),
            torch.tensor(0.5),
            "retroactive",
            1.0,
        )
