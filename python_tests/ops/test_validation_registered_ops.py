"""Every tensor argument of every registered op (torch.ops.backpropamine), forward, backward and
rollout, in two configurations: a wrong shape, an empty tensor, a wrong dtype and a non-contiguous
tensor are each a RuntimeError that names the argument (never a crash or an out-of-bounds read),
and so is a tensor on another device (`meta`, whose fake kernel would otherwise win the dispatch
and return uninitialised memory). An optional gradient given where the rule has no such output is
a ValueError.

Device mismatches between the CPU and a GPU are in test_cuda.py.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (
    LSTM_INPUTS,
    RNN_INPUTS,
    TESTS,
    lstm_inputs,
    non_contiguous,
    rnn_inputs,
    subprocess_env,
)

OPS = torch.ops.backpropamine
B, N, T = 2, 5, 3
# torch.ops.backpropamine exists once the fused module has loaded the extension.
pytestmark = pytest.mark.usefixtures("fused_cpu")


# The sequence ops' initial state is named as the step ops' state in their messages.
MESSAGE_NAME = {"h0": "h", "hebb0": "hebb", "elig0": "elig", "c0": "c"}
# Two configurations: modulated (every optional trace argument given) and without modulation
# (eta given, the saved rates and modulator outputs empty).
CONFIGS = {
    "modulated": ("full", "fanout3", "retroactive"),
    "unmodulated": ("neuron", "none_full", "clip"),
}


def _recurrent_kwargs(op, config):
    """Valid keyword arguments (schema names) of the recurrent op `op`, backward ops from their
    forward's outputs."""
    alpha, modulation, rule = CONFIGS[config]
    lstm = "lstm" in op
    sequence = "sequence" in op
    make_inputs = lstm_inputs if lstm else rnn_inputs
    inputs = make_inputs(alpha, modulation, rule, B=B, N=N, T=T if sequence else None)
    names = LSTM_INPUTS if lstm else RNN_INPUTS
    tensors = [inputs[k] for k in names]
    options = [rule, 1.0] + (["c"] if lstm else [])
    forward = op.replace("_backward", "").replace("_rollout_step", "_step")
    schema_names = [a.name for a in getattr(OPS, forward).default._schema.arguments]
    kwargs = dict(zip(schema_names, tensors + options))
    clamp = torch.rand(inputs["x"].shape[:-1] + (N,), generator=torch.Generator().manual_seed(1))
    clamp = clamp < 0.5
    if sequence:
        kwargs["checkpoint_every"] = 2
    if not lstm:
        kwargs["clamp"] = clamp
    if op.endswith("_rollout_step"):
        kwargs.update(
            u=torch.randn_like(inputs["x"]),
            hebb=kwargs["hebb"].clone(),
            hebb_out=torch.empty_like(inputs["hebb"]),
            elig_out=None if inputs["elig"] is None else torch.empty_like(inputs["elig"]),
        )
        return kwargs
    if not op.endswith("_backward"):
        return kwargs
    outputs = getattr(OPS, forward)(**kwargs)
    modulated = modulation != "none_full"
    retro = rule == "retroactive"
    if lstm and sequence:
        out, c_seq, hebb_T, elig_T, m, eta, gates, ckpt_h, ckpt_e = outputs
        saved = dict(
            out=out,
            c_seq=c_seq,
            m=m,
            eta_seq=eta,
            gates=gates,
            hebb_checkpoints=ckpt_h,
            elig_checkpoints=ckpt_e,
        )
        grads = dict(grad_out=torch.ones_like(out), grad_c=torch.ones_like(c_seq))
    elif lstm:
        h_new, c_new, hebb_T, elig_T, m, eta, gates = outputs
        saved = dict(h_new=h_new, c_new=c_new, m=m, eta_t=eta, gates=gates)
        grads = dict(grad_h_new=torch.ones_like(h_new), grad_c_new=torch.ones_like(c_new))
    elif sequence:
        out, hebb_T, elig_T, m, eta, ckpt_h, ckpt_e = outputs
        saved = dict(out=out, m=m, eta_seq=eta, hebb_checkpoints=ckpt_h, elig_checkpoints=ckpt_e)
        grads = dict(grad_out=torch.ones_like(out))
    else:
        h_new, hebb_T, elig_T, m, eta = outputs
        saved = dict(h_new=h_new, m=m, eta_t=eta)
        grads = dict(grad_h_new=torch.ones_like(h_new))
    grads.update(
        grad_hebb=torch.ones_like(hebb_T),
        grad_elig=torch.ones_like(elig_T) if retro else None,
        grad_m=torch.ones_like(m) if modulated else None,
    )
    kwargs = {k: v for k, v in kwargs.items() if k != "x"}
    return dict(grads, **kwargs, **saved)


def _primitive_kwargs(op, config):
    gen = torch.Generator().manual_seed(2)
    t = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    Bp, P, Np = 3, 4, 5
    if op.startswith("plastic_matvec"):
        alpha = t(P, Np) if config == "modulated" else t(Np)
        kwargs = dict(x=t(Bp, P), w=t(P, Np), alpha=alpha, hebb=t(Bp, P, Np))
        return dict(grad_u=t(Bp, Np), **kwargs) if op.endswith("_backward") else kwargs
    retro = config == "modulated"
    kwargs = dict(
        hebb=t(Bp, P, Np),
        pre=t(Bp, P),
        post=t(Bp, Np),
        eta=t(Bp, 1, Np) if retro else t(1, P, Np),
        elig=t(Bp, P, Np) if retro else None,
        elig_rate=torch.tensor(0.3, dtype=torch.float64) if retro else None,
        rule="retroactive" if retro else "clip",
        clip=1.0,
    )
    if op.endswith("_backward"):
        kwargs = dict(
            grad_hebb_new=t(Bp, P, Np), grad_elig_new=t(Bp, P, Np) if retro else None, **kwargs
        )
    return kwargs


REGISTERED_OPS = [
    "plastic_rnn_sequence",
    "plastic_rnn_sequence_backward",
    "plastic_rnn_step",
    "plastic_rnn_step_backward",
    "plastic_rnn_rollout_step",
    "plastic_lstm_sequence",
    "plastic_lstm_sequence_backward",
    "plastic_lstm_step",
    "plastic_lstm_step_backward",
    "plastic_matvec",
    "plastic_matvec_backward",
    "hebb_update",
    "hebb_update_backward",
]


def op_kwargs(op, config):
    """Fresh valid keyword arguments of the registered op `op` in `config`."""
    if op.startswith("plastic_matvec") or op.startswith("hebb_update"):
        return _primitive_kwargs(op, config)
    return _recurrent_kwargs(op, config)


def test_registered_ops_are_all_listed():
    defined = {
        name.split("::")[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("backpropamine::")
    } - {"cpu_isa", "cpu_sequence_path"}
    assert defined == set(REGISTERED_OPS)


OP_CONFIGS = [(op, config) for op in REGISTERED_OPS for config in CONFIGS]


def tensor_arguments(op, kwargs):
    """The names of the tensor arguments given in kwargs, in schema order."""
    return [
        a.name
        for a in getattr(OPS, op).default._schema.arguments
        if isinstance(kwargs.get(a.name), torch.Tensor)
    ]


def test_every_op_takes_its_valid_arguments():
    for op, config in OP_CONFIGS:
        getattr(OPS, op)(**op_kwargs(op, config))


@pytest.mark.parametrize("op,config", OP_CONFIGS, ids=[f"{o}-{c}" for o, c in OP_CONFIGS])
def test_every_tensor_argument_is_checked(op, config):
    """For each tensor argument: a wrong shape (an extra dimension), an empty tensor (no rows), a
    wrong dtype and a non-contiguous tensor are each a RuntimeError naming the argument."""
    fn = getattr(OPS, op)
    for name in tensor_arguments(op, op_kwargs(op, config)):
        shown = MESSAGE_NAME.get(name, name)
        good = op_kwargs(op, config)[name]
        bad = {
            "wrong shape": (good.unsqueeze(-1), "shape"),
            "wrong dtype": (good.to(torch.float16), "dtype"),
        }
        if good.numel() > 0:
            bad["empty"] = (good.new_empty((0,) + tuple(good.shape[1:])), "shape")
        if good.numel() > 1:
            bad["non-contiguous"] = (non_contiguous(good), "to be contiguous")
        for what, (tensor, fragment) in bad.items():
            kwargs = op_kwargs(op, config)
            kwargs[name] = tensor
            with pytest.raises(Exception) as info:
                fn(**kwargs)
            message = str(info.value)
            assert type(info.value) is RuntimeError, (
                f"{name}, {what}: raised {type(info.value).__name__}: {message}"
            )
            assert f"{op}: expected {shown} " in message and fragment in message, (
                f"{name}, {what}: {message!r}"
            )


@pytest.mark.parametrize("op,config", OP_CONFIGS, ids=[f"{o}-{c}" for o, c in OP_CONFIGS])
def test_every_tensor_argument_on_another_device(op, config):
    """Each tensor argument in turn on `meta`, the others on the CPU: the usual device message
    (the fake kernel, which serves `meta`, would otherwise return uninitialised CPU memory)."""
    fn = getattr(OPS, op)
    names = tensor_arguments(op, op_kwargs(op, config))
    for name in names:
        kwargs = op_kwargs(op, config)
        kwargs[name] = kwargs[name].to("meta")
        expected = (
            f"{op}: expected {names[1]} on device meta (the device of the first argument), got cpu"
            if name == names[0]
            else f"{op}: expected {name} on device cpu (the device of the first argument), got meta"
        )
        with pytest.raises(RuntimeError, match=re.escape(expected)):
            fn(**kwargs)
    # all on meta: the fake kernel's shapes, no error
    fn(
        **{
            k: v.to("meta") if isinstance(v, torch.Tensor) else v
            for k, v in op_kwargs(op, config).items()
        }
    )


@pytest.mark.parametrize(
    "op",
    [
        "plastic_rnn_sequence_backward",
        "plastic_rnn_step_backward",
        "plastic_lstm_sequence_backward",
        "plastic_lstm_step_backward",
    ],
)
def test_backward_empty_rates_in_a_subprocess(op):
    """The crash these checks guard against, reported as such should it come back: an empty
    eta_seq / eta_t of a modulated backward ended the process (SIGSEGV)."""
    code = (
        "import sys, torch, backpropamine_cuda.fused; sys.path[:0] = [%r, %r]\n"
        "import test_validation_registered_ops as tv\n"
        "kwargs = tv.op_kwargs(%r, 'modulated')\n"
        "name = 'eta_seq' if 'sequence' in %r else 'eta_t'\n"
        "kwargs[name] = kwargs[name].new_empty(0)\n"
        "try:\n"
        "    getattr(torch.ops.backpropamine, %r)(**kwargs)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    ) % (str(Path(__file__).parent), str(TESTS), op, op, op)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert f"{op}: expected eta_" in result.stdout


def test_backward_grad_elig_without_retroactive():
    kwargs = op_kwargs("plastic_rnn_sequence_backward", "unmodulated")
    kwargs["grad_elig"] = torch.ones_like(kwargs["hebb0"])
    with pytest.raises(
        ValueError,
        match="plastic_rnn_sequence_backward: grad_elig is only used by "
        "rule 'retroactive'; pass None",
    ):
        OPS.plastic_rnn_sequence_backward(**kwargs)
    kwargs = op_kwargs("hebb_update_backward", "unmodulated")
    kwargs["grad_elig_new"] = torch.ones_like(kwargs["hebb"])
    with pytest.raises(
        ValueError,
        match="hebb_update_backward: grad_elig_new is only used by rule 'retroactive'; pass None",
    ):
        OPS.hebb_update_backward(**kwargs)
