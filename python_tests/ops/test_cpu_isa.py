"""The CPU kernels are compiled for several instruction sets and one is picked at run time (the
widest the CPU runs, but AVX2 on AMD). Here each one the CPU runs, forced with
BACKPROPAMINE_CPU_ISA in a subprocess, runs a sweep of every rule against the reference."""

import subprocess
import sys

import pytest

from helpers import TESTS, subprocess_env

ISAS = ("default", "avx2", "avx512")


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])


def widest_supported():
    """The widest build this CPU runs, from its flags (as csrc/cpu/trace_pass_cpu.cpp decides)."""
    flags = set(cpu_flags())
    if not {"avx2", "fma"} <= flags:
        return "default"
    return "avx512" if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags else "avx2"


def test_default_choice_is_the_fastest_build():
    """Without BACKPROPAMINE_CPU_ISA: the widest build, but AVX2 on AMD CPUs (AVX-512 measured
    slower there)."""
    with open("/proc/cpuinfo") as f:
        amd = "AuthenticAMD" in f.read()
    widest = widest_supported()
    expected = "avx2" if amd and widest == "avx512" else widest
    script = "import torch, backpropamine_cuda.fused; print(torch.ops.backpropamine.cpu_isa())"
    env = subprocess_env()
    env.pop("BACKPROPAMINE_CPU_ISA", None)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected]


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import backpropamine_cuda as bp
bp.fused  # loads the ops
from helpers import RULE_CONFIG, rnn_inputs, run_forward_backward
print(torch.ops.backpropamine.cpu_isa())
for rule, (alpha, modulation) in RULE_CONFIG.items():
    inputs = rnn_inputs(alpha, modulation, rule, T=5, B=3, N=37)
    (out_e, g_e) = run_forward_backward(bp.reference.plastic_rnn_sequence, inputs, rule=rule,
                                        clip=0.5)
    (out_a, g_a) = run_forward_backward(bp.fused.plastic_rnn_sequence, inputs, rule=rule, clip=0.5,
                                        checkpoint_every=2)
    rel = lambda a, e: ((a - e).abs().max() / e.abs().max().clamp(min=1)).item()
    errs = [rel(a, e) for a, e in zip(out_a, out_e) if a is not None]
    errs += [rel(g_a[k], g_e[k]) for k in g_e]
    print(rule, max(errs))
"""


@pytest.mark.parametrize("isa", ISAS)
def test_isa_matches_reference(fused_cpu, isa):
    best = widest_supported()
    env = subprocess_env(BACKPROPAMINE_CPU_ISA=isa)
    script = SCRIPT.format(tests=str(TESTS))
    # cwd: not a checkout, whose package `-c` would import instead of the one under test.
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS,
    )
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


# The float32 comparisons with the reference: their rounding depends on the instruction set
# (FMA, vector widths), so each build passes them, not only the suite's own.
FLOAT32_TEST_FILES = (
    "ops/test_rnn_ops.py",
    "ops/test_lstm_ops.py",
    "ops/test_primitives.py",
    "ops/test_cuda_emulation.py",
    "modules/test_modules.py",
)


@pytest.mark.parametrize("isa", ISAS)
def test_isa_float32_tests(fused_cpu, isa):
    if ISAS.index(isa) > ISAS.index(widest_supported()):
        pytest.skip(f"this CPU does not run the {isa} build")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "float32",
            *(str(TESTS / name) for name in FLOAT32_TEST_FILES),
        ],
        env=subprocess_env(BACKPROPAMINE_CPU_ISA=isa),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=TESTS,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]
