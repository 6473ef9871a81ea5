"""Sources and compiler flags of the extension, shared by setup.py (ahead-of-time build), the
first-use build of _extension.py and .ci/nvcc_check.sh. Imports nothing from torch at module level
so setup.py can read it anywhere; the functions that look at torch import it when called."""

import os
from pathlib import Path

# -fopenmp: at::parallel_for is an inline OpenMP loop; without it the kernels run on one thread.
# -fno-trapping-math: floating-point operations may be computed speculatively (nothing enables FP
# exceptions), so the vectoriser can turn the rules' selects into blends on CPUs without AVX-512
# masks (2.5x faster backward with AVX2). Results are unchanged.
# -ffp-contract=off: no multiply-add is fused into an FMA unless the code says so. The compiler
# otherwise decides per template instantiation, so the backward's variants (matvec adjoint alone,
# with the rule's adjoint, ...) rounded the same element differently in the AVX2 build, and
# gradients changed in the last bit with the checkpoint interval. No cost measured on the maze
# and PTB sizes (AMD EPYC, AVX2).
# -std=c++20: the sources are C++20 (concepts, requires); torch before 2.13 adds -std=c++17 to a
# build whose flags name no standard.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off", "-DNDEBUG"]
LD_FLAGS = ["-fopenmp"]
# The CUDA sources include the same C++20 headers as the CPU ones; --expt-relaxed-constexpr lets
# device code call constexpr host functions (std::numeric_limits, ...); the host half of the .cu
# files is compiled like the C++ files (OpenMP). --fmad=false, the device's -ffp-contract=off:
# nvcc otherwise contracts hebb + eta * prod into an FMA per kernel as it sees fit: on the
# whole-sequence path gradients changed in the last bit with the checkpoint interval (seen on an
# H200, decay rule), as they did on the CPU before -ffp-contract=off.
# The kernels are bound by memory traffic, so the separate multiply and add should cost little
# (not yet measured on a GPU).
NVCC_FLAGS = [
    "-O3",
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "--fmad=false",
    "-DNDEBUG",
    "-Xcompiler",
    "-fopenmp",
]
# TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible: A100 (sm_80) and H100/H200
# (sm_90), plus sm_90 PTX that the driver compiles for newer GPUs.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# BACKPROPAMINE_BUILD_CUDA=0 builds the CPU ops only, even with a CUDA torch and nvcc.
BUILD_CUDA_ENV = "BACKPROPAMINE_BUILD_CUDA"


def cpu_sources(csrc: Path):
    """The C++ sources of every build (the CPU ops and the emulated CUDA kernels)."""
    return sorted(str(p) for p in csrc.rglob("*.cpp"))


def cuda_sources(csrc: Path):
    """The CUDA sources, compiled by nvcc in CUDA builds only."""
    return sorted(str(p) for p in csrc.rglob("*.cu"))


def header_files(csrc: Path):
    """The headers every source may include: a change to one must rebuild (setuptools compares
    only the listed sources with the built library otherwise)."""
    return sorted(str(p) for pattern in ("*.h", "*.cuh") for p in csrc.rglob(pattern))


def cuda_toolkit():
    """(CUDA_HOME, None) when the CUDA kernels are to be built: torch is a CUDA build and nvcc
    is found. Otherwise (None, why not), `why` None for a CPU-only torch (nothing to say)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return None, None
    if os.environ.get(BUILD_CUDA_ENV) == "0":
        return None, f"{BUILD_CUDA_ENV}=0: building the CPU ops only"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return None, (
            f"torch {torch.__version__} is a CUDA build but nvcc was not found (set "
            "CUDA_HOME or put nvcc on PATH): building the CPU ops only"
        )
    return CUDA_HOME, None


def cuda_arch_list():
    """The architectures to compile for: TORCH_CUDA_ARCH_LIST if set, else those of the visible
    GPUs, else DEFAULT_CUDA_ARCHS. torch's build helpers read TORCH_CUDA_ARCH_LIST: callers set it
    to this for the build (torch's own default fails when no GPU is visible)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_CUDA_ARCHS
