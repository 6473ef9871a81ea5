"""Benchmark of the plastic RNN sequence op: fused vs eager reference vs torch.compile'd reference.

For each case (sizes of the papers' models) and implementation, in one run:
  * forward (under no_grad) and forward+backward time, median of repeated runs,
  * peak memory of each,
  * the machine's memory bandwidth, measured in the same run, and the bandwidth floor of the
    fused op (bytes it must move / bandwidth).
Prints a markdown table and the performance targets, writes CSV, JSON and a PNG plot.

    PYTHONPATH=. python benchmarks/bench_rnn.py --quick            # smoke test, tiny sizes
    PYTHONPATH=. python benchmarks/bench_rnn.py --quick --impls fused,eager   # ... without compiles
    PYTHONPATH=. python benchmarks/bench_rnn.py                    # all cases, CPU
    PYTHONPATH=. python benchmarks/bench_rnn.py --device cuda --cases ptb,ptb-mem
    PYTHONPATH=. python benchmarks/bench_rnn.py --cases maze,ptb --impls fused --contention

Implementations:
  fused     backpropamine_cuda.fused.plastic_rnn_sequence (one C++/CUDA op, hand-written backward)
  eager     backpropamine_cuda.reference.plastic_rnn_sequence (pure PyTorch, autograd)
  compiled  a Python loop over T calling torch.compile(reference.plastic_rnn_step, dynamic=False)

Every (case, implementation) is measured by two fresh subprocesses, one for peak memory and one
for times (see common.measure), so implementations share no allocator state.
Timings on a shared machine suffer from other processes (OpenMP waits for its slowest thread): the
1-min load average is printed and stored per row, and the JSON keeps every run and the minimum.
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # the root, for experiments.common
import common  # noqa: E402

# Sizes of the papers' models. All use modulation "fanout" with K = 1 and rule clip.
CASES = {
    "maze": dict(B=30, N=100, T=200, alpha="full"),  # Backpropamine simple maze
    "cue": dict(B=30, N=200, T=120, alpha="full"),  # Backpropamine cue-reward association
    "ptb": dict(B=6, N=1149, T=35, alpha="neuron"),  # large PTB model, one layer, short BPTT
    "ptb-mem": dict(B=6, N=1149, T=70, alpha="neuron"),  # same, the paper's BPTT length
}
QUICK_CASES = {
    "maze": dict(B=4, N=16, T=12, alpha="full"),
    "cue": dict(B=4, N=24, T=10, alpha="full"),
    "ptb": dict(B=2, N=48, T=6, alpha="neuron"),
    "ptb-mem": dict(B=2, N=48, T=10, alpha="neuron"),
}
K, RULE, CLIP = 1, "clip", 2.0
IMPLS = ("fused", "eager", "compiled")

# Performance targets: (case, what, impl compared with, threshold), checked on the full sizes
# by common.check_targets:
#   speedup: fused fwd+bwd time is >= threshold times faster than impl
#   floor:   fused fwd+bwd time <= threshold x the bandwidth floor
#   memory:  fused fwd+bwd peak memory <= threshold x impl's
#   contention: fused fwd+bwd beside a busy single-threaded process <= threshold x its idle time
#            (measured with --contention only)
TARGETS = [
    ("maze", "speedup", "eager", 20.0),
    ("maze", "speedup", "compiled", 10.0),
    ("maze", "contention", None, 2.0),
    ("cue", "speedup", "eager", 15.0),
    ("ptb", "speedup", "eager", 4.0),
    ("ptb", "floor", None, 2.0),
    ("ptb", "contention", None, 2.0),
    ("ptb-mem", "memory", "eager", 0.1),
]


def floor_bytes(cfg, itemsize):
    """Bytes the fused op must move (common.trace_floor_bytes), (forward, forward+backward).

    Per-step vectors: forward reads x and writes out and eta (3 x (B, N)); backward reads out,
    eta, dL/dout and writes dL/dx (4 more).
    """
    return common.trace_floor_bytes(cfg["T"], cfg["B"], cfg["N"], itemsize, vec_fwd=3, vec_bwd=4)


# ----------------------------------------------------------------------------------------------
# Worker: one (case, implementation) in a fresh process (common.worker).


def make_inputs(cfg, device, dtype):
    """Inputs of the sequence op (same values for every implementation), all requiring grad."""
    B, N, T = cfg["B"], cfg["N"], cfg["T"]
    randn, zeros = common.tensor_makers(device, dtype)
    alpha_shape = (N, N) if cfg["alpha"] == "full" else (N,)
    return dict(
        x=randn(T, B, N),
        h0=zeros(B, N),
        hebb0=zeros(B, N, N),
        w=randn(N, N, scale=1 / math.sqrt(N)),
        alpha=randn(*alpha_shape, scale=0.1),
        h2mod_weight=randn(K, N, scale=1 / math.sqrt(N)),
        h2mod_bias=zeros(K),
        fanout_weight=randn(N, K, scale=0.5),
        fanout_bias=zeros(N),
    )


def compiled_sequence():
    """reference.plastic_rnn_sequence with its step replaced by the torch.compile'd step."""
    from backpropamine_cuda import reference

    step = torch.compile(reference.plastic_rnn_step, dynamic=False)

    def sequence(x, h, hebb, elig, *params, rule, clip):
        outs, mods = [], []
        for x_t in x.unbind(0):
            h, hebb, elig, m = step(x_t, h, hebb, elig, *params, rule=rule, clip=clip)
            outs.append(h)
            mods.append(m)
        return torch.stack(outs), hebb, elig, torch.stack(mods)

    return sequence


def sequence_fn(impl):
    if impl == "compiled":
        return compiled_sequence()
    return common.package_op(impl, "plastic_rnn_sequence")


def setup(cfg, impl, device, dtype):
    """(call, loss, x, grad_inputs) of one implementation, see common.worker."""
    inp = make_inputs(cfg, device, dtype)
    seq = sequence_fn(impl)

    def call(x):
        return seq(
            x,
            inp["h0"],
            inp["hebb0"],
            None,
            inp["w"],
            inp["alpha"],
            None,
            None,
            inp["h2mod_weight"],
            inp["h2mod_bias"],
            inp["fanout_weight"],
            inp["fanout_bias"],
            rule=RULE,
            clip=CLIP,
        )

    def loss(outputs):
        out, hebb_T, _, _ = outputs
        # hebb_T enters the loss so that the gradient also flows in through the final trace
        return out.sum() + hebb_T.sum()

    return call, loss, inp["x"], list(inp.values())


NOTES = [
    "fwd+bwd loss = out.sum() + hebb_T.sum().",
    "Modulation fanout (K=1), rule clip 2.0; 'compiled' loops over T calling "
    "torch.compile(reference.plastic_rnn_step, dynamic=False).",
]


def main():
    common.run_benchmark(
        "bench_rnn",
        __doc__,
        Path(__file__).resolve(),
        cases=CASES,
        quick_cases=QUICK_CASES,
        impls=IMPLS,
        targets=TARGETS,
        setup=setup,
        floor_bytes=floor_bytes,
        notes=NOTES,
    )


if __name__ == "__main__":
    main()
