"""The natural-image memorisation and completion experiment (experiments/images) on synthetic
images: the episode generator and its clamp mask, data loading (npz and CIFAR-10 pickles), the
clamped networks, fused against reference, learning on a tiny setting, exact resume, the script
end to end with its plots, and flag validation."""

import csv
import json
import pickle

import numpy as np
import pytest
import torch

import backpropamine_cuda as bp

from helpers import ROOT, assert_parser_error, log_rows_without_timings

if not (ROOT / "experiments" / "images").is_dir():
    pytest.skip("experiments/ is not next to the tests", allow_module_level=True)
from experiments.images import images  # noqa: E402

TRAIN, TEST = 40, 12  # synthetic images in the data files


def random_rgb(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def block_rgb(n, seed):
    """Images of 4 x 4 blocks, each dark or light at random, plus a little noise per pixel and
    channel: at --size 4 they are nearly binary patterns, which a plastic network learns to
    complete within a few dozen iterations."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (n, 4, 4, 1)).repeat(8, 1).repeat(8, 2) * 200
    return (blocks + rng.integers(0, 56, (n, 32, 32, 3))).astype(np.uint8)


@pytest.fixture(scope="module")
def rgb():
    return block_rgb(TRAIN, 0), block_rgb(TEST, 1)


@pytest.fixture(scope="module")
def npz_file(rgb, tmp_path_factory):
    """A tiny cifar10_subset.npz, under cifar10/ as in $BACKPROPAMINE_DATA."""
    path = tmp_path_factory.mktemp("data") / "cifar10" / images.NPZ_NAME
    path.parent.mkdir()
    np.savez(path, train_images=rgb[0], test_images=rgb[1], train_labels=np.zeros(TRAIN))
    return path


def write_pickles(folder, rgb):
    """The CIFAR-10 python version's layout: the training images split over data_batch_1 and
    data_batch_2, the test images in test_batch; rows of 1024 red, green, then blue bytes."""
    folder.mkdir(parents=True)
    train, test = rgb
    parts = {"data_batch_1": train[:25], "data_batch_2": train[25:], "test_batch": test}
    for name, part in parts.items():
        rows = part.transpose(0, 3, 1, 2).reshape(len(part), 3 * 32 * 32)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0] * len(part)}, f)


# A small, fast setting of the flags (16 pixels + the bias neuron, 2 x 2 x 3 + 2 = 14 steps).
def tiny_flags(npz_file):
    return [
        "--data",
        str(npz_file),
        "--size",
        "4",
        "--images",
        "2",
        "--presentations",
        "2",
        "--presentation-steps",
        "2",
        "--gap-steps",
        "1",
        "--test-steps",
        "2",
        "--batch-size",
        "4",
        "--log-every",
        "2",
        "--save-every",
        "4",
        "--eval-episodes",
        "6",
        "--impl",
        "reference",
    ]


@pytest.fixture
def tiny(npz_file):
    return tiny_flags(npz_file)


def make_episodes(pool=None, batch_size=5, seed=0, **options):
    options = dict(
        dict(images=3, presentations=2, presentation_steps=3, gap_steps=2, test_steps=2), **options
    )
    if pool is None:
        pool = torch.randn(20, 4, 4, generator=torch.Generator().manual_seed(7))
    return images.make_episodes(pool, batch_size, torch.Generator().manual_seed(seed), **options)


# ----------------------------------------------------------------------------------------------
# Episodes


def test_episodes():
    """Each image shown `presentations` times for 3 steps (clamped), blank unclamped gaps of 2,
    every image once per round; then the test image with its top or bottom half erased (input 0,
    not clamped) and the other half shown (clamped); the bias neuron at 1, always clamped."""
    pool = torch.randn(20, 4, 4, generator=torch.Generator().manual_seed(7))
    episodes = make_episodes(pool)
    N, T = 16, 2 * 3 * (3 + 2) + 2
    assert episodes.inputs.shape == episodes.clamp.shape == (T, 5, N + 1)
    assert episodes.clamp.dtype == torch.bool
    assert episodes.images.shape == (5, 3, N) and episodes.target.shape == (5, N)
    assert (episodes.inputs[:, :, N] == 1).all() and episodes.clamp[:, :, N].all()
    inputs, clamp = episodes.inputs[:, :, :N], episodes.clamp[:, :, :N]
    top = torch.arange(N) < N // 2
    for b in range(5):
        indices = episodes.indices[b].tolist()
        assert len(set(indices)) == 3  # distinct images
        assert torch.equal(episodes.images[b], pool.reshape(20, N)[indices])
        shown = []
        for k in range(2 * 3):
            block, pinned = inputs[5 * k : 5 * k + 5, b], clamp[5 * k : 5 * k + 5, b]
            assert (block[:3] == block[0]).all() and pinned[:3].all()
            assert (block[3:] == 0).all() and not pinned[3:].any()
            shown.append(next(i for i in range(3) if torch.equal(block[0], episodes.images[b, i])))
        assert sorted(shown[:3]) == sorted(shown[3:]) == [0, 1, 2]  # a permutation per round
        assert torch.equal(episodes.target[b], episodes.images[b, episodes.test_index[b]])
        erased = episodes.erased[b]
        assert torch.equal(erased, top) or torch.equal(erased, ~top)  # a contiguous half
        for t in (-2, -1):
            assert torch.equal(clamp[t, b], ~erased)
            assert (inputs[t, b][erased] == 0).all()
            assert torch.equal(inputs[t, b][~erased], episodes.target[b][~erased])
    assert episodes.erased[:, 0].any() and not episodes.erased[:, 0].all()  # both halves occur
    assert torch.equal(make_episodes(seed=1).inputs, make_episodes(seed=1).inputs)
    assert not torch.equal(make_episodes(seed=1).inputs, make_episodes(seed=2).inputs)


def test_one_image_no_gap_and_the_smallest_size():
    episodes = make_episodes(
        torch.randn(3, 2, 2),
        batch_size=1,
        images=1,
        presentations=1,
        presentation_steps=1,
        gap_steps=0,
        test_steps=1,
    )
    assert episodes.inputs.shape == (2, 1, 5)
    assert episodes.clamp[0].all() and episodes.erased.sum() == 2
    with pytest.raises(ValueError, match="4 distinct images per episode asked for, the pool has 3"):
        make_episodes(torch.randn(3, 2, 2), images=4)


# ----------------------------------------------------------------------------------------------
# Data


def test_grayscale_and_size():
    """Mean of R, G, B, averaged over squares, each image centred and scaled to [-1, 1]."""
    rgb = random_rgb(3, 5)
    gray = torch.from_numpy(rgb.astype(np.float64).mean(-1))
    for size in (32, 8):
        pooled = gray.reshape(3, size, 32 // size, size, 32 // size).mean((2, 4))
        centred = pooled - pooled.mean((1, 2), keepdim=True)
        expected = centred / centred.abs().amax((1, 2), keepdim=True)
        result = images.grayscale(rgb, size)
        assert result.shape == (3, size, size) and result.dtype == torch.float32
        torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)  # float32
        assert result.abs().amax((1, 2)).tolist() == [1.0] * 3
    flat = images.grayscale(np.full((1, 32, 32, 3), 77, np.uint8), 16)
    assert (flat == 0).all()  # a uniform image: no division by zero


def test_npz_and_pickles_give_the_same_images(npz_file, rgb, tmp_path):
    from_npz = images.load_images(npz_file, 8)
    assert from_npz.train.shape == (TRAIN, 8, 8) and from_npz.test.shape == (TEST, 8, 8)
    torch.testing.assert_close(from_npz.train, images.grayscale(rgb[0], 8))
    torch.testing.assert_close(from_npz.test, images.grayscale(rgb[1], 8))
    for folder in (tmp_path / "plain", tmp_path / "tarball" / images.PICKLE_FOLDER):
        write_pickles(folder, rgb)
        given = folder if folder.name == "plain" else folder.parent
        from_pickles = images.load_images(given, 8)
        assert from_pickles.source == folder
        assert torch.equal(from_pickles.train, from_npz.train)
        assert torch.equal(from_pickles.test, from_npz.test)


def test_where_the_data_is_found(npz_file, tmp_path, monkeypatch):
    root = npz_file.parent.parent
    for given in (npz_file, npz_file.parent, root):
        assert images.find_data(given) == npz_file
    monkeypatch.setenv("BACKPROPAMINE_DATA", str(root))
    assert images.find_data(None) == npz_file
    with pytest.raises(SystemExit, match="--data: expected cifar10_subset.npz.*got /nowhere"):
        images.find_data("/nowhere")
    (tmp_path / "data_batch_1").write_bytes(b"")  # no test_batch: not the pickled version
    with pytest.raises(SystemExit, match="--data: expected"):
        images.find_data(tmp_path)
    monkeypatch.delenv("BACKPROPAMINE_DATA")
    with pytest.raises(SystemExit, match="or set BACKPROPAMINE_DATA"):
        images.find_data(None)


def test_malformed_data(tmp_path):
    """Data in the wrong layout exits with one line naming the file."""
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=random_rgb(2, 0))
    with pytest.raises(SystemExit, match=r"^--data: .*bad.npz: .*missing \['test_images'\]"):
        images.load_images(path, 8)
    with pytest.raises(ValueError, match=r"missing \['test_images'\]"):
        images.read_npz(path)
    np.savez(path, train_images=random_rgb(2, 0)[:, :16], test_images=random_rgb(2, 0))
    with pytest.raises(
        SystemExit,
        match=r"^--data: .*bad.npz train_images: expected \(n, 32, 32, "
        r"3\) uint8",
    ):
        images.load_images(path, 8)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_files_exit_naming_them(npz_file, rgb, tmp_path, damage):
    """A damaged npz or pickle gives one line naming it, not numpy's, zipfile's or pickle's
    traceback."""

    def damage_file(path):
        content = path.read_bytes()
        path.write_bytes(
            b"\x80\x04 garbage" * 50 if damage == "garbage" else content[: len(content) // 2]
        )

    npz = tmp_path / images.NPZ_NAME
    npz.write_bytes(npz_file.read_bytes())
    write_pickles(tmp_path / "pickles", rgb)
    for bad, given in ((npz, npz), (tmp_path / "pickles" / "test_batch", tmp_path / "pickles")):
        damage_file(bad)
        with pytest.raises(SystemExit) as exit:
            images.load_images(given, 8)
        assert str(exit.value).startswith(f"--data: cannot read {bad}: "), exit.value


# ----------------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("network_type", images.TYPES)
def test_clamped_neurons_output_their_input(network_type, tiny):
    args = images.parse_args(tiny)
    net = images.make_network(network_type, args)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    episodes = make_episodes(torch.rand(10, 4, 4) * 2 - 1, batch_size=3, images=2)
    outputs = net(episodes.inputs, episodes.clamp)
    assert outputs.shape == (episodes.inputs.shape[0], 3, 16)
    pinned = episodes.clamp[:, :, :16]
    assert torch.equal(outputs[pinned], episodes.inputs[:, :, :16][pinned])
    free = outputs[~pinned]
    assert (free != 0).all() and (free.abs() < 1).all()  # tanh of a nonzero drive


def test_plastic_net_is_the_op_with_clamps():
    net = images.PlasticNet(16, impl="reference")
    episodes = make_episodes(batch_size=2)
    out, *_ = bp.reference.plastic_rnn_sequence(
        episodes.inputs,
        torch.zeros(2, 17),
        torch.zeros(2, 17, 17),
        None,
        net.w,
        net.alpha,
        net.eta,
        None,
        None,
        None,
        None,
        None,
        rule="decay",
        clamp=episodes.clamp,
    )
    torch.testing.assert_close(net(episodes.inputs, episodes.clamp), out[:, :, :16])
    assert net.w.shape == net.alpha.shape == (17, 17) and net.eta.shape == ()


def test_rnn_is_the_plastic_net_without_plasticity():
    episodes = make_episodes(batch_size=2)
    plastic, rnn = images.PlasticNet(16, impl="reference"), images.RecurrentNet(16)
    with torch.no_grad():
        rnn.w.copy_(plastic.w)
        plastic.alpha.zero_()
    torch.testing.assert_close(
        rnn(episodes.inputs, episodes.clamp), plastic(episodes.inputs, episodes.clamp)
    )


def test_fused_and_reference_give_the_same_loss_and_gradients():
    pool = torch.rand(10, 4, 4, dtype=torch.float64) * 2 - 1
    episodes = make_episodes(pool, batch_size=3).to("cpu", torch.float64)
    results = []
    for impl in ("fused", "reference"):
        torch.manual_seed(4)
        net = images.PlasticNet(16, impl=impl).double()
        with torch.no_grad():
            net.alpha.normal_(0, 0.3)  # plasticity that matters
            net.eta.fill_(0.3)
        outputs = net(episodes.inputs, episodes.clamp)
        loss = images.completion_loss(outputs, episodes.target)
        loss.backward()
        results.append((outputs, loss, {name: p.grad for name, p in net.named_parameters()}))
    (out_fused, loss_fused, grads_fused), (out_reference, loss_reference, grads_reference) = results
    torch.testing.assert_close(out_fused, out_reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_fused, loss_reference, rtol=1e-12, atol=1e-12)
    for name, grad in grads_fused.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads_reference[name], rtol=1e-10, atol=1e-12, msg=name)


def test_unknown_network_type(tiny):
    with pytest.raises(ValueError, match="network_type must be one of"):
        images.make_network("lstm", images.parse_args(tiny))


# ----------------------------------------------------------------------------------------------
# Loss, training, the script


def test_loss_and_error_on_the_erased_half():
    episodes = make_episodes(batch_size=2)
    outputs = episodes.target.expand(4, 2, 16).clone().requires_grad_()
    with torch.no_grad():
        outputs[-1][episodes.erased] += 0.5  # every erased pixel off by 0.5
        outputs[0] += 1.0  # earlier steps are not scored
    assert images.erased_error(outputs, episodes) == pytest.approx(0.25)
    loss = images.completion_loss(outputs, episodes.target)
    assert loss.item() == pytest.approx(0.125)  # half of the pixels erased
    loss.backward()
    assert (outputs.grad[:-1] == 0).all()


def test_a_few_dozen_iterations_learn_completion(tiny):
    """The plastic network learns to complete the block images; the rnn, trained the same way,
    cannot recall images it has never seen."""
    args = images.parse_args([*tiny, "--batch-size", "10", "--lr", "0.01"])
    data = images.load_images(args.data, args.size)
    blank = images.blank_error(data.test, args, 40)
    errors = {}
    for network_type in images.TYPES:
        torch.manual_seed(0)
        net = images.make_network(network_type, args)
        optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
        loss_before, error_before = images.evaluate(net, data.test, args, 40)
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            episodes = images.make_episodes(
                data.train, args.batch_size, generator, **images.episode_options(args)
            )
            images.train_step(net, optimizer, episodes, args.clip_grad)
        loss_after, errors[network_type] = images.evaluate(net, data.test, args, 40)
        if network_type == "plastic":
            assert loss_after < 0.5 * loss_before and errors["plastic"] < 0.5 * error_before
    assert errors["plastic"] < 0.5 * blank and errors["plastic"] < 0.5 * errors["rnn"]


def test_resume_continues_exactly(tiny, tmp_path):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    images.main([*tiny, "--iterations", "8", "--out", str(whole)])
    images.main([*tiny, "--iterations", "4", "--out", str(interrupted)])
    images.main([*tiny, "--iterations", "8", "--out", str(interrupted), "--resume"])
    for network_type in images.TYPES:
        name = f"{network_type}-seed0"
        assert log_rows_without_timings(whole / f"{name}.csv") == log_rows_without_timings(
            interrupted / f"{name}.csv"
        )
        a, b = (
            torch.load(d / f"{name}.checkpoint.pt", weights_only=True) for d in (whole, interrupted)
        )
        assert a["iteration"] == b["iteration"] == 8
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), f"{name} {key}"
    with pytest.raises(SystemExit, match="--gap-steps 1 there, 2 here"):
        images.main(
            [*tiny, "--iterations", "10", "--out", str(interrupted), "--resume", "--gap-steps", "2"]
        )
    with pytest.raises(SystemExit, match="is at iteration 8, past --iterations 6"):
        images.main([*tiny, "--iterations", "6", "--out", str(interrupted), "--resume"])


def test_script_end_to_end(tiny, tmp_path, capsys):
    summary = images.main([*tiny, "--iterations", "5", "--seed", "3", "--out", str(tmp_path)])
    assert set(summary) == set(images.TYPES)
    for name in (
        "curves.png",
        "completion-plastic.png",
        "completion-rnn.png",
        "plastic-seed3.checkpoint.pt",
        "rnn-seed3.csv",
        "evaluation.csv",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = log_rows_without_timings(tmp_path / "plastic-seed3.csv")
    assert [row["iteration"] for row in rows] == ["2", "4", "5"]
    assert set(rows[0]) == {"iteration", "episodes", "loss", "error_erased"}
    saved = json.loads((tmp_path / "plastic-seed3.json").read_text())
    assert (saved["iterations"], saved["episodes"]) == (5, 5 * saved["options"]["batch_size"])
    assert (saved["loss"], saved["error_erased"]) == summary["plastic"]
    assert {"commit", "torch", "date", "wall_seconds"} <= set(saved["manifest"])
    assert "mean squared error on the erased half" in capsys.readouterr().out
    # a second run sharing --out replaces its own evaluation rows and keeps the others'
    images.main(
        [*tiny, "--iterations", "2", "--seed", "3", "--types", "rnn", "--out", str(tmp_path)]
    )
    with open(tmp_path / "evaluation.csv", newline="") as f:
        rows = {row["type"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(images.TYPES)
    assert rows["rnn"]["iterations"] == "2" and rows["plastic"]["iterations"] == "5"
    assert rows["rnn"]["error_erased_blank"] == rows["plastic"]["error_erased_blank"]


def test_too_few_images(tmp_path, tiny):
    path = tmp_path / images.NPZ_NAME
    np.savez(path, train_images=random_rgb(5, 0), test_images=random_rgb(1, 1))
    with pytest.raises(SystemExit, match="--images 2: .* has only 1 test images"):
        images.main([*tiny, "--data", str(path), "--out", str(tmp_path / "out")])


def test_presets(tiny):
    args = images.parse_args(["--preset", "paper"])
    assert (
        args.size,
        args.images,
        args.presentations,
        args.presentation_steps,
        args.gap_steps,
        args.test_steps,
        args.lr,
        args.out,
    ) == (32, 3, 3, 20, 3, 3, 1e-4, "runs/images-paper")
    args = images.parse_args([])
    assert (args.preset, args.size, args.types, args.impl, args.out) == (
        "quick",
        16,
        ["plastic", "rnn"],
        "fused",
        "runs/images",
    )
    args = images.parse_args(["--preset", "paper", "--size", "8"])
    assert (args.size, args.presentation_steps) == (8, 20)
    assert images.episode_steps(args) == 3 * 3 * (20 + 3) + 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "12"], "argument --size: invalid choice: 12"),
        (["--images", "0"], "argument --images: must be >= 1, got 0"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--presentations", "0"], "argument --presentations: must be >= 1, got 0"),
        (["--gap-steps", "-1"], "argument --gap-steps: must be >= 0, got -1"),
        (["--test-steps", "0"], "argument --test-steps: must be >= 1, got 0"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
        (["--save-every", "3"], "--save-every must be a multiple of --log-every (2), got 3"),
        (["--types", "lstm"], "argument --types: invalid choice: 'lstm'"),
        (["--impl", "cuda"], "argument --impl: invalid choice: 'cuda'"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ],
)
def test_flag_validation(flags, message, tiny, capsys):
    assert_parser_error(lambda flags: images.parse_args([*tiny, *flags]), flags, message, capsys)
