"""The CUDA kernels in the CPU emulator, beyond the op matrix that every op test runs through
them (conftest.py, fixture `fused`): grids of several batch chunks, column tiles and row blocks
with partial tiles, feed-forward shapes (P != N), and the emulator's own bounds checks."""
import pytest
import torch

from backpropamine_cuda import reference
from helpers import (RULE_CONFIG, RULES, TOL, assert_results_close, assert_results_equal,
                     compare_with_reference, lstm_inputs, rnn_inputs, run_forward_backward,
                     upcast)

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


@pytest.mark.parametrize("modulator_input", ["h", "c"])
def test_lstm_sequence_several_tiles(emulated, modulator_input):
    inputs = lstm_inputs("full", "fanout3", "retroactive", T=2, B=9, N=KERNEL_THREADS + 1,
                         dtype=torch.float32, seed=21)
    compare_with_reference(reference.plastic_lstm_sequence, emulated.plastic_lstm_sequence, inputs,
                           rule="retroactive", clip=CLIP, modulator_input=modulator_input)


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
    update = dict(hebb=t(B, P, N), pre=t(B, P), post=t(B, N),
                  eta=t(B, 1, N) if eta_shape == "per_post" else t(P, N))
    kw = dict(rule="softclip", clip=CLIP)
    expected = run_forward_backward(lambda **a: reference.hebb_update(**a)[:1], update, **kw)
    actual = run_forward_backward(lambda **a: emulated.hebb_update(**a)[:1], update, **kw)
    assert_results_close(expected, actual, torch.float64)


def test_emulator_checks_bounds(fused_cpu):
    column_sums = torch.ops.backpropamine_emulated.emulator_column_sums
    src = torch.arange(12, dtype=torch.float32)
    torch.testing.assert_close(column_sums(src, 3, 4), src.view(3, 4).sum(0), **TOL[torch.float32])
    with pytest.raises(IndexError, match="bp kernel emulator: memory index 12 out of bounds "
                       "for size 12"):
        column_sums(src, 4, 4)  # one row past the end


@pytest.fixture
def reverse_thread_order(fused_cpu):
    torch.ops.backpropamine_emulated.emulator_reverse_thread_order(True)
    yield
    torch.ops.backpropamine_emulated.emulator_reverse_thread_order(False)


def _race_cases():
    rnn = [("rnn", *RULE_CONFIG[r], r) for r in RULES]
    return rnn + [("lstm", "full", "fanout3", "retroactive"), ("lstm", "neuron", "none_full", "clip")]


@pytest.mark.parametrize("kind,alpha,modulation,rule", _race_cases())
def test_kernels_do_not_depend_on_thread_order(emulated, kind, alpha, modulation, rule,
                                               request):
    """Threads of a phase run in reverse order give the same bits: no thread reads, within a
    phase, what another one writes in it (a race on a GPU)."""
    make = rnn_inputs if kind == "rnn" else lstm_inputs
    op = getattr(emulated, f"plastic_{kind}_sequence")
    inputs = make(alpha, modulation, rule, T=3, B=9, N=KERNEL_THREADS + 3, seed=22)
    in_order = run_forward_backward(op, inputs, rule=rule, clip=CLIP, checkpoint_every=2)
    request.getfixturevalue("reverse_thread_order")
    reversed_order = run_forward_backward(op, inputs, rule=rule, clip=CLIP, checkpoint_every=2)
    assert_results_equal(in_order, reversed_order)
