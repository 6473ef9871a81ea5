"""Smoke test of the benchmark script at tiny sizes (its numbers are not checked here: targets
live in the benchmark, not in timed tests)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import subprocess_env

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_rnn.py"


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not next to the tests")
def test_bench_rnn_quick(tmp_path):
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--impls", "fused,eager", "--repeats", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "bench_rnn.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["case"], r["impl"]) for r in rows} == {
        (case, impl) for case in ("maze", "ptb", "ptb-mem") for impl in ("fused", "eager")}
    assert (tmp_path / "bench_rnn.png").stat().st_size > 0
    assert "| maze" in result.stdout
