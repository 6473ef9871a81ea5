"""The CPU kernels are compiled for several instruction sets and one is picked at run time; the
suite runs with the widest. Here each narrower one, forced with BACKPROPAMINE_CPU_ISA in a
subprocess, runs a sweep of every rule against the reference."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import subprocess_env

ISAS = ("default", "avx2", "avx512")

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import backpropamine_cuda as bp
bp.fused  # loads the ops
from helpers import RULE_CONFIG, rnn_inputs, run_forward_backward
print(torch.ops.backpropamine.cpu_isa())
for rule, (alpha, modulation) in RULE_CONFIG.items():
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=3, N=37)
    (out_e, g_e) = run_forward_backward(bp.reference.plastic_rnn_sequence, inputs, rule=rule, clip=0.5)
    (out_a, g_a) = run_forward_backward(bp.fused.plastic_rnn_sequence, inputs, rule=rule, clip=0.5,
                                        checkpoint_every=2)
    rel = lambda a, e: ((a - e).abs().max() / e.abs().max().clamp(min=1)).item()
    errs = [rel(a, e) for a, e in zip(out_a, out_e) if a is not None]
    errs += [rel(g_a[k], g_e[k]) for k in g_e]
    print(rule, max(errs))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_isa_matches_reference(fused_cpu, isa):
    best = torch.ops.backpropamine.cpu_isa()  # the widest this CPU runs (the suite's own)
    env = subprocess_env(BACKPROPAMINE_CPU_ISA=isa)
    script = SCRIPT.format(tests=str(Path(__file__).parent))
    # cwd: not a checkout, whose package `-c` would import instead of the one under test.
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    used, *lines = result.stdout.split("\n")
    # The request is capped by what the CPU supports.
    if ISAS.index(isa) > ISAS.index(best):
        assert used == best
    else:
        assert used == isa
    for line in filter(None, lines):
        rule, err = line.split()
        assert float(err) < 1e-10, f"{isa} {rule}: max relative error {err}"
