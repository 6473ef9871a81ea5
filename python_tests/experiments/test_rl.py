"""The RL experiments (experiments/rl): A2C's returns and loss (the original code's baseline
against its per-step loop), the agents and their matched sizes, the paper presets against the
original code's settings, rollout-then-replay against the papers' per-step autograd loop, one
training iteration of every network type on both tasks, the burn-in, exact resume, the time
limit, and the scripts end to end with their plots and results files."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from helpers import ROOT, assert_parser_error, log_rows_without_timings, subprocess_env

RL = ROOT / "experiments" / "rl"
if not RL.is_dir():
    pytest.skip("experiments/ is not next to the tests", allow_module_level=True)
from experiments.rl import a2c, agents, cue_reward, envs, maze, summarize  # noqa: E402

TASKS = {"maze": maze, "cue_reward": cue_reward}
# A small, fast setting of either task's flags.
TINY = [
    "--hidden",
    "12",
    "--batch-size",
    "4",
    "--episode-length",
    "15",
    "--log-every",
    "2",
    "--save-every",
    "4",
]


def task_args(task, *flags):
    return a2c.parse_args(TASKS[task].make_parser(), TASKS[task].PRESETS, [*TINY, *flags])


def make_env(task, args, seed=0):
    return TASKS[task].make_env(args, torch.Generator().manual_seed(seed))


def test_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    expected = torch.tensor([[1 + 0.5 * 0 + 0.25 * 3, 0 + 0.5 * 2], [0 + 0.5 * 3, 2.0], [3.0, 0.0]])
    torch.testing.assert_close(a2c.returns(rewards, 0.5), expected)


def test_sampled_actions_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    draws = torch.stack([a2c.sample_actions(logits) for _ in range(20000)])  # (20000, 2)
    for row in range(2):
        frequencies = torch.bincount(draws[:, row], minlength=4).double() / len(draws)
        expected = torch.softmax(logits[row].double(), 0)
        # 5 standard errors of a frequency estimated from 20,000 draws: about 0.016 at most.
        assert torch.allclose(frequencies, expected, atol=5 * (0.25 / len(draws)) ** 0.5)


def test_a2c_loss_by_hand():
    """One step, two actions: every term of the loss against its formula."""
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])  # (T=1, B=2, A=2)
    values = torch.tensor([[0.5, -1.0]])
    episode = a2c.Episode(
        None, torch.tensor([[1, 0]]), torch.tensor([[2.0, 0.0]]), logits, values, None
    )
    p = logits.softmax(-1)
    adv = torch.tensor([2.0 - 0.5, 0.0 + 1.0])
    chosen = torch.stack([p[0, 0, 1], p[0, 1, 0]]).log()
    expected = (-chosen * adv + 0.1 * adv**2 + 0.03 * (p[0] ** 2).sum(-1)).mean()
    torch.testing.assert_close(a2c.a2c_loss(episode, 0.9, 0.1, 0.03), expected)
    # the original code's baseline: element 0's value for both
    adv = torch.tensor([2.0 - 0.5, 0.0 - 0.5])
    expected = (-chosen * adv + 0.1 * adv**2 + 0.03 * (p[0] ** 2).sum(-1)).mean()
    torch.testing.assert_close(
        a2c.a2c_loss(episode, 0.9, 0.1, 0.03, legacy_baseline=True), expected
    )


def original_loss(episode, gamma, value_coef, entropy_coef):
    """The original code's A2C loss, written as its loop: returns accumulated backwards, and at
    every step batch element 0's value as every element's baseline."""
    steps, batch = episode.rewards.shape
    probs = episode.logits.softmax(-1)
    loss = sum(entropy_coef * probs[t].pow(2).sum() / batch for t in range(steps))
    value_loss, R = 0, torch.zeros(batch, dtype=episode.values.dtype)
    for t in reversed(range(steps)):
        R = gamma * R + episode.rewards[t]
        centred = R - episode.values[t][0]
        value_loss = value_loss + centred.pow(2).sum() / batch
        log_prob = probs[t].log().gather(1, episode.actions[t][:, None]).squeeze(1)
        loss = loss - (log_prob * centred.detach()).sum() / batch
    return (loss + value_coef * value_loss) / steps


def test_legacy_baseline_is_the_original_loop():
    """--legacy-baseline gives the original code's loss and gradients; the default baseline
    (each episode's own value) does not."""
    torch.manual_seed(0)
    steps, batch, n_actions = 7, 5, 4
    logits = torch.randn(steps, batch, n_actions, dtype=torch.float64, requires_grad=True)
    values = torch.randn(steps, batch, dtype=torch.float64, requires_grad=True)
    rewards = torch.randint(0, 3, (steps, batch)).double()
    episode = a2c.Episode(
        None, torch.randint(n_actions, (steps, batch)), rewards, logits, values, None
    )
    expected = original_loss(episode, 0.9, 0.1, 0.03)
    expected_grads = torch.autograd.grad(expected, (logits, values))
    legacy = a2c.a2c_loss(episode, 0.9, 0.1, 0.03, legacy_baseline=True)
    torch.testing.assert_close(legacy, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(legacy, (logits, values)), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.isclose(a2c.a2c_loss(episode, 0.9, 0.1, 0.03), expected)
    args = task_args("maze", "--legacy-baseline")
    assert args.legacy_baseline and not task_args("maze").legacy_baseline


def test_paper_presets_follow_the_original_code():
    """The paper presets take the original code's settings (maze/batch.py and its job files,
    sr/srbatch.py and sr/modul.py); the quick presets keep the layer's own initialisation and
    no burn-in."""

    def preset(task, name):
        return a2c.parse_args(TASKS[task].make_parser(), TASKS[task].PRESETS, ["--preset", name])

    maze_paper = preset("maze", "paper")
    assert (maze_paper.size, maze_paper.hidden, maze_paper.iterations, maze_paper.lr) == (
        13,
        100,
        200_000,
        1e-4,
    )
    assert (
        maze_paper.weight_init,
        maze_paper.eta_init,
        maze_paper.elig_rate_init,
        maze_paper.burn_in,
    ) == (0.01, 0.01, 0.01, 101)
    cue_paper = preset("cue_reward", "paper")
    assert (cue_paper.hidden, cue_paper.iterations, cue_paper.episode_length) == (200, 200_000, 120)
    assert (cue_paper.trial_min, cue_paper.trial_max) == (5, 8)
    assert (
        cue_paper.weight_init,
        cue_paper.eta_init,
        cue_paper.elig_rate_init,
        cue_paper.burn_in,
        cue_paper.blank_first_step,
    ) == (0.01, 0.1, 0.1, 101, True)
    assert make_env("cue_reward", cue_paper).blank_first_step
    assert preset("maze", "simplemaze").burn_in == 101
    for task in TASKS:
        quick = preset(task, "quick")
        assert (quick.weight_init, quick.burn_in) == (None, 0)
    agent = a2c.make_agent(cue_paper, 26, 2, "retroactive", 12)
    for weights in (agent.rnn.w, agent.rnn.alpha):
        assert 0 <= weights.min() and 0.001 < weights.max() < 0.01  # beyond the layer's own
    assert agent.rnn.elig_rate.item() == pytest.approx(0.1)
    assert a2c.make_agent(cue_paper, 26, 2, "plastic", 12).rnn.eta.item() == pytest.approx(0.1)
    assert a2c.make_agent(maze_paper, 16, 4, "retroactive", 12).rnn.elig_rate.item() == (
        pytest.approx(0.01)
    )


def test_matched_sizes_of_the_maze():
    """The Backpropamine maze: 100 modulated neurons match 139 non-plastic ones."""
    args = task_args("maze", "--hidden", "100", "--types", *maze.TYPES)
    sizes = a2c.hidden_sizes(args, envs.GridMaze.obs_size, 4)
    assert sizes["rnn"] == 139 and sizes["simple"] == sizes["retroactive"] == 100
    target = agents.count_parameters(agents.Agent(16, 4, "simple", 100))
    for network_type, n in sizes.items():
        count = agents.count_parameters(agents.Agent(16, 4, network_type, n))
        assert abs(count - target) / target < 0.02, network_type


def test_agent_validation():
    with pytest.raises(ValueError, match="network_type must be one of"):
        agents.Agent(16, 4, "hebbian", 10)


@pytest.mark.parametrize("task", TASKS)
def test_replay_equals_the_per_step_autograd_loop(task):
    """Rolling out without gradients and replaying through the sequence op gives the loss and
    the gradients of the papers' loop, which builds the graph while acting."""
    args = task_args(task, *(["--size", "5", "--wp", "0.1"] if task == "maze" else []))
    for network_type in ("simple", "retroactive", "plastic"):
        agent = agents.Agent(
            make_env(task, args).obs_size, make_env(task, args).n_actions, network_type, 12
        ).double()
        with torch.no_grad():
            agent.rnn.alpha.normal_(0, 0.5)  # plasticity that matters
            if hasattr(agent.rnn, "h2mod"):
                agent.rnn.h2mod.bias.fill_(0.5)
        results = []
        for run in (a2c.rollout_and_replay, lambda ag, env: a2c.play(ag, env, grad=True)):
            torch.manual_seed(3)
            episode = run(agent, make_env(task, args, seed=5))
            loss = a2c.a2c_loss(episode, 0.9, 0.1, 0.03)
            agent.zero_grad()
            loss.backward()
            results.append(
                (episode, loss, {n: p.grad.clone() for n, p in agent.named_parameters()})
            )
        (replayed, loss_a, grads_a), (stepped, loss_b, grads_b) = results
        assert torch.equal(replayed.actions, stepped.actions)
        assert replayed.rewards.abs().sum() > 0, "no reward: a weak test"
        torch.testing.assert_close(replayed.logits, stepped.logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
        for name in grads_a:
            torch.testing.assert_close(
                grads_a[name], grads_b[name], rtol=1e-10, atol=1e-12, msg=f"{network_type} {name}"
            )


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("impl", ("fused", "reference"))
@pytest.mark.parametrize("network_type", maze.TYPES)
def test_one_iteration_changes_every_parameter(task, impl, network_type):
    if network_type not in TASKS[task].TYPES:
        pytest.skip(f"{network_type} is not a {task} type")
    args = task_args(task, "--impl", impl)
    env = make_env(task, args)
    agent = agents.Agent(env.obs_size, env.n_actions, network_type, 12, impl=impl)
    before = {n: p.clone() for n, p in agent.named_parameters()}
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    reward, loss = a2c.train_iteration(agent, optimizer, env, args)
    assert torch.isfinite(torch.tensor([reward, loss])).all()
    for name, p in agent.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"


@pytest.mark.parametrize("burn_in, interrupted_at", [(0, 8), (6, 4)])
def test_resume_continues_exactly(tmp_path, burn_in, interrupted_at):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    common = ["--types", "retroactive", "--seeds", "1", "--burn-in", str(burn_in)]
    maze.main([*TINY, *common, "--iterations", "12", "--out", str(whole)])
    maze.main([*TINY, *common, "--iterations", str(interrupted_at), "--out", str(interrupted)])
    maze.main([*TINY, *common, "--iterations", "12", "--out", str(interrupted), "--resume"])
    name = "retroactive-seed1"
    assert log_rows_without_timings(whole / f"{name}.csv") == log_rows_without_timings(
        interrupted / f"{name}.csv"
    )
    a, b = (
        torch.load(d / f"{name}.checkpoint.pt", weights_only=True) for d in (whole, interrupted)
    )
    assert a["iteration"] == b["iteration"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # A finished run is skipped: its results file keeps the manifest of the call that trained it.
    results = (interrupted / f"{name}.json").read_bytes()
    again = ["--iterations", "12", "--time-limit", "600", "--out", str(interrupted), "--resume"]
    maze.main([*TINY, *common, *again])
    assert (interrupted / f"{name}.json").read_bytes() == results
    with pytest.raises(SystemExit, match="--lr"):
        maze.main(
            [
                *TINY,
                *common,
                "--iterations",
                "14",
                "--out",
                str(interrupted),
                "--resume",
                "--lr",
                "0.5",
            ]
        )


def test_burn_in_takes_no_optimizer_step(tmp_path):
    """--burn-in 4: the first 4 iterations play and log, but leave the agent as initialised;
    the 5th changes it."""
    common = [*TINY, "--types", "simple", "--seeds", "3", "--burn-in", "4"]
    maze.main([*common, "--iterations", "4", "--out", str(tmp_path / "burn-in")])
    maze.main([*common, "--iterations", "6", "--out", str(tmp_path / "after")])
    args = task_args("maze", *common)
    torch.manual_seed(3)  # as train_agent: the seed, then the agent
    initial = a2c.make_agent(args, 16, 4, "simple", 12).state_dict()
    for folder, changed in (("burn-in", False), ("after", True)):
        saved = torch.load(tmp_path / folder / "simple-seed3.checkpoint.pt", weights_only=True)
        assert any(not torch.equal(v, initial[k]) for k, v in saved["model"].items()) == changed
    assert len(log_rows_without_timings(tmp_path / "burn-in" / "simple-seed3.csv")) == 2


def test_time_limit_stops_at_a_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    """Past --time-limit a run stops at its next checkpoint (its JSON says how far it got);
    --resume then finishes it with the logs of an uninterrupted run."""
    iterations, real_train_iteration = [0], a2c.train_iteration

    def counted(*args, **kwargs):
        iterations[0] += 1
        return real_train_iteration(*args, **kwargs)

    # a2c's clock jumps an hour ahead after 6 iterations: past the limit during iteration 7.
    clock = types.SimpleNamespace(time=lambda: time.time() + 3600 * (iterations[0] >= 6))
    monkeypatch.setattr(a2c, "train_iteration", counted)
    monkeypatch.setattr(a2c, "time", clock)
    common = [*TINY, "--types", "rnn", "--seeds", "0"]
    limited = tmp_path / "limited"
    assert (
        maze.main([*common, "--iterations", "100000", "--time-limit", "60", "--out", str(limited)])
        is None
    )
    result = json.loads((limited / "rnn-seed0.json").read_text())
    reached = result["iterations"]
    assert not result["finished"] and reached == 8  # the first checkpoint (--save-every 4)
    checkpoint = torch.load(limited / "rnn-seed0.checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == reached
    assert int(log_rows_without_timings(limited / "rnn-seed0.csv")[-1]["iteration"]) == reached
    assert not (limited / "results.json").exists()
    target = str(reached + 4)
    maze.main([*common, "--iterations", target, "--out", str(limited), "--resume"])
    maze.main([*common, "--iterations", target, "--out", str(tmp_path / "whole")])
    assert log_rows_without_timings(limited / "rnn-seed0.csv") == log_rows_without_timings(
        tmp_path / "whole" / "rnn-seed0.csv"
    )
    result = json.loads((limited / "rnn-seed0.json").read_text())
    assert result["finished"] and result["iterations"] == reached + 4


def test_parallel_runs_equal_sequential_ones(tmp_path):
    """--jobs 2 trains the runs in two worker processes of one thread each: the same logs and
    agents as one after the other in this process (with one thread, as the workers)."""
    common = [*TINY, "--types", "rnn", "simple", "--seeds", "0", "1", "--iterations", "4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cue_reward.main([*common, "--jobs", "1", "--out", str(tmp_path / "sequential")])
    finally:
        torch.set_num_threads(threads)
    cue_reward.main([*common, "--jobs", "2", "--out", str(tmp_path / "parallel")])
    for name in ("rnn-seed0", "rnn-seed1", "simple-seed0", "simple-seed1"):
        a, b = (tmp_path / folder / f"{name}.csv" for folder in ("sequential", "parallel"))
        assert log_rows_without_timings(a) == log_rows_without_timings(b), name
        a, b = (
            torch.load(tmp_path / folder / f"{name}.checkpoint.pt", weights_only=True)
            for folder in ("sequential", "parallel")
        )
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (name, key)
    assert (tmp_path / "parallel" / "episode-simple.png").stat().st_size > 0


def test_a_failed_parallel_run_raises_its_error(tmp_path):
    (tmp_path / "rnn-seed1.checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read the checkpoint .*rnn-seed1.checkpoint.pt"):
        cue_reward.main(
            [
                *TINY,
                "--types",
                "rnn",
                "--seeds",
                "0",
                "1",
                "--iterations",
                "2",
                "--jobs",
                "2",
                "--resume",
                "--out",
                str(tmp_path),
            ]
        )


@pytest.mark.parametrize("task", TASKS)
def test_script_end_to_end(task, tmp_path):
    """Two types and two seeds: logs, checkpoints, the learning-curve plot and the episode plots."""
    summary = TASKS[task].main(
        [
            *TINY,
            "--types",
            "rnn",
            "retroactive",
            "--seeds",
            "0",
            "1",
            "--iterations",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert set(summary) == {"rnn", "retroactive"}
    for name in (
        "curves.png",
        "episode-rnn.png",
        "episode-retroactive.png",
        "rnn-seed1.csv",
        "retroactive-seed0.checkpoint.pt",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(log_rows_without_timings(tmp_path / "rnn-seed0.csv")) == 2
    run = json.loads((tmp_path / "rnn-seed0.json").read_text())
    assert (run["iterations"], run["episodes"], run["finished"]) == (4, 16, True)
    assert run["final_reward"] == pytest.approx(a2c.final_reward(tmp_path / "rnn-seed0.csv"))
    assert run["manifest"]["commit"] and "wall_seconds" in run["manifest"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final_reward"]["rnn"]["median"] == pytest.approx(summary["rnn"][0])
    assert set(results["final_reward"]["retroactive"]["per_seed"]) == {"0", "1"}


def test_summarize_by_hand(tmp_path):
    """summarize.py on hand-written logs: the last 10% of the rows (at least one), the
    quartiles over seeds, the training time over two sessions, the first episode count above
    the threshold, the logs cut at --episodes, and a log without rows left out."""
    rewards = {0: [0, 1, 2, 9, 4, 5, 6, 7, 8, 9, 10, 20], 1: [1] * 12, 2: [3] * 12}
    seconds = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]  # resumed after the 6th row
    for seed, reward in rewards.items():
        rows = ["iteration,episodes,reward,loss,seconds"] + [
            f"{i + 1},{(i + 1) * 30},{r},0.5,{seconds[i]}" for i, r in enumerate(reward)
        ]
        (tmp_path / f"simple-seed{seed}.csv").write_text("\n".join(rows) + "\n")
    # A run that has not logged a row yet (stopped by --time-limit before its first) is left out.
    (tmp_path / "rnn-seed0.csv").write_text("iteration,episodes,reward,loss,seconds\n")
    summary = summarize.main([str(tmp_path), "--threshold", "5"])
    assert "rnn" not in summary
    seed0 = summary["simple"]["seeds"][0]
    assert seed0["final_reward"] == 15  # the last 2 of 12 rows
    assert (seed0["episodes"], seed0["training_seconds"], seed0["first_episodes_above"]) == (
        360,
        12,
        120,
    )
    assert summary["simple"]["seeds"][1]["first_episodes_above"] is None
    assert (summary["simple"]["median"], summary["simple"]["q25"], summary["simple"]["q75"]) == (
        3,
        2,
        9,
    )
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["types"]["simple"]["median"] == 3 and "manifest" in written
    cut = summarize.main([str(tmp_path), "--episodes", "150"])["simple"]["seeds"][0]
    assert (cut["final_reward"], cut["episodes"], cut["training_seconds"]) == (4, 150, 5)
    assert (tmp_path / "summary-150-episodes.json").is_file()


# The README's result tables: (summary file under experiments/rl/results, how a row writes a
# type's median and quartiles).
README_TABLES = [
    ("maze/summary.json", "{median:.1f} ({q25:.1f}-{q75:.1f})"),
    ("maze-other/summary.json", "{median:.1f} ({q25:.1f}-{q75:.1f})"),
    ("maze-paper/summary.json", "| {median:.1f} |"),
    ("cue-reward-short/summary.json", "{median:.2f} ({q25:.2f} to {q75:.2f})"),
    ("cue-reward-standard/summary.json", "{median:.2f} ({q25:.2f} to {q75:.2f})"),
    ("cue-reward-standard/summary-200000-episodes.json", "{median:.2f} ({q25:.2f} to {q75:.2f})"),
    ("cue-reward-fixed/summary.json", "{type} {median:.2f}"),
]


@pytest.mark.parametrize("summary, row", README_TABLES)
def test_readme_tables_quote_their_summary_files(summary, row):
    """Each type's numbers in the README's result tables are those of the committed
    summary.json the table cites (rounded as the table writes them)."""
    readme = (RL / "README.md").read_text().replace("**", "")
    assert f"results/{summary}" in readme or summary.split("/")[1] in readme, summary
    types = json.loads((RL / "results" / summary).read_text())["types"]
    for network_type, result in types.items():
        quoted = row.format(type=network_type, **result)
        assert quoted in readme, f"{summary} {network_type}: {quoted} not in the README"


def test_cue_reward_task_flags_reach_the_environment():
    env = make_env(
        "cue_reward",
        task_args("cue_reward", "--trial-min", "4", "--trial-max", "6", "--fixed-cues"),
    )
    assert (env.trial_min, env.trial_max) == (4, 6)
    env.reset()
    first = env.cues.clone()
    env.reset()
    assert torch.equal(env.cues, first)
    with pytest.raises(ValueError, match="trial_min must be an integer >= 4, got 3"):
        make_env("cue_reward", task_args("cue_reward", "--trial-min", "3"))
    # The quick preset takes the shortest trials; the paper preset the paper's 5-8 steps.
    for preset, trials in (("quick", (4, 4)), ("paper", (5, 8))):
        args = task_args("cue_reward", "--preset", preset)
        assert (args.trial_min, args.trial_max) == trials, preset


def test_flag_validation():
    with pytest.raises(SystemExit):
        task_args("maze", "--save-every", "3")  # not a multiple of --log-every 2
    with pytest.raises(SystemExit):
        task_args("cue_reward", "--types", "fanout")  # not a cue-reward type
    with pytest.raises(SystemExit):
        task_args("maze", "--jobs", "0")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gamma", "nan"], "argument --gamma: must be a finite number, got nan"),
        (["--seeds", "0", "-1"], "argument --seeds: must be >= 0, got -1"),
        (["--gamma", "1.5"], "argument --gamma: must be <= 1, got 1.5"),
        (["--gamma", "-0.1"], "argument --gamma: must be >= 0, got -0.1"),
        (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--eps", "-0.5"], "argument --eps: must be > 0, got -0.5"),
        (["--entropy-coef", "nan"], "argument --entropy-coef: must be a finite number, got nan"),
        (["--value-coef", "-1"], "argument --value-coef: must be >= 0, got -1"),
        (["--clip-grad", "inf"], "argument --clip-grad: must be a finite number, got inf"),
        (["--rew", "nan"], "argument --rew: must be a finite number, got nan"),
        (["--episode-length", "0"], "argument --episode-length: must be >= 1, got 0"),
        (["--hidden", "0"], "argument --hidden: must be >= 1, got 0"),
        (["--size", "4"], "argument --size: size must be an odd integer from 5 to 2001, got 4"),
        (["--size", "2003"], "argument --size: size must be an odd integer from 5 to 2001"),
        (["--device", "tpu"], "argument --device: not a torch device: 'tpu'"),
    ],
)
def test_numeric_flags_are_finite_and_in_range(flags, message, capsys):
    assert_parser_error(lambda flags: task_args("maze", *flags), flags, message, capsys)


# ---------------------------------------------------------------------------------------------
# --jobs > 1 when the parent process is killed or stopped: no orphaned worker goes on training

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc (Linux)"
)
PARALLEL_RUNS = ("rnn-seed0", "simple-seed0")


def process_tree():
    """{pid: (parent pid, state)} of every process, from /proc."""
    tree = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        tree[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return tree


def descendants(pid):
    tree, found, todo = process_tree(), [], [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, (ppid, _) in tree.items() if ppid == parent]
        found += children
        todo += children
    return found


def running(pids):
    tree = process_tree()
    return [pid for pid in pids if pid in tree and tree[pid][1] != "Z"]  # zombies have ended


def wait_until_ended(pids, timeout_s):
    """The pids still running after up to `timeout_s` seconds."""
    deadline = time.time() + timeout_s
    while running(pids) and time.time() < deadline:
        time.sleep(0.1)
    return running(pids)


def sigint_as_from_a_terminal():
    """SIGINT's default action in the child: a shell without job control starts background
    commands (pytest under `cmd &`, say) with SIGINT ignored, which Python then keeps."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_parallel_run(out, *flags, iterations=100_000):
    """cue_reward.py with --jobs 2 on two runs in a subprocess, once both have written a
    checkpoint; returns (process, its worker processes and their helpers)."""
    out.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            str(RL / "cue_reward.py"),
            *TINY,
            "--types",
            "rnn",
            "simple",
            "--seeds",
            "0",
            "--iterations",
            str(iterations),
            "--jobs",
            "2",
            "--out",
            str(out),
            *flags,
        ],
        stdout=open(out / "stdout.txt", "w"),
        stderr=open(out / "stderr.txt", "w"),
        env=subprocess_env(),
        cwd=out,
        preexec_fn=sigint_as_from_a_terminal,
    )
    deadline = time.time() + 180
    while not all((out / f"{name}.checkpoint.pt").is_file() for name in PARALLEL_RUNS):
        assert process.poll() is None, (out / "stderr.txt").read_text()
        assert time.time() < deadline, "the runs wrote no checkpoint in 180 s"
        time.sleep(0.2)
    workers = descendants(process.pid)
    assert len(workers) >= 2, workers
    return process, workers


@pytest.fixture
def started():
    """Starts parallel runs (start_parallel_run) and kills whatever of them is left at the end."""
    processes = []

    def start(*args, **kwargs):
        process, workers = start_parallel_run(*args, **kwargs)
        processes.append((process, workers))
        return process, workers

    yield start
    for process, workers in processes:
        for pid in running([process.pid, *workers]):
            os.kill(pid, signal.SIGKILL)
        process.wait()


@needs_proc
def test_workers_exit_when_the_parent_is_killed(tmp_path, started):
    process, workers = started(tmp_path / "run")
    process.kill()
    process.wait()
    assert wait_until_ended(workers, 5) == [], "orphaned workers still running 5 s after SIGKILL"


@needs_proc
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_parent_stops_every_run(tmp_path, started, stop):
    process, workers = started(tmp_path / "run")
    process.send_signal(stop)
    try:
        returncode = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{stop.name}: the parent still runs after 30 s")
    error = (tmp_path / "run" / "stderr.txt").read_text()
    assert returncode == 1, error
    assert f"stopped ({stop.name}): every run has its last checkpoint in" in error
    assert "--resume continues from there" in error and "Traceback" not in error, error
    assert wait_until_ended(workers, 5) == [], "workers still running 5 s after the parent ended"


@needs_proc
def test_a_resume_after_a_kill_logs_every_row_once(tmp_path, started):
    out = tmp_path / "run"
    process, workers = started(out)
    process.kill()
    process.wait()
    wait_until_ended(workers, 5)  # (were they left running, they would append to the logs)
    reached = max(
        torch.load(out / f"{name}.checkpoint.pt", weights_only=True)["iteration"]
        for name in PARALLEL_RUNS
    )
    target = reached + 5
    resumed = subprocess.run(
        [
            sys.executable,
            str(RL / "cue_reward.py"),
            *TINY,
            "--types",
            "rnn",
            "simple",
            "--seeds",
            "0",
            "--iterations",
            str(target),
            "--jobs",
            "2",
            "--out",
            str(out),
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
        cwd=out,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    time.sleep(1)  # time for a left-over worker to append a row
    expected = sorted({*range(2, target + 1, 2), target})  # --log-every 2, and the last
    for name in PARALLEL_RUNS:
        rows = [int(row["iteration"]) for row in log_rows_without_timings(out / f"{name}.csv")]
        assert rows == expected, name
