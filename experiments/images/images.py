"""Natural-image memorisation and completion (Differentiable plasticity, Miconi et al., ICML 2018):
each episode shows a few grayscale CIFAR-10 images, then one of them with its top or bottom half
erased, and the network must output the whole image.

    python experiments/images/images.py --data DIR                 # quick: 16x16, plastic vs rnn
    python experiments/images/images.py --data DIR --preset paper  # 32x32, the paper's settings

One neuron per pixel plus a bias neuron. Neurons that receive input are clamped to it (their
output is the pixel value itself, as in a Hopfield network): every pixel neuron while an image
is shown, the non-erased half during the test, the bias neuron (input 1) always; the others
compute tanh of their recurrent drive. The plastic network connects them by w + alpha * hebb
(alpha per connection, learned scalar eta, rule "decay") and runs the whole episode in one call
of the plastic_rnn_sequence op with its clamp option; the non-plastic rnn is the same clamped
network with w alone. The output is the pixel neurons' activity at the last step.

See experiments/images/README.md.
"""

import os
import pickle
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import backpropamine_cuda as bp

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the root, for experiments.common
from experiments.common import (  # noqa: E402
    SEED,
    DataError,
    add_training_flags,
    append_csv,
    count_parameters,
    number,
    out_of_memory_exits,
    parse_with_preset,
    preset_parser,
    pyplot,
    read_csv_columns,
    reading,
    require_device,
    require_extras,
    start_csv,
    train_run,
    write_json,
)

TYPES = ("plastic", "rnn")
SIZES = (2, 4, 8, 16, 32)  # divisors of 32 (a pixel: the mean of a square), even (two halves)
PRESETS = {
    "quick": dict(
        types=list(TYPES),
        size=16,
        presentation_steps=6,
        iterations=1000,
        lr=1e-3,
        out="runs/images",
    ),
    "paper": dict(
        types=list(TYPES),
        size=32,
        images=3,
        presentations=3,
        presentation_steps=20,
        gap_steps=3,
        test_steps=3,
        iterations=10_000,
        lr=1e-4,
        out="runs/images-paper",
    ),
}
LOG_FIELDS = ("iteration", "episodes", "loss", "error_erased", "seconds")
EVAL_FIELDS = (
    "type",
    "seed",
    "iterations",
    "episodes",
    "loss",
    "error_erased",
    "error_erased_blank",
)
EVAL_SEED = 1_000_003  # every type and seed is evaluated on the same fresh episodes
FIGURE_EPISODES = 6  # test episodes shown in completion-<type>.png
# Flags a resumed run may change; all others must be those of the run that wrote the checkpoint.
RESUME_MAY_CHANGE = (
    "preset",
    "types",
    "data",
    "iterations",
    "impl",
    "device",
    "out",
    "save_every",
    "eval_episodes",
    "resume",
)


# ----------------------------------------------------------------------------------------------
# Data: CIFAR-10 as grayscale images, each centred and scaled to [-1, 1], kept in memory


class ImageSet(NamedTuple):
    train: torch.Tensor  # (n, size, size) float32: the training images (training episodes)
    test: torch.Tensor  # (m, size, size) float32: the test images (the final evaluation)
    source: Path  # the file or folder they were read from


NPZ_NAME = "cifar10_subset.npz"
PICKLE_FOLDER = "cifar-10-batches-py"


def find_data(data):
    """The npz file or the folder of pickles that --data (or, without it, $BACKPROPAMINE_DATA)
    designates."""
    if data is None:
        if "BACKPROPAMINE_DATA" not in os.environ:
            raise SystemExit(
                f"--data: give {NPZ_NAME} or the CIFAR-10 python version's folder, "
                f"or set BACKPROPAMINE_DATA to a folder holding cifar10/{NPZ_NAME}"
            )
        data = os.environ["BACKPROPAMINE_DATA"]
    path = Path(data)
    for candidate in (path, path / NPZ_NAME, path / "cifar10" / NPZ_NAME):
        if candidate.is_file():
            return candidate
    for candidate in (path, path / PICKLE_FOLDER, path / "cifar10" / PICKLE_FOLDER):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    raise SystemExit(
        f"--data: expected {NPZ_NAME}, a folder holding it (or cifar10/{NPZ_NAME}), "
        f"or the CIFAR-10 python version (data_batch_1, ..., test_batch, possibly "
        f"under {PICKLE_FOLDER}/); got {path}"
    )


def check_rgb(images, what):
    """`images` as an (n, 32, 32, 3) uint8 array, or a DataError naming `what`."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(
            f"{what}: expected (n, 32, 32, 3) uint8 RGB images, got {images.shape} {images.dtype}"
        )
    return images


def read_npz(path):
    """(training images, test images), (n, 32, 32, 3) uint8 RGB, of the packed subset (the
    arrays train_images and test_images; see the README that comes with it). A file that is
    not such an npz (or a damaged one) raises a DataError naming it."""
    with reading(path), np.load(path) as data:
        missing = {"train_images", "test_images"} - set(data.files)
        if missing:
            raise DataError(
                f"{path}: expected the arrays train_images and test_images; "
                f"missing {sorted(missing)}"
            )
        return tuple(
            check_rgb(data[name], f"{path} {name}") for name in ("train_images", "test_images")
        )


def read_batch(path):
    """The images of one pickled batch of the CIFAR-10 python version: its b"data" rows are
    the 1024 red, then green, then blue values of a 32x32 image, row-major. A damaged file
    raises a DataError naming it."""
    with reading(path), open(path, "rb") as f:
        rows = np.asarray(pickle.load(f, encoding="bytes")[b"data"], dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected data rows of 3072 bytes, got {rows.shape}")
    return check_rgb(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), str(path))


def read_pickles(folder):
    """(training images, test images) of the CIFAR-10 python version: data_batch_1 ... 5 (those
    present, in order) and test_batch."""
    batches = [folder / f"data_batch_{k}" for k in range(1, 6)]
    train = np.concatenate([read_batch(p) for p in batches if p.is_file()])
    return train, read_batch(folder / "test_batch")


def grayscale(rgb, size):
    """(n, 32, 32, 3) uint8 RGB -> (n, size, size) float32: the mean of R, G and B, averaged
    over (32 / size)^2 squares, then each image centred (mean 0) and divided by its largest
    absolute value, so that its pixels span [-1, 1] (the original code's normalisation)."""
    gray = torch.from_numpy(rgb.sum(-1, dtype=np.uint16)).float() / 3
    if size != 32:
        gray = F.avg_pool2d(gray.unsqueeze(1), 32 // size).squeeze(1)
    gray = gray - gray.mean((1, 2), keepdim=True)
    return gray / gray.abs().amax((1, 2), keepdim=True).clamp_min(1e-8)


def load_images(data, size):
    """The ImageSet of --data at --size; data that cannot be read exits naming the file."""
    path = find_data(data)
    try:
        train, test = read_npz(path) if path.is_file() else read_pickles(path)
    except DataError as error:
        raise SystemExit(f"--data: {error}") from error
    return ImageSet(grayscale(train, size), grayscale(test, size), path)


# ----------------------------------------------------------------------------------------------
# Episodes


class Episodes(NamedTuple):
    """A batch of B episodes of T steps over N = size^2 pixel neurons and the bias neuron (the
    last, index N). Images are flattened row-major: the first N / 2 pixels are the top half."""

    inputs: torch.Tensor  # (T, B, N + 1): the pixels shown (0 in gaps, erased half), bias 1
    clamp: torch.Tensor  # (T, B, N + 1) bool: the neurons pinned to their input
    indices: torch.Tensor  # (B, n_images): the images shown, as indices into the pool
    images: torch.Tensor  # (B, n_images, N): the images shown
    test_index: torch.Tensor  # (B,): which of them is tested
    target: torch.Tensor  # (B, N): the whole test image
    erased: torch.Tensor  # (B, N) bool: the pixels erased in the test input

    def to(self, device, dtype=None):
        """Moved to `device`, the float tensors converted to `dtype` (if given)."""
        return Episodes(*(t.to(device, dtype if t.is_floating_point() else t.dtype) for t in self))


def make_episodes(
    pool, batch_size, generator, images, presentations, presentation_steps, gap_steps, test_steps
):
    """B episodes on the images of `pool` (M, S, S): `images` distinct images at random, shown
    `presentations` times each (each round in a new random order), each time for
    `presentation_steps` steps followed by `gap_steps` blank steps; then one of them, with its
    top or bottom half (at random) erased, for `test_steps` steps. Drawn on the CPU from
    `generator`."""
    B, g, (M, S, _) = batch_size, generator, pool.shape
    N = S * S
    if images > M:
        raise ValueError(f"{images} distinct images per episode asked for, the pool has {M}")
    chosen = torch.rand(B, M, generator=g).topk(images, 1).indices  # distinct, at random
    shown = pool.reshape(M, N)[chosen]  # (B, images, N)
    order = torch.cat(
        [torch.rand(B, images, generator=g).argsort(1) for _ in range(presentations)], 1
    )
    sequence = shown.gather(1, order.unsqueeze(2).expand(-1, -1, N))  # (B, K, N)
    K = sequence.shape[1]
    presented = torch.cat(
        [
            sequence.unsqueeze(2).expand(-1, -1, presentation_steps, -1),
            sequence.new_zeros(B, K, gap_steps, N),
        ],
        2,
    ).reshape(B, -1, N)
    on = torch.cat(
        [
            torch.ones(B, K, presentation_steps, N, dtype=torch.bool),
            torch.zeros(B, K, gap_steps, N, dtype=torch.bool),
        ],
        2,
    ).reshape(B, -1, N)
    test_index = torch.randint(0, images, (B,), generator=g)
    target = shown[torch.arange(B), test_index]
    top = torch.randint(0, 2, (B, 1), generator=g).bool()
    top_half = torch.arange(N) < N // 2
    erased = torch.where(top, top_half, ~top_half)  # (B, N)
    test = (target * ~erased).unsqueeze(1).expand(-1, test_steps, -1)
    test_on = (~erased).unsqueeze(1).expand(-1, test_steps, -1)
    T = presented.shape[1] + test_steps
    inputs = torch.cat([torch.cat([presented, test], 1), torch.ones(B, T, 1)], 2)
    clamp = torch.cat([torch.cat([on, test_on], 1), torch.ones(B, T, 1, dtype=torch.bool)], 2)
    return Episodes(
        inputs.transpose(0, 1).contiguous(),
        clamp.transpose(0, 1).contiguous(),
        chosen,
        shown,
        test_index,
        target,
        erased,
    )


def episode_options(args):
    """make_episodes' keyword arguments from the command line."""
    return dict(
        images=args.images,
        presentations=args.presentations,
        presentation_steps=args.presentation_steps,
        gap_steps=args.gap_steps,
        test_steps=args.test_steps,
    )


def episode_steps(args):
    """T, the steps of an episode."""
    return (
        args.presentations * args.images * (args.presentation_steps + args.gap_steps)
        + args.test_steps
    )


# ----------------------------------------------------------------------------------------------
# Networks: each maps inputs and clamp (T, B, N + 1) to the pixel neurons' outputs (T, B, N);
# only the last step is scored. h = 0 at the start of every episode (and hebb = 0).


class PlasticNet(nn.Module):
    """h_t = where(clamp_t, x_t, tanh(x_t + h_{t-1} @ (w + alpha * hebb))), rule "decay":
    hebb_t = (1 - eta) hebb + eta h_{t-1}[i] h_t[j]. Parameters w, alpha (N + 1, N + 1) and the
    scalar eta; the patterns task's initialisation (w, alpha ~ 0.01 N(0, 1), eta = 0.01)."""

    def __init__(self, pixels, impl="fused"):
        super().__init__()
        N = pixels + 1
        self.pixels, self.impl = pixels, impl
        self.w = nn.Parameter(0.01 * torch.randn(N, N))
        self.alpha = nn.Parameter(0.01 * torch.randn(N, N))
        self.eta = nn.Parameter(torch.tensor(0.01))

    def forward(self, inputs, clamp):
        T, B, N = inputs.shape
        ops = bp.fused if self.impl == "fused" else bp.reference
        out, *_ = ops.plastic_rnn_sequence(
            inputs,
            inputs.new_zeros(B, N),
            inputs.new_zeros(B, N, N),
            None,
            self.w,
            self.alpha,
            self.eta,
            None,
            None,
            None,
            None,
            None,
            rule="decay",
            clamp=clamp,
        )
        return out[:, :, : self.pixels]


class RecurrentNet(nn.Module):
    """The same clamped network without plasticity, in plain PyTorch (either --impl):
    h_t = where(clamp_t, x_t, tanh(x_t + h_{t-1} @ w)); w (N + 1, N + 1) ~ 0.01 N(0, 1)."""

    def __init__(self, pixels):
        super().__init__()
        self.pixels = pixels
        self.w = nn.Parameter(0.01 * torch.randn(pixels + 1, pixels + 1))

    def forward(self, inputs, clamp):
        h, outputs = inputs.new_zeros(inputs.shape[1:]), []
        for x, pinned in zip(inputs, clamp):
            h = torch.where(pinned, x, torch.tanh(x + h @ self.w))
            outputs.append(h)
        return torch.stack(outputs)[:, :, : self.pixels]


def make_network(network_type, args):
    if network_type not in TYPES:
        raise ValueError(f"network_type must be one of {TYPES}, got {network_type!r}")
    pixels = args.size * args.size
    return PlasticNet(pixels, args.impl) if network_type == "plastic" else RecurrentNet(pixels)


# ----------------------------------------------------------------------------------------------
# Loss, error on the erased half, training and evaluation


def completion_loss(outputs, target):
    """Mean squared error between the last step's output and the whole test image."""
    return F.mse_loss(outputs[-1], target)


def erased_error(outputs, episodes):
    """Mean squared error of the last step's output over the erased pixels only."""
    squared = (outputs[-1] - episodes.target) ** 2
    return ((squared * episodes.erased).sum() / episodes.erased.sum()).item()


def train_step(model, optimizer, episodes, clip_grad):
    """One Adam step on a batch of episodes; returns the loss and the error on the erased half."""
    outputs = model(episodes.inputs, episodes.clamp)
    loss = completion_loss(outputs, episodes.target)
    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return dict(loss=loss.item(), error_erased=erased_error(outputs.detach(), episodes))


def evaluation_episodes(pool, args, n_episodes, seed=EVAL_SEED):
    """The n_episodes fresh episodes of the evaluation, in batches of --batch-size drawn from
    `seed` (the same for every type and seed)."""
    generator, done = torch.Generator().manual_seed(seed), 0
    while done < n_episodes:
        size = min(args.batch_size, n_episodes - done)
        yield make_episodes(pool, size, generator, **episode_options(args)).to(args.device)
        done += size


@torch.no_grad()
def evaluate(model, pool, args, n_episodes, seed=EVAL_SEED):
    """(loss, error on the erased half) averaged over n_episodes fresh episodes of `pool`."""
    totals = torch.zeros(2, dtype=torch.float64)
    for episodes in evaluation_episodes(pool, args, n_episodes, seed):
        outputs = model(episodes.inputs, episodes.clamp)
        totals += len(episodes.target) * torch.tensor(
            [completion_loss(outputs, episodes.target).item(), erased_error(outputs, episodes)],
            dtype=torch.float64,
        )
    return tuple((totals / n_episodes).tolist())


def blank_error(pool, args, n_episodes, seed=EVAL_SEED):
    """The error on the erased half of an output of 0 (the images' mean) on the evaluation
    episodes: the level a network that recalls nothing can reach without cues."""
    total = 0.0
    for episodes in evaluation_episodes(pool, args, n_episodes, seed):
        total += len(episodes.target) * erased_error(
            torch.zeros_like(episodes.target)[None], episodes
        )
    return total / n_episodes


def run_name(network_type, seed):
    return f"{network_type}-seed{seed}"


def train_network(args, network_type, pool, out):
    """Trains one network on episodes of `pool` (resuming from its checkpoint with --resume);
    returns it. Writes <out>/<type>-seed<k>.csv and .checkpoint.pt."""
    torch.manual_seed(args.seed)
    model = make_network(network_type, args).to(args.device)

    def step(model, optimizer, generator):
        episodes = make_episodes(pool, args.batch_size, generator, **episode_options(args))
        return train_step(model, optimizer, episodes.to(args.device), args.clip_grad)

    return train_run(
        args, run_name(network_type, args.seed), out, model, RESUME_MAY_CHANGE, LOG_FIELDS, step
    )


# ----------------------------------------------------------------------------------------------
# Command line


def make_parser():
    p = preset_parser(__doc__.split("\n\n")[0], PRESETS)
    add = p.add_argument
    add(
        "--data",
        default=None,
        help=f"{NPZ_NAME}, a folder holding it (or cifar10/{NPZ_NAME}), or the folder of the "
        f"CIFAR-10 python version (data_batch_1..5, test_batch; or its {PICKLE_FOLDER}/); "
        f"default $BACKPROPAMINE_DATA",
    )
    add("--types", nargs="+", choices=TYPES, default=list(TYPES), help="networks to train")
    add("--seed", type=SEED, default=0, help="seed of the initialisation and the episodes")
    add(
        "--size",
        type=int,
        choices=SIZES,
        default=32,
        help="side of the images in pixels (32: CIFAR-10's; smaller: averages of squares)",
    )
    add("--images", type=number(int, 1), default=3, help="images per episode")
    add("--presentations", type=number(int, 1), default=3, help="times each image is shown")
    add("--presentation-steps", type=number(int, 1), default=20, help="steps per presentation")
    add("--gap-steps", type=number(int, 0), default=3, help="blank steps after each presentation")
    add(
        "--test-steps",
        type=number(int, 1),
        default=3,
        help="steps of the half-erased test image at the end",
    )
    add(
        "--impl",
        choices=("fused", "reference"),
        default="fused",
        help="plastic network: the fused op, or the pure-PyTorch reference (the rnn is plain "
        "PyTorch either way)",
    )
    add_training_flags(
        p,
        "runs/images",
        "fresh episodes of the test images on which each trained network is evaluated",
    )
    return p


def parse_args(argv=None):
    """Parses with the chosen preset's defaults (flags given explicitly still win)."""
    return parse_with_preset(make_parser(), PRESETS, argv)


def check_images(image_set, args):
    """Exits with a message when the data cannot make the episodes asked for."""
    for role, pool in (("training", image_set.train), ("test", image_set.test)):
        if len(pool) < args.images:
            raise SystemExit(
                f"--images {args.images}: {image_set.source} has only {len(pool)} {role} images"
            )


def main(argv=None):
    """Trains every type of --types on episodes of the training images, evaluates each on
    --eval-episodes fresh episodes of the test images (evaluation.csv; <type>-seed<k>.json: the
    run's result, options and manifest), plots the curves (curves.png) and a few completions per
    type (completion-<type>.png); returns
    {type: (loss, error on the erased half)}."""
    args = parse_args(argv)
    require_extras()
    require_device(args.device)
    image_set = load_images(args.data, args.size)
    check_images(image_set, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = args.size * args.size
    print(
        f"{len(image_set.train):,} training and {len(image_set.test):,} test images "
        f"({image_set.source}), {args.size}x{args.size} grayscale: {pixels + 1} neurons, "
        f"{episode_steps(args)} steps per episode; parameters: "
        + ", ".join(f"{t} {count_parameters(make_network(t, args)):,}" for t in args.types),
        flush=True,
    )
    summary = {}
    blank = blank_error(image_set.test, args, args.eval_episodes)
    for network_type in args.types:
        started = time.time()
        model = train_network(args, network_type, image_set.train, out)
        summary[network_type] = loss, error_erased = evaluate(
            model, image_set.test, args, args.eval_episodes
        )
        write_json(
            out / f"{run_name(network_type, args.seed)}.json",
            dict(
                type=network_type,
                seed=args.seed,
                parameters=count_parameters(model),
                iterations=args.iterations,
                episodes=args.iterations * args.batch_size,
                eval_episodes=args.eval_episodes,
                loss=loss,
                error_erased=error_erased,
                error_erased_blank=blank,
                options=vars(args),
            ),
            started=started,
        )
        plot_completions(
            model, image_set.test, args, network_type, out / f"completion-{network_type}.png"
        )
    evaluation, this_seed = out / "evaluation.csv", str(args.seed)
    start_csv(
        evaluation,
        EVAL_FIELDS,  # keeps the rows of other runs sharing --out
        keep=lambda row: row["seed"] != this_seed or row["type"] not in args.types,
    )
    append_csv(
        evaluation,
        EVAL_FIELDS,
        [
            dict(
                type=t,
                seed=args.seed,
                iterations=args.iterations,
                episodes=args.iterations * args.batch_size,
                loss=loss,
                error_erased=error_erased,
                error_erased_blank=blank,
            )
            for t, (loss, error_erased) in summary.items()
        ],
    )
    plot_curves(out, args, out / "curves.png", blank)
    print(
        f"on {args.eval_episodes} fresh episodes of the test images, mean squared error on the "
        f"erased half (an output of 0 there: {blank:.4f}):"
    )
    for network_type, (loss, error_erased) in summary.items():
        print(f"{network_type:8s} {error_erased:.4f} (loss, whole image: {loss:.4f})")
    return summary


# ----------------------------------------------------------------------------------------------
# Plots


def plot_curves(out, args, path, blank=None):
    """Error on the erased half against training episodes, one line per type (the loss is half
    of it: the clamped half is exact); the error of an output of 0 there (`blank`) dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for network_type in args.types:
        log = read_csv_columns(out / f"{run_name(network_type, args.seed)}.csv")
        ax.plot(log["episodes"], log["error_erased"], label=network_type)
    if blank is not None:
        ax.axhline(blank, color="grey", linestyle="--", label="output 0 (test episodes)")
    ax.set(
        xlabel="training episodes",
        ylabel="MSE on the erased half",
        ylim=(0, None),
        title=f"{args.size}x{args.size} images, {args.images} per episode, shown "
        f"{args.presentations} x {args.presentation_steps} steps (seed {args.seed})",
    )
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_completions(model, pool, args, network_type, path, n_episodes=FIGURE_EPISODES):
    """A few fresh episodes of `pool` (the same for every type), one per column: the original
    test image, what the network sees in the test (the erased half grey), its output at the last
    step, and the other images of the episode."""
    episodes = make_episodes(
        pool, n_episodes, torch.Generator().manual_seed(EVAL_SEED), **episode_options(args)
    )
    outputs = model(*(t.to(args.device) for t in (episodes.inputs, episodes.clamp))).cpu()
    B, S = len(episodes.target), args.size
    others = [
        torch.cat([episodes.images[b, :k], episodes.images[b, k + 1 :]])
        for b, k in enumerate(episodes.test_index.tolist())
    ]
    rows = [
        ("original", episodes.target),
        ("degraded", episodes.inputs[-1, :, :-1]),
        ("completed", outputs[-1]),
    ] + [("also shown", torch.stack([o[k] for o in others])) for k in range(args.images - 1)]
    plt = pyplot()
    fig, axes = plt.subplots(
        len(rows), B, figsize=(1.3 * B + 0.6, 1.3 * len(rows) + 0.4), squeeze=False
    )
    squared = (outputs[-1] - episodes.target) ** 2
    errors = (squared * episodes.erased).sum(1) / episodes.erased.sum(1)
    for r, (label, images) in enumerate(rows):
        for b in range(B):
            ax = axes[r, b]
            ax.imshow(
                images[b].reshape(S, S).numpy(),
                cmap="gray",
                vmin=-1,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_ylabel(label)
            if r == 2:
                ax.set_title(f"MSE {errors[b]:.3f}", fontsize=8, y=-0.22)
    fig.suptitle(f"{network_type}: completion of half-erased test images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    with out_of_memory_exits("--batch-size or --size"):
        main()
