"""Benchmark of the plastic RNN sequence op: fused vs eager reference vs torch.compile'd reference.

For each case (sizes of the papers' models) and implementation, in one run:
  * forward (under no_grad) and forward+backward time, median of repeated runs,
  * peak memory of each,
  * the machine's memory bandwidth, measured in the same run, and the bandwidth floor of the
    fused op (bytes it must move / bandwidth).
Prints a markdown table and the performance targets, writes CSV, JSON and a PNG plot.

    PYTHONPATH=. python benchmarks/bench_rnn.py --quick            # smoke test, tiny sizes
    PYTHONPATH=. python benchmarks/bench_rnn.py --quick --impls fused,eager   # ... without compiles
    PYTHONPATH=. python benchmarks/bench_rnn.py                    # all cases, CPU
    PYTHONPATH=. python benchmarks/bench_rnn.py --device cuda --cases ptb,ptb-mem

Implementations:
  fused     backpropamine_cuda.fused.plastic_rnn_sequence (one C++/CUDA op, hand-written backward)
  eager     backpropamine_cuda.reference.plastic_rnn_sequence (pure PyTorch, autograd)
  compiled  a Python loop over T calling torch.compile(reference.plastic_rnn_step, dynamic=False)

Every (case, implementation) is measured by two fresh subprocesses, one for peak memory and one
for times (see measure and common.run_worker), so implementations share no allocator state.
Timings on a shared machine suffer from other processes (OpenMP waits for its slowest thread): the
1-min load average is printed and stored per row, and the JSON keeps every run and the minimum.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Sizes of the papers' models (DESIGN 2.5). All use modulation "fanout" with K = 1 and rule clip.
CASES = {
    "maze": dict(B=30, N=100, T=200, alpha="full"),      # Backpropamine simple maze
    "ptb": dict(B=6, N=1149, T=35, alpha="neuron"),      # large PTB model, one layer, short BPTT
    "ptb-mem": dict(B=6, N=1149, T=70, alpha="neuron"),  # same, the paper's BPTT length
}
QUICK_CASES = {
    "maze": dict(B=4, N=16, T=12, alpha="full"),
    "ptb": dict(B=2, N=48, T=6, alpha="neuron"),
    "ptb-mem": dict(B=2, N=48, T=10, alpha="neuron"),
}
K, RULE, CLIP = 1, "clip", 2.0
IMPLS = ("fused", "eager", "compiled")

# Performance targets: (case, what, impl compared with, threshold). Checked on the full sizes.
#   speedup: fused fwd+bwd time is >= threshold times faster than impl
#   floor:   fused fwd+bwd time <= threshold x the bandwidth floor
#   memory:  fused fwd+bwd peak memory <= threshold x impl's
TARGETS = [
    ("maze", "speedup", "eager", 20.0),
    ("maze", "speedup", "compiled", 10.0),
    ("ptb", "speedup", "eager", 4.0),
    ("ptb", "floor", None, 2.0),
    ("ptb-mem", "memory", "eager", 0.1),
]


def rnn_floor_bytes(T, B, N, itemsize):
    """Lower bound on the bytes the fused sequence op must move: (forward, forward+backward).

    The trace (B, N, N) is the only large tensor. Model, per step:
      forward:  read H_{t-1}, write H_t (its update and the next step's matvec share one sweep)
                                                                              -> 2 trace passes
      backward: recompute H_t from the segment checkpoint (read + write)     -> 2
                read H_{t-1} for the adjoints, read + write dL/dH            -> 3
    i.e. 2 trace passes per step forward and 7 forward+backward. The per-step vectors are added
    (forward reads x and writes out and eta: 3 x (B, N); backward reads out, eta, dL/dout and
    writes dL/dx: 4 more); they are < 1 % at the papers' sizes. Left out on purpose: the (N, N)
    parameters w and alpha (read once per step per direction, but small enough to stay in cache)
    and the checkpoint writes (T / sqrt(T) traces); leaving them out keeps this a lower bound.
    Revise here if the kernels' data flow changes.
    """
    trace = B * N * N * itemsize
    vec = B * N * itemsize
    fwd = T * (2 * trace + 3 * vec)
    fwd_bwd = T * (7 * trace + 7 * vec)
    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------
# Worker: one (case, implementation) in a fresh process.


def make_inputs(cfg, device, dtype, seed=0):
    """Inputs of the sequence op (same values for every implementation), all requiring grad."""
    B, N, T = cfg["B"], cfg["N"], cfg["T"]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device).requires_grad_()

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device, requires_grad=True)

    alpha_shape = (N, N) if cfg["alpha"] == "full" else (N,)
    return dict(
        x=randn(T, B, N), h0=zeros(B, N), hebb0=zeros(B, N, N),
        w=randn(N, N, scale=1 / math.sqrt(N)), alpha=randn(*alpha_shape, scale=0.1),
        h2mod_weight=randn(K, N, scale=1 / math.sqrt(N)), h2mod_bias=zeros(K),
        fanout_weight=randn(N, K, scale=0.5), fanout_bias=zeros(N))


def compiled_sequence():
    """reference.plastic_rnn_sequence with its step replaced by the torch.compile'd step."""
    from backpropamine_cuda import reference

    step = torch.compile(reference.plastic_rnn_step, dynamic=False)

    def sequence(x, h, hebb, elig, *params, rule, clip):
        outs, mods = [], []
        for x_t in x.unbind(0):
            h, hebb, elig, m = step(x_t, h, hebb, elig, *params, rule=rule, clip=clip)
            outs.append(h)
            mods.append(m)
        return torch.stack(outs), hebb, elig, torch.stack(mods)

    return sequence


def sequence_fn(impl):
    if impl == "fused":
        from backpropamine_cuda import fused
        return fused.plastic_rnn_sequence
    if impl == "eager":
        from backpropamine_cuda import reference
        return reference.plastic_rnn_sequence
    if impl == "compiled":
        return compiled_sequence()
    raise ValueError(f"unknown implementation {impl!r}")


def worker(spec):
    """Measures one (case, implementation): its peak memory (spec["measure"] == "memory") or its
    times ("time"). Returns a JSON-able dict."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    inp = make_inputs(spec["cfg"], device, dtype)
    grad_inputs = list(inp.values())
    try:
        seq = sequence_fn(spec["impl"])
    except Exception as err:  # e.g. the extension does not build
        return {"error": common.short_error(err)}

    def call(x):
        return seq(x, inp["h0"], inp["hebb0"], None, inp["w"], inp["alpha"], None, None,
                   inp["h2mod_weight"], inp["h2mod_bias"], inp["fanout_weight"],
                   inp["fanout_bias"], rule=RULE, clip=CLIP)

    def forward(x):
        with torch.no_grad():
            call(x)

    def forward_backward(x):
        out, hebb_T, _, _ = call(x)
        # hebb_T enters the loss so that the gradient also flows in through the final trace
        loss = out.sum() + hebb_T.sum()
        torch.autograd.grad(loss, grad_inputs)

    x_full, x_warm = inp["x"], inp["x"][:2]
    result = {}
    for mode, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        try:
            # Warm-up on 2 steps: compiles the step (its shapes do not depend on T), starts
            # thread pools and loads kernels, so none of it lands in the measurements.
            t0 = time.perf_counter()
            fn(x_warm)
            common.sync(device)
            if spec["measure"] == "memory":
                result[f"{mode}_warmup_s"] = time.perf_counter() - t0
                result[f"{mode}_peak_mb"] = common.peak_memory_mb(lambda: fn(x_full), device)
            else:
                timing = common.time_fn(lambda: fn(x_full), device, spec["repeats"],
                                        spec["budget"])
                result[f"{mode}_ms"] = timing["ms"]
                result[f"{mode}_min_ms"] = timing["min_ms"]  # less sensitive to other processes
                result[f"{mode}_runs"] = timing["runs"]
                result[f"{mode}_all_ms"] = timing["all_ms"]
        except Exception as err:  # a failing compile or op is reported, not fatal
            result[f"{mode}_error"] = common.short_error(err)
    return result


def measure(script, spec):
    """Runs the memory worker, then the timing worker, each in a fresh process; merges them."""
    # glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap and
    # keeps freed heap pages resident, so peak RSS would include allocator history. A fixed small
    # threshold gives every tensor its own mapping, returned on free: peak RSS ~ live memory.
    # Timing runs use the default allocator behaviour, as users get it.
    mem = common.run_worker(script, dict(spec, measure="memory"),
                            env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    tim = common.run_worker(script, dict(spec, measure="time"))
    merged = {**mem, **tim}
    for key in ("error", "fwd_error", "fwdbwd_error"):
        errors = list(dict.fromkeys(e for e in (mem.get(key), tim.get(key)) if e))
        if errors:
            merged[key] = " / ".join(errors)
    return merged


# ----------------------------------------------------------------------------------------------
# Driver


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="stop repeating a measurement once its runs took this long (>= 1 run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--bw-mb", type=int, default=1024,
                   help="MB per array of the bandwidth measurement (well above the LLC)")
    p.add_argument("--out", default="benchmarks/results", help="folder for CSV/JSON/PNG")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one measurement
    return p.parse_args()


def ratio(a, b):
    return a / b if a is not None and b else None


def summarize(records, bandwidth_gbs, itemsize):
    """Adds ratios to fused and the bandwidth floor to every record (in place)."""
    fused = {r["case"]: r for r in records if r["impl"] == "fused"}
    for r in records:
        f = fused.get(r["case"], {})
        # > 1 means fused is faster / smaller
        r["fused_speedup_fwd"] = ratio(r.get("fwd_ms"), f.get("fwd_ms"))
        r["fused_speedup_fwdbwd"] = ratio(r.get("fwdbwd_ms"), f.get("fwdbwd_ms"))
        r["fused_mem_fraction"] = ratio(f.get("fwdbwd_peak_mb"), r.get("fwdbwd_peak_mb"))
        fwd_b, fwdbwd_b = rnn_floor_bytes(r["T"], r["B"], r["N"], itemsize)
        r["floor_fwd_ms"] = fwd_b / (bandwidth_gbs * 1e9) * 1e3
        r["floor_fwdbwd_ms"] = fwdbwd_b / (bandwidth_gbs * 1e9) * 1e3
        r["x_floor_fwd"] = ratio(r.get("fwd_ms"), r["floor_fwd_ms"])
        r["x_floor_fwdbwd"] = ratio(r.get("fwdbwd_ms"), r["floor_fwdbwd_ms"])


def results_table(records):
    headers = ["case", "sizes", "impl", "fwd ms", "fwd+bwd ms", "fused speedup fwd / fwd+bwd",
               "peak MB fwd / fwd+bwd", "fused mem fraction", "fused / floor fwd / fwd+bwd",
               "runs", "notes"]
    rows = []
    for r in records:
        is_fused = r["impl"] == "fused"
        notes = [f"{m}: {r[m + '_error']}" for m in ("fwd", "fwdbwd") if r.get(m + "_error")]
        if r.get("error"):
            notes.append(r["error"])
        if r["impl"] == "compiled" and r.get("fwdbwd_warmup_s"):
            notes.append(f"compile+warm-up {r.get('fwd_warmup_s', 0) + r['fwdbwd_warmup_s']:.0f} s")
        rows.append([
            r["case"], r["sizes"], r["impl"],
            common.fmt_num(r.get("fwd_ms")), common.fmt_num(r.get("fwdbwd_ms")),
            "" if is_fused else f"{common.fmt_ratio(r['fused_speedup_fwd'])} / "
                                f"{common.fmt_ratio(r['fused_speedup_fwdbwd'])}",
            f"{common.fmt_num(r.get('fwd_peak_mb'))} / {common.fmt_num(r.get('fwdbwd_peak_mb'))}",
            "" if is_fused else common.fmt_num(r["fused_mem_fraction"]),
            f"{common.fmt_ratio(r['x_floor_fwd'])} / {common.fmt_ratio(r['x_floor_fwdbwd'])}"
            if is_fused else "",
            f"{r.get('fwd_runs', '-')} / {r.get('fwdbwd_runs', '-')}",
            "; ".join(notes),
        ])
    return common.markdown_table(headers, rows)


def check_targets(records):
    """Rows of the target table, and the same as dicts for the JSON."""
    by = {(r["case"], r["impl"]): r for r in records}
    rows, checks = [], []
    for case, what, other, threshold in TARGETS:
        f, o = by.get((case, "fused")), by.get((case, other))
        if f is None or (other and o is None):
            continue
        if what == "speedup":
            label = f"fused fwd+bwd >= {threshold:g}x faster than {other}"
            value, ok = o["fused_speedup_fwdbwd"], lambda v: v >= threshold
        elif what == "floor":
            label = f"fused fwd+bwd <= {threshold:g}x the bandwidth floor"
            value, ok = f["x_floor_fwdbwd"], lambda v: v <= threshold
        else:
            label = f"fused fwd+bwd peak memory <= {threshold:g} x {other}'s"
            value, ok = o["fused_mem_fraction"], lambda v: v <= threshold
        status = "n/a" if value is None else "met" if ok(value) else "NOT met"
        shown = common.fmt_ratio(value) if what != "memory" else common.fmt_num(value)
        rows.append([case, label, shown, status])
        checks.append(dict(case=case, target=label, value=value, status=status))
    return common.markdown_table(["case", "target", "measured", "status"], rows), checks


def plot(records, path, impls):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in records))
    by = {c: {r["impl"]: r for r in records if r["case"] == c} for c in cases}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    times = {c: {i: by[c].get(i, {}).get("fwdbwd_ms") for i in impls} for c in cases}
    floors = {c: next(iter(by[c].values()))["floor_fwdbwd_ms"] for c in cases}
    common.grouped_bars(axes[0], cases, impls, times, ylabel="forward+backward time (ms)",
                        markers=floors)
    axes[0].set_title("fwd+bwd time (dashed: bandwidth floor)")
    mems = {c: {i: by[c].get(i, {}).get("fwdbwd_peak_mb") for i in impls} for c in cases}
    common.grouped_bars(axes[1], cases, impls, mems, ylabel="peak memory (MB)")
    axes[1].set_title("fwd+bwd peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK_CASES if args.quick else CASES
    cases = [c for c in args.cases.split(",") if c]
    impls = [i for i in args.impls.split(",") if i]
    for name in cases:
        if name not in sizes:
            sys.exit(f"unknown case {name!r}; choose from {list(sizes)}")
    for name in impls:
        if name not in IMPLS:
            sys.exit(f"unknown implementation {name!r}; choose from {list(IMPLS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()

    start = time.time()
    info = common.machine_info(args.device)
    info["cpu_peak_memory_method"] = (common.cpu_memory_method() if args.device == "cpu"
                                      else "torch.cuda.max_memory_allocated")
    load_start = os.getloadavg()[0]
    bw_mb = min(args.bw_mb, 64) if args.quick else args.bw_mb
    bw = common.measure_bandwidth(args.device, bw_mb)
    print(f"memory bandwidth: {bw['gbs']:.1f} GB/s (add {bw['add_gbs']:.1f}, "
          f"copy {bw['copy_gbs']:.1f}, in place {bw['inplace_gbs']:.1f}; {bw_mb} MB arrays)",
          file=sys.stderr, flush=True)

    records = []
    script = Path(__file__).resolve()
    for case in cases:
        cfg = sizes[case]
        for impl in impls:
            t0 = time.time()
            spec = dict(case=case, cfg=cfg, impl=impl, device=args.device, dtype=args.dtype,
                        repeats=args.repeats, budget=args.budget, threads=args.threads)
            res = measure(script, spec)
            sizes_txt = f"B={cfg['B']} N={cfg['N']} T={cfg['T']} alpha={cfg['alpha']}"
            # 1-min load average after the worker: ~threads when nothing else ran meanwhile
            records.append(dict(case=case, impl=impl, sizes=sizes_txt, **cfg, **res,
                                loadavg=os.getloadavg()[0]))
            print(f"[{time.time() - start:6.0f} s] {case:8s} {impl:9s} "
                  f"fwd {common.fmt_num(res.get('fwd_ms'))} ms, "
                  f"fwd+bwd {common.fmt_num(res.get('fwdbwd_ms'))} ms "
                  f"({time.time() - t0:.0f} s)" + (f"  {res['error']}" if "error" in res else ""),
                  file=sys.stderr, flush=True)

    summarize(records, bw["gbs"], itemsize)
    total_s = time.time() - start
    table = results_table(records)
    targets, checks = check_targets(records)
    threads = args.threads or info["torch_threads"]
    machine = (f"{info.get('gpu', info['cpu'])}, {threads} threads, torch {info['torch']}, "
               f"{args.device}, {args.dtype}; measured memory bandwidth {bw['gbs']:.1f} GB/s "
               f"(add {bw['add_gbs']:.1f}, copy {bw['copy_gbs']:.1f}, in place "
               f"{bw['inplace_gbs']:.1f} GB/s on {bw_mb} MB arrays)")
    if "cache_L3" in info:
        machine += f"; L2 {info.get('cache_L2', '?')}, L3 {info['cache_L3']}"
    # Other processes competing for the cores distort timings (OpenMP waits for every thread).
    info["loadavg_1min_start_end"] = (load_start, os.getloadavg()[0])
    machine += f"; 1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    footnotes = [
        f"Median of up to {args.repeats} runs after a warm-up ('runs' column, fwd / fwd+bwd; "
        f"fewer once a measurement has used {args.budget:g} s). fwd runs under no_grad; "
        "fwd+bwd is loss = out.sum() + hebb_T.sum() and torch.autograd.grad to all inputs.",
        "Modulation fanout (K=1), rule clip 2.0; 'compiled' loops over T calling "
        "torch.compile(reference.plastic_rnn_step, dynamic=False).",
        "Speedup and mem fraction are relative to fused on the same row's case: "
        "speedup = impl time / fused time, mem fraction = fused peak / impl peak.",
        "Peak memory: " + ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
                           "memory allocated before the call." if args.device == "cuda" else
                           "peak resident set size of a fresh worker process during the first "
                           "full-size call, minus its resident size just before (peak reset via "
                           "/proc/self/clear_refs). That worker runs with MALLOC_MMAP_THRESHOLD_="
                           "65536 so that freed tensors leave no resident heap behind: the figure "
                           "is the memory live at the peak; inputs excluded, outputs and "
                           "gradients included. Timings come from a second worker with default "
                           "malloc settings."),
        "Bandwidth floor = bytes the fused op must move / measured bandwidth; bytes = T x "
        "(2 fwd, 7 fwd+bwd) x B*N*N*itemsize for the trace plus the per-step vectors "
        "(rnn_floor_bytes). A ratio < 1 means the trace stayed in cache.",
    ]
    report = "\n".join([
        f"## bench_rnn ({'quick sizes' if args.quick else 'full sizes'})", "", machine, "",
        table, "", "Targets" + (" (they apply to the full sizes, not to --quick)"
                                if args.quick else "") + ":", "", targets, "",
        *[f"- {f}" for f in footnotes], "", f"Whole run: {total_s:.0f} s.",
    ])
    print(report)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if not k.endswith("_all_ms")} for r in records]
    common.write_csv(out / "bench_rnn.csv", flat)
    common.write_json(out / "bench_rnn.json", dict(
        machine=info, bandwidth=bw, args=vars(args), total_s=total_s, results=records,
        targets=checks))
    plot(records, out / "bench_rnn.png", impls)
    print(f"\nwrote {out / 'bench_rnn.csv'}, {out / 'bench_rnn.json'}, {out / 'bench_rnn.png'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
