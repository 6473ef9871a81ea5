"""Fused plastic RNN ops (sequence and step) against the pure-PyTorch reference: forward outputs
and the gradients of every input, for every option combination, checkpointing and odd sizes."""

import itertools
from unittest import mock

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
    assert_results_close,
    assert_results_equal,
    assert_tensor_close,
    clamp_engaged,
    compare_with_reference,
    read_clamp_engaged,
    rnn_inputs,
    run_forward_backward,
    upcast,
)

# Every test on both paths of the sequence op (conftest.py).
pytestmark = pytest.mark.usefixtures("sequence_path")

CLIP = 0.5
SEQ_OUTPUTS = ("out", "hebb_T", "elig_T", "m")
STEP_OUTPUTS = ("h_new", "hebb_new", "elig_new", "m")


def compare(fused, name, inputs, rule, names, checkpoint_every=None, **options):
    """fused.<name> against reference.<name> (helpers.compare_with_reference)."""
    fused_options = {} if checkpoint_every is None else dict(checkpoint_every=checkpoint_every)
    return compare_with_reference(
        getattr(reference, name),
        getattr(fused, name),
        inputs,
        names=names,
        fused_options=fused_options,
        rule=rule,
        clip=CLIP,
        **options,
    )


def compare_sequence(
    fused, inputs, rule, *, checkpoint_every=None, use=None, requires_grad=True, clamp=None
):
    return compare(
        fused,
        "plastic_rnn_sequence",
        inputs,
        rule,
        SEQ_OUTPUTS,
        checkpoint_every=checkpoint_every,
        use=use,
        requires_grad=requires_grad,
        clamp=clamp,
    )


def compare_step(fused, inputs, rule, *, use=None, requires_grad=True, clamp=None):
    return compare(
        fused,
        "plastic_rnn_step",
        inputs,
        rule,
        STEP_OUTPUTS,
        use=use,
        requires_grad=requires_grad,
        clamp=clamp,
    )


def size_ids(sizes):
    return "-".join(f"{k}{v}" for k, v in sizes.items())


# ---------------------------------------------------------------------------------------------
# Every option combination, float64.


@pytest.mark.parametrize("alpha,modulation,rule", all_combos())
def test_sequence_every_option(fused, alpha, modulation, rule):
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=3, N=7)
    (out, hebb_T, elig_T, m), grads = compare_sequence(fused, inputs, rule, checkpoint_every=2)
    assert (m is None) == modulation.startswith("none")
    assert (elig_T is None) == (rule != "retroactive")
    if rule in CLIP_RULES:  # the clamp mask is exercised, not just the interior
        assert clamp_engaged(hebb_T, CLIP)
    if rule in READ_CLAMP_RULES:  # read clamped beyond the bound, the trace itself unbounded
        assert read_clamp_engaged(inputs["hebb"], CLIP) and hebb_T.abs().max() > CLIP
    assert set(grads) == {k for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("alpha,modulation,rule", all_combos())
def test_step_every_option(fused, alpha, modulation, rule):
    inputs = rnn_inputs(alpha, modulation, rule, B=3, N=7, seed=1)
    (h_new, hebb_new, elig_new, m), _ = compare_step(fused, inputs, rule)
    assert (m is None) == modulation.startswith("none")
    assert (elig_new is None) == (rule != "retroactive")
    if rule in CLIP_RULES:
        assert clamp_engaged(hebb_new, CLIP)
    if rule in READ_CLAMP_RULES:
        assert read_clamp_engaged(inputs["hebb"], CLIP) and hebb_new.abs().max() > CLIP


# ---------------------------------------------------------------------------------------------
# Rule clip_on_read: the trace grows unclipped and a step reads it clamped to [-clip, clip].


def without_read_clamp(fn):
    """The reference `fn` with the trace read as it is: clip_on_read without its clamp."""

    def unclamped(**kwargs):
        with mock.patch.object(reference, "read_trace", lambda hebb, rule, clip: hebb):
            return fn(**kwargs)

    return unclamped


@pytest.mark.parametrize("op", ["sequence", "step"])
def test_clip_on_read_clamps_the_read(fused, op):
    """With traces beyond the bound the fused op matches the reference, and differs both from
    the same rule read unclamped and from rule clip (which clamps the trace where it writes it)."""
    rule, name = "clip_on_read", f"plastic_rnn_{op}"
    T = 4 if op == "sequence" else None
    inputs = rnn_inputs("full", "simple", rule, T=T, B=3, N=7, seed=23)
    names = SEQ_OUTPUTS if op == "sequence" else STEP_OUTPUTS
    (out, hebb_T, _, _), _ = compare(fused, name, inputs, rule, names)
    assert read_clamp_engaged(inputs["hebb"], CLIP) and hebb_T.abs().max() > CLIP
    kw = dict(rule=rule, clip=CLIP)
    unclamped, _ = run_forward_backward(without_read_clamp(getattr(reference, name)), inputs, **kw)
    clipped, _ = run_forward_backward(getattr(fused, name), inputs, rule="clip", clip=CLIP)
    for other in (unclamped, clipped):
        assert (out - other[0]).abs().max() > 1e-3


def test_clip_on_read_step_reads_the_clamped_trace(fused):
    """One step: h_new is rule clip's from the clamped trace, the new trace is the unclipped
    update, and the gradient of h_new reaches the trace only where -clip <= hebb <= clip."""
    rule = "clip_on_read"
    inputs = rnn_inputs("full", "none_scalar", rule, B=3, N=7, seed=24)
    hebb = inputs["hebb"]
    h_new, hebb_new, _, _ = fused.plastic_rnn_step(**inputs, rule=rule, clip=CLIP)
    h_clip, *_ = fused.plastic_rnn_step(
        **dict(inputs, hebb=hebb.clamp(-CLIP, CLIP)), rule="clip", clip=CLIP
    )
    torch.testing.assert_close(h_new, h_clip, **TOL[torch.float64])
    product = inputs["h"].unsqueeze(2) * h_new.unsqueeze(1)
    torch.testing.assert_close(hebb_new, hebb + inputs["eta"] * product, **TOL[torch.float64])
    _, grads = run_forward_backward(
        fused.plastic_rnn_step, inputs, use=[0], requires_grad={"hebb"}, rule=rule, clip=CLIP
    )
    beyond = hebb.abs() > CLIP
    assert beyond.any() and (grads["hebb"][beyond] == 0).all()
    assert (grads["hebb"][~beyond] != 0).all()


# ---------------------------------------------------------------------------------------------
# Checkpointing of the sequence op (T = 5): every step stored, segments, one segment (also for
# intervals far beyond T, up to the int64 limit: the backward must not size its buffers by
# them, nor the count of checkpoints overflow), default.


@pytest.mark.parametrize("checkpoint_every", [1, 2, 4, 5, 8, 2**40, 2**63 - 1, None])
@pytest.mark.parametrize("rule", RULES)
def test_sequence_checkpoint_every(fused, rule, checkpoint_every):
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=3, N=7, seed=2)
    compare_sequence(fused, inputs, rule, checkpoint_every=checkpoint_every)


# ---------------------------------------------------------------------------------------------
# Odd sizes, including one neuron, one sample and one step.

SIZES = [dict(T=T, B=B, N=N) for T, B, N in itertools.product((1, 5), (1, 3), (1, 7, 33))]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sizes", SIZES, ids=size_ids)
def test_sequence_sizes(fused, sizes, rule):
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, seed=3, **sizes)
    compare_sequence(fused, inputs, rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "sizes", [dict(B=B, N=N) for B in (1, 3) for N in (1, 7, 33)], ids=size_ids
)
def test_step_sizes(fused, sizes, rule):
    alpha, modulation = RULE_CONFIG[rule]
    compare_step(fused, rnn_inputs(alpha, modulation, rule, seed=4, **sizes), rule)


@pytest.mark.parametrize(
    "alpha,modulation,rule",
    [
        ("full", "fanout3", "retroactive"),
        ("scalar", "none_full", "oja"),
        ("neuron", "simple", "softclip"),
        ("full", "none_full", "clip_on_read"),
    ],
)
def test_sequence_several_column_tiles(fused, alpha, modulation, rule):
    """N > 64 spans several column tiles of the CPU kernels, B = 17 several batch chunks."""
    inputs = rnn_inputs(alpha, modulation, rule, T=3, B=17, N=70, seed=5)
    compare_sequence(fused, inputs, rule, checkpoint_every=2)


# ---------------------------------------------------------------------------------------------
# float32: every rule, two configurations each, looser tolerance.

F32_CASES = [(*RULE_CONFIG[r], r) for r in RULES] + [
    ("scalar", "none_scalar", "clip"),
    ("full", "none_full", "softclip"),
    ("neuron", "fanout3", "decay"),
    ("scalar", "simple", "oja"),
    ("full", "simple", "retroactive"),
    ("full", "fanout3", "clip_on_read"),
]


@pytest.mark.parametrize("alpha,modulation,rule", F32_CASES)
def test_sequence_float32(fused, alpha, modulation, rule):
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=3, N=33, dtype=torch.float32, seed=6)
    compare_sequence(fused, inputs, rule, checkpoint_every=2)


@pytest.mark.parametrize("alpha,modulation,rule", F32_CASES)
def test_step_float32(fused, alpha, modulation, rule):
    inputs = rnn_inputs(alpha, modulation, rule, B=3, N=33, dtype=torch.float32, seed=7)
    compare_step(fused, inputs, rule)


def test_float32_bound_fails_on_a_real_error(fused):
    """The norm-wise float32 bound still catches what a bug would do: one element of any output
    or gradient off by 1e-3 of the tensor's norm, or a kernel run with a wrong constant (clip
    0.1% too large)."""
    rule = "clip"
    inputs = rnn_inputs("full", "fanout3", rule, T=5, B=3, N=33, dtype=torch.float32, seed=6)
    expected = compare_sequence(fused, inputs, rule, checkpoint_every=2)  # passes as it is
    kw = dict(rule=rule, clip=CLIP)
    outputs, grads = run_forward_backward(fused.plastic_rnn_sequence, inputs, **kw)
    baseline = run_forward_backward(reference.plastic_rnn_sequence, inputs, **kw)
    tensors = [("output", k, t) for k, t in enumerate(outputs) if t is not None]
    tensors += [("grad", k, t) for k, t in grads.items()]
    for kind, key, t in tensors:
        wrong = t.clone()
        wrong.view(-1)[wrong.numel() // 2] += 1e-3 * t.norm()
        perturbed = (
            tuple(wrong if kind == "output" and k == key else o for k, o in enumerate(outputs)),
            {k: wrong if kind == "grad" and k == key else g for k, g in grads.items()},
        )
        with pytest.raises(AssertionError, match="norm-wise relative error"):
            assert_results_close(expected, perturbed, torch.float32, baseline=baseline)
    wrong_clip = run_forward_backward(
        fused.plastic_rnn_sequence, inputs, rule=rule, clip=CLIP * 1.001
    )
    with pytest.raises(AssertionError, match="norm-wise relative error"):
        assert_results_close(expected, wrong_clip, torch.float32, baseline=baseline)


# ---------------------------------------------------------------------------------------------
# Only some outputs in the loss (the others get no gradient: None in the backward).


def _use_cases(names):
    """(alpha, modulation, rule, index of the output in the loss), where that output exists."""
    configs = [
        ("full", "fanout3", "retroactive"),
        ("neuron", "none_full", "clip"),
        ("scalar", "simple", "softclip"),
        ("neuron", "fanout1", "clip_on_read"),
    ]
    return [
        pytest.param(a, m, r, k, id=f"{a}-{m}-{r}-{names[k]}")
        for a, m, r in configs
        for k in range(4)
        if not (names[k].startswith("elig") and r != "retroactive")
        and not (names[k] == "m" and m.startswith("none"))
    ]


@pytest.mark.parametrize("alpha,modulation,rule,used", _use_cases(SEQ_OUTPUTS))
def test_sequence_single_output_used(fused, alpha, modulation, rule, used):
    inputs = rnn_inputs(alpha, modulation, rule, T=4, B=3, N=7, seed=8)
    _, grads = compare_sequence(fused, inputs, rule, checkpoint_every=2, use=[used])
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("alpha,modulation,rule,used", _use_cases(STEP_OUTPUTS))
def test_step_single_output_used(fused, alpha, modulation, rule, used):
    inputs = rnn_inputs(alpha, modulation, rule, B=3, N=7, seed=9)
    _, grads = compare_step(fused, inputs, rule, use=[used])
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize(
    "wanted",
    [{"x"}, {"w", "h2mod_weight"}, {"hebb", "elig", "elig_rate"}, {"alpha", "fanout_bias", "h"}],
)
def test_only_some_inputs_require_grad(fused, wanted):
    inputs = rnn_inputs("full", "fanout3", "retroactive", T=4, B=2, N=7, seed=10)
    _, grads = compare_sequence(fused, inputs, "retroactive", requires_grad=wanted)
    assert set(grads) == wanted
    step_inputs = dict(inputs, x=inputs["x"][0])
    _, grads = compare_step(fused, step_inputs, "retroactive", requires_grad=wanted)
    assert set(grads) == wanted


def test_no_input_requires_grad(fused):
    """Under no_grad-like use (no input requires grad) the fused op returns plain tensors."""
    inputs = rnn_inputs("full", "fanout1", "clip", T=3, B=2, N=5)
    out = fused.plastic_rnn_sequence(**inputs, rule="clip", clip=CLIP)
    ref = reference.plastic_rnn_sequence(**inputs, rule="clip", clip=CLIP)
    assert not out[0].requires_grad
    for a, e in zip(out, ref):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **TOL[torch.float64])


@pytest.mark.parametrize("clamped", [False, True], ids=["free", "clamped"])
def test_sequence_equals_step_loop(fused, clamped):
    """T fused steps, each from the previous step's state, give the fused sequence's results."""
    rule = "retroactive"
    inputs = rnn_inputs("full", "fanout3", rule, T=5, B=3, N=7, seed=11)
    clamp = random_mask(inputs["x"].shape, seed=11) if clamped else None
    out, hebb_T, elig_T, m = fused.plastic_rnn_sequence(
        **inputs, rule=rule, clip=CLIP, checkpoint_every=2, clamp=clamp
    )
    h, hebb, elig = inputs["h"], inputs["hebb"], inputs["elig"]
    params = {k: v for k, v in inputs.items() if k not in ("x", "h", "hebb", "elig")}
    for t in range(5):
        h, hebb, elig, m_t = fused.plastic_rnn_step(
            inputs["x"][t],
            h,
            hebb,
            elig,
            **params,
            rule=rule,
            clip=CLIP,
            clamp=None if clamp is None else clamp[t],
        )
        torch.testing.assert_close(h, out[t], **TOL[torch.float64])
        torch.testing.assert_close(m_t, m[t], **TOL[torch.float64])
    torch.testing.assert_close(hebb, hebb_T, **TOL[torch.float64])
    torch.testing.assert_close(elig, elig_T, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# Clamped neurons: where the bool mask `clamp` is set, h_t = x_t (and dL/dx_t = dL/dh_t).


def random_mask(shape, seed, p=0.4):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("rule", RULES)
def test_sequence_clamp(fused, rule):
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=3, N=7, seed=12)
    clamp = random_mask(inputs["x"].shape, seed=12)
    (out, *_), grads = compare_sequence(fused, inputs, rule, checkpoint_every=2, clamp=clamp)
    assert torch.equal(out[clamp], inputs["x"][clamp])
    assert not torch.equal(out[~clamp], inputs["x"][~clamp])


@pytest.mark.parametrize("rule", RULES)
def test_step_clamp(fused, rule):
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, B=3, N=7, seed=13)
    clamp = random_mask(inputs["x"].shape, seed=13)
    (h_new, *_), _ = compare_step(fused, inputs, rule, clamp=clamp)
    assert torch.equal(h_new[clamp], inputs["x"][clamp])


@pytest.mark.parametrize(
    "sizes", [dict(T=1, B=1, N=1), dict(T=5, B=1, N=33), dict(T=3, B=17, N=70)], ids=size_ids
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sequence_clamp_sizes(fused, sizes, dtype):
    inputs = rnn_inputs("full", "none_scalar", "decay", dtype=dtype, seed=14, **sizes)
    compare_sequence(
        fused,
        inputs,
        "decay",
        checkpoint_every=2,
        clamp=random_mask(inputs["x"].shape, seed=14, p=0.7),
    )


@pytest.mark.parametrize("fill", [False, True])
def test_sequence_clamp_uniform_mask(fused, fill):
    """An all-False mask changes nothing (bitwise); an all-True one makes out == x, its gradient
    the loss's weights on out plus what reaches x through the trace and the modulator."""
    rule = "retroactive"
    inputs = rnn_inputs("neuron", "fanout1", rule, T=4, B=2, N=5, seed=15)
    clamp = torch.full(inputs["x"].shape, fill)
    (out, *_), _ = compare_sequence(fused, inputs, rule, clamp=clamp)
    if fill:
        assert torch.equal(out, inputs["x"])
    else:
        plain = run_forward_backward(fused.plastic_rnn_sequence, inputs, rule=rule, clip=CLIP)
        masked = run_forward_backward(
            fused.plastic_rnn_sequence, inputs, rule=rule, clip=CLIP, clamp=clamp
        )
        assert_results_equal(plain, masked)


# ---------------------------------------------------------------------------------------------
# The rollout step (no autograd): a loop of them gives the sequence's outputs and final traces,
# with the traces updated in place and each step's drive handed to the next.


def rollout(impl, inputs, rule, clamp=None):
    """(h per step, m per step, the final u) of a loop of impl.plastic_rnn_rollout_step from the
    sequence inputs, whose hebb and elig it updates in place."""
    params = {k: v for k, v in inputs.items() if k not in ("x", "h", "hebb", "elig")}
    h, u, hs, ms = inputs["h"], None, [], []
    with torch.no_grad():
        for t in range(inputs["x"].shape[0]):
            h, u, m = impl.plastic_rnn_rollout_step(
                inputs["x"][t],
                u,
                h,
                inputs["hebb"],
                inputs["elig"],
                **params,
                rule=rule,
                clip=CLIP,
                clamp=None if clamp is None else clamp[t],
            )
            hs.append(h)
            ms.append(m)
    return hs, ms, u


def check_rollout(impl, inputs, rule, clamp=None):
    dtype = inputs["x"].dtype
    expected = reference.plastic_rnn_sequence(**upcast(inputs), rule=rule, clip=CLIP, clamp=clamp)
    # The reference in the inputs' dtype: the baseline of float32 rounding (assert_tensor_close).
    baseline = reference.plastic_rnn_sequence(**inputs, rule=rule, clip=CLIP, clamp=clamp)
    traces = {k: None if inputs[k] is None else inputs[k].clone() for k in ("hebb", "elig")}
    hs, ms, u = rollout(impl, dict(inputs, **traces), rule, clamp)
    (out, hebb_T, elig_T, m), (out_b, hebb_b, elig_b, m_b) = expected, baseline
    for t, (h_t, m_t) in enumerate(zip(hs, ms)):
        assert_tensor_close(h_t, out[t], f"h at step {t + 1}", dtype, out_b[t])
        assert (m_t is None) == (m is None)
        if m is not None:
            assert_tensor_close(m_t, m[t], f"m at step {t + 1}", dtype, m_b[t])
    assert_tensor_close(traces["hebb"], hebb_T, "hebb (updated in place)", dtype, hebb_b)
    assert (traces["elig"] is None) == (elig_T is None)
    if elig_T is not None:
        assert_tensor_close(traces["elig"], elig_T, "elig (updated in place)", dtype, elig_b)
    read = lambda hebb: reference.read_trace(hebb, rule, CLIP)  # noqa: E731
    u_next = reference.plastic_matvec(
        out[-1], upcast(inputs)["w"], upcast(inputs)["alpha"], read(hebb_T)
    )
    u_b = reference.plastic_matvec(out_b[-1], inputs["w"], inputs["alpha"], read(hebb_b))
    assert_tensor_close(u, u_next, "u of the next step", dtype, u_b)


@pytest.mark.parametrize("alpha,modulation,rule", all_combos())
def test_rollout_step_every_option(fused, alpha, modulation, rule):
    check_rollout(fused, rnn_inputs(alpha, modulation, rule, T=4, B=3, N=7, seed=16), rule)


@pytest.mark.parametrize("rule", RULES)
def test_rollout_step_reference(rule):
    alpha, modulation = RULE_CONFIG[rule]
    check_rollout(reference, rnn_inputs(alpha, modulation, rule, T=4, B=3, N=7, seed=17), rule)


@pytest.mark.parametrize(
    "sizes", [dict(T=1, B=1, N=1), dict(T=3, B=1, N=33), dict(T=3, B=17, N=70)], ids=size_ids
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rule", ["retroactive", "oja", "clip_on_read"])
def test_rollout_step_sizes(fused, sizes, dtype, rule):
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, dtype=dtype, seed=18, **sizes)
    check_rollout(fused, inputs, rule)


def test_rollout_step_clamp(fused):
    inputs = rnn_inputs("full", "simple", "retroactive", T=4, B=3, N=7, seed=19)
    check_rollout(fused, inputs, "retroactive", random_mask(inputs["x"].shape, seed=19))


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("rule", ["retroactive", "clip", "clip_on_read"])
def test_rollout_step_into_other_traces(fused, impl, rule):
    """With hebb_out and elig_out the new traces go there and the given ones stay as they were:
    steps that alternate between two pairs of buffers give the sequence's outputs and traces."""
    module = fused if impl == "fused" else reference
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=3, N=9, seed=20)
    out, hebb_T, elig_T, m = reference.plastic_rnn_sequence(**inputs, rule=rule, clip=CLIP)
    params = {k: v for k, v in inputs.items() if k not in ("x", "h", "hebb", "elig")}
    copy = lambda t: None if t is None else t.clone()  # noqa: E731
    buffers = [
        (copy(inputs["hebb"]), copy(inputs["elig"])),
        (torch.empty_like(inputs["hebb"]), copy(inputs["elig"])),
    ]
    h, u = inputs["h"], None
    with torch.no_grad():
        for t in range(5):
            (hebb, elig), (hebb_out, elig_out) = buffers[t % 2], buffers[1 - t % 2]
            before = copy(hebb), copy(elig)
            h, u, m_t = module.plastic_rnn_rollout_step(
                inputs["x"][t],
                u,
                h,
                hebb,
                elig,
                **params,
                rule=rule,
                clip=CLIP,
                hebb_out=hebb_out,
                elig_out=elig_out,
            )
            assert torch.equal(hebb, before[0])
            assert elig is None or torch.equal(elig, before[1])
            assert_tensor_close(h, out[t], f"h at step {t + 1}", torch.float64)
            assert_tensor_close(m_t, m[t], f"m at step {t + 1}", torch.float64)
    hebb, elig = buffers[1]
    assert_tensor_close(hebb, hebb_T, "hebb_out", torch.float64)
    if elig_T is not None:
        assert_tensor_close(elig, elig_T, "elig_out", torch.float64)
    assert_tensor_close(
        u,
        reference.plastic_matvec(
            out[-1], inputs["w"], inputs["alpha"], reference.read_trace(hebb_T, rule, CLIP)
        ),
        "u of the next step",
        torch.float64,
    )


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_rollout_step_refuses_autograd(fused, impl):
    module = fused if impl == "fused" else reference
    inputs = rnn_inputs("full", "simple", "clip", B=2, N=5)
    inputs["w"].requires_grad_()
    params = {k: v for k, v in inputs.items() if k not in ("x", "h", "hebb", "elig")}
    with pytest.raises(RuntimeError, match="plastic_rnn_rollout_step: no autograd"):
        module.plastic_rnn_rollout_step(
            inputs["x"], None, inputs["h"], inputs["hebb"], None, **params, rule="clip", clip=CLIP
        )


# ---------------------------------------------------------------------------------------------
# Replay of a rollout: the sequence's out, m and every gradient from a record of rollout steps.


def record_rollout(fused, inputs, rule, L):
    """A SequenceRecord of a loop of rollout steps from the sequence inputs (their traces are
    copied first)."""
    from backpropamine_cuda.fused import SequenceRecord

    x = inputs["x"]
    T, B, N = x.shape
    traces = {k: None if inputs[k] is None else inputs[k].clone() for k in ("hebb", "elig")}
    params = {k: v for k, v in inputs.items() if k not in ("x", "h", "hebb", "elig")}
    K = 0 if inputs["h2mod_weight"] is None else inputs["h2mod_weight"].shape[0]
    outs, mods, ckpt_h, ckpt_e = [], [], [], []
    h, u = inputs["h"], None
    with torch.no_grad():
        for t in range(T):
            h, u, m = fused.plastic_rnn_rollout_step(
                x[t], u, h, traces["hebb"], traces["elig"], **params, rule=rule, clip=CLIP
            )
            outs.append(h)
            mods.append(x.new_empty(B, 0) if m is None else m)
            if (t + 1) % L == 0 and t + 1 < T:
                ckpt_h.append(traces["hebb"].clone())
                if traces["elig"] is not None:
                    ckpt_e.append(traces["elig"].clone())
    stack = lambda ts: torch.stack(ts) if ts else x.new_empty(0, B, N, N)  # noqa: E731
    assert all(mm.shape[1] == K for mm in mods)
    return SequenceRecord(torch.stack(outs), torch.stack(mods), stack(ckpt_h), stack(ckpt_e), L)


def reference_out_and_m(**kwargs):
    out, _, _, m = reference.plastic_rnn_sequence(**kwargs)
    return out, m


def compare_replay(fused, inputs, rule, L):
    """The replay of a record of rollout steps against the reference sequence's out and m."""
    expected = run_forward_backward(reference_out_and_m, inputs, rule=rule, clip=CLIP)
    actual = run_forward_backward(
        fused.plastic_rnn_sequence_replay,
        inputs,
        rule=rule,
        clip=CLIP,
        record=record_rollout(fused, inputs, rule, L),
    )
    assert_results_close(expected, actual, torch.float64, names=("out", "m"))


@pytest.mark.parametrize("alpha,modulation,rule", all_combos())
def test_sequence_replay_every_option(fused, alpha, modulation, rule):
    compare_replay(fused, rnn_inputs(alpha, modulation, rule, T=5, B=3, N=7, seed=20), rule, L=2)


@pytest.mark.parametrize("L", [1, 3, 7])
def test_sequence_replay_checkpoint_every(fused, L):
    compare_replay(
        fused,
        rnn_inputs("full", "fanout3", "retroactive", T=7, B=2, N=5, seed=21),
        "retroactive",
        L,
    )
