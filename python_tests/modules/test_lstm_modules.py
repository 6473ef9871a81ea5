"""PlasticLSTM and PlasticLSTMCell: parameters per option (and the PTB models' counts),
initialisation, the non-plastic layer against torch.nn.LSTM, fused vs reference, state handling
and validation."""

import pytest
import torch
from torch import nn

import backpropamine_cuda as bp

from helpers import TOL, I, N, assert_dicts_close, expected_param_shapes, grads_of, make, opt_id

F64 = TOL[torch.float64]
# Every rule, alpha, modulation, modulator input and post-synaptic term at least once.
COMPARE_OPTIONS = [
    dict(alpha="neuron", modulation="fanout", modulator_input="h", rule="clip"),  # PTB large
    dict(
        alpha="full",
        modulation="fanout",
        modulator_input="c",
        rule="clip",
        clip=0.5,
        n_modulators=3,
    ),
    dict(alpha="full", modulation="none", rule="clip", eta_shape="full"),  # PTB small, Table 1
    dict(alpha="scalar", modulation="simple", modulator_input="c", rule="retroactive"),
    dict(alpha="neuron", modulation="fanout", rule="retroactive", n_modulators=2),
    dict(alpha="full", modulation="simple", rule="softclip", clip=0.5),
    dict(alpha="scalar", modulation="none", rule="decay"),
    dict(alpha="full", modulation="none", rule="oja", post_input="u"),
    # PTB small, simple and retroactive (the modulator reads h_{t-1})
    dict(alpha="full", modulation="simple", modulator_input="h_prev", rule="retroactive", clip=1.0),
    dict(alpha="neuron", modulation="fanout", modulator_input="h_prev", post_input="c"),
    dict(alpha="scalar", modulation="simple", modulator_input="c", post_input="h", rule="decay"),
    dict(alpha="neuron", modulation="fanout", rule="clip_on_read", clip=0.05),  # PTB "aditya"
]
IMPLS = ["reference", "fused"]


def expected_shapes(
    alpha="neuron",
    modulation="fanout",
    rule="clip",
    n_modulators=1,
    eta_shape="scalar",
    plastic=True,
):
    """The RNN's parameters with the LSTM's input and recurrent layers instead of i2h."""
    shapes = expected_param_shapes(alpha, modulation, rule, n_modulators, eta_shape, plastic)
    del shapes["i2h.weight"], shapes["i2h.bias"]
    return {
        "i2g.weight": (4 * N, I),
        "i2g.bias": (4 * N,),
        "h2g.weight": (3 * N, N),
        "h2g.bias": (3 * N,),
        **shapes,
    }


def zero_state(batch):
    """The zero state of a retroactive layer, given explicitly."""
    zeros, trace = (
        torch.zeros(batch, N, dtype=torch.float64),
        torch.zeros(batch, N, N, dtype=torch.float64),
    )
    return bp.PlasticLSTMState(zeros, zeros, trace, trace)


def assert_states_close(actual, expected, **tol):
    assert type(actual) is type(expected)
    for name, a, e in zip(expected._fields, actual, expected):
        assert (a is None) == (e is None), name
        if e is not None:
            torch.testing.assert_close(a, e, **tol, msg=lambda m, k=name: f"state.{k}: {m}")


# ---------------------------------------------------------------------------------------------
# Parameters and initialisation


@pytest.mark.parametrize("cls", [bp.PlasticLSTM, bp.PlasticLSTMCell])
@pytest.mark.parametrize(
    "options",
    [
        dict(alpha="full"),
        dict(alpha="neuron"),
        dict(alpha="scalar"),
        dict(modulation="none"),
        dict(modulation="none", eta_shape="full"),
        dict(modulation="simple"),
        dict(modulation="fanout", n_modulators=3),
        dict(modulation="simple", rule="retroactive"),
        dict(plastic=False, rule="retroactive"),
    ],
    ids=opt_id,
)
def test_parameter_names_and_shapes(cls, options):
    module = cls(I, N, **options)
    assert {k: tuple(p.shape) for k, p in module.named_parameters()} == expected_shapes(**options)


def ptb_model_params(layer_sizes, **options):
    """Trainable parameters of Backpropamine's PTB language model: tied embedding/decoder (whose
    bias counts), LSTM layers of the given (input, hidden) sizes."""
    with torch.device("meta"):  # 24M parameters, no memory
        encoder = nn.Embedding(10000, 400)
        decoder = nn.Linear(400, 10000)
        decoder.weight = encoder.weight
        model = nn.ModuleList(
            [encoder, decoder] + [bp.PlasticLSTM(i, n, **options) for i, n in layer_sizes]
        )
    assert model[2].w.is_meta
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # counts tied once


def test_ptb_parameter_counts():
    plastic = ptb_model_params(
        [(400, 1149), (1149, 1149), (1149, 400)],
        alpha="neuron",
        modulation="fanout",
        modulator_input="h",
    )
    assert plastic == 24_198_893
    baseline = ptb_model_params([(400, 1150), (1150, 1150), (1150, 400)], plastic=False)
    # The original baseline counts 24,221,600 with 8N gate biases per layer (as nn.LSTM's b_ih +
    # b_hh); ours has 7N (i2g 4N + h2g 3N): the h -> g bias only adds to i2g's g bias, so the
    # function class is the same with N fewer parameters per layer.
    assert baseline == 24_221_600 - (1150 + 1150 + 400)


def test_initialisation_and_defaults():
    torch.manual_seed(0)
    lstm = bp.PlasticLSTM(I, 40)
    assert (
        lstm.alpha_mode,
        lstm.modulation,
        lstm.modulator_input,
        lstm.post_input,
        lstm.rule,
        lstm.clip,
        lstm.n_modulators,
        lstm.eta_shape,
        lstm.plastic,
        lstm.impl,
        lstm.batch_first,
        lstm.checkpoint_every,
    ) == ("neuron", "fanout", "h", "g", "clip", 2.0, 1, "scalar", True, "auto", False, None)
    assert lstm.w.min() >= -0.01 and lstm.w.max() < 0.01 and lstm.w.min() < -0.005
    for alpha in ("full", "neuron", "scalar"):
        a = bp.PlasticLSTMCell(I, 40, alpha=alpha).alpha
        assert a.min() >= 0 and a.max() < 1e-4
    assert lstm.alpha.std() > 0  # random, not constant
    assert torch.equal(bp.PlasticLSTM(I, N, modulation="none").eta.detach(), torch.tensor(0.01))
    full = bp.PlasticLSTM(I, N, modulation="none", eta_shape="full", eta_init=0.02)
    assert torch.equal(full.eta.detach(), torch.full((N, N), 0.02))
    retro = bp.PlasticLSTMCell(I, N, rule="retroactive", elig_rate_init=0.25)
    assert torch.equal(retro.elig_rate.detach(), torch.tensor(0.25))
    for layer, fan_in in ((lstm.i2g, I), (lstm.h2g, 40), (lstm.h2mod, 40), (lstm.fanout, 1)):
        bound = 1 / fan_in**0.5  # PyTorch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > bound / 2


def test_extra_repr_names_the_options():
    text = repr(
        bp.PlasticLSTM(I, N, alpha="full", modulation="simple", modulator_input="c", rule="oja")
    )
    for part in ("alpha='full'", "modulation='simple'", "modulator_input='c'", "rule='oja'"):
        assert part in text
    assert "post_input='u'" in repr(bp.PlasticLSTMCell(I, N, post_input="u"))
    assert "plastic=False" in repr(bp.PlasticLSTMCell(I, N, plastic=False))


# ---------------------------------------------------------------------------------------------
# plastic=False: an ordinary LSTM


def load_torch_lstm_weights(module, weight_ih, weight_hh, bias_ih, bias_hh):
    """Copy the weights of an nn.LSTM(Cell): h2g gets the i, f, o rows of weight_hh, w the g rows
    transposed, and bias_hh's g part (no own parameter here) goes into i2g's g bias."""
    g = slice(2 * N, 3 * N)
    with torch.no_grad():
        module.i2g.weight.copy_(weight_ih)
        module.i2g.bias.copy_(bias_ih)
        module.i2g.bias[g] += bias_hh[g]
        module.h2g.weight.copy_(torch.cat([weight_hh[: 2 * N], weight_hh[3 * N :]]))
        module.h2g.bias.copy_(torch.cat([bias_hh[: 2 * N], bias_hh[3 * N :]]))
        module.w.copy_(weight_hh[g].T)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_plastic_matches_torch_lstm(impl):
    torch_lstm = nn.LSTM(I, N).double()
    lstm = bp.PlasticLSTM(I, N, plastic=False, impl=impl).double()
    load_torch_lstm_weights(
        lstm,
        torch_lstm.weight_ih_l0,
        torch_lstm.weight_hh_l0,
        torch_lstm.bias_ih_l0,
        torch_lstm.bias_hh_l0,
    )
    x = torch.randn(5, 3, I, dtype=torch.float64, requires_grad=True)
    h0, c0 = torch.randn(2, 3, N, dtype=torch.float64)
    out, state = lstm(x, bp.PlasticLSTMState(h0, c0))
    (out * out.cos()).sum().backward()
    grad_x, x.grad = x.grad, None
    out_t, (h_t, c_t) = torch_lstm(x, (h0[None], c0[None]))
    (out_t * out_t.cos()).sum().backward()
    torch.testing.assert_close(out, out_t, **F64)
    torch.testing.assert_close(state.h, h_t[0], **F64)
    torch.testing.assert_close(state.c, c_t[0], **F64)
    assert state.hebb is None and state.elig is None
    torch.testing.assert_close(grad_x, x.grad, **F64)
    g = torch_lstm.weight_hh_l0.grad[2 * N : 3 * N]
    torch.testing.assert_close(lstm.w.grad, g.T, **F64)
    torch.testing.assert_close(lstm.i2g.weight.grad, torch_lstm.weight_ih_l0.grad, **F64)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_plastic_cell_matches_torch_lstm_cell(impl):
    torch_cell = nn.LSTMCell(I, N).double()
    cell = bp.PlasticLSTMCell(I, N, plastic=False, impl=impl).double()
    load_torch_lstm_weights(
        cell, torch_cell.weight_ih, torch_cell.weight_hh, torch_cell.bias_ih, torch_cell.bias_hh
    )
    x = torch.randn(3, I, dtype=torch.float64, requires_grad=True)
    h0, c0 = torch.randn(2, 3, N, dtype=torch.float64)
    h, state = cell(x, bp.PlasticLSTMState(h0, c0))
    (h.sin().sum() + state.c.square().sum()).backward()
    grad_x, x.grad = x.grad, None
    h_t, c_t = torch_cell(x, (h0, c0))
    (h_t.sin().sum() + c_t.square().sum()).backward()
    torch.testing.assert_close(h, h_t, **F64)
    torch.testing.assert_close(state.c, c_t, **F64)
    torch.testing.assert_close(grad_x, x.grad, **F64)


# ---------------------------------------------------------------------------------------------
# Plastic: fused vs reference, cell vs sequence, state handling


def run_lstm(lstm, x, impl):
    """Forward and backward of a loss using every output; (out, state, m, param grads)."""
    lstm.impl = impl
    lstm.zero_grad()
    out, state, m = lstm(x, return_modulation=True)
    loss = out.square().sum() + state.c.sin().sum() + (state.hebb * torch.linspace(-1, 1, N)).sum()
    if state.elig is not None:
        loss = loss + state.elig.sin().sum()
    if m is not None:
        loss = loss + m.cos().sum()
    loss.backward()
    return out.detach(), state, m, grads_of(lstm)


@pytest.mark.parametrize("batch_first", [False, True], ids=["tbi", "batch_first"])
@pytest.mark.parametrize("options", COMPARE_OPTIONS, ids=opt_id)
def test_lstm_fused_matches_reference(options, batch_first):
    lstm = make(bp.PlasticLSTM, options, checkpoint_every=2, batch_first=batch_first)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    (out_r, state_r, m_r, g_r), (out_f, state_f, m_f, g_f) = (
        run_lstm(lstm, x, impl) for impl in IMPLS
    )
    torch.testing.assert_close(out_f, out_r, **F64)
    assert_states_close(state_f, state_r, **F64)
    assert (m_r is None) == (options["modulation"] == "none") and (m_f is None) == (m_r is None)
    if m_r is not None:
        assert m_r.shape == (5, 3, options.get("n_modulators", 1))
        torch.testing.assert_close(m_f, m_r, **F64)
    assert g_r.keys() == {k for k, _ in lstm.named_parameters()}
    assert_dicts_close(g_f, g_r, **F64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [*COMPARE_OPTIONS[:4], *COMPARE_OPTIONS[-3:]], ids=opt_id)
def test_cell_loop_equals_sequence(options, impl):
    lstm = make(bp.PlasticLSTM, options, impl=impl)
    cell = bp.PlasticLSTMCell(I, N, impl=impl, **options).double()
    cell.load_state_dict(lstm.state_dict())
    x = torch.randn(5, 2, I, dtype=torch.float64)
    out, state, m = lstm(x, return_modulation=True)
    cell_state = None
    for t in range(5):
        h, cell_state, m_t = cell(x[t], cell_state, return_modulation=True)
        torch.testing.assert_close(h, out[t], **F64)
        if m is not None:
            torch.testing.assert_close(m_t, m[t], **F64)
    assert_states_close(cell_state, state, **F64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", [bp.PlasticLSTM, bp.PlasticLSTMCell])
def test_state_none_equals_zeros(cls, impl):
    module = make(cls, dict(rule="retroactive", modulator_input="c", n_modulators=2), impl=impl)
    x = torch.randn(*((3,) if cls is bp.PlasticLSTM else ()), 2, I, dtype=torch.float64)
    out_none, state_none = module(x)
    out_zeros, state_zeros = module(x, zero_state(2))
    torch.testing.assert_close(out_none, out_zeros, rtol=0, atol=0)
    assert_states_close(state_none, state_zeros, rtol=0, atol=0)
    nonzero = bp.PlasticLSTMState(*(t + 0.1 for t in zero_state(2)))
    assert not torch.allclose(module(x, nonzero)[0], out_zeros)  # the state is really used


@pytest.mark.parametrize("plastic", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_state_continues_across_calls(impl, plastic):
    lstm = make(bp.PlasticLSTM, dict(rule="retroactive", plastic=plastic), impl=impl)
    x = torch.randn(6, 2, I, dtype=torch.float64)
    out, state = lstm(x)
    assert (state.hebb is None) == (not plastic) and (state.elig is None) == (not plastic)
    out1, state1 = lstm(x[:4])
    out2, state2 = lstm(x[4:], state1)
    torch.testing.assert_close(torch.cat([out1, out2]), out, **F64)
    assert_states_close(state2, state, **F64)
    torch.testing.assert_close(state.h, out[-1], rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_first_and_return_modulation(impl):
    options = dict(n_modulators=3, modulator_input="c")
    lstm = make(bp.PlasticLSTM, options, impl=impl)
    lstm_bf = make(bp.PlasticLSTM, options, impl=impl, batch_first=True)
    lstm_bf.load_state_dict(lstm.state_dict())
    x = torch.randn(5, 2, I, dtype=torch.float64)
    out, state, m = lstm(x, return_modulation=True)
    out_bf, state_bf, m_bf = lstm_bf(x.transpose(0, 1), return_modulation=True)
    assert out_bf.shape == (2, 5, N) and m_bf.shape == (2, 5, 3)
    assert m.abs().max() < 1  # tanh of the modulator readout
    torch.testing.assert_close(out_bf, out.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(m_bf, m.transpose(0, 1), rtol=0, atol=0)
    assert_states_close(state_bf, state, rtol=0, atol=0)
    assert torch.equal(lstm(x)[0], out)
    assert lstm(x, return_modulation=True)[2] is not None
    assert (
        make(bp.PlasticLSTM, dict(modulation="none"), impl=impl)(x, return_modulation=True)[2]
        is None
    )


# ---------------------------------------------------------------------------------------------
# Validation


def test_bad_modulator_input_and_post_input():
    with pytest.raises(
        ValueError, match=r"modulator_input must be one of \('h', 'c', 'h_prev'\), got 'x'"
    ):
        bp.PlasticLSTM(I, N, modulator_input="x")
    with pytest.raises(ValueError, match="modulator_input must be one of"):
        bp.PlasticLSTMCell(I, N, modulator_input="m")
    with pytest.raises(
        ValueError, match=r"post_input must be one of \('g', 'u', 'c', 'h'\), got 'i2c'"
    ):
        bp.PlasticLSTM(I, N, post_input="i2c")
    with pytest.raises(ValueError, match="post_input must be one of"):
        bp.PlasticLSTMCell(I, N, post_input="cell")


@pytest.mark.parametrize("impl", IMPLS)
def test_state_checks(impl):
    lstm = bp.PlasticLSTM(I, N, rule="retroactive", impl=impl)
    x = torch.zeros(3, 2, I)
    h, hebb = torch.zeros(2, N), torch.zeros(2, N, N)
    with pytest.raises(
        ValueError,
        match=r"state must be a PlasticLSTMState\(h, c, hebb, elig\) "
        "or None, got PlasticState",
    ):
        lstm(x, bp.PlasticState(h, hebb, hebb))
    with pytest.raises(ValueError, match=r"state.h must have shape \(2, 6\), got \(3, 6\)"):
        lstm(x, bp.PlasticLSTMState(torch.zeros(3, N), h, hebb, hebb))
    with pytest.raises(ValueError, match=r"state.c must have shape \(2, 6\), got NoneType"):
        lstm(x, bp.PlasticLSTMState(h, None, hebb, hebb))
    with pytest.raises(ValueError, match=r"state.hebb must have shape \(2, 6, 6\), got \(2, 6\)"):
        lstm(x, bp.PlasticLSTMState(h, h, h, hebb))
    with pytest.raises(
        ValueError,
        match=r"state.c must have dtype torch.float32 on cpu like the "
        "input, got torch.float64 on cpu",
    ):
        lstm(x, bp.PlasticLSTMState(h, h.double(), hebb, hebb))
    with pytest.raises(ValueError, match=r"state.c must have shape \(2, 6\), got \(2, 5\)"):
        bp.PlasticLSTMCell(I, N, plastic=False, impl=impl)(
            x[0], bp.PlasticLSTMState(h, torch.zeros(2, 5))
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_input_checks(impl):
    with pytest.raises(
        ValueError,
        match=r"input must have shape \(T, B, input_size\) with "
        r"input_size = 4, got \(3, 2, 5\)",
    ):
        bp.PlasticLSTM(I, N, impl=impl)(torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match=r"input must have shape \(B, T, input_size\)"):
        bp.PlasticLSTM(I, N, impl=impl, batch_first=True)(torch.zeros(3, 2, 5))
    with pytest.raises(
        ValueError,
        match=r"input must have shape \(B, input_size\) with "
        r"input_size = 4, got \(2, 5\)",
    ):
        bp.PlasticLSTMCell(I, N, impl=impl)(torch.zeros(2, 5))
