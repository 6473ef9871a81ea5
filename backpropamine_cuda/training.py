"""What the experiments' training scripts share: checkpoints written atomically with the
random generators' states (so that a resumed run continues exactly), CSV logs, command lines
with presets, plots, and sizing networks by parameter count.

    from backpropamine_cuda.training import RunCheckpoint, start_csv, append_csv
"""
import argparse
import csv
import os
import random
import time

import numpy as np
import torch


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: an interrupted save leaves the old file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states():
    """Python's, NumPy's (its key array as a tensor: weights_only loading accepts tensors, not
    arrays), torch's and CUDA's random generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states):
    """Restores what rng_states returned."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def start_csv(path, fields, keep=lambda row: False):
    """(Re)writes the CSV log at `path` with its header and the existing rows for which
    keep(row) is true (those a resumed run had already logged)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if keep(r)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def append_csv(path, fields, rows):
    """Appends dict rows to the CSV log at `path` (started by start_csv); returns all rows."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerows(rows)
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_checkpoint(path, args, may_change=()):
    """The checkpoint dict at `path`, saved with the run's options as "args" (vars of its
    argparse namespace) and rng_states() as "rng", after checking that `args` has the same
    value for every option but those in `may_change`; restores the random states. A mismatch
    exits with a message naming each option, its value there and here; a file torch cannot
    read exits naming it."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # RNG states: CPU
    except Exception as error:  # torch raises several kinds for a damaged file
        raise SystemExit(f"--resume: cannot read the checkpoint {path}: {error}") from error
    differ = [f"--{k.replace('_', '-')} {v} there, {getattr(args, k, None)} here"
              for k, v in saved["args"].items()
              if k not in may_change and v != getattr(args, k, None)]
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
        atomic_save(dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         generator=self.generator.get_state(), rng=rng_states(),
                         iteration=iteration, args=vars(self.args)), self.path)

    def resume(self):
        """Restores the run from the checkpoint (load_checkpoint's option check) and returns its
        iteration; 0 when there is no checkpoint yet. A checkpoint past --iterations exits."""
        if not self.path.is_file():
            return 0
        saved = load_checkpoint(self.path, self.args, self.may_change)
        if saved["iteration"] > self.args.iterations:
            raise SystemExit(f"--resume: {self.path} is at iteration {saved['iteration']}, past "
                             f"--iterations {self.args.iterations}")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        return saved["iteration"]


def read_csv_columns(path):
    """{column: list of floats} of a CSV log (for plots)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def preset_parser(description, presets):
    """An ArgumentParser (defaults shown in --help) with --preset: the name of one of `presets`
    ({name: {dest: value}}, the first the default), whose values parse_with_preset makes the
    defaults of the other flags."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=tuple(presets), default=next(iter(presets)),
                        help="defaults of the flags below: " + "; ".join(
                            f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                            for name, values in presets.items()))
    return parser


def parse_with_preset(parser, presets, argv=None):
    """Parses the command line with the defaults of the chosen --preset ({name: {dest: value}}),
    flags given explicitly still winning; checks that checkpoints (--save-every) fall on CSV
    rows (--log-every) where the parser has both."""
    args = parser.parse_args(argv)
    parser.set_defaults(**presets[args.preset])
    args = parser.parse_args(argv)
    if hasattr(args, "save_every") and hasattr(args, "log_every") and (
            args.save_every % args.log_every):  # a checkpoint must not cut a CSV row in two
        parser.error(f"--save-every must be a multiple of --log-every ({args.log_every}), got "
                     f"{args.save_every}")
    return args


def number(kind, minimum, strict=False):
    """An argparse type: a `kind` that is >= minimum (> minimum when strict)."""
    def parse(text):
        value = kind(text)
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def add_training_flags(parser, out, eval_help):
    """The flags of a supervised training script (episodes in batches, Adam, logs, checkpoints,
    a final evaluation on fresh episodes): --iterations, --batch-size, --lr, --clip-grad,
    --device, --out (default `out`), --log-every, --save-every, --eval-episodes, --resume."""
    add = parser.add_argument
    add("--iterations", type=number(int, 1), default=1000, help="batches of episodes to train on")
    add("--batch-size", type=number(int, 1), default=10, help="episodes per iteration")
    add("--lr", type=number(float, 0, strict=True), default=1e-4, help="Adam learning rate")
    add("--clip-grad", type=number(float, 0), default=0.0, help="gradient norm clip (0: none)")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add("--out", default=out, help="folder of the logs, checkpoints and plots")
    add("--log-every", type=number(int, 1), default=10, help="iterations per CSV row")
    add("--save-every", type=number(int, 1), default=100, help="iterations between checkpoints")
    add("--eval-episodes", type=number(int, 1), default=1000, help=eval_help)
    add("--resume", action="store_true",
        help="continue every run from its checkpoint in --out (finished runs are only evaluated)")


def train_iterations(args, name, checkpoint, done, log, fields, train_step, after=None):
    """The training loop of the supervised experiments: iterations done + 1 .. args.iterations
    of `train_step(iteration)`, which returns {metric: number}. Every --log-every iterations
    the metrics' means go to the CSV `log` as a row of `fields` (iteration, episodes, the
    metrics, seconds since this call) and the first two to the progress bar; `after(iteration,
    bar)`, if given, runs next (e.g. an evaluation); a checkpoint every --save-every iterations
    and at the end."""
    from tqdm import tqdm  # an extra of the experiments, like matplotlib
    results, start = [], time.time()
    bar = tqdm(range(done + 1, args.iterations + 1), desc=name, initial=done,
               total=args.iterations, leave=False)
    for iteration in bar:
        results.append(train_step(iteration))
        if iteration % args.log_every == 0 or iteration == args.iterations:
            means = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
            append_csv(log, fields, [dict(iteration=iteration, episodes=iteration * args.batch_size,
                                          **means, seconds=time.time() - start)])
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(means.items())[:2]})
            results = []
        if after is not None:
            after(iteration, bar)
        if iteration % args.save_every == 0 or iteration == args.iterations:
            checkpoint.save(iteration)
    bar.close()


def train_run(args, name, out, model, may_change, fields, step):
    """One training run of a supervised experiment: `model` trained with Adam (--lr) for
    --iterations of step(model, optimizer, generator) -> {metric: number} (`generator`, seeded
    with --seed, draws the episodes), resumed from <out>/<name>.checkpoint.pt with --resume
    (options outside `may_change` must match), logged to <out>/<name>.csv (`fields`, see
    train_iterations). Returns the model."""
    log = out / f"{name}.csv"
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    checkpoint = RunCheckpoint(out / f"{name}.checkpoint.pt", args, may_change, model, optimizer,
                               generator)
    done = checkpoint.resume() if args.resume else 0
    start_csv(log, fields, keep=lambda row: int(row["iteration"]) <= done)
    train_iterations(args, name, checkpoint, done, log, fields,
                     lambda iteration: step(model, optimizer, generator))
    return model


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


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
