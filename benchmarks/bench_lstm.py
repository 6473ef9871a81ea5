"""Benchmark of the plastic LSTM sequence op: fused vs eager reference vs torch.nn.LSTM.

For each case (the Backpropamine large PTB model: one layer, and its whole 3-layer stack) and
implementation, in one run:
  * forward (under no_grad) and forward+backward time, median of repeated runs,
  * peak memory of each,
  * the machine's memory bandwidth, measured in the same run, the bandwidth floor of the fused
    op's trace traffic, and the reference time: torch.nn.LSTM's time + that floor.
Prints a markdown table and the performance targets, writes CSV, JSON and a PNG plot.

    PYTHONPATH=. python benchmarks/bench_lstm.py --quick            # smoke test, tiny sizes
    PYTHONPATH=. python benchmarks/bench_lstm.py --quick --impls eager,nnlstm   # ... no fused
    PYTHONPATH=. python benchmarks/bench_lstm.py                    # all cases, CPU
    PYTHONPATH=. python benchmarks/bench_lstm.py --device cuda --cases layer

Implementations:
  fused   backpropamine_cuda.fused.plastic_lstm_sequence (one C++/CUDA op, hand-written backward)
  eager   backpropamine_cuda.reference.plastic_lstm_sequence (pure PyTorch, autograd)
  nnlstm  torch.nn.LSTM of the same widths: the speed of a non-plastic LSTM

Every (case, implementation) is measured by two fresh subprocesses, one for peak memory and one
for times (see common.measure), so implementations share no allocator state. The eager
fwd+bwd keeps ~4 traces (B, N, N) per step and layer for autograd (8.3 GB per layer at the full
sizes in float32); it is skipped, with the reason in the table, where its estimate (need_mb)
exceeds 70 % of the memory available when it would start. Timings on a shared machine suffer
from other processes: the 1-min load average is printed and stored per row.
"""

import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # the root, for experiments.common
import common  # noqa: E402

# The Backpropamine large PTB model: alpha per neuron, modulation fanout (K = 1)
# from h, rule clip 2. `layer`: one layer, its input already projected (x = i2g(input)).
# `stack`: the 3 layers (embedding 400 -> 1149 -> 1149 -> 400), each with its i2g projection;
# `stack-t35`: the same at half the BPTT length, where the eager reference still fits in memory.
CASES = {
    "layer": dict(B=6, N=1149, T=70, alpha="neuron"),
    "stack": dict(B=6, T=70, widths=[400, 1149, 1149, 400], alpha="neuron"),
    "stack-t35": dict(B=6, T=35, widths=[400, 1149, 1149, 400], alpha="neuron"),
}
QUICK_CASES = {
    "layer": dict(B=2, N=48, T=10, alpha="neuron"),
    "stack": dict(B=2, T=6, widths=[16, 48, 48, 16], alpha="neuron"),
    "stack-t35": dict(B=2, T=3, widths=[16, 48, 48, 16], alpha="neuron"),
}
K, RULE, CLIP = 1, "clip", 2.0
IMPLS = ("fused", "eager", "nnlstm")
LIGHT = "nnlstm"  # the non-plastic implementation of the reference time

# Performance targets: (case, what, impl compared with, threshold), checked on the full sizes
# by common.check_targets; the stack gets ratios but no targets.
#   speedup: fused fwd+bwd time is >= threshold times faster than impl
#   floor:   fused fwd+bwd time <= threshold x (nnlstm fwd+bwd time + the bandwidth floor)
#   memory:  fused fwd+bwd peak memory <= threshold x impl's
TARGETS = [
    ("layer", "speedup", "eager", 4.0),
    ("layer", "floor", LIGHT, 2.0),
    ("layer", "memory", "eager", 0.1),
]

# Traces (B, N, N) per layer that eager fwd+bwd holds at its peak: EAGER_TRACES_PER_STEP * T +
# EAGER_TRACES_EXTRA. Per step autograd keeps H_{t-1}, w + alpha * H_{t-1}, the Hebbian product
# and the pre-clamp sum; measured 4.1-4.2 per step at B=6, N=400, T=10 and 20.
EAGER_TRACES_PER_STEP, EAGER_TRACES_EXTRA = 4, 3


def layers_of(cfg):
    """[(input width, units)] of the case's layers; input width None: the input comes projected."""
    if "widths" in cfg:
        return list(zip(cfg["widths"][:-1], cfg["widths"][1:]))
    return [(None, cfg["N"])]


def floor_bytes(cfg, itemsize):
    """Bytes the fused op must move (common.trace_floor_bytes), (forward, forward+backward),
    summed over the layers.

    Per-step vectors: forward reads x_t (4 x (B, N), one per gate) and writes h_t, c_t and the
    rates eta_t (3); backward reads dL/dh_t, h_t, c_t, eta_t and x_t (to recompute the gates,
    8) and writes dL/dx_t (4): 12 more. The stack's i2g projections are left out (few bytes).
    """
    per_layer = [
        common.trace_floor_bytes(cfg["T"], cfg["B"], n, itemsize, vec_fwd=7, vec_bwd=12)
        for _, n in layers_of(cfg)
    ]
    return tuple(map(sum, zip(*per_layer)))


def need_mb(cfg, impl, itemsize):
    """Estimated peak MB per mode ({}: not estimated, small): eager fwd+bwd only."""
    if impl != "eager":
        return {}
    traces = EAGER_TRACES_PER_STEP * cfg["T"] + EAGER_TRACES_EXTRA
    return {"fwdbwd": sum(traces * cfg["B"] * n * n * itemsize for _, n in layers_of(cfg)) / 2**20}


# ----------------------------------------------------------------------------------------------
# Worker: one (case, implementation) in a fresh process (common.worker).


def plastic_layer(P, N, B, alpha, randn, zeros):
    """Parameters and zero initial state of one plastic LSTM layer of N units, with its i2g
    projection from width P unless P is None."""
    scale = 1 / math.sqrt(N)
    layer = dict(
        h2g_weight=randn(3 * N, N, scale=scale),
        h2g_bias=zeros(3 * N),
        w=randn(N, N, scale=scale),
        alpha=randn(*((N, N) if alpha == "full" else (N,)), scale=0.1),
        h2mod_weight=randn(K, N, scale=scale),
        h2mod_bias=zeros(K),
        fanout_weight=randn(N, K, scale=0.5),
        fanout_bias=zeros(N),
        h0=zeros(B, N),
        c0=zeros(B, N),
        hebb0=zeros(B, N, N),
    )
    if P is not None:
        layer.update(i2g_weight=randn(4 * N, P, scale=1 / math.sqrt(P)), i2g_bias=zeros(4 * N))
    return layer


def plastic_setup(cfg, impl, randn, zeros):
    layers = [plastic_layer(P, N, cfg["B"], cfg["alpha"], randn, zeros) for P, N in layers_of(cfg)]
    seq = common.package_op(impl, "plastic_lstm_sequence")

    def call(x):
        hebbs = []
        for p in layers:
            if "i2g_weight" in p:
                x = F.linear(x, p["i2g_weight"], p["i2g_bias"])
            x, _, hebb, _, _ = seq(
                x,
                p["h0"],
                p["c0"],
                p["hebb0"],
                None,
                p["h2g_weight"],
                p["h2g_bias"],
                p["w"],
                p["alpha"],
                None,
                None,
                p["h2mod_weight"],
                p["h2mod_bias"],
                p["fanout_weight"],
                p["fanout_bias"],
                rule=RULE,
                clip=CLIP,
            )
            hebbs.append(hebb)
        return x, hebbs

    def loss(outputs):
        out, hebbs = outputs
        # the final traces enter the loss so that the gradient also flows in through them
        return out.sum() + sum(hebb.sum() for hebb in hebbs)

    P0, N0 = layers_of(cfg)[0]
    x = randn(cfg["T"], cfg["B"], 4 * N0 if P0 is None else P0)
    return call, loss, x, [x, *(t for p in layers for t in p.values())]


def nnlstm_setup(cfg, device, dtype, randn, zeros):
    # nn.LSTM always projects its input; the projected plastic layer does not, so there it gets
    # a 1-wide input, whose projection costs nothing.
    layers = [(P or 1, N) for P, N in layers_of(cfg)]
    lstms = [torch.nn.LSTM(P, N, device=device, dtype=dtype) for P, N in layers]
    states = [(zeros(1, cfg["B"], N), zeros(1, cfg["B"], N)) for _, N in layers]

    def call(x):
        for lstm, state in zip(lstms, states):
            x, _ = lstm(x, state)
        return x

    x = randn(cfg["T"], cfg["B"], layers[0][0])
    params = [p for lstm in lstms for p in lstm.parameters()]
    return call, torch.sum, x, [x, *itertools.chain(*states), *params]


def setup(cfg, impl, device, dtype):
    """(call, loss, x, grad_inputs) of one implementation, see common.worker."""
    randn, zeros = common.tensor_makers(device, dtype)
    if impl == "nnlstm":
        return nnlstm_setup(cfg, device, dtype, randn, zeros)
    return plastic_setup(cfg, impl, randn, zeros)


NOTES = [
    "fwd+bwd loss = out.sum() + every layer's final trace hebb_T.sum() (nnlstm: out.sum()); "
    "out is the last layer's output.",
    "Plastic layers: alpha per neuron, modulation fanout (K=1) from h, rule clip 2.0. layer: "
    "input already projected (x = i2g(input), (T, B, 4N)); stack: each layer's i2g Linear runs "
    "in the timed function, embedding and decoder excluded.",
    "nnlstm: torch.nn.LSTM with the same widths, one per layer; for layer with a 1-wide input, "
    "so that nn.LSTM's own input projection (which the projected plastic layer does not do) "
    "costs nothing.",
    f"eager fwd+bwd is skipped where its estimate, ({EAGER_TRACES_PER_STEP} T + "
    f"{EAGER_TRACES_EXTRA}) traces B*N*N per layer, exceeds {common.MEMORY_FRACTION:.0%} of "
    "the memory available just before it would run.",
]


def main():
    common.run_benchmark(
        "bench_lstm",
        __doc__,
        Path(__file__).resolve(),
        cases=CASES,
        quick_cases=QUICK_CASES,
        impls=IMPLS,
        targets=TARGETS,
        setup=setup,
        floor_bytes=floor_bytes,
        notes=NOTES,
        need_mb=need_mb,
        light=LIGHT,
    )


if __name__ == "__main__":
    main()
