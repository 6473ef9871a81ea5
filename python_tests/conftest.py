import os
import sys

import pytest
import torch

# helpers.py lives next to this file; make it importable whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import OnCuda  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed and restores the thread count it may change."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["whole", "steps"])
def sequence_path(request, monkeypatch):
    """Runs a test once on each path of the RNN sequence op (BACKPROPAMINE_SEQUENCE_PATH): whole
    sequences per group of samples, or step by step; backends without a whole-sequence kernel
    run step by step either way."""
    monkeypatch.setenv("BACKPROPAMINE_SEQUENCE_PATH", request.param)
    return request.param


@pytest.fixture(scope="session")
def fused_cpu():
    """The fused implementation (building the extension on first use)."""
    from backpropamine_cuda import fused as module

    return module


@pytest.fixture(scope="session", params=["cpu", "emulated_cuda", "cuda"])
def fused(request, fused_cpu):
    """The fused functions on the CPU kernels; on the CUDA kernels run by the CPU emulator
    (csrc/cuda/emulate.h, every memory access bounds-checked); and on the GPU when there is one.
    Every op test thereby checks the CUDA kernels against the reference, with or without a GPU."""
    if request.param == "cpu":
        return fused_cpu
    if request.param == "emulated_cuda":
        return fused_cpu.emulated_cuda
    if not torch.cuda.is_available() or not fused_cpu.has_cuda_kernels():
        pytest.skip("no CUDA device or no CUDA kernels built")
    return OnCuda(fused_cpu)
