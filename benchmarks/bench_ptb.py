"""Training throughput and memory of the Backpropamine PTB models: fused vs reference on the large
model, and the paper's small model's plastic variants vs its non-plastic baseline.

The large model is the one of the first Backpropamine README command (experiments/ptb/main.py: 3
plastic LSTM layers 400 -> 1149 -> 1149 -> 400, alpha per neuron, fanout neuromodulation, tied
embedding, vocabulary 10,000), trained by main.py's own training step (forward with dropout,
cross-entropy with AR/TAR, backward, alpha gradients / agdiv, clip, SGD step) on random tokens.
For each of its cases (batch B, BPTT length T) and implementation (--impl of main.py), in fresh
worker processes:
  * tokens/s: B * T / the median time of a training step,
  * the peak memory of a training step (common.peak_memory_mb: peak resident memory above what
    the process held before the step, i.e. on top of the model, its gradients and the data),
  * the largest batch whose training step fits in --budget-mb, searched by doubling the batch,
    then bisection, each size measured in its own worker.
The case "small" is the paper's small model (Table 1: main.py --preset small --variant V, at the
preset's B=20, T=20): the tokens/s of the same training step for each --variants V (baseline: the
non-plastic LSTM; plastic, simple, retroactive: plastic LSTMs), all on the fused implementation,
each in a fresh worker, and each variant's tokens/s as a ratio to the baseline's (timing only).
Prints the tables and the targets (large model: fused >= 3x the reference's tokens/s and <= 1/5
of its peak memory at B=6, T=70; small model: each plastic variant >= 0.67x the baseline's
tokens/s), writes benchmarks/results/bench_ptb.{csv,json,png}.

    PYTHONPATH=. python benchmarks/bench_ptb.py --quick      # smoke test, tiny models
    PYTHONPATH=. python benchmarks/bench_ptb.py              # all cases, ~10-20 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_ptb.py --cases small          # the small model alone
    PYTHONPATH=. python benchmarks/bench_ptb.py --budget-mb 16384 --device cuda

The reference keeps about 4 traces (B, N, N) per step and layer for autograd (bench_lstm.py):
~19 GB at B=6, T=70. A measurement whose estimate exceeds 70 % of the memory available is
skipped, with the reason in the table; B=6, T=35 is there to compare where the reference fits.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # the root, for the experiments package
from experiments.ptb import main as ptb  # noqa: E402

import bench_lstm  # noqa: E402  (the reference's memory model)
import common  # noqa: E402

LARGE_MODEL = (
    "--batch_size 6 --dropouti 0.4 --dropouth 0.25 --wdrop 0 --model PLASTICLSTM "
    "--modultype modplasth2mod --modulout fanout --nhid 1149 --alphatype perneuron "
    "--agdiv 1149"
).split()
QUICK_MODEL = [*LARGE_MODEL, "--emsize", "16", "--nhid", "32"]
QUICK_SMALL_MODEL = ["--emsize", "16", "--nhid", "16"]  # added to --preset small with --quick
SMALL = "small"  # the case of the small model; its rows are its variants, not implementations
CASES = {
    "b6-t70": dict(B=6, T=70),
    "b6-t35": dict(B=6, T=35),
    SMALL: dict(B=ptb.SMALL_PRESET["batch_size"], T=ptb.SMALL_PRESET["bptt"]),
}
QUICK_CASES = {"b6-t70": dict(B=2, T=10), "b6-t35": dict(B=2, T=5), SMALL: dict(B=2, T=5)}
IMPLS = ("fused", "reference")
VARIANTS, BASELINE = tuple(ptb.SMALL_VARIANTS), "baseline"  # the non-plastic one
SMALL_IMPL = "fused"
TARGET_SPEEDUP, TARGET_MEMORY = 3.0, 0.2  # fused vs reference tokens/s; peak memory fraction
TARGET_PLASTIC = 0.67  # small model: each plastic variant's tokens/s over the baseline's
# As common.measure's memory worker: every tensor gets its own mapping, returned to the OS on
# free, so that peak resident memory is the memory live at the peak (also after larger sizes).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def model_args(spec):
    """main.py's options of spec's model: the small preset's spec["variant"], or the large one."""
    if spec.get("variant"):
        flags = [
            "--preset",
            "small",
            "--variant",
            spec["variant"],
            *(QUICK_SMALL_MODEL if spec["quick"] else []),
        ]
    else:
        flags = QUICK_MODEL if spec["quick"] else LARGE_MODEL
    return ptb.parse_args([*flags, "--impl", spec["impl"], "--device", spec["device"]])


def reference_need_mb(spec, batch, T):
    """Estimated peak MB of the reference's training step (None for fused: small)."""
    if spec["impl"] != "reference":
        return None
    args = model_args(spec)
    widths = [args.nhid] * (args.nlayers - 1) + [args.emsize]
    traces = bench_lstm.EAGER_TRACES_PER_STEP * T + bench_lstm.EAGER_TRACES_EXTRA
    return sum(traces * batch * n * n * 4 for n in widths) / 2**20


# ----------------------------------------------------------------------------------------------
# Worker: one implementation in a fresh process


def worker(spec):
    """In a fresh process: the time of a training step at spec's B and T (spec["measure"] ==
    "time"), or its peak memory and the largest batch that fits the budget ("memory")."""
    try:
        args = model_args(spec)
        device = spec["device"]
        torch.manual_seed(0)
        model = ptb.build_model(args, ptb.PTB_VOCABULARY).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.wdecay)
        alphas = ptb.divided_alphas(model, args)

        def step(batch, length):
            words = torch.randint(ptb.PTB_VOCABULARY, (length + 1, batch), device=device)
            ptb.train_step(
                model,
                optimizer,
                words[:-1],
                words[1:].reshape(-1),
                [None] * args.nlayers,
                args,
                alphas,
            )

        step(spec["B"], 2)  # warm-up: allocates the gradients, starts thread pools, loads kernels
        common.sync(device)
        if spec["measure"] == "memory":

            def peak_mb(batch):
                return common.peak_memory_mb(lambda: step(batch, spec["T"]), device)

            return {"peak_mb": peak_mb(spec["B"]), **largest_batch(spec, peak_mb)}
        timing = common.time_fn(
            lambda: step(spec["B"], spec["T"]), device, spec["repeats"], spec["budget"]
        )
        return {
            "step_ms": timing["ms"],
            "runs": timing["runs"],
            "all_ms": timing["all_ms"],
            "tokens_per_s": spec["B"] * spec["T"] / timing["ms"] * 1e3,
            "nhid": args.nhid,
        }
    except Exception as err:  # e.g. out of memory on a GPU: reported, not fatal
        return {"error": common.short_error(err)}


def largest_batch(spec, peak_mb):
    """Largest batch (<= spec["max_batch"]) whose training step peaks at <= spec["budget_mb"]
    by `peak_mb(batch)`: double from 1 while it fits, then bisect. Returns {"max_batch",
    "max_batch_peak_mb", "search": {batch tried: peak MB, or why it was not run}}.

    Every size is measured in this process (the peak is reset before each, and freed memory
    goes back to the OS). A size is not run, and does not fit, when its estimate exceeds twice
    the budget or 70 % of the memory available: the estimate scales the largest fitting size
    measured so far linearly, an overestimate since memory grows linearly with a positive
    intercept (before that: reference_need_mb)."""
    budget, tried = spec["budget_mb"], {}

    def fits(batch):
        fitting = [b for b, peak in tried.items() if isinstance(peak, float) and peak <= budget]
        guess = (
            tried[max(fitting)] * batch / max(fitting)
            if fitting
            else reference_need_mb(spec, batch, spec["T"])
        )
        if guess is not None and guess > 2 * budget:
            tried[batch] = f"not run: estimate {guess:.0f} MB"
            return False
        skipped = common.memory_shortfall(guess, spec["device"])
        if skipped:
            tried[batch] = f"not run: {skipped}"
            return False
        try:
            tried[batch] = peak_mb(batch)
        except RuntimeError as err:  # e.g. out of memory on a GPU
            tried[batch] = common.short_error(err)
            return False
        return tried[batch] <= budget

    low, high = 0, 1
    while fits(high):
        low = high
        if high == spec["max_batch"]:
            break
        high = min(2 * high, spec["max_batch"])
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return {"max_batch": low, "max_batch_peak_mb": tried.get(low), "search": tried}


# ----------------------------------------------------------------------------------------------
# Measurements in fresh workers


def measure(script, spec):
    """Peak memory, largest batch in the budget and time of the case's training step
    (common.measure: a memory worker, then a timing worker); without the peak and time of the
    case where it would not fit in memory. The small model's variants: the time only."""
    if spec.get("variant"):
        return common.run_worker(script, dict(spec, measure="time"))
    skipped = common.memory_shortfall(reference_need_mb(spec, spec["B"], spec["T"]), spec["device"])
    if not skipped:
        return common.measure(script, spec)
    search = common.run_worker(script, dict(spec, B=1, measure="memory"), env=MEMORY_ENV)
    return {k: v for k, v in search.items() if k != "peak_mb"} | {"skipped": skipped}


# ----------------------------------------------------------------------------------------------
# Results


def add_ratios(records):
    """Large model: fused speedup (tokens/s over the row's) and memory fraction (fused peak / the
    row's). Small model: each variant's tokens/s over the baseline's."""
    fused = {r["case"]: r for r in records if r["impl"] == "fused" and not r.get("variant")}
    baseline = next((r for r in records if r.get("variant") == BASELINE), {})
    for r in records:
        if r.get("variant"):
            r["x_baseline"] = common.ratio(r.get("tokens_per_s"), baseline.get("tokens_per_s"))
            continue
        f = fused.get(r["case"], {})
        r["fused_speedup"] = common.ratio(f.get("tokens_per_s"), r.get("tokens_per_s"))
        r["fused_mem_fraction"] = common.ratio(f.get("peak_mb"), r.get("peak_mb"))


def notes(r):
    return "; ".join(r[k] for k in ("skipped", "error") if r.get(k))


def large_table(records, budget_mb):
    rows = []
    for r in records:
        fused = r["impl"] == "fused"
        in_budget = f"{r.get('max_batch', '-')} ({common.fmt_num(r.get('max_batch_peak_mb'))} MB)"
        rows.append(
            [
                r["case"],
                f"B={r['B']} T={r['T']}",
                r["impl"],
                common.fmt_num(r.get("step_ms")),
                common.fmt_num(r.get("tokens_per_s")),
                "" if fused else common.fmt_ratio(r["fused_speedup"]),
                common.fmt_num(r.get("peak_mb")),
                "" if fused else common.fmt_num(r["fused_mem_fraction"]),
                in_budget,
                notes(r),
            ]
        )
    return common.markdown_table(
        [
            "case",
            "sizes",
            "impl",
            "step ms",
            "tokens/s",
            "fused speedup",
            "peak MB",
            "fused mem fraction",
            f"largest batch in {budget_mb:g} MB",
            "notes",
        ],
        rows,
    )


def small_table(records):
    rows = [
        [
            r["case"],
            f"B={r['B']} T={r['T']} N={r.get('nhid', '-')}",
            r["variant"],
            r["impl"],
            common.fmt_num(r.get("step_ms")),
            common.fmt_num(r.get("tokens_per_s")),
            common.fmt_num(r["x_baseline"]),
            notes(r),
        ]
        for r in records
    ]
    return common.markdown_table(
        ["case", "sizes", "variant", "impl", "step ms", "tokens/s", f"x {BASELINE}", "notes"], rows
    )


def target_checks(records):
    """(case, label, value, ok(value)) of every target whose rows were measured."""
    targets = []
    by = {(r["case"], r["impl"]): r for r in records if not r.get("variant")}
    for case in dict.fromkeys(r["case"] for r in records if not r.get("variant")):
        ref = by.get((case, "reference"))
        if ref is None or (case, "fused") not in by:
            continue
        targets += [
            (
                case,
                f"fused tokens/s >= {TARGET_SPEEDUP:g}x reference",
                ref["fused_speedup"],
                lambda v: v >= TARGET_SPEEDUP,
            ),
            (
                case,
                f"fused peak memory <= {TARGET_MEMORY:g} x reference",
                ref["fused_mem_fraction"],
                lambda v: v <= TARGET_MEMORY,
            ),
        ]
    if any(r.get("variant") == BASELINE for r in records):
        targets += [
            (
                r["case"],
                f"{r['variant']} tokens/s >= {TARGET_PLASTIC:g}x {BASELINE}",
                r["x_baseline"],
                lambda v: v >= TARGET_PLASTIC,
            )
            for r in records
            if r.get("variant") not in (None, BASELINE)
        ]
    return targets


def tables(records, budget_mb):
    """The tables of the large model's and the small model's rows (those present), the target
    table, and the targets as dicts for the JSON."""
    large = [r for r in records if not r.get("variant")]
    small = [r for r in records if r.get("variant")]
    parts = ([large_table(large, budget_mb)] if large else []) + (
        [small_table(small)] if small else []
    )
    checks, target_rows = [], []
    for case, label, value, ok in target_checks(records):
        status = "n/a" if value is None else "met" if ok(value) else "NOT met"
        target_rows.append([case, label, common.fmt_num(value), status])
        checks.append(dict(case=case, target=label, value=value, status=status))
    target_table = common.markdown_table(["case", "target", "measured", "status"], target_rows)
    return "\n\n".join(parts), target_table, checks


def plot(records, path):
    """Large model: tokens/s, peak memory and largest batch per case and implementation; small
    model: tokens/s per variant, the target line at TARGET_PLASTIC x the baseline's."""
    plt = common.pyplot("bench")
    large = [r for r in records if not r.get("variant")]
    small = [r for r in records if r.get("variant")]
    panels = (3 if large else 0) + (1 if small else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.7 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if large:
        cases = list(dict.fromkeys(r["case"] for r in large))
        for ax, key, label in zip(
            axes,
            ("tokens_per_s", "peak_mb", "max_batch"),
            ("training tokens/s", "peak memory of a step (MB)", "largest batch in the budget"),
        ):
            values = {c: {r["impl"]: r.get(key) for r in large if r["case"] == c} for c in cases}
            common.grouped_bars(ax, cases, IMPLS, values, ylabel=label)
            ax.set_title(label)
    if small:
        ax = axes[-1]
        speeds = {r["variant"]: r.get("tokens_per_s") for r in small}
        line = speeds.get(BASELINE) and TARGET_PLASTIC * speeds[BASELINE]
        common.grouped_bars(
            ax,
            [SMALL],
            list(speeds),
            {SMALL: speeds},
            log=False,
            ylabel="training tokens/s",
            markers={SMALL: line},
        )
        ax.margins(y=0.15)  # room for the bar labels
        ax.set_title(f"small model, {SMALL_IMPL} (dashed: {TARGET_PLASTIC:g}x {BASELINE})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args():
    p = common.benchmark_parser(__doc__, CASES, IMPLS, repeats=3, budget=60.0)
    p.add_argument(
        "--budget-mb",
        type=common.number(float, 0, strict=True),
        default=8192.0,
        help="memory budget of the largest-batch search (quick: 16)",
    )
    p.add_argument(
        "--max-batch",
        type=common.number(int, 1),
        default=1024,
        help="search no further (quick: 16)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of {list(VARIANTS)}: the small model's variants of case "
        f"{SMALL!r}, each run on {SMALL_IMPL} (--impls: the large model's)",
    )
    args = p.parse_args()
    if args.quick:
        args.budget_mb, args.max_batch = min(args.budget_mb, 16.0), min(args.max_batch, 16)
    common.check_selection(p, args, CASES, IMPLS)
    unknown = set(args.variants.split(",")) - set(VARIANTS) - {""}
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    if not any(runs(args)):
        p.error(
            f"nothing to measure: --cases {args.cases!r} with --impls {args.impls!r} and "
            f"--variants {args.variants!r}"
        )
    return args


def runs(args):
    """(case, impl, variant) of every measurement: the large model's cases for each --impls
    (variant None), the small model's for each --variants on SMALL_IMPL."""
    for case in filter(None, args.cases.split(",")):
        if case == SMALL:
            yield from ((case, SMALL_IMPL, v) for v in filter(None, args.variants.split(",")))
        else:
            yield from ((case, impl, None) for impl in filter(None, args.impls.split(",")))


def models(args, records):
    """What the report's title says was measured."""
    names = []
    if any(not r["variant"] for r in records):
        names.append("tiny large model (emsize 16, nhid 32)" if args.quick else "the large model")
    if any(r["variant"] for r in records):
        names.append(
            "tiny small model (emsize = nhid = 16)" if args.quick else "the small model (Table 1)"
        )
    return " and ".join(names)


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    common.require_extras("bench")  # now, not when plotting at the end
    script = Path(__file__).resolve()
    sizes = QUICK_CASES if args.quick else CASES
    start, load_start = time.time(), os.getloadavg()[0]
    info = common.machine_info(args.device)
    info["cpu_peak_memory_method"] = (
        common.cpu_memory_method() if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    )
    records = []
    for case, impl, variant in runs(args):
        t0 = time.time()
        spec = dict(
            case=case,
            impl=impl,
            variant=variant,
            **sizes[case],
            device=args.device,
            quick=args.quick,
            repeats=args.repeats,
            budget=args.budget,
            budget_mb=args.budget_mb,
            max_batch=args.max_batch,
        )
        result = measure(script, spec)
        records.append(
            dict(
                case=case,
                impl=impl,
                variant=variant,
                **sizes[case],
                **result,
                budget_mb=args.budget_mb,
                loadavg=os.getloadavg()[0],
            )
        )
        memory = (
            ""
            if variant
            else f", {common.fmt_num(result.get('peak_mb'))} MB, largest "
            f"batch {result.get('max_batch')}"
        )
        print(
            f"[{time.time() - start:6.0f} s] {case} {variant or impl}: "
            f"{common.fmt_num(result.get('tokens_per_s'))} tokens/s{memory} "
            f"({time.time() - t0:.0f} s) {result.get('skipped', result.get('error', ''))}",
            file=sys.stderr,
            flush=True,
        )

    add_ratios(records)
    table, target_table, checks = tables(records, args.budget_mb)
    machine = (
        f"{info.get('gpu', info['cpu'])}, {info['torch_threads']} threads, torch "
        f"{info['torch']}, {args.device}, float32; 1-min load average {load_start:.1f} at "
        f"start, {os.getloadavg()[0]:.1f} at end"
    )
    large_notes = [
        "- Peak MB: peak resident memory of a fresh worker during one step above its resident "
        "size just before (model, gradients and data excluded; MALLOC_MMAP_THRESHOLD_=65536); on "
        "CUDA torch.cuda.max_memory_allocated above the memory allocated before.",
        f"- Largest batch: by doubling, then bisection, up to {args.max_batch}, each size "
        "measured as the peak MB, in the memory worker after the case itself; sizes whose linear "
        "estimate exceeds twice the budget or 70 % of the available memory are not run (the JSON "
        "lists every size tried).",
    ]
    small_notes = [
        f"- Case {SMALL}: main.py --preset small --variant V --impl {SMALL_IMPL} (2 layers, "
        "untied, no dropout or AR/TAR, time-sum loss), each variant at its own hidden size N "
        + ("(--quick: 16)" if args.quick else "(matched to ~4.8 M parameters)")
        + f"; timed only (no memory); x {BASELINE}: the variant's tokens/s over the "
        f"non-plastic {BASELINE}'s in this run, each measured in its own worker, one after the "
        "other."
    ]
    report = "\n".join(
        [
            f"## bench_ptb ({models(args, records)})",
            "",
            machine,
            "",
            table,
            "",
            "Targets"
            + (" (they apply to the full sizes, not to --quick)" if args.quick else "")
            + ":",
            "",
            target_table,
            "",
            "- A training step: main.py's train_step (forward with the model's dropout, "
            "cross-entropy with AR/TAR where set, backward, clip, SGD) on a (T, B) segment of "
            f"random tokens from zero states; median of up to {args.repeats} steps after a warm-up "
            "step; tokens/s = B * T / that time.",
            *(large_notes if any(not r["variant"] for r in records) else []),
            *(small_notes if any(r["variant"] for r in records) else []),
            "",
            f"Whole run: {time.time() - start:.0f} s.",
        ]
    )
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_csv(
        out / "bench_ptb.csv",
        [{k: v for k, v in r.items() if k not in ("search", "all_ms")} for r in records],
    )
    common.write_json(
        out / "bench_ptb.json", dict(machine=info, args=vars(args), results=records, targets=checks)
    )
    plot(records, out / "bench_ptb.png")
    print(f"\nwrote {out / 'bench_ptb'}.csv, .json, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
