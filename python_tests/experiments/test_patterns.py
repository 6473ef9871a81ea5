"""The pattern memorisation and completion experiment (experiments/patterns): the episode
generator, the networks and the loss, fused against reference, learning on a tiny setting, exact
resume, the script end to end with its plots, and flag validation."""

import csv
import json

import pytest
import torch

import backpropamine_cuda as bp

from helpers import ROOT, assert_parser_error, log_rows_without_timings

if not (ROOT / "experiments" / "patterns").is_dir():
    pytest.skip("experiments/ is not next to the tests", allow_module_level=True)
from experiments.patterns import patterns  # noqa: E402

# A small, fast setting of the flags.
TINY = [
    "--bits",
    "8",
    "--patterns",
    "2",
    "--presentations",
    "2",
    "--presentation-steps",
    "2",
    "--gap-steps",
    "1",
    "--test-steps",
    "2",
    "--rnn-hidden",
    "12",
    "--lstm-hidden",
    "10",
    "--batch-size",
    "4",
    "--log-every",
    "2",
    "--save-every",
    "4",
    "--eval-episodes",
    "6",
]


def tiny_args(*flags):
    return patterns.parse_args([*TINY, *flags])


def make_episodes(batch_size=5, seed=0, **options):
    options = dict(
        dict(bits=10, patterns=3, presentations=2, presentation_steps=3, gap_steps=2, test_steps=2),
        **options,
    )
    return patterns.make_episodes(batch_size, torch.Generator().manual_seed(seed), **options)


def test_episodes():
    """Each pattern shown `presentations` times for 3 steps, blank gaps of 2, every pattern once
    per round; then the test pattern, one of those shown, with exactly half its bits zeroed."""
    episodes = make_episodes()
    T = 2 * 3 * (3 + 2) + 2
    assert episodes.inputs.shape == (T, 5, 10)
    assert episodes.patterns.shape == (5, 3, 10) and episodes.target.shape == (5, 10)
    assert set(episodes.patterns.unique().tolist()) == {-1.0, 1.0}
    for b in range(5):
        shown = []
        for k in range(2 * 3):
            block = episodes.inputs[5 * k : 5 * k + 5, b]
            assert (block[:3] == block[0]).all() and (block[3:] == 0).all()
            shown.append(
                next(p for p in range(3) if torch.equal(block[0], episodes.patterns[b, p]))
            )
        assert sorted(shown[:3]) == sorted(shown[3:]) == [0, 1, 2]  # a permutation per round
        assert torch.equal(episodes.target[b], episodes.patterns[b, episodes.test_index[b]])
        test = episodes.inputs[-2:, b]
        assert (test == test[0]).all()
        assert episodes.zeroed[b].sum() == 5
        assert (test[0][episodes.zeroed[b]] == 0).all()
        assert torch.equal(test[0][~episodes.zeroed[b]], episodes.target[b][~episodes.zeroed[b]])
    assert torch.equal(make_episodes(seed=1).inputs, make_episodes(seed=1).inputs)
    assert not torch.equal(make_episodes(seed=1).inputs, make_episodes(seed=2).inputs)


def test_odd_sizes_and_no_gap():
    episodes = make_episodes(
        batch_size=1,
        bits=7,
        patterns=1,
        presentations=1,
        presentation_steps=1,
        gap_steps=0,
        test_steps=1,
    )
    assert episodes.inputs.shape == (2, 1, 7)
    assert episodes.zeroed.sum() == 3 and (episodes.inputs[0] != 0).all()


def test_the_loss_scores_the_last_step_only():
    outputs = torch.randn(6, 4, 8, requires_grad=True)
    target = torch.randn(4, 8).sign()
    loss = patterns.completion_loss(outputs, target)
    torch.testing.assert_close(loss, ((outputs[-1] - target) ** 2).mean())
    loss.backward()
    assert (outputs.grad[:-1] == 0).all() and (outputs.grad[-1] != 0).all()


def test_bit_error_rates():
    episodes = make_episodes(batch_size=2, bits=4, patterns=1)
    outputs = episodes.target.expand(3, 2, 4).clone()
    zeroed_bit = episodes.zeroed[0].nonzero()[0, 0]
    outputs[-1, 0, zeroed_bit] *= -1  # one zeroed bit wrong
    outputs[-1, 1, (~episodes.zeroed[1]).nonzero()[0, 0]] = 0  # one shown bit: no answer
    assert patterns.bit_error_rates(outputs, episodes) == (1 / 4, 2 / 8)


def test_plastic_net_is_the_op_with_a_bias_neuron():
    """Inputs scaled and added to the drive, a bias neuron with constant input, decay rule,
    h0 = hebb0 = 0, the pattern neurons' activity as output."""
    net = patterns.PlasticNet(6, input_scale=3.0, impl="reference")
    inputs = make_episodes(batch_size=2, bits=6).inputs
    T = inputs.shape[0]
    x = 3.0 * torch.cat([inputs, torch.ones(T, 2, 1)], 2)
    out, *_ = bp.reference.plastic_rnn_sequence(
        x,
        torch.zeros(2, 7),
        torch.zeros(2, 7, 7),
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
    )
    torch.testing.assert_close(net(inputs), out[:, :, :6])
    assert net.w.shape == net.alpha.shape == (7, 7) and net.eta.shape == ()


@pytest.mark.parametrize("network_type", patterns.TYPES)
def test_networks_map_inputs_to_outputs_per_step(network_type):
    net = patterns.make_network(network_type, tiny_args())
    inputs = make_episodes(batch_size=3, bits=8).inputs
    assert net(inputs).shape == inputs.shape


def test_fused_and_reference_give_the_same_loss_and_gradients():
    episodes = make_episodes(batch_size=3, bits=12).to("cpu", torch.float64)
    results = []
    for impl in ("fused", "reference"):
        torch.manual_seed(4)
        net = patterns.PlasticNet(12, impl=impl).double()
        with torch.no_grad():
            net.alpha.normal_(0, 0.3)  # plasticity that matters
            net.eta.fill_(0.3)
        loss = patterns.completion_loss(net(episodes.inputs), episodes.target)
        loss.backward()
        results.append((loss, {name: p.grad for name, p in net.named_parameters()}))
    (loss_fused, grads_fused), (loss_reference, grads_reference) = results
    torch.testing.assert_close(loss_fused, loss_reference, rtol=1e-12, atol=1e-12)
    for name, grad in grads_fused.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads_reference[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_few_dozen_iterations_learn_completion():
    args = tiny_args("--bits", "16", "--batch-size", "10", "--lr", "0.01")
    torch.manual_seed(0)
    net = patterns.make_network("plastic", args)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    loss_before, error_before, _ = patterns.evaluate(net, args, 50)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        episodes = patterns.make_episodes(
            args.batch_size, generator, **patterns.episode_options(args)
        )
        patterns.train_step(net, optimizer, episodes, args.clip_grad)
    loss_after, error_after, _ = patterns.evaluate(net, args, 50)
    assert loss_after < 0.5 * loss_before
    assert error_after < 0.5 * error_before


def test_resume_continues_exactly(tmp_path):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    patterns.main([*TINY, "--iterations", "8", "--out", str(whole)])
    patterns.main([*TINY, "--iterations", "4", "--out", str(interrupted)])
    patterns.main([*TINY, "--iterations", "8", "--out", str(interrupted), "--resume"])
    for network_type in patterns.TYPES:
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
    with pytest.raises(SystemExit, match="--bits 8 there, 10 here"):
        patterns.main(
            [*TINY, "--iterations", "10", "--out", str(interrupted), "--resume", "--bits", "10"]
        )
    with pytest.raises(SystemExit, match="is at iteration 8, past --iterations 6"):
        patterns.main([*TINY, "--iterations", "6", "--out", str(interrupted), "--resume"])


def test_script_end_to_end(tmp_path):
    summary = patterns.main([*TINY, "--iterations", "5", "--seed", "3", "--out", str(tmp_path)])
    assert set(summary) == set(patterns.TYPES)
    for name in (
        "curves.png",
        "episode-plastic.png",
        "episode-rnn.png",
        "episode-lstm.png",
        "plastic-seed3.checkpoint.pt",
        "lstm-seed3.csv",
        "evaluation.csv",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert [row["iteration"] for row in log_rows_without_timings(tmp_path / "rnn-seed3.csv")] == [
        "2",
        "4",
        "5",
    ]
    saved = json.loads((tmp_path / "rnn-seed3.json").read_text())
    assert (saved["iterations"], saved["options"]["bits"]) == (5, 8)
    assert (saved["loss"], saved["error_zeroed"], saved["error_all"]) == summary["rnn"]
    assert {"commit", "torch", "date", "wall_seconds"} <= set(saved["manifest"])
    # a second run sharing --out replaces its own evaluation rows and keeps the others'
    patterns.main(
        [
            *TINY,
            "--iterations",
            "2",
            "--seed",
            "3",
            "--types",
            "rnn",
            "--impl",
            "reference",
            "--out",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "evaluation.csv", newline="") as f:
        rows = {row["type"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(patterns.TYPES)
    assert rows["rnn"]["iterations"] == "2" and rows["plastic"]["iterations"] == "5"


def test_presets():
    args = patterns.parse_args(["--preset", "paper"])
    assert (args.bits, args.patterns, args.types, args.lr) == (1000, 5, ["plastic"], 3e-4)
    args = patterns.parse_args(["--preset", "comparison", "--rnn-hidden", "100"])
    assert (args.bits, args.patterns, args.rnn_hidden, args.lstm_hidden) == (50, 2, 100, 2000)
    args = patterns.parse_args(["--preset", "bohp"])
    assert args.bits + 1 == 29 and args.patterns == 3
    args = patterns.parse_args([])
    assert (
        args.preset,
        args.presentations,
        args.presentation_steps,
        args.gap_steps,
        args.test_steps,
        args.input_scale,
    ) == ("quick", 2, 6, 4, 3, 20.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bits", "1"], "argument --bits: must be >= 2, got 1"),
        (["--patterns", "0"], "argument --patterns: must be >= 1, got 0"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--gap-steps", "-1"], "argument --gap-steps: must be >= 0, got -1"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--input-scale", "x"], "argument --input-scale: invalid float value: 'x'"),
        (["--save-every", "3"], "--save-every must be a multiple of --log-every (2), got 3"),
        (["--types", "gru"], "argument --types: invalid choice: 'gru'"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ],
)
def test_flag_validation(flags, message, capsys):
    assert_parser_error(lambda flags: tiny_args(*flags), flags, message, capsys)


def test_unknown_network_type():
    with pytest.raises(ValueError, match="network_type must be one of"):
        patterns.make_network("gru", tiny_args())
