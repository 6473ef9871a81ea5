"""The fused ops under autograd's and autocast's rules, on every backend (CPU kernels, the CUDA
kernels in the CPU emulator, and the GPU when there is one):

* in-place updates: the rollout step's writes into hebb, elig (or hebb_out, elig_out) bump their
  version counters, so that a graph that saved them raises autograd's in-place error, as with
  the reference, instead of backpropagating silently wrong;
* double backward: create_graph=True gives the same first-order gradients, and differentiating
  them again raises a clear error (impl="reference" supports it);
* autocast: the ops run in float32 under torch.autocast (as PyTorch's recurrent ops do), so
  mixed-precision code works unchanged.

Argument validation (shapes, dtypes, devices, contiguity) is in the test_validation_*.py files.
"""

import pytest
import torch

import backpropamine_cuda as bp
from backpropamine_cuda import reference

from helpers import LSTM_INPUTS, RNN_INPUTS, lstm_inputs, make, rnn_inputs, with_grad

IN_PLACE_ERROR = "modified by an inplace operation"
DOUBLE_BACKWARD_ERROR = (
    "double backward through the fused ops is not supported",
    "impl='reference'",
)


@pytest.fixture(params=["cpu", "emulated_cuda", "cuda"])
def backend(request, fused_cpu):
    """(fused functions, device of their tensors)."""
    if request.param == "cpu":
        return fused_cpu, "cpu"
    if request.param == "emulated_cuda":
        return fused_cpu.emulated_cuda, "cpu"
    if not torch.cuda.is_available() or not fused_cpu.has_cuda_kernels():
        pytest.skip("no CUDA device or no CUDA kernels built")
    return fused_cpu, "cuda"


def on(device, inputs):
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


def rollout_inputs(device, rule="retroactive"):
    modulation = "fanout3" if rule == "retroactive" else "none_full"
    inputs = on(device, rnn_inputs("full", modulation, rule, B=2, N=5))
    return dict(inputs, u=None, rule=rule, clip=0.5)


# ---------------------------------------------------------------------------------------------
# In-place updates of the rollout step


@pytest.mark.parametrize("trace", ["hebb", "elig"])
def test_rollout_step_in_place_is_seen_by_autograd(backend, trace):
    """A graph that saved a trace, then a rollout step that updates it in place: backward raises
    autograd's in-place error with the fused op as with the reference (no wrong gradients)."""
    ops, device = backend
    for fn in (reference.plastic_rnn_rollout_step, ops.plastic_rnn_rollout_step):
        inputs = rollout_inputs(device)
        p = torch.randn(2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
        loss = (inputs[trace] * p).sum()  # mul saves the trace for the gradient of p
        with torch.no_grad():
            fn(**inputs)
        with pytest.raises(RuntimeError, match=IN_PLACE_ERROR):
            loss.backward()


def test_rollout_step_after_plastic_matvec(backend):
    """The same through the fused matvec, which saves hebb for its backward."""
    ops, device = backend
    inputs = rollout_inputs(device, rule="clip")
    alpha = inputs["alpha"].clone().requires_grad_()
    u = ops.plastic_matvec(inputs["h"], inputs["w"], alpha, inputs["hebb"])
    with torch.no_grad():
        ops.plastic_rnn_rollout_step(**inputs)
    with pytest.raises(RuntimeError, match=IN_PLACE_ERROR):
        u.sum().backward()


def test_rollout_step_into_other_traces(backend):
    """With hebb_out and elig_out the step writes there: a graph that saved hebb still
    backpropagates (hebb is untouched), one that saved hebb_out or elig_out raises."""
    ops, device = backend
    inputs = rollout_inputs(device)
    p = torch.randn(2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    outs = {
        "hebb_out": torch.zeros_like(inputs["hebb"]),
        "elig_out": torch.zeros_like(inputs["elig"]),
    }
    keeps = (inputs["hebb"] * p).sum() + (inputs["elig"] * p).sum()
    raises = {name: (out * p).sum() for name, out in outs.items()}
    with torch.no_grad():
        ops.plastic_rnn_rollout_step(**inputs, **outs)
    keeps.backward()
    torch.testing.assert_close(p.grad, inputs["hebb"] + inputs["elig"], rtol=0, atol=0)
    for loss in raises.values():
        with pytest.raises(RuntimeError, match=IN_PLACE_ERROR):
            loss.backward()


@pytest.mark.parametrize("namespace", ["backpropamine", "backpropamine_emulated"])
def test_raw_rollout_op_bumps_exactly_the_written_versions(namespace):
    """The op itself, called through torch.ops (no Python wrapper), bumps the version counters
    of the traces it writes, and only those."""
    op = getattr(torch.ops, namespace).plastic_rnn_rollout_step
    inputs = rnn_inputs("full", "fanout3", "retroactive", B=2, N=5)
    args = [inputs[k] for k in ("x",)] + [None] + [inputs[k] for k in RNN_INPUTS[1:]]
    hebb, elig = inputs["hebb"], inputs["elig"]
    before = hebb._version, elig._version
    op(*args, "retroactive", 0.5)
    assert (hebb._version, elig._version) > before
    assert hebb._version > before[0] and elig._version > before[1]
    hebb_out, elig_out = torch.empty_like(hebb), torch.empty_like(elig)
    before = hebb._version, elig._version, hebb_out._version, elig_out._version
    op(*args, "retroactive", 0.5, None, hebb_out, elig_out)
    assert (hebb._version, elig._version) == before[:2]
    assert hebb_out._version > before[2] and elig_out._version > before[3]


def test_recorded_rollout_reusing_only_checkpoints_guards_an_unfinished_backward():
    """RecordedRollout(reuse=...): a rollout of another length takes over only the earlier
    one's checkpoint buffers (written by the rollout step as hebb_out and elig_out, not by
    Python): the earlier replay's pending backward raises instead of giving wrong gradients."""
    layer = make(bp.PlasticRNN, dict(rule="retroactive"), impl="fused")
    x = torch.randn(10, 2, layer.input_size, dtype=torch.float64)
    first = layer.recorded_rollout(2, 10, x)  # checkpoints every 4 steps: 2 of them
    for t in range(10):
        first.step(x[t])
    out, _ = first.replay(x)
    old_checkpoints = first._record.hebb_checkpoints.data_ptr()
    old_out = first._record.out.data_ptr()
    second = layer.recorded_rollout(2, 9, x[:9], reuse=first)  # every 3 steps: 2 of them
    assert second._record.hebb_checkpoints.data_ptr() == old_checkpoints
    assert second._record.out.data_ptr() != old_out  # (10, B, N) does not fit (9, B, N)
    for t in range(9):
        second.step(x[t] + 1)
    with pytest.raises(RuntimeError, match=IN_PLACE_ERROR):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------
# Double backward


def first_order_grads(fn, inputs, create_graph, **kwargs):
    """Gradients of a fixed weighting of fn's outputs with respect to every input tensor."""
    leaves = with_grad(inputs)
    outputs = fn(**leaves, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(7)
    loss = sum(
        (o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum()
        for o in outputs
        if o is not None
    )
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(
        loss, [leaves[k] for k in names], create_graph=create_graph, allow_unused=True
    )
    return dict(zip(names, grads)), leaves


def rnn_case(op):
    inputs = rnn_inputs(
        "full", "fanout3", "retroactive", B=2, N=4, T=3 if op == "sequence" else None
    )
    return inputs, dict(rule="retroactive", clip=0.5)


def lstm_case(op):
    inputs = lstm_inputs(
        "neuron", "fanout1", "retroactive", B=2, N=4, T=3 if op == "sequence" else None
    )
    return inputs, dict(rule="retroactive", clip=0.5, modulator_input="c")


def matvec_case(op):
    gen = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(x=t(2, 3), w=t(3, 4), alpha=t(3, 4), hebb=t(2, 3, 4)), {}


def update_case(op):
    gen = torch.Generator().manual_seed(4)
    t = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    return (
        dict(
            hebb=t(2, 3, 4),
            pre=t(2, 3),
            post=t(2, 4),
            eta=t(2, 1, 4),
            elig=t(2, 3, 4),
            elig_rate=torch.tensor(0.3, dtype=torch.float64),
        ),
        dict(rule="retroactive", clip=0.5),
    )


DOUBLE_BACKWARD_CASES = {
    "plastic_rnn_sequence": rnn_case,
    "plastic_rnn_step": rnn_case,
    "plastic_lstm_sequence": lstm_case,
    "plastic_lstm_step": lstm_case,
    "plastic_matvec": matvec_case,
    "hebb_update": update_case,
}


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD_CASES))
def test_create_graph_first_order_grads_and_clear_double_backward_error(backend, name):
    """create_graph=True (gradient-penalty code asks for it even for first-order use) gives the
    gradients of a plain backward; differentiating them again raises a clear error."""
    ops, device = backend
    inputs, kwargs = DOUBLE_BACKWARD_CASES[name]("sequence" if "sequence" in name else "step")
    inputs = on(device, inputs)
    fn = getattr(ops, name)
    plain, _ = first_order_grads(fn, inputs, create_graph=False, **kwargs)
    graphed, leaves = first_order_grads(fn, inputs, create_graph=True, **kwargs)
    assert plain.keys() == graphed.keys()
    for k in plain:
        assert (plain[k] is None) == (graphed[k] is None), k
        if plain[k] is not None:
            torch.testing.assert_close(graphed[k].detach(), plain[k], rtol=0, atol=0, msg=k)
    penalty = sum(g.square().sum() for g in graphed.values() if g is not None)
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(
            penalty, [v for v in leaves.values() if v is not None], allow_unused=True
        )
    for fragment in DOUBLE_BACKWARD_ERROR:
        assert fragment in str(info.value)


def test_gradient_penalty_on_modules():
    """A gradient penalty on a fused module: the clear error, naming impl='reference', with which
    the same code runs."""
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        rnn = bp.PlasticRNN(3, 5, impl=impl, rule="retroactive").double()
        out, state = rnn(x)
        loss = out.square().sum() + state.hebb.sum()
        grads = torch.autograd.grad(loss, list(rnn.parameters()), create_graph=True)
        penalty = loss + sum(g.square().sum() for g in grads)
        if impl == "reference":
            penalty.backward()
            continue
        with pytest.raises(RuntimeError) as info:
            penalty.backward()
        for fragment in DOUBLE_BACKWARD_ERROR:
            assert fragment in str(info.value)


def test_replay_create_graph():
    """The recorded rollout's replay (its own autograd node) follows the same rule."""
    layer = make(bp.PlasticRNN, dict(rule="retroactive"), impl="fused")
    x = torch.randn(5, 2, layer.input_size, dtype=torch.float64)
    rollout = layer.recorded_rollout(2, 5, x)
    for t in range(5):
        rollout.step(x[t])
    params = list(layer.parameters())
    grads = []
    for create_graph in (False, True):
        out, m = rollout.replay(x)
        grads.append(
            torch.autograd.grad(out.square().sum() + m.sum(), params, create_graph=create_graph)
        )
    for plain, graphed in zip(*grads):
        torch.testing.assert_close(graphed.detach(), plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError) as info:
        sum(g.square().sum() for g in grads[1]).backward()
    for fragment in DOUBLE_BACKWARD_ERROR:
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# autocast


def autocast_device(device):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


AUTOCAST_CASES = [
    ("plastic_rnn_sequence", RNN_INPUTS, rnn_case),
    ("plastic_rnn_step", RNN_INPUTS, rnn_case),
    ("plastic_lstm_sequence", LSTM_INPUTS, lstm_case),
    ("plastic_lstm_step", LSTM_INPUTS, lstm_case),
]


@pytest.mark.parametrize("name,names,case", AUTOCAST_CASES, ids=[c[0] for c in AUTOCAST_CASES])
def test_ops_under_autocast_run_in_float32(backend, name, names, case):
    """x in the autocast dtype (as a Linear under autocast returns it), the parameters and state
    in float32: the op casts x to float32 and runs; outputs and gradients are exactly those of
    the op on the upcast x."""
    ops, device = backend
    inputs, kwargs = case("sequence" if "sequence" in name else "step")
    inputs = on(device, {k: None if v is None else v.float() for k, v in inputs.items()})
    low = torch.float16 if device == "cuda" else torch.bfloat16
    inputs["x"] = inputs["x"].to(low)
    fn = getattr(ops, name)
    results = []
    for autocast in (True, False):
        leaves = with_grad(inputs)
        x = leaves["x"]
        with autocast_device(device) if autocast else torch.autocast(device, enabled=False):
            outputs = fn(**dict(leaves, x=x if autocast else x.float()), **kwargs)
        loss = sum((o.float() * (k + 1)).sum() for k, o in enumerate(outputs) if o is not None)
        loss.backward()
        results.append(
            (
                [o for o in outputs if o is not None],
                {k: v.grad for k, v in leaves.items() if v is not None},
            )
        )
    (outs_a, grads_a), (outs_e, grads_e) = results
    for a, e in zip(outs_a, outs_e):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert grads_a["x"].dtype == low
    for k in grads_e:
        torch.testing.assert_close(grads_a[k], grads_e[k], rtol=0, atol=0, msg=k)


def test_rollout_step_under_autocast(backend):
    """The rollout step casts x (and the drive) to float32 and updates the float32 traces in
    place, exactly as on the upcast x; a trace in the autocast dtype is a clear dtype error (a
    cast copy would drop the update)."""
    ops, device = backend
    inputs = {
        k: v.float() if isinstance(v, torch.Tensor) else v
        for k, v in rollout_inputs(device).items()
    }
    low = torch.float16 if device == "cuda" else torch.bfloat16
    x = inputs["x"].to(low)
    expected = dict(inputs, x=x.float(), hebb=inputs["hebb"].clone(), elig=inputs["elig"].clone())
    outs_e = ops.plastic_rnn_rollout_step(**expected)
    outs_e = (*outs_e, *ops.plastic_rnn_rollout_step(**dict(expected, u=outs_e[1].to(low).float())))
    with autocast_device(device):
        outs_a = ops.plastic_rnn_rollout_step(**dict(inputs, x=x))
        outs_a = (*outs_a, *ops.plastic_rnn_rollout_step(**dict(inputs, x=x, u=outs_a[1].to(low))))
        with pytest.raises(RuntimeError, match="expected hebb to have dtype Float"):
            ops.plastic_rnn_rollout_step(**dict(inputs, x=x, hebb=inputs["hebb"].to(low)))
    for name in ("hebb", "elig"):
        torch.testing.assert_close(inputs[name], expected[name], rtol=0, atol=0, msg=name)
    for a, e in zip(outs_a, outs_e):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticLSTM])
def test_modules_under_cpu_autocast(cls):
    """A fused module after a Linear, under CPU autocast in bfloat16: forward and backward run
    (the plastic op in float32), the state carries over to the next call, and everything agrees
    with the float32 run to bfloat16's precision."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 3)
    layer = cls(3, 5, impl="fused", rule="retroactive", n_modulators=2)
    x = torch.randn(6, 2, 3)
    results = []
    for autocast in (True, False):
        linear.zero_grad()
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            projected = linear(x)
            assert projected.dtype == (torch.bfloat16 if autocast else torch.float32)
            out, state = layer(projected)
            out2, state2 = layer(projected, state)
        assert out.dtype == out2.dtype == state2.hebb.dtype == torch.float32
        (out.square().sum() + out2.sum() + state2.hebb.sum()).backward()
        grads = {
            k: p.grad.clone()
            for k, p in [*linear.named_parameters(prefix="linear"), *layer.named_parameters()]
        }
        results.append(((out.detach(), out2.detach(), state2.hebb.detach()), grads))
    (outs_a, grads_a), (outs_e, grads_e) = results
    for a, e in zip(outs_a, outs_e):
        torch.testing.assert_close(a, e, rtol=0.05, atol=0.05 * e.abs().max().item())
    assert grads_a.keys() == grads_e.keys()
    for k in grads_e:
        torch.testing.assert_close(
            grads_a[k], grads_e[k], rtol=0.05, atol=0.05 * grads_e[k].abs().max().item(), msg=k
        )


def test_rollout_step_module_under_cpu_autocast():
    torch.manual_seed(0)
    rnn = bp.PlasticRNN(3, 5, impl="fused", rule="retroactive")
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected, _ = rnn.rollout_step(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, state = rnn.rollout_step(x)
            h2, _ = rnn.rollout_step(x, state)
    assert h.dtype == h2.dtype == torch.float32
    torch.testing.assert_close(h, expected, rtol=0.05, atol=0.05)
