"""The two CPU paths of the RNN and LSTM sequence ops (csrc/sequence_pass.h): whole sequences per
group of samples, and step by step. Every op test in test_rnn_ops.py, test_lstm_ops.py,
test_gradcheck.py and test_determinism.py already runs on both (fixture `sequence_path`); this
file checks the choice between them, sizes that split the batch into several groups (a partial
last one), a forward on one path with the backward on the other, and float32 at an RL agent's
width and at the paper's small PTB layer's."""

import pytest
import torch

from backpropamine_cuda import fused, reference

from helpers import (
    RULE_CONFIG,
    RULES,
    assert_results_close,
    compare_with_reference,
    lstm_inputs,
    rnn_inputs,
    run_forward_backward,
    upcast,
)

CLIP = 0.5
ENV = "BACKPROPAMINE_SEQUENCE_PATH"
LSTM_OUTPUTS = ("out", "c_T", "hebb_T", "elig_T", "m")


def test_auto_choice_follows_the_sizes(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    # The RL agents' sizes and the PTB layer's (B = 6, N = 1149): as many groups as the
    # step-by-step path has tasks, so whole sequences.
    for B, N in ((30, 100), (30, 200), (6, 1149), (1, 100)):
        assert fused.sequence_path(B, N) == "whole", (B, N)
    assert fused.sequence_path(30, 400, "retroactive", torch.float64) == "whole"
    # A few samples of a wide layer: the step-by-step path also splits the columns.
    for B, N in ((1, 1149), (2, 1149), (3, 600)):
        assert fused.sequence_path(B, N) == "steps", (B, N)
    # The LSTM as the RNN where its h2g (3N x N) stays in cache, else step by step: its h2g is
    # read once per group and step on the whole-sequence path.
    assert fused.sequence_path(30, 100, cell="lstm") == "whole"
    assert fused.sequence_path(6, 1149, cell="lstm") == "steps"
    assert fused.sequence_path(1, 1149, cell="lstm") == "steps"
    with pytest.raises(ValueError, match="cell must be 'rnn' or 'lstm', got 'gru'"):
        fused.sequence_path(30, 100, cell="gru")


def test_environment_forces_a_path(monkeypatch):
    for path in ("whole", "steps"):
        monkeypatch.setenv(ENV, path)
        assert fused.sequence_path(1, 1149) == path
        assert fused.sequence_path(30, 100) == path
    monkeypatch.setenv(ENV, "whole")
    assert fused.sequence_path(6, 1149, cell="lstm") == "whole"
    monkeypatch.setenv(ENV, "auto")
    assert fused.sequence_path(30, 100) == "whole"
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(ValueError, match=f"{ENV} must be one of auto, whole, steps, got 'fastest'"):
        fused.sequence_path(30, 100)
    inputs = rnn_inputs("full", "fanout1", "clip", T=2, B=2, N=3)
    with pytest.raises(ValueError, match=ENV):
        fused.plastic_rnn_sequence(**inputs, rule="clip", clip=CLIP)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_several_groups_against_the_reference(monkeypatch, rule, dtype):
    """B = 17: at least 8 groups of up to 3 samples, the last one partial; odd N, T not a multiple
    of the checkpoint interval; clamped neurons."""
    monkeypatch.setenv(ENV, "whole")
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=7, B=17, N=33, dtype=dtype, seed=5)
    clamp = torch.rand(7, 17, 33, generator=torch.Generator().manual_seed(6)) < 0.2
    compare_with_reference(
        reference.plastic_rnn_sequence,
        fused.plastic_rnn_sequence,
        inputs,
        fused_options=dict(checkpoint_every=3),
        rule=rule,
        clip=CLIP,
        clamp=clamp,
    )


# Every modulator input and post-synaptic term with every rule, but Oja's rule with u_t: with the
# unbounded u_t as its post-synaptic term and a negative rate, the trace grows to inf here (in
# the reference too).
LSTM_OPTION_CASES = [
    pytest.param(rule, mi, pi, id=f"{rule}-{mi}-{pi}")
    for rule in RULES
    for mi, pi in (
        ("h", "g"),
        ("c", "u"),
        ("h_prev", "g"),
        ("h_prev", "c"),
        ("c", "h"),
        ("h_prev", "u"),
    )
    if not (rule == "oja" and pi == "u")
]


@pytest.mark.parametrize("rule,modulator_input,post_input", LSTM_OPTION_CASES)
def test_lstm_several_groups_against_the_reference(monkeypatch, rule, modulator_input, post_input):
    """The LSTM's whole-sequence path as the RNN's above: B = 17 in several groups, odd N, T not
    a multiple of the checkpoint interval; every modulator input and Hebbian post-synaptic term.
    Smaller traces and rates than the defaults: Oja's rule at the defaults grows gradients of 1e5
    here, on both paths."""
    monkeypatch.setenv(ENV, "whole")
    alpha, modulation = RULE_CONFIG[rule]
    inputs = lstm_inputs(
        alpha, modulation, rule, T=7, B=17, N=33, seed=5, hebb_scale=0.5, eta_scale=0.2
    )
    compare_with_reference(
        reference.plastic_lstm_sequence,
        fused.plastic_lstm_sequence,
        inputs,
        names=LSTM_OUTPUTS,
        fused_options=dict(checkpoint_every=3),
        rule=rule,
        clip=CLIP,
        modulator_input=modulator_input,
        post_input=post_input,
    )


class Switching:
    """An op whose forward runs on one path; the backward, later, on the other."""

    def __init__(self, op, monkeypatch, forward_path, backward_path):
        self.op, self.monkeypatch = op, monkeypatch
        self.forward_path, self.backward_path = forward_path, backward_path

    def __call__(self, **args):
        self.monkeypatch.setenv(ENV, self.forward_path)
        outputs = self.op(**args)
        self.monkeypatch.setenv(ENV, self.backward_path)
        return outputs


@pytest.mark.parametrize("forward_path,backward_path", [("whole", "steps"), ("steps", "whole")])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_backward_accepts_the_other_paths_forward(
    monkeypatch, kind, rule, forward_path, backward_path
):
    """Both paths store the same checkpoints, so either backward runs on either forward."""
    alpha, modulation = RULE_CONFIG[rule]
    make = rnn_inputs if kind == "rnn" else lstm_inputs
    inputs = make(alpha, modulation, rule, T=6, B=5, N=9, seed=7)
    op = f"plastic_{kind}_sequence"
    kw = dict(rule=rule, clip=CLIP, checkpoint_every=4)
    expected = run_forward_backward(getattr(reference, op), upcast(inputs), rule=rule, clip=CLIP)
    switching = Switching(getattr(fused, op), monkeypatch, forward_path, backward_path)
    assert_results_close(expected, run_forward_backward(switching, inputs, **kw), torch.float64)


@pytest.mark.parametrize("path", ["whole", "steps"])
@pytest.mark.parametrize("rule", RULES)
def test_float32_at_an_rl_size(monkeypatch, rule, path):
    """Float32 at the cue-reward task's width (N = 200), on each path: within the suite's
    norm-wise float32 bound of the float64 reference (helpers.assert_tensor_close)."""
    monkeypatch.setenv(ENV, path)
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(
        alpha,
        modulation,
        rule,
        T=5,
        B=4,
        N=200,
        dtype=torch.float32,
        seed=8,
        hebb_scale=0.1,
        eta_scale=0.05,
    )
    compare_with_reference(
        reference.plastic_rnn_sequence, fused.plastic_rnn_sequence, inputs, rule=rule, clip=CLIP
    )


@pytest.mark.parametrize("modulator_input", ["h", "h_prev"])
@pytest.mark.parametrize("path", ["whole", "steps"])
@pytest.mark.parametrize("rule", RULES)
def test_lstm_float32_at_the_small_ptb_size(monkeypatch, rule, path, modulator_input):
    """Float32 at the width of the paper's small PTB model's layers (N = 200), on each path; their
    modulator reads h_{t-1}."""
    monkeypatch.setenv(ENV, path)
    alpha, modulation = RULE_CONFIG[rule]
    inputs = lstm_inputs(
        alpha,
        modulation,
        rule,
        T=5,
        B=4,
        N=200,
        dtype=torch.float32,
        seed=9,
        hebb_scale=0.1,
        eta_scale=0.05,
    )
    compare_with_reference(
        reference.plastic_lstm_sequence,
        fused.plastic_lstm_sequence,
        inputs,
        names=LSTM_OUTPUTS,
        rule=rule,
        clip=CLIP,
        modulator_input=modulator_input,
    )
