"""How many operations a step of the plastic LSTM's per-step path puts on a GPU, counted without
one: the ATen ops the op calls (torch.profiler, on the CUDA kernels' CPU emulator) plus the
emulated launches of our own kernels. Pinned so that the fused cell (csrc/lstm_cell.h, one
kernel forward and one backward per step) cannot silently fall back to pointwise ATen glue;
csrc/cuda/NOTES.md, "The LSTM cell kernel", has the numbers before and after."""

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from helpers import lstm_inputs, run_forward_backward

# ATen ops that make views or allocate without writing: no GPU launch.
NO_LAUNCH = {
    "aten::alias",
    "aten::as_strided",
    "aten::detach",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::expand",
    "aten::narrow",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::select",
    "aten::slice",
    "aten::squeeze",
    "aten::t",
    "aten::transpose",
    "aten::unsqueeze",
    "aten::view",
}

# Per step of the PTB LSTM layer's options (alpha per neuron, fanout modulation, rule clip,
# post_input "g", modulator_input "h"), forward and backward: ATen ops that launch, and launches
# of our kernels. Forward: h2g's product, the modulator's two products and tanh; the trace pass,
# the cell (which sums the pass's partial sums of u itself). Backward: the product through step
# s + 1's gates, the modulator's two products, tanh's backward and grad_m's add; the trace's
# adjoint pass (two launches at checkpoint_every=1, where the matvec's and the rule's adjoints of
# a step fall in different segments; one and a recompute pass otherwise), four column sums
# (dL/dh, dL/dpre, dL/dpost, dL/deta), the cell. Before the cell kernel: 16 + 2 forward, 40 + 6
# backward; before the cell summed u: 4 + 3 forward.
PINNED = {
    "forward": {"aten": 4, "ours": 2},
    "backward": {"aten": 5, "ours": 7},
}


def _aten_ops(event):
    """The ATen ops an op calls directly (through any non-ATen wrappers), by name."""
    for child in event.cpu_children:
        if child.name.startswith("aten::"):
            yield child.name
        else:
            yield from _aten_ops(child)


def _counts(emulated, T, **options):
    """{'forward' | 'backward': {'aten': ATen ops that launch, 'ours': emulated launches}} of
    one call of the sequence op and its backward, T steps, the per-step path."""
    inputs = lstm_inputs("neuron", "fanout3", "clip", T=T, B=3, N=9, seed=3)
    emulator_launches = torch.ops.backpropamine_emulated.emulator_launches
    launches = {}

    def op(**kwargs):
        before = emulator_launches()
        out = emulated.plastic_lstm_sequence(**kwargs)
        launches["forward"] = emulator_launches() - before
        launches["before_backward"] = emulator_launches()
        return out

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_forward_backward(op, inputs, rule="clip", clip=0.5, checkpoint_every=1, **options)
    launches["backward"] = emulator_launches() - launches["before_backward"]
    aten = collections.Counter()
    for name in ("forward", "backward"):
        op_name = "backpropamine_emulated::plastic_lstm_sequence" + (
            "_backward" if name == "backward" else ""
        )
        calls = [
            collections.Counter(n for n in _aten_ops(e) if n not in NO_LAUNCH)
            for e in prof.events()
            if e.name == op_name
        ]
        aten[name] = max(sum(c.values()) for c in calls)
    return {name: {"aten": aten[name], "ours": launches[name]} for name in ("forward", "backward")}


@pytest.mark.parametrize(
    "post_input,modulator_input", [("g", "h"), ("u", "c"), ("h", "h_prev"), ("c", "h")]
)
def test_lstm_step_launches(fused_cpu, monkeypatch, post_input, modulator_input):
    monkeypatch.setenv("BACKPROPAMINE_SEQUENCE_PATH", "steps")
    emulated = fused_cpu.emulated_cuda
    options = dict(post_input=post_input, modulator_input=modulator_input)
    two, three = _counts(emulated, 2, **options), _counts(emulated, 3, **options)
    per_step = {
        name: {kind: three[name][kind] - two[name][kind] for kind in ("aten", "ours")}
        for name in ("forward", "backward")
    }
    assert per_step == PINNED, per_step
