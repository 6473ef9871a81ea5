"""What the experiment scripts share (experiments/common.py), under hostile use: a full disk
while checkpointing, logs of resumed runs, progress in log files, and missing optional
dependencies, checked on the scripts themselves in subprocesses."""

import argparse
import csv
import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, subprocess_env

EXPERIMENTS, BENCHMARKS = ROOT / "experiments", ROOT / "benchmarks"
if not EXPERIMENTS.is_dir():
    pytest.skip("experiments/ is not next to the tests", allow_module_level=True)
from experiments import common  # noqa: E402  (the root is on sys.path: pyproject.toml)

# ----------------------------------------------------------------------------------------------
# Checkpoints on a full disk


def test_a_full_disk_leaves_no_temporary_file_and_names_the_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.checkpoint.pt"
    common.atomic_save({"iteration": 1}, path)

    def disk_full(obj, f):  # writes a little, then the disk is full
        with open(f, "wb") if isinstance(f, (str, Path)) else f as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.torch, "save", disk_full)
    with pytest.raises(SystemExit, match=f"cannot write {path}: No space left on device"):
        common.atomic_save({"iteration": 2}, path)
    assert list(tmp_path.iterdir()) == [path], "a temporary file was left behind"
    assert torch.load(path, weights_only=True) == {"iteration": 1}


def test_a_device_torch_cannot_use_here_exits_naming_it():
    assert common.torch_device("cuda:1") == "cuda:1"  # parsed here, checked at the start
    with pytest.raises(argparse.ArgumentTypeError, match="not a torch device: 'tpu'"):
        common.torch_device("tpu")
    common.require_device("cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(
        SystemExit, match=f"--device cuda:{visible}: torch .* sees {visible} CUDA device"
    ):
        common.require_device(f"cuda:{visible}")


@pytest.mark.parametrize("script", ["patterns", "maze", "ptb"])
def test_each_script_checks_its_device_before_writing(script, tmp_path, monkeypatch):
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = ["--device", f"cuda:{visible}"]
    monkeypatch.chdir(tmp_path)
    if script == "patterns":
        from experiments.patterns import patterns as module

        argv = [*device, "--out", str(tmp_path / "out")]
    elif script == "maze":
        from experiments.rl import maze as module

        argv = [*device, "--out", str(tmp_path / "out")]
    else:
        from experiments.ptb import main as module

        argv = [*device, "--data", str(tmp_path), "--save", str(tmp_path / "m.pt")]
    with pytest.raises(SystemExit, match=f"--device cuda:{visible}: torch"):
        module.main(argv)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"),
        MemoryError(),
    ],
    ids=["cuda", "cpu", "python"],
)
def test_running_out_of_memory_exits_naming_the_flags_that_size_the_run(error):
    with pytest.raises(SystemExit, match="^out of memory: .+\nsmaller --batch-size need less$"):
        with common.out_of_memory_exits("--batch-size"):
            raise error
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # other errors pass
        with common.out_of_memory_exits("--batch-size"):
            raise RuntimeError("shapes cannot be multiplied")


# ----------------------------------------------------------------------------------------------
# Logs of resumed runs


FIELDS = ("iteration", "loss", "seconds")


def write_log(path, lines):
    path.write_text("\n".join([",".join(FIELDS), *lines]) + "\n")


def test_a_resumed_log_keeps_one_row_per_iteration_up_to_the_checkpoint(tmp_path):
    """Rows past the checkpoint (logged again by the resumed run), duplicates (two processes
    appended) and a row cut by a kill go; the rest stays in order."""
    log = tmp_path / "run.csv"
    write_log(log, ["0,9.0,0", "2,1.0,1", "4,0.5,2", "2,1.0,3", "6,0.2,4", "4,0.5,5", "8"])
    common.resume_csv(log, FIELDS, "iteration", 4)
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["iteration"], r["seconds"]) for r in rows] == [("0", "0"), ("2", "3"), ("4", "5")]
    common.resume_csv(log, FIELDS, "iteration", 0)  # a fresh run: the header alone
    assert log.read_text().splitlines() == [",".join(FIELDS)]
    common.resume_csv(tmp_path / "new.csv", FIELDS, "iteration", 0)
    assert (tmp_path / "new.csv").read_text().splitlines() == [",".join(FIELDS)]


@pytest.mark.parametrize(
    "header", ["iteration,loss", "iteration,loss,seconds,reward", "garbage", ""], ids=repr
)
def test_a_resumed_log_with_other_columns_exits_naming_it(tmp_path, header):
    log = tmp_path / "run.csv"
    log.write_text(f"{header}\n2,1.0,1\n" if header else "")
    before = log.read_text()
    with pytest.raises(SystemExit, match=f"--resume: the log {log} has the columns"):
        common.resume_csv(log, FIELDS, "iteration", 4)
    assert log.read_text() == before  # left as it was
    common.resume_csv(log, FIELDS, "iteration", 0)  # a fresh run starts it afresh
    assert log.read_text().splitlines() == [",".join(FIELDS)]


# ----------------------------------------------------------------------------------------------
# Progress in log files


def test_progress_off_a_terminal_prints_a_plain_line_every_interval(monkeypatch, capsys):
    clock = iter(range(0, 10_000, 5))  # every call: 5 s later
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    bar = common.progress(
        range(100, 120), desc="maze rnn-seed0", initial=100, total=200, every_s=30
    )
    assert isinstance(bar, common.PlainProgress)  # pytest's stderr is no terminal
    for i in bar:
        bar.set_postfix(reward=f"{i:.1f}")
    bar.write("an evaluation")
    bar.close()
    out, err = capsys.readouterr()
    assert out == "an evaluation\n"
    lines = err.splitlines()
    # 20 updates 5 s apart: one line every 30 s (6 updates), and a last one at close()
    assert len(lines) == 20 // 6 + 1 and "\r" not in err
    assert lines[0] == (
        "[    30 s] maze rnn-seed0: 106/200 it (53%), 0.2 it/s, about 470 s left; reward=105.0"
    )
    assert lines[-1].startswith("[   105 s] maze rnn-seed0: 120/200 it (60%)")


def test_a_short_or_disabled_loop_prints_nothing(capsys):
    for every_s, disable in ((30, False), (0, True)):
        bar = common.progress(
            total=10, desc="train", unit="tok", unit_scale=4, every_s=every_s, disable=disable
        )
        bar.update(3)
        bar.close()
    assert capsys.readouterr() == ("", "")


def run_script(script, *flags, prelude="", timeout=300):
    """`script` (relative to the repository) run as a program in a subprocess, after `prelude`
    (Python code), stdout and stderr to files as in a batch job; returns (exit code, stderr)."""
    path = ROOT / script
    code = (
        f"import runpy, sys\n{prelude}\nsys.path.insert(0, {str(path.parent)!r})\n"
        f"sys.argv = [{str(path)!r}, *{list(flags)!r}]\n"
        f"runpy.run_path({str(path)!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    "script, flags",
    [
        (
            "experiments/patterns/patterns.py",
            [
                "--types",
                "plastic",
                "rnn",
                "--bits",
                "8",
                "--rnn-hidden",
                "8",
                "--iterations",
                "30",
                "--batch-size",
                "4",
                "--log-every",
                "5",
                "--save-every",
                "10",
                "--eval-episodes",
                "8",
            ],
        ),
        (
            "experiments/rl/cue_reward.py",
            [
                "--types",
                "rnn",
                "simple",
                "--seeds",
                "0",
                "--hidden",
                "12",
                "--batch-size",
                "4",
                "--episode-length",
                "15",
                "--iterations",
                "30",
                "--log-every",
                "5",
                "--save-every",
                "10",
                "--jobs",
                "2",
            ],
        ),
    ],
    ids=["patterns", "cue_reward-jobs2"],
)
def test_a_log_file_gets_no_progress_bar(tmp_path, script, flags):
    """With stderr redirected to a file (nohup, CI, a cluster job), no carriage-return bar
    updates: these short runs print no progress line at all."""
    code, err = run_script(script, *flags, "--out", str(tmp_path))
    assert code == 0, err[-3000:]
    assert "\r" not in err and len(err.splitlines()) <= 2, err[-3000:]


# ----------------------------------------------------------------------------------------------
# Missing optional dependencies: one line saying what to install


SCRIPTS = {  # flags that parse (OUT: a temporary folder); the check comes before any data is read
    "experiments/patterns/patterns.py": ["--out", "OUT"],
    "experiments/images/images.py": ["--data", "/nowhere", "--out", "OUT"],
    "experiments/omniglot/omniglot.py": ["--data", "/nowhere", "--out", "OUT"],
    "experiments/ptb/main.py": ["--data", "/nowhere", "--save", "OUT/m.pt"],
    "experiments/rl/maze.py": ["--out", "OUT"],
    "experiments/rl/cue_reward.py": ["--out", "OUT"],
}
BENCHES = (
    "benchmarks/bench_rnn.py",
    "benchmarks/bench_lstm.py",
    "benchmarks/bench_ptb.py",
    "benchmarks/bench_rl.py",
)


CASES = [
    *[
        (
            script,
            module,
            f"the experiment scripts need {module}: pip install tqdm matplotlib "
            "(the package's [experiments] extra)",
        )
        for script in SCRIPTS
        for module in ("tqdm", "matplotlib")
    ],
    *[
        (
            script,
            "matplotlib",
            "the benchmarks need matplotlib: pip install matplotlib (the package's [bench] extra)",
        )
        for script in BENCHES
    ],
]


@pytest.mark.parametrize(
    "script, missing, message",
    CASES,
    ids=[f"{Path(script).stem}-without-{missing}" for script, missing, _ in CASES],
)
def test_a_missing_optional_dependency_gives_one_line(tmp_path, script, missing, message):
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} is not next to the tests")
    flags = [
        flag.replace("OUT", str(tmp_path))
        for flag in SCRIPTS.get(script, ["--quick", "--out", "OUT"])
    ]
    code, err = run_script(
        script, *flags, prelude=f"sys.modules[{missing!r}] = None  # as if not installed"
    )
    assert code != 0 and err.splitlines() == [message], err[-3000:]
