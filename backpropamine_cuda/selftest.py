"""Verifies the CUDA kernels on a machine with a GPU, in one command:

    python -m backpropamine_cuda.selftest                 # accuracy, speed, tests
    python -m backpropamine_cuda.selftest --quick         # tiny sizes: a minute
    python -m backpropamine_cuda.selftest --benchmarks    # ... and benchmarks/bench_{rnn,lstm}.py

(benchmarks/gpu_check.sh runs this, the compute-sanitizer tools and the build in one go, each
part under a time limit, and writes the report under benchmarks/results/gpu/.)

1. Accuracy: the fused ops on the GPU and on the CPU against the eager reference in float64 on
   the GPU, at the papers' sizes (maze: the RNN op at B=30 N=100 T=200, alpha full; PTB: the RNN
   and the LSTM op at B=6 N=1149 T=70, alpha neuron; modulation fanout K=1, rule clip 2), forward
   outputs and the gradients of every input, in float32 and float64. The float32 reference's own
   error is the yardstick of the float32 rows. The fused ops on the GPU run twice: as chosen
   ("auto": the RNN op's whole-sequence kernels where a sample's trace fits in a block's shared
   memory, i.e. the maze; the per-step kernels elsewhere) and with
   BACKPROPAMINE_SEQUENCE_PATH=steps (the per-step kernels everywhere).
2. Speed: forward and forward+backward of the fused ops (the RNN op also forced onto the
   per-step kernels) against the eager reference on the same GPU and against the HBM bandwidth
   floor (the trace bytes the op must move / the measured memory bandwidth, both as the
   benchmarks count them: backpropamine_cuda/measure.py);
   GPU operations per step; peak memory; the 3-layer PTB stack at batch 20 and 80.
3. Tests: `pytest python_tests -k "cuda and not emulat"` (the tests on the GPU), when this
   package runs from a source checkout.
4. --benchmarks: benchmarks/bench_rnn.py and bench_lstm.py on the GPU (benchmarks/results/cuda/,
   or results/cuda-quick/ with --quick).

Prints a markdown report, each section as soon as it is done. Exit status: 0 all checks passed,
1 a test or an accuracy check failed (timings are reported, not judged), 2 no CUDA device (only
with --require-gpu; without it, no device is exit 0 after saying so). `--device cpu` runs steps 1
and 2 for the CPU kernels and the emulated CUDA kernels against the reference: a check of this
script on machines without a GPU (use --quick; the emulator is slow).
"""

import argparse
import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import backpropamine_cuda as bp
from backpropamine_cuda import _extension, reference
from backpropamine_cuda.measure import (
    markdown_table,
    measure_bandwidth,
    peak_memory_mb,
    sync,
    time_fn,
    trace_floor_bytes,
)

RULE, CLIP = "clip", 2.0
PACKAGE_PARENT = Path(bp.__file__).resolve().parent.parent
# Normalised error (max |a - e| / max |e|) allowed in float64, and in float32: FLOAT32_FACTOR
# times that of the float32 reference, or FLOAT32_FLOOR (the test suite's float32 tolerance),
# whichever is larger.
FLOAT64_LIMIT, FLOAT32_FACTOR, FLOAT32_FLOOR = 1e-9, 10.0, 1e-4
# The targets of the PTB layer's sequence op on a GPU, checked at B=6 N=1149 T=70.
PTB_TARGETS = {"floor": 1.5, "speedup": 20.0}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: str  # "rnn" or "lstm"
    B: int
    N: int
    T: int
    alpha: str  # "full" (N, N) or "neuron" (N,)

    def sizes(self):
        return f"B={self.B} N={self.N} T={self.T} alpha={self.alpha}"


CASES = [
    Case("maze", "rnn", 30, 100, 200, "full"),
    Case("ptb-rnn", "rnn", 6, 1149, 70, "neuron"),
    Case("ptb-lstm", "lstm", 6, 1149, 70, "neuron"),
]
QUICK_CASES = [
    Case("maze", "rnn", 4, 20, 12, "full"),
    Case("ptb-rnn", "rnn", 2, 33, 6, "neuron"),
    Case("ptb-lstm", "lstm", 2, 33, 6, "neuron"),
]
# The Backpropamine PTB stack (embedding 400 -> 1149 -> 1149 -> 400) at batch 20 and 80: it
# must fit in GPU memory with room to spare.
STACKS = [dict(B=B, T=70, widths=(400, 1149, 1149, 400)) for B in (20, 80)]
QUICK_STACKS = [dict(B=3, T=5, widths=(16, 33, 33, 16))]
OUTPUTS = {"rnn": ("out", "hebb_T", "elig_T", "m"), "lstm": ("out", "c_T", "hebb_T", "elig_T", "m")}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# The RNN sequence op's path: "auto" takes the whole-sequence kernels (one launch per sequence
# forward, one backward) where a sample's trace fits in a block's shared memory (the maze), the
# per-step kernels elsewhere; "steps" forces the per-step ones, so that both are checked.
PATH_VARIABLE = "BACKPROPAMINE_SEQUENCE_PATH"


@contextlib.contextmanager
def sequence_path(path):
    """PATH_VARIABLE set to `path` for the calls inside (forward and backward)."""
    old = os.environ.get(PATH_VARIABLE)
    os.environ[PATH_VARIABLE] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ[PATH_VARIABLE]
        else:
            os.environ[PATH_VARIABLE] = old


# ----------------------------------------------------------------------------------------------
# Inputs and runs


def make_inputs(case, seed=0):
    """Keyword arguments of the case's sequence op, in float64 on the CPU, with values exact in
    float32 (so every dtype sees the same inputs), and one cotangent per output."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen)).double()

    B, N, T = case.B, case.N, case.T
    # Recurrent weights small enough that the RNN's gradients do not explode over T = 200 steps
    # (there float32 rounding alone would give errors of 1 %); the trace saturates at the clip.
    s = 0.5 / math.sqrt(N)
    d = dict(
        x=randn(T, B, 4 * N if case.op == "lstm" else N), h=torch.tanh(randn(B, N).float()).double()
    )
    if case.op == "lstm":
        d["c"] = randn(B, N, scale=0.5)
    d.update(hebb=randn(B, N, N, scale=0.5), elig=None)
    if case.op == "lstm":
        d.update(h2g_weight=randn(3 * N, N, scale=s), h2g_bias=randn(3 * N, scale=0.1))
    d.update(
        w=randn(N, N, scale=s),
        alpha=randn(*((N, N) if case.alpha == "full" else (N,)), scale=s),
        eta=None,
        elig_rate=None,
        h2mod_weight=randn(1, N, scale=s),
        h2mod_bias=randn(1, scale=0.1),
        fanout_weight=randn(N, 1, scale=0.5),
        fanout_bias=randn(N, scale=0.1),
    )
    out_shapes = {"out": (T, B, N), "c_T": (B, N), "hebb_T": (B, N, N), "m": (T, B, 1)}
    cotangents = {k: randn(*shape) for k, shape in out_shapes.items() if k in OUTPUTS[case.op]}
    return d, cotangents


def to_leaves(inputs, device, dtype):
    return {
        k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in inputs.items()
    }


def sequence_op(ops, case):
    return ops.plastic_lstm_sequence if case.op == "lstm" else ops.plastic_rnn_sequence


def outputs_and_grads(ops, case, inputs, cotangents, device, dtype):
    """The op's outputs and the gradients of every input of the loss sum(output * cotangent),
    as float64 CPU tensors keyed by name."""
    leaves = to_leaves(inputs, device, dtype)
    outs = dict(zip(OUTPUTS[case.op], sequence_op(ops, case)(**leaves, rule=RULE, clip=CLIP)))
    loss = sum((outs[k] * c.to(device, dtype)).sum() for k, c in cotangents.items())
    given = {k: v for k, v in leaves.items() if v is not None}
    grads = torch.autograd.grad(loss, list(given.values()))
    result = {k: v.detach().to("cpu", torch.float64) for k, v in outs.items() if v is not None}
    result.update({f"grad {k}": g.to("cpu", torch.float64) for k, g in zip(given, grads)})
    return result


def errors(result, truth):
    """{"fwd": ..., "grad": ...}: (max abs error, normalised error max|a-e| / max|e|, name of the
    tensor with the largest normalised error) over the outputs and over the gradients. NaN, a
    missing tensor or a wrong shape count as an infinite error."""
    worst = {}
    for name, expected in truth.items():
        got = result.get(name)
        if got is None or got.shape != expected.shape:
            err = math.inf
        else:
            err = torch.nan_to_num((got - expected).abs(), nan=math.inf).max().item()
        rel = err / max(torch.nan_to_num(expected.abs()).max().item(), 1e-300)
        kind = "grad" if name.startswith("grad ") else "fwd"
        max_err, max_rel, max_name = worst.get(kind, (0.0, -1.0, ""))
        worst[kind] = (max(max_err, err), *((rel, name) if rel > max_rel else (max_rel, max_name)))
    return worst


# ----------------------------------------------------------------------------------------------
# 1. Accuracy


def attempt(what, fn):
    """(fn(), None), or (None, the error) after logging it: one failing implementation (an
    exception, out of memory, a CUDA error) must not hide the results of the others."""
    try:
        return fn(), None
    except Exception as err:
        log(f"{what}: {type(err).__name__}: {err}")
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {first[:80]}"


def accuracy(cases, impls, device):
    """Rows of the accuracy table and whether every row passed. impls: {name: (ops, device,
    sequence path)}."""
    rows, ok = [], True
    for case in cases:
        inputs, cotangents = make_inputs(case)
        log(f"accuracy: {case.name} ({case.sizes()}): reference float64 on {device}")
        truth, error = attempt(
            case.name,
            lambda: outputs_and_grads(reference, case, inputs, cotangents, device, torch.float64),
        )
        if truth is None:
            rows.append(failed_row(case, "float64", f"reference ({device.type})", error))
            ok = False
            continue
        for dtype in (torch.float32, torch.float64):
            dname = str(dtype).removeprefix("torch.")
            limit = FLOAT64_LIMIT
            results = {}
            if dtype == torch.float32:
                log(f"accuracy: {case.name} {dname}: reference on {device}")
                base, error = attempt(
                    case.name,
                    lambda: outputs_and_grads(reference, case, inputs, cotangents, device, dtype),
                )
                if base is None:
                    rows.append(failed_row(case, dname, f"reference ({device.type})", error))
                    ok = False
                    continue
                base = errors(base, truth)
                limit = max(FLOAT32_FLOOR, FLOAT32_FACTOR * max(e[1] for e in base.values()))
                rows.append(
                    row(
                        case,
                        dname,
                        f"reference ({device.type})",
                        "reference float64",
                        base,
                        "baseline",
                    )
                )
            for name, (ops, dev, path) in impls.items():
                log(f"accuracy: {case.name} {dname}: {name}")
                with sequence_path(path):
                    result, error = attempt(
                        f"{case.name} {name}",
                        lambda: outputs_and_grads(ops, case, inputs, cotangents, dev, dtype),
                    )
                if result is None:
                    rows.append(failed_row(case, dname, name, error))
                    ok = False
                    continue
                results[name] = result
                err = errors(result, truth)
                passed = all(e[1] <= limit for e in err.values())
                ok &= passed
                rows.append(
                    row(
                        case,
                        dname,
                        name,
                        "reference float64",
                        err,
                        f"{'ok' if passed else 'FAILED'} (<= {limit:.1e})",
                    )
                )
            # The first fused implementation against the others.
            (a, ra), *others = results.items()
            for b, rb in others:
                rows.append(row(case, dname, a, b, errors(ra, rb), "(summation order)"))
    return rows, ok


def failed_row(case, dtype, impl, error):
    return [case.name, case.sizes(), dtype, impl, "", "-", "-", "-", "-", "", f"FAILED: {error}"]


def row(case, dtype, impl, against, err, status):
    fmt = "{:.2e}".format
    return [
        case.name,
        case.sizes(),
        dtype,
        impl,
        against,
        fmt(err["fwd"][0]),
        fmt(err["fwd"][1]),
        fmt(err["grad"][0]),
        fmt(err["grad"][1]),
        max(err.values(), key=lambda e: e[1])[2],
        status,
    ]


ACCURACY_HEADERS = [
    "case",
    "sizes",
    "dtype",
    "impl",
    "against",
    "fwd max abs",
    "fwd max rel",
    "grad max abs",
    "grad max rel",
    "worst tensor",
    "status",
]


# ----------------------------------------------------------------------------------------------
# 2. Speed


def device_ops(fn, device):
    """The operations one call of fn puts on the GPU (kernels, copies, memsets), as the profiler
    counts them; None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def timed(call, leaves, device, repeats):
    """{"fwd": ms, "fwdbwd": ms, "peak_mb": MB of forward+backward, "launches": (GPU operations
    forward, forward+backward)} of call(leaves)."""
    given = [v for v in leaves.values() if v is not None]

    def fwd():
        with torch.no_grad():
            call(leaves)

    def fwdbwd():
        outs = call(leaves)
        torch.autograd.grad(sum(o.sum() for o in outs if o is not None), given)

    return dict(
        fwd=time_fn(fwd, device, repeats)["ms"],
        fwdbwd=time_fn(fwdbwd, device, repeats)["ms"],
        peak_mb=peak_memory_mb(fwdbwd, device),
        launches=(device_ops(fwd, device), device_ops(fwdbwd, device)),
    )


def speed(cases, stacks, fused_ops, device, repeats, bandwidth):
    """Rows of the speed table, and of the issue's targets (CUDA, full sizes); float32."""
    rows, target_rows = [], []
    for case in cases:
        inputs, _ = make_inputs(case)
        leaves = to_leaves(inputs, device, torch.float32)
        # The trace's bytes alone (no per-step vectors: < 1 % here), over the bandwidth, in ms.
        floor_bytes = trace_floor_bytes(case.T, case.B, case.N, 4, vec_fwd=0, vec_bwd=0)
        floor = {m: b / (bandwidth * 1e9) * 1e3 for m, b in zip(("fwd", "fwdbwd"), floor_bytes)}
        res = {}
        impls = [("fused", fused_ops, "auto"), ("eager", reference, "auto")]
        if case.op == "rnn":
            impls.insert(1, ("fused per-step", fused_ops, "steps"))
        for impl, ops, path in impls:
            log(f"speed: {case.name} {impl}")
            op = sequence_op(ops, case)
            with sequence_path(path):
                res[impl] = attempt(
                    f"{case.name} {impl}",
                    lambda: timed(
                        # F821: ruff reads `del leaves` below as ending the closure's variable.
                        lambda kw: op(**kw, rule=RULE, clip=CLIP),
                        leaves,  # noqa: F821
                        device,
                        repeats,
                    ),
                )
        del leaves
        (f, f_error), (e, e_error) = res["fused"], res["eager"]
        floor_cell = f"{floor['fwd']:.3g} / {floor['fwdbwd']:.3g}"
        rows.append(
            [
                case.name,
                case.sizes(),
                "fused",
                *ms_cells(f, f_error),
                ratio_cells(e, f),
                ratio_cells(f, floor),
                floor_cell,
                launch_cells(f, case.T),
            ]
        )
        if "fused per-step" in res:
            p, p_error = res["fused per-step"]
            rows.append(
                [
                    case.name,
                    case.sizes(),
                    "fused per-step",
                    *ms_cells(p, p_error),
                    ratio_cells(e, p),
                    ratio_cells(p, floor),
                    floor_cell,
                    launch_cells(p, case.T),
                ]
            )
        rows.append(
            [
                case.name,
                case.sizes(),
                "eager",
                *ms_cells(e, e_error),
                "",
                "",
                floor_cell,
                launch_cells(e, case.T),
            ]
        )
        if (case.B, case.N, case.T) == (6, 1149, 70) and device.type == "cuda" and f and e:
            x_floor, x_eager = f["fwdbwd"] / floor["fwdbwd"], e["fwdbwd"] / f["fwdbwd"]
            target_rows += [
                [
                    case.name,
                    f"fused fwd+bwd <= {PTB_TARGETS['floor']:g}x the HBM floor",
                    f"{x_floor:.2f}x",
                    met(x_floor <= PTB_TARGETS["floor"]),
                ],
                [
                    case.name,
                    f"fused fwd+bwd >= {PTB_TARGETS['speedup']:g}x faster than eager",
                    f"{x_eager:.1f}x",
                    met(x_eager >= PTB_TARGETS["speedup"]),
                ],
            ]
    for stack in stacks:
        log(f"speed: PTB stack at B={stack['B']}, fused")
        r, error = attempt("stack", lambda: stack_run(stack, fused_ops, device, repeats))
        name = f"stack B={stack['B']} T={stack['T']} widths={'-'.join(map(str, stack['widths']))}"
        rows.append(
            [
                "ptb-stack",
                name,
                "fused",
                *ms_cells(r, error),
                "",
                "",
                "",
                launch_cells(r, stack["T"]),
            ]
        )
        if device.type == "cuda" and r:
            total = torch.cuda.get_device_properties(device).total_memory / 2**20
            target_rows.append(
                [
                    f"ptb-stack B={stack['B']}",
                    "fused fwd+bwd fits in GPU memory with room to spare (peak < half)",
                    f"peak {r['peak_mb'] / 2**10:.1f} of {total / 2**10:.0f} GiB",
                    met(r["peak_mb"] < 0.5 * total),
                ]
            )
    return rows, target_rows


def stack_run(cfg, ops, device, repeats):
    """Times the plastic LSTM stack (each layer with its input projection i2g)."""
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape, scale):
        return (scale * torch.randn(shape, generator=gen)).to(device).requires_grad_()

    B, T, widths = cfg["B"], cfg["T"], cfg["widths"]
    layers = []
    for P, N in zip(widths[:-1], widths[1:]):
        s = 1 / math.sqrt(N)
        layers.append(
            dict(
                i2g_weight=leaf(4 * N, P, scale=1 / math.sqrt(P)),
                i2g_bias=leaf(4 * N, scale=0.1),
                h=leaf(B, N, scale=0.5),
                c=leaf(B, N, scale=0.5),
                hebb=leaf(B, N, N, scale=0.5),
                h2g_weight=leaf(3 * N, N, scale=s),
                h2g_bias=leaf(3 * N, scale=0.1),
                w=leaf(N, N, scale=s),
                alpha=leaf(N, scale=s),
                h2mod_weight=leaf(1, N, scale=s),
                h2mod_bias=leaf(1, scale=0.1),
                fanout_weight=leaf(N, 1, scale=0.5),
                fanout_bias=leaf(N, scale=0.1),
            )
        )
    leaves = {f"{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.items()}
    leaves["x"] = leaf(T, B, widths[0], scale=1.0)

    def call(_):
        x, outs = leaves["x"], []
        for p in layers:
            kw = {k: v for k, v in p.items() if not k.startswith("i2g")}
            out = ops.plastic_lstm_sequence(
                F.linear(x, p["i2g_weight"], p["i2g_bias"]),
                **kw,
                elig=None,
                eta=None,
                elig_rate=None,
                rule=RULE,
                clip=CLIP,
            )
            x = out[0]
            outs += [o for o in out[1:] if o is not None]
        return [x, *outs]

    return timed(call, leaves, device, repeats)


def ms_cells(r, error):
    if r is None:
        return [f"FAILED: {error}", "", ""]
    mb = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
    return [f"{r['fwd']:.3g}", f"{r['fwdbwd']:.3g}", mb]


def ratio_cells(num, den):
    if not num or not den:
        return ""
    return f"{num['fwd'] / den['fwd']:.2f}x / {num['fwdbwd'] / den['fwdbwd']:.2f}x"


def launch_cells(r, T):
    if not r or r["launches"][0] is None:
        return ""
    fwd, fwdbwd = r["launches"]
    return f"{fwd} / {fwdbwd} ({fwd / T:.3g} / {fwdbwd / T:.3g} per step)"


def met(ok):
    return "met" if ok else "NOT met"


SPEED_HEADERS = [
    "case",
    "sizes",
    "impl",
    "fwd ms",
    "fwd+bwd ms",
    "peak MB fwd+bwd",
    "speedup vs eager fwd / fwd+bwd",
    "x floor fwd / fwd+bwd",
    "floor ms fwd / fwd+bwd",
    "GPU ops fwd / fwd+bwd",
]


# ----------------------------------------------------------------------------------------------
# 3. and 4.: the test suite and the benchmarks, in subprocesses on this same package


def run_logged(cmd, cwd):
    """Runs cmd with this package first on the path, echoing its output to stderr; returns
    (exit status, last output line)."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(PACKAGE_PARENT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    )
    log(f"$ {' '.join(map(str, cmd))}")
    last = ""
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            print(line, end="", file=sys.stderr, flush=True)
            last = line.strip() or last
    return proc.returncode, last


def run_tests(k):
    tests = PACKAGE_PARENT / "python_tests"
    if not tests.is_dir():
        return True, "skipped: not a source checkout (no python_tests next to the package)"
    # From inside python_tests, so that the checkout root is not on the path ahead of
    # PACKAGE_PARENT (they are the same folder when this package is the checkout's).
    rc, last = run_logged([sys.executable, "-m", "pytest", str(tests), "-q", "-k", k], tests)
    return rc == 0, f"{'passed' if rc == 0 else f'FAILED (exit {rc})'}: {last}"


def run_benchmarks(device, quick):
    out = PACKAGE_PARENT / "benchmarks" / "results" / (device.type + ("-quick" if quick else ""))
    lines = []
    for name in ("bench_rnn.py", "bench_lstm.py"):
        script = PACKAGE_PARENT / "benchmarks" / name
        if not script.is_file():
            lines.append(f"- {name}: skipped (no {script})")
            continue
        rc, _ = run_logged(
            [
                sys.executable,
                str(script),
                "--device",
                device.type,
                "--out",
                str(out),
                *(["--quick"] if quick else []),
            ],
            PACKAGE_PARENT,
        )
        lines.append(f"- {name}: exit {rc}; results in {out}")
    return lines


# ----------------------------------------------------------------------------------------------
# Driver


def emit(*lines):
    print("\n".join(lines), flush=True)


def has_kernels(namespace, dispatch_key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{namespace}::plastic_rnn_sequence", dispatch_key
    )


def describe(device):
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (
            f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        )
    return f"CPU, {torch.get_num_threads()} threads"


def _at_least_one(text):
    """--repeats: an int >= 1 (argparse names the flag in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: the CPU and emulated CUDA kernels (a check of this script)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes")
    p.add_argument("--require-gpu", action="store_true", help="exit 2 when no GPU is visible")
    p.add_argument("--benchmarks", action="store_true", help="also run the benchmark scripts")
    p.add_argument("--no-tests", action="store_true", help="skip the test suite")
    p.add_argument("--no-speed", action="store_true", help="skip the timings")
    # The tests on the GPU have "cuda" in their ids; those of the CPU emulator, which every CPU
    # machine runs already, "emulated_cuda" or test_cuda_emulation.
    p.add_argument(
        "--pytest-k",
        default="cuda and not emulat",
        help="tests to run (pytest -k expression; default: %(default)r)",
    )
    p.add_argument(
        "--repeats", type=_at_least_one, default=5, help="timed runs per measurement (median)"
    )
    return p.parse_args()


def main():
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"backpropamine_cuda selftest: no CUDA device visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'no'}); nothing to verify. On a machine with "
            "a GPU, install with a CUDA torch and nvcc and run this again; `--device cpu "
            "--quick` checks this script on the CPU."
        )
        return 2 if args.require_gpu else 0
    device = torch.device(args.device)
    how = _extension.load()
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not has_kernels("backpropamine", key):
        print(
            f"backpropamine_cuda selftest: the extension ({how}, from "
            f"{Path(bp.__file__).parent}) has no {key} kernels. Reinstall with a CUDA build of "
            "torch and nvcc on PATH or CUDA_HOME (README, Install)."
        )
        return 1
    started = time.time()
    cases, stacks = (QUICK_CASES, QUICK_STACKS) if args.quick else (CASES, STACKS)
    bandwidth = measure_bandwidth(device, 64 if args.quick else 1024)["gbs"]
    # Each section is printed when it is done, so that a run stopped at a time limit still
    # reports what it finished.
    emit(
        f"## backpropamine_cuda selftest ({'quick' if args.quick else 'full'} sizes)",
        "",
        f"{describe(device)}; torch {torch.__version__}; extension {how} from "
        f"{Path(bp.__file__).parent}; measured memory bandwidth {bandwidth:.0f} GB/s.",
    )
    ok = True

    if device.type == "cuda":
        impls = {
            "fused cuda": (bp.fused, device, "auto"),
            "fused cuda per-step": (bp.fused, device, "steps"),
            "fused cpu": (bp.fused, torch.device("cpu"), "auto"),
        }
    else:
        impls = {"fused cpu": (bp.fused, device, "auto")}
        if hasattr(bp.fused, "emulated_cuda") and has_kernels("backpropamine_emulated", "CPU"):
            impls["emulated cuda"] = (bp.fused.emulated_cuda, device, "auto")
            impls["emulated cuda per-step"] = (bp.fused.emulated_cuda, device, "steps")
    acc_rows, acc_ok = accuracy(cases, impls, device)
    ok &= acc_ok
    emit(
        "",
        "### Accuracy",
        "",
        markdown_table(ACCURACY_HEADERS, acc_rows),
        "",
        "Errors against the eager reference in float64 on the same inputs; rel = max |a - e| / "
        "max |e| per tensor, the worst tensor named. Loss: sum of every output times a fixed "
        "random tensor; gradients of every input. The float32 limit is "
        f"{FLOAT32_FACTOR:g}x the float32 reference's error (at least {FLOAT32_FLOOR:g}).",
    )

    if args.no_speed:
        emit("", "### Speed: skipped (--no-speed)")
    else:
        speed_rows, target_rows = speed(cases, stacks, bp.fused, device, args.repeats, bandwidth)
        emit(
            "",
            "### Speed (float32)",
            "",
            markdown_table(SPEED_HEADERS, speed_rows),
            "",
            f"Median of {args.repeats} runs after a warm-up; fwd under no_grad, fwd+bwd = loss "
            "sum of the outputs and autograd.grad to every input. Floor = the trace bytes the op "
            "must move (2 passes over the B x N x N trace per step forward, 7 forward+backward: "
            "measure.trace_floor_bytes) / the measured bandwidth. GPU "
            "ops: kernels, copies and memsets of one call (torch.profiler), and per step (/ T).",
        )
        if target_rows:
            emit("", markdown_table(["case", "target", "measured", "status"], target_rows))

    if args.no_tests:
        emit("", "Tests: skipped (--no-tests)")
    else:
        passed, tests = run_tests(args.pytest_k)
        ok &= passed
        emit("", f"Tests (pytest -k '{args.pytest_k}'): {tests}")
    if args.benchmarks:
        emit("", "### Benchmarks", "", *run_benchmarks(device, args.quick))
    emit("", f"Selftest {'PASSED' if ok else 'FAILED'} in {time.time() - started:.0f} s.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
