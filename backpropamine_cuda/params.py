"""The plastic parameters of a recurrent layer: the one description of the tensors that the
reference functions, the fused ops (after their state arguments), the modules and the tests
pass around. backpropamine_cuda/reference.py says what each selects."""

from typing import NamedTuple, Optional

import torch


class PlasticParams(NamedTuple):
    """The plastic connection ``w + alpha * hebb`` and how its trace learns, in the order the
    ops take them: ``eta`` without modulation, else the modulator ``h2mod_*`` (and
    ``fanout_*``); ``elig_rate`` for the rule "retroactive". Absent ones are None."""

    w: torch.Tensor
    alpha: torch.Tensor
    eta: Optional[torch.Tensor] = None
    elig_rate: Optional[torch.Tensor] = None
    h2mod_weight: Optional[torch.Tensor] = None
    h2mod_bias: Optional[torch.Tensor] = None
    fanout_weight: Optional[torch.Tensor] = None
    fanout_bias: Optional[torch.Tensor] = None


# The tensor arguments of the RNN ops (plastic_rnn_sequence, plastic_rnn_step) and of the LSTM
# ops (plastic_lstm_sequence, plastic_lstm_step), by name, in order.
RNN_INPUTS = ("x", "h", "hebb", "elig", *PlasticParams._fields)
LSTM_INPUTS = ("x", "h", "c", "hebb", "elig", "h2g_weight", "h2g_bias", *PlasticParams._fields)
