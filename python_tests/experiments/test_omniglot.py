"""The Omniglot experiment (experiments/omniglot) on a tiny synthetic Omniglot written in the
format of omniglot.npz and of the original PNG folders: loading, the character split, the episode
generator, the plastic layer against the reference ops, fused against reference, learning, exact
resume, the script end to end, flag validation; and, when BACKPROPAMINE_DATA holds
omniglot/omniglot.npz, the real data."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backpropamine_cuda as bp

from helpers import ROOT, assert_parser_error, log_rows_without_timings

if not (ROOT / "experiments" / "omniglot").is_dir():
    pytest.skip("experiments/ is not next to the tests", allow_module_level=True)
from experiments.omniglot import omniglot  # noqa: E402

BACKGROUND, EVALUATION = 10, 7  # synthetic characters per split
DRAWINGS, SIZE = 4, 42  # 42 is not a multiple of 8: packbits pads each row


def synthetic_ink(seed=0):
    """(characters, drawings, SIZE, SIZE) bool, True = ink: each character a random pattern of
    6x6 blocks, each drawing of it with 3% of its pixels flipped. Easy to tell apart."""
    rng = np.random.default_rng(seed)
    blocks = rng.random((BACKGROUND + EVALUATION, 6, 6)) < 0.3
    templates = blocks.repeat(SIZE // 6, axis=1).repeat(SIZE // 6, axis=2)
    flips = rng.random((len(templates), DRAWINGS, SIZE, SIZE)) < 0.03
    return templates[:, None] ^ flips


def synthetic_names():
    """(alphabet, character) per character, in the order of omniglot.npz (sorted per split)."""
    return [(f"Alpha_{k // 4}", f"character{k % 4 + 1:02d}") for k in range(BACKGROUND)] + [
        (f"Omega_{k // 4}", f"character{k % 4 + 1:02d}") for k in range(EVALUATION)
    ]


def write_npz(path, ink):
    names = synthetic_names()
    np.savez_compressed(
        path,
        ink=np.packbits(ink, axis=-1),
        shape=np.array(ink.shape),
        alphabet=np.array([a for a, _ in names]),
        character=np.array([c for _, c in names]),
        split=np.array([0] * BACKGROUND + [1] * EVALUATION, dtype=np.int8),
        drawing=np.array(
            [[f"{k:04d}_{d + 1:02d}" for d in range(ink.shape[1])] for k in range(len(ink))]
        ),
    )


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("omniglot") / "omniglot.npz"
    write_npz(path, synthetic_ink())
    return path


@pytest.fixture(scope="module")
def dataset(data_file):
    return omniglot.load_npz(data_file)


def tiny_flags(data_file):
    """A small, fast setting of the flags."""
    return [
        "--data",
        str(data_file),
        "--channels",
        "8",
        "--batch-size",
        "4",
        "--log-every",
        "2",
        "--save-every",
        "4",
        "--eval-every",
        "4",
        "--eval-episodes",
        "6",
        "--test-episodes",
        "10",
    ]


# ----------------------------------------------------------------------------------------------
# Data


def test_npz_round_trip(data_file, dataset):
    """packbits along the last axis, unpacked and cut to the width; a set bit is ink; every
    image downscaled to 31x31 by area averaging."""
    ink = synthetic_ink()
    assert dataset.images.shape == (BACKGROUND + EVALUATION, DRAWINGS, 31, 31)
    expected = F.interpolate(
        torch.from_numpy(ink).float().reshape(-1, 1, SIZE, SIZE), size=(31, 31), mode="area"
    ).reshape(dataset.images.shape)
    torch.testing.assert_close(dataset.images, expected)
    assert dataset.split.tolist() == [0] * BACKGROUND + [1] * EVALUATION
    assert dataset.names[0] == "Alpha_0/character01" and dataset.names[-1] == "Omega_1/character03"
    blank = np.zeros((1, 1, SIZE, SIZE), bool)
    blank[..., : SIZE // 2, :] = True  # ink in the top half
    path = data_file.parent / "half.npz"
    np.savez(
        path,
        ink=np.packbits(blank, axis=-1),
        shape=np.array(blank.shape),
        alphabet=np.array(["a"]),
        character=np.array(["c"]),
        split=np.array([0]),
    )
    image = omniglot.load_npz(path).images[0, 0]
    assert (image[:10] == 1).all() and (image[-10:] == 0).all()


def test_npz_format_errors(tmp_path):
    ink = np.zeros((2, 3, 10, 10), bool)
    np.savez(
        tmp_path / "no_split.npz",
        ink=np.packbits(ink, axis=-1),
        shape=np.array(ink.shape),
        alphabet=np.array(["a", "a"]),
        character=np.array(["b", "c"]),
    )
    with pytest.raises(ValueError, match=r"missing \['split'\]"):
        omniglot.load_npz(tmp_path / "no_split.npz")
    np.savez(
        tmp_path / "wrong.npz",
        ink=np.packbits(ink, axis=-1),
        shape=np.array([2, 3, 10, 20]),
        alphabet=np.array(["a", "a"]),
        character=np.array(["b", "c"]),
        split=np.zeros(2),
    )
    with pytest.raises(
        ValueError, match=r"expected for shape \(2, 3, 10, 20\), got \(2, 3, 10, 2\)"
    ):
        omniglot.load_npz(tmp_path / "wrong.npz")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("garbage", "cannot read {path}: "),
        ("truncated", "cannot read {path}: BadZipFile"),
        ("missing-array", "{path}: expected the arrays ink, shape, alphabet, character, split"),
    ],
)
def test_a_damaged_npz_exits_naming_it(tmp_path, data_file, damage, message):
    path = tmp_path / "omniglot.npz"
    if damage == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" * 100)
    elif damage == "truncated":
        path.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    else:
        np.savez(path, ink=np.zeros((1, 1, 1, 1), np.uint8))
    with pytest.raises(SystemExit) as exit:
        omniglot.main(["--data", str(path), "--out", str(tmp_path / "out")])
    assert str(exit.value).startswith("--data: " + message.format(path=path)), exit.value


def test_a_damaged_png_exits_naming_it(tmp_path):
    for folder in ("images_background", "images_evaluation"):
        (tmp_path / folder / "Alpha" / "character01").mkdir(parents=True)
    bad = tmp_path / "images_background" / "Alpha" / "character01" / "01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(SystemExit) as exit:
        omniglot.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert str(exit.value).startswith(f"--data: cannot read {bad}: "), exit.value


def test_original_folders_give_the_same_dataset(tmp_path, dataset):
    """images_background/<alphabet>/<character>/*.png (black ink on white), read in the order of
    the npz file."""
    from matplotlib.image import imsave

    ink = synthetic_ink()
    for k, (alphabet, character) in enumerate(synthetic_names()):
        folder = (
            tmp_path
            / ("images_background" if k < BACKGROUND else "images_evaluation")
            / alphabet
            / character
        )
        folder.mkdir(parents=True)
        for d in range(DRAWINGS):
            imsave(
                folder / f"{k:04d}_{d + 1:02d}.png",
                (~ink[k, d]).astype(float),
                cmap="gray",
                vmin=0,
                vmax=1,
            )
    from_folders = omniglot.load_omniglot(tmp_path)
    torch.testing.assert_close(from_folders.images, dataset.images)
    assert torch.equal(from_folders.split, dataset.split)
    assert from_folders.names == dataset.names


def test_where_the_data_is_found(tmp_path, data_file, monkeypatch):
    for given in (data_file, data_file.parent):
        assert omniglot.find_data(given) == data_file
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "omniglot.npz").write_bytes(data_file.read_bytes())
    monkeypatch.setenv("BACKPROPAMINE_DATA", str(tmp_path))
    assert omniglot.find_data(None) == tmp_path / "omniglot" / "omniglot.npz"
    with pytest.raises(SystemExit, match="--data: expected omniglot.npz.*got /nowhere"):
        omniglot.find_data("/nowhere")
    monkeypatch.delenv("BACKPROPAMINE_DATA")
    with pytest.raises(SystemExit, match="or set BACKPROPAMINE_DATA"):
        omniglot.find_data(None)


def test_splits_never_share_a_character():
    C = 1250
    dataset = omniglot.Omniglot(
        torch.zeros(C, 2, 31, 31),
        torch.tensor([0] * 964 + [1] * (C - 964), dtype=torch.int8),
        [f"a/c{k}" for k in range(C)],
    )
    for split, n_train in (("background-evaluation", 964), ("paper-1200", 1200)):
        train, test = omniglot.split_characters(dataset, split)
        assert len(train) == n_train and len(test) == C - n_train
        assert not set(train.tolist()) & set(test.tolist())
        assert sorted(train.tolist() + test.tolist()) == list(range(C))
    train, _ = omniglot.split_characters(dataset, "background-evaluation")
    assert (dataset.split[train] == 0).all()
    with pytest.raises(ValueError, match="split must be one of"):
        omniglot.split_characters(dataset, "random")


def test_training_never_sees_a_test_character(dataset, data_file, tmp_path):
    """With the test characters' images set to NaN, training stays finite."""
    poisoned = dataset._replace(images=dataset.images.clone())
    train, test = omniglot.split_characters(poisoned, "background-evaluation")
    poisoned.images[test] = float("nan")
    args = omniglot.parse_args(
        [*tiny_flags(data_file), "--iterations", "6", "--eval-every", "0", "--out", str(tmp_path)]
    )
    model = omniglot.train(args, poisoned, train, test, tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Episodes


def make_episodes(batch_size=32, seed=0, ways=5, rotations=True):
    images = torch.rand(12, 3, 31, 31, generator=torch.Generator().manual_seed(99))  # not
    # symmetric: rotations show
    characters = torch.tensor([0, 2, 3, 5, 6, 7, 8, 11])
    episodes = omniglot.make_episodes(
        images, characters, batch_size, torch.Generator().manual_seed(seed), ways, rotations
    )
    return images, characters, episodes


def test_episodes():
    """Distinct classes from the given characters, each shown once with its label in a random
    order; the test image is another drawing of one of them, in the same rotation, unlabelled."""
    images, characters, episodes = make_episodes()
    B, T = 32, 6
    assert episodes.images.shape == (B, T, 31, 31) and episodes.label_inputs.shape == (B, T, 5)
    for b in range(B):
        chars = episodes.characters[b].tolist()
        assert len(set(chars)) == 5 and set(chars) <= set(characters.tolist())
        classes = episodes.classes[b].tolist()
        assert sorted(classes[:5]) == list(range(5))  # each class shown once
        assert torch.equal(
            episodes.label_inputs[b, :5], F.one_hot(episodes.classes[b, :5], 5).float()
        )
        assert (episodes.label_inputs[b, 5] == 0).all()  # no label at the test step
        target = episodes.target[b].item()
        shown_at = classes.index(target)
        assert episodes.drawings[b, 5] != episodes.drawings[b, shown_at]
        for t, k in enumerate(classes):
            turned = torch.rot90(
                images[chars[k], episodes.drawings[b, t]],
                episodes.quarter_turns[b, k].item(),
                dims=(0, 1),
            )
            assert torch.equal(episodes.images[b, t], turned), (b, t)
    assert set(episodes.quarter_turns.flatten().tolist()) == {0, 1, 2, 3}
    assert set(episodes.target.tolist()) == set(range(5))
    assert torch.equal(make_episodes(seed=1)[2].images, make_episodes(seed=1)[2].images)
    assert not torch.equal(make_episodes(seed=1)[2].images, make_episodes(seed=2)[2].images)


def test_episodes_without_rotations_and_other_ways():
    images, _, episodes = make_episodes(ways=3, rotations=False)
    assert (episodes.quarter_turns == 0).all() and episodes.images.shape[1] == 4
    first = episodes.classes[0, 0]
    assert torch.equal(
        episodes.images[0, 0], images[episodes.characters[0, first], episodes.drawings[0, 0]]
    )


# ----------------------------------------------------------------------------------------------
# The network


def plastic_net(impl, channels=6, alpha="full", dtype=torch.float64):
    torch.manual_seed(3)
    net = omniglot.OmniglotNet(ways=5, channels=channels, alpha=alpha, impl=impl).to(dtype)
    with torch.no_grad():  # plasticity that matters
        net.alpha.normal_(0.5, 0.3)
        net.eta.fill_(0.4)
    return net


@pytest.mark.parametrize("alpha", ["full", "scalar"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_plastic_layer_is_the_reference_ops_step_by_step(impl, alpha):
    """u = x @ (w + alpha * hebb); at each presentation step softmax(u + 1000 * label), Oja's
    rule, hebb starting at 0; the test step's u are the logits. After the presentations, the
    trace's column c holds eta times the features of the image of class c."""
    net = plastic_net(impl, alpha=alpha)
    _, _, episodes = make_episodes(batch_size=3)
    episodes = episodes.to("cpu", torch.float64)
    outputs = net(episodes.images, episodes.label_inputs)
    x = net.embed(episodes.images)
    hebb = torch.zeros(3, 6, 5, dtype=torch.float64)
    for t in range(6):
        u = bp.reference.plastic_matvec(x[:, t], net.w, net.alpha, hebb)
        torch.testing.assert_close(outputs[:, t], u, rtol=1e-12, atol=1e-12)
        post = F.softmax(u + 1000 * episodes.label_inputs[:, t], 1)
        hebb, _ = bp.reference.hebb_update(hebb, x[:, t], post, net.eta, "oja", 2.0)
        if t == 4:
            shown = torch.zeros(3, 5, 6, dtype=torch.float64)  # features of class c's image
            shown[torch.arange(3)[:, None], episodes.classes[:, :5]] = x[:, :5]
            torch.testing.assert_close(hebb, net.eta * shown.transpose(1, 2))
    assert net.alpha.shape == ((6, 5) if alpha == "full" else ())


def test_fused_and_reference_give_the_same_loss_and_gradients():
    _, _, episodes = make_episodes(batch_size=4)
    episodes = episodes.to("cpu", torch.float64)
    results = []
    for impl in ("fused", "reference"):
        net = plastic_net(impl)
        loss, _ = omniglot.test_step_loss(net(episodes.images, episodes.label_inputs), episodes)
        loss.backward()
        results.append((loss, {name: p.grad for name, p in net.named_parameters()}))
    (loss_fused, grads_fused), (loss_reference, grads_reference) = results
    torch.testing.assert_close(loss_fused, loss_reference, rtol=1e-12, atol=1e-12)
    for name, grad in grads_fused.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads_reference[name], rtol=1e-10, atol=1e-12, msg=name)


def test_loss_and_accuracy_score_the_test_step():
    _, _, episodes = make_episodes(batch_size=4)
    outputs = torch.randn(4, 6, 5, requires_grad=True)
    loss, correct = omniglot.test_step_loss(outputs, episodes)
    torch.testing.assert_close(loss, F.cross_entropy(outputs[:, -1], episodes.target))
    assert correct == (outputs[:, -1].argmax(1) == episodes.target).sum().item()
    loss.backward()
    assert (outputs.grad[:, :-1] == 0).all()


def test_unknown_alpha():
    with pytest.raises(ValueError, match="alpha must be 'full' or 'scalar', got 'neuron'"):
        omniglot.OmniglotNet(alpha="neuron")


def test_a_few_dozen_iterations_learn(dataset, data_file):
    args = omniglot.parse_args([*tiny_flags(data_file), "--channels", "16", "--batch-size", "16"])
    train, _ = omniglot.split_characters(dataset, args.split)
    torch.manual_seed(0)
    net = omniglot.make_model(args)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = omniglot.evaluate(net, dataset.images, train, args, 64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        episodes = omniglot.make_episodes(
            dataset.images, train, 16, generator, **omniglot.episode_options(args)
        )
        omniglot.train_step(net, optimizer, episodes, 1e-2)
    after = omniglot.evaluate(net, dataset.images, train, args, 64)
    assert after["loss"] < 0.5 * before["loss"]
    assert before["accuracy"] < 0.4 < 0.8 < after["accuracy"]


# ----------------------------------------------------------------------------------------------
# Evaluation, training, the script


def test_wilson_interval():
    low, high = omniglot.wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = omniglot.wilson_interval(0, 10)
    assert low == pytest.approx(0, abs=1e-12) and round(high, 4) == 0.2775
    low, high = omniglot.wilson_interval(980, 1000)
    assert low < 0.98 < high < 1


def test_learning_rate_steps():
    args = omniglot.parse_args(["--lr", "0.1", "--lr-step", "3", "--lr-gamma", "0.5"])
    assert [omniglot.learning_rate(args, i) for i in range(1, 8)] == [
        0.1,
        0.1,
        0.1,
        0.05,
        0.05,
        0.05,
        0.025,
    ]
    assert omniglot.learning_rate(omniglot.parse_args([]), 10_000) == 1e-3


def test_resume_continues_exactly(tmp_path, data_file):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    flags = tiny_flags(data_file)
    omniglot.main([*flags, "--iterations", "8", "--out", str(whole)])
    omniglot.main([*flags, "--iterations", "4", "--out", str(interrupted)])
    omniglot.main([*flags, "--iterations", "8", "--out", str(interrupted), "--resume"])
    for log in ("train.csv", "eval.csv"):
        assert log_rows_without_timings(whole / log) == log_rows_without_timings(
            interrupted / log
        ), log
    assert [row["iteration"] for row in log_rows_without_timings(whole / "eval.csv")] == [
        "0",
        "4",
        "8",
    ]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, interrupted))
    assert a["iteration"] == b["iteration"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    results = [json.loads((d / "test.json").read_text()) for d in (whole, interrupted)]
    for result in results:  # the manifests and the options (--out, --resume) differ
        del result["manifest"], result["options"]
    assert results[0] == results[1]
    with pytest.raises(SystemExit, match="--ways 5 there, 4 here"):
        omniglot.main(
            [*flags, "--iterations", "10", "--out", str(interrupted), "--resume", "--ways", "4"]
        )
    with pytest.raises(SystemExit, match="is at iteration 8, past --iterations 6"):
        omniglot.main([*flags, "--iterations", "6", "--out", str(interrupted), "--resume"])
    # logs without a checkpoint (killed before the first): the run starts afresh
    (interrupted / "checkpoint.pt").unlink()
    omniglot.main([*flags, "--iterations", "8", "--out", str(interrupted), "--resume"])
    for log in ("train.csv", "eval.csv"):
        assert log_rows_without_timings(whole / log) == log_rows_without_timings(
            interrupted / log
        ), log


def test_script_end_to_end(tmp_path, data_file):
    result = omniglot.main(
        [
            *tiny_flags(data_file),
            "--iterations",
            "5",
            "--seed",
            "2",
            "--alpha",
            "scalar",
            "--impl",
            "reference",
            "--out",
            str(tmp_path),
        ]
    )
    for name in (
        "train.csv",
        "eval.csv",
        "test.json",
        "checkpoint.pt",
        "curves.png",
        "episode.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert [row["iteration"] for row in log_rows_without_timings(tmp_path / "train.csv")] == [
        "2",
        "4",
        "5",
    ]
    saved = json.loads((tmp_path / "test.json").read_text())
    assert {"commit", "torch", "date", "wall_seconds"} <= set(saved.pop("manifest"))
    assert saved.pop("options")["alpha"] == "scalar"
    assert saved == result
    assert saved["episodes"] == 10 and saved["correct"] == round(10 * saved["accuracy"])
    assert 0 <= saved["ci_low"] <= saved["accuracy"] <= saved["ci_high"] <= 1
    assert (saved["split"], saved["test_characters"], saved["alpha"]) == (
        "background-evaluation",
        EVALUATION,
        "scalar",
    )


def test_presets():
    args = omniglot.parse_args(["--preset", "paper"])
    assert (args.split, args.lr, args.lr_step, args.lr_gamma, args.ways, args.alpha) == (
        "paper-1200",
        3e-5,
        100_000,
        0.666,
        5,
        "full",
    )
    assert args.iterations * args.batch_size == 5_000_000
    args = omniglot.parse_args(["--preset", "paper", "--split", "background-evaluation"])
    assert args.split == "background-evaluation"
    args = omniglot.parse_args([])
    assert (
        args.preset,
        args.split,
        args.channels,
        args.label_scale,
        args.rotations,
        args.test_episodes,
    ) == ("quick", "background-evaluation", 64, 1000.0, True, 1000)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ways", "1"], "argument --ways: must be >= 2, got 1"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--eval-every", "-1"], "argument --eval-every: must be >= 0, got -1"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
        (["--label-scale", "inf"], "argument --label-scale: must be a finite number, got inf"),
        (["--lr-gamma", "-0.5"], "argument --lr-gamma: must be > 0, got -0.5"),
        (["--ways", "x"], "argument --ways: invalid int value: 'x'"),
        (
            ["--save-every", "3", "--log-every", "2"],
            "--save-every must be a multiple of --log-every (2), got 3",
        ),
        (["--split", "random"], "argument --split: invalid choice: 'random'"),
        (["--alpha", "neuron"], "argument --alpha: invalid choice: 'neuron'"),
        (["--impl", "cuda"], "argument --impl: invalid choice: 'cuda'"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ],
)
def test_flag_validation(flags, message, capsys):
    assert_parser_error(lambda flags: omniglot.parse_args(flags), flags, message, capsys)


def test_data_that_cannot_make_the_episodes(data_file, tmp_path):
    with pytest.raises(
        SystemExit, match="--ways 8: the background-evaluation split has only 7 test characters"
    ):
        omniglot.main([*tiny_flags(data_file), "--ways", "8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="paper-1200 split has only 0 test characters"):
        omniglot.main([*tiny_flags(data_file), "--split", "paper-1200", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------------
# The real data, when BACKPROPAMINE_DATA points at it


def real_data_file():
    root = os.environ.get("BACKPROPAMINE_DATA")
    path = Path(root) / "omniglot" / "omniglot.npz" if root else None
    return path if path is not None and path.is_file() else None


@pytest.mark.skipif(
    real_data_file() is None, reason="BACKPROPAMINE_DATA does not hold omniglot/omniglot.npz"
)
def test_real_data():
    dataset = omniglot.load_omniglot(real_data_file())
    assert dataset.images.shape == (1623, 20, 31, 31)
    assert 0.02 < dataset.images.mean() < 0.2  # a set bit is ink: strokes on a blank page
    for split, sizes in (("background-evaluation", (964, 659)), ("paper-1200", (1200, 423))):
        train, test = omniglot.split_characters(dataset, split)
        assert (len(train), len(test)) == sizes
    args = omniglot.parse_args(["--batch-size", "8"])
    train, test = omniglot.split_characters(dataset, args.split)
    net = omniglot.make_model(args)
    result = omniglot.evaluate(net, dataset.images, test, args, 8)
    assert np.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
