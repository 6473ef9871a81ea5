"""Differentiable, neuromodulated Hebbian plasticity with fused C++/CUDA kernels.

    import backpropamine_cuda as bp
    rnn = bp.PlasticRNN(input_size, hidden_size, alpha="full", modulation="fanout", rule="clip")
    out, state = rnn(x)
    lstm = bp.PlasticLSTM(input_size, hidden_size, alpha="neuron", modulation="fanout")
    out, state = lstm(x)  # state: bp.PlasticLSTMState(h, c, hebb, elig)

``bp.reference`` is the pure-PyTorch specification of every op; ``bp.fused`` the same functions on
the compiled kernels (imported on first use, which builds the extension if pip did not).
"""

import importlib

from . import reference
from .modules import (
    PlasticLSTM,
    PlasticLSTMCell,
    PlasticLSTMState,
    PlasticRNN,
    PlasticRNNCell,
    PlasticState,
)
from .rollout import RecordedRollout, RolloutState

__all__ = [
    "PlasticRNN",
    "PlasticRNNCell",
    "PlasticState",
    "RolloutState",
    "RecordedRollout",
    "PlasticLSTM",
    "PlasticLSTMCell",
    "PlasticLSTMState",
    "reference",
    "fused",
]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "fused":
        return importlib.import_module(".fused", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
