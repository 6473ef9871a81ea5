"""Bitwise determinism of the fused ops (no floating-point atomics, fixed-order reductions:
docs/design.md, 'Tiling and fixed-order reductions'): repeated runs, different thread counts,
different checkpoint intervals.

The final parameter gradients of w, h2mod and fanout (and of w in plastic_matvec) are GEMMs
(at::mm, i.e. BLAS), whose summation order may depend on the thread count; across thread counts
only the gradients the kernels reduce themselves are compared (KERNEL_GRAD_INPUTS).
Sizes are large enough (B = 9, N = 70: 2 column tiles x 8 batch chunks) for the work to be split
over the threads.
"""

import pytest
import torch

from helpers import (
    RULE_CONFIG,
    RULES,
    assert_results_equal,
    lstm_inputs,
    rnn_inputs,
    run_forward_backward,
)

# Every test on both paths of the sequence op (conftest.py).
pytestmark = pytest.mark.usefixtures("sequence_path")

CLIP = 0.5
# Inputs whose gradients the fused kernels reduce themselves (no BLAS).
KERNEL_GRAD_INPUTS = ("x", "h", "hebb", "elig", "alpha", "eta", "elig_rate")
SIZES = dict(B=9, N=70)


def run_sequence(fused, inputs, rule, threads, checkpoint_every=2):
    torch.set_num_threads(threads)
    return run_forward_backward(
        fused.plastic_rnn_sequence, inputs, rule=rule, clip=CLIP, checkpoint_every=checkpoint_every
    )


def run_step(fused, inputs, rule, threads):
    torch.set_num_threads(threads)
    return run_forward_backward(fused.plastic_rnn_step, inputs, rule=rule, clip=CLIP)


CASES = [(*RULE_CONFIG[r], r) for r in RULES] + [
    ("scalar", "none_scalar", "clip"),
    ("full", "fanout3", "retroactive"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha,modulation,rule", CASES)
def test_sequence_repeatable(fused, alpha, modulation, rule, dtype):
    inputs = rnn_inputs(alpha, modulation, rule, T=4, dtype=dtype, **SIZES)
    first = run_sequence(fused, inputs, rule, threads=2)
    assert_results_equal(first, run_sequence(fused, inputs, rule, threads=2))


@pytest.mark.parametrize("alpha,modulation,rule", CASES)
def test_sequence_thread_count(fused, alpha, modulation, rule):
    inputs = rnn_inputs(alpha, modulation, rule, T=4, dtype=torch.float32, **SIZES)
    one, two = (run_sequence(fused, inputs, rule, threads=n) for n in (1, 2))
    assert_results_equal(one, two, keys=KERNEL_GRAD_INPUTS)


@pytest.mark.parametrize("alpha,modulation,rule", CASES)
def test_step_repeatable_and_thread_count(fused, alpha, modulation, rule):
    inputs = rnn_inputs(alpha, modulation, rule, dtype=torch.float32, **SIZES)
    first = run_step(fused, inputs, rule, threads=2)
    assert_results_equal(first, run_step(fused, inputs, rule, threads=2))
    assert_results_equal(first, run_step(fused, inputs, rule, threads=1), keys=KERNEL_GRAD_INPUTS)


@pytest.mark.parametrize("rule", RULES)
def test_checkpoint_interval_does_not_change_results(fused, rule):
    """The backward recomputes the traces inside each segment with the same kernel as the
    forward, so every checkpoint interval gives the same bits."""
    alpha, modulation = RULE_CONFIG[rule]
    inputs = rnn_inputs(alpha, modulation, rule, T=6, B=3, N=7, dtype=torch.float32)
    results = [
        run_sequence(fused, inputs, rule, threads=2, checkpoint_every=k) for k in (1, 2, 4, 6, 10)
    ]
    for other in results[1:]:
        assert_results_equal(results[0], other)


# The LSTM also runs a BLAS GEMM per step (h2g), forward and backward, whose rounding may depend
# on the thread count: everything downstream of it may then differ across thread counts. Runs
# with the same thread count must still agree bitwise, and so must checkpoint intervals.
LSTM_CASES = [
    ("neuron", "fanout1", "clip", "h"),
    ("full", "fanout3", "retroactive", "c"),
    ("scalar", "none_full", "softclip", "h"),
]


def run_lstm(fused, inputs, rule, modulator_input, threads, checkpoint_every=2):
    torch.set_num_threads(threads)
    return run_forward_backward(
        fused.plastic_lstm_sequence,
        inputs,
        rule=rule,
        clip=CLIP,
        modulator_input=modulator_input,
        checkpoint_every=checkpoint_every,
    )


@pytest.mark.parametrize("alpha,modulation,rule,modulator_input", LSTM_CASES)
def test_lstm_repeatable_and_checkpoint_interval(fused, alpha, modulation, rule, modulator_input):
    inputs = lstm_inputs(alpha, modulation, rule, T=5, dtype=torch.float32, **SIZES)
    first = run_lstm(fused, inputs, rule, modulator_input, threads=2)
    for k in (2, 1, 3, 5):
        assert_results_equal(
            first, run_lstm(fused, inputs, rule, modulator_input, threads=2, checkpoint_every=k)
        )


@pytest.mark.parametrize("alpha,modulation,rule,modulator_input", LSTM_CASES)
def test_lstm_step_repeatable(fused, alpha, modulation, rule, modulator_input):
    inputs = lstm_inputs(alpha, modulation, rule, dtype=torch.float32, **SIZES)

    def run():
        return run_forward_backward(
            fused.plastic_lstm_step, inputs, rule=rule, clip=CLIP, modulator_input=modulator_input
        )

    assert_results_equal(run(), run())


@pytest.mark.parametrize("rule", RULES)
def test_primitives_repeatable_and_thread_count(fused, rule):
    B, P, N = 9, 5, 70
    gen = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(s, generator=gen)  # noqa: E731
    update_inputs = dict(
        hebb=t(B, P, N),
        pre=t(B, P),
        post=t(B, N),
        eta=t(P, N),
        elig=t(B, P, N) if rule == "retroactive" else None,
        elig_rate=torch.tensor(0.3) if rule == "retroactive" else None,
    )
    matvec_inputs = dict(x=t(B, P), w=t(P, N), alpha=t(N), hebb=t(B, P, N))

    def run(threads):
        torch.set_num_threads(threads)
        update = run_forward_backward(fused.hebb_update, update_inputs, rule=rule, clip=CLIP)
        matvec = run_forward_backward(lambda **kw: (fused.plastic_matvec(**kw),), matvec_inputs)
        return update, matvec

    (update, matvec) = run(2)
    update_again, matvec_again = run(2)
    assert_results_equal(update, update_again)
    assert_results_equal(matvec, matvec_again)
    update_one, matvec_one = run(1)
    assert_results_equal(update, update_one)
    assert_results_equal(matvec, matvec_one, keys=("x", "alpha", "hebb"))
