"""The README's two commands (Makefile: `make bench`, `make test`) and the set-up they share,
checked with `make -n` (what would run) in a copy of the build's inputs, without installing."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the Makefile's set-up reads: the stamp depends on these.
BUILD_FILES = ("Makefile", "setup.py", "pyproject.toml", "backpropamine_cuda/_build_config.py")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def checkout(tmp_path):
    """A copy of what the set-up reads, and an empty virtualenv directory beside it."""
    copy = tmp_path / "checkout"
    for name in BUILD_FILES:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    shutil.copytree(ROOT / "csrc", copy / "csrc")
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    return copy, venv


def make_dry_run(checkout_dir, *targets, **env):
    """The commands `make -n targets` would run in checkout_dir, with VIRTUAL_ENV unset unless
    given in env, and nothing of a `make` this may run under (as in `make test`)."""
    inherited = ("VIRTUAL_ENV", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    base = {k: v for k, v in os.environ.items() if k not in inherited}
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", *targets],
        cwd=checkout_dir,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def install_commands(out):
    return [line for line in out.splitlines() if "pip install" in line]


def test_setup_uses_the_active_virtualenv(checkout):
    copy, venv = checkout
    out = make_dry_run(copy, "setup", VIRTUAL_ENV=str(venv))
    assert "-m venv" not in out
    torch_install, tools, package = install_commands(out)
    # torch only when the environment has none, and then pinned
    assert re.search(
        rf"{venv}/bin/python -c 'import torch' .*\|\| {venv}/bin/python -m pip "
        r"install torch==\d+\.\d+\.\d+$",
        torch_install,
    ), torch_install
    assert "ninja" in tools and "setuptools" in tools
    assert package.endswith('pip install --no-build-isolation -e ".[test,experiments,bench]"')


def test_setup_creates_a_local_virtualenv_when_none_is_active(checkout):
    copy, _ = checkout
    out = make_dry_run(copy, "setup")
    assert out.splitlines()[0] == "python3 -m venv .venv"
    assert all(line.startswith(".venv/bin/python ") for line in install_commands(out))


def test_setup_runs_again_only_when_an_input_of_the_build_changes(checkout):
    copy, venv = checkout
    env = dict(VIRTUAL_ENV=str(venv))
    stamp = make_dry_run(copy, "setup", **env).splitlines()[-1].split("touch ")[-1]
    (copy / stamp).parent.mkdir(parents=True)
    (copy / stamp).touch()
    assert install_commands(make_dry_run(copy, "setup", **env)) == []
    assert install_commands(make_dry_run(copy, "test", **env)) == []

    clock = time.time()
    for changed in (copy / "csrc" / "trace_pass.h", copy / "setup.py", venv / "pyvenv.cfg"):
        clock += 10
        os.utime(changed, (clock, clock))
        assert install_commands(make_dry_run(copy, "setup", **env)), f"{changed} changed"
        clock += 10
        os.utime(copy / stamp, (clock, clock))  # as after that set-up
        assert install_commands(make_dry_run(copy, "setup", **env)) == []


def test_bench_and_test_commands(checkout):
    copy, venv = checkout
    out = make_dry_run(copy, "bench", VIRTUAL_ENV=str(venv))
    bench = [line for line in out.splitlines() if "benchmarks/bench_rnn.py" in line]
    assert bench[0].startswith(f"{venv}/bin/python benchmarks/bench_rnn.py --cases maze,ptb ")
    assert "--device cuda" in bench[1], "a visible GPU runs the comparison there too"
    out = make_dry_run(copy, "test", VIRTUAL_ENV=str(venv))
    assert out.splitlines()[-1].startswith(f"{venv}/bin/python -m pytest python_tests")


def test_readme_and_ci_use_the_make_commands():
    """The README's first commands are the Makefile's, and CI runs the README's test command."""
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == [
        "make bench",
        "make test",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), "CI must run the README's test command"


def test_the_package_ships_the_sources_of_the_first_use_build(tmp_path):
    """A `pip install .` that cannot build the extension (build isolation hides torch) installs
    csrc/ inside the package, for the first-use build."""
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = tmp_path / "backpropamine_cuda"
    assert (shipped / "csrc" / "ops.cpp").is_file()
    assert {p.name for p in (ROOT / "csrc").rglob("*.h")} <= {
        p.name for p in (shipped / "csrc").rglob("*.h")
    }
    assert (shipped / "_extension.py").is_file()
