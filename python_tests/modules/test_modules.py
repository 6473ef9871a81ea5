"""PlasticRNN and PlasticRNNCell: parameters per option, initialisation, state handling,
batch_first, return_modulation, fused vs reference, the non-plastic baseline, state_dict."""

import copy
import itertools

import pytest
import torch

import backpropamine_cuda as bp

from helpers import (
    TOL,
    I,
    N,
    assert_dicts_close,
    assert_tensor_close,
    expected_param_shapes,
    grads_of,
    make,
    opt_id,
)

OPTION_GRID = [
    dict(alpha=a, modulation=m, rule=r, n_modulators=k, eta_shape=e)
    for a, m, r, k, e in itertools.product(
        ("full", "neuron", "scalar"),
        ("none", "simple", "fanout"),
        ("clip", "softclip", "decay", "oja", "retroactive", "clip_on_read"),
        (1, 3),
        ("scalar", "full"),
    )
    if not (r == "retroactive" and m == "none")
    and not (m == "simple" and k != 1)
    and not (m != "none" and e == "full")
]
# A smaller set for the (slower) forward/backward comparisons: every rule, alpha and modulation.
COMPARE_OPTIONS = [
    dict(alpha="full", modulation="fanout", rule="clip", n_modulators=3),
    dict(alpha="neuron", modulation="simple", rule="softclip"),
    dict(alpha="scalar", modulation="none", rule="decay", eta_shape="full"),
    dict(alpha="full", modulation="none", rule="oja"),
    dict(alpha="neuron", modulation="fanout", rule="retroactive", n_modulators=2),
    dict(alpha="scalar", modulation="simple", rule="retroactive"),
    dict(alpha="full", modulation="none", rule="clip_on_read", clip=0.05),  # traces pass 0.05
]


# ---------------------------------------------------------------------------------------------
# Parameters and initialisation


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
@pytest.mark.parametrize("options", OPTION_GRID, ids=opt_id)
def test_parameter_names_and_shapes(cls, options):
    module = cls(I, N, **options)
    shapes = {k: tuple(p.shape) for k, p in module.named_parameters()}
    assert shapes == expected_param_shapes(**options)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_non_plastic_parameters(cls):
    module = cls(I, N, plastic=False, rule="retroactive", modulation="fanout")
    shapes = {k: tuple(p.shape) for k, p in module.named_parameters()}
    assert shapes == expected_param_shapes("full", "none", "clip", 1, "scalar", plastic=False)


def test_default_options():
    rnn = bp.PlasticRNN(I, N)
    assert (
        rnn.alpha_mode,
        rnn.modulation,
        rnn.rule,
        rnn.clip,
        rnn.n_modulators,
        rnn.eta_shape,
        rnn.plastic,
        rnn.impl,
        rnn.batch_first,
        rnn.checkpoint_every,
    ) == ("full", "fanout", "clip", 2.0, 1, "scalar", True, "auto", False, None)


@pytest.mark.parametrize("alpha", ["full", "neuron", "scalar"])
def test_initialisation(alpha):
    torch.manual_seed(0)
    rnn = bp.PlasticRNN(I, 40, alpha=alpha, modulation="none", eta_init=0.05)
    for p in (rnn.w, rnn.alpha):
        assert p.min() >= 0 and p.max() < 0.001
    assert rnn.w.std() > 0  # random, not constant
    assert torch.equal(rnn.eta.detach(), torch.tensor(0.05))
    cell = bp.PlasticRNNCell(I, 40, modulation="simple", rule="retroactive", elig_rate_init=0.25)
    assert torch.equal(cell.elig_rate.detach(), torch.tensor(0.25))
    full = bp.PlasticRNN(I, 5, modulation="none", eta_shape="full", eta_init=0.02)
    assert torch.equal(full.eta.detach(), torch.full((5, 5), 0.02))


def test_linear_layers_keep_pytorch_init():
    torch.manual_seed(0)
    rnn = bp.PlasticRNN(16, 25, modulation="fanout", n_modulators=4)
    for layer, fan_in in ((rnn.i2h, 16), (rnn.h2mod, 25), (rnn.fanout, 4)):
        bound = 1 / fan_in**0.5  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for p in (layer.weight, layer.bias):
            assert p.abs().max() <= bound and p.abs().max() > bound / 2


@pytest.mark.parametrize(
    "cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM, bp.PlasticLSTMCell]
)
@pytest.mark.parametrize(
    "options",
    [dict(modulation="none", eta_shape="full"), dict(rule="retroactive", n_modulators=2)],
    ids=opt_id,
)
def test_device_and_dtype_create_every_parameter_there(cls, options):
    """As torch.nn's layers: the parameters the options add (eta, elig_rate, the modulator's
    Linears) too; a float64 layer then runs on float64 input, fused as the reference."""
    names = [name for name, _ in cls(I, 5, **options).named_parameters()]
    meta = cls(I, 5, **options, device="meta")
    assert [name for name, _ in meta.named_parameters()] == names
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    layer = cls(I, 5, **options, dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    shape = (3, 2, I) if cls in (bp.PlasticRNN, bp.PlasticLSTM) else (2, I)
    x = torch.randn(shape, dtype=torch.float64)
    fused, _ = layer(x)
    layer.impl = "reference"
    reference, _ = layer(x)
    assert fused.dtype == torch.float64
    assert_tensor_close(fused, reference, "out", torch.float64)


@pytest.mark.parametrize(
    "cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM, bp.PlasticLSTMCell]
)
@pytest.mark.parametrize(
    "options",
    [
        dict(modulation="none", eta_shape="full", eta_init=0.03),
        dict(rule="retroactive", n_modulators=2, elig_rate_init=0.3),
        dict(plastic=False),
    ],
    ids=opt_id,
)
def test_reset_parameters_draws_as_the_constructor(cls, options):
    """Built on meta, materialised with to_empty and reset after the same seed: the parameters of
    a layer built directly, to the bit (the same draws in the same order)."""
    torch.manual_seed(3)
    built = cls(I, 5, **options)
    layer = cls(I, 5, **options, device="meta").to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()
    expected = dict(built.named_parameters())
    assert [name for name, _ in layer.named_parameters()] == list(expected)
    for name, value in layer.named_parameters():
        assert torch.equal(value, expected[name]), name


def test_module_defaults_eta_and_elig_rate():
    assert torch.equal(bp.PlasticRNN(I, N, modulation="none").eta.detach(), torch.tensor(0.01))
    assert torch.equal(
        bp.PlasticRNN(I, N, rule="retroactive").elig_rate.detach(), torch.tensor(0.1)
    )


def test_clamp_elig_rate_keeps_the_eligibility_trace_an_average():
    """Out of [0, 1] the eligibility trace diverges; clamp_elig_rate_ projects the rate back and
    leaves layers without eligibility traces alone."""
    for cls in (bp.PlasticRNN, bp.PlasticLSTM):
        layer = cls(I, N, modulation="simple", rule="retroactive")
        for rate, expected in ((-0.3, 0.0), (0.4, 0.4), (1.7, 1.0)):
            with torch.no_grad():
                layer.elig_rate.fill_(rate)
            layer.clamp_elig_rate_()
            assert layer.elig_rate.item() == pytest.approx(expected)
        assert layer.elig_rate.requires_grad
        for other in (cls(I, N, rule="clip"), cls(I, N, plastic=False)):
            before = [p.clone() for p in other.parameters()]
            other.clamp_elig_rate_()
            assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


# ---------------------------------------------------------------------------------------------
# Forward: state, batch_first, return_modulation


@pytest.mark.parametrize("options", COMPARE_OPTIONS, ids=opt_id)
def test_rnn_fused_matches_reference(options):
    rnn = make(bp.PlasticRNN, options, checkpoint_every=2)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    results = []
    for impl in ("reference", "fused"):
        rnn.impl = impl
        rnn.zero_grad()
        out, state, m = rnn(x, return_modulation=True)
        loss = out.square().sum() + (state.hebb * torch.linspace(-1, 1, N)).sum()
        if state.elig is not None:
            loss = loss + state.elig.sin().sum()
        if m is not None:
            loss = loss + m.cos().sum()
        loss.backward()
        results.append((out.detach(), state, m, grads_of(rnn)))
    (out_r, state_r, m_r, g_r), (out_f, state_f, m_f, g_f) = results
    torch.testing.assert_close(out_f, out_r, **TOL[torch.float64])
    for a, e in zip(state_f, state_r):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **TOL[torch.float64])
    assert (m_r is None) == (options["modulation"] == "none") and (m_f is None) == (m_r is None)
    if m_r is not None:
        assert m_r.shape == (5, 3, options.get("n_modulators", 1))
        torch.testing.assert_close(m_f, m_r, **TOL[torch.float64])
    assert g_r.keys() == {k for k, _ in rnn.named_parameters()}
    assert_dicts_close(g_f, g_r, **TOL[torch.float64])


@pytest.mark.parametrize("options", COMPARE_OPTIONS, ids=opt_id)
def test_cell_loop_fused_matches_reference(options):
    cell = make(bp.PlasticRNNCell, options)
    xs = torch.randn(4, 3, I, dtype=torch.float64)
    results = []
    for impl in ("reference", "fused"):
        cell.impl = impl
        cell.zero_grad()
        state, hs, ms = None, [], []
        for x in xs:
            h, state, m = cell(x, state, return_modulation=True)
            hs.append(h)
            ms.append(m)
        loss = torch.stack(hs).square().sum() + state.hebb.sin().sum()
        if ms[0] is not None:
            loss = loss + torch.stack(ms).sum()
        loss.backward()
        results.append((torch.stack(hs).detach(), state.hebb.detach(), grads_of(cell)))
    (h_r, hebb_r, g_r), (h_f, hebb_f, g_f) = results
    torch.testing.assert_close(h_f, h_r, **TOL[torch.float64])
    torch.testing.assert_close(hebb_f, hebb_r, **TOL[torch.float64])
    assert_dicts_close(g_f, g_r, **TOL[torch.float64])


@pytest.mark.parametrize("options", COMPARE_OPTIONS[:3], ids=opt_id)
def test_cell_loop_equals_rnn(options):
    rnn = make(bp.PlasticRNN, options)
    cell = bp.PlasticRNNCell(I, N, impl="fused", **options).double()
    cell.load_state_dict(rnn.state_dict())
    x = torch.randn(5, 2, I, dtype=torch.float64)
    out, state = rnn(x)
    cell_state = None
    for t in range(5):
        h, cell_state = cell(x[t], cell_state)
        torch.testing.assert_close(h, out[t], **TOL[torch.float64])
    torch.testing.assert_close(cell_state.hebb, state.hebb, **TOL[torch.float64])


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("options", COMPARE_OPTIONS + [dict(plastic=False)], ids=opt_id)
def test_rollout_step_equals_rnn(options, impl):
    """rollout_step, step after step from None, gives the sequence forward's outputs,
    modulation and final traces (updated in place in the state it returns), without autograd."""
    rnn = make(bp.PlasticRNN, options, impl=impl)
    x = torch.randn(5, 2, I, dtype=torch.float64)
    out, state, m = rnn(x, return_modulation=True)
    roll = None
    for t in range(5):
        h, roll, m_t = rnn.rollout_step(x[t], roll, return_modulation=True)
        assert not h.requires_grad
        torch.testing.assert_close(h, out[t], **TOL[torch.float64])
        assert (m_t is None) == (m is None)
        if m is not None:
            torch.testing.assert_close(m_t, m[t], **TOL[torch.float64])
    assert isinstance(roll, bp.RolloutState)
    for a, e in zip(roll[:3], state):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **TOL[torch.float64])


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
@pytest.mark.parametrize("options", COMPARE_OPTIONS + [dict(plastic=False)], ids=opt_id)
def test_recorded_rollout_replay_equals_forward(options, cls, impl):
    """A recorded rollout's replay gives the layer's own forward: out, m and every gradient."""
    layer = make(cls, options, impl=impl)
    x = torch.randn(7, 2, I, dtype=torch.float64)
    weights = torch.randn(7, 2, N, dtype=torch.float64)
    rollout = layer.recorded_rollout(2, 7, x)
    for t in range(7):
        h, m = rollout.step(x[t])
        assert not h.requires_grad
    results = []
    for run in (rollout.replay, rollout._forward):
        layer.zero_grad()
        out, m = run(x)
        ((out * weights).sum() + (0 if m is None else m.pow(2).sum())).backward()
        results.append((out, m, grads_of(layer)))
    (out_a, m_a, grads_a), (out_e, m_e, grads_e) = results
    torch.testing.assert_close(out_a, out_e, **TOL[torch.float64])
    assert (
        (m_a is None)
        == (m_e is None)
        == (options.get("modulation", "fanout") == "none" or options.get("plastic") is False)
    )
    if m_e is not None:
        torch.testing.assert_close(m_a, m_e, **TOL[torch.float64])
    assert_dicts_close(grads_a, grads_e, **TOL[torch.float64])


@pytest.mark.parametrize(
    "options", [dict(rule="retroactive"), dict(modulation="none"), dict(plastic=False)], ids=opt_id
)
def test_recorded_rollout_reusing_buffers(options):
    """A rollout that takes over an earlier one's buffers gives the same results as a fresh one,
    shares its memory, and leaves the earlier one unusable."""
    layer = make(bp.PlasticRNN, options, impl="fused")
    x = torch.randn(7, 2, I, dtype=torch.float64)
    results = []
    earlier = layer.recorded_rollout(2, 7, x)
    for _ in range(7):
        earlier.step(torch.randn(2, I, dtype=torch.float64))  # other inputs, other traces
    earlier.replay(earlier._inputs.clone())[0].sum().backward()
    old_out = None if earlier._record is None else earlier._record.out.data_ptr()
    old_inputs = earlier._inputs.data_ptr()
    for reuse in (None, earlier):
        rollout = layer.recorded_rollout(2, 7, x, reuse=reuse)
        for t in range(7):
            rollout.step(x[t])
        layer.zero_grad()
        out, m = rollout.replay(x)
        (out.pow(2).sum() + (0 if m is None else m.sum())).backward()
        results.append((out, m, grads_of(layer)))
    assert rollout._inputs.data_ptr() == old_inputs
    assert old_out is None or rollout._record.out.data_ptr() == old_out
    (out_a, m_a, grads_a), (out_e, m_e, grads_e) = results
    torch.testing.assert_close(out_a, out_e, rtol=0, atol=0)
    assert (m_a is None) == (m_e is None)
    if m_e is not None:
        torch.testing.assert_close(m_a, m_e, rtol=0, atol=0)
    assert_dicts_close(grads_a, grads_e, rtol=0, atol=0)
    for method, args in (("step", (x[0],)), ("replay", (x,))):
        with pytest.raises(ValueError, match=f"{method}: this rollout's buffers went to a newer"):
            getattr(earlier, method)(*args)
    with pytest.raises(ValueError, match="reuse must be None or a RecordedRollout"):
        layer.recorded_rollout(2, 7, x, reuse="previous")


def test_recorded_rollout_reuse_guards_an_unfinished_backward():
    """Taking over the buffers of a rollout whose replay's graph is still to be backpropagated
    makes that backward raise instead of giving wrong gradients."""
    layer = make(bp.PlasticRNN, dict(rule="retroactive"), impl="fused")
    x = torch.randn(5, 2, I, dtype=torch.float64)
    first = layer.recorded_rollout(2, 5, x)
    for t in range(5):
        first.step(x[t])
    out, _ = first.replay(x)
    second = layer.recorded_rollout(2, 5, x, reuse=first)
    for t in range(5):
        second.step(x[t] + 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_recorded_rollout_refuses_what_it_did_not_record():
    layer = make(bp.PlasticRNN, dict(rule="retroactive"))
    x = torch.randn(3, 2, I, dtype=torch.float64)
    rollout = layer.recorded_rollout(2, 3, x)
    rollout.step(x[0])
    with pytest.raises(ValueError, match="replay: the rollout took 1 of its 3 steps"):
        rollout.replay(x)
    with pytest.raises(ValueError, match=r"step: x must have batch size 2 and dtype torch.float64"):
        rollout.step(x[1, :1])
    with pytest.raises(ValueError, match=r"input must have shape \(B, input_size\)"):
        rollout.step(x[1, :, :-1])
    rollout.step(x[1])
    rollout.step(x[2])
    with pytest.raises(ValueError, match="step: the rollout's 3 steps are all taken"):
        rollout.step(x[0])
    with pytest.raises(ValueError, match="replay: x differs from the inputs"):
        rollout.replay(x + 1)
    with torch.no_grad():
        layer.w.add_(0.1)  # as an optimizer step would
    with pytest.raises(RuntimeError, match="replay: the layer's parameters changed"):
        rollout.replay(x)
    for steps in (0, True):
        with pytest.raises(ValueError, match=f"steps must be an int >= 1, got {steps}"):
            layer.recorded_rollout(2, steps, x)
    for batch_size in (0, True):
        with pytest.raises(ValueError, match=f"batch_size must be an int >= 1, got {batch_size}"):
            layer.recorded_rollout(batch_size, 3, x)
    for like, got in ((None, "NoneType"), (x.long(), "torch.int64")):
        with pytest.raises(ValueError, match=f"like must be a floating-point tensor .*, got {got}"):
            layer.recorded_rollout(2, 3, like)


def test_rollout_step_leaves_a_given_state_alone():
    """From a PlasticState (e.g. the end of a forward), the traces are copied, not overwritten;
    the results are those of the cell."""
    cell = make(bp.PlasticRNNCell, dict(rule="retroactive", n_modulators=2))
    x = torch.randn(2, 2, I, dtype=torch.float64)
    _, state = cell(x[0])
    state = bp.PlasticState(*(t.detach() for t in state))
    before = [t.clone() for t in state]
    h, roll = cell.rollout_step(x[1], state)
    h_cell, cell_state = cell(x[1], state)
    for a, e in zip(state, before):
        assert torch.equal(a, e)
    torch.testing.assert_close(h, h_cell.detach(), **TOL[torch.float64])
    torch.testing.assert_close(roll.hebb, cell_state.hebb.detach(), **TOL[torch.float64])


def test_rollout_step_checks_input_and_state():
    rnn = make(bp.PlasticRNN, dict(rule="retroactive"))
    with pytest.raises(ValueError, match=r"input must have shape \(B, input_size\)"):
        rnn.rollout_step(torch.randn(3, 2, I, dtype=torch.float64))
    with pytest.raises(ValueError, match="state.hebb must have shape"):
        rnn.rollout_step(
            torch.randn(2, I, dtype=torch.float64),
            bp.RolloutState(
                torch.zeros(2, N, dtype=torch.float64),
                torch.zeros(2, N, N + 1, dtype=torch.float64),
            ),
        )
    h = torch.zeros(2, N, dtype=torch.float64)
    for state in ("state", bp.PlasticLSTMState(h, h)):
        with pytest.raises(ValueError, match=r"state must be a PlasticState\(h, hebb, elig\)"):
            rnn.rollout_step(torch.randn(2, I, dtype=torch.float64), state)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_state_none_equals_zeros(cls, impl):
    module = make(cls, dict(rule="retroactive", n_modulators=2), impl=impl)
    x = torch.randn(*((3,) if cls is bp.PlasticRNN else ()), 2, I, dtype=torch.float64)
    out_none, state_none = module(x)
    zeros = bp.PlasticState(
        torch.zeros(2, N, dtype=torch.float64),
        torch.zeros(2, N, N, dtype=torch.float64),
        torch.zeros(2, N, N, dtype=torch.float64),
    )
    out_zeros, state_zeros = module(x, zeros)
    assert torch.equal(out_none, out_zeros)
    for a, e in zip(state_none, state_zeros):
        assert torch.equal(a, e)
    nonzero = bp.PlasticState(*(t + 0.1 for t in zeros))
    assert not torch.allclose(module(x, nonzero)[0], out_zeros)  # the state is really used


@pytest.mark.parametrize("plastic", [True, False])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_state_continues_across_calls(impl, plastic):
    rnn = make(bp.PlasticRNN, dict(rule="retroactive", n_modulators=2, plastic=plastic), impl=impl)
    x = torch.randn(6, 2, I, dtype=torch.float64)
    out, state = rnn(x)
    out1, state1 = rnn(x[:4])
    out2, state2 = rnn(x[4:], state1)
    torch.testing.assert_close(torch.cat([out1, out2]), out, **TOL[torch.float64])
    for a, e in zip(state2, state):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **TOL[torch.float64])
    torch.testing.assert_close(state.h, out[-1], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_state_returned_is_differentiable(impl):
    """Truncated BPTT the other way round: gradients flow from the second half into the first."""
    rnn = make(bp.PlasticRNN, dict(rule="clip"), impl=impl)
    x = torch.randn(6, 2, I, dtype=torch.float64, requires_grad=True)
    _, state1 = rnn(x[:3])
    out2, _ = rnn(x[3:], state1)
    out2.sum().backward()
    assert x.grad[:3].abs().sum() > 0


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("modulation", ["fanout", "none"])
def test_batch_first(impl, modulation):
    options = dict(modulation=modulation, n_modulators=2 if modulation == "fanout" else 1)
    rnn = make(bp.PlasticRNN, options, impl=impl)
    rnn_bf = make(bp.PlasticRNN, options, impl=impl, batch_first=True)
    rnn_bf.load_state_dict(rnn.state_dict())
    x = torch.randn(5, 3, I, dtype=torch.float64)
    out, state, m = rnn(x, return_modulation=True)
    out_bf, state_bf, m_bf = rnn_bf(x.transpose(0, 1), return_modulation=True)
    assert out_bf.shape == (3, 5, N)
    torch.testing.assert_close(out_bf, out.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(state_bf.hebb, state.hebb, rtol=0, atol=0)
    if modulation == "none":
        assert m is None and m_bf is None
    else:
        assert m_bf.shape == (3, 5, 2)
        torch.testing.assert_close(m_bf, m.transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_return_modulation(cls):
    x = torch.randn(*((5,) if cls is bp.PlasticRNN else ()), 3, I, dtype=torch.float64)
    lead = (5, 3) if cls is bp.PlasticRNN else (3,)
    for modulation, k, want in (("none", 1, None), ("simple", 1, 1), ("fanout", 3, 3)):
        module = make(cls, dict(modulation=modulation, n_modulators=k))
        out_plain, _ = module(x)
        out, _, m = module(x, return_modulation=True)
        assert torch.equal(out, out_plain)
        if want is None:
            assert m is None
        else:
            assert m.shape == (*lead, want)
            assert m.abs().max() < 1  # tanh of the modulator readout
    out, _, m = cls(I, N, plastic=False).double()(x, return_modulation=True)
    assert m is None


# ---------------------------------------------------------------------------------------------
# plastic=False: the ordinary tanh RNN


def hand_written_rnn(module, x, h):
    outs = []
    for x_t in x:
        h = torch.tanh(x_t @ module.i2h.weight.T + module.i2h.bias + h @ module.w)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_non_plastic_rnn_matches_hand_written(impl):
    rnn = make(bp.PlasticRNN, {}, impl=impl, plastic=False)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    h0 = torch.randn(3, N, dtype=torch.float64)
    out, state = rnn(x, bp.PlasticState(h0))
    out.sum().backward()
    grads = grads_of(rnn)
    rnn.zero_grad()
    expected = hand_written_rnn(rnn, x, h0)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    assert state.hebb is None and state.elig is None
    torch.testing.assert_close(state.h, expected[-1], **TOL[torch.float64])
    assert_dicts_close(grads, grads_of(rnn), **TOL[torch.float64])


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_non_plastic_cell_matches_hand_written(impl):
    cell = make(bp.PlasticRNNCell, {}, impl=impl, plastic=False)
    x = torch.randn(3, I, dtype=torch.float64)
    h0 = torch.randn(3, N, dtype=torch.float64)
    h, state = cell(x, bp.PlasticState(h0))
    torch.testing.assert_close(
        h, hand_written_rnn(cell, x.unsqueeze(0), h0)[0], **TOL[torch.float64]
    )
    assert state.hebb is None


# ---------------------------------------------------------------------------------------------
# Dtypes, devices and serialisation


@pytest.mark.parametrize(
    "cls,options",
    [(bp.PlasticRNN, {}), (bp.PlasticLSTM, dict(modulator_input="c"))],
    ids=["rnn", "lstm"],
)
def test_float32_module_fused_matches_reference(cls, options):
    torch.manual_seed(0)
    layer = cls(I, N, rule="retroactive", n_modulators=2, impl="fused", **options)
    x = torch.randn(5, 3, I)
    out_f, state_f = layer(x)
    assert out_f.dtype == torch.float32
    layer.impl = "reference"
    out_r, state_r = layer(x)  # the baseline of float32 rounding
    out_e, state_e = copy.deepcopy(layer).double()(x.double())
    for name, a, e, b in zip(
        ("out", *state_f._fields), (out_f, *state_f), (out_e, *state_e), (out_r, *state_r)
    ):
        assert_tensor_close(a, e, name, torch.float32, b)


def test_auto_falls_back_to_reference_for_unsupported_dtype():
    """impl='auto' runs the reference where there are no fused kernels (bfloat16 on CPU)."""
    torch.manual_seed(0)
    rnn = bp.PlasticRNN(I, N).to(torch.bfloat16)
    x = torch.randn(3, 2, I, dtype=torch.bfloat16)
    out_auto, _ = rnn(x)
    rnn.impl = "reference"
    out_ref, _ = rnn(x)
    assert out_auto.dtype == torch.bfloat16
    assert torch.equal(out_auto, out_ref)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell])
def test_state_dict_round_trip(cls):
    options = dict(alpha="neuron", modulation="fanout", rule="retroactive", n_modulators=2)
    source = make(cls, options, seed=1)
    target = make(cls, options, seed=2)
    x = torch.randn(*((4,) if cls is bp.PlasticRNN else ()), 2, I, dtype=torch.float64)
    assert not torch.equal(source(x)[0], target(x)[0])
    state = source.state_dict()
    assert set(state) == set(
        expected_param_shapes(options["alpha"], options["modulation"], options["rule"], 2, "scalar")
    )
    target.load_state_dict(state)
    assert torch.equal(source(x)[0], target(x)[0])
    with pytest.raises(RuntimeError, match="Missing key"):
        make(cls, dict(options, rule="clip")).load_state_dict(
            make(cls, dict(options, modulation="none", rule="clip")).state_dict()
        )


def test_extra_repr_names_the_options():
    text = repr(bp.PlasticRNN(I, N, alpha="neuron", modulation="simple", rule="oja", clip=1.5))
    for part in ("alpha='neuron'", "modulation='simple'", "rule='oja'", "clip=1.5"):
        assert part in text
    assert "plastic=False" in repr(bp.PlasticRNNCell(I, N, plastic=False))
