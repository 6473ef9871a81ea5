"""Shared benchmark harness: timing, peak memory, memory bandwidth, worker subprocesses, output.

Used by bench_rnn.py (and meant for the LSTM benchmark). Plain functions, no framework.

Each (case, implementation) pair runs in a fresh worker subprocess (`run_worker`), so that the
implementations do not share allocator caches, compiled-kernel caches or a peak-memory counter.
"""
import csv
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Device helpers


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


# ----------------------------------------------------------------------------------------------
# Timing


def time_fn(fn, device, repeats=5, budget_s=30.0, warmup=True):
    """Median wall time of `fn()` in ms over up to `repeats` timed runs.

    Runs stop early once they have used `budget_s` seconds (at least one run is always made), so
    slow baselines are not run 5 times for minutes. `warmup=False` when the caller has just made
    a full-size call (that call is the warm-up). Returns the median, all runs and their count.
    """
    if warmup:
        fn()
        sync(device)
    times = []
    while len(times) < repeats and sum(times) < budget_s * 1e3:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    n = len(times)
    return {"ms": statistics.median(times), "min_ms": min(times), "runs": n, "all_ms": times}


# ----------------------------------------------------------------------------------------------
# Peak memory
#
# CUDA: the caching allocator's own counter (max_memory_allocated), i.e. tensor bytes.
# CPU: there is no allocator counter, so we use the kernel's: the process's peak resident set
# size (VmHWM in /proc/self/status), which Linux lets us reset to the current RSS by writing "5"
# to /proc/self/clear_refs. Before each measurement we return freed heap memory to the OS
# (malloc_trim) and reset the high-water mark; the reported peak is VmHWM - VmRSS at the start.
# It counts every page the run touched (tensors, autograd buffers, allocator slack); run the
# process with MALLOC_MMAP_THRESHOLD_=65536 to leave glibc's heap slack out (bench_rnn.measure).
# Without clear_refs (non-Linux) we fall back to ru_maxrss, which cannot be reset and then
# undercounts if something earlier in the process peaked higher.

_LIBC = None


def _malloc_trim():
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kb(field):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory_method():
    return "VmHWM-reset" if _reset_peak_rss() and _proc_status_kb("VmHWM") else "ru_maxrss"


def peak_memory_mb(fn, device):
    """Peak memory in MB used by one call of `fn()` above what was in use before it."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _malloc_trim()
    if _reset_peak_rss() and _proc_status_kb("VmHWM"):
        base = _proc_status_kb("VmRSS")
        fn()
        return (_proc_status_kb("VmHWM") - base) / 2**10
    import resource  # fallback: ru_maxrss is in KB on Linux, bytes on macOS

    scale = 1 if sys.platform == "darwin" else 2**10
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * scale / 2**20


# ----------------------------------------------------------------------------------------------
# Memory bandwidth


def measure_bandwidth(device, mb_per_array=1024, repeats=7):
    """Achievable memory bandwidth in GB/s (1e9 bytes/s), median over `repeats`.

    Three streaming kernels on float32 arrays of `mb_per_array` MB each (choose it well above the
    last-level cache): `c = a + b` (counts 3 arrays: 2 read + 1 written), `c.copy_(a)`
    (2 arrays) and `a *= s` in place (2). All use all intra-op threads. Write-allocate traffic (reading c's lines before
    writing them) is not counted, as is customary, so this is the bandwidth a kernel that reads
    and writes each byte once can expect. Returns the best kernel's figure and each.
    """
    n = mb_per_array * 2**20 // 4
    a = torch.rand(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.empty(n, device=device)
    kernels = {"add": (lambda: torch.add(a, b, out=c), 3), "copy": (lambda: c.copy_(a), 2),
               # In place (read a, write a): no write-allocate reads, as the trace updates.
               "inplace": (lambda: a.mul_(1.0000001), 2)}
    result = {}
    for name, (fn, arrays) in kernels.items():
        fn()  # touch every page / warm up
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        result[f"{name}_gbs"] = arrays * n * 4 / statistics.median(times) / 1e9
    del a, b, c
    result["gbs"] = max(result[f"{name}_gbs"] for name in kernels)
    result["mb_per_array"] = mb_per_array
    return result


# ----------------------------------------------------------------------------------------------
# Worker subprocesses


def run_worker(script, spec, env=None, timeout_s=3600):
    """Runs `python script --worker JSON` in a fresh process (with `env` added to the
    environment); returns the dict it prints as its last stdout line, or {"error": ...} when it
    crashes (e.g. killed for memory) or times out."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
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


def short_error(err, limit=80):
    """First line of an exception message, shortened for a table cell."""
    text = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(err)
    text = text.strip().splitlines()[0] if text.strip() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Output


def markdown_table(headers, rows):
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    lines = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*lines, *(fmt(r) for r in cells)])


def write_csv(path, records):
    """One row per dict; the columns are the union of the keys, in first-seen order."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def fmt_num(x, digits=3):
    """Numbers for tables: 3 significant digits, '-' for missing."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


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
