import os
import sys

import pytest
import torch

# helpers.py lives next to this file; make it importable whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


class OnCuda:
    """The fused functions of `ops` with every tensor argument (also inside a tuple, such as a
    SequenceRecord) moved to the GPU and every result moved back (differentiably), so that tests
    written for CPU tensors run the CUDA kernels. A tensor the op updates in place (the rollout
    step's traces) is copied back into the caller's tensor."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        fn = getattr(self._ops, name)

        def on_cuda(*args, **kwargs):
            moved = []  # (caller's tensor, its GPU copy, the copy's version before the call)

            def move(v):
                if isinstance(v, torch.Tensor):
                    copy = v.cuda()
                    moved.append((v, copy, copy._version))
                    return copy
                if isinstance(v, tuple):
                    items = [move(item) for item in v]
                    return type(v)(*items) if hasattr(v, "_fields") else tuple(items)
                return v

            out = fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
            with torch.no_grad():
                for original, copy, version in moved:
                    if copy._version != version:
                        original.copy_(copy)
            return tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in out) \
                if isinstance(out, tuple) else out.cpu()
        return on_cuda


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
