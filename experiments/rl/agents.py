"""Actor-critic agents of the Backpropamine and differentiable-plasticity RL tasks: one recurrent
layer (bp.PlasticRNN) read out by a policy (softmax over actions) and a value head.

The network types, as the papers name them:

| type          | layer                                                              | paper            |
|---------------|--------------------------------------------------------------------|------------------|
| `rnn`         | non-plastic tanh RNN                                               | both             |
| `plastic`     | plastic, alpha per connection, learned scalar eta, clip 1          | Backpropamine    |
| `simple`      | simple neuromodulation (eta = tanh(h2mod(h_t)) per sample), clip 1 | Backpropamine    |
| `retroactive` | simple neuromodulation of eligibility traces, clip 1               | Backpropamine    |
| `fanout`      | neuromodulation fanned out per neuron (K = 1), clip 2              | simplemaze       |
| `oja`         | Oja's rule, learned scalar eta, alpha per connection               | diff. plasticity |
| `oja-scalar`  | Oja's rule, one alpha for all connections                          | diff. plasticity |

Sizes are matched by parameter count (`matched_size`): in the maze, 100 neurons for the
modulated types give 139 for the RNN and 100 for `plastic` (the paper used 101).

Initialisation: the layer's own (w and alpha uniform in [0, 0.001), as the simplemaze code), or
with `weight_init` w and alpha uniform in [0, weight_init) (0.01 in the original maze and
cue-reward code); `eta_init` and `elig_rate_init` start the learned plasticity rate (type
`plastic`, `oja`, `oja-scalar`) and eligibility rate (`retroactive`).
"""

import torch
from torch import nn

import backpropamine_cuda as bp
from experiments.common import closest_size, count_parameters

NETWORK_TYPES = {
    "rnn": dict(plastic=False),
    "plastic": dict(alpha="full", modulation="none", rule="clip", clip=1.0),
    "simple": dict(alpha="full", modulation="simple", rule="clip", clip=1.0),
    "retroactive": dict(alpha="full", modulation="simple", rule="retroactive", clip=1.0),
    "fanout": dict(alpha="full", modulation="fanout", rule="clip", clip=2.0),
    "oja": dict(alpha="full", modulation="none", rule="oja"),
    "oja-scalar": dict(alpha="scalar", modulation="none", rule="oja"),
}
MODULATED = tuple(
    t for t, options in NETWORK_TYPES.items() if options.get("modulation", "none") != "none"
)


class Agent(nn.Module):
    """Plastic RNN -> (policy logits, value). Steps one observation at a time while acting
    (`step`), and runs a recorded episode's observations in one call of the fused sequence op
    for the loss (`forward`): both go through the same layer and parameters."""

    def __init__(
        self,
        obs_size,
        n_actions,
        network_type,
        hidden_size,
        impl="auto",
        weight_init=None,
        eta_init=0.01,
        elig_rate_init=0.1,
    ):
        super().__init__()
        if network_type not in NETWORK_TYPES:
            raise ValueError(
                f"network_type must be one of {tuple(NETWORK_TYPES)}, got {network_type!r}"
            )
        self.network_type = network_type
        self.rnn = bp.PlasticRNN(
            obs_size,
            hidden_size,
            impl=impl,
            eta_init=eta_init,
            elig_rate_init=elig_rate_init,
            **NETWORK_TYPES[network_type],
        )
        if weight_init is not None:
            with torch.no_grad():
                for name in ("w", "alpha"):
                    if hasattr(self.rnn, name):
                        getattr(self.rnn, name).uniform_(0, weight_init)
        self.policy = nn.Linear(hidden_size, n_actions)
        self.value = nn.Linear(hidden_size, 1)
        self._rollout = None  # the last recorded rollout, whose buffers the next one takes over

    def _heads(self, h):
        return self.policy(h), self.value(h).squeeze(-1)

    def step(self, obs, state=None):
        """obs (B, obs_size) -> logits (B, A), value (B,), the new state, modulation (B, K) or
        None. `state` may be a bp.RecordedRollout (see `recorded_rollout`), which steps and
        records. Under no_grad (rollouts) it takes the layer's rollout_step, which updates the
        traces in place and sweeps them once per step."""
        x = obs.to(self.policy.weight.dtype)
        if isinstance(state, bp.RecordedRollout):
            h, m = state.step(x)
            return *self._heads(h), state, m
        if not torch.is_grad_enabled():
            h, state, m = self.rnn.rollout_step(x, state, return_modulation=True)
            return *self._heads(h), state, m
        out, state, m = self.rnn(x.unsqueeze(0), state, return_modulation=True)
        return *self._heads(out[0]), state, None if m is None else m[0]

    def forward(self, observations):
        """observations (T, B, obs_size) of whole episodes from zero state -> logits (T, B, A),
        values (T, B), modulation (T, B, K) or None."""
        out, _, m = self.rnn(observations.to(self.policy.weight.dtype), return_modulation=True)
        return *self._heads(out), m

    def recorded_rollout(self, batch_size, steps):
        """A bp.RecordedRollout of the recurrent layer: pass it as `state` to `step` for a whole
        episode, then to `replay`. It takes over the buffers of the previous one, whose replay
        must be done with (training replays each rollout once, before the next)."""
        self._rollout = self.rnn.recorded_rollout(
            batch_size, steps, self.policy.weight, reuse=self._rollout
        )
        return self._rollout

    def replay(self, observations, rollout):
        """forward(observations) for the episode that `rollout` recorded, without running the
        recurrent layer again."""
        out, m = rollout.replay(observations.to(self.policy.weight.dtype))
        return *self._heads(out), m


def matched_size(network_type, target, obs_size, n_actions):
    """The hidden size whose agent's parameter count is closest to `target`."""

    def count(n):
        with torch.device("meta"):  # shapes only
            return count_parameters(Agent(obs_size, n_actions, network_type, n, impl="reference"))

    return closest_size(count, target)
