"""Loads the compiled ops: the ahead-of-time build (backpropamine_cuda._C) when `pip install` could
build it, otherwise a build at first use with torch.utils.cpp_extension (ninja), cached under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). Either build includes the CUDA kernels
when torch is a CUDA build and nvcc is found (_build_config.cuda_toolkit)."""

import contextlib
import fcntl
import functools
import os
import sys
import time
from pathlib import Path

from . import _build_config

EXTENSION_NAME = "backpropamine_cuda_C"
# How long a first use waits for another live process that is building the same extension.
BUILD_WAIT_S = 30 * 60
# Lines of the compiler's output shown in the error of a failed build (the whole output is saved
# next to the build).
ERROR_TAIL_LINES = 40

# The error of a failed first-use build: raised again by every later load() in this process
# instead of recompiling (and failing again) on every call.
_build_failure = None


class BuildError(RuntimeError):
    """The compiler (or ninja, or the linker) failed on a first-use build."""


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed copy, source checkout
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise RuntimeError(
        f"backpropamine_cuda: C++ sources not found next to {here}; reinstall the package"
    )


def build_directory(with_cuda: bool) -> Path:
    """Where the first-use build of this torch, Python and CUDA choice is compiled and cached."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / (
        f"{EXTENSION_NAME}-torch{torch.__version__}-py{sys.version_info[0]}"
        f"{sys.version_info[1]}{'-cuda' if with_cuda else ''}"
    )


@functools.lru_cache(maxsize=None)
def load() -> str:
    """Registers the ops under torch.ops.backpropamine; returns how they were obtained."""
    global _build_failure
    try:
        from . import _C  # noqa: F401  (ahead-of-time build)

        return "prebuilt"
    except ImportError:
        pass
    if _build_failure is not None:
        raise RuntimeError(
            f"{_build_failure}\n(This build already failed in this process and "
            "is not retried: restart Python after fixing the cause.)"
        )
    csrc = _csrc_dir()
    toolkit, why_not = _build_config.cuda_toolkit()
    sources = _build_config.cpu_sources(csrc)
    env, cuda_args = {}, {}
    if toolkit:
        sources += _build_config.cuda_sources(csrc)
        env["TORCH_CUDA_ARCH_LIST"] = _build_config.cuda_arch_list()
        cuda_args["extra_cuda_cflags"] = _build_config.NVCC_FLAGS
    build_dir = build_directory(bool(toolkit))
    if not (build_dir / f"{EXTENSION_NAME}.so").exists():
        if why_not:
            print(f"backpropamine_cuda: {why_not}", file=sys.stderr)
        what = (
            f"the fused CPU and CUDA ops on first use (several minutes; TORCH_CUDA_ARCH_LIST="
            f"{env['TORCH_CUDA_ARCH_LIST']}"
            if toolkit
            else "the fused ops on first use (a few minutes"
        )
        print(
            f"backpropamine_cuda: compiling {what}; cached in {build_dir})",
            file=sys.stderr,
            flush=True,
        )
    hint = (
        f"; {_build_config.BUILD_CUDA_ENV}=0 builds the CPU ops only (nvcc from {toolkit})"
        if toolkit
        else ""
    )
    try:
        with _environ(env):
            build_and_load(
                EXTENSION_NAME,
                sources,
                build_dir,
                hint=hint,
                extra_cflags=_build_config.CXX_FLAGS,
                extra_ldflags=_build_config.LD_FLAGS,
                **cuda_args,
            )
    except BuildError as err:
        _build_failure = err
        raise
    return "built at first use"


def build_and_load(name, sources, build_dir: Path, hint="", **build_args):
    """torch.utils.cpp_extension.load of `sources` as library `name` in `build_dir`, made safe
    against an interrupted earlier build (see _exclusive_build); a failed build raises a
    BuildError holding the tail of the compiler's output."""
    from torch.utils.cpp_extension import load as jit_load

    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(build_dir):
        try:
            jit_load(
                name=name,
                sources=sources,
                build_directory=str(build_dir),
                is_python_module=False,
                **build_args,
            )
        except Exception as err:
            raise BuildError(_build_error_message(err, build_dir, hint)) from err


def _build_error_message(err, build_dir: Path, hint):
    """The failure of a build with the end of the compiler's output, which torch's error carries
    (the whole output goes to build_dir/build_error.log)."""
    output = str(err).strip()
    lines = output.splitlines()
    notes = [f"its last {ERROR_TAIL_LINES} lines"] if len(lines) > ERROR_TAIL_LINES else []
    log = build_dir / "build_error.log"
    try:
        log.write_text(output + "\n")
        notes.append(f"all of it is in {log}")
    except OSError:
        pass
    detail = f" ({'; '.join(notes)})" if notes else ""
    tail = "\n".join(lines[-ERROR_TAIL_LINES:])
    return (
        f"backpropamine_cuda: building the fused ops in {build_dir} failed; the compiler's "
        f"output follows{detail}. The build needs a C++20 compiler with OpenMP, and ninja; "
        f"impl='reference' needs neither{hint}.\n{tail}"
    )


@contextlib.contextmanager
def _exclusive_build(build_dir: Path, wait_s: float = None):
    """Runs a build in build_dir as the only one, and clears what a killed build left behind.

    torch serialises builds with a lock *file* (build_dir/lock) that exists while a build runs
    and that other processes poll for, without limit: a build killed mid-way (SIGKILL, SIGTERM, a
    closed terminal) leaves it, and every later first use then waits forever. Here every build
    first takes an flock on build_dir/owner, which the kernel releases when its holder dies: a
    torch lock file found while holding the flock has no live owner, and is removed. A live owner
    is waited for, up to `wait_s` (default BUILD_WAIT_S), then the error names the directory.
    """
    wait_s = BUILD_WAIT_S if wait_s is None else wait_s
    owner_path = build_dir / "owner"
    with open(owner_path, "a+") as owner:
        started, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner.seek(0)
                pid = owner.read().strip() or "unknown"
                waited = time.monotonic() - started
                if waited >= wait_s:
                    raise RuntimeError(
                        f"backpropamine_cuda: waited {waited:.0f} s for process {pid} that is "
                        f"building the fused ops in {build_dir}; if no such build is running, "
                        f"delete that directory and try again"
                    ) from None
                if not told:
                    print(
                        f"backpropamine_cuda: process {pid} is building the fused ops in "
                        f"{build_dir}; waiting for it",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
                time.sleep(min(0.5, wait_s))
        try:
            owner.seek(0)
            owner.truncate()
            owner.write(str(os.getpid()))
            owner.flush()
            stale = build_dir / "lock"
            if stale.exists():
                print(
                    f"backpropamine_cuda: removing {stale}, left by an interrupted build",
                    file=sys.stderr,
                    flush=True,
                )
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(owner, fcntl.LOCK_UN)


@contextlib.contextmanager
def _environ(values):
    """Sets environment variables for the duration of a block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
