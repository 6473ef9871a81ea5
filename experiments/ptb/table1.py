"""The paper's Table 1 over seeds: every small-preset variant (baseline, plastic, simple,
retroactive) trained with each seed by main.py, one process per run, several at a time with
--jobs, within --time-limit; runs already finished are skipped and cut ones resumed from their
checkpoint, so the same command continues the table across sessions. Then (or alone, with
--summarize) the table of test perplexities, mean and spread over seeds beside the paper's, as
markdown and JSON in --out, and every run's validation curve in curves.png. See
experiments/ptb/README.md, 'The small model'.

    python experiments/ptb/table1.py --data data/penn --out experiments/ptb/results/table1 \
        --jobs 2 --time-limit 10000
    python experiments/ptb/table1.py --out experiments/ptb/results/table1 --summarize
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the root, for experiments.common
from experiments.common import (  # noqa: E402
    SEED,
    number,
    pyplot,
    read_csv_columns,
    torch_device,
    write_atomically,
    write_json,
)
from experiments.ptb.data import split_paths  # noqa: E402
from experiments.ptb.main import SMALL_VARIANTS  # noqa: E402

MAIN = Path(__file__).resolve().parent / "main.py"
# Table 1 of Miconi et al. (ICLR 2019): test perplexity of the small models, mean over runs.
PAPER_TEST_PPL = {"baseline": 104.26, "plastic": 103.80, "simple": 102.65, "retroactive": 102.48}
MIN_RUN_SECONDS = 120  # a run is not started with less time than this left


def t_quantile(p, df):
    """The p-quantile (1/2 <= p < 1) of Student's t distribution with df degrees of freedom: its
    density integrated from 0 by Simpson's rule (1,000 intervals; error far below the 0.01 that
    the table shows) and the integral inverted by bisection. Written out to keep SciPy out of the
    experiments' dependencies."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t):
        h = t / 1000
        y = [math.exp(log_norm - (df + 1) / 2 * math.log1p((k * h) ** 2 / df)) for k in range(1001)]
        return 0.5 + h / 3 * (y[0] + y[-1] + 4 * sum(y[1:-1:2]) + 2 * sum(y[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def ci95_half_width(sd, n):
    """Half the width of the 95% confidence interval of the mean of n values of standard
    deviation sd, Student's t with n - 1 degrees of freedom (the seeds as independent draws);
    None where sd is (below two values)."""
    return None if sd is None else t_quantile(0.975, n - 1) * sd / math.sqrt(n)


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = p.add_argument
    add("--data", default="data/penn", help="the PTB folder, passed to main.py")
    add("--out", default="experiments/ptb/results/table1", help="folder of every run's files")
    add("--variants", nargs="+", choices=tuple(SMALL_VARIANTS), default=tuple(SMALL_VARIANTS))
    add("--seeds", nargs="+", type=SEED, default=[1111, 1112, 1113])
    add("--jobs", type=number(int, 1), default=1, help="runs at a time, one process each")
    add(
        "--time-limit",
        type=number(float, 0),
        default=0.0,
        help="> 0: seconds for the whole table; each run gets what is left when it starts and "
        "stops at its end (--resume continues it next time)",
    )
    add("--summarize", action="store_true", help="only write the summary of the runs in --out")
    add("--device", type=torch_device, default="cpu", help="passed to main.py")
    add(
        "main_args",
        nargs="*",
        metavar="-- MAIN_FLAGS",
        help="after --: flags given to every main.py run (e.g. -- --max-batches 50 for a quick "
        "look; they must not change between sessions of one table, or --resume refuses)",
    )
    return p


def run_name(variant, seed):
    return f"{variant}-seed{seed}"


def read_results(out, variant, seed):
    """A run's results file (main.py's <log>.json), or None if it has not written one."""
    path = out / f"{run_name(variant, seed)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def finished(results):
    """Whether a run's results (read_results) are those of a run that trained all its epochs."""
    return results is not None and results.get("stopped_by") == "epochs"


def train(args, out, variant, seed, deadline):
    """One run of main.py, resumed from its checkpoint when there is one; its console output goes
    to <run>.log. Returns main.py's exit status (None: not started, too little time left)."""
    name = run_name(variant, seed)
    command = [sys.executable, str(MAIN), "--data", args.data, "--preset", "small"]
    command += ["--variant", variant, "--seed", str(seed), "--device", args.device]
    command += ["--save", str(out / f"{name}.pt"), *args.main_args]
    if (out / f"{name}.checkpoint.pt").exists():
        command.append("--resume")
    if deadline is not None:
        left = deadline - time.time()
        if left < MIN_RUN_SECONDS:
            return None
        command += ["--time-limit", str(int(left))]
    with open(out / f"{name}.log", "a") as console:
        console.write(f"$ {' '.join(command)}\n")
        console.flush()
        status = subprocess.run(command, stdout=console, stderr=subprocess.STDOUT).returncode
    print(f"{name}: exit {status}", flush=True)
    return status


def summarize(args, out):
    """Per variant: the test perplexities of its finished runs, their mean with its 95%
    confidence interval and their standard deviation, the best validation perplexities, beside
    the paper's mean test perplexity."""
    rows, lines = [], []
    lines.append(
        "| variant | finished runs | test ppl per seed | mean ± 95% CI | sd | paper (test, mean) |"
    )
    lines.append("|---|---|---|---|---|---|")
    for variant in args.variants:
        results = {seed: read_results(out, variant, seed) for seed in args.seeds}
        done = {seed: r for seed, r in results.items() if finished(r)}
        test = [r["test_ppl"] for r in done.values()]
        mean = statistics.mean(test) if test else None
        sd = statistics.stdev(test) if len(test) > 1 else None
        half_width = ci95_half_width(sd, len(test))
        ci95 = None if half_width is None else [mean - half_width, mean + half_width]
        rows.append(
            dict(
                variant=variant,
                seeds_finished=list(done),
                seeds_asked=args.seeds,
                test_ppl=dict(zip(done, test)),
                best_valid_ppl={s: r["best_valid_ppl"] for s, r in done.items()},
                test_ppl_mean=mean,
                test_ppl_sd=sd,
                test_ppl_ci95_half_width=half_width,
                test_ppl_ci95=ci95,
                paper_test_ppl=PAPER_TEST_PPL[variant],
            )
        )
        per_seed = ", ".join(f"{t:.2f} ({s})" for s, t in zip(done, test)) or "-"
        shown_mean = "-" if mean is None else f"{mean:.2f}"
        if half_width is not None:
            shown_mean += f" ± {half_width:.2f}"
        lines.append(
            f"| {variant} | {len(test)}/{len(args.seeds)} | {per_seed} | {shown_mean} | "
            f"{'-' if sd is None else f'{sd:.2f}'} | {PAPER_TEST_PPL[variant]:.2f} |"
        )
    results_of = f"{out}/<variant>-seed<k>.json"
    interval = "95% confidence interval of the mean: Student's t, n - 1 degrees of freedom"
    write_json(out / "summary.json", dict(variants=rows, interval=interval, results_of=results_of))
    text = "\n".join(lines) + "\n"
    write_atomically(out / "summary.md", lambda f: f.write(text), mode="w")
    print(text, end="")
    plot_curves(args, out, out / "curves.png")


def plot_curves(args, out, path):
    """Validation perplexity per epoch of every run with a log (finished or not): one colour per
    variant, one line per seed, and the paper's test perplexity as a dotted line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, variant in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], args.variants):
        logs = [out / f"{run_name(variant, seed)}.csv" for seed in args.seeds]
        curves = [c for c in (read_csv_columns(log) for log in logs if log.exists()) if c]
        for k, curve in enumerate(curves):
            label = (
                f"{variant} ({len(curves)} run{'s' if len(curves) > 1 else ''})" if k == 0 else None
            )
            ax.plot(curve["epoch"], curve["valid_ppl"], color=colour, marker=".", label=label)
        ax.axhline(PAPER_TEST_PPL[variant], color=colour, ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="validation perplexity")
    ax.set_title("Table 1 runs (dotted: the paper's test perplexity)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main(argv=None):
    args = make_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.summarize:
        deadline = time.time() + args.time_limit if args.time_limit else None
        # Seed by seed, so that every variant has a run before any has its second.
        runs = [
            (variant, seed)
            for seed in args.seeds
            for variant in args.variants
            if not finished(read_results(out, variant, seed))
        ]
        if runs:
            try:
                split_paths(args.data)  # here, rather than in every run's log
            except FileNotFoundError as err:
                raise SystemExit(str(err)) from None
        with ThreadPoolExecutor(args.jobs) as pool:
            statuses = list(pool.map(lambda run: train(args, out, *run, deadline), runs))
        failed = [run_name(*run) for run, s in zip(runs, statuses) if s not in (0, None)]
    summarize(args, out)
    if failed:
        raise SystemExit(f"failed (see their .log in {out}): {', '.join(failed)}")


if __name__ == "__main__":
    main()
