"""Loads the compiled ops: the ahead-of-time build (backpropamine_cuda._C) when `pip install` could
build it, otherwise a build at first use with torch.utils.cpp_extension (ninja), cached under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). Either build includes the CUDA kernels
when torch is a CUDA build and nvcc is found (_build_config.cuda_toolkit)."""
import contextlib
import functools
import os
import sys
from pathlib import Path

from . import _build_config


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed copy, source checkout
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise RuntimeError(f"backpropamine_cuda: C++ sources not found next to {here}; reinstall the "
                       "package")


@functools.lru_cache(maxsize=None)
def load() -> str:
    """Registers the ops under torch.ops.backpropamine; returns how they were obtained."""
    try:
        from . import _C  # noqa: F401  (ahead-of-time build)
        return "prebuilt"
    except ImportError:
        pass
    import torch
    from torch.utils.cpp_extension import get_default_build_root, load as jit_load

    csrc = _csrc_dir()
    toolkit, why_not = _build_config.cuda_toolkit()
    name = "backpropamine_cuda_C"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    build_dir = root / (f"{name}-torch{torch.__version__}-py{sys.version_info[0]}"
                        f"{sys.version_info[1]}{'-cuda' if toolkit else ''}")
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = _build_config.cpu_sources(csrc)
    env, cuda_args = {}, {}
    if toolkit:
        sources += _build_config.cuda_sources(csrc)
        env["TORCH_CUDA_ARCH_LIST"] = _build_config.cuda_arch_list()
        cuda_args["extra_cuda_cflags"] = _build_config.NVCC_FLAGS
    if not (build_dir / f"{name}.so").exists():
        if why_not:
            print(f"backpropamine_cuda: {why_not}", file=sys.stderr)
        what = (f"the fused CPU and CUDA ops on first use (a few minutes; TORCH_CUDA_ARCH_LIST="
                f"{env['TORCH_CUDA_ARCH_LIST']}" if toolkit else
                "the fused ops on first use (about a minute")
        print(f"backpropamine_cuda: compiling {what}; cached in {build_dir})", file=sys.stderr,
              flush=True)
    try:
        with _environ(env):
            jit_load(name=name, sources=sources, extra_cflags=_build_config.CXX_FLAGS,
                     extra_ldflags=_build_config.LD_FLAGS, build_directory=str(build_dir),
                     is_python_module=False, **cuda_args)
    except Exception as err:
        hint = (f" (nvcc from {toolkit}; {_build_config.BUILD_CUDA_ENV}=0 builds the CPU ops "
                "only)" if toolkit else "")
        raise RuntimeError(
            "backpropamine_cuda: building the fused ops failed (see the compiler output above). "
            f"Install a C++ compiler and ninja, or use impl='reference'.{hint}") from err
    return "built at first use"


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
