"""The CUDA kernels in the CPU emulator, beyond the op matrix that every op test runs through
them (conftest.py, fixture `fused`): grids of several batch chunks, column tiles and row blocks
with partial tiles, feed-forward shapes (P != N), the RNN sequence op's two paths (the
whole-sequence kernels of csrc/cuda/sequence_kernels.h and the per-step passes, forced with
BACKPROPAMINE_SEQUENCE_PATH) and the choice between them, and the emulator's own checks."""

import pytest
import torch

from backpropamine_cuda import reference

from helpers import (
    RULE_CONFIG,
    RULES,
    TOL,
    all_combos,
    assert_results_close,
    assert_results_equal,
    compare_with_reference,
    loss_weights,
    lstm_inputs,
    rnn_inputs,
    run_forward_backward,
    upcast,
    with_grad,
)

CLIP = 0.5
KERNEL_THREADS = 128  # columns per block in csrc/cuda/trace_kernels.h (kThreads)


@pytest.fixture(scope="module")
def emulated(fused_cpu):
    return fused_cpu.emulated_cuda


# B = 9: two batch chunks (8 + 1); N = 130: two column tiles (128 + 2); row blocks follow.
@pytest.mark.parametrize("rule", RULES)
def test_rnn_sequence_several_tiles(emulated, rule):
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=3, B=9, N=KERNEL_THREADS + 2, seed=20)
    kw = dict(rule=rule, clip=CLIP)
    expected = run_forward_backward(reference.plastic_rnn_sequence, upcast(inputs), **kw)
    actual = run_forward_backward(emulated.plastic_rnn_sequence, inputs, checkpoint_every=2, **kw)
    assert_results_close(expected, actual, torch.float64)


@pytest.mark.parametrize(
    "modulator_input,post_input", [("h", "g"), ("c", "u"), ("h_prev", "c"), ("h_prev", "h")]
)
def test_lstm_sequence_several_tiles(emulated, sequence_path, modulator_input, post_input):
    """The GPU's whole-sequence kernels run the tanh cell only: the LSTM runs step by step on
    either setting of the path."""
    inputs = lstm_inputs(
        "full",
        "fanout3",
        "retroactive",
        T=2,
        B=9,
        N=KERNEL_THREADS + 1,
        dtype=torch.float32,
        seed=21,
    )
    compare_with_reference(
        reference.plastic_lstm_sequence,
        emulated.plastic_lstm_sequence,
        inputs,
        rule="retroactive",
        clip=CLIP,
        modulator_input=modulator_input,
        post_input=post_input,
    )


@pytest.mark.parametrize("P,N", [(3, 200), (300, 5), (129, 129)])
@pytest.mark.parametrize("eta_shape", ["per_post", "per_connection"])
def test_primitives_feed_forward_shapes(emulated, P, N, eta_shape):
    """P != N: rows and columns are tiled independently."""
    B = 10
    gen = torch.Generator().manual_seed(P * N)
    t = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    matvec = dict(x=t(B, P), w=t(P, N), alpha=t(N), hebb=t(B, P, N))
    expected = run_forward_backward(lambda **kw: (reference.plastic_matvec(**kw),), matvec)
    actual = run_forward_backward(lambda **kw: (emulated.plastic_matvec(**kw),), matvec)
    assert_results_close(expected, actual, torch.float64)
    update = dict(
        hebb=t(B, P, N),
        pre=t(B, P),
        post=t(B, N),
        eta=t(B, 1, N) if eta_shape == "per_post" else t(P, N),
    )
    kw = dict(rule="softclip", clip=CLIP)
    expected = run_forward_backward(lambda **a: reference.hebb_update(**a)[:1], update, **kw)
    actual = run_forward_backward(lambda **a: emulated.hebb_update(**a)[:1], update, **kw)
    assert_results_close(expected, actual, torch.float64)


def test_emulator_checks_bounds(fused_cpu):
    column_sums = torch.ops.backpropamine_emulated.emulator_column_sums
    src = torch.arange(12, dtype=torch.float32)
    torch.testing.assert_close(column_sums(src, 3, 4), src.view(3, 4).sum(0), **TOL[torch.float32])
    with pytest.raises(
        IndexError, match="bp kernel emulator: memory index 12 out of bounds for size 12"
    ):
        column_sums(src, 4, 4)  # one row past the end


@pytest.fixture
def reverse_thread_order(fused_cpu):
    torch.ops.backpropamine_emulated.emulator_reverse_thread_order(True)
    yield
    torch.ops.backpropamine_emulated.emulator_reverse_thread_order(False)


def _race_cases():
    rnn = [("rnn", *RULE_CONFIG[r], r) for r in RULES]
    return rnn + [
        ("lstm", "full", "fanout3", "retroactive"),
        ("lstm", "neuron", "none_full", "clip"),
    ]


@pytest.mark.parametrize("kind,alpha,modulation,rule", _race_cases())
def test_kernels_do_not_depend_on_thread_order(
    emulated, kind, alpha, modulation, rule, request, monkeypatch
):
    """Threads of a phase run in reverse order give the same bits: no thread reads, within a
    phase, what another one writes in it (a race on a GPU). The per-step kernels here (the RNN
    forced onto them); the whole-sequence ones in
    test_whole_sequence_does_not_depend_on_thread_order."""
    monkeypatch.setenv(PATH_VARIABLE, "steps")
    make = rnn_inputs if kind == "rnn" else lstm_inputs
    op = getattr(emulated, f"plastic_{kind}_sequence")
    inputs = make(alpha, modulation, rule, T=3, B=9, N=KERNEL_THREADS + 3, seed=22)
    in_order = run_forward_backward(op, inputs, rule=rule, clip=CLIP, checkpoint_every=2)
    request.getfixturevalue("reverse_thread_order")
    reversed_order = run_forward_backward(op, inputs, rule=rule, clip=CLIP, checkpoint_every=2)
    assert_results_equal(in_order, reversed_order)


# ---------------------------------------------------------------------------------------------
# The RNN sequence op's whole-sequence kernels (one launch forward, one backward; the trace in
# shared memory) and the per-step passes, each forced with BACKPROPAMINE_SEQUENCE_PATH.

PATH_VARIABLE = "BACKPROPAMINE_SEQUENCE_PATH"
# The emulator's shared memory per block: sm_90's opt-in limit (csrc/cpu/emulated_cuda_ops.cpp).
EMULATED_SHARED_BYTES = 227 * 1024


def random_mask(shape, seed, p=0.4):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.fixture(params=["whole", "steps"])
def sequence_path(request, monkeypatch):
    monkeypatch.setenv(PATH_VARIABLE, request.param)
    return request.param


@pytest.mark.parametrize("clamped", [False, True], ids=["free", "clamped"])
@pytest.mark.parametrize("alpha,modulation,rule", all_combos())
def test_rnn_sequence_paths_every_option(emulated, sequence_path, alpha, modulation, rule, clamped):
    """Both paths against the reference for every rule, alpha, modulation, with and without
    clamped neurons; N = 7: one partial warp of columns."""
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=2, N=7, seed=30)
    clamp = random_mask(inputs["x"].shape, seed=30) if clamped else None
    compare_with_reference(
        reference.plastic_rnn_sequence,
        emulated.plastic_rnn_sequence,
        inputs,
        rule=rule,
        clip=CLIP,
        clamp=clamp,
        fused_options=dict(checkpoint_every=2),
    )


# (T, B, N, checkpoint interval): T = 1; B = 1; N odd, up to 130 (five warps, the last partial,
# and several chunks of the backward's column sums); intervals of 1, 2, 3, T and beyond T.
WHOLE_SIZES = [
    (1, 2, 7, 1),
    (1, 1, 33, 5),
    (6, 1, 33, 1),
    (7, 3, 9, 3),
    (5, 2, 7, 5),
    (5, 2, 33, 100),
    (3, 2, 130, 2),
]


def _whole_size_cases():
    # Retroactive in float64 at N = 130 needs more shared memory than a block has (see
    # test_sequence_path_choice): float32 only there.
    return [
        (rule, *size, dtype)
        for rule in RULES
        for size in WHOLE_SIZES
        for dtype in (torch.float64, torch.float32)
        if not (rule == "retroactive" and size[2] == 130 and dtype == torch.float64)
    ]


@pytest.mark.parametrize("rule,T,B,N,L,dtype", _whole_size_cases(), ids=str)
def test_whole_sequence_sizes(emulated, monkeypatch, rule, T, B, N, L, dtype):
    monkeypatch.setenv(PATH_VARIABLE, "whole")
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=T, B=B, N=N, dtype=dtype, seed=6)
    compare_with_reference(
        reference.plastic_rnn_sequence,
        emulated.plastic_rnn_sequence,
        inputs,
        rule=rule,
        clip=CLIP,
        fused_options=dict(checkpoint_every=L),
    )


# Row slices per block (csrc/cuda/sequence_kernels.h, sequence_slices): as many of 4, 2, 1 as
# the shared memory allows. The sizes above run 4 in both kernels; here the backward runs 2
# (N = 200, float32: 226,176 bytes) and 1 (N = 109, retroactive, float64: 229,680 bytes).
@pytest.mark.parametrize(
    "rule,N,dtype", [("clip", 200, torch.float32), ("retroactive", 109, torch.float64)], ids=str
)
def test_whole_sequence_fewer_row_slices(emulated, monkeypatch, rule, N, dtype):
    monkeypatch.setenv(PATH_VARIABLE, "whole")
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(
        alpha, modulation, rule, T=3, B=2, N=N, dtype=dtype, seed=6, hebb_scale=0.1, eta_scale=0.1
    )
    compare_with_reference(
        reference.plastic_rnn_sequence,
        emulated.plastic_rnn_sequence,
        inputs,
        rule=rule,
        clip=CLIP,
        fused_options=dict(checkpoint_every=2),
    )


@pytest.mark.parametrize("forward_path,backward_path", [("whole", "steps"), ("steps", "whole")])
@pytest.mark.parametrize("rule", ["clip", "retroactive", "clip_on_read"])
def test_paths_accept_each_others_forward(emulated, monkeypatch, rule, forward_path, backward_path):
    """Both paths store the same checkpoints: the backward of either runs on the forward of the
    other (the variable is read at every call)."""
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=7, B=2, N=9, seed=32)
    kw = dict(rule=rule, clip=CLIP)
    expected = run_forward_backward(reference.plastic_rnn_sequence, inputs, **kw)
    leaves = with_grad(inputs)
    monkeypatch.setenv(PATH_VARIABLE, forward_path)
    outputs = emulated.plastic_rnn_sequence(**leaves, **kw, checkpoint_every=3)
    monkeypatch.setenv(PATH_VARIABLE, backward_path)
    weights = loss_weights(outputs)
    sum((o * w).sum() for o, w in zip(outputs, weights) if o is not None).backward()
    actual = (
        tuple(None if o is None else o.detach() for o in outputs),
        {
            k: torch.zeros_like(v) if v.grad is None else v.grad
            for k, v in leaves.items()
            if v is not None
        },
    )
    assert_results_close(expected, actual, torch.float64)


@pytest.mark.parametrize("rule", RULES)
def test_whole_sequence_does_not_depend_on_thread_order(emulated, monkeypatch, rule, request):
    """The whole-sequence kernels' race check (see test_kernels_do_not_depend_on_thread_order):
    N = 40, two warps with partial segments of the column sums; clamped neurons."""
    monkeypatch.setenv(PATH_VARIABLE, "whole")
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=2, N=40, seed=33)
    kw = dict(
        rule=rule, clip=CLIP, checkpoint_every=2, clamp=random_mask(inputs["x"].shape, seed=33)
    )
    in_order = run_forward_backward(emulated.plastic_rnn_sequence, inputs, **kw)
    request.getfixturevalue("reverse_thread_order")
    reversed_order = run_forward_backward(emulated.plastic_rnn_sequence, inputs, **kw)
    assert_results_equal(in_order, reversed_order)


def test_sequence_path_choice(emulated, monkeypatch):
    """auto takes the whole-sequence kernels where a block's shared memory fits the device's
    limit and the per-step passes where it does not; whole at a size that does not fit is an
    error, not a silent fallback. Retroactive in float64: the backward keeps dL/dH and dL/dE,
    2 N^2 values, plus 32 (C + 1) + 3 C + 4 N with one row slice (C: N rounded up to 32);
    N = 109: 229,680 bytes of 232,448 (227 KB) fit, N = 120: 270,336 do not."""

    def run(N, path):
        monkeypatch.setenv(PATH_VARIABLE, path)
        inputs = rnn_inputs("neuron", "fanout1", "retroactive", T=2, B=1, N=N, seed=34)
        return run_forward_backward(
            emulated.plastic_rnn_sequence, inputs, rule="retroactive", clip=CLIP, checkpoint_every=1
        )

    assert_results_equal(run(109, "whole"), run(109, "auto"))
    auto = run(120, "auto")
    assert_results_equal(run(120, "steps"), auto)
    with pytest.raises(
        ValueError,
        match="BACKPROPAMINE_SEQUENCE_PATH=whole: the whole-sequence "
        "kernels at N = 120 with an eligibility trace need 270336 bytes of shared "
        f"memory per block, the device allows {EMULATED_SHARED_BYTES}",
    ):
        run(120, "whole")
    with pytest.raises(
        ValueError,
        match="BACKPROPAMINE_SEQUENCE_PATH must be one of auto, whole, steps, got 'fast'",
    ):
        run(7, "fast")
