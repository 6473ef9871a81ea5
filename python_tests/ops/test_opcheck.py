"""torch.library.opcheck on the registered ops (schema, fake implementation, autograd
registration, AOT dispatch) and torch.compile smoke tests of the modules."""

import pytest
import torch

import backpropamine_cuda as bp

from helpers import LSTM_INPUTS, RNN_INPUTS, TOL, lstm_inputs, rnn_inputs

OPS = torch.ops.backpropamine
# opcheck's internals (torch.jit) warn about their own deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


@pytest.fixture(autouse=True)
def _ops_loaded(fused_cpu):
    """torch.ops.backpropamine exists once the fused module has loaded the extension."""


def raw_args(inputs, names, options, requires_grad=True):
    """The op's positional arguments: the tensors in `names` order, then the options."""
    return [
        None if inputs[k] is None else inputs[k].clone().requires_grad_(requires_grad)
        for k in names
    ] + list(options)


def raw_rnn_args(inputs, rule, clip, requires_grad=True):
    return raw_args(inputs, RNN_INPUTS, (rule, clip), requires_grad)


RNN_CONFIGS = [
    ("full", "fanout3", "retroactive", torch.float64),
    ("neuron", "none_full", "clip", torch.float64),
    ("scalar", "none_scalar", "oja", torch.float32),
    ("full", "simple", "softclip", torch.float64),
    ("neuron", "fanout1", "decay", torch.float32),
    ("scalar", "simple", "clip_on_read", torch.float64),
]
RNN_IDS = ["-".join(str(v).replace("torch.", "") for v in c) for c in RNN_CONFIGS]


@pytest.mark.parametrize("alpha,modulation,rule,dtype", RNN_CONFIGS, ids=RNN_IDS)
def test_opcheck_sequence(alpha, modulation, rule, dtype):
    inputs = rnn_inputs(alpha, modulation, rule, T=3, B=2, N=5, dtype=dtype)
    args = raw_rnn_args(inputs, rule, 0.5) + [2]
    torch.library.opcheck(OPS.plastic_rnn_sequence.default, args)


@pytest.mark.parametrize("alpha,modulation,rule,dtype", RNN_CONFIGS, ids=RNN_IDS)
def test_opcheck_step(alpha, modulation, rule, dtype):
    inputs = rnn_inputs(alpha, modulation, rule, B=2, N=5, dtype=dtype)
    torch.library.opcheck(OPS.plastic_rnn_step.default, raw_rnn_args(inputs, rule, 0.5))


@pytest.mark.parametrize("alpha,modulation,rule,dtype", RNN_CONFIGS[:2], ids=RNN_IDS[:2])
def test_opcheck_clamp(alpha, modulation, rule, dtype):
    inputs = rnn_inputs(alpha, modulation, rule, T=3, B=2, N=5, dtype=dtype)
    clamp = torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    torch.library.opcheck(
        OPS.plastic_rnn_sequence.default, raw_rnn_args(inputs, rule, 0.5) + [2, clamp]
    )
    step_inputs = dict(inputs, x=inputs["x"][0])
    torch.library.opcheck(
        OPS.plastic_rnn_step.default, raw_rnn_args(step_inputs, rule, 0.5) + [clamp[0]]
    )


@pytest.mark.parametrize("with_drive", [False, True], ids=["first_step", "with_drive"])
@pytest.mark.parametrize("alpha,modulation,rule,dtype", RNN_CONFIGS, ids=RNN_IDS)
def test_opcheck_rollout_step(alpha, modulation, rule, dtype, with_drive):
    """No autograd (it mutates hebb and elig): the inputs do not require grad."""
    inputs = rnn_inputs(alpha, modulation, rule, B=2, N=5, dtype=dtype)
    x, h, *rest = raw_rnn_args(inputs, rule, 0.5, requires_grad=False)
    u = torch.randn_like(x) if with_drive else None
    torch.library.opcheck(OPS.plastic_rnn_rollout_step.default, [x, u, h, *rest])
    hebb, elig = rest[0], rest[1]
    outs = [torch.empty_like(hebb), None if elig is None else torch.empty_like(elig)]
    torch.library.opcheck(OPS.plastic_rnn_rollout_step.default, [x, u, h, *rest, None, *outs])


@pytest.mark.parametrize("alpha_shape", [(4, 5), (5,), ()], ids=["full", "neuron", "scalar"])
def test_opcheck_matvec(alpha_shape):
    args = [
        torch.randn(s, dtype=torch.float64, requires_grad=True)
        for s in ((3, 4), (4, 5), alpha_shape, (3, 4, 5))
    ]
    torch.library.opcheck(OPS.plastic_matvec.default, args)


@pytest.mark.parametrize("eta_shape", [(3, 1, 5), (1, 4, 5)], ids=["per_post", "per_connection"])
@pytest.mark.parametrize(
    "rule", ["clip", "softclip", "decay", "oja", "retroactive", "clip_on_read"]
)
def test_opcheck_hebb_update(rule, eta_shape):
    B, P, N = 3, 4, 5
    t = lambda *s: torch.randn(s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    retro = rule == "retroactive"
    args = [
        t(B, P, N),
        t(B, P),
        t(B, N),
        t(*eta_shape),
        t(B, P, N) if retro else None,
        torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if retro else None,
        rule,
        0.5,
    ]
    torch.library.opcheck(OPS.hebb_update.default, args)


@pytest.mark.parametrize("alpha,modulation,rule,dtype", RNN_CONFIGS, ids=RNN_IDS)
def test_opcheck_sequence_backward(alpha, modulation, rule, dtype):
    """The backward ops' schemas and fake implementations (used by torch.compile's backward)."""
    inputs = rnn_inputs(alpha, modulation, rule, T=3, B=2, N=5, dtype=dtype)
    out, hebb_T, elig_T, m, eta_seq, ckpt_h, ckpt_e = OPS.plastic_rnn_sequence(
        *raw_rnn_args(inputs, rule, 0.5, False), 2
    )
    retro, modulated = rule == "retroactive", not modulation.startswith("none")
    grads = [
        torch.randn_like(out),
        torch.randn_like(hebb_T),
        torch.randn_like(elig_T) if retro else None,
        torch.randn_like(m) if modulated else None,
    ]
    params = [inputs[k] for k in RNN_INPUTS[1:]]
    torch.library.opcheck(
        OPS.plastic_rnn_sequence_backward.default,
        [*grads, *params, rule, 0.5, out, m, eta_seq, ckpt_h, ckpt_e, 2],
    )


@pytest.mark.parametrize("alpha,modulation,rule,dtype", RNN_CONFIGS, ids=RNN_IDS)
def test_opcheck_step_backward(alpha, modulation, rule, dtype):
    inputs = rnn_inputs(alpha, modulation, rule, B=2, N=5, dtype=dtype)
    h_new, hebb_new, elig_new, m, eta_t = OPS.plastic_rnn_step(
        *raw_rnn_args(inputs, rule, 0.5, False)
    )
    retro, modulated = rule == "retroactive", not modulation.startswith("none")
    grads = [
        torch.randn_like(h_new),
        None,
        torch.randn_like(elig_new) if retro else None,
        torch.randn_like(m) if modulated else None,
    ]
    params = [inputs[k] for k in RNN_INPUTS[1:]]
    torch.library.opcheck(
        OPS.plastic_rnn_step_backward.default, [*grads, *params, rule, 0.5, h_new, m, eta_t]
    )


# Every modulator_input and post_input ("u" saves a fifth gate slot: the fake must agree).
LSTM_CONFIGS = [
    (*c, mi, pi)
    for c, mi, pi in zip(
        RNN_CONFIGS, ("h", "c", "h_prev", "h_prev", "h"), ("g", "u", "c", "h", "u")
    )
]
LSTM_IDS = [f"{i}-{c[-2]}-{c[-1]}" for i, c in zip(RNN_IDS, LSTM_CONFIGS)]
LSTM_PARAMS = "alpha,modulation,rule,dtype,modulator_input,post_input"


@pytest.mark.parametrize(LSTM_PARAMS, LSTM_CONFIGS, ids=LSTM_IDS)
def test_opcheck_lstm_sequence_and_backward(
    alpha, modulation, rule, dtype, modulator_input, post_input
):
    inputs = lstm_inputs(alpha, modulation, rule, T=3, B=2, N=5, dtype=dtype)
    options = (rule, 0.5, modulator_input)
    forward_options = (*options, 2, post_input)
    torch.library.opcheck(
        OPS.plastic_lstm_sequence.default, raw_args(inputs, LSTM_INPUTS, forward_options)
    )
    out, c_seq, hebb_T, elig_T, m, eta_seq, gates, ckpt_h, ckpt_e = OPS.plastic_lstm_sequence(
        *raw_args(inputs, LSTM_INPUTS, forward_options, False)
    )
    assert gates.shape[1] == (5 if post_input == "u" else 4)
    retro, modulated = rule == "retroactive", not modulation.startswith("none")
    grads = [
        torch.randn_like(out),
        None,
        torch.randn_like(hebb_T),
        torch.randn_like(elig_T) if retro else None,
        torch.randn_like(m) if modulated else None,
    ]
    params = [inputs[k] for k in LSTM_INPUTS[1:]]
    torch.library.opcheck(
        OPS.plastic_lstm_sequence_backward.default,
        [*grads, *params, *options, out, c_seq, m, eta_seq, gates, ckpt_h, ckpt_e, 2, post_input],
    )


@pytest.mark.parametrize(LSTM_PARAMS, LSTM_CONFIGS, ids=LSTM_IDS)
def test_opcheck_lstm_step_and_backward(
    alpha, modulation, rule, dtype, modulator_input, post_input
):
    inputs = lstm_inputs(alpha, modulation, rule, B=2, N=5, dtype=dtype)
    options = (rule, 0.5, modulator_input, post_input)
    torch.library.opcheck(OPS.plastic_lstm_step.default, raw_args(inputs, LSTM_INPUTS, options))
    h_new, c_new, hebb_new, elig_new, m, eta_t, gates = OPS.plastic_lstm_step(
        *raw_args(inputs, LSTM_INPUTS, options, False)
    )
    retro, modulated = rule == "retroactive", not modulation.startswith("none")
    grads = [
        None,
        torch.randn_like(c_new),
        torch.randn_like(hebb_new),
        torch.randn_like(elig_new) if retro else None,
        torch.randn_like(m) if modulated else None,
    ]
    params = [inputs[k] for k in LSTM_INPUTS[1:]]
    torch.library.opcheck(
        OPS.plastic_lstm_step_backward.default,
        [*grads, *params, *options[:3], h_new, c_new, m, eta_t, gates, post_input],
    )


def test_opcheck_matvec_backward():
    x, w, alpha, hebb = (
        torch.randn(s, dtype=torch.float64) for s in ((3, 4), (4, 5), (5,), (3, 4, 5))
    )
    torch.library.opcheck(
        OPS.plastic_matvec_backward.default,
        [torch.randn(3, 5, dtype=torch.float64), x, w, alpha, hebb],
    )


@pytest.mark.parametrize("rule", ["clip", "retroactive"])
def test_opcheck_hebb_update_backward(rule):
    B, P, N = 3, 4, 5
    t = lambda *s: torch.randn(s, dtype=torch.float64)  # noqa: E731
    retro = rule == "retroactive"
    elig, rate = (t(B, P, N), torch.tensor(0.3, dtype=torch.float64)) if retro else (None, None)
    torch.library.opcheck(
        OPS.hebb_update_backward.default,
        [
            t(B, P, N),
            t(B, P, N) if retro else None,
            t(B, P, N),
            t(B, P),
            t(B, N),
            t(B, 1, N),
            elig,
            rate,
            rule,
            0.5,
        ],
    )


# ---------------------------------------------------------------------------------------------
# torch.compile


def eager_and_compiled(module, x, backend, **compile_kwargs):
    """Forward + backward of `module` eagerly and compiled: (out, hebb, grads) for each."""
    results = []
    for fn in (module, torch.compile(module, backend=backend, **compile_kwargs)):
        module.zero_grad()
        out, state = fn(x)
        (out.square().sum() + (state.hebb * state.hebb.flip(-1)).sum()).backward()
        results.append(
            (
                out.detach(),
                state.hebb.detach(),
                {k: p.grad.clone() for k, p in module.named_parameters()},
            )
        )
    return results


def assert_same_results(eager, compiled, dtype):
    (out_e, hebb_e, grads_e), (out_c, hebb_c, grads_c) = eager, compiled
    torch.testing.assert_close(out_c, out_e, **TOL[dtype])
    torch.testing.assert_close(hebb_c, hebb_e, **TOL[dtype])
    assert grads_c.keys() == grads_e.keys()
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], **TOL[dtype], msg=k)


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha="full", modulation="fanout", n_modulators=2, rule="retroactive"),
        dict(alpha="neuron", modulation="none", eta_shape="full", rule="clip"),
        dict(alpha="scalar", modulation="simple", rule="oja", checkpoint_every=2),
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_compile_aot_eager(options):
    torch._dynamo.reset()
    rnn = bp.PlasticRNN(4, 6, impl="fused", **options).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    eager, compiled = eager_and_compiled(rnn, x, "aot_eager", fullgraph=True)
    assert_same_results(eager, compiled, torch.float64)


@pytest.mark.parametrize("modulator_input,post_input", [("h", "g"), ("c", "c"), ("h_prev", "u")])
def test_compile_lstm_aot_eager(modulator_input, post_input):
    torch._dynamo.reset()
    lstm = bp.PlasticLSTM(
        4,
        6,
        impl="fused",
        modulator_input=modulator_input,
        post_input=post_input,
        rule="retroactive",
        checkpoint_every=2,
    ).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    eager, compiled = eager_and_compiled(lstm, x, "aot_eager", fullgraph=True)
    assert_same_results(eager, compiled, torch.float64)


def test_compile_inductor():
    """The default backend (inductor generates and compiles C++ for the surrounding ops)."""
    torch._dynamo.reset()
    rnn = bp.PlasticRNN(4, 6, impl="fused", n_modulators=2, rule="retroactive")
    x = torch.randn(5, 3, 4)
    eager, compiled = eager_and_compiled(rnn, x, "inductor", fullgraph=True)
    assert_same_results(eager, compiled, torch.float32)


def test_compile_cell_loop_aot_eager():
    torch._dynamo.reset()
    cell = bp.PlasticRNNCell(4, 6, impl="fused", alpha="neuron", rule="softclip").double()
    xs = torch.randn(4, 3, 4, dtype=torch.float64)

    def episode(xs):
        state, outs = None, []
        for x in xs:
            h, state = cell(x, state)
            outs.append(h)
        return torch.stack(outs), state.hebb

    results = []
    for fn in (episode, torch.compile(episode, backend="aot_eager", fullgraph=True)):
        cell.zero_grad()
        out, hebb = fn(xs)
        (out.sum() + hebb.square().sum()).backward()
        results.append(
            (out.detach(), hebb.detach(), {k: p.grad.clone() for k, p in cell.named_parameters()})
        )
    assert_same_results(*results, torch.float64)
