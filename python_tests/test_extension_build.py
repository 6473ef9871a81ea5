"""The first-use build (backpropamine_cuda/_extension.py) when the package was installed without a
prebuilt extension: what an interrupted earlier build leaves behind, and a failing compiler.

Each case runs `_extension.load()` in a fresh Python process on a tiny stand-in source (compiled in
a second, instead of the real ops' minutes), with the prebuilt `_C` hidden and TORCH_EXTENSIONS_DIR
in a temporary directory, under a timeout: before the fix, a stale lock made it wait forever."""

import json
import re
import subprocess
import sys
import textwrap
import time

import pytest

from backpropamine_cuda import _extension

from helpers import subprocess_env

# Runs load() twice on SOURCE (argv[1]) in TORCH_EXTENSIONS_DIR, after creating a leftover lock
# file when argv[2] == "stale"; prints what happened as JSON: each call's outcome, message and
# time, and how many builds torch was asked for.
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.modules["backpropamine_cuda._C"] = None  # as if pip had not built the extension
    import torch.utils.cpp_extension as cpp
    from backpropamine_cuda import _build_config, _extension

    _build_config.cpu_sources = lambda csrc: [sys.argv[1]]
    builds = []
    real_load = cpp.load
    cpp.load = lambda *a, **k: builds.append(1) or real_load(*a, **k)
    if sys.argv[2] == "stale":
        build_dir = _extension.build_directory(with_cuda=False)
        build_dir.mkdir(parents=True)
        (build_dir / "lock").touch()  # what a build killed mid-way leaves
    calls = []
    for _ in range(2):
        start = time.monotonic()
        try:
            calls.append(dict(result=_extension.load()))
        except Exception as err:
            calls.append(dict(error=type(err).__name__, message=str(err)))
        calls[-1]["seconds"] = time.monotonic() - start
    print(json.dumps(dict(calls=calls, builds=len(builds))))
""")


def run_first_use(tmp_path, source_text, stale_lock=False, timeout=120):
    """Runs LOAD_SCRIPT on a source file holding `source_text`; returns its JSON report."""
    source = tmp_path / "stand_in.cpp"
    source.write_text(source_text)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, str(source), "stale" if stale_lock else "fresh"],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
            env=subprocess_env(
                TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), BACKPROPAMINE_BUILD_CUDA="0"
            ),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the first-use build did not finish within {timeout} s (hangs on a lock?)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_first_use_build_clears_a_stale_lock(tmp_path):
    report, stderr = run_first_use(
        tmp_path, 'extern "C" int backpropamine_stand_in() { return 1; }\n', stale_lock=True
    )
    assert [c.get("result") for c in report["calls"]] == ["built at first use"] * 2, report
    assert "left by an interrupted build" in stderr


def test_failed_build_shows_the_compiler_output_and_is_not_retried(tmp_path):
    report, _ = run_first_use(tmp_path, "int stand_in( { return missing_name_in_stand_in; }\n")
    first, second = report["calls"]
    assert first["error"] == "BuildError", report
    # the compiler's own diagnostic, not only "see the output above"
    assert "stand_in.cpp" in first["message"] and "error" in first["message"], first["message"]
    assert "build_error.log" in first["message"]
    # the second call raises the same failure at once, without compiling again
    assert report["builds"] == 1, report
    assert second["error"] == "RuntimeError"
    assert second["message"].startswith(first["message"])
    assert "not retried" in second["message"]
    assert second["seconds"] < 1.0, second


# Holds the build flock of argv[1] (as a live build does, with torch's lock file) until killed.
HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from backpropamine_cuda import _extension
    build_dir = Path(sys.argv[1])
    with _extension._exclusive_build(build_dir):
        (build_dir / "lock").touch()
        print("holding", flush=True)
        time.sleep(120)
""")


def test_a_live_build_is_waited_for_and_the_timeout_names_the_directory(tmp_path):
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(build_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        expected = f"process {holder.pid} .*{re.escape(str(build_dir))}.*delete"
        with pytest.raises(RuntimeError, match=expected):
            with _extension._exclusive_build(build_dir, wait_s=1.0):
                pass
        assert time.monotonic() - start < 10
        assert (build_dir / "lock").exists(), "a live build's lock file must not be removed"
    finally:
        holder.kill()
        holder.wait()
    # its holder gone, the lock file is stale: the next build removes it and proceeds
    with _extension._exclusive_build(build_dir, wait_s=1.0):
        assert not (build_dir / "lock").exists()
