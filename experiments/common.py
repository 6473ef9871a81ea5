"""What the experiment scripts and the benchmarks share: checkpoints written atomically with the
random generators' states (so that a resumed run continues exactly), CSV logs that a resumed run
restarts at its checkpoint, command lines with presets and checked numbers, the training loop,
progress displays fit for terminals and log files, optional dependencies, plots, and sizing
networks by parameter count. Not part of the package (nothing in backpropamine_cuda needs it).

    from experiments.common import RunCheckpoint, resume_csv, append_csv

A script run as a program (python experiments/ptb/main.py) first appends the repository root to
sys.path, then imports this module and its own folder's modules as packages
(experiments.ptb.data); the tests have the root there from pytest's `pythonpath`
(pyproject.toml) and import the scripts the same way (from experiments.ptb import main).
"""

import argparse
import csv
import importlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

# The optional dependencies of the scripts: the package's extras of the same names
# (pyproject.toml), and who needs them.
EXTRAS = {"experiments": ("tqdm", "matplotlib"), "bench": ("matplotlib",)}
EXTRA_USERS = {"experiments": "the experiment scripts", "bench": "the benchmarks"}


def optional_import(module, extra="experiments"):
    """The module `module` of the optional dependencies EXTRAS[extra]; when it is missing, an
    exit with one line saying what to install (not a traceback)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SystemExit(
            f"{EXTRA_USERS[extra]} need {module.split('.')[0]}: pip install "
            f"{' '.join(EXTRAS[extra])} (the package's [{extra}] extra)"
        ) from error


def require_extras(extra="experiments"):
    """Exits with optional_import's one line unless every module of EXTRAS[extra] imports: a
    script checks at its start rather than fail when it plots, after hours of training."""
    for module in EXTRAS[extra]:
        optional_import(module, extra)


class DataError(ValueError):
    """A data file that cannot be used; the message names it."""


@contextmanager
def reading(path):
    """Inside: any error reading `path` (a damaged, truncated or binary file raises numpy's,
    zipfile's, pickle's or the codecs' own kinds) becomes a DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from error


def write_atomically(path, write, mode="wb", **open_args):
    """Calls write(f) on a temporary file opened with `mode`, then renames it to `path`: an
    interrupted write leaves the old file. A failed write (a full disk) removes the temporary
    file and exits naming `path`."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **open_args) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(
            f"cannot write {path}: {error.strerror or error} (the file there, if any, is unchanged)"
        ) from error


def atomic_save(obj, path):
    """torch.save through write_atomically. To a file object: a failed write raises OSError,
    not torch's RuntimeError about its zip writer."""
    write_atomically(path, lambda f: torch.save(obj, f))


def rng_states():
    """Python's, NumPy's (its key array as a tensor: weights_only loading accepts tensors, not
    arrays), torch's and CUDA's random generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(
        python=random.getstate(),
        torch=torch.get_rng_state(),
        numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def set_rng_states(states):
    """Restores what rng_states returned."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def read_csv_rows(path):
    """The rows (dicts) of the CSV file at `path`, none when there is no file."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, fields, rows):
    """Writes the CSV file at `path` (header and rows) through write_atomically, so that a kill
    while writing leaves the old file."""

    def write(f):
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    write_atomically(path, write, "w", newline="")


def start_csv(path, fields, keep=lambda row: False):
    """(Re)writes the CSV log at `path` with its header and the existing rows for which
    keep(row) is true (e.g. the rows of other runs sharing the file)."""
    write_csv(path, fields, [r for r in read_csv_rows(path) if keep(r)])


def resume_csv(path, fields, column, done):
    """(Re)starts the CSV log at `path` of a run that continues after `done`, the value of
    `column` (its iteration or epoch) in its checkpoint; done = 0: a fresh run, no rows. Keeps
    the rows with 0 <= column <= done, one per value (the last written), in order. Rows are
    logged before the checkpoint that follows them, so the rows past `done` are those the
    resumed run logs again: a kill between a row and the next checkpoint, or two processes
    appending to the same log, leave no duplicate rows. A row cut short by a kill (fields
    missing) is past every checkpoint and goes too. A log with other columns (another script's,
    or this script's from a version that logged others) exits naming it: its rows would be
    dropped or would not fit."""
    if done > 0 and path.is_file():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(fields):
            raise SystemExit(
                f"--resume: the log {path} has the columns {header}, where this script logs "
                f"{list(fields)}; move it away to resume with a new log"
            )
    kept = {}
    for row in read_csv_rows(path):
        complete = None not in row.values() and None not in row  # no missing or extra fields
        if done > 0 and complete and 0 <= int(row[column]) <= done:
            kept[int(row[column])] = row
    write_csv(path, fields, [kept[key] for key in sorted(kept)])


def append_csv(path, fields, rows):
    """Appends dict rows to the CSV log at `path` (started by start_csv); returns all rows."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerows(rows)
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_checkpoint(path, keys):
    """The dict torch saved at `path`, which must hold `keys`. A file torch cannot read, or
    another kind of file, exits naming it."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # RNG states: CPU
    except Exception as error:  # torch raises several kinds for a damaged file
        raise SystemExit(f"--resume: cannot read the checkpoint {path}: {error}") from error
    missing = [k for k in keys if k not in saved] if isinstance(saved, dict) else list(keys)
    if missing:
        raise SystemExit(
            f"--resume: cannot read the checkpoint {path}: not a checkpoint of this "
            f"script (no {', '.join(missing)})"
        )
    return saved


def load_checkpoint(path, args, may_change, keys=(), flags=None):
    """The checkpoint dict at `path`, which holds `keys`, the run's options as "args" (vars of
    its argparse namespace) and rng_states() as "rng" (read_checkpoint; a file torch cannot
    read exits naming it; "args" and "rng" are looked for first unless `keys` places them);
    restores the random states. Every script's policy: the resumed run must have the
    checkpoint's value of every option but those in `may_change` (where to write, how long to
    train, on which device, ...), so that an option added later is checked until it is declared
    free to change. A mismatch exits with a message naming each option by its flag (--option
    with hyphens, or flags[option] where the flag is spelt otherwise), its value there and
    here."""
    saved = read_checkpoint(path, (*(k for k in ("args", "rng") if k not in keys), *keys))
    flags = flags or {}
    differ = [
        f"{flags.get(k, '--' + k.replace('_', '-'))} {v} there, {getattr(args, k, None)} here"
        for k, v in saved["args"].items()
        if k not in may_change and v != getattr(args, k, None)
    ]
    if differ:
        raise SystemExit(f"--resume: {path} was written with other options: " + "; ".join(differ))
    set_rng_states(saved["rng"])
    return saved


class RunCheckpoint:
    """The checkpoint of one training run at `path`: the model's and the optimizer's state, the
    data generator's (a torch.Generator that draws the episodes), every random state, the
    iteration reached and the run's options (`args`, an argparse namespace with `iterations`).

        checkpoint = RunCheckpoint(path, args, may_change, model, optimizer, generator)
        done = checkpoint.resume() if args.resume else 0   # iterations already trained
        ... checkpoint.save(iteration)
    """

    def __init__(self, path, args, may_change, model, optimizer, generator):
        self.path, self.args, self.may_change = path, args, may_change
        self.model, self.optimizer, self.generator = model, optimizer, generator

    def save(self, iteration):
        atomic_save(
            dict(
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                generator=self.generator.get_state(),
                rng=rng_states(),
                iteration=iteration,
                args=vars(self.args),
            ),
            self.path,
        )

    def resume(self):
        """Restores the run from the checkpoint (load_checkpoint's option check) and returns its
        iteration; 0 when there is no checkpoint yet. A checkpoint past --iterations exits."""
        if not self.path.is_file():
            return 0
        saved = load_checkpoint(
            self.path,
            self.args,
            self.may_change,
            keys=("model", "optimizer", "generator", "iteration"),
        )
        if saved["iteration"] > self.args.iterations:
            raise SystemExit(
                f"--resume: {self.path} is at iteration {saved['iteration']}, past "
                f"--iterations {self.args.iterations}"
            )
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        return saved["iteration"]


def read_csv_columns(path):
    """{column: list of floats} of a CSV log (for plots)."""
    rows = read_csv_rows(path)
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def preset_parser(description, presets):
    """An ArgumentParser (defaults shown in --help) with --preset: the name of one of `presets`
    ({name: {dest: value}}, the first the default), whose values parse_with_preset makes the
    defaults of the other flags."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=tuple(presets),
        default=next(iter(presets)),
        help="defaults of the flags below: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
            for name, values in presets.items()
        ),
    )
    return parser


def parse_with_preset(parser, presets, argv=None):
    """Parses the command line with the defaults of the chosen --preset ({name: {dest: value}}),
    flags given explicitly still winning; checks that checkpoints (--save-every) fall on CSV
    rows (--log-every) where the parser has both."""
    args = parser.parse_args(argv)
    parser.set_defaults(**presets[args.preset])
    args = parser.parse_args(argv)
    if (
        hasattr(args, "save_every")
        and hasattr(args, "log_every")
        and (args.save_every % args.log_every)
    ):  # a checkpoint must not cut a CSV row in two
        parser.error(
            f"--save-every must be a multiple of --log-every ({args.log_every}), got "
            f"{args.save_every}"
        )
    return args


def number(kind, minimum=None, strict=False, maximum=None):
    """An argparse type: a finite `kind` (int or float) that is >= minimum (> minimum when
    strict) and <= maximum, where given."""

    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if minimum is not None and (value < minimum or (strict and value == minimum)):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum}, got {text}"
            )
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def torch_device(text):
    """An argparse type: a torch device (cpu, cuda, cuda:1, ...), kept as its text;
    require_device checks that this machine has it."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"not a torch device: {text!r} (cpu, cuda, cuda:1, ...)"
        ) from None
    return text


def require_device(device):
    """Exits naming --device when torch cannot use `device` here: a CUDA device without one
    visible (or with a CPU-only torch), a GPU index past those visible, a device type torch
    was built without."""
    device = torch.device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) < count:
            return
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SystemExit(
            f"--device {device}: torch {torch.__version__} ({build}) sees {count} CUDA device(s)"
        )
    try:
        torch.empty(0, device=device)
    except Exception as error:  # torch raises several kinds for a device it lacks
        raise SystemExit(f"--device {device}: torch cannot use it here: {error}") from None


# --seed: the range NumPy's seeding takes (torch's is wider), the same in every script.
SEED = number(int, 0, maximum=2**32 - 1)


def add_training_flags(parser, out, eval_help):
    """The flags of a supervised training script (episodes in batches, Adam, logs, checkpoints,
    a final evaluation on fresh episodes): --iterations, --batch-size, --lr, --clip-grad,
    --device, --out (default `out`), --log-every, --save-every, --eval-episodes, --resume."""
    add = parser.add_argument
    add("--iterations", type=number(int, 1), default=1000, help="batches of episodes to train on")
    add("--batch-size", type=number(int, 1), default=10, help="episodes per iteration")
    add("--lr", type=number(float, 0, strict=True), default=1e-4, help="Adam learning rate")
    add("--clip-grad", type=number(float, 0), default=0.0, help="gradient norm clip (0: none)")
    add("--device", type=torch_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    add("--out", default=out, help="folder of the logs, checkpoints and plots")
    add("--log-every", type=number(int, 1), default=10, help="iterations per CSV row")
    add("--save-every", type=number(int, 1), default=100, help="iterations between checkpoints")
    add("--eval-episodes", type=number(int, 1), default=1000, help=eval_help)
    add(
        "--resume",
        action="store_true",
        help="continue every run from its checkpoint in --out (finished runs are only evaluated)",
    )


def train_iterations(
    args, name, checkpoint, done, log, fields, train_step, after=None, bar_position=0
):
    """The training loop of the experiments: iterations done + 1 .. args.iterations of
    `train_step(iteration)`, which returns {metric: number}. Every --log-every iterations the
    metrics' means go to the CSV `log` as a row of `fields` (iteration, episodes, the metrics,
    seconds since this call) and the first two to the progress display (on terminal line
    `bar_position`); `after(iteration, bar)`, if given, runs next (e.g. an evaluation); a
    checkpoint every --save-every iterations and at the end (after the row: see resume_csv)."""
    results, start = [], time.time()
    bar = progress(
        range(done + 1, args.iterations + 1),
        desc=name,
        initial=done,
        total=args.iterations,
        position=bar_position,
    )
    for iteration in bar:
        results.append(train_step(iteration))
        if iteration % args.log_every == 0 or iteration == args.iterations:
            means = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
            append_csv(
                log,
                fields,
                [
                    dict(
                        iteration=iteration,
                        episodes=iteration * args.batch_size,
                        **means,
                        seconds=time.time() - start,
                    )
                ],
            )
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(means.items())[:2]})
            results = []
        if after is not None:
            after(iteration, bar)
        if iteration % args.save_every == 0 or iteration == args.iterations:
            checkpoint.save(iteration)
    bar.close()


def train_run(
    args, name, out, model, may_change, fields, step, optimizer=None, generator=None, bar_position=0
):
    """One training run: `model` trained for --iterations of step(model, optimizer, generator)
    -> {metric: number}, with `optimizer` (default Adam with --lr) and `generator`, which draws
    the episodes (default a CPU generator seeded with --seed); resumed from
    <out>/<name>.checkpoint.pt with --resume (options outside `may_change` must match), logged
    to <out>/<name>.csv (`fields`, see train_iterations). Returns the model."""
    log = out / f"{name}.csv"
    if generator is None:
        generator = torch.Generator().manual_seed(args.seed)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    checkpoint = RunCheckpoint(
        out / f"{name}.checkpoint.pt", args, may_change, model, optimizer, generator
    )
    done = checkpoint.resume() if args.resume else 0
    resume_csv(log, fields, "iteration", done)
    train_iterations(
        args,
        name,
        checkpoint,
        done,
        log,
        fields,
        lambda iteration: step(model, optimizer, generator),
        bar_position=bar_position,
    )
    return model


# ----------------------------------------------------------------------------------------------
# What produced a result file


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def manifest(started=None):
    """What produced a result file: the command line, the package's environment variables (e.g.
    BACKPROPAMINE_SEQUENCE_PATH), the commit (and whether tracked files differed from it), the
    versions, the machine, the date and, given the time.time() the work `started` at, its wall
    time in seconds."""

    def git(*command):
        try:
            return subprocess.run(
                ["git", *command],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    environment = {k: v for k, v in os.environ.items() if k.startswith("BACKPROPAMINE_")}
    # dirty: tracked files differed from the commit when the file was written.
    record = dict(
        command=[sys.executable, *sys.argv],
        environment=environment,
        commit=commit or None,
        dirty=bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        torch=torch.__version__,
        python=platform.python_version(),
        machine=dict(
            cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads()
        ),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if started is not None:
        record["wall_seconds"] = round(time.time() - started, 1)
    return record


def write_json(path, obj, started=None):
    """obj with a "manifest" (see manifest) added, as indented JSON, written atomically."""
    text = json.dumps(dict(obj, manifest=manifest(started)), indent=2, default=str) + "\n"
    write_atomically(path, lambda f: f.write(text), mode="w")


# ----------------------------------------------------------------------------------------------
# Progress of unattended runs, and stopping them


PROGRESS_SECONDS = 30.0  # between two progress lines when stderr is not a terminal


def progress(
    iterable=None,
    *,
    desc,
    total=None,
    initial=0,
    unit="it",
    unit_scale=1,
    position=0,
    disable=False,
    every_s=PROGRESS_SECONDS,
):
    """The progress display of a loop over `iterable` (or, without one, advanced by update(n)):
    tqdm's bar when stderr is a terminal; otherwise (a log file, nohup, CI, a cluster job) a
    plain line every `every_s` seconds and a last one at close() if any was printed, without
    the carriage returns of a bar that fill a log. Either has update(n), set_postfix(dict or
    keywords), write(text) (a line on stdout) and close(); `disable`: shows nothing."""
    if disable or not sys.stderr.isatty():
        return PlainProgress(
            iterable,
            desc=desc,
            total=total,
            initial=initial,
            unit=unit,
            unit_scale=unit_scale,
            every_s=math.inf if disable else every_s,
        )
    tqdm = optional_import("tqdm").tqdm
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        initial=initial,
        unit=unit,
        unit_scale=unit_scale,
        position=position,
        leave=False,
    )


class PlainProgress:
    """progress() off a terminal: lines such as
    "[   60 s] maze rnn-seed0: 1,200/20,000 it (6%), 20.1 it/s, about 936 s left; reward=3.5"
    on stderr, one every `every_s` seconds."""

    def __init__(
        self,
        iterable=None,
        *,
        desc,
        total=None,
        initial=0,
        unit="it",
        unit_scale=1,
        every_s=PROGRESS_SECONDS,
    ):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.unit_scale, self.every_s = unit_scale, every_s
        self.n = self.start_n = initial
        self.postfix, self.printed = "", False
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.print_line(now)

    def set_postfix(self, ordered_dict=None, **values):
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text):
        print(text, flush=True)

    def close(self):
        if self.printed and math.isfinite(self.every_s):
            self.print_line(time.monotonic())

    def print_line(self, now):
        elapsed = now - self.start
        done, total = self.n * self.unit_scale, (self.total or 0) * self.unit_scale
        line = f"[{elapsed:6.0f} s] {self.desc}: {done:,.0f}"
        if total:
            line += f"/{total:,.0f} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            line += f" {self.unit}"
        rate = (self.n - self.start_n) * self.unit_scale / max(elapsed, 1e-9)
        line += f", {rate:,.3g} {self.unit}/s"
        if total and rate > 0:
            line += f", about {(total - done) / rate:,.0f} s left"
        if self.postfix:
            line += f"; {self.postfix}"
        print(line, file=sys.stderr, flush=True)
        self.printed = True


@contextmanager
def sigterm_as_interrupt():
    """Inside (in the main thread), SIGTERM raises KeyboardInterrupt as SIGINT does, so that
    `kill` (a cluster's scheduler, a CI timeout) stops a run the way Ctrl-C does: the code that
    cleans up (e.g. stops worker processes) runs."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def out_of_memory_exits(size_flags):
    """Inside (a script's __main__): running out of memory, on the GPU or the CPU, ends the
    script with a line that says so and names `size_flags`, the flags that size the run,
    instead of a traceback. Other errors pass."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        message = str(error).strip() or type(error).__name__
        cpu = "can't allocate memory" in message  # the CPU allocator's words
        if not (cpu or isinstance(error, (MemoryError, torch.OutOfMemoryError))):
            raise
        raise SystemExit(
            f"out of memory: {message.splitlines()[0]}\nsmaller {size_flags} need less"
        ) from None


def count_parameters(module):
    """Trainable parameters; a weight shared by two layers (a tied embedding) counts once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def closest_size(count, target, largest=4096):
    """The size n in [1, largest] whose count(n) is closest to `target`, for a count that grows
    with n (e.g. the parameters of a network with n hidden units): a bisection for the first n
    with count(n) >= target, then the nearer of it and n - 1."""
    low, high = 1, largest
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if count(mid) < target else (low, mid)
    return min((max(1, low - 1), low), key=lambda n: abs(count(n) - target))


def pyplot(extra="experiments"):
    """matplotlib.pyplot on the Agg backend (files only; no display needed); a missing
    matplotlib exits with optional_import's line (`extra`: who needs it)."""
    optional_import("matplotlib", extra).use("Agg")
    return optional_import("matplotlib.pyplot", extra)
