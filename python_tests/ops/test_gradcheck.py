"""torch.autograd.gradcheck (float64, tiny sizes) through the fused ops: the hand-written backward
kernels against finite differences of the fused forward.

Finite differences cannot cross the kink of the clamp (or the z = 0 kink of softclip). The clamp
sees the value of an update (clip, softclip, retroactive) or, for clip_on_read, the trace a step
reads. Two regimes:

* "free": clip = 50, far above every trace value, so the clamp is inactive;
* "active": clip = 1 with initial traces ~ N(0, 3^2): many traces saturate. The inputs are
  chosen (first seed that qualifies) so that every pre-clamp value is at least MARGIN away from
  the bound, with some traces beyond it and some inside; the test asserts this of its inputs.
  For softclip a trace that sits on the bound stays exactly on it under a positive push
  (S - c = (H - c)(1 - z / c)), so its active case uses a single step.
"""

from unittest import mock

import pytest
import torch

from backpropamine_cuda import reference

from helpers import CLIP_RULES, READ_CLAMP_RULES, RULES, lstm_inputs, rnn_inputs, valid_combo

# Every test on both paths of the sequence op (conftest.py).
pytestmark = pytest.mark.usefixtures("sequence_path")

MARGIN = 1e-3
CLAMPED_RULES = CLIP_RULES + READ_CLAMP_RULES  # the recurrent ops clamp somewhere


@pytest.fixture(autouse=True)
def _one_thread():
    """gradcheck makes thousands of tiny op calls: run them on one thread so that they do not
    wait on a busy second core (thread counts are covered by test_determinism.py). conftest's
    fixture restores the thread count."""
    torch.set_num_threads(1)


MODULATIONS = ("none_scalar", "none_full", "simple", "fanout3")
ALPHA_FOR = {"none_scalar": "full", "none_full": "neuron", "simple": "scalar", "fanout3": "full"}


def pre_clamp(hebb, pre, post, eta, elig, rule, clip):
    """(pre-clamp value S of one update, kink distance of softclip's z or inf). For clip_on_read S
    is the trace before the update: the one the step reads."""
    if rule in READ_CLAMP_RULES:
        return hebb, float("inf")
    z = eta * (elig if rule == "retroactive" else pre.unsqueeze(2) * post.unsqueeze(1))
    if rule == "softclip":
        return hebb + torch.where(
            z > 0, z * (1 - hebb / clip), z * (1 + hebb / clip)
        ), z.abs().min().item()
    return hebb + z, float("inf")


def clamp_margin(op, inputs, rule, clip, **options):
    """(smallest distance of a pre-clamp value to the bound or of a softclip z to 0, number of
    pre-clamp values beyond the bound, number strictly inside) over every trace update of the
    reference `op` (recorded by wrapping reference.hebb_update)."""
    updates = []
    hebb_update = reference.hebb_update

    def recording(hebb, pre, post, eta, rule, clip, elig=None, elig_rate=None):
        updates.append((hebb, pre, post, eta, elig))
        return hebb_update(hebb, pre, post, eta, rule, clip, elig, elig_rate)

    with mock.patch.object(reference, "hebb_update", recording), torch.no_grad():
        op(**inputs, rule=rule, clip=clip, **options)
    margin, beyond, inside = float("inf"), 0, 0
    if rule in CLAMPED_RULES:
        for update in updates:
            s, z_margin = pre_clamp(*update, rule, clip)
            margin = min(margin, z_margin, (s.abs() - clip).abs().min().item())
            beyond += int((s.abs() > clip).sum())
            inside += int((s.abs() < clip).sum())
    return margin, beyond, inside


def kink_free_inputs(modulation, rule, regime, *, T, lstm=False, **options):
    """Inputs of the given regime ("free" or "active") whose clamp stays MARGIN from its kinks
    (`options`: the op's, such as the LSTM's post_input)."""
    clip = 50.0 if regime == "free" else 1.0
    make = lstm_inputs if lstm else rnn_inputs
    kind = "lstm" if lstm else "rnn"
    op = getattr(reference, f"plastic_{kind}_{'step' if T is None else 'sequence'}")
    for seed in range(20):
        inputs = make(
            ALPHA_FOR[modulation],
            modulation,
            rule,
            T=T,
            B=2,
            N=3,
            seed=seed,
            hebb_scale=1.0 if regime == "free" else 3.0,
        )
        margin, beyond, inside = clamp_margin(op, inputs, rule, clip, **options)
        if margin < MARGIN:
            continue
        if rule in CLAMPED_RULES and regime == "active" and not (beyond and inside):
            continue
        if regime == "free":
            assert beyond == 0
        return inputs, clip
    raise AssertionError(f"no seed gives kink-free inputs for {modulation}, {rule}, {regime}")


def gradcheck_op(fn, inputs, **kwargs):
    names = [k for k, v in inputs.items() if v is not None]

    def call(*tensors):
        outputs = fn(**dict(inputs, **dict(zip(names, tensors))), **kwargs)
        return tuple(o for o in outputs if o is not None)

    leaves = tuple(inputs[k].detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(call, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


CASES = [
    pytest.param(m, r, regime, id=f"{m}-{r}-{regime}")
    for r in RULES
    for m in MODULATIONS
    if valid_combo(m, r)
    for regime in (("free", "active") if r in CLAMPED_RULES else ("free",))
]


@pytest.mark.parametrize("modulation,rule,regime", CASES)
def test_gradcheck_sequence(fused, modulation, rule, regime):
    T = 1 if (rule == "softclip" and regime == "active") else 3
    inputs, clip = kink_free_inputs(modulation, rule, regime, T=T)
    gradcheck_op(fused.plastic_rnn_sequence, inputs, rule=rule, clip=clip, checkpoint_every=2)


@pytest.mark.parametrize("modulation,rule,regime", CASES)
def test_gradcheck_step(fused, modulation, rule, regime):
    inputs, clip = kink_free_inputs(modulation, rule, regime, T=None)
    gradcheck_op(fused.plastic_rnn_step, inputs, rule=rule, clip=clip)


@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_clamp(fused, rule):
    """Sequence and step with some neurons clamped to x (free regime: no trace at the bound)."""
    modulation = "fanout3" if rule == "retroactive" else "none_scalar"
    inputs, clip = kink_free_inputs(modulation, rule, "free", T=3)
    clamp = torch.rand(inputs["x"].shape, generator=torch.Generator().manual_seed(0)) < 0.5
    gradcheck_op(
        fused.plastic_rnn_sequence, inputs, rule=rule, clip=clip, checkpoint_every=2, clamp=clamp
    )
    gradcheck_op(
        fused.plastic_rnn_step, dict(inputs, x=inputs["x"][1]), rule=rule, clip=clip, clamp=clamp[1]
    )


@pytest.mark.parametrize("modulator_input", ["h", "c"])
@pytest.mark.parametrize("modulation,rule,regime", CASES)
def test_gradcheck_lstm_sequence(fused, modulation, rule, regime, modulator_input):
    T = 1 if (rule == "softclip" and regime == "active") else 3
    inputs, clip = kink_free_inputs(modulation, rule, regime, T=T, lstm=True)
    gradcheck_op(
        fused.plastic_lstm_sequence,
        inputs,
        rule=rule,
        clip=clip,
        modulator_input=modulator_input,
        checkpoint_every=2,
    )


@pytest.mark.parametrize("modulation,rule,regime", CASES)
def test_gradcheck_lstm_step(fused, modulation, rule, regime):
    inputs, clip = kink_free_inputs(modulation, rule, regime, T=None, lstm=True)
    gradcheck_op(fused.plastic_lstm_step, inputs, rule=rule, clip=clip, modulator_input="c")


# Every pair of post_input and modulator_input, each with one of modulations none, simple and
# fanout (with the retroactive rule, its clamp active). The clip rule's active regime over three
# steps finds no inputs with post_input "u": u_t is small, so a trace clamped at the bound in one
# step stays within MARGIN of it in the next.
LSTM_OPTION_CONFIGS = (
    ("none_full", "clip", "free"),
    ("simple", "oja", "free"),
    ("fanout3", "retroactive", "active"),
)
LSTM_OPTION_CASES = [
    pytest.param(
        *LSTM_OPTION_CONFIGS[k % 3], mi, pi, id=f"{mi}-{pi}-{'-'.join(LSTM_OPTION_CONFIGS[k % 3])}"
    )
    for k, (mi, pi) in enumerate(
        (mi, pi) for mi in reference.MODULATOR_INPUTS for pi in reference.POST_INPUTS
    )
]


@pytest.mark.parametrize("modulation,rule,regime,modulator_input,post_input", LSTM_OPTION_CASES)
def test_gradcheck_lstm_options(fused, modulation, rule, regime, modulator_input, post_input):
    options = dict(modulator_input=modulator_input, post_input=post_input)
    inputs, clip = kink_free_inputs(modulation, rule, regime, T=3, lstm=True, **options)
    gradcheck_op(
        fused.plastic_lstm_sequence, inputs, rule=rule, clip=clip, checkpoint_every=2, **options
    )
    inputs, clip = kink_free_inputs(modulation, rule, regime, T=None, lstm=True, **options)
    gradcheck_op(fused.plastic_lstm_step, inputs, rule=rule, clip=clip, **options)


@pytest.mark.parametrize("alpha_shape", [(3, 4), (4,), ()], ids=["full", "neuron", "scalar"])
def test_gradcheck_matvec(fused, alpha_shape):
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
        for s in ((2, 3), (3, 4), alpha_shape, (2, 3, 4))
    ]
    assert torch.autograd.gradcheck(fused.plastic_matvec, args)


@pytest.mark.parametrize("eta_shape", [(), (2, 1, 4), (3, 4), (2, 1, 1)], ids=str)
@pytest.mark.parametrize(
    "rule,regime",
    [(r, g) for r in RULES for g in (("free", "active") if r in CLIP_RULES else ("free",))],
)
def test_gradcheck_hebb_update(fused, rule, regime, eta_shape):
    B, P, N = 2, 3, 4
    clip = 50.0 if regime == "free" else 1.0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        inputs = dict(
            hebb=torch.randn(B, P, N, generator=gen, dtype=torch.float64)
            * (1.0 if regime == "free" else 3.0),
            pre=torch.randn(B, P, generator=gen, dtype=torch.float64).tanh(),
            post=torch.randn(B, N, generator=gen, dtype=torch.float64).tanh(),
            eta=torch.randn(eta_shape, generator=gen, dtype=torch.float64),
            elig=None,
            elig_rate=None,
        )
        if rule == "retroactive":
            inputs["elig"] = torch.randn(B, P, N, generator=gen, dtype=torch.float64)
            inputs["elig_rate"] = torch.tensor(0.3, dtype=torch.float64)
        s, z_margin = pre_clamp(
            inputs["hebb"], inputs["pre"], inputs["post"], inputs["eta"], inputs["elig"], rule, clip
        )
        margin = min((s.abs() - clip).abs().min().item(), z_margin)
        saturated = bool((s.abs() > clip).any()) and bool((s.abs() < clip).any())
        if margin >= MARGIN and (regime == "free" or rule not in CLIP_RULES or saturated):
            break
    else:
        raise AssertionError("no seed gives kink-free inputs")
    gradcheck_op(fused.hebb_update, inputs, rule=rule, clip=clip)
