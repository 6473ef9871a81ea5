"""Acting without gradients and replaying with them: the state of PlasticRNN.rollout_step and
PlasticRNNCell.rollout_step, and RecordedRollout (docs/design.md, 'The rollout step and recorded
replay')."""

from typing import NamedTuple, Optional

import torch

from . import reference
from .modules import PlasticRNN, PlasticState, _is_count


class RolloutState(NamedTuple):
    """State of ``rollout_step``: those of PlasticState, whose traces it updates in place, and the
    next step's recurrent drive ``h @ (w + alpha * hebb)`` (B, N), None for plastic=False."""

    h: torch.Tensor
    hebb: Optional[torch.Tensor] = None
    elig: Optional[torch.Tensor] = None
    drive: Optional[torch.Tensor] = None


class RecordedRollout:
    """A rollout (acting without gradients) of a PlasticRNN or PlasticRNNCell that can then be
    replayed with gradients without running the network again: the fused sequence op's backward
    needs only what the rollout saw, each h_t and m_t and the traces every checkpoint_every steps.

        rollout = layer.recorded_rollout(batch_size, steps, like=x)   # from the zero state
        for t in range(steps):
            h, m = rollout.step(x[t])      # layer.rollout_step, recording
        out, m = rollout.replay(x)         # layer(x)'s out and m, differentiable

    replay() checks that every step was taken, that x is what the steps saw, and that no
    parameter of the layer changed since the rollout began (e.g. by an optimizer step); it raises
    otherwise. Without fused kernels for the tensors (or with impl "reference", or plastic=False)
    it computes layer(x) instead, with the same results.

    In a training loop, pass the previous iteration's rollout as ``reuse`` (see
    ``recorded_rollout``) once its loss has been backpropagated: the record's buffers are then
    allocated once, not every iteration. Should a graph of the old replay still be
    backpropagated, autograd raises (the buffers it saved were modified).
    """

    def __init__(self, layer, batch_size, steps, like, reuse=None):
        if not _is_count(batch_size):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not _is_count(steps):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not (isinstance(like, torch.Tensor) and like.is_floating_point()):
            got = like.dtype if isinstance(like, torch.Tensor) else type(like).__name__
            raise ValueError(
                f"like must be a floating-point tensor (the rollout's dtype and device), got {got}"
            )
        if reuse is not None and not isinstance(reuse, RecordedRollout):
            raise ValueError(f"reuse must be None or a RecordedRollout, got {type(reuse)}")
        self.layer, self.steps, self.t = layer, steps, 0
        self._handed_over = False
        self._versions = [p._version for p in layer.parameters()]
        # Large fresh buffers cost page faults at their first write, every rollout: an earlier
        # rollout's are taken over instead where they fit (it cannot be replayed afterwards).
        spare = [] if reuse is None else reuse._hand_over()

        def buffer(*shape):
            for k, t in enumerate(spare):
                if t.shape == shape and t.dtype == like.dtype and t.device == like.device:
                    return spare.pop(k)
            return like.new_empty(shape)

        self._inputs = buffer(steps, batch_size, layer.input_size)
        self._state = self._backend = self._record = self._traces = None
        if not layer.plastic:
            return
        from .fused import SequenceRecord, default_checkpoint_every

        N, K = layer.hidden_size, 0 if layer.modulation == "none" else layer.n_modulators
        L = default_checkpoint_every(steps)
        n_ckpt = -(-steps // L) - 1
        retro = layer.rule == "retroactive"
        # The traces the steps update in place, zeroed at the first step.
        self._traces = buffer(batch_size, N, N), buffer(batch_size, N, N) if retro else None
        self._record = SequenceRecord(
            buffer(steps, batch_size, N),
            buffer(steps, batch_size, K),
            buffer(n_ckpt, batch_size, N, N),
            buffer(n_ckpt if retro else 0, batch_size, N, N),
            L,
        )

    def _hand_over(self):
        """This rollout's buffers, for a new one; this one can no longer step or replay."""
        buffers = [self._inputs]
        if self._record is not None:
            buffers += [*self._traces, *self._record[:4]]
        self._inputs = self._record = self._state = self._traces = None
        self._handed_over = True
        return [t for t in buffers if t is not None]

    def _check_not_handed_over(self, method):
        if self._handed_over:
            raise ValueError(
                f"{method}: this rollout's buffers went to a newer rollout "
                "(reuse=...); it can no longer step or replay"
            )

    @torch.no_grad()
    def step(self, x):
        """One step on x (B, input_size): (h, m), as layer.rollout_step (m None without
        modulation)."""
        self._check_not_handed_over("step")
        if self.t == self.steps:
            raise ValueError(f"step: the rollout's {self.steps} steps are all taken")
        self.layer._check_input(x, 2, "(B, input_size)")
        if x.shape[0] != self._inputs.shape[1] or x.dtype != self._inputs.dtype:
            raise ValueError(
                f"step: x must have batch size {self._inputs.shape[1]} and dtype "
                f"{self._inputs.dtype}, got {tuple(x.shape)} {x.dtype}"
            )
        if self._state is None:
            self._backend = self.layer._backend(x)
            if self._record is None:
                state = self.layer.initial_state(x.shape[0], x)
            else:  # zeros, in the rollout's own traces
                hebb, elig = (None if t is None else t.zero_() for t in self._traces)
                state = PlasticState(x.new_zeros(x.shape[0], self.layer.hidden_size), hebb, elig)
            drive = None
        else:  # the state is the rollout's own, checked at the first step
            state, drive = self._state, self._state.drive
        t = self.t + 1
        # The trace after a checkpoint step is written straight into the record, and the next
        # step writes back into the rollout's own traces: no copies.
        record, hebb_out, elig_out = self._record, None, None
        if record is not None:
            L = record.checkpoint_every
            if t % L == 0 and t < self.steps:
                hebb_out = record.hebb_checkpoints[t // L - 1]
                if state.elig is not None:
                    elig_out = record.elig_checkpoints[t // L - 1]
            elif state.hebb is not self._traces[0]:
                hebb_out, elig_out = self._traces
        h, self._state, m = self.layer._rollout(x, state, drive, self._backend, hebb_out, elig_out)
        self.t = t
        self._inputs[t - 1] = x
        if record is not None:
            record.out[t - 1] = h
            if m is not None:
                record.m[t - 1] = m
        return h, m

    def replay(self, x):
        """(out (T, B, N), m (T, B, K) or None) of layer(x), differentiable, from the record."""
        self._check_not_handed_over("replay")
        if self.t < self.steps:
            raise ValueError(f"replay: the rollout took {self.t} of its {self.steps} steps")
        if not torch.equal(x, self._inputs):
            raise ValueError("replay: x differs from the inputs of the rollout's steps")
        if [p._version for p in self.layer.parameters()] != self._versions:
            raise RuntimeError(
                "replay: the layer's parameters changed since the rollout began "
                "(an optimizer step?); the record no longer describes them"
            )
        layer = self.layer
        backend = layer._backend(x)
        if self._record is None or backend is reference:
            return self._forward(x)
        zeros = layer.initial_state(x.shape[1], x)
        return backend.plastic_rnn_sequence_replay(
            layer.i2h(x),
            zeros.h,
            zeros.hebb,
            zeros.elig,
            *layer._plastic_params(),
            rule=layer.rule,
            clip=layer.clip,
            record=self._record,
        )

    def _forward(self, x):
        """(out, m) of the layer's own forward over x, from the zero state."""
        if isinstance(self.layer, PlasticRNN):
            out, _, m = self.layer(x, return_modulation=True)
            return out, m
        state, outs, mods = None, [], []
        for x_t in x.unbind(0):
            h, state, m = self.layer(x_t, state, return_modulation=True)
            outs.append(h)
            mods.append(m)
        return torch.stack(outs), None if mods[0] is None else torch.stack(mods)
