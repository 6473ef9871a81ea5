"""Measuring the ops: wall time, peak memory, memory bandwidth and the bandwidth floor of the
plastic trace, markdown tables. Shared by the GPU selftest (selftest.py) and the benchmark scripts
(benchmarks/common.py), so that both time and count the same way."""

import ctypes
import statistics
import sys
import time

import torch

from ._checks import is_int


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Timing


def time_fn(fn, device, repeats=5, budget_s=30.0, warmup=True):
    """Median wall time of `fn()` in ms over up to `repeats` timed runs.

    Runs stop early once they have used `budget_s` seconds (at least one run is always made), so
    slow baselines are not run 5 times for minutes. `warmup=False` when the caller has just made
    a full-size call (that call is the warm-up). Returns the median, all runs and their count.
    """
    if not is_int(repeats) or repeats < 1:
        raise ValueError(f"time_fn: repeats must be an int >= 1, got {repeats!r}")
    if warmup:
        fn()
        sync(device)
    times = []
    while not times or (len(times) < repeats and sum(times) < budget_s * 1e3):
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
# process with MALLOC_MMAP_THRESHOLD_=65536 to leave glibc's heap slack out (measure).
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
    (2 arrays) and `a *= s` in place (2). All use all intra-op threads. Write-allocate traffic
    (reading c's lines before writing them) is not counted, as is customary, so this is the
    bandwidth a kernel that reads and writes each byte once can expect. Returns the best
    kernel's figure and each.
    """
    n = mb_per_array * 2**20 // 4
    a = torch.rand(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.empty(n, device=device)
    kernels = {
        "add": (lambda: torch.add(a, b, out=c), 3),
        "copy": (lambda: c.copy_(a), 2),
        # In place (read a, write a): no write-allocate reads, as the trace updates.
        "inplace": (lambda: a.mul_(1.0000001), 2),
    }
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
    result["gbs"] = max(result[f"{name}_gbs"] for name in kernels)
    result["mb_per_array"] = mb_per_array
    return result


def trace_floor_bytes(T, B, N, itemsize, vec_fwd, vec_bwd):
    """Lower bound on the bytes a fused plastic sequence op must move: (forward, forward+backward).

    The trace (B, N, N) is the only large tensor. Model, per step:
      forward:  read H_{t-1}, write H_t (its update and the next step's matvec share one sweep)
                                                                              -> 2 trace passes
      backward: recompute H_t from the segment checkpoint (read + write)     -> 2
                read H_{t-1} for the adjoints, read + write dL/dH            -> 3
    i.e. 2 trace passes per step forward and 7 forward+backward. The per-step vectors are added:
    forward reads or writes `vec_fwd` (B, N) vectors, backward `vec_bwd` more (the caller counts
    them for its op); they are < 1 % at the papers' sizes. Left out on purpose: the (N, N)
    parameters (read once per step per direction, but small enough to stay in cache) and the
    checkpoint writes (T / sqrt(T) traces); leaving them out keeps this a lower bound. Revise
    here if the kernels' data flow changes.
    """
    trace = B * N * N * itemsize
    vec = B * N * itemsize
    fwd = T * (2 * trace + vec_fwd * vec)
    fwd_bwd = T * (7 * trace + (vec_fwd + vec_bwd) * vec)
    return fwd, fwd_bwd


def markdown_table(headers, rows):
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def fmt(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    lines = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*lines, *(fmt(r) for r in cells)])
