"""CUDA: the modules on the GPU against the CPU, device checks. Skipped without a GPU.

The op tests (test_rnn_ops.py, test_lstm_ops.py, test_primitives.py, ...) run on the GPU too,
through the `fused` fixture of conftest.py. Without CUDA kernels in the build, impl="auto" on
CUDA runs the reference and impl="fused" raises RuntimeError.
"""
import pytest
import torch

import backpropamine_cuda as bp
from helpers import RNN_INPUTS, TOL, rnn_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

I, N = 4, 7
OPTIONS = [dict(alpha="full", modulation="fanout", n_modulators=3, rule="clip"),
           dict(alpha="neuron", modulation="simple", rule="retroactive"),
           dict(alpha="scalar", modulation="none", eta_shape="full", rule="oja")]


def has_cuda_kernels():
    return bp.fused.has_cuda_kernels()


requires_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_cuda_kernels(), reason="no CUDA kernels built")


def forward_backward(module, x):
    module.zero_grad()
    out, state = module(x)
    (out.square().sum() + state.hebb.sin().sum()).backward()
    return out.detach().cpu(), state.hebb.detach().cpu(), {
        k: p.grad.cpu() for k, p in module.named_parameters()}


def assert_same(a, b, dtype):
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    (out_a, hebb_a, grads_a), (out_b, hebb_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, **tol)
    torch.testing.assert_close(hebb_a, hebb_b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], **tol, msg=k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("cls", [bp.PlasticRNN, bp.PlasticRNNCell, bp.PlasticLSTM,
                                 bp.PlasticLSTMCell])
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
        with pytest.raises(RuntimeError, match="impl='fused': no fused kernels for torch.float32 "
                           "tensors on cuda"):
            rnn(x)


def test_module_state_on_wrong_device():
    rnn = bp.PlasticRNN(I, N, impl="auto").cuda()
    x = torch.randn(5, 3, I, device="cuda")
    state = bp.PlasticState(torch.zeros(3, N), torch.zeros(3, N, N))
    with pytest.raises(ValueError, match="state.h must have dtype torch.float32 on cuda:0 like the "
                       "input, got torch.float32 on cpu"):
        rnn(x, state)


@requires_cuda_kernels
@pytest.mark.parametrize("name", [n for n in RNN_INPUTS if n not in ("x", "eta")])
def test_op_device_mismatch(name):
    inputs = rnn_inputs("full", "fanout3", "retroactive", T=3, B=2, N=5)
    inputs = {k: v.cuda() for k, v in inputs.items() if v is not None}
    inputs[name] = inputs[name].cpu()
    with pytest.raises(RuntimeError, match=f"plastic_rnn_sequence: expected {name} on device "
                       r"cuda:0 \(the device of the first argument\), got cpu"):
        bp.fused.plastic_rnn_sequence(**inputs, eta=None, rule="retroactive", clip=1.0)


@requires_cuda_kernels
@pytest.mark.parametrize("rule", ["clip", "softclip", "decay", "oja", "retroactive"])
def test_ops_cuda_match_cpu(rule):
    modulation = "none_full" if rule in ("decay", "oja") else "fanout3"
    inputs = rnn_inputs("neuron", modulation, rule, T=4, B=3, N=33)
    cpu = bp.fused.plastic_rnn_sequence(**inputs, rule=rule, clip=0.5)
    cuda = bp.fused.plastic_rnn_sequence(
        **{k: None if v is None else v.cuda() for k, v in inputs.items()}, rule=rule, clip=0.5)
    for a, e in zip(cuda, cpu):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a.cpu(), e, **TOL[torch.float64])
