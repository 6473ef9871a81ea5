"""Binary pattern memorisation and completion (Differentiable plasticity, Miconi et al., ICML 2018;
the recurrent demo of BOHP, Miconi 2016): each episode shows a few random +-1 patterns, then one
of them with half of its bits zeroed, and the network must output the whole pattern.

    python experiments/patterns/patterns.py                      # quick: 50 bits, 3 networks
    python experiments/patterns/patterns.py --preset paper       # 1000 bits, 5 patterns
    python experiments/patterns/patterns.py --preset comparison  # 50 bits, the paper's sizes
    python experiments/patterns/patterns.py --preset bohp        # 29 neurons, 3 patterns

The plastic network has one neuron per bit plus a bias neuron, fully connected by
w + alpha * hebb (alpha per connection, learned scalar eta, rule "decay"); the inputs are added
to the recurrent drive, scaled by --input-scale, and the output is the pattern neurons' activity
at the last step. It runs the whole episode in one call of the fused sequence op, forward and
backward (BOHP needed O(N^4) memory for hand-derived gradients of this network). The baselines
(non-plastic tanh RNN, LSTM) read the bits through a Linear layer and answer through another.

See experiments/patterns/README.md.
"""

import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import backpropamine_cuda as bp

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the root, for experiments.common
from experiments.common import (  # noqa: E402
    SEED,
    add_training_flags,
    append_csv,
    count_parameters,
    number,
    out_of_memory_exits,
    parse_with_preset,
    preset_parser,
    pyplot,
    read_csv_columns,
    require_device,
    require_extras,
    start_csv,
    train_run,
    write_json,
)

TYPES = ("plastic", "rnn", "lstm")
PRESETS = {
    "quick": dict(
        types=list(TYPES),
        bits=50,
        patterns=2,
        rnn_hidden=200,
        lstm_hidden=200,
        iterations=2000,
        lr=1e-3,
        out="runs/patterns",
    ),
    "paper": dict(
        types=["plastic"],
        bits=1000,
        patterns=5,
        iterations=1000,
        lr=3e-4,
        out="runs/patterns-paper",
    ),
    "comparison": dict(
        types=list(TYPES),
        bits=50,
        patterns=2,
        rnn_hidden=2051,
        lstm_hidden=2000,
        iterations=3000,
        lr=3e-4,
        out="runs/patterns-comparison",
    ),
    "bohp": dict(
        types=["plastic"], bits=28, patterns=3, iterations=5000, lr=3e-4, out="runs/patterns-bohp"
    ),
}
LOG_FIELDS = ("iteration", "episodes", "loss", "error_zeroed", "error_all", "seconds")
EVAL_FIELDS = ("type", "seed", "iterations", "episodes", "loss", "error_zeroed", "error_all")
EVAL_SEED = 1_000_003  # every type and seed is evaluated on the same fresh episodes
# Flags a resumed run may change; all others must be those of the run that wrote the checkpoint.
RESUME_MAY_CHANGE = (
    "preset",
    "types",
    "iterations",
    "impl",
    "device",
    "out",
    "save_every",
    "eval_episodes",
    "resume",
)


# ----------------------------------------------------------------------------------------------
# Episodes


class Episodes(NamedTuple):
    """A batch of B episodes of T steps."""

    inputs: torch.Tensor  # (T, B, bits): the patterns, blank gaps (zeros), the test input
    patterns: torch.Tensor  # (B, n_patterns, bits): the +-1 patterns shown
    test_index: torch.Tensor  # (B,): which pattern is tested
    target: torch.Tensor  # (B, bits): the whole test pattern
    zeroed: torch.Tensor  # (B, bits), bool: the bits zeroed in the test input

    def to(self, device, dtype=None):
        """Moved to `device`, the float tensors converted to `dtype` (if given)."""
        return Episodes(*(t.to(device, dtype if t.is_floating_point() else t.dtype) for t in self))


def make_episodes(
    batch_size, generator, bits, patterns, presentations, presentation_steps, gap_steps, test_steps
):
    """B episodes: `patterns` random +-1 patterns of `bits` bits, shown `presentations` times
    each (each round in a new random order), each time for `presentation_steps` steps followed
    by `gap_steps` blank steps; then one of them, with bits // 2 of its bits (at random) set to
    zero, for `test_steps` steps. Drawn on the CPU from `generator`."""
    B, g = batch_size, generator
    shown = torch.randint(0, 2, (B, patterns, bits), generator=g).float() * 2 - 1
    order = torch.cat(
        [torch.rand(B, patterns, generator=g).argsort(1) for _ in range(presentations)], 1
    )
    sequence = shown.gather(1, order.unsqueeze(2).expand(-1, -1, bits))  # (B, K, bits)
    K = sequence.shape[1]
    presented = torch.cat(
        [
            sequence.unsqueeze(2).expand(-1, -1, presentation_steps, -1),
            sequence.new_zeros(B, K, gap_steps, bits),
        ],
        2,
    )
    test_index = torch.randint(0, patterns, (B,), generator=g)
    target = shown[torch.arange(B), test_index]
    zeroed_bits = torch.rand(B, bits, generator=g).argsort(1)[:, : bits // 2]
    zeroed = torch.zeros(B, bits, dtype=torch.bool).scatter_(1, zeroed_bits, True)
    test = (target * ~zeroed).unsqueeze(1).expand(-1, test_steps, -1)
    inputs = torch.cat([presented.reshape(B, -1, bits), test], 1).transpose(0, 1).contiguous()
    return Episodes(inputs, shown, test_index, target, zeroed)


def episode_options(args):
    """make_episodes' keyword arguments from the command line."""
    return dict(
        bits=args.bits,
        patterns=args.patterns,
        presentations=args.presentations,
        presentation_steps=args.presentation_steps,
        gap_steps=args.gap_steps,
        test_steps=args.test_steps,
    )


# ----------------------------------------------------------------------------------------------
# Networks: each maps inputs (T, B, bits) to outputs (T, B, bits); only the last step is scored.


class PlasticNet(nn.Module):
    """One neuron per bit plus a bias neuron (the last), whose input is constantly 1: scaled like
    the bits, it keeps the bias neuron at tanh(input_scale) ~ 1, a constant pre-synaptic source.

    Parameters w, alpha (N, N) and scalar eta, N = bits + 1; h0 = 0 and hebb0 = 0 each episode.
    """

    def __init__(self, bits, input_scale=20.0, impl="fused"):
        super().__init__()
        N = bits + 1
        self.bits, self.input_scale, self.impl = bits, input_scale, impl
        self.w = nn.Parameter(0.01 * torch.randn(N, N))
        self.alpha = nn.Parameter(0.01 * torch.randn(N, N))
        self.eta = nn.Parameter(torch.tensor(0.01))

    def forward(self, inputs):
        T, B, _ = inputs.shape
        x = self.input_scale * torch.cat([inputs, inputs.new_ones(T, B, 1)], 2)
        N = x.shape[2]
        ops = bp.fused if self.impl == "fused" else bp.reference
        out, *_ = ops.plastic_rnn_sequence(
            x,
            x.new_zeros(B, N),
            x.new_zeros(B, N, N),
            None,
            self.w,
            self.alpha,
            self.eta,
            None,
            None,
            None,
            None,
            None,
            rule="decay",
        )
        return out[:, :, : self.bits]


class BaselineNet(nn.Module):
    """Non-plastic tanh RNN (bp.PlasticRNN with plastic=False) or torch.nn.LSTM, between a Linear
    input layer (the recurrent layer's own) and a Linear readout to the bits."""

    def __init__(self, network_type, bits, hidden, impl="fused"):
        super().__init__()
        if network_type == "rnn":
            self.recurrent = bp.PlasticRNN(bits, hidden, plastic=False, impl=impl)
        else:
            self.recurrent = nn.LSTM(bits, hidden)
        self.readout = nn.Linear(hidden, bits)

    def forward(self, inputs):
        out, _ = self.recurrent(inputs)
        return self.readout(out)


def make_network(network_type, args):
    if network_type not in TYPES:
        raise ValueError(f"network_type must be one of {TYPES}, got {network_type!r}")
    if network_type == "plastic":
        return PlasticNet(args.bits, args.input_scale, args.impl)
    hidden = args.rnn_hidden if network_type == "rnn" else args.lstm_hidden
    return BaselineNet(network_type, args.bits, hidden, args.impl)


# ----------------------------------------------------------------------------------------------
# Loss, bit error rates, training and evaluation


def completion_loss(outputs, target):
    """Mean squared error between the last step's output and the whole test pattern."""
    return F.mse_loss(outputs[-1], target)


def bit_error_rates(outputs, episodes):
    """(fraction of the zeroed bits, fraction of all bits) whose sign at the last step is wrong;
    an output of exactly 0 counts as wrong."""
    wrong = (torch.sign(outputs[-1]) != episodes.target).to(outputs.dtype)
    return ((wrong * episodes.zeroed).sum() / episodes.zeroed.sum()).item(), wrong.mean().item()


def train_step(model, optimizer, episodes, clip_grad):
    """One Adam step on a batch of episodes; returns the loss and the error rates on the zeroed
    bits and on all bits."""
    outputs = model(episodes.inputs)
    loss = completion_loss(outputs, episodes.target)
    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    error_zeroed, error_all = bit_error_rates(outputs.detach(), episodes)
    return dict(loss=loss.item(), error_zeroed=error_zeroed, error_all=error_all)


@torch.no_grad()
def evaluate(model, args, n_episodes, seed=EVAL_SEED):
    """(loss, error on zeroed bits, error on all bits) averaged over n_episodes fresh episodes,
    drawn in batches of --batch-size from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    totals, done = torch.zeros(3, dtype=torch.float64), 0
    while done < n_episodes:
        size = min(args.batch_size, n_episodes - done)
        episodes = make_episodes(size, generator, **episode_options(args)).to(args.device)
        outputs = model(episodes.inputs)
        totals += size * torch.tensor(
            [completion_loss(outputs, episodes.target).item(), *bit_error_rates(outputs, episodes)],
            dtype=torch.float64,
        )
        done += size
    return tuple((totals / n_episodes).tolist())


def run_name(network_type, seed):
    return f"{network_type}-seed{seed}"


def train_network(args, network_type, out):
    """Trains one network (resuming from its checkpoint with --resume); returns it. Writes
    <out>/<type>-seed<k>.csv and .checkpoint.pt."""
    torch.manual_seed(args.seed)
    model = make_network(network_type, args).to(args.device)

    def step(model, optimizer, generator):
        episodes = make_episodes(args.batch_size, generator, **episode_options(args))
        return train_step(model, optimizer, episodes.to(args.device), args.clip_grad)

    return train_run(
        args, run_name(network_type, args.seed), out, model, RESUME_MAY_CHANGE, LOG_FIELDS, step
    )


# ----------------------------------------------------------------------------------------------
# Command line


def make_parser():
    p = preset_parser(__doc__.split("\n\n")[0], PRESETS)
    add = p.add_argument
    add("--types", nargs="+", choices=TYPES, default=list(TYPES), help="networks to train")
    add("--seed", type=SEED, default=0, help="seed of the initialisation and the episodes")
    add("--bits", type=number(int, 2), default=50, help="bits per pattern")
    add("--patterns", type=number(int, 1), default=2, help="patterns per episode")
    add("--presentations", type=number(int, 1), default=2, help="times each pattern is shown")
    add("--presentation-steps", type=number(int, 1), default=6, help="steps per presentation")
    add("--gap-steps", type=number(int, 0), default=4, help="blank steps after each presentation")
    add(
        "--test-steps",
        type=number(int, 1),
        default=3,
        help="steps of the degraded test pattern at the end",
    )
    add(
        "--input-scale",
        type=number(float, 0, strict=True),
        default=20.0,
        help="plastic network: factor of the inputs added to the recurrent drive",
    )
    add("--rnn-hidden", type=number(int, 1), default=2051, help="neurons of the rnn baseline")
    add("--lstm-hidden", type=number(int, 1), default=2000, help="units of the lstm baseline")
    add(
        "--impl",
        choices=("fused", "reference"),
        default="fused",
        help="plastic network and rnn: the fused ops, or the pure-PyTorch reference (the lstm "
        "is torch.nn.LSTM either way)",
    )
    add_training_flags(
        p, "runs/patterns", "fresh episodes on which each trained network is evaluated"
    )
    return p


def parse_args(argv=None):
    """Parses with the chosen preset's defaults (flags given explicitly still win)."""
    return parse_with_preset(make_parser(), PRESETS, argv)


def main(argv=None):
    """Trains every type of --types, evaluates each on --eval-episodes fresh episodes
    (evaluation.csv; <type>-seed<k>.json: the run's result, options and manifest), plots the
    curves (curves.png) and one test episode per type (episode-<type>.png); returns
    {type: (loss, error on zeroed bits, error on all bits)}."""
    args = parse_args(argv)
    require_extras()
    require_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.bits} bits, {args.patterns} patterns; parameters: "
        + ", ".join(f"{t} {count_parameters(make_network(t, args)):,}" for t in args.types),
        flush=True,
    )
    summary = {}
    for network_type in args.types:
        started = time.time()
        model = train_network(args, network_type, out)
        summary[network_type] = loss, error_zeroed, error_all = evaluate(
            model, args, args.eval_episodes
        )
        write_json(
            out / f"{run_name(network_type, args.seed)}.json",
            dict(
                type=network_type,
                seed=args.seed,
                parameters=count_parameters(model),
                iterations=args.iterations,
                episodes=args.iterations * args.batch_size,
                eval_episodes=args.eval_episodes,
                loss=loss,
                error_zeroed=error_zeroed,
                error_all=error_all,
                options=vars(args),
            ),
            started=started,
        )
        plot_episode(model, args, network_type, out / f"episode-{network_type}.png")
    evaluation, this_seed = out / "evaluation.csv", str(args.seed)
    start_csv(
        evaluation,
        EVAL_FIELDS,  # keeps the rows of other runs sharing --out
        keep=lambda row: row["seed"] != this_seed or row["type"] not in args.types,
    )
    append_csv(
        evaluation,
        EVAL_FIELDS,
        [
            dict(
                type=t,
                seed=args.seed,
                iterations=args.iterations,
                episodes=args.iterations * args.batch_size,
                loss=loss,
                error_zeroed=error_zeroed,
                error_all=error_all,
            )
            for t, (loss, error_zeroed, error_all) in summary.items()
        ],
    )
    plot_curves(out, args, out / "curves.png")
    for network_type, (loss, error_zeroed, error_all) in summary.items():
        print(
            f"{network_type:8s} on {args.eval_episodes} fresh episodes: bit error rate "
            f"{100 * error_zeroed:.2f}% of the zeroed bits, {100 * error_all:.2f}% of all bits; "
            f"loss {loss:.4f}"
        )
    return summary


# ----------------------------------------------------------------------------------------------
# Plots


def plot_curves(out, args, path):
    """Bit error rate on the zeroed bits and loss against iterations, one line per type."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for network_type in args.types:
        log = read_csv_columns(out / f"{run_name(network_type, args.seed)}.csv")
        top.plot(log["iteration"], log["error_zeroed"], label=network_type)
        bottom.plot(log["iteration"], log["loss"], label=network_type)
    top.set(
        ylabel="bit error rate (zeroed bits)",
        title=f"{args.bits} bits, {args.patterns} patterns, {args.batch_size} episodes per "
        f"iteration (seed {args.seed})",
    )
    bottom.set(xlabel="iteration", ylabel="loss (MSE, last step)", yscale="log")
    top.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_episode(model, args, network_type, path):
    """One fresh test episode: the input and the output over time, then the stored patterns, the
    degraded test input, the output at the last step and the target side by side."""
    episodes = make_episodes(1, torch.Generator().manual_seed(EVAL_SEED), **episode_options(args))
    outputs = model(episodes.to(args.device).inputs).cpu()
    final = outputs[-1, 0]
    rows = torch.cat(
        [episodes.patterns[0], episodes.inputs[-1], final[None], episodes.target]
    ).float()
    labels = [f"pattern {k}" for k in range(args.patterns)] + ["test input", "output", "target"]
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), height_ratios=[2, 2, 1.2])
    for ax, data, title in (
        (axes[0], episodes.inputs[:, 0], "input (blue -1, grey 0, red +1)"),
        (axes[1], outputs[:, 0], "output"),
    ):
        ax.imshow(
            data.T.numpy(), aspect="auto", cmap="coolwarm", vmin=-1, vmax=1, interpolation="none"
        )
        ax.set(xlabel="step", ylabel="bit", title=title)
    axes[2].imshow(
        rows.numpy(), aspect="auto", cmap="coolwarm", vmin=-1, vmax=1, interpolation="none"
    )
    axes[2].set_yticks(range(len(labels)), labels)
    wrong = (torch.sign(final) != episodes.target[0]).sum().item()
    axes[2].set(
        xlabel="bit",
        title=f"{network_type}: {wrong} of {args.bits} bits wrong "
        f"(pattern {episodes.test_index[0].item()} tested)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    with out_of_memory_exits("--batch-size, --bits, --rnn-hidden or --lstm-hidden"):
        main()
