"""AWD-LSTM language model (Merity et al., "Regularizing and optimizing LSTM language models",
2018) on plastic LSTM layers (Miconi et al., "Backpropamine", 2019): the model of Backpropamine's
Penn Treebank experiments, and the small model of its Table 1 (untied, no dropout).

Regularisation, all off in evaluation mode: embedding dropout (whole word vectors), locked
(variational) dropout on the embeddings, between layers and on the output, and DropConnect on
the recurrent weights (`wdrop`). The fused ops take the weights as tensors, so DropConnect is a
functional call of the layer with dropped weights, which Backpropamine's custom cells could not do.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import backpropamine_cuda as bp

RECURRENT_WEIGHTS = ("h2g.weight", "w")  # what wdrop drops: h -> gates i, f, o, and h -> g
PLASTIC_PARAMETERS = ("alpha", "eta", "elig_rate")  # keep their own initialisation


def embedded_dropout(embedding, words, p):
    """Embedding lookup that drops word types: each row of the table is zeroed with probability
    p (for every occurrence of that word in the batch), the others scaled by 1 / (1 - p)."""
    if not p:
        return embedding(words)
    weight = embedding.weight
    mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return F.embedding(words, mask * weight)


def locked_dropout(x, p, shard):
    """Dropout with one mask per sequence, the same at every time step; x is (T, B, N).

    The mask is drawn for the whole batch and this process takes its rows (`shard` = (index,
    count) of its equal slice of the batch), so that data-parallel processes, which share a
    seed, draw the same masks as one process would."""
    if not p:
        return x
    index, count = shard
    batch = x.size(1)
    mask = x.new_empty(1, batch * count, x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask[:, index * batch : (index + 1) * batch]


class LanguageModel(nn.Module):
    """Embedding -> `nlayers` bp.PlasticLSTM layers -> decoder.

    Layer widths: emsize -> nhid -> ... -> nhid -> emsize when `tied` (the decoder reuses the
    embedding table), else -> nhid. `layer_options` go to every bp.PlasticLSTM. `init_range` 0
    keeps awd-lstm-lm's initialisation (embedding uniform in +-0.1, decoder bias 0, layers as
    bp.PlasticLSTM initialises them); > 0 draws every parameter but the plastic ones (alpha, eta,
    elig_rate) uniformly in +-init_range (Zaremba et al. 2014).

    forward(words (T, B), hidden) -> logits (T * B, ntokens), new hidden, and the last layer's
    output before and after its dropout (for the AR and TAR penalties). `hidden` is a list with a
    bp.PlasticLSTMState (or None: zeros) per layer.
    """

    def __init__(
        self,
        ntokens,
        emsize,
        nhid,
        nlayers,
        layer_options,
        tied=True,
        dropout=0.0,
        dropouth=0.0,
        dropouti=0.0,
        dropoute=0.0,
        wdrop=0.0,
        init_range=0.0,
        shard=(0, 1),
    ):
        super().__init__()
        self.encoder = nn.Embedding(ntokens, emsize)
        widths = [emsize] + [nhid] * (nlayers - 1) + [emsize if tied else nhid]
        self.rnns = nn.ModuleList(
            bp.PlasticLSTM(n_in, n_out, **layer_options)
            for n_in, n_out in zip(widths[:-1], widths[1:])
        )
        self.decoder = nn.Linear(widths[-1], ntokens)
        if tied:
            self.decoder.weight = self.encoder.weight
        self.dropout, self.dropouth, self.dropouti, self.dropoute = (
            dropout,
            dropouth,
            dropouti,
            dropoute,
        )
        self.wdrop, self.shard = wdrop, shard
        self._initialise(init_range)

    @torch.no_grad()
    def _initialise(self, init_range):
        if not init_range:
            self.encoder.weight.uniform_(-0.1, 0.1)
            self.decoder.bias.zero_()
            if self.decoder.weight is not self.encoder.weight:
                self.decoder.weight.uniform_(-0.1, 0.1)
            return
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1] not in PLASTIC_PARAMETERS:
                p.uniform_(-init_range, init_range)

    def _layer(self, rnn, x, state):
        if not (self.training and self.wdrop):
            return rnn(x, state)
        dropped = {
            name: F.dropout(rnn.get_parameter(name), self.wdrop) for name in RECURRENT_WEIGHTS
        }
        return functional_call(rnn, dropped, (x, state))

    def forward(self, words, hidden):
        def drop(p):
            return p if self.training else 0.0

        x = embedded_dropout(self.encoder, words, drop(self.dropoute))
        x = locked_dropout(x, drop(self.dropouti), self.shard)
        new_hidden = []
        for layer, rnn in enumerate(self.rnns):
            raw, state = self._layer(rnn, x, hidden[layer])
            new_hidden.append(state)
            last = layer == len(self.rnns) - 1
            x = locked_dropout(raw, drop(self.dropout if last else self.dropouth), self.shard)
        logits = self.decoder(x)
        return logits.view(-1, logits.size(-1)), new_hidden, raw, x


def detach_state(hidden):
    """The hidden states cut from the graph that produced them (None stays None): traces carry
    over to the next BPTT segment, gradients do not."""
    return [
        None if s is None else type(s)(*(None if t is None else t.detach() for t in s))
        for s in hidden
    ]
