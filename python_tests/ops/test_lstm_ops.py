"""Fused plastic LSTM ops (sequence and step) against the pure-PyTorch reference: forward outputs
and the gradients of every input (x, h, c, the traces, h2g and the plastic parameters), for every
option combination, modulator input and Hebbian post-synaptic term, checkpointing, odd sizes and
float32, on both CPU paths (whole sequences per group of samples, and step by step: fixture
`sequence_path`)."""

import itertools

import pytest
import torch

from backpropamine_cuda import reference

from helpers import (
    CLIP_RULES,
    READ_CLAMP_RULES,
    RULE_CONFIG,
    RULES,
    TOL,
    all_combos,
    clamp_engaged,
    compare_with_reference,
    lstm_inputs,
    read_clamp_engaged,
    run_forward_backward,
)

CLIP = 0.5
SEQ_OUTPUTS = ("out", "c_T", "hebb_T", "elig_T", "m")
STEP_OUTPUTS = ("h_new", "c_new", "hebb_new", "elig_new", "m")
MODULATOR_INPUTS = reference.MODULATOR_INPUTS
POST_INPUTS = reference.POST_INPUTS
pytestmark = pytest.mark.usefixtures("sequence_path")


def compare(
    fused,
    name,
    inputs,
    rule,
    modulator_input,
    *,
    post_input="g",
    use=None,
    requires_grad=True,
    **fused_options,
):
    """fused.<name> against reference.<name> (helpers.compare_with_reference)."""
    names = SEQ_OUTPUTS if name.endswith("sequence") else STEP_OUTPUTS
    return compare_with_reference(
        getattr(reference, name),
        getattr(fused, name),
        inputs,
        names=names,
        fused_options=fused_options,
        rule=rule,
        clip=CLIP,
        modulator_input=modulator_input,
        post_input=post_input,
        use=use,
        requires_grad=requires_grad,
    )


def compare_sequence(fused, inputs, rule, modulator_input="h", **kwargs):
    return compare(fused, "plastic_lstm_sequence", inputs, rule, modulator_input, **kwargs)


def compare_step(fused, inputs, rule, modulator_input="h", **kwargs):
    return compare(fused, "plastic_lstm_step", inputs, rule, modulator_input, **kwargs)


# ---------------------------------------------------------------------------------------------
# Every option combination, both modulator inputs, float64.


@pytest.mark.parametrize("modulator_input", MODULATOR_INPUTS)
@pytest.mark.parametrize("alpha,modulation,rule", all_combos())
def test_sequence_every_option(fused, alpha, modulation, rule, modulator_input):
    inputs = lstm_inputs(alpha, modulation, rule, T=5, B=3, N=7)
    (out, c_T, hebb_T, elig_T, m), grads = compare_sequence(
        fused, inputs, rule, modulator_input, checkpoint_every=2
    )
    assert (m is None) == modulation.startswith("none")
    assert (elig_T is None) == (rule != "retroactive")
    if rule in CLIP_RULES:  # the clamp mask is exercised, not just the interior
        assert clamp_engaged(hebb_T, CLIP)
    if rule in READ_CLAMP_RULES:  # read clamped beyond the bound, the trace itself unbounded
        assert read_clamp_engaged(inputs["hebb"], CLIP) and hebb_T.abs().max() > CLIP
    assert set(grads) == {k for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("modulator_input", MODULATOR_INPUTS)
@pytest.mark.parametrize("alpha,modulation,rule", all_combos())
def test_step_every_option(fused, alpha, modulation, rule, modulator_input):
    inputs = lstm_inputs(alpha, modulation, rule, B=3, N=7, seed=1)
    (h_new, c_new, hebb_new, elig_new, m), _ = compare_step(fused, inputs, rule, modulator_input)
    assert (m is None) == modulation.startswith("none")
    assert (elig_new is None) == (rule != "retroactive")
    if rule in CLIP_RULES:
        assert clamp_engaged(hebb_new, CLIP)
    if rule in READ_CLAMP_RULES:
        assert read_clamp_engaged(inputs["hebb"], CLIP) and hebb_new.abs().max() > CLIP


def test_clip_on_read_step_reads_the_clamped_trace(fused):
    """One step: the outputs are rule clip's from the clamped trace (but for the trace, the
    unclipped update), and the gradient of h_new reaches the trace only inside the bound."""
    rule = "clip_on_read"
    inputs = lstm_inputs("neuron", "fanout3", rule, B=3, N=7, seed=24)
    hebb = inputs["hebb"]
    h_new, c_new, hebb_new, _, m = fused.plastic_lstm_step(**inputs, rule=rule, clip=CLIP)
    h_clip, c_clip, hebb_clip, _, m_clip = fused.plastic_lstm_step(
        **dict(inputs, hebb=hebb.clamp(-CLIP, CLIP)), rule="clip", clip=CLIP
    )
    for a, e in ((h_new, h_clip), (c_new, c_clip), (m, m_clip)):
        torch.testing.assert_close(a, e, **TOL[torch.float64])
    assert hebb_new.abs().max() > CLIP and not torch.allclose(hebb_new, hebb_clip)
    _, grads = run_forward_backward(
        fused.plastic_lstm_step, inputs, use=[0], requires_grad={"hebb"}, rule=rule, clip=CLIP
    )
    beyond = hebb.abs() > CLIP
    assert beyond.any() and (grads["hebb"][beyond] == 0).all()
    assert (grads["hebb"][~beyond] != 0).all()


def test_modulator_input_matters(fused):
    """Modulation from h_t, c_t and h_{t-1} differ (the option is not ignored)."""
    inputs = lstm_inputs("neuron", "fanout1", "clip", T=4, B=2, N=5)
    from_h, from_c, from_h_prev = (
        fused.plastic_lstm_sequence(**inputs, rule="clip", clip=CLIP, modulator_input=mi)
        for mi in ("h", "c", "h_prev")
    )
    assert not torch.allclose(from_h[4], from_c[4])
    assert not torch.allclose(from_h[4], from_h_prev[4])
    # h_prev: step 1's modulator reads h_0
    m_1 = torch.tanh(inputs["h"] @ inputs["h2mod_weight"].T + inputs["h2mod_bias"])
    torch.testing.assert_close(from_h_prev[4][0], m_1, **TOL[torch.float64])


def test_post_input_matters(fused):
    """Each post-synaptic term gives its own trace (the option is not ignored)."""
    inputs = lstm_inputs("neuron", "fanout1", "decay", T=3, B=2, N=5)
    traces = [
        fused.plastic_lstm_sequence(**inputs, rule="decay", clip=CLIP, post_input=pi)[2]
        for pi in POST_INPUTS
    ]
    for k, a in enumerate(traces):
        for b in traces[k + 1 :]:
            assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# post_input with every modulator input and every kind of modulation (the retroactive rule with
# fanout), float64 and float32, odd sizes, checkpointing.

POST_CONFIGS = [
    ("full", "none_full", "clip"),
    ("scalar", "simple", "softclip"),
    ("neuron", "fanout3", "retroactive"),
]


@pytest.mark.parametrize("post_input", POST_INPUTS)
@pytest.mark.parametrize("modulator_input", MODULATOR_INPUTS)
@pytest.mark.parametrize("alpha,modulation,rule", POST_CONFIGS)
def test_sequence_post_input(fused, alpha, modulation, rule, modulator_input, post_input):
    inputs = lstm_inputs(alpha, modulation, rule, T=5, B=3, N=7, seed=13)
    (_, _, hebb_T, _, _), grads = compare_sequence(
        fused, inputs, rule, modulator_input, post_input=post_input, checkpoint_every=2
    )
    if rule in CLIP_RULES:
        assert clamp_engaged(hebb_T, CLIP)
    assert set(grads) == {k for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("post_input", POST_INPUTS)
@pytest.mark.parametrize("modulator_input", MODULATOR_INPUTS)
@pytest.mark.parametrize("alpha,modulation,rule", POST_CONFIGS)
def test_step_post_input(fused, alpha, modulation, rule, modulator_input, post_input):
    inputs = lstm_inputs(alpha, modulation, rule, B=3, N=7, seed=14)
    compare_step(fused, inputs, rule, modulator_input, post_input=post_input)


@pytest.mark.parametrize("post_input", POST_INPUTS)
@pytest.mark.parametrize("modulator_input", MODULATOR_INPUTS)
@pytest.mark.parametrize(
    "sizes", [dict(T=1, B=1, N=1), dict(T=6, B=5, N=33)], ids=["T1B1N1", "T6B5N33"]
)
def test_sequence_post_input_float32_sizes(fused, sizes, modulator_input, post_input):
    rule = "retroactive"
    inputs = lstm_inputs("full", "fanout1", rule, dtype=torch.float32, seed=15, **sizes)
    compare_sequence(
        fused, inputs, rule, modulator_input, post_input=post_input, checkpoint_every=4
    )
    step_inputs = dict(inputs, x=inputs["x"][0])
    compare_step(fused, step_inputs, rule, modulator_input, post_input=post_input)


# ---------------------------------------------------------------------------------------------
# Checkpointing (T = 5; 2**40 and 2**63 - 1: intervals far beyond T, which must neither size
# the backward's buffers nor overflow the count of checkpoints) and odd sizes, including one
# neuron, one sample and one step.


@pytest.mark.parametrize("checkpoint_every", [1, 2, 4, 5, 8, 2**40, 2**63 - 1, None])
@pytest.mark.parametrize("rule", RULES)
def test_sequence_checkpoint_every(fused, rule, checkpoint_every):
    alpha, modulation = RULE_CONFIG[rule]
    inputs = lstm_inputs(alpha, modulation, rule, T=5, B=3, N=7, seed=2)
    compare_sequence(fused, inputs, rule, "c", checkpoint_every=checkpoint_every)


SIZES = [dict(T=T, B=B, N=N) for T, B, N in itertools.product((1, 5), (1, 3), (1, 7, 33))]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sequence_sizes(fused, sizes, rule):
    alpha, modulation = RULE_CONFIG[rule]
    compare_sequence(fused, lstm_inputs(alpha, modulation, rule, seed=3, **sizes), rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("B,N", [(1, 1), (1, 7), (3, 33)])
def test_step_sizes(fused, B, N, rule):
    alpha, modulation = RULE_CONFIG[rule]
    compare_step(fused, lstm_inputs(alpha, modulation, rule, B=B, N=N, seed=4), rule)


def test_sequence_several_column_tiles(fused):
    """N > 64 spans several column tiles of the CPU kernels, B = 17 several batch chunks."""
    inputs = lstm_inputs("full", "fanout3", "retroactive", T=3, B=17, N=70, seed=5)
    compare_sequence(fused, inputs, "retroactive", "c", checkpoint_every=2)


# ---------------------------------------------------------------------------------------------
# float32

F32_CASES = [(*RULE_CONFIG[r], r) for r in RULES] + [
    ("neuron", "fanout1", "clip"),
    ("scalar", "simple", "clip_on_read"),
]


@pytest.mark.parametrize("alpha,modulation,rule", F32_CASES)
def test_sequence_float32(fused, alpha, modulation, rule):
    inputs = lstm_inputs(alpha, modulation, rule, T=5, B=3, N=33, dtype=torch.float32, seed=6)
    compare_sequence(fused, inputs, rule, checkpoint_every=2)


@pytest.mark.parametrize("alpha,modulation,rule", F32_CASES)
def test_step_float32(fused, alpha, modulation, rule):
    inputs = lstm_inputs(alpha, modulation, rule, B=3, N=33, dtype=torch.float32, seed=7)
    compare_step(fused, inputs, rule, "c")


# ---------------------------------------------------------------------------------------------
# Only some outputs in the loss, only some inputs requiring grad.


def _use_cases(names):
    configs = [
        ("full", "fanout3", "retroactive"),
        ("neuron", "none_full", "clip"),
        ("scalar", "simple", "softclip"),
        ("neuron", "fanout1", "clip_on_read"),
    ]
    return [
        pytest.param(a, m, r, k, id=f"{a}-{m}-{r}-{names[k]}")
        for a, m, r in configs
        for k in range(len(names))
        if not (names[k].startswith("elig") and r != "retroactive")
        and not (names[k] == "m" and m.startswith("none"))
    ]


@pytest.mark.parametrize("alpha,modulation,rule,used", _use_cases(SEQ_OUTPUTS))
def test_sequence_single_output_used(fused, alpha, modulation, rule, used):
    inputs = lstm_inputs(alpha, modulation, rule, T=4, B=3, N=7, seed=8)
    _, grads = compare_sequence(fused, inputs, rule, checkpoint_every=2, use=[used])
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("alpha,modulation,rule,used", _use_cases(STEP_OUTPUTS))
def test_step_single_output_used(fused, alpha, modulation, rule, used):
    inputs = lstm_inputs(alpha, modulation, rule, B=3, N=7, seed=9)
    _, grads = compare_step(fused, inputs, rule, "c", use=[used])
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize(
    "wanted",
    [
        {"x"},
        {"c"},
        {"h2g_weight", "w"},
        {"hebb", "elig", "h"},
        {"alpha", "h2g_bias", "elig_rate", "fanout_weight"},
    ],
)
def test_only_some_inputs_require_grad(fused, wanted):
    inputs = lstm_inputs("full", "fanout3", "retroactive", T=4, B=2, N=7, seed=10)
    _, grads = compare_sequence(fused, inputs, "retroactive", requires_grad=wanted)
    assert set(grads) == wanted
    _, grads = compare_step(
        fused, dict(inputs, x=inputs["x"][0]), "retroactive", requires_grad=wanted
    )
    assert set(grads) == wanted


def test_no_input_requires_grad(fused):
    inputs = lstm_inputs("neuron", "fanout1", "clip", T=3, B=2, N=5)
    out = fused.plastic_lstm_sequence(**inputs, rule="clip", clip=CLIP)
    ref = reference.plastic_lstm_sequence(**inputs, rule="clip", clip=CLIP)
    assert not out[0].requires_grad
    for a, e in zip(out, ref):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


@pytest.mark.parametrize(
    "modulator_input,post_input", [(mi, "g") for mi in MODULATOR_INPUTS] + [("h_prev", "u")]
)
def test_sequence_equals_step_loop(fused, modulator_input, post_input):
    rule = "retroactive"
    inputs = lstm_inputs("full", "fanout3", rule, T=5, B=3, N=7, seed=11)
    kw = dict(rule=rule, clip=CLIP, modulator_input=modulator_input, post_input=post_input)
    out, c_T, hebb_T, elig_T, m = fused.plastic_lstm_sequence(**inputs, **kw, checkpoint_every=2)
    state = {k: inputs[k] for k in ("h", "c", "hebb", "elig")}
    params = {k: v for k, v in inputs.items() if k not in state and k != "x"}
    for t in range(5):
        h, c, hebb, elig, m_t = fused.plastic_lstm_step(inputs["x"][t], **state, **params, **kw)
        state = dict(h=h, c=c, hebb=hebb, elig=elig)
        torch.testing.assert_close(h, out[t], **TOL[torch.float64])
        torch.testing.assert_close(m_t, m[t], **TOL[torch.float64])
    for a, e in ((state["c"], c_T), (state["hebb"], hebb_T), (state["elig"], elig_T)):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


def test_non_plastic_limit_is_an_lstm(fused):
    """With alpha = 0 the plastic LSTM is the ordinary LSTM of reference.lstm_step."""
    inputs = lstm_inputs("scalar", "fanout1", "clip", T=4, B=2, N=6, seed=12)
    inputs["alpha"] = torch.zeros((), dtype=torch.float64)
    out, c_T, *_ = fused.plastic_lstm_sequence(**inputs, rule="clip", clip=CLIP)
    h, c = inputs["h"], inputs["c"]
    for t in range(4):
        h, c = reference.lstm_step(
            inputs["x"][t], h, c, inputs["h2g_weight"], inputs["h2g_bias"], inputs["w"]
        )
        torch.testing.assert_close(out[t], h, **TOL[torch.float64])
    torch.testing.assert_close(c_T, c, **TOL[torch.float64])
