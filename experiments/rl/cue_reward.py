"""Cue-reward association (Backpropamine Task 1): each episode has four new random cues, one of
them rewarded; in every trial two cues are shown, then a GO signal, at which the agent must answer
whether the rewarded cue was among them. The association must be learned within the episode, from
rewards: A2C on plastic RNN agents.

    python experiments/rl/cue_reward.py                 # quick: 4 network types x 2 seeds
    python experiments/rl/cue_reward.py --preset paper --out runs/cue-paper

The quick preset uses the shortest trials (cue, cue, GO, reward: --trial-min 4 --trial-max 4),
where simple neuromodulation learns the task within a few thousand iterations; with the paper's
5-8-step trials (the default of every other preset, and of --trial-min/--trial-max) it learned
in one seed of three in our runs, and no other type did.

See experiments/rl/README.md.
"""

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the root, for experiments.common
from experiments.common import number, out_of_memory_exits  # noqa: E402
from experiments.rl import a2c  # noqa: E402
from experiments.rl.envs import CueReward  # noqa: E402

TYPES = ("rnn", "plastic", "simple", "retroactive")
PRESETS = {
    "quick": dict(
        seeds=[0, 1],
        hidden=50,
        iterations=3000,
        lr=1e-3,
        trial_min=4,
        trial_max=4,
        out="runs/cue-reward",
    ),
    # The original code's runs (sr/srbatch.py, sr/modul.py): 120-step episodes of 5-8-step trials
    # whose first step is blank, w and alpha from U[0, 0.01), eta and the eligibility rate 0.1,
    # no optimizer step in the first 101 iterations, 200,000 iterations of 30 episodes.
    "paper": dict(
        hidden=200,
        iterations=200_000,
        lr=1e-4,
        weight_init=0.01,
        eta_init=0.1,
        elig_rate_init=0.1,
        burn_in=101,
        blank_first_step=True,
        out="runs/cue-reward-paper",
    ),
}


def make_parser():
    parser = a2c.make_parser(__doc__.split("\n\n")[0], TYPES, PRESETS)
    add = parser.add_argument
    add("--episode-length", type=number(int, 1), default=120)
    add(
        "--trial-min",
        type=int,
        default=5,
        help="shortest trial, in steps (GO and the reward step included)",
    )
    add("--trial-max", type=int, default=8, help="longest trial, in steps")
    add(
        "--blank-first-step",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="step 0 of every trial blank, the cues in steps 1 .. L-3 (the original code); "
        "needs --trial-min >= 5",
    )
    add(
        "--fixed-cues",
        action="store_true",
        help="control task: the same cues (so the same rewarded cue) in every episode, which "
        "weights alone can learn; checks the A2C pipeline on this task",
    )
    parser.set_defaults(entropy_coef=0.1, eps=1e-6, clip_grad=2.0)
    return parser


def make_env(args, generator):
    return CueReward(
        args.batch_size,
        trial_min=args.trial_min,
        trial_max=args.trial_max,
        episode_length=args.episode_length,
        fixed_cues=args.fixed_cues,
        blank_first_step=args.blank_first_step,
        device=args.device,
        generator=generator,
    )


def main(argv=None):
    return a2c.main(a2c.parse_args(make_parser(), PRESETS, argv), make_env)


if __name__ == "__main__":
    with out_of_memory_exits("--batch-size or --hidden"):
        main()
