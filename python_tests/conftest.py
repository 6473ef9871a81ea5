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


@pytest.fixture(scope="session")
def fused():
    """The fused implementation (building the extension on first use)."""
    from backpropamine_cuda import fused as module
    return module
