"""Smoke tests of the benchmark scripts at tiny sizes (their numbers are not checked here: targets
live in the benchmarks, not in timed tests)."""

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import subprocess_env

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(name, impls, tmp_path, *flags):
    """Runs benchmarks/<name>.py --quick on `impls`; returns its stdout and its CSV's rows."""
    script = BENCHMARKS / f"{name}.py"
    if not script.is_file():
        pytest.skip("benchmarks/ is not next to the tests")
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--impls",
            ",".join(impls),
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    return result.stdout, rows


def test_bench_rnn_quick(tmp_path):
    stdout, rows = run_quick("bench_rnn", ("fused", "eager"), tmp_path)
    assert {(r["case"], r["impl"]) for r in rows} == {
        (case, impl) for case in ("maze", "cue", "ptb", "ptb-mem") for impl in ("fused", "eager")
    }
    assert "| maze" in stdout


def test_bench_rnn_contention_quick(tmp_path):
    """--contention times each measurement again beside a busy process and reports the ratio."""
    stdout, rows = run_quick("bench_rnn", ("fused",), tmp_path, "--cases", "maze", "--contention")
    (row,) = rows
    assert float(row["busy_fwdbwd_ms"]) > 0 and float(row["busy_x_idle_fwdbwd"]) > 0
    assert "Beside one busy single-threaded process" in stdout
    assert "beside a busy process <= 2x its idle time" in stdout


def test_bench_lstm_quick(tmp_path):
    impls = ("fused", "eager", "nnlstm")
    stdout, rows = run_quick("bench_lstm", impls, tmp_path)
    assert {(r["case"], r["impl"]) for r in rows} == {
        (case, impl) for case in ("layer", "stack", "stack-t35") for impl in impls
    }
    assert all(r["fwdbwd_ms"] for r in rows), "an implementation failed or was skipped"
    # fused is compared with the reference time, nnlstm's time + the bandwidth floor
    assert all(r["x_ref_fwdbwd"] for r in rows if r["impl"] == "fused")
    assert "| layer" in stdout


def test_bench_rl_quick(tmp_path):
    impls = ("fused", "fused-stepwise", "reference")
    stdout, rows = run_quick("bench_rl", impls, tmp_path, "--rounds", "2")
    assert {(r["case"], r["impl"]) for r in rows} == {
        (case, impl) for case in ("maze", "cue-reward") for impl in impls
    }
    assert all((r["rounds"], r["runs"]) == ("2", "2") for r in rows)  # one run per round
    assert all(float(r["iterations_per_s"]) > 0 for r in rows), "an implementation failed"
    assert all(r["fused_speedup"] for r in rows if r["impl"] == "reference")
    assert "| maze" in stdout


@pytest.mark.parametrize(
    "name, flags, message",
    [
        ("bench_rnn", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        ("bench_lstm", ["--budget", "nan"], "argument --budget: must be a finite number, got nan"),
        ("bench_rnn", ["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
        ("bench_rl", ["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
        ("bench_rl", ["--cases", ""], "--cases: none given; choose from"),
        ("bench_ptb", ["--max-batch", "0"], "argument --max-batch: must be >= 1, got 0"),
    ],
)
def test_bad_flags_exit_before_measuring(tmp_path, name, flags, message):
    # --repeats 0 and --budget nan failed after the first measurement; --cases "" measured
    # nothing and overwrote the results files with empty ones
    script = BENCHMARKS / f"{name}.py"
    if not script.is_file():
        pytest.skip("benchmarks/ is not next to the tests")
    result = subprocess.run(
        [sys.executable, str(script), *flags, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.iterdir())


def test_time_fn_makes_at_least_one_run_and_refuses_zero_repeats():
    from backpropamine_cuda.measure import time_fn

    calls = []
    for budget_s in (0.0, math.nan):  # a spent or meaningless budget still gives one run
        result = time_fn(lambda: calls.append(1), torch.device("cpu"), 5, budget_s, warmup=False)
        assert result["runs"] == 1 and result["ms"] >= 0
    assert len(calls) == 2
    for repeats in (0, True):
        with pytest.raises(ValueError, match=f"repeats must be an int >= 1, got {repeats}"):
            time_fn(lambda: None, torch.device("cpu"), repeats)


def test_manifest_names_what_produced_a_result(monkeypatch):
    """Every result file's manifest: the command line, the commit, torch, the date and the
    package's environment variables, which choose a path (BACKPROPAMINE_SEQUENCE_PATH)."""
    path = BENCHMARKS / "common.py"
    if not path.is_file():
        pytest.skip("benchmarks/ is not next to the tests")
    spec = importlib.util.spec_from_file_location("benchmarks_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setenv("BACKPROPAMINE_SEQUENCE_PATH", "steps")
    manifest = common.manifest()
    assert manifest["environment"]["BACKPROPAMINE_SEQUENCE_PATH"] == "steps"
    assert {"command", "commit", "torch", "date"} <= set(manifest)
