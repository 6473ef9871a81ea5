"""Training throughput of the RL experiments: A2C iterations/s, fused vs the papers' per-step loop.

One iteration is experiments/rl/a2c.py's train_iteration: a batch of 30 episodes played, the A2C
loss, backward, gradient clip and Adam step. Implementations, each in fresh worker processes:
  * fused: act under no_grad one step at a time on the fused rollout op, recording, then take
    the loss's gradients from the fused sequence op's backward on the record (what the
    experiments run);
  * fused-stepwise: the papers' loop (autograd graph built step by step while acting) on the
    fused op, to show what the replay itself buys;
  * reference: the papers' loop on the pure-PyTorch reference (`--impl reference`).
Cases: the Backpropamine maze (11x11, 200 steps, 100 neurons) and cue-reward task (120 steps,
200 neurons), both with retroactive neuromodulation (the heaviest type: two traces).
Prints the table and the target (fused >= 10x the reference's iterations/s), writes
benchmarks/results/bench_rl.{csv,json,png}.

    PYTHONPATH=. python benchmarks/bench_rl.py --quick      # smoke test, tiny sizes
    PYTHONPATH=. python benchmarks/bench_rl.py              # a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/bench_rl.py --threads 1 --out benchmarks/results/threads1
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # the root, for the experiments package
from experiments.rl import a2c, cue_reward, maze  # noqa: E402
from experiments.rl.agents import Agent  # noqa: E402

import common  # noqa: E402

TASKS = {"maze": maze, "cue-reward": cue_reward}
CASES = {"maze": ["--hidden", "100", "--size", "11"], "cue-reward": ["--hidden", "200"]}
QUICK_CASES = {
    "maze": ["--hidden", "8", "--size", "7", "--episode-length", "20"],
    "cue-reward": ["--hidden", "8", "--episode-length", "20"],
}
IMPLS = ("fused", "fused-stepwise", "reference")
NETWORK_TYPE = "retroactive"
TARGET_SPEEDUP = 10.0


def task_args(spec):
    task = TASKS[spec["case"]]
    flags = (QUICK_CASES if spec["quick"] else CASES)[spec["case"]]
    impl = {
        "fused": ["--impl", "fused"],
        "fused-stepwise": ["--impl", "fused", "--stepwise"],
        "reference": ["--impl", "reference"],
    }[spec["impl"]]
    return a2c.parse_args(
        task.make_parser(),
        task.PRESETS,
        [*flags, "--preset", "paper", *impl, "--device", spec["device"]],
    )


def worker(spec):
    """In a fresh process: the median time of a training iteration."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:
        args = task_args(spec)
        torch.manual_seed(0)
        env = TASKS[spec["case"]].make_env(args, torch.Generator(args.device).manual_seed(0))
        agent = Agent(env.obs_size, env.n_actions, NETWORK_TYPE, args.hidden, impl=args.impl).to(
            args.device
        )
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=args.eps)
        timing = common.time_fn(
            lambda: a2c.train_iteration(agent, optimizer, env, args),
            args.device,
            spec["repeats"],
            spec["budget"],
        )
        return {
            "iteration_ms": timing["ms"],
            "runs": timing["runs"],
            "all_ms": timing["all_ms"],
            "iterations_per_s": 1e3 / timing["ms"],
            "hidden": args.hidden,
            "batch": args.batch_size,
            "steps": env.episode_length,
        }
    except Exception as err:
        return {"error": common.short_error(err)}


def merge_rounds(results):
    """One measurement from the worker results of every round: the median over all their runs
    (the first error, if any round failed)."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    all_ms = [ms for r in results for ms in r["all_ms"]]
    ms = statistics.median(all_ms)
    return dict(
        results[0],
        iteration_ms=ms,
        iterations_per_s=1e3 / ms,
        runs=len(all_ms),
        all_ms=all_ms,
        rounds=len(results),
        loadavg=max(r["loadavg"] for r in results),
    )


def main():
    parser = common.benchmark_parser(__doc__, CASES, IMPLS, repeats=5, budget=15.0)
    parser.add_argument(
        "--threads",
        type=common.number(int, 0),
        default=0,
        help="torch threads (0: torch's default)",
    )
    parser.add_argument(
        "--rounds",
        type=common.number(int, 1),
        default=3,
        help="worker processes per measurement, interleaved: round k runs every "
        "case and implementation once, so that a slow spell of a shared "
        "machine falls on all of them (the median is over every round's runs)",
    )
    args = parser.parse_args()
    common.check_selection(parser, args, CASES, IMPLS)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    common.require_extras("bench")  # now, not when plotting at the end
    script = Path(__file__).resolve()
    start, load_start = time.time(), os.getloadavg()[0]
    info = common.machine_info(args.device)
    runs = {(case, impl): [] for case in args.cases.split(",") for impl in args.impls.split(",")}
    for round_ in range(1, args.rounds + 1):
        for (case, impl), results in runs.items():
            spec = dict(
                case=case,
                impl=impl,
                device=args.device,
                quick=args.quick,
                repeats=args.repeats,
                budget=args.budget,
                threads=args.threads,
            )
            results.append(dict(common.run_worker(script, spec), loadavg=os.getloadavg()[0]))
            print(
                f"[{time.time() - start:6.0f} s] round {round_}: {case} {impl}: "
                f"{common.fmt_num(results[-1].get('iterations_per_s'))} iterations/s "
                f"{results[-1].get('error', '')}",
                file=sys.stderr,
                flush=True,
            )
    records = [
        dict(case=case, impl=impl, **merge_rounds(results))
        for (case, impl), results in runs.items()
    ]

    fused = {r["case"]: r for r in records if r["impl"] == "fused"}
    rows, target_rows, checks = [], [], []
    for r in records:
        r["fused_speedup"] = common.ratio(
            fused.get(r["case"], {}).get("iterations_per_s"), r.get("iterations_per_s")
        )
        rows.append(
            [
                r["case"],
                f"B={r.get('batch', '-')} T={r.get('steps', '-')} N={r.get('hidden', '-')}",
                r["impl"],
                common.fmt_num(r.get("iteration_ms")),
                common.fmt_num(r.get("iterations_per_s")),
                "" if r["impl"] == "fused" else common.fmt_ratio(r["fused_speedup"]),
                r.get("error", ""),
            ]
        )
        if r["impl"] == "reference":
            value = r["fused_speedup"]
            status = "n/a" if value is None else "met" if value >= TARGET_SPEEDUP else "NOT met"
            label = f"fused iterations/s >= {TARGET_SPEEDUP:g}x reference"
            target_rows.append([r["case"], label, common.fmt_num(value), status])
            checks.append(dict(case=r["case"], target=label, value=value, status=status))
    threads = args.threads or info["torch_threads"]
    machine = (
        f"{info.get('gpu', info['cpu'])}, {threads} threads, torch "
        f"{info['torch']}, {args.device}, float32; 1-min load average {load_start:.1f} at "
        f"start, {os.getloadavg()[0]:.1f} at end"
    )
    report = "\n".join(
        [
            f"## bench_rl ({'tiny sizes' if args.quick else 'the papers’ sizes'}, "
            f"{NETWORK_TYPE} agents)",
            "",
            machine,
            "",
            common.markdown_table(
                ["case", "sizes", "impl", "iteration ms", "iterations/s", "fused speedup", "notes"],
                rows,
            ),
            "",
            "Target:",
            "",
            common.markdown_table(["case", "target", "measured", "status"], target_rows),
            "",
            f"- An iteration: a2c.train_iteration (B episodes of T steps, loss, backward, clip, "
            f"Adam); median over {args.rounds} interleaved rounds of a fresh worker process each, "
            f"up to {args.repeats} timed iterations per worker after a warm-up iteration.",
            "",
            f"Whole run: {time.time() - start:.0f} s.",
        ]
    )
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_csv(
        out / "bench_rl.csv", [{k: v for k, v in r.items() if k != "all_ms"} for r in records]
    )
    common.write_json(
        out / "bench_rl.json", dict(machine=info, args=vars(args), results=records, targets=checks)
    )
    plt = common.pyplot("bench")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cases = list(dict.fromkeys(r["case"] for r in records))
    values = {
        c: {r["impl"]: r.get("iterations_per_s") for r in records if r["case"] == c} for c in cases
    }
    common.grouped_bars(ax, cases, IMPLS, values, ylabel="A2C iterations/s")
    ax.set_title("bench_rl: training iterations per second")
    fig.tight_layout()
    fig.savefig(out / "bench_rl.png", dpi=120)
    plt.close(fig)
    print(f"\nwrote {out / 'bench_rl'}.csv, .json, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
