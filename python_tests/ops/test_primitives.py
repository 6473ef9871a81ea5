"""The feed-forward primitives plastic_matvec and hebb_update (docs/design.md, 'Feed-forward
primitives'), fused against the reference: forward and the gradients of every input, every
alpha mode, rule and eta layout, with P != N."""

import pytest
import torch

from backpropamine_cuda import reference

from helpers import (
    ALPHAS,
    CLIP_RULES,
    READ_CLAMP_RULES,
    RULES,
    assert_results_close,
    clamp_engaged,
    compare_with_reference,
    run_forward_backward,
)

CLIP = 0.5
SIZES = [(3, 5, 7), (1, 1, 33), (2, 33, 1), (3, 7, 5)]  # (B, P, N)


def randn(gen, *shape, scale=1.0, dtype=torch.float64):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def matvec_inputs(alpha, B, P, N, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    alpha_shape = {"full": (P, N), "neuron": (N,), "scalar": ()}[alpha]
    return dict(
        x=randn(gen, B, P, dtype=dtype),
        w=randn(gen, P, N, dtype=dtype),
        alpha=randn(gen, *alpha_shape, dtype=dtype),
        hebb=randn(gen, B, P, N, dtype=dtype),
    )


def compare(fn_name, fused, inputs, use=None, **kwargs):
    """fused.<fn_name> against reference.<fn_name> (helpers.compare_with_reference)."""
    return compare_with_reference(
        getattr(reference, fn_name), getattr(fused, fn_name), inputs, use=use, **kwargs
    )


def matvec_as_tuple(module):
    """plastic_matvec returns one tensor; run_forward_backward wants a tuple of outputs."""
    return lambda **kw: (module.plastic_matvec(**kw),)


# ---------------------------------------------------------------------------------------------
# plastic_matvec


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matvec(fused, alpha, sizes, dtype):
    inputs = matvec_inputs(alpha, *sizes, dtype=dtype)
    expected = compare_with_reference(matvec_as_tuple(reference), matvec_as_tuple(fused), inputs)
    assert expected[0][0].shape == (sizes[0], sizes[2])


def test_matvec_several_tiles(fused):
    """N > 64: several column tiles; B = 20: several batch chunks."""
    inputs = matvec_inputs("full", 20, 9, 70, seed=1)
    expected = run_forward_backward(matvec_as_tuple(reference), inputs)
    actual = run_forward_backward(matvec_as_tuple(fused), inputs)
    assert_results_close(expected, actual, torch.float64)


# ---------------------------------------------------------------------------------------------
# hebb_update


def eta_layouts(B, P, N):
    """Every accepted eta layout: constant over at least one of the batch and pre dims."""
    return {
        "scalar": (),
        "sample": (B, 1, 1),
        "sample_post": (B, 1, N),
        "post": (N,),
        "post3": (1, 1, N),
        "connection": (P, N),
        "connection3": (1, P, N),
        "pre": (P, 1),
    }


def update_inputs(rule, eta_shape, B, P, N, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = dict(
        hebb=randn(gen, B, P, N, dtype=dtype),
        pre=torch.tanh(randn(gen, B, P, dtype=dtype)),
        post=torch.tanh(randn(gen, B, N, dtype=dtype)),
        eta=randn(gen, *eta_shape, scale=0.5, dtype=dtype),
    )
    if rule == "retroactive":
        d["elig"] = randn(gen, B, P, N, dtype=dtype)
        d["elig_rate"] = (0.1 + 0.8 * torch.rand((), generator=gen, dtype=torch.float64)).to(dtype)
    return d


@pytest.mark.parametrize("layout", list(eta_layouts(1, 1, 1)))
@pytest.mark.parametrize("rule", RULES)
def test_hebb_update_eta_layouts(fused, rule, layout):
    B, P, N = 3, 5, 7
    inputs = update_inputs(rule, eta_layouts(B, P, N)[layout], B, P, N)
    (new_hebb, new_elig), grads = compare("hebb_update", fused, inputs, rule=rule, clip=CLIP)
    assert (new_elig is None) == (rule != "retroactive")
    if rule in CLIP_RULES:
        assert clamp_engaged(new_hebb, CLIP)
    if rule in READ_CLAMP_RULES:  # no clamp here: the trace grows past the bound
        assert new_hebb.abs().max() > CLIP
    assert grads["eta"].shape == inputs["eta"].shape


@pytest.mark.parametrize("sizes", SIZES + [(20, 3, 70)], ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_hebb_update_sizes(fused, rule, sizes):
    for layout in ("sample_post", "connection"):
        inputs = update_inputs(rule, eta_layouts(*sizes)[layout], *sizes, seed=1)
        compare("hebb_update", fused, inputs, rule=rule, clip=CLIP)


@pytest.mark.parametrize("layout", ["scalar", "sample_post", "connection"])
@pytest.mark.parametrize("rule", RULES)
def test_hebb_update_float32(fused, rule, layout):
    B, P, N = 3, 33, 7
    inputs = update_inputs(rule, eta_layouts(B, P, N)[layout], B, P, N, dtype=torch.float32, seed=2)
    compare("hebb_update", fused, inputs, rule=rule, clip=CLIP)


def test_hebb_update_clip_on_read_is_unclipped(fused):
    """hebb_update has no read: with rule clip_on_read it is the plain update H + eta p q."""
    inputs = update_inputs("clip_on_read", (3, 1, 7), 3, 5, 7, seed=5)
    new_hebb, new_elig = fused.hebb_update(**inputs, rule="clip_on_read", clip=CLIP)
    product = inputs["pre"].unsqueeze(2) * inputs["post"].unsqueeze(1)
    expected = inputs["hebb"] + inputs["eta"] * product
    assert new_elig is None and expected.abs().max() > CLIP
    torch.testing.assert_close(new_hebb, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("used", [0, 1], ids=["new_hebb", "new_elig"])
def test_hebb_update_retroactive_single_output_used(fused, used):
    inputs = update_inputs("retroactive", (3, 1, 7), 3, 5, 7, seed=3)
    _, grads = compare("hebb_update", fused, inputs, use=[used], rule="retroactive", clip=CLIP)
    assert grads["elig"].abs().sum() > 0


def test_hebb_update_python_numbers(fused):
    """eta and elig_rate may be plain Python numbers."""
    inputs = update_inputs("retroactive", (), 2, 3, 4, seed=4)
    inputs = {k: v for k, v in inputs.items() if k not in ("eta", "elig_rate")}
    expected = reference.hebb_update(
        **inputs, eta=0.3, elig_rate=0.2, rule="retroactive", clip=CLIP
    )
    actual = fused.hebb_update(**inputs, eta=0.3, elig_rate=0.2, rule="retroactive", clip=CLIP)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_matvec_then_update_matches_rnn_step(fused):
    """matvec + tanh + hebb_update compose to one step of the plastic RNN (modulation none)."""
    B, N = 3, 6
    gen = torch.Generator().manual_seed(5)
    x, h = randn(gen, B, N), torch.tanh(randn(gen, B, N))
    hebb, w, alpha, eta = randn(gen, B, N, N), randn(gen, N, N), randn(gen, N, N), randn(gen, N, N)
    h_new = torch.tanh(x + fused.plastic_matvec(h, w, alpha, hebb))
    hebb_new, _ = fused.hebb_update(hebb, h, h_new, eta, "softclip", CLIP)
    step = fused.plastic_rnn_step(
        x, h, hebb, None, w, alpha, eta, None, None, None, None, None, rule="softclip", clip=CLIP
    )
    torch.testing.assert_close(h_new, step[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hebb_new, step[1], rtol=1e-12, atol=1e-12)
