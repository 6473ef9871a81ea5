"""Loads the compiled ops: the ahead-of-time build (backpropamine_cuda._C) when `pip install` could
build it, otherwise a build at first use with torch.utils.cpp_extension (ninja), cached under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)."""
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
    raise RuntimeError(f"backpropamine_cuda: C++ sources not found next to {here}; reinstall the package")


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
    name = "backpropamine_cuda_C"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    build_dir = root / f"{name}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").exists():
        print(f"backpropamine_cuda: compiling the fused ops on first use (about a minute; cached "
              f"in {build_dir})", file=sys.stderr, flush=True)
    try:
        jit_load(name=name, sources=_build_config.cpu_sources(csrc),
                 extra_cflags=_build_config.CXX_FLAGS, extra_ldflags=_build_config.LD_FLAGS,
                 build_directory=str(build_dir), is_python_module=False)
    except Exception as err:
        raise RuntimeError(
            "backpropamine_cuda: building the fused ops failed (see the compiler output above). "
            "Install a C++ compiler and ninja, or use impl='reference'.") from err
    return "built at first use"
