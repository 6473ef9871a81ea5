"""The numbers the README quotes, from a results folder's CSV logs: per network type, the final
reward of each seed (mean reward per episode over the last 10% of its log rows, as the training
scripts print), their median and quartiles, the seconds each run trained (all its sessions),
and with --threshold the first episode count at which each seed's logged reward exceeded it.
Writes <folder>/summary.json (summary-<N>-episodes.json with --episodes N: the logs cut at N
episodes).

    python experiments/rl/summarize.py experiments/rl/results/maze
    python experiments/rl/summarize.py experiments/rl/results/cue-reward-standard --threshold 5 \\
        --episodes 200000
"""

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the root, for experiments.common
from experiments.common import number, read_csv_columns, write_json  # noqa: E402
from experiments.rl.a2c import mean_of_last  # noqa: E402

RUN_LOG = re.compile(r"(?P<type>.+)-seed(?P<seed>\d+)\.csv")


def training_seconds(seconds):
    """The training time of a log's "seconds" column, which restarts from 0 at each --resume:
    the sum of each session's last value."""
    return sum(s for s, after in zip(seconds, [*seconds[1:], 0.0]) if after < s)


def summarize(folder, threshold=None, episodes=None, fraction=0.1):
    """{type: {median, q25, q75, seeds: {seed: {final_reward, episodes, training_seconds[,
    first_episodes_above]}}}} of every <type>-seed<k>.csv in `folder` that has a row."""
    runs = {}
    for log in sorted(Path(folder).glob("*-seed*.csv")):
        match = RUN_LOG.fullmatch(log.name)
        columns = read_csv_columns(log)
        keep = [
            i
            for i, e in enumerate(columns.get("episodes", []))
            if episodes is None or e <= episodes
        ]
        if not keep:  # a run that has logged no row yet (or none within --episodes)
            print(f"left out: {log.name} has no rows", flush=True)
            continue
        run = dict(
            final_reward=mean_of_last([columns["reward"][i] for i in keep], fraction),
            episodes=int(columns["episodes"][keep[-1]]),
            training_seconds=training_seconds(columns["seconds"][: keep[-1] + 1]),
        )
        if threshold is not None:
            run["first_episodes_above"] = next(
                (int(columns["episodes"][i]) for i in keep if columns["reward"][i] > threshold),
                None,
            )
        runs.setdefault(match["type"], {})[int(match["seed"])] = run
    summary = {}
    for network_type, seeds in runs.items():
        finals = torch.tensor([run["final_reward"] for run in seeds.values()], dtype=torch.float64)
        median, q25, q75 = finals.quantile(
            torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
        ).tolist()
        summary[network_type] = dict(median=median, q25=q25, q75=q75, seeds=seeds)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a results folder of <type>-seed<k>.csv logs")
    parser.add_argument(
        "--threshold",
        type=number(float),
        default=None,
        help="also report when each seed's logged reward first exceeded this",
    )
    parser.add_argument(
        "--episodes", type=number(int, 1), default=None, help="cut the logs at this many episodes"
    )
    args = parser.parse_args(argv)
    started = time.time()
    summary = summarize(args.folder, args.threshold, args.episodes)
    if not summary:
        raise SystemExit(f"no <type>-seed<k>.csv log in {args.folder}")
    name = "summary.json" if args.episodes is None else f"summary-{args.episodes}-episodes.json"
    write_json(
        Path(args.folder) / name,
        dict(
            final_reward_is="reward per episode, mean over the last 10% of each run's log rows"
            + ("" if args.episodes is None else f" up to {args.episodes} episodes")
            + "; median and quartiles over "
            "the seeds",
            threshold=args.threshold,
            types=summary,
        ),
        started=started,
    )
    for network_type, result in summary.items():
        print(
            f"{network_type:12s} {result['median']:8.2f} ({result['q25']:.2f} to "
            f"{result['q75']:.2f}) over {len(result['seeds'])} seeds"
        )
    return summary


if __name__ == "__main__":
    main()
