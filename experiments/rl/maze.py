"""Grid maze (Backpropamine Task 2 and its simplemaze code; differentiable plasticity's maze): an
agent looks for an invisible reward in a grid maze, is teleported away each time it finds it, and
must remember where it was to come back fast within the episode. A2C on plastic RNN agents.

    python experiments/rl/maze.py                       # quick: 4 network types x 2 seeds
    python experiments/rl/maze.py --preset paper --out runs/maze-paper
    python experiments/rl/maze.py --preset diffplast    # Oja's rule, N = 200 (ICML 2018 maze)

See experiments/rl/README.md.
"""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the root, for experiments.common
from experiments.common import number, out_of_memory_exits  # noqa: E402
from experiments.rl import a2c  # noqa: E402
from experiments.rl.envs import GridMaze  # noqa: E402

TYPES = ("rnn", "plastic", "simple", "retroactive", "fanout", "oja", "oja-scalar")
PRESETS = {
    "quick": dict(
        types=["rnn", "plastic", "simple", "retroactive"],
        seeds=[0, 1],
        size=9,
        hidden=50,
        iterations=700,
        lr=1e-3,
        out="runs/maze",
    ),
    # The original code's runs (maze/batch.py and its job files): a 13 x 13 grid with its
    # border (11 x 11 inside), w and alpha from U[0, 0.01), eta and the eligibility rate 0.01,
    # no optimizer step in the first 101 iterations, 200,000 iterations of 30 episodes.
    "paper": dict(
        types=["rnn", "plastic", "simple", "retroactive"],
        size=13,
        hidden=100,
        iterations=200_000,
        lr=1e-4,
        weight_init=0.01,
        eta_init=0.01,
        elig_rate_init=0.01,
        burn_in=101,
        out="runs/maze-paper",
    ),
    # simplemaze/maze.py: 11 x 11 with the border, the layer's own U[0, 0.001), the same burn-in.
    "simplemaze": dict(
        types=["fanout", "rnn"],
        size=11,
        hidden=100,
        iterations=20_000,
        lr=1e-4,
        burn_in=101,
        out="runs/simplemaze",
    ),
    "diffplast": dict(
        types=["oja", "oja-scalar", "rnn"],
        size=9,
        hidden=200,
        iterations=20_000,
        lr=1e-4,
        out="runs/maze-diffplast",
    ),
}


def maze_size(text):
    """--size: a side GridMaze takes (argparse names the flag in the error)."""
    try:
        size = int(text)
        GridMaze.check_size(size)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return size


def make_parser():
    parser = a2c.make_parser(__doc__.split("\n\n")[0], TYPES, PRESETS)
    add = parser.add_argument
    add("--size", type=maze_size, default=11, help="maze side (odd), the border walls included")
    add("--rew", type=number(float), default=10.0, help="reward for reaching the reward cell")
    add("--wp", type=number(float), default=0.0, help="penalty for bumping into a wall")
    add("--episode-length", type=number(int, 1), default=200)
    parser.set_defaults(entropy_coef=0.03, eps=1e-4, clip_grad=4.0)
    return parser


def make_env(args, generator):
    return GridMaze(
        args.batch_size,
        size=args.size,
        reward=args.rew,
        wall_penalty=args.wp,
        episode_length=args.episode_length,
        device=args.device,
        generator=generator,
    )


def main(argv=None):
    return a2c.main(a2c.parse_args(make_parser(), PRESETS, argv), make_env)


if __name__ == "__main__":
    with out_of_memory_exits("--batch-size or --hidden"):
        main()
