"""The Penn Treebank experiment (experiments/ptb): model sizes, training end to end on a tiny
synthetic corpus for every model type and preset, the Backpropamine README's command lines,
exact resume, evaluation at batch size 1, data parallelism on 2 processes, the real corpus when
BACKPROPAMINE_DATA is set, and the benchmark's smoke test."""

import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, assert_parser_error, subprocess_env

PTB = ROOT / "experiments" / "ptb"
if not PTB.is_dir():
    pytest.skip("experiments/ is not next to the tests", allow_module_level=True)
from experiments.ptb import data as ptb_data  # noqa: E402
from experiments.ptb import main as ptb_main  # noqa: E402

# Backpropamine's awd-lstm README commands (the third: the non-plastic baseline), with the data
# path replaced by the tiny corpus.
ORIGINAL_COMMANDS = {
    "plastic-fanout": "--batch_size 6 --data DATA --dropouti 0.4 --dropouth 0.25 --epoch 500 "
    "--save PTB.pt --wdrop 0 --model PLASTICLSTM --modultype modplasth2mod "
    "--modulout fanout --nhid 1149 --alphatype perneuron --asgdtime 125 "
    "--agdiv 1149",
    "plastic-none": "--batch_size 6 --data DATA --dropouti 0.4 --dropouth 0.25 --epoch 500 "
    "--save PTB.pt --wdrop 0 --model PLASTICLSTM --modultype none --modulout none "
    "--nhid 1149 --alphatype perneuron --asgdtime 125 --agdiv 1149",
    "lstm": "--batch_size 6 --data DATA --dropouti 0.4 --dropouth 0.25 --epoch 500 --save PTB.pt "
    "--wdrop 0 --model MYLSTM --modultype modplasth2mod --modulout fanout --nhid 1150 "
    "--alphatype full --asgdtime 125 --agdiv 1150",
}
# Their parameter counts on the PTB vocabulary. The plastic model's is the original's; "none"
# has a learned eta per layer instead of h2mod and fanout; the baseline has 7N gate biases per
# layer where the original has 8N (see bp.PlasticLSTM): 24,221,600 - (1150 + 1150 + 400).
ORIGINAL_PARAMETERS = {"plastic-fanout": 24_198_893, "plastic-none": 24_190_799, "lstm": 24_218_900}
# Every flag of the original awd-lstm-lm fork's parser, with its default there (as it would be
# typed; --save's default there is a name made of the time).
ORIGINAL_FLAGS = {
    "--data": "data/penn/",
    "--model": "PLASTICLSTM",
    "--alphatype": "full",
    "--modultype": "none",
    "--modulout": "single",
    "--cliptype": "clip",
    "--hebboutput": "i2c",
    "--emsize": "400",
    "--nhid": "1150",
    "--nlayers": "3",
    "--clipval": "2.0",
    "--lr": "30",
    "--agdiv": "1150.0",
    "--clip": "0.25",
    "--epochs": "300",
    "--batch_size": "80",
    "--bptt": "70",
    "--dropout": "0.4",
    "--dropouth": "0.3",
    "--dropouti": "0.65",
    "--dropoute": "0.1",
    "--proplstm": "0.5",
    "--wdrop": "0.5",
    "--seed": "1111",
    "--asgdtime": "-1",
    "--nonmono": "5",
    "--numgpu": "0",
    "--log-interval": "200",
    "--save": "1733000000.pt",
    "--alpha": "2",
    "--beta": "1",
    "--wdecay": "1.2e-6",
    "--resume": "",
    "--optimizer": "sgd",
    "--when": "-1",
}  # and --cuda, a switch (store_false: given, CUDA off)
# The defaults here that differ from the original's: awd-lstm-lm's epochs, the large model's
# plasticity flags of the Backpropamine README's first command, and a fixed file name.
DEFAULTS_CHANGED = {
    "alphatype": "perneuron",
    "modultype": "modplasth2mod",
    "modulout": "fanout",
    "agdiv": 1.0,
    "epochs": 8000,
    "save": "PTB.pt",
    "numgpu": None,
    "resume": False,
    "data": "data/penn",
}  # data: the same folder
TINY = ["--emsize", "16", "--nhid", "24", "--batch_size", "4", "--bptt", "10"]
# The small preset's loss sums over the 10 steps of a TINY segment: lr 0.2 there is lr 2 here.
SMALL_LR = ["--lr", "0.2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny corpus: sentences from a Markov chain in which each of 20 words has 2 successors
    (a model that learns it reaches a perplexity near 2; the unigram perplexity is near 18)."""
    folder = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20)]
    successors = {w: rng.sample(words, 2) for w in words}
    for split, lines in (("train", 500), ("valid", 60), ("test", 60)):
        with open(folder / f"{split}.txt", "w") as f:
            for _ in range(lines):
                sentence = [rng.choice(words)]
                for _ in range(rng.randint(4, 10)):
                    sentence.append(rng.choice(successors[sentence[-1]]))
                f.write(" " + " ".join(sentence) + " \n")
    return folder


def run(corpus, out, *flags):
    """main.py on the tiny corpus, outputs in `out`; returns its result and its CSV rows."""
    result = ptb_main.main(["--data", str(corpus), "--save", str(out / "m.pt"), *flags])
    with open(out / "m.csv") as f:
        return result, list(csv.DictReader(f))


def command(name, corpus):
    return ORIGINAL_COMMANDS[name].replace("DATA", str(corpus)).split()


# ---------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("name", list(ORIGINAL_COMMANDS))
def test_original_commands_parameter_counts(name):
    args = ptb_main.parse_args(command(name, "unused"))
    with torch.device("meta"):
        model = ptb_main.build_model(args, ptb_main.PTB_VOCABULARY)
    assert ptb_main.count_parameters(model) == ORIGINAL_PARAMETERS[name]


def test_small_preset_variants_have_matched_sizes():
    args = ptb_main.parse_args(["--preset", "small"])
    sizes = ptb_main.small_hidden_sizes(args)
    assert set(sizes) == {"baseline", "plastic", "simple", "retroactive"}
    for variant, (hidden, params) in sizes.items():
        assert 190 <= hidden <= 215, variant
        assert abs(params / 4.8e6 - 1) < 0.005, (variant, params)
    assert args.nhid == args.emsize == sizes["baseline"][0]
    retro = ptb_main.parse_args(["--preset", "small", "--variant", "retroactive"])
    assert (retro.nhid, retro.cliptype, retro.modulout, retro.alphatype) == (
        sizes["retroactive"][0],
        "retroactive",
        "single",
        "full",
    )
    with torch.device("meta"):
        model = ptb_main.build_model(retro, ptb_main.PTB_VOCABULARY)
    assert ptb_main.count_parameters(model) == sizes["retroactive"][1]
    assert model.rnns[0].rule == "retroactive" and model.decoder.weight is not model.encoder.weight
    # the paper's Eq. 2: the small models' traces in [-1, 1], the large model's in [-2, 2]
    assert model.rnns[0].clip == 1.0 and ptb_main.parse_args([]).clipval == 2.0


@pytest.mark.parametrize(
    "cliptype, rule",
    [("aditya", "clip_on_read"), ("clip_on_read", "clip_on_read"), ("decay", "decay")],
)
def test_cliptype_selects_the_rule(cliptype, rule):
    """The original's --cliptype aditya is rule clip_on_read; bp's rule names pass through."""
    args = ptb_main.parse_args(["--cliptype", cliptype, "--clipval", "0.5"])
    assert ptb_main.layer_options(args)["rule"] == rule
    with torch.device("meta"):
        model = ptb_main.build_model(args, ptb_main.PTB_VOCABULARY)
    assert all(rnn.rule == rule and rnn.clip == 0.5 for rnn in model.rnns)


def test_flags_are_checked(corpus, tmp_path):
    with pytest.raises(SystemExit):
        ptb_main.parse_args(["--modultype", "modplasth2mod", "--modulout", "none"])
    with pytest.raises(SystemExit):
        ptb_main.parse_args(["--variant", "simple"])  # needs --preset small
    with pytest.raises(SystemExit, match=r"nowhere.*train\.txt.*getdata\.sh"):
        ptb_main.main(["--data", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--batch_size 4 must be divisible .* 3"):
        ptb_main.run(ptb_main.parse_args(["--data", str(corpus), *TINY]), 0, 3, "cpu")


# ---------------------------------------------------------------------------------------------
# The original's command line


def test_every_flag_of_the_original_parses_with_its_default():
    flags = [
        part
        for flag, value in ORIGINAL_FLAGS.items()
        for part in (flag, *(value.split() or [value]))
    ]  # --resume '': an empty argument
    args = ptb_main.parse_args(flags)
    for flag, value in ORIGINAL_FLAGS.items():
        parsed = getattr(args, flag.lstrip("-").replace("-", "_"))
        expected = [int(value)] if flag == "--when" else type(parsed)(value) if value else value
        assert parsed == expected, flag
    assert args.cuda and not args.resume and args.tied
    # with the original's --modultype none, its --modulout is ignored: no neuromodulation
    assert ptb_main.layer_options(args)["modulation"] == "none"
    with torch.device("meta"):
        ptb_main.build_model(args, ptb_main.PTB_VOCABULARY)
    defaults = vars(ptb_main.parse_args([]))
    for flag, value in ORIGINAL_FLAGS.items():
        name = flag.lstrip("-").replace("-", "_")
        here = defaults[name]
        if name in DEFAULTS_CHANGED:
            assert here == DEFAULTS_CHANGED[name], flag
        elif flag == "--when":
            assert here == [-1]
        else:
            assert here == type(here)(value) or here == value, flag


def test_asgdtime_has_the_original_meaning():
    """< 0 (the default): Merity's non-monotone trigger; > 0: after epoch asgdtime + 1; 0: never;
    with --optimizer adam: never."""

    def starts(flags, epoch, loss, history):
        return ptb_main.averaging_starts(ptb_main.parse_args(flags), epoch, loss, history)

    stalled = [4.0, 5.0, 4.1, 4.2, 4.3, 4.4]  # the best is 6 epochs back: 4.5 is worse
    assert ptb_main.parse_args([]).asgdtime == -1
    assert starts([], 7, 4.5, stalled) and not starts([], 7, 3.9, stalled)
    assert not starts(["--nonmono", "6"], 7, 4.5, stalled)
    assert not starts(["--asgdtime", "3"], 3, 9.0, [9.0] * 2)
    assert starts(["--asgdtime", "3"], 4, 1.0, [9.0] * 3)
    assert not starts(["--asgdtime", "0"], 7, 4.5, stalled)
    assert not starts(["--optimizer", "adam"], 7, 4.5, stalled)
    assert not starts(["--optimizer", "adam", "--asgdtime", "3"], 4, 1.0, [9.0] * 3)


def test_when_divides_the_learning_rate_after_its_epochs():
    args = ptb_main.parse_args(["--lr", "20", "--when", "2", "4"])
    assert [ptb_main.epoch_lr(args, e) for e in (1, 2, 3, 4, 5)] == pytest.approx(
        [20, 20, 2, 2, 0.2]
    )
    # averaged SGD restarts at --lr, as the original, divided only when it started at a --when
    assert ptb_main.epoch_lr(args, 5, switched_after=3) == 20
    assert ptb_main.epoch_lr(args, 5, switched_after=4) == pytest.approx(2)
    assert ptb_main.epoch_lr(ptb_main.parse_args([]), 9) == 30  # --when -1: never


def test_when_saves_the_model_before_dividing(corpus, tmp_path):
    _, rows = run(
        corpus, tmp_path, *TINY, "--lr", "2", "--epochs", "3", "--max-batches", "2", "--when", "2"
    )
    assert [float(r["lr"]) for r in rows] == pytest.approx([2, 2, 0.2])
    saved = torch.load(tmp_path / "m.pt.e2", weights_only=True)
    assert set(saved) == {"model", "args"} and not (tmp_path / "m.pt.e1").exists()


def test_adam_trains_and_never_averages(corpus, tmp_path):
    result, rows = run(
        corpus,
        tmp_path,
        *TINY,
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--asgdtime",
        "1",
        "--epochs",
        "3",
        "--max-batches",
        "4",
    )
    checkpoint = torch.load(tmp_path / "m.checkpoint.pt", weights_only=True)
    assert not checkpoint["asgd"] and "exp_avg" in next(
        iter(checkpoint["optimizer"]["state"].values())
    )
    assert math.isfinite(result["test_ppl"]) and len(rows) == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--cuda", "--device", "cuda:1"],
            "--cuda (the original's switch: CUDA off) contradicts --device cuda:1",
        ),
        (["--numgpu", "1", "--device", "cuda:0"], "--numgpu 1 contradicts --device cuda:0"),
        *[
            (
                ["--modultype", modultype, "--modulator-input", value],
                f"--modultype {modultype} contradicts --modulator-input {value} "
                "(modplastc2mod reads c, modplasth2mod h or h_prev)",
            )
            for modultype, value in (
                ("modplastc2mod", "h"),
                ("modplastc2mod", "h_prev"),
                ("modplasth2mod", "c"),
            )
        ],
    ],
)
def test_unimplemented_values_and_contradictions_are_errors(flags, message, capsys):
    assert_parser_error(ptb_main.parse_args, flags, message, capsys)


@pytest.mark.parametrize(
    "hebboutput, post_input", [("i2c", "g"), ("h2co", "u"), ("cell", "c"), ("hidden", "h")]
)
def test_hebboutput_sets_the_post_synaptic_term(hebboutput, post_input):
    args = ptb_main.parse_args(["--hebboutput", hebboutput])
    assert ptb_main.layer_options(args)["post_input"] == post_input
    with torch.device("meta"):
        model = ptb_main.build_model(args, ptb_main.PTB_VOCABULARY)
    assert all(layer.post_input == post_input for layer in model.rnns)


@pytest.mark.parametrize(
    "flags, modulator_input",
    [
        ([], "h"),
        (["--modultype", "modplastc2mod"], "c"),
        (["--modultype", "modplastc2mod", "--modulator-input", "c"], "c"),
        (["--modulator-input", "h_prev"], "h_prev"),
        (["--modultype", "none", "--modulout", "none", "--modulator-input", "c"], "c"),
        # the paper's small models' modulator reads h_{t-1} (its appendix A.1.2)
        (["--preset", "small", "--variant", "simple"], "h_prev"),
        (["--preset", "small", "--variant", "retroactive"], "h_prev"),
        (["--preset", "small", "--variant", "retroactive", "--modulator-input", "h"], "h"),
        (["--preset", "small", "--variant", "plastic"], "h"),  # no modulator
    ],
)
def test_modulator_input(flags, modulator_input):
    args = ptb_main.parse_args(flags)
    assert ptb_main.layer_options(args)["modulator_input"] == modulator_input


@pytest.mark.parametrize(
    "flags, device",
    [
        (["--cuda"], "cpu"),  # the original's store_false: CUDA off
        (["--cuda", "--device", "cpu", "--numgpu", "1"], "cpu"),  # --numgpu: no effect on the CPU
        (["--device", "cuda", "--numgpu", "1"], "cuda:1"),
        (["--device", "cuda:1", "--numgpu", "1"], "cuda:1"),
        (["--device", "cuda:2"], "cuda:2"),
    ],
)
def test_device_flags(flags, device):
    assert ptb_main.select_device(ptb_main.parse_args(flags)) == torch.device(device)


# ---------------------------------------------------------------------------------------------
# Training end to end


@pytest.mark.parametrize(
    "flags",
    [
        [],  # Backpropamine's large model: fanout from h, alpha per neuron, with DropConnect
        [
            "--modultype",
            "modplastc2mod",
            "--modulout",
            "single",
            "--cliptype",
            "decay",
            "--alphatype",
            "single",
            "--impl",
            "reference",
        ],
        ["--modultype", "none", "--modulout", "none"],
        ["--cliptype", "aditya", "--clipval", "0.05"],
        ["--model", "MYLSTM"],
        ["--preset", "small", "--variant", "baseline", *SMALL_LR],
        ["--preset", "small", "--variant", "plastic", *SMALL_LR],
        ["--preset", "small", "--variant", "simple", *SMALL_LR],
        ["--preset", "small", "--variant", "retroactive", *SMALL_LR],
        ["--hebboutput", "h2co", "--modulator-input", "h_prev"],
    ],
    ids=[
        "fanout-h",
        "single-c-decay-reference",
        "none",
        "aditya",
        "lstm",
        "small-baseline",
        "small-plastic",
        "small-simple",
        "small-retroactive",
        "fanout-h_prev-h2co",
    ],
)
def test_training_lowers_the_loss(corpus, tmp_path, flags):
    result, rows = run(
        corpus, tmp_path, *TINY, "--lr", "2", "--epochs", "3", "--max-batches", "15", *flags
    )
    train = [float(r["train_ppl"]) for r in rows]
    valid = [float(r["valid_ppl"]) for r in rows]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert train[-1] < train[0] and valid[-1] < valid[0], rows
    assert valid[-1] < 21  # below the vocabulary size, the perplexity of a uniform guess
    assert math.isfinite(result["test_ppl"]) and result["best_valid_ppl"] == min(valid)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    for name in ("m.pt", "m.checkpoint.pt", "m.png", "m.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("name", list(ORIGINAL_COMMANDS))
def test_original_commands_run(corpus, tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)  # the commands write PTB.pt
    result = ptb_main.main(command(name, corpus) + ["--max-batches", "2", "--epochs", "1"])
    assert math.isfinite(result["test_ppl"])
    assert (tmp_path / "PTB.pt").is_file() and (tmp_path / "PTB.csv").is_file()
    assert "parameters" in capsys.readouterr().out


def test_resume_continues_exactly(corpus, tmp_path):
    # Dropout, DropConnect and variable BPTT draw random numbers; the switch to averaged SGD at
    # the end of epoch 2 makes the resumed epoch depend on the averages in the checkpoint.
    flags = [*TINY, "--lr", "2", "--asgdtime", "1", "--max-batches", "6"]
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir(), interrupted.mkdir()
    _, rows = run(corpus, whole, *flags, "--epochs", "4")
    run(corpus, interrupted, *flags, "--epochs", "3")
    _, resumed_rows = run(corpus, interrupted, *flags, "--epochs", "4", "--resume")
    results = ("epoch", "train_ppl", "valid_ppl", "lr")  # all but the timings
    assert [[r[k] for k in results] for r in resumed_rows] == [
        [r[k] for k in results] for r in rows
    ]
    a, b = (torch.load(d / "m.checkpoint.pt", weights_only=True) for d in (whole, interrupted))
    assert a["asgd"] and b["asgd"] and a["epoch"] == b["epoch"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["ax"], state_b["ax"])


def test_a_run_cut_inside_an_epoch_resumes_from_that_batch_exactly(corpus, tmp_path, monkeypatch):
    # --time-limit cuts epoch 2 after its 3rd batch (time_is_up is asked after every batch but
    # an epoch's last, and at the end of every epoch but the last: its 9th call); the checkpoint
    # then holds
    # that position, hidden states and traces included, and --resume continues from it.
    flags = [*TINY, "--lr", "2", "--max-batches", "6", "--epochs", "2", "--time-limit", "1e6"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    _, rows = run(corpus, whole, *flags)
    calls = iter(range(1, 100))
    monkeypatch.setattr(ptb_main, "time_is_up", lambda *args: next(calls) == 9)
    result, cut_rows = run(corpus, cut, *flags)
    assert result["stopped_by"] == "time limit" and [int(r["epoch"]) for r in cut_rows] == [1]
    assert result["test_ppl"] is None and "not tested" in result["tested"]  # not finished
    saved = torch.load(cut / "m.checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["position"]["batches"] == 3
    assert saved["position"]["hidden"][0][2] is not None  # a layer's Hebbian trace
    monkeypatch.undo()
    _, resumed_rows = run(corpus, cut, *flags, "--resume")
    results = ("epoch", "train_ppl", "valid_ppl", "lr")  # all but the timings
    assert [[r[k] for k in results] for r in resumed_rows] == [
        [r[k] for k in results] for r in rows
    ]
    a, b = (torch.load(d / "m.checkpoint.pt", weights_only=True) for d in (whole, cut))
    assert a["epoch"] == b["epoch"] == 2 and a["position"] is b["position"] is None
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_a_time_limit_passed_during_the_last_epoch_still_tests_the_run(
    corpus, tmp_path, monkeypatch
):
    # One batch per epoch: time_is_up is asked only between epochs, and always answers yes.
    monkeypatch.setattr(ptb_main, "time_is_up", lambda *args: True)
    flags = [*TINY, "--max-batches", "1", "--time-limit", "1e6"]
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    result, rows = run(corpus, two, *flags, "--epochs", "2")
    assert result["stopped_by"] == "time limit" and len(rows) == 1  # cut between epochs
    result, rows = run(corpus, one, *flags, "--epochs", "1")
    assert result["stopped_by"] == "epochs" and len(rows) == 1  # the whole run trained
    assert math.isfinite(result["test_ppl"])


def test_checkpoint_interval_checkpoints_inside_epochs(corpus, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(
        ptb_main,
        "save_checkpoint",
        lambda r, epoch, at=None: saved.append((epoch, at and at.batches)),
    )
    flags = [*TINY, "--max-batches", "4", "--epochs", "2", "--checkpoint-interval", "1e-9"]
    run(corpus, tmp_path, *flags)
    # after every batch but an epoch's last, and at the end of every epoch
    assert saved == [(0, 1), (0, 2), (0, 3), (1, None), (1, 1), (1, 2), (1, 3), (2, None)]


def test_the_results_file_holds_the_numbers_and_what_produced_them(corpus, tmp_path):
    result, rows = run(corpus, tmp_path, *TINY, "--lr", "2", "--epochs", "2", "--max-batches", "3")
    saved = json.loads((tmp_path / "m.json").read_text())
    valid = [float(r["valid_ppl"]) for r in rows]
    assert saved["test_ppl"] == result["test_ppl"] and math.isfinite(saved["test_ppl"])
    assert saved["best_valid_ppl"] == min(valid) and saved["final_valid_ppl"] == valid[-1]
    assert saved["best_epoch"] == valid.index(min(valid)) + 1
    assert (saved["epochs_run"], saved["stopped_by"]) == (2, "epochs")
    assert saved["train_tokens_per_s"] == pytest.approx(
        sum(float(r["tokens_per_s"]) for r in rows) / 2
    )
    assert saved["args"]["lr"] == 2 and "best model" in saved["tested"]
    assert {"command", "commit", "torch", "machine", "date", "wall_seconds"} <= set(
        saved["manifest"]
    )


def test_resume_from_a_checkpoint_given_by_path(corpus, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    flags = [*TINY, "--max-batches", "2"]
    run(corpus, first, *flags, "--epochs", "1")
    _, rows = run(
        corpus, second, *flags, "--epochs", "2", "--resume", str(first / "m.checkpoint.pt")
    )
    assert [int(r["epoch"]) for r in rows] == [2]
    assert json.loads((second / "m.json").read_text())["epochs_run"] == 2


def test_time_sum_loss_scales_the_gradient_by_the_segment_length(corpus):
    """--loss time-sum (the small preset's, Zaremba's) steps on the cross-entropy summed over the
    segment's time steps: T times the gradient of --loss mean, the same reported loss."""
    grads = {}
    for loss in ("mean", "time-sum"):
        args = ptb_main.parse_args(
            [
                "--data",
                str(corpus),
                *TINY,
                "--loss",
                loss,
                "--clip",
                "0",
                "--dropout",
                "0",
                "--dropouth",
                "0",
                "--dropouti",
                "0",
                "--dropoute",
                "0",
                "--wdrop",
                "0",
                "--wdecay",
                "0",
            ]
        )
        torch.manual_seed(0)
        model = ptb_main.build_model(args, 21)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # gradients only
        words = torch.randint(0, 21, (8, 4))
        raw_loss, _ = ptb_main.train_step(
            model, optimizer, words[:-1], words[1:].reshape(-1), [None] * 3, args, []
        )
        grads[loss] = (raw_loss, [p.grad.clone() for p in model.parameters()])
    assert torch.equal(grads["mean"][0], grads["time-sum"][0])
    for mean, summed in zip(grads["mean"][1], grads["time-sum"][1]):
        torch.testing.assert_close(summed, 7 * mean)


def test_batch_size_one_uses_a_rate_per_neuron(corpus):
    """At B = 1 the fanout still gives every post-synaptic neuron its own plasticity rate (the
    original code lost it at batch size 1), and each stream is computed as in a larger batch."""
    args = ptb_main.parse_args(["--data", str(corpus), *TINY])
    model = ptb_main.build_model(args, 21).eval()
    with torch.no_grad():
        for rnn in model.rnns:  # plastic terms large enough to matter (alpha starts < 1e-4)
            rnn.alpha.normal_()
        words = torch.randint(0, 21, (12, 2))
        logits_pair, *_ = model(words, [None] * 3)
        logits_single, *_ = model(words[:, :1], [None] * 3)
        torch.testing.assert_close(logits_single, logits_pair.view(12, 2, -1)[:, 0])
        x = torch.randn(12, 1, args.emsize)
        _, _, m = model.rnns[0](x, return_modulation=True)
        eta = model.rnns[0].fanout(m)  # (T, 1, N): the rate of each post-synaptic neuron
    assert eta.shape == (12, 1, args.nhid)
    assert (eta.std(dim=-1) > 0.1).all()


def test_two_processes_match_one(corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo), each on half of the streams, trains as 1 process."""
    flags = [*TINY, "--lr", "2", "--epochs", "1", "--max-batches", "5"]
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    _, rows = run(corpus, single, *flags)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(PTB / "main.py"),
            "--data",
            str(corpus),
            "--save",
            str(double / "m.pt"),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    with open(double / "m.csv") as f:
        ddp_rows = list(csv.DictReader(f))
    for key in ("train_ppl", "valid_ppl"):
        assert float(ddp_rows[0][key]) == pytest.approx(float(rows[0][key]), rel=1e-5)
    a, b = (torch.load(d / "m.checkpoint.pt", weights_only=True)["model"] for d in (single, double))
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kill_in", ["log_epoch", "checkpoint"])
def test_a_kill_at_the_end_of_an_epoch_loses_no_row(corpus, tmp_path, monkeypatch, kill_in):
    """A kill while epoch 2 is being logged and checkpointed (a KeyboardInterrupt in the CSV
    row's write, or in the checkpoint's after the row): --resume logs every epoch once."""
    flags = [*TINY, "--lr", "2", "--max-batches", "3"]
    if kill_in == "log_epoch":
        log_epoch = ptb_main.log_epoch

        def killed(paths, row):
            if row["epoch"] == 2:
                raise KeyboardInterrupt
            log_epoch(paths, row)

        monkeypatch.setattr(ptb_main, "log_epoch", killed)
    else:
        save = ptb_main.atomic_save

        def killed(obj, path):
            if path.name == "m.checkpoint.pt" and obj["epoch"] == 2:
                raise KeyboardInterrupt
            save(obj, path)

        monkeypatch.setattr(ptb_main, "atomic_save", killed)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, tmp_path, *flags, "--epochs", "3")
    monkeypatch.undo()
    _, rows = run(corpus, tmp_path, *flags, "--epochs", "3", "--resume")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_a_damaged_checkpoint_exits_naming_it(corpus, tmp_path):
    flags = [*TINY, "--max-batches", "2", "--epochs", "1"]
    checkpoint = tmp_path / "m.checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="--resume: cannot read the checkpoint .*m.checkpoint.pt"):
        run(corpus, tmp_path, *flags, "--resume")
    run(corpus, tmp_path, *flags)
    checkpoint.write_bytes((tmp_path / "m.pt").read_bytes())  # the best model: no optimizer
    with pytest.raises(
        SystemExit,
        match=r"cannot read the checkpoint .*m.checkpoint.pt: not a "
        r"checkpoint of this script \(no optimizer, asgd",
    ):
        run(corpus, tmp_path, *flags, "--resume")


def test_resume_refuses_other_model_options_and_accepts_another_schedule(corpus, tmp_path):
    """--resume checks every option but those of RESUME_MAY_CHANGE (the schedule, the outputs,
    the device); the message names awd-lstm-lm's --batch_size as it is spelt."""
    flags = [*TINY, "--max-batches", "2"]
    run(corpus, tmp_path, *flags, "--epochs", "1")
    with pytest.raises(SystemExit, match=r"other options: --batch_size 4 there, 8 here$"):
        run(corpus, tmp_path, *flags, "--batch_size", "8", "--epochs", "2", "--resume")
    _, rows = run(corpus, tmp_path, *flags, "--epochs", "2", "--lr", "5", "--resume")
    assert [int(r["epoch"]) for r in rows] == [1, 2]


@pytest.mark.parametrize(
    "flags",
    [["--save", "nowhere/m.pt"], ["--save", "m.pt", "--log", "nowhere/log.csv"]],
    ids=["save", "log"],
)
def test_an_output_folder_that_does_not_exist_fails_at_start(corpus, tmp_path, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SystemExit, match=f"{flags[-2]} nowhere/.*: the folder nowhere does not exist"
    ):
        ptb_main.main(["--data", str(corpus), *TINY, "--max-batches", "2", "--epochs", "1", *flags])
    assert not list(tmp_path.iterdir()), "wrote files before the check"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
        (["--clip", "inf"], "argument --clip: must be a finite number, got inf"),
        (["--dropout", "1.5"], "argument --dropout: must be <= 1, got 1.5"),
        (["--clipval", "0"], "argument --clipval: must be > 0, got 0"),
        (["--nhid", "0"], "argument --nhid: must be >= 1, got 0"),
        (["--agdiv", "0"], "argument --agdiv: must be > 0, got 0"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),  # NumPy's range
        (["--seed", str(2**32)], f"argument --seed: must be <= {2**32 - 1}, got {2**32}"),
    ],
)
def test_numeric_flags_are_finite_and_in_range(flags, message, capsys):
    assert_parser_error(ptb_main.parse_args, flags, message, capsys)


# ---------------------------------------------------------------------------------------------
# Data


def corpus_with(tmp_path, corpus, **splits):
    """A copy of the tiny corpus in which each split of `splits` has the given content (bytes)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ptb_data.SPLITS:
        path = folder / f"{split}.txt"
        path.write_bytes(splits.get(split, (corpus / f"{split}.txt").read_bytes()))
    return folder


@pytest.mark.parametrize(
    "split, content, message",
    [
        (
            "valid",
            b"",
            r"valid.txt has 0 tokens .*too few for evaluation in 10 streams: at least 20",
        ),
        ("valid", b"a b c\n", r"valid.txt has 4 tokens .*evaluation in 10 streams: at least 20"),
        ("test", b"", r"test.txt has 0 tokens .*too few for evaluation in 1 streams: at least 2"),
        (
            "train",
            b"w1 w2\n",
            r"train.txt has 3 tokens .*too few for training in 4 streams: at "
            r"least 12",
        ),
    ],
    ids=["empty-valid", "short-valid", "empty-test", "short-train"],
)
def test_a_split_too_short_fails_at_start(corpus, tmp_path, split, content, message):
    data = corpus_with(tmp_path, corpus, **{split: content})
    with pytest.raises(SystemExit, match=f"--data: .*{message}"):
        ptb_main.main(
            [
                "--data",
                str(data),
                "--save",
                str(tmp_path / "m.pt"),
                *TINY,
                "--max-batches",
                "2",
                "--epochs",
                "1",
            ]
        )
    assert not (tmp_path / "m.checkpoint.pt").exists(), "trained before the check"


@pytest.mark.parametrize(
    "content", [bytes(range(256)), "w1 w2 é".encode()[:-1]], ids=["binary", "truncated"]
)
def test_a_file_that_is_not_text_exits_naming_it(corpus, tmp_path, content):
    data = corpus_with(tmp_path, corpus, test=content)
    with pytest.raises(SystemExit, match=r"^--data: cannot read .*test.txt: UnicodeDecodeError"):
        ptb_main.main(["--data", str(data), "--save", str(tmp_path / "m.pt"), *TINY])


def test_batchify_and_get_batch():
    streams = ptb_data.batchify(torch.arange(11), 2)  # the 11th token does not fill a row
    assert streams.tolist() == [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]
    inputs, targets = ptb_data.get_batch(streams, 3, 70)  # shortened at the end
    assert inputs.tolist() == [[3, 8]] and targets.tolist() == [4, 9]


def test_penn_treebank_corpus():
    root = os.environ.get("BACKPROPAMINE_DATA")
    if not root or not (Path(root) / "penn").is_dir():
        pytest.skip("set BACKPROPAMINE_DATA to a folder with penn/{train,valid,test}.txt")
    corpus = ptb_data.Corpus(Path(root) / "penn")
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (
        929_589,
        73_760,
        82_430,
    )
    assert len(corpus) == 10_000 and corpus.words.count("<eos>") == 1


# ---------------------------------------------------------------------------------------------
# Benchmark


def test_bench_ptb_quick(tmp_path):
    """A large-model case (fused vs reference) and the small model's four variants, one run."""
    pytest.importorskip("matplotlib")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_ptb.py"),
            "--quick",
            "--cases",
            "b6-t70,small",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "bench_ptb.csv") as f:
        rows = list(csv.DictReader(f))
    large = [r for r in rows if r["case"] == "b6-t70"]
    small = [r for r in rows if r["case"] == "small"]
    assert {r["impl"] for r in large} == {"fused", "reference"}
    assert all(float(r["tokens_per_s"]) > 0 and float(r["peak_mb"]) > 0 for r in large)
    assert all(int(r["max_batch"]) >= 1 for r in large)  # a tiny model's step fits in 16 MB
    assert "fused tokens/s >= 3x reference" in proc.stdout
    # the small model: its four variants on fused, each as a ratio to the baseline's tokens/s
    assert [r["variant"] for r in small] == ["baseline", "plastic", "simple", "retroactive"]
    assert {r["impl"] for r in small} == {"fused"} and {r["nhid"] for r in small} == {"16"}
    speed = {r["variant"]: float(r["tokens_per_s"]) for r in small}
    for r in small:
        assert float(r["x_baseline"]) == pytest.approx(speed[r["variant"]] / speed["baseline"])
    targets = json.loads((tmp_path / "bench_ptb.json").read_text())["targets"]
    plastic = [t for t in targets if t["case"] == "small"]
    assert [t["target"] for t in plastic] == [
        f"{v} tokens/s >= 0.67x baseline" for v in ("plastic", "simple", "retroactive")
    ]
    for t in plastic:
        variant = t["target"].split()[0]
        assert t["value"] == pytest.approx(speed[variant] / speed["baseline"])
        assert t["status"] == ("met" if t["value"] >= 0.67 else "NOT met")
        assert t["target"] in proc.stdout
    assert (tmp_path / "bench_ptb.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--variants", "baseline,nope"], "--variants: unknown ['nope']; choose from ['baseline'"),
        (["--cases", "small", "--variants", ""], "nothing to measure: --cases 'small'"),
    ],
)
def test_bench_ptb_rejects_a_bad_selection(tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ptb.py"), *flags, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "bench_ptb.csv").exists()


# ---------------------------------------------------------------------------------------------
# table1.py: the small preset's variants over seeds


def test_table1_trains_skips_finished_resumes_cut_and_summarizes(corpus, tmp_path):
    from experiments.ptb import table1

    out = tmp_path / "table"
    flags = ["--data", str(corpus), "--out", str(out), "--variants", "baseline", "simple"]
    quick = ["--", *TINY, *SMALL_LR, "--max-batches", "2", "--epochs", "2"]
    # A time limit too short for any run: none starts, the summary has no finished run.
    table1.main([*flags, "--seeds", "5", "--time-limit", "1", *quick])
    assert not list(out.glob("*.log"))
    assert "| baseline | 0/1 | - |" in (out / "summary.md").read_text()

    table1.main([*flags, "--seeds", "5", *quick])
    first = {v: json.loads((out / f"{v}-seed5.json").read_text()) for v in ("baseline", "simple")}
    assert all(r["stopped_by"] == "epochs" and r["epochs_run"] == 2 for r in first.values())
    # Cut a run short: its results say "time limit" and its checkpoint stays; the next call
    # resumes it and leaves the finished one alone.
    cut = json.loads((out / "simple-seed5.json").read_text())
    (out / "simple-seed5.json").write_text(json.dumps(dict(cut, stopped_by="time limit")))
    baseline_log = (out / "baseline-seed5.log").read_text()
    table1.main([*flags, "--seeds", "5", "6", *quick])
    assert (out / "baseline-seed5.log").read_text() == baseline_log
    simple_log = (out / "simple-seed5.log").read_text()
    commands = [line for line in simple_log.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" in commands[1] and "--resume" not in commands[0]
    assert "resumed from" in simple_log
    assert all((out / f"{v}-seed6.json").is_file() for v in ("baseline", "simple"))

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["variants"]}
    tests = [json.loads((out / f"baseline-seed{s}.json").read_text())["test_ppl"] for s in (5, 6)]
    assert rows["baseline"]["seeds_finished"] == [5, 6]
    assert rows["baseline"]["test_ppl_mean"] == pytest.approx(sum(tests) / 2)
    assert rows["baseline"]["paper_test_ppl"] == table1.PAPER_TEST_PPL["baseline"]
    # Two runs: the interval is t(0.975, 1 dof) = tan(0.475 pi) standard errors either side.
    half_width = math.tan(0.475 * math.pi) * abs(tests[0] - tests[1]) / 2
    assert rows["baseline"]["test_ppl_ci95_half_width"] == pytest.approx(half_width)
    low, high = rows["baseline"]["test_ppl_ci95"]
    assert (low + high) / 2 == pytest.approx(sum(tests) / 2)
    assert (high - low) / 2 == pytest.approx(half_width)
    assert summary["manifest"]["command"]
    assert f"{sum(tests) / 2:.2f} ± {half_width:.2f}" in (out / "summary.md").read_text()
    assert "| simple | 2/2 |" in (out / "summary.md").read_text()
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_table1_t_quantile_matches_closed_forms_and_the_normal_limit():
    from experiments.ptb.table1 import ci95_half_width, t_quantile

    for p in (0.5, 0.9, 0.975, 0.995):
        # 1 and 2 degrees of freedom have closed-form quantiles: Cauchy, and a (2/(1-a^2))^0.5.
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-6)
        a = 2 * p - 1
        assert t_quantile(p, 2) == pytest.approx(a * math.sqrt(2 / (1 - a * a)), abs=1e-6)
        assert t_quantile(p, 10**6) == pytest.approx(statistics.NormalDist().inv_cdf(p), abs=1e-4)
    assert ci95_half_width(None, 1) is None
    sd = statistics.stdev([110.66, 112.04, 110.83])
    assert ci95_half_width(sd, 3) == pytest.approx(t_quantile(0.975, 2) * sd / math.sqrt(3))


def test_table1_exits_with_an_error_when_a_run_fails_or_the_data_is_missing(corpus, tmp_path):
    from experiments.ptb import table1

    out = tmp_path / "table"
    flags = ["--out", str(out), "--variants", "baseline", "--seeds", "5"]
    with pytest.raises(SystemExit, match=f"--data {tmp_path / 'none'}: missing"):
        table1.main(["--data", str(tmp_path / "none"), *flags])
    assert not list(out.glob("*.log")), "started a run without its data"
    # main.py refuses --bptt 0: the run fails, the table is summarized, the exit names the run
    with pytest.raises(SystemExit, match="failed \\(see their .log in .*\\): baseline-seed5"):
        table1.main(["--data", str(corpus), *flags, "--", *TINY, "--bptt", "0"])
    assert "| baseline | 0/1 |" in (out / "summary.md").read_text()
