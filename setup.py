"""Builds the fused ops ahead of time when torch is importable (pip install --no-build-isolation .),
with the CUDA kernels when torch is a CUDA build and nvcc is found, and always ships the C++/CUDA
sources inside the package so they can be compiled at first use."""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(
    "_build_config", ROOT / "backpropamine_cuda" / "_build_config.py"
)
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package (backpropamine_cuda/csrc) for the first-use build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "backpropamine_cuda" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    print(
        "backpropamine_cuda: torch is not importable at build time; the fused ops will be "
        "compiled at first use (install with --no-build-isolation to build them now)"
    )
else:
    csrc = ROOT / "csrc"
    sources = build_config.cpu_sources(csrc)
    toolkit, why_not = build_config.cuda_toolkit()
    if why_not:
        print(f"backpropamine_cuda: {why_not}")
    flags = {"cxx": build_config.CXX_FLAGS}
    extension = CppExtension
    if toolkit:
        # torch's build helpers read the architectures from the environment.
        os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.cuda_arch_list()
        print(
            f"backpropamine_cuda: building the CUDA kernels too (nvcc from {toolkit}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
        sources += build_config.cuda_sources(csrc)
        flags["nvcc"] = build_config.NVCC_FLAGS
        extension = CUDAExtension
    relative = lambda paths: [str(Path(p).relative_to(ROOT)) for p in paths]  # noqa: E731
    ext_modules.append(
        extension(
            "backpropamine_cuda._C",
            relative(sources),
            depends=relative(build_config.header_files(csrc)),
            extra_compile_args=flags,
            extra_link_args=build_config.LD_FLAGS,
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
