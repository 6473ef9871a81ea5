"""Shared benchmark harness: worker subprocesses, machine description, output (the measuring
itself, timing, peak memory, bandwidth, is backpropamine_cuda/measure.py, shared with the selftest).

Used by bench_rnn.py and bench_lstm.py. Plain functions: a benchmark script defines its cases,
implementations, targets, inputs (`setup`) and bandwidth floor, and hands them to `run_benchmark`,
which parses the command line common to both scripts, measures and writes the results.

Each (case, implementation) pair runs in fresh worker subprocesses (`measure`), so that the
implementations do not share allocator caches, compiled-kernel caches or a peak-memory counter.
"""

import argparse
import csv
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from backpropamine_cuda.measure import (  # noqa: F401  (re-exported for the bench scripts)
    cpu_memory_method,
    markdown_table,
    measure_bandwidth,
    peak_memory_mb,
    sync,
    time_fn,
    trace_floor_bytes,
)
from experiments.common import (  # noqa: F401  (manifest, write_json: for the bench scripts)
    cpu_model,
    manifest,
    number,
    pyplot,
    require_extras,
    write_json,
)

# ----------------------------------------------------------------------------------------------
# Device helpers


def cache_sizes():
    """{'L2': '4 MiB (2 instances)', 'L3': ...} from lscpu where available (else empty)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    sizes = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("L2 cache", "L3 cache"):
            sizes[key.strip().split()[0]] = value.strip()
    return sizes


def machine_info(device):
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        **{f"cache_{k}": v for k, v in cache_sizes().items()},
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


MEMORY_FRACTION = 0.7  # a measurement may use at most this share of the memory available


def available_mb(device):
    """Memory a new allocation can get now, in MB: free GPU memory, or the kernel's MemAvailable
    (None where neither is known)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2**20
    kb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
    except OSError:
        pass
    return None if kb is None else kb / 2**10


def memory_shortfall(need_mb, device):
    """Why a measurement estimated to need `need_mb` MB must not run (None: it may run).

    On a shared machine an out-of-memory run can take other processes down with it, so a run is
    refused beyond MEMORY_FRACTION of what is available, checked just before it starts.
    """
    avail = available_mb(device)
    if need_mb is None or avail is None or need_mb <= MEMORY_FRACTION * avail:
        return None
    return (
        f"skipped: needs ~{need_mb / 2**10:.1f} GB (estimate), more than "
        f"{MEMORY_FRACTION:.0%} of the {avail / 2**10:.1f} GB available"
    )


# ----------------------------------------------------------------------------------------------
# Worker subprocesses


def run_worker(script, spec, env=None, timeout_s=3600):
    """Runs `python script --worker JSON` in a fresh process (with `env` added to the
    environment); returns the dict it prints as its last stdout line, or {"error": ...} when it
    crashes (e.g. killed for memory) or times out."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout_s} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exit code {proc.returncode}: " + " | ".join(tail)}


class BusyProcess:
    """One busy single-threaded process beside the benchmark (--contention): the load of a user
    running another job on the same cores. A context manager."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def short_error(err, limit=80):
    """First line of an exception message, shortened for a table cell."""
    text = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(err)
    text = text.strip().splitlines()[0] if text.strip() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tensor_makers(device, dtype, seed=0):
    """`randn(*shape, scale=1.0)` and `zeros(*shape)`: leaf tensors that require grad, drawn from
    one seeded CPU generator so that every implementation gets the same values."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device).requires_grad_()

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device, requires_grad=True)

    return randn, zeros


def package_op(impl, name):
    """The op `name` of backpropamine_cuda.fused (impl "fused") or .reference ("eager"). Imported
    here, in the worker: importing fused builds the extension where pip did not."""
    module = {"fused": "fused", "eager": "reference"}[impl]
    return getattr(importlib.import_module(f"backpropamine_cuda.{module}"), name)


def worker(spec, setup):
    """Measures one (case, implementation) in this process: its peak memory (spec["measure"] ==
    "memory") or its times ("time"), forward under no_grad ("fwd") and forward+backward ("fwdbwd").

    `setup(cfg, impl, device, dtype)` returns `(call, loss, x, grad_inputs)`: `call(x)` runs the
    implementation on the input sequence `x` (T first), `loss(call(x))` is what fwd+bwd
    differentiates with respect to `grad_inputs`. A mode whose estimated need
    (spec["need_mb"][mode], MB) exceeds the memory available is skipped. Returns a JSON-able dict.
    """
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        call, loss, x_full, grad_inputs = setup(spec["cfg"], spec["impl"], device, dtype)
    except Exception as err:  # e.g. the extension does not build, or lacks the op
        return {"error": short_error(err)}

    def forward(x):
        with torch.no_grad():
            call(x)

    def forward_backward(x):
        torch.autograd.grad(loss(call(x)), grad_inputs)

    result = {}
    for mode, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        skipped = memory_shortfall(spec.get("need_mb", {}).get(mode), device)
        if skipped:
            result[f"{mode}_skipped"] = skipped
            continue
        try:
            # Warm-up on 2 steps: compiles (shapes that do not depend on T), starts thread pools
            # and loads kernels, so none of it lands in the measurements.
            t0 = time.perf_counter()
            fn(x_full[:2])
            sync(device)
            if spec["measure"] == "memory":
                result[f"{mode}_warmup_s"] = time.perf_counter() - t0
                result[f"{mode}_peak_mb"] = peak_memory_mb(lambda: fn(x_full), device)
            else:
                timing = time_fn(lambda: fn(x_full), device, spec["repeats"], spec["budget"])
                result[f"{mode}_ms"] = timing["ms"]
                result[f"{mode}_min_ms"] = timing["min_ms"]  # less sensitive to other processes
                result[f"{mode}_runs"] = timing["runs"]
                result[f"{mode}_all_ms"] = timing["all_ms"]
        except Exception as err:  # a failing compile or op is reported, not fatal
            result[f"{mode}_error"] = short_error(err)
    return result


def measure(script, spec):
    """Runs the memory worker, then the timing worker, each in a fresh process; merges them."""
    # glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap and
    # keeps freed heap pages resident, so peak RSS would include allocator history. A fixed small
    # threshold gives every tensor its own mapping, returned on free: peak RSS ~ live memory.
    # Timing runs use the default allocator behaviour, as users get it.
    mem = run_worker(script, dict(spec, measure="memory"), env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    tim = run_worker(script, dict(spec, measure="time"))
    merged = {**mem, **tim}
    for key in ("error", "fwd_error", "fwdbwd_error"):
        errors = list(dict.fromkeys(e for e in (mem.get(key), tim.get(key)) if e))
        if errors:
            merged[key] = " / ".join(errors)
    return merged


# ----------------------------------------------------------------------------------------------
# Output


def write_csv(path, records):
    """One row per dict; the columns are the union of the keys, in first-seen order."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)


def fmt_num(x, digits=3):
    """Numbers for tables: 3 significant digits, '-' for missing."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def grouped_bars(ax, groups, series, values, log=True, ylabel="", markers=None):
    """Grouped bar chart: `values[g][s]` (None = missing) for groups along x, one bar per series.

    `markers[g]` (optional) draws a dashed horizontal line across group g (e.g. a floor).
    """
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    log = log and any(values[g].get(s) for g in groups for s in series)  # nothing ran: linear
    for k, s in enumerate(series):
        heights = [values[g].get(s) for g in groups]
        pos = x - 0.4 + width * (k + 0.5)
        shown = [h for h in heights if h]
        bars = ax.bar([p for p, h in zip(pos, heights) if h], shown, width, label=s)
        ax.bar_label(bars, labels=[fmt_num(h) for h in shown], fontsize=7, rotation=90, padding=2)
    if markers:
        for i, g in enumerate(groups):
            if markers.get(g):
                ax.hlines(markers[g], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1)
    ax.set_xticks(x, groups)
    if log:
        ax.set_yscale("log")
        ax.margins(y=0.25)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


# ----------------------------------------------------------------------------------------------
# Results: ratios, tables, targets, plot


def ratio(a, b):
    return a / b if a is not None and b else None


def summarize(records, light=None):
    """Adds to every record (in place) the ratios to fused and to the bandwidth floor and, with
    `light` (a non-plastic implementation), the reference time: light's time + the floor."""
    fused = {r["case"]: r for r in records if r["impl"] == "fused"}
    lights = {r["case"]: r for r in records if r["impl"] == light}
    for r in records:
        f = fused.get(r["case"], {})
        for m in ("fwd", "fwdbwd"):
            # > 1 means fused is faster
            r[f"fused_speedup_{m}"] = ratio(r.get(f"{m}_ms"), f.get(f"{m}_ms"))
            r[f"x_floor_{m}"] = ratio(r.get(f"{m}_ms"), r[f"floor_{m}_ms"])
            if light:
                base = lights.get(r["case"], {}).get(f"{m}_ms")
                r[f"ref_{m}_ms"] = None if base is None else base + r[f"floor_{m}_ms"]
                r[f"x_ref_{m}"] = ratio(r.get(f"{m}_ms"), r[f"ref_{m}_ms"])
        # < 1 means fused is smaller
        r["fused_mem_fraction"] = ratio(f.get("fwdbwd_peak_mb"), r.get("fwdbwd_peak_mb"))


def results_table(records, light=None):
    def pair(r, key):  # "fwd / fwd+bwd" of a ratio
        return f"{fmt_ratio(r[key.format('fwd')])} / {fmt_ratio(r[key.format('fwdbwd')])}"

    headers = [
        "case",
        "sizes",
        "impl",
        "fwd ms",
        "fwd+bwd ms",
        "fused speedup fwd / fwd+bwd",
        "peak MB fwd / fwd+bwd",
        "fused mem fraction",
        "fused / floor fwd / fwd+bwd",
        *([f"fused / ({light} + floor) fwd / fwd+bwd"] if light else []),
        "runs",
        "notes",
    ]
    rows = []
    for r in records:
        is_fused = r["impl"] == "fused"
        notes = [
            f"{m}: {r[m + '_' + what]}"
            for m in ("fwd", "fwdbwd")
            for what in ("error", "skipped")
            if r.get(m + "_" + what)
        ]
        if r.get("error"):
            notes.append(r["error"])
        if r["impl"] == "compiled" and r.get("fwdbwd_warmup_s"):
            notes.append(f"compile+warm-up {r.get('fwd_warmup_s', 0) + r['fwdbwd_warmup_s']:.0f} s")
        rows.append(
            [
                r["case"],
                r["sizes"],
                r["impl"],
                fmt_num(r.get("fwd_ms")),
                fmt_num(r.get("fwdbwd_ms")),
                "" if is_fused else pair(r, "fused_speedup_{}"),
                f"{fmt_num(r.get('fwd_peak_mb'))} / {fmt_num(r.get('fwdbwd_peak_mb'))}",
                "" if is_fused else fmt_num(r["fused_mem_fraction"]),
                pair(r, "x_floor_{}") if is_fused else "",
                *([pair(r, "x_ref_{}") if is_fused else ""] if light else []),
                f"{r.get('fwd_runs', '-')} / {r.get('fwdbwd_runs', '-')}",
                "; ".join(notes),
            ]
        )
    return markdown_table(headers, rows)


def contention_table(records):
    headers = [
        "case",
        "impl",
        "idle fwd / fwd+bwd ms",
        "busy fwd / fwd+bwd ms",
        "busy / idle fwd / fwd+bwd",
    ]
    rows = [
        [
            r["case"],
            r["impl"],
            f"{fmt_num(r.get('fwd_ms'))} / {fmt_num(r.get('fwdbwd_ms'))}",
            f"{fmt_num(r.get('busy_fwd_ms'))} / {fmt_num(r.get('busy_fwdbwd_ms'))}",
            f"{fmt_ratio(r.get('busy_x_idle_fwd'))} / {fmt_ratio(r.get('busy_x_idle_fwdbwd'))}",
        ]
        for r in records
    ]
    return markdown_table(headers, rows)


def check_targets(records, targets):
    """Rows of the target table, and the same as dicts for the JSON.

    `targets`: (case, what, impl compared with, threshold), checked on fused's fwd+bwd:
      speedup: time is >= threshold times faster than impl's
      floor:   time <= threshold x the bandwidth floor (impl None) or x the reference time, impl's
               time + the floor (impl is then summarize's `light`)
      contention: time beside a busy process <= threshold x the idle time (--contention runs)
      memory:  peak memory <= threshold x impl's
    """
    by = {(r["case"], r["impl"]): r for r in records}
    rows, checks = [], []
    for case, what, other, threshold in targets:
        f, o = by.get((case, "fused")), by.get((case, other))
        if f is None or (other and o is None):
            continue
        if what == "speedup":
            label = f"fused fwd+bwd >= {threshold:g}x faster than {other}"
            value, ok = o["fused_speedup_fwdbwd"], lambda v: v >= threshold
        elif what == "floor" and other:
            label = f"fused fwd+bwd <= {threshold:g}x ({other} fwd+bwd + bandwidth floor)"
            value, ok = f["x_ref_fwdbwd"], lambda v: v <= threshold
        elif what == "floor":
            label = f"fused fwd+bwd <= {threshold:g}x the bandwidth floor"
            value, ok = f["x_floor_fwdbwd"], lambda v: v <= threshold
        elif what == "contention":
            label = f"fused fwd+bwd beside a busy process <= {threshold:g}x its idle time"
            value, ok = f.get("busy_x_idle_fwdbwd"), lambda v: v <= threshold
        else:
            label = f"fused fwd+bwd peak memory <= {threshold:g} x {other}'s"
            value, ok = o["fused_mem_fraction"], lambda v: v <= threshold
        status = "n/a" if value is None else "met" if ok(value) else "NOT met"
        shown = fmt_ratio(value) if what != "memory" else fmt_num(value)
        rows.append([case, label, shown, status])
        checks.append(dict(case=case, target=label, value=value, status=status))
    return markdown_table(["case", "target", "measured", "status"], rows), checks


def plot(records, path, impls):
    plt = pyplot("bench")
    cases = list(dict.fromkeys(r["case"] for r in records))
    by = {c: {r["impl"]: r for r in records if r["case"] == c} for c in cases}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    times = {c: {i: by[c].get(i, {}).get("fwdbwd_ms") for i in impls} for c in cases}
    floors = {c: next(iter(by[c].values()))["floor_fwdbwd_ms"] for c in cases}
    grouped_bars(axes[0], cases, impls, times, ylabel="forward+backward time (ms)", markers=floors)
    axes[0].set_title("fwd+bwd time (dashed: bandwidth floor)")
    mems = {c: {i: by[c].get(i, {}).get("fwdbwd_peak_mb") for i in impls} for c in cases}
    grouped_bars(axes[1], cases, impls, mems, ylabel="peak memory (MB)")
    axes[1].set_title("fwd+bwd peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Driver


def benchmark_parser(doc, cases, impls, *, repeats, budget):
    """The command line every benchmark script shares: what to run, how often, where to write."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(cases), help=f"comma list of {list(cases)}")
    p.add_argument("--impls", default=",".join(impls), help=f"comma list of {list(impls)}")
    p.add_argument(
        "--repeats",
        type=number(int, 1),
        default=repeats,
        help="timed runs per measurement (median)",
    )
    p.add_argument(
        "--budget",
        type=number(float, 0, strict=True),
        default=budget,
        help="stop repeating a measurement once its runs took this long (>= 1 run)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="folder for CSV/JSON/PNG",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument(
        "--contention",
        action="store_true",
        help="time every measurement again beside a busy single-threaded process",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one measurement
    return p


def check_selection(parser, args, cases, impls):
    """Exits with a usage error for an unknown case or implementation, or a missing GPU."""
    for name, choices in (("cases", cases), ("impls", impls)):
        given = set(getattr(args, name).split(",")) - {""}
        unknown = sorted(given - set(choices))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {list(choices)}")
        if not given:  # (nothing to measure: the results files would be emptied)
            parser.error(f"--{name}: none given; choose from {list(choices)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")


def parse_args(doc, cases, impls):
    p = benchmark_parser(doc, cases, impls, repeats=5, budget=20.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--threads", type=number(int, 0), default=0, help="torch threads (0: torch's default)"
    )
    p.add_argument(
        "--bw-mb",
        type=number(int, 1),
        default=1024,
        help="MB per array of the bandwidth measurement (well above the LLC)",
    )
    args = p.parse_args()
    check_selection(p, args, cases, impls)
    return args


def describe(cfg):
    """'B=6 N=1149 T=70 alpha=neuron' for a table cell; lists as '400-1149-400'."""
    return " ".join(
        f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in cfg.items()
    )


def run_benchmark(
    name,
    doc,
    script,
    *,
    cases,
    quick_cases,
    impls,
    targets,
    setup,
    floor_bytes,
    notes,
    need_mb=None,
    light=None,
):
    """The whole benchmark script `script` (named `name`, documented by `doc`): parses its
    command line, then either is a worker (see `worker`) or measures every selected (case, impl)
    in workers, prints the table and targets and writes name.csv / .json / .png.

    cases, quick_cases: {case: cfg}, full and --quick sizes; impls: implementation names;
    targets: see check_targets; setup: see worker; floor_bytes(cfg, itemsize): (fwd, fwd+bwd)
    bytes the fused op must move; notes: the script's footnotes; need_mb(cfg, impl, itemsize):
    estimated MB per mode ({} if unknown), a mode that will not fit is skipped; light: the
    non-plastic implementation of the reference time (see summarize).
    """
    args = parse_args(doc, cases, impls)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), setup)))
        return
    require_extras("bench")  # now, not when plotting at the end
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    info = machine_info(args.device)
    info["cpu_peak_memory_method"] = (
        cpu_memory_method() if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    )
    load_start = os.getloadavg()[0]
    bw_mb = min(args.bw_mb, 64) if args.quick else args.bw_mb
    bw = measure_bandwidth(args.device, bw_mb)
    print(
        f"memory bandwidth: {bw['gbs']:.1f} GB/s (add {bw['add_gbs']:.1f}, "
        f"copy {bw['copy_gbs']:.1f}, in place {bw['inplace_gbs']:.1f}; {bw_mb} MB arrays)",
        file=sys.stderr,
        flush=True,
    )

    records = measure_cases(
        args, script, quick_cases if args.quick else cases, floor_bytes, need_mb, bw["gbs"], start
    )
    summarize(records, light)
    total_s = time.time() - start
    table = results_table(records, light)
    if args.contention:
        table += (
            "\n\nBeside one busy single-threaded process (--contention):\n\n"
            + contention_table(records)
        )
    target_table, checks = check_targets(records, targets)
    # Other processes competing for the cores distort timings (OpenMP waits for every thread).
    info["loadavg_1min_start_end"] = (load_start, os.getloadavg()[0])
    report = "\n".join(
        [
            f"## {name} ({'quick sizes' if args.quick else 'full sizes'})",
            "",
            machine_line(args, info, bw, bw_mb),
            "",
            table,
            "",
            "Targets"
            + (" (they apply to the full sizes, not to --quick)" if args.quick else "")
            + ":",
            "",
            target_table,
            "",
            *[f"- {f}" for f in footnotes(args, notes, light)],
            "",
            f"Whole run: {total_s:.0f} s.",
        ]
    )
    print(report)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if not k.endswith("_all_ms")} for r in records]
    write_csv(out / f"{name}.csv", flat)
    write_json(
        out / f"{name}.json",
        dict(
            machine=info,
            bandwidth=bw,
            args=vars(args),
            total_s=total_s,
            results=records,
            targets=checks,
        ),
    )
    plot(records, out / f"{name}.png", [i for i in args.impls.split(",") if i])
    print(f"\nwrote {out / name}.csv, .json, .png", file=sys.stderr)


def measure_cases(args, script, sizes, floor_bytes, need_mb, gbs, start):
    """One record per selected (case, impl): the worker's measurements (and, with --contention,
    the times beside a busy process), the case's sizes, the bandwidth floors at `gbs` GB/s and
    the load average after it; a progress line per record on stderr."""
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    records = []
    for case in [c for c in args.cases.split(",") if c]:
        cfg = sizes[case]
        floor_fwd, floor_fwdbwd = (b / (gbs * 1e9) * 1e3 for b in floor_bytes(cfg, itemsize))
        for impl in [i for i in args.impls.split(",") if i]:
            t0 = time.time()
            spec = dict(
                case=case,
                cfg=cfg,
                impl=impl,
                device=args.device,
                dtype=args.dtype,
                repeats=args.repeats,
                budget=args.budget,
                threads=args.threads,
                need_mb=need_mb(cfg, impl, itemsize) if need_mb else {},
            )
            res = measure(script, spec)
            if args.contention and "error" not in res:
                with BusyProcess():
                    busy = run_worker(script, dict(spec, measure="time"))
                for m in ("fwd", "fwdbwd"):
                    res[f"busy_{m}_ms"] = busy.get(f"{m}_ms")
                    res[f"busy_x_idle_{m}"] = ratio(busy.get(f"{m}_ms"), res.get(f"{m}_ms"))
            # 1-min load average after the worker: ~threads when nothing else ran meanwhile
            records.append(
                dict(
                    case=case,
                    impl=impl,
                    sizes=describe(cfg),
                    **cfg,
                    **res,
                    loadavg=os.getloadavg()[0],
                    floor_fwd_ms=floor_fwd,
                    floor_fwdbwd_ms=floor_fwdbwd,
                )
            )
            trouble = [res[k] for k in ("error", "fwd_skipped", "fwdbwd_skipped") if k in res]
            busy_note = (
                f", beside a busy process {fmt_num(res.get('busy_fwd_ms'))} / "
                f"{fmt_num(res.get('busy_fwdbwd_ms'))} ms"
                if args.contention
                else ""
            )
            print(
                f"[{time.time() - start:6.0f} s] {case:8s} {impl:9s} "
                f"fwd {fmt_num(res.get('fwd_ms'))} ms, "
                f"fwd+bwd {fmt_num(res.get('fwdbwd_ms'))} ms{busy_note} "
                f"({time.time() - t0:.0f} s)" + "".join(f"  {t}" for t in trouble),
                file=sys.stderr,
                flush=True,
            )
    return records


def machine_line(args, info, bw, bw_mb):
    """The report's line on the machine: processor, threads, versions, measured bandwidth,
    caches and the load average at the start and end (info["loadavg_1min_start_end"])."""
    threads = args.threads or info["torch_threads"]
    line = (
        f"{info.get('gpu', info['cpu'])}, {threads} threads, torch {info['torch']}, "
        f"{args.device}, {args.dtype}; measured memory bandwidth {bw['gbs']:.1f} GB/s "
        f"(add {bw['add_gbs']:.1f}, copy {bw['copy_gbs']:.1f}, in place "
        f"{bw['inplace_gbs']:.1f} GB/s on {bw_mb} MB arrays)"
    )
    if "cache_L3" in info:
        line += f"; L2 {info.get('cache_L2', '?')}, L3 {info['cache_L3']}"
    load_start, load_end = info["loadavg_1min_start_end"]
    return line + f"; 1-min load average {load_start:.1f} at start, {load_end:.1f} at end"


def footnotes(args, notes, light):
    """The report's footnotes: how times, memory and floors were measured, and `notes`."""
    return [
        f"Median of up to {args.repeats} runs after a warm-up ('runs' column, fwd / fwd+bwd; "
        f"fewer once a measurement has used {args.budget:g} s). fwd runs under no_grad; fwd+bwd "
        "is the loss below and torch.autograd.grad to all inputs.",
        *notes,
        "Speedup and mem fraction are relative to fused on the same row's case: "
        "speedup = impl time / fused time, mem fraction = fused peak / impl peak.",
        "Peak memory: "
        + (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
            "memory allocated before the call."
            if args.device == "cuda"
            else "peak resident set size of a fresh worker process during the first "
            "full-size call, minus its resident size just before (peak reset via "
            "/proc/self/clear_refs). That worker runs with MALLOC_MMAP_THRESHOLD_="
            "65536 so that freed tensors leave no resident heap behind: the figure "
            "is the memory live at the peak; inputs excluded, outputs and "
            "gradients included. Timings come from a second worker with default "
            "malloc settings."
        ),
        "Bandwidth floor = bytes the fused op must move / measured bandwidth; bytes = T x "
        "(2 fwd, 7 fwd+bwd) x B*N*N*itemsize for the trace plus the per-step vectors "
        "(common.trace_floor_bytes). A ratio < 1 means the trace stayed in cache.",
        *(
            [
                f"Reference time = {light} time + bandwidth floor: a non-plastic layer plus the "
                "trace traffic that plasticity cannot avoid."
            ]
            if light
            else []
        ),
    ]
