"""CUDA: the modules on the GPU against the CPU, device checks. Skipped without a GPU.

The op tests (test_rnn_ops.py, test_lstm_ops.py, test_primitives.py, ...) run on the GPU too,
through the `fused` fixture of conftest.py. Without CUDA kernels in the build, impl="auto" on
CUDA runs the reference and impl="fused" raises RuntimeError.
"""

import pytest
import torch

import backpropamine_cuda as bp
from backpropamine_cuda import reference

from helpers import (
    RNN_INPUTS,
    RULE_CONFIG,
    RULES,
    TOL,
    OnCuda,
    assert_results_close,
    assert_results_equal,
    lstm_inputs,
    relative_error,
    rnn_inputs,
    run_forward_backward,
    upcast,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

I, N = 4, 7
OPTIONS = [
    dict(alpha="full", modulation="fanout", n_modulators=3, rule="clip"),
    dict(alpha="neuron", modulation="simple", rule="retroactive"),
    dict(alpha="scalar", modulation="none", eta_shape="full", rule="oja"),
]


def has_cuda_kernels():
    return bp.fused.has_cuda_kernels()


requires_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_cuda_kernels(), reason="no CUDA kernels built"
)


def forward_backward(module, x):
    module.zero_grad()
    out, state = module(x)
    (out.square().sum() + state.hebb.sin().sum()).backward()
    # Copies: on the CPU .cpu() returns the gradient itself, which module.cuda() then moves.
    return (
        out.detach().cpu(),
        state.hebb.detach().cpu(),
        {k: p.grad.to("cpu", copy=True) for k, p in module.named_parameters()},
    )


def assert_same(a, b, dtype):
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    (out_a, hebb_a, grads_a), (out_b, hebb_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, **tol)
    torch.testing.assert_close(hebb_a, hebb_b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(
            grads_a[k], grads_b[k], **tol, msg=lambda message, k=k: f"grad of {k}: {message}"
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize(
    "cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM, bp.PlasticLSTMCell]
)
def test_module_cuda_matches_cpu(cls, options, dtype):
    torch.manual_seed(0)
    module = cls(I, N, **options).to(dtype)
    sequence = cls in (bp.PlasticRNN, bp.PlasticLSTM)
    x = torch.randn(*((5,) if sequence else ()), 3, I, dtype=dtype)
    cpu = forward_backward(module, x)  # fused CPU kernels
    cuda = forward_backward(module.cuda(), x.cuda())  # impl="auto" on the GPU
    assert_same(cuda, cpu, dtype)


def test_auto_on_cuda_without_kernels_is_the_reference():
    if has_cuda_kernels():
        pytest.skip("CUDA kernels are built: impl='auto' uses them")
    torch.manual_seed(0)
    rnn = bp.PlasticRNN(I, N, rule="retroactive", n_modulators=2).cuda()
    x = torch.randn(5, 3, I, device="cuda")
    auto = forward_backward(rnn, x)
    rnn.impl = "reference"
    reference = forward_backward(rnn, x)
    assert_same(auto, reference, torch.float64)  # same computation: tight tolerance


def test_fused_on_cuda():
    rnn = bp.PlasticRNN(I, N, impl="fused").cuda()
    x = torch.randn(5, 3, I, device="cuda")
    if has_cuda_kernels():
        out, _ = rnn(x)
        assert out.is_cuda
    else:
        with pytest.raises(
            RuntimeError, match="impl='fused': no fused kernels for torch.float32 tensors on cuda"
        ):
            rnn(x)


def test_module_state_on_wrong_device():
    rnn = bp.PlasticRNN(I, N, impl="auto").cuda()
    x = torch.randn(5, 3, I, device="cuda")
    state = bp.PlasticState(torch.zeros(3, N), torch.zeros(3, N, N))
    with pytest.raises(
        ValueError,
        match="state.h must have dtype torch.float32 on cuda:0 like the "
        "input, got torch.float32 on cpu",
    ):
        rnn(x, state)


@requires_cuda_kernels
@pytest.mark.parametrize("name", [n for n in RNN_INPUTS if n not in ("x", "eta")])
def test_op_device_mismatch(name):
    inputs = rnn_inputs("full", "fanout3", "retroactive", T=3, B=2, N=5)
    inputs = {k: v.cuda() for k, v in inputs.items() if v is not None}
    inputs[name] = inputs[name].cpu()
    with pytest.raises(
        RuntimeError,
        match=f"plastic_rnn_sequence: expected {name} on device "
        r"cuda:0 \(the device of the first argument\), got cpu",
    ):
        bp.fused.plastic_rnn_sequence(**inputs, eta=None, rule="retroactive", clip=1.0)


@requires_cuda_kernels
@pytest.mark.parametrize("rule", ["clip", "softclip", "decay", "oja", "retroactive"])
def test_ops_cuda_match_cpu(rule):
    modulation = "none_full" if rule in ("decay", "oja") else "fanout3"
    inputs = rnn_inputs("neuron", modulation, rule, T=4, B=3, N=33)
    cpu = bp.fused.plastic_rnn_sequence(**inputs, rule=rule, clip=0.5)
    cuda = bp.fused.plastic_rnn_sequence(
        **{k: None if v is None else v.cuda() for k, v in inputs.items()}, rule=rule, clip=0.5
    )
    for a, e in zip(cuda, cpu):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a.cpu(), e, **TOL[torch.float64])


def assert_as_accurate_as(actual, bars, expected, dtype, factor=10):
    """Norm-wise, every output and gradient of `actual` is within `factor` times the largest
    error of the `bars` (other runs of the same computation) against `expected` (the float64
    reference), or 64 unit roundoffs of `dtype`. Element-wise tolerances do not hold at
    N = 100: the gradients grow over the steps, and the GPU's tanh and fused multiply-adds round
    differently from the CPU's in the last bit."""
    out_a, grad_a = actual
    out_e, grad_e = expected
    floor = 32 * torch.finfo(dtype).eps
    names = [(f"output {k}", k) for k, e in enumerate(out_e) if e is not None]
    names += [(f"grad of {k}", k) for k in grad_e]
    for name, k in names:
        pick = (lambda r: r[0][k]) if name.startswith("output") else (lambda r: r[1][k])
        err = relative_error(pick(actual), pick(expected))
        bar = max(relative_error(pick(b), pick(expected)) for b in bars)
        assert err <= factor * max(bar, floor), (
            f"{name}: norm-wise error {err:.3g} on the GPU, at most {bar:.3g} in the other runs"
        )


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["whole", "steps"])
@pytest.mark.parametrize("rule", RULES)
def test_rnn_sequence_paths_on_gpu(monkeypatch, rule, path, dtype):
    """The RNN sequence op's whole-sequence kernels (one launch forward, one backward) and its
    per-step kernels on the GPU, at the maze's N = 100 and at N = 33, against the reference:
    as accurate as the same path on the CPU or the reference on the GPU (and, in float32, the
    float32 reference on the CPU); bitwise
    reproducible run to run (no atomics)."""
    monkeypatch.setenv("BACKPROPAMINE_SEQUENCE_PATH", path)
    alpha, modulation = RULE_CONFIG[rule]
    # At N = 100 a smaller trace and rate than the defaults: with those the float32 reference
    # itself errs by up to 80 % (gradients growing to 1e5 over 9 steps).
    for N, L, scale in ((100, 4, 0.1), (33, 100, 1.0)):
        inputs = rnn_inputs(
            alpha,
            modulation,
            rule,
            T=9,
            B=3,
            N=N,
            dtype=dtype,
            seed=40,
            hebb_scale=scale,
            eta_scale=0.5 * scale,
        )
        kw = dict(rule=rule, clip=0.5)
        op = OnCuda(bp.fused).plastic_rnn_sequence
        expected = run_forward_backward(reference.plastic_rnn_sequence, upcast(inputs), **kw)
        actual = run_forward_backward(op, inputs, **kw, checkpoint_every=L)
        # The bars: the same op on the CPU, and the reference on the GPU (the GPU's tanh and
        # matrix products round differently from the CPU's, and the steps amplify it).
        bars = [
            run_forward_backward(bp.fused.plastic_rnn_sequence, inputs, **kw, checkpoint_every=L),
            run_forward_backward(OnCuda(reference).plastic_rnn_sequence, inputs, **kw),
        ]
        if dtype != torch.float64:
            bars.append(run_forward_backward(reference.plastic_rnn_sequence, inputs, **kw))
        assert_as_accurate_as(actual, bars, expected, dtype)
        assert_results_equal(actual, run_forward_backward(op, inputs, **kw, checkpoint_every=L))


@requires_cuda_kernels
def test_whole_sequence_too_large_for_shared_memory():
    """N = 300 in float32 needs 360 KB of shared memory for the trace alone: more than any GPU's
    block has. auto runs the per-step kernels; whole says why it cannot."""
    inputs = rnn_inputs("neuron", "fanout1", "clip", T=2, B=1, N=300, dtype=torch.float32)
    inputs = {k: None if v is None else v.cuda() for k, v in inputs.items()}
    out = bp.fused.plastic_rnn_sequence(**inputs, rule="clip", clip=0.5)[0]
    assert out.is_cuda
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BACKPROPAMINE_SEQUENCE_PATH", "whole")
        with pytest.raises(
            ValueError,
            match="BACKPROPAMINE_SEQUENCE_PATH=whole: the whole-sequence kernels at N = 300 need",
        ):
            bp.fused.plastic_rnn_sequence(**inputs, rule="clip", clip=0.5)


SYNC_FREE_OPS = [
    ("rnn", "whole"),
    ("rnn", "steps"),
    ("lstm", "steps"),
    ("rollout", "steps"),
    ("hebb_update", "steps"),
]


@requires_cuda_kernels
@pytest.mark.parametrize("op, path", SYNC_FREE_OPS, ids=lambda v: str(v))
def test_ops_do_not_synchronise(monkeypatch, op, path):
    """Every op reads elig_rate where its kernels run: forward and backward (the rollout step:
    forward) make no host synchronisation, on both paths of the sequence ops."""
    monkeypatch.setenv("BACKPROPAMINE_SEQUENCE_PATH", path)
    make = lstm_inputs if op == "lstm" else rnn_inputs
    inputs = make("neuron", "fanout1", "retroactive", T=None if op == "rollout" else 5, B=2, N=33)
    leaves = {
        k: None if v is None else v.cuda().requires_grad_(op != "rollout")
        for k, v in inputs.items()
    }
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if op == "rollout":
            bp.fused.plastic_rnn_rollout_step(**leaves, u=None, rule="retroactive", clip=0.5)
        elif op == "hebb_update":
            d = leaves
            pre, post = d["h"], torch.tanh(d["h"])
            eta = 0.1 * torch.ones_like(d["h"]).unsqueeze(1)  # per post-synaptic neuron
            outputs = bp.fused.hebb_update(
                d["hebb"],
                pre,
                post,
                eta,
                "retroactive",
                0.5,
                elig=d["elig"],
                elig_rate=d["elig_rate"],
            )
            sum(o.sum() for o in outputs).backward()
        else:
            fn = bp.fused.plastic_lstm_sequence if op == "lstm" else bp.fused.plastic_rnn_sequence
            outputs = fn(**leaves, rule="retroactive", clip=0.5)
            sum(o.sum() for o in outputs if o is not None).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if op != "rollout":
        assert leaves["elig_rate"].grad is not None


# Sizes that reach the tiled code the small tests miss: several 128-column tiles with a partial
# last one (N % 128 != 0), several row blocks, batch chunks of 8 with a tail (B = 17), and the
# PTB layer's N = 1149.
TILED_SIZES = [(129, 1, 5), (257, 17, 3), (1149, 6, 3)]
TILED_OPS = {
    "rnn": (rnn_inputs, "plastic_rnn_sequence"),
    "lstm": (lstm_inputs, "plastic_lstm_sequence"),
}


@requires_cuda_kernels
@pytest.mark.parametrize("N, B, T", TILED_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("rule", ["clip", "retroactive"])
@pytest.mark.parametrize("path", ["auto", "steps"])
@pytest.mark.parametrize("op", TILED_OPS)
def test_tiled_sizes_match_emulator(monkeypatch, op, path, rule, N, B, T):
    """The native kernels at multi-tile sizes against the same kernels run by the emulator (same
    sources, every memory access bounds-checked) and against the float64 reference, forward and
    every gradient, in float64. `auto` takes the whole-sequence kernels where a sample's trace
    fits in a block's shared memory (the RNN at N = 129)."""
    monkeypatch.setenv("BACKPROPAMINE_SEQUENCE_PATH", path)
    make_inputs, name = TILED_OPS[op]
    alpha, modulation = RULE_CONFIG[rule]
    inputs = make_inputs(
        alpha, modulation, rule, T=T, B=B, N=N, seed=N + B, hebb_scale=0.3, eta_scale=0.2
    )
    kw = dict(rule=rule, clip=0.5)
    native = run_forward_backward(getattr(OnCuda(bp.fused), name), inputs, **kw)
    emulated = run_forward_backward(getattr(bp.fused.emulated_cuda, name), inputs, **kw)
    expected = run_forward_backward(getattr(reference, name), inputs, **kw)
    assert_results_close(emulated, native, torch.float64)
    assert_results_close(expected, native, torch.float64)


def capture_and_replay(step):
    """Captures step() (forward and backward, no host synchronisation allowed) in a CUDA graph
    after warm-up runs on a side stream, replays it, and returns the replay's results."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    return captured


@requires_cuda_kernels
@pytest.mark.parametrize("rule", ["clip", "retroactive"])
@pytest.mark.parametrize("path", ["whole", "steps"])
@pytest.mark.parametrize("op", TILED_OPS)
def test_sequence_op_captures_in_cuda_graph(monkeypatch, op, path, rule):
    """Forward and backward of the sequence ops captured in a torch.cuda.CUDAGraph and replayed
    give the eager results: no op synchronises with the host."""
    if op == "lstm" and path == "whole":
        pytest.skip("the LSTM has no whole-sequence kernels on the GPU")
    monkeypatch.setenv("BACKPROPAMINE_SEQUENCE_PATH", path)
    make_inputs, name = TILED_OPS[op]
    alpha, modulation = RULE_CONFIG[rule]
    inputs = make_inputs(alpha, modulation, rule, T=4, B=3, N=33, dtype=torch.float32)
    leaves = {k: None if v is None else v.cuda().requires_grad_() for k, v in inputs.items()}
    given = {k: v for k, v in leaves.items() if v is not None}
    fn = getattr(bp.fused, name)

    def step():
        outputs = fn(**leaves, rule=rule, clip=0.5)
        loss = sum(o.sum() for o in outputs if o is not None)
        return [o.detach() for o in outputs if o is not None] + list(
            torch.autograd.grad(loss, list(given.values()))
        )

    eager = [t.clone() for t in step()]
    replayed = capture_and_replay(step)
    for k, (a, e) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(a, e, **TOL[torch.float32], msg=f"result {k}")


@requires_cuda_kernels
def test_rollout_step_captures_in_cuda_graph():
    """The rollout step (the RL agents' acting step, writing the new traces into given buffers)
    captured in a CUDA graph and replayed gives the eager results."""
    inputs = rnn_inputs("full", "fanout1", "retroactive", B=3, N=33, dtype=torch.float32)
    d = {k: None if v is None else v.cuda() for k, v in inputs.items()}
    hebb_out, elig_out = torch.empty_like(d["hebb"]), torch.empty_like(d["elig"])

    def step():
        outputs = bp.fused.plastic_rnn_rollout_step(
            d["x"],
            None,
            d["h"],
            d["hebb"],
            d["elig"],
            d["w"],
            d["alpha"],
            d["eta"],
            d["elig_rate"],
            d["h2mod_weight"],
            d["h2mod_bias"],
            d["fanout_weight"],
            d["fanout_bias"],
            rule="retroactive",
            clip=0.5,
            hebb_out=hebb_out,
            elig_out=elig_out,
        )
        return [o for o in outputs if o is not None] + [hebb_out, elig_out]

    eager = [t.clone() for t in step()]
    replayed = capture_and_replay(step)
    for k, (a, e) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(a, e, **TOL[torch.float32], msg=f"result {k}")


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_primitives_forward_bitwise_as_emulated(rule, dtype):
    """The feed-forward primitives' kernels, native and emulated, at a multi-tile size with a
    batch-chunk tail: the same arithmetic in the same order (no contraction into fused
    multiply-adds on either side, `--fmad=false`), so their forward outputs agree bit for bit;
    gradients (some through ATen's products, which differ by device) to the float64 tolerance."""
    from test_primitives import matvec_as_tuple, matvec_inputs, update_inputs

    B, P, N = 17, 129, 257
    update = update_inputs(rule, (P, N), B, P, N, dtype=dtype, seed=3)
    kw = dict(rule=rule, clip=0.5)
    for make, inputs, kwargs in (
        (lambda ops: ops.hebb_update, update, kw),
        (matvec_as_tuple, matvec_inputs("full", B, P, N, dtype), {}),
    ):
        native = run_forward_backward(make(OnCuda(bp.fused)), inputs, **kwargs)
        emulated = run_forward_backward(make(bp.fused.emulated_cuda), inputs, **kwargs)
        assert_results_equal((native[0], {}), (emulated[0], {}))
        if dtype == torch.float64:
            assert_results_close(emulated, native, dtype)
