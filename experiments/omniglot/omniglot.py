"""Omniglot 5-way 1-shot classification with a plastic feed-forward layer (Differentiable
plasticity, Miconi et al., ICML 2018): each episode shows one image of each of 5 new classes
with its label, then another drawing of one of them without; the network names its class.

    python experiments/omniglot/omniglot.py --data /path/to/omniglot      # quick, a few minutes
    python experiments/omniglot/omniglot.py --data ... --preset paper     # the paper's settings

Four 3x3 stride-2 convolutions (64 channels, tanh) map each 31x31 image to 64 features x; the
plastic layer computes u = x @ (w + alpha * hebb) (backpropamine_cuda/reference.py,
plastic_matvec). While an image is shown with its label, the layer's output is
softmax(u + 1000 * onehot(label)) and the trace follows Oja's rule with a learned rate eta; at the
test step the output is softmax(u), scored by cross-entropy. The trace starts at zero in every
episode, so what the layer learns of the classes is learned within the episode. Training and test
characters never overlap (--split).

See experiments/omniglot/README.md.
"""

import argparse
import math
import os
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
    RunCheckpoint,
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
    resume_csv,
    torch_device,
    train_iterations,
    write_json,
)

IMAGE_SIZE = 31  # four stride-2 3x3 convolutions: 31 -> 15 -> 7 -> 3 -> 1
SPLITS = ("background-evaluation", "paper-1200")
PAPER_TRAIN_CHARACTERS = 1200
OJA_CLIP = 2.0  # hebb_update takes a bound; Oja's rule does not use it
PRESETS = {
    "quick": dict(
        split="background-evaluation",
        iterations=2000,
        batch_size=16,
        lr=1e-3,
        lr_step=0,
        eval_every=250,
        out="runs/omniglot",
    ),
    "paper": dict(
        split="paper-1200",
        iterations=500_000,
        batch_size=10,
        lr=3e-5,
        lr_step=100_000,
        lr_gamma=0.666,
        eval_every=10_000,
        out="runs/omniglot-paper",
    ),
}
LOG_FIELDS = ("iteration", "episodes", "loss", "accuracy", "lr", "seconds")
EVAL_FIELDS = ("iteration", "episodes", "loss", "accuracy", "ci_low", "ci_high")
EVAL_SEED = 1_000_003  # every evaluation of every run draws the same test episodes
# Flags a resumed run may change; all others must be those of the run that wrote the checkpoint.
RESUME_MAY_CHANGE = (
    "preset",
    "data",
    "iterations",
    "impl",
    "device",
    "out",
    "save_every",
    "test_episodes",
    "resume",
)


# ----------------------------------------------------------------------------------------------
# Data: every image downscaled once to 31x31 and kept in memory


class Omniglot(NamedTuple):
    """The characters in the order of omniglot.npz: images_background, then images_evaluation,
    each by alphabet then character name."""

    images: torch.Tensor  # (characters, drawings, 31, 31) float32: fraction of ink per pixel
    split: torch.Tensor  # (characters,) int8: 0 images_background, 1 images_evaluation
    names: list  # "alphabet/character" per character


def downscale(ink):
    """(n, H, W) binary images (1 = ink) -> (n, 31, 31) float32 by area averaging."""
    images = torch.from_numpy(np.ascontiguousarray(ink)).float().unsqueeze(1)
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area").squeeze(1)


def load_npz(path, chunk=64):
    """The packed file (see the README): `ink` holds np.packbits of the binary images along
    their last axis, a set bit being ink. Unpacked and downscaled `chunk` characters at a time,
    so that the 105x105 images never all sit in memory. A file that is not such an npz (or a
    damaged one) raises a DataError naming it."""
    with reading(path), np.load(path) as data:
        missing = {"ink", "shape", "alphabet", "character", "split"} - set(data.files)
        if missing:
            raise DataError(
                f"{path}: expected the arrays ink, shape, alphabet, character, "
                f"split; missing {sorted(missing)}"
            )
        shape, ink = tuple(int(n) for n in data["shape"]), data["ink"]
        if len(shape) != 4 or ink.shape != (*shape[:3], -(-shape[3] // 8)):
            raise DataError(
                f"{path}: ink of shape (characters, drawings, height, ceil(width / "
                f"8)) expected for shape {shape}, got {ink.shape}"
            )
        images = torch.cat(
            [
                downscale(
                    np.unpackbits(ink[start : start + chunk], axis=-1)[..., : shape[3]].reshape(
                        -1, shape[2], shape[3]
                    )
                ).reshape(-1, shape[1], IMAGE_SIZE, IMAGE_SIZE)
                for start in range(0, shape[0], chunk)
            ]
        )
        names = [f"{a}/{c}" for a, c in zip(data["alphabet"].tolist(), data["character"].tolist())]
        return Omniglot(images, torch.from_numpy(data["split"].astype(np.int8)), names)


def load_folders(root):
    """The original release's layout: root/images_background/<alphabet>/<character>/*.png and
    root/images_evaluation/...; black pixels (ink) are dark, the background white. A file
    that is not a PNG raises a DataError naming it."""
    from matplotlib.image import imread  # reads PNG without PIL's own API

    def read_png(path):
        with reading(path):
            return imread(path)

    images, split, names = [], [], []
    for split_index, folder in enumerate(("images_background", "images_evaluation")):
        if not (root / folder).is_dir():
            raise DataError(f"expected {root / folder} (the original Omniglot layout)")
        for character in sorted(p for p in (root / folder).glob("*/*") if p.is_dir()):
            drawings = [read_png(png) for png in sorted(character.glob("*.png"))]
            gray = np.stack([d if d.ndim == 2 else d[..., 0] for d in drawings])
            images.append(downscale(gray < 0.5))
            split.append(split_index)
            names.append(f"{character.parent.name}/{character.name}")
    counts = {len(d) for d in images}
    if len(counts) != 1:
        raise DataError(
            f"every character needs the same number of drawings, got {sorted(counts)} in {root}"
        )
    return Omniglot(torch.stack(images), torch.tensor(split, dtype=torch.int8), names)


def find_data(data):
    """The file or folder that --data (or, without it, $BACKPROPAMINE_DATA) designates."""
    if data is None:
        if "BACKPROPAMINE_DATA" not in os.environ:
            raise SystemExit(
                "--data: give the Omniglot folder or omniglot.npz, or set "
                "BACKPROPAMINE_DATA to a folder holding omniglot/omniglot.npz"
            )
        data = Path(os.environ["BACKPROPAMINE_DATA"]) / "omniglot" / "omniglot.npz"
    path = Path(data)
    for candidate in (path, path / "omniglot.npz", path / "omniglot" / "omniglot.npz"):
        if candidate.is_file():
            return candidate
    if (path / "images_background").is_dir():
        return path
    raise SystemExit(
        f"--data: expected omniglot.npz, a folder holding it (or omniglot/"
        f"omniglot.npz), or a folder with images_background and images_evaluation; "
        f"got {path}"
    )


def load_omniglot(data):
    """The dataset of --data; data that cannot be read exits naming the file."""
    path = find_data(data)
    try:
        return load_npz(path) if path.is_file() else load_folders(path)
    except DataError as error:
        raise SystemExit(f"--data: {error}") from error


def split_characters(dataset, split):
    """(training characters, test characters), index tensors that never share a character.

    background-evaluation: the official split, 964 characters of 30 alphabets for training and
    659 of 20 other alphabets for test. paper-1200: the first 1200 characters for training and
    the other 423 for test, as the paper's 1200 / 423 (the first 1200 in the order above: all of
    images_background and 236 characters of images_evaluation)."""
    if split == "background-evaluation":
        return (
            torch.nonzero(dataset.split == 0).squeeze(1),
            torch.nonzero(dataset.split == 1).squeeze(1),
        )
    if split == "paper-1200":
        order = torch.arange(len(dataset.names))
        return order[:PAPER_TRAIN_CHARACTERS], order[PAPER_TRAIN_CHARACTERS:]
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------------------------
# Episodes


class Episodes(NamedTuple):
    """A batch of B episodes of T = ways + 1 steps: one image of each class with its label, in a
    random order, then the test image."""

    images: torch.Tensor  # (B, T, 31, 31)
    label_inputs: torch.Tensor  # (B, T, ways): one-hot label at the presentation steps, 0 at test
    classes: torch.Tensor  # (B, T): the class shown at each step; the last is the target
    characters: torch.Tensor  # (B, ways): the character of each class
    quarter_turns: torch.Tensor  # (B, ways): the rotation of each class (counter-clockwise)
    drawings: torch.Tensor  # (B, T): the drawing shown at each step

    @property
    def target(self):
        return self.classes[:, -1]

    def to(self, device, dtype=None):
        """Moved to `device`, the float tensors converted to `dtype` (if given)."""
        return Episodes(*(t.to(device, dtype if t.is_floating_point() else t.dtype) for t in self))


def rotate(images, quarter_turns):
    """Each image (..., S, S) turned by its number of quarter turns (counter-clockwise)."""
    out = images.clone()
    for k in (1, 2, 3):
        chosen = quarter_turns == k
        out[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return out


def make_episodes(images, characters, batch_size, generator, ways=5, rotations=True):
    """B episodes drawn from `characters` (an index tensor into images (C, D, S, S)) on the CPU
    from `generator`: `ways` distinct characters, each turned by a random multiple of 90 degrees
    when `rotations` (a turned character is another class), two distinct drawings of each, one
    shown with its label and one kept for the test; the classes are shown in a random order,
    then the test image of one of them."""
    B, g, n_drawings = batch_size, generator, images.shape[1]
    chosen = characters[torch.rand(B, len(characters), generator=g).argsort(1)[:, :ways]]
    quarter_turns = torch.randint(0, 4 if rotations else 1, (B, ways), generator=g)
    pair = torch.rand(B, ways, n_drawings, generator=g).argsort(2)[..., :2]  # shown, test
    order = torch.rand(B, ways, generator=g).argsort(1)
    target = torch.randint(0, ways, (B, 1), generator=g)
    classes = torch.cat([order, target], 1)
    drawings = torch.cat([pair[..., 0].gather(1, order), pair[..., 1].gather(1, target)], 1)
    shown = images[chosen.gather(1, classes), drawings]
    label_inputs = torch.cat([F.one_hot(order, ways).float(), torch.zeros(B, 1, ways)], 1)
    return Episodes(
        rotate(shown, quarter_turns.gather(1, classes)),
        label_inputs,
        classes,
        chosen,
        quarter_turns,
        drawings,
    )


def episode_options(args):
    """make_episodes' keyword arguments from the command line."""
    return dict(ways=args.ways, rotations=args.rotations)


# ----------------------------------------------------------------------------------------------
# The network


class OmniglotNet(nn.Module):
    """Convolutions `features` (64 per image) feeding the plastic layer: parameters w (P, N),
    alpha (P, N), or () with alpha="scalar", and the scalar Oja rate eta; P = channels,
    N = ways. The trace hebb (B, P, N) is zero at the start of every episode."""

    def __init__(self, ways=5, channels=64, alpha="full", label_scale=1000.0, impl="fused"):
        super().__init__()
        if alpha not in ("full", "scalar"):
            raise ValueError(f"alpha must be 'full' or 'scalar', got {alpha!r}")
        layers = []
        for in_channels in (1, channels, channels, channels):
            conv = nn.Conv2d(in_channels, channels, 3, stride=2)
            # PyTorch's default initialisation shrinks the activity through the four tanh
            # layers to ~0.05, where the plastic term (~ |x|^2) vanishes and training stalls at
            # chance; Xavier's with the tanh gain keeps the features of order 1.
            nn.init.xavier_uniform_(conv.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.Tanh()]
        self.features = nn.Sequential(*layers)
        self.w = nn.Parameter(0.01 * torch.randn(channels, ways))
        self.alpha = nn.Parameter(
            0.01 * torch.randn(channels, ways) if alpha == "full" else torch.tensor(0.01)
        )
        self.eta = nn.Parameter(torch.tensor(0.01))
        self.label_scale, self.impl = label_scale, impl

    def embed(self, images):
        """(B, T, S, S) -> (B, T, channels), all images in one call of the convolutions."""
        B, T = images.shape[:2]
        return self.features(images.reshape(B * T, 1, *images.shape[2:])).reshape(B, T, -1)

    def forward(self, images, label_inputs):
        """The plastic layer's u (B, T, ways) at every step, before the label is added: the
        logits of the test step are the last. The trace learns at every step but the last."""
        ops = bp.fused if self.impl == "fused" else bp.reference
        x = self.embed(images).transpose(0, 1).contiguous()  # (T, B, P)
        labels = label_inputs.transpose(0, 1)
        hebb = x.new_zeros(x.shape[1], x.shape[2], self.w.shape[1])
        outputs = []
        for t in range(x.shape[0]):
            u = ops.plastic_matvec(x[t], self.w, self.alpha, hebb)
            outputs.append(u)
            if t < x.shape[0] - 1:  # the trace after the test step would never be read
                post = F.softmax(u + self.label_scale * labels[t], 1)
                hebb, _ = ops.hebb_update(hebb, x[t], post, self.eta, "oja", OJA_CLIP)
        return torch.stack(outputs, 1)


def make_model(args):
    return OmniglotNet(args.ways, args.channels, args.alpha, args.label_scale, args.impl)


# ----------------------------------------------------------------------------------------------
# Loss, accuracy, training and evaluation


def test_step_loss(outputs, episodes):
    """(cross-entropy of the test step's softmax with the true class, number of episodes whose
    largest output is the true class)."""
    logits = outputs[:, -1]
    correct = (logits.argmax(1) == episodes.target).sum().item()
    return F.cross_entropy(logits, episodes.target), correct


def learning_rate(args, iteration):
    """--lr, multiplied by --lr-gamma every --lr-step iterations (0: constant): a function of the
    iteration alone, so that a resumed run needs no scheduler state."""
    return args.lr * args.lr_gamma ** ((iteration - 1) // args.lr_step) if args.lr_step else args.lr


def train_step(model, optimizer, episodes, lr):
    """One Adam step on a batch of episodes at learning rate `lr`; returns the loss, the accuracy
    and lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, correct = test_step_loss(model(episodes.images, episodes.label_inputs), episodes)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return dict(loss=loss.item(), accuracy=correct / len(episodes.target), lr=lr)


def wilson_interval(successes, n, z=1.96):
    """The Wilson score interval of a binomial proportion (95% for z = 1.96): unlike the normal
    approximation it stays inside [0, 1] and keeps its coverage near 0 and 1."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@torch.no_grad()
def evaluate(model, images, characters, args, n_episodes, seed=EVAL_SEED):
    """Mean loss, accuracy and its 95% Wilson interval over n_episodes fresh episodes of
    `characters`, drawn in batches of --batch-size from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct, done = 0.0, 0, 0
    while done < n_episodes:
        size = min(args.batch_size, n_episodes - done)
        episodes = make_episodes(images, characters, size, generator, **episode_options(args)).to(
            args.device
        )
        loss, right = test_step_loss(model(episodes.images, episodes.label_inputs), episodes)
        loss_sum += size * loss.item()
        correct += right
        done += size
    return dict(
        loss=loss_sum / n_episodes,
        accuracy=correct / n_episodes,
        **dict(zip(("ci_low", "ci_high"), wilson_interval(correct, n_episodes))),
        correct=correct,
        episodes=n_episodes,
    )


def train(args, dataset, train_characters, test_characters, out):
    """Trains the network on episodes of the training characters (resuming from the checkpoint
    with --resume), evaluating it every --eval-every iterations on --eval-episodes episodes of
    the test characters; returns it. Writes <out>/train.csv, eval.csv and checkpoint.pt."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_model(args).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    checkpoint = RunCheckpoint(
        out / "checkpoint.pt", args, RESUME_MAY_CHANGE, model, optimizer, generator
    )
    done = checkpoint.resume() if args.resume else 0
    # the rows up to the checkpoint; none without one (the run starts afresh, from iteration 0)
    resume_csv(out / "train.csv", LOG_FIELDS, "iteration", done)
    resume_csv(out / "eval.csv", EVAL_FIELDS, "iteration", done)

    def log_evaluation(iteration):
        result = evaluate(model, dataset.images, test_characters, args, args.eval_episodes)
        append_csv(
            out / "eval.csv",
            EVAL_FIELDS,
            [
                dict(
                    iteration=iteration,
                    episodes=iteration * args.batch_size,
                    **{k: result[k] for k in EVAL_FIELDS[2:]},
                )
            ],
        )
        return result

    if args.eval_every and done == 0:
        log_evaluation(0)  # the untrained network: chance level

    def step(iteration):
        episodes = make_episodes(
            dataset.images, train_characters, args.batch_size, generator, **episode_options(args)
        )
        return train_step(
            model, optimizer, episodes.to(args.device), learning_rate(args, iteration)
        )

    def evaluate_every(iteration, bar):
        if args.eval_every and iteration % args.eval_every == 0:
            bar.write(
                f"iteration {iteration}: test accuracy "
                f"{log_evaluation(iteration)['accuracy']:.3f} on {args.eval_episodes} "
                f"episodes"
            )

    train_iterations(
        args, "omniglot", checkpoint, done, out / "train.csv", LOG_FIELDS, step, evaluate_every
    )
    return model


# ----------------------------------------------------------------------------------------------
# Command line


def make_parser():
    p = preset_parser(__doc__.split("\n\n")[0], PRESETS)
    add = p.add_argument
    add(
        "--data",
        default=None,
        help="omniglot.npz, a folder holding it, or the folder of the original images_background "
        "and images_evaluation; default $BACKPROPAMINE_DATA/omniglot/omniglot.npz",
    )
    add(
        "--split",
        choices=SPLITS,
        default="background-evaluation",
        help="training / test characters: the official background / evaluation sets, or the "
        "paper's first 1200 characters / the other 423",
    )
    add("--seed", type=SEED, default=0, help="seed of the initialisation and the episodes")
    add("--ways", type=number(int, 2), default=5, help="classes per episode")
    add(
        "--rotations",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn each class by a random multiple of 90 degrees (a new class), in training and "
        "test episodes",
    )
    add("--channels", type=number(int, 1), default=64, help="channels of each convolution")
    add(
        "--alpha",
        choices=("full", "scalar"),
        default="full",
        help="plasticity coefficients: one per connection, or one for the layer (the ablation)",
    )
    add(
        "--label-scale",
        type=number(float, 0, strict=True),
        default=1000.0,
        help="factor of the one-hot label added to the plastic layer's output while shown",
    )
    add("--iterations", type=number(int, 1), default=2000, help="batches of episodes to train on")
    add("--batch-size", type=number(int, 1), default=16, help="episodes per iteration")
    add("--lr", type=number(float, 0, strict=True), default=1e-3, help="Adam learning rate")
    add(
        "--lr-step",
        type=number(int, 0),
        default=0,
        help="multiply the learning rate by --lr-gamma every this many iterations (0: never)",
    )
    add("--lr-gamma", type=number(float, 0, strict=True), default=0.666, help="see --lr-step")
    add(
        "--impl",
        choices=("fused", "reference"),
        default="fused",
        help="the plastic layer's ops: fused kernels, or the pure-PyTorch reference",
    )
    add("--device", type=torch_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    add("--out", default="runs/omniglot", help="folder of the logs, checkpoint and plots")
    add("--log-every", type=number(int, 1), default=10, help="iterations per train.csv row")
    add("--save-every", type=number(int, 1), default=100, help="iterations between checkpoints")
    add(
        "--eval-every",
        type=number(int, 0),
        default=250,
        help="iterations between evaluations on --eval-episodes test episodes (0: none)",
    )
    add(
        "--eval-episodes",
        type=number(int, 1),
        default=200,
        help="test episodes of each evaluation during training",
    )
    add(
        "--test-episodes",
        type=number(int, 1),
        default=1000,
        help="test episodes of the final evaluation (test.json)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (a finished run is only evaluated)",
    )
    return p


def parse_args(argv=None):
    """Parses with the chosen preset's defaults (flags given explicitly still win)."""
    return parse_with_preset(make_parser(), PRESETS, argv)


def check_dataset(dataset, characters, args):
    """Exits with a message when the data cannot make the episodes asked for."""
    train_characters, test_characters = characters
    for role, chosen in (("training", train_characters), ("test", test_characters)):
        if len(chosen) < args.ways:
            raise SystemExit(
                f"--ways {args.ways}: the {args.split} split has only "
                f"{len(chosen)} {role} characters"
            )
    if dataset.images.shape[1] < 2:
        raise SystemExit(
            f"--data: each character needs 2 drawings (one shown, one tested), "
            f"got {dataset.images.shape[1]}"
        )


def main(argv=None):
    """Trains, tests on --test-episodes fresh episodes of the test characters (test.json: the
    result, the options and a manifest), plots the curves (curves.png) and one test episode
    (episode.png); returns the test result."""
    args = parse_args(argv)
    require_extras()
    require_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_omniglot(args.data)
    train_characters, test_characters = split_characters(dataset, args.split)
    check_dataset(dataset, (train_characters, test_characters), args)
    print(
        f"{len(train_characters)} training and {len(test_characters)} test characters "
        f"({args.split}), {dataset.images.shape[1]} drawings each; "
        f"{count_parameters(make_model(args)):,} parameters",
        flush=True,
    )
    started = time.time()
    model = train(args, dataset, train_characters, test_characters, out)
    result = evaluate(model, dataset.images, test_characters, args, args.test_episodes)
    result.update(
        interval="95% Wilson score",
        split=args.split,
        test_characters=len(test_characters),
        iterations=args.iterations,
        training_episodes=args.iterations * args.batch_size,
        seed=args.seed,
        alpha=args.alpha,
        impl=args.impl,
    )
    write_json(out / "test.json", dict(result, options=vars(args)), started=started)
    plot_curves(out, args, out / "curves.png")
    plot_episode(model, dataset.images, test_characters, args, out / "episode.png")
    print(
        f"test accuracy on {args.test_episodes} episodes of the {len(test_characters)} test "
        f"characters: {100 * result['accuracy']:.1f}% (95% CI {100 * result['ci_low']:.1f} to "
        f"{100 * result['ci_high']:.1f}); chance {100 / args.ways:.0f}%"
    )
    return result


# ----------------------------------------------------------------------------------------------
# Plots


def plot_curves(out, args, path):
    """Training loss and accuracy against iterations, with the test accuracy of the periodic
    evaluations and its 95% interval."""
    train_log, eval_log = read_csv_columns(out / "train.csv"), read_csv_columns(out / "eval.csv")
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(train_log["iteration"], train_log["loss"], label="training episodes")
    bottom.plot(train_log["iteration"], train_log["accuracy"], label="training episodes")
    if eval_log:
        top.plot(
            eval_log["iteration"],
            eval_log["loss"],
            "o-",
            label=f"test characters ({args.eval_episodes} episodes)",
        )
        low, high = eval_log["ci_low"], eval_log["ci_high"]
        bottom.errorbar(
            eval_log["iteration"],
            eval_log["accuracy"],
            fmt="o-",
            capsize=3,
            yerr=[
                [a - lo for a, lo in zip(eval_log["accuracy"], low)],
                [hi - a for a, hi in zip(eval_log["accuracy"], high)],
            ],
            label=f"test characters ({args.eval_episodes} episodes, 95% CI)",
        )
    bottom.axhline(1 / args.ways, color="grey", lw=0.8, ls="--", label="chance")
    top.set(
        ylabel="loss (cross-entropy)",
        title=f"Omniglot {args.ways}-way 1-shot ({args.split} split, seed {args.seed})\n"
        f"{args.batch_size} episodes per iteration",
    )
    bottom.set(xlabel="iteration", ylabel="accuracy", ylim=(0, 1))
    top.legend()
    bottom.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_episode(model, images, characters, args, path):
    """One test episode: the labelled images in the order shown, the test image, and the
    network's output (softmax) at the test step."""
    episodes = make_episodes(
        images, characters, 1, torch.Generator().manual_seed(EVAL_SEED), **episode_options(args)
    )
    shown = episodes.to(args.device)
    outputs = model(shown.images, shown.label_inputs).cpu()
    probabilities = F.softmax(outputs[0, -1], 0)
    classes, T = episodes.classes[0].tolist(), len(episodes.classes[0])
    plt = pyplot()
    fig, axes = plt.subplots(1, T + 1, figsize=(1.6 * (T + 2), 2.2), width_ratios=[1] * T + [2])
    for t, ax in enumerate(axes[:T]):
        ax.imshow(episodes.images[0, t].numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"label {classes[t]}" if t < T - 1 else "test image", fontsize=9)
        ax.set(xticks=[], yticks=[])
    target = classes[-1]
    axes[T].bar(
        range(args.ways),
        probabilities.numpy(),
        color=["tab:green" if k == target else "tab:grey" for k in range(args.ways)],
    )
    axes[T].set(
        xticks=range(args.ways), ylim=(0, 1), xlabel="class", title=f"output (true class {target})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    with out_of_memory_exits("--batch-size or --channels"):
        main()
