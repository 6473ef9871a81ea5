"""Advantage actor-critic (A2C) as in the Backpropamine and differentiable-plasticity RL tasks,
and the command line and runs that the task scripts (maze.py, cue_reward.py) share.

Loss of a batch of episodes of length T, as the papers: with Monte-Carlo returns
R_t = r_t + gamma * R_{t+1},

    loss = mean over episodes of  1/T * sum_t [ -log pi(a_t) * (R_t - V_t)    (policy, V_t detached)
                                                + value_coef * (R_t - V_t)^2      (critic)
                                                + entropy_coef * sum_a pi(a)^2 ]  (entropy term)

--legacy-baseline reproduces the original code, which used batch element 0's value V_t as every
element's baseline (in both the policy and the critic term).

Why it is fast: acting needs no gradient, so an episode is first played one step at a time
under no_grad with the fused rollout op (traces updated in place, one sweep of them per step),
recording the observations and the network's activity (a bp.RecordedRollout); the environment
depends only on the actions, so the replay of those observations has the same logits and
values, and their gradients come from the fused sequence op's backward on the record, without
running the network again (`rollout_and_replay`). The papers' way, a
per-step loop that builds the autograd graph while acting (`play(..., grad=True)`), is what
--impl reference runs and what the tests compare the replay with.
"""

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from experiments.common import (
    SEED,
    RunCheckpoint,
    number,
    parse_with_preset,
    preset_parser,
    pyplot,
    read_csv_columns,
    require_device,
    require_extras,
    resume_csv,
    sigterm_as_interrupt,
    torch_device,
    train_iterations,
    write_json,
)
from experiments.rl.agents import MODULATED, Agent, count_parameters, matched_size

LOG_FIELDS = ("iteration", "episodes", "reward", "loss", "seconds")


class Episode(NamedTuple):
    """A batch of episodes: observations (T, B, obs_size), actions and rewards (T, B); logits
    (T, B, A), values (T, B) and modulation (T, B, K) as computed while acting (with gradients
    when played with grad=True)."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    logits: torch.Tensor
    values: torch.Tensor
    modulation: Optional[torch.Tensor]


def play(agent, env, grad=False, state=None):
    """One episode of every sample of `env`, actions sampled from the agent's policy, from the
    agent's `state` (None: zeros; or a recorded rollout)."""
    observations, actions, rewards, logits, values, modulation = [], [], [], [], [], []
    obs = env.reset()
    with torch.set_grad_enabled(grad):
        for _ in range(env.episode_length):
            logit, value, state, m = agent.step(obs, state)
            action = sample_actions(logit.detach())
            observations.append(obs)
            actions.append(action)
            logits.append(logit)
            values.append(value)
            modulation.append(m)
            obs, reward = env.step(action)
            rewards.append(reward)
    return Episode(
        torch.stack(observations),
        torch.stack(actions),
        torch.stack(rewards),
        torch.stack(logits),
        torch.stack(values),
        None if modulation[0] is None else torch.stack(modulation),
    )


def sample_actions(logits):
    """One action per row of logits (B, A), drawn from softmax(logits) by the Gumbel-max trick:
    argmax(logits + Gumbel noise), a few cheap ops where multinomial costs more per step."""
    return (logits - torch.empty_like(logits).exponential_().log()).argmax(-1)


def rollout_and_replay(agent, env):
    """`play` without gradients, recording the network's activity, then its replay: the same
    episode as play(grad=True), its logits and values with gradients, without running the
    recurrent layer a second time (the fused sequence op's backward takes the record)."""
    rollout = agent.recorded_rollout(env.batch_size, env.episode_length)
    episode = play(agent, env, grad=False, state=rollout)
    logits, values, modulation = agent.replay(episode.observations, rollout)
    return episode._replace(logits=logits, values=values, modulation=modulation)


def returns(rewards, gamma):
    """Monte-Carlo returns R_t = r_t + gamma * R_{t+1} of rewards (T, B), R_T = 0: one product
    with the discounts gamma^(s - t), s >= t."""
    steps = torch.arange(rewards.size(0), device=rewards.device)
    lag = (steps[None, :] - steps[:, None]).to(rewards.dtype)
    discounts = torch.where(lag >= 0, gamma ** lag.clamp(min=0), torch.zeros_like(lag))
    return discounts @ rewards


def a2c_loss(episode, gamma, value_coef, entropy_coef, legacy_baseline=False):
    """The papers' A2C loss of a batch of episodes (see the module docstring)."""
    R = returns(episode.rewards.to(episode.values.dtype), gamma)
    values = episode.values
    if legacy_baseline:  # the original code's bug: one baseline for the whole batch
        values = values[:, :1].expand_as(values)
    advantage = R - values
    log_probs = F.log_softmax(episode.logits, -1)
    chosen = log_probs.gather(-1, episode.actions.unsqueeze(-1)).squeeze(-1)
    per_step = (
        -chosen * advantage.detach()
        + value_coef * advantage.pow(2)
        + entropy_coef * log_probs.exp().pow(2).sum(-1)
    )
    return per_step.sum(0).mean() / episode.rewards.size(0)


# ----------------------------------------------------------------------------------------------
# Command line and training runs shared by the task scripts


def make_parser(description, types, presets):
    """The flags every task shares. `types`: the task's network types; `presets`: {name: flag
    defaults}, the first one the default preset."""
    p = preset_parser(description, presets)
    add = p.add_argument
    add("--types", nargs="+", choices=types, default=list(types), help="network types to train")
    add("--seeds", type=SEED, nargs="+", default=[0, 1, 2], help="one run per type and seed")
    add(
        "--hidden",
        type=number(int, 1),
        default=100,
        help="neurons of the modulated types; the others get the size that matches their "
        "parameter count",
    )
    add(
        "--iterations",
        type=number(int, 1),
        default=1000,
        help="training iterations (batches of episodes)",
    )
    add("--batch-size", type=number(int, 1), default=30, help="episodes per iteration")
    add("--lr", type=number(float, 0, strict=True), default=1e-4, help="Adam learning rate")
    add("--eps", type=number(float, 0, strict=True), default=1e-4, help="Adam epsilon")
    add(
        "--gamma",
        type=number(float, 0, maximum=1),
        default=0.9,
        help="discount of the Monte-Carlo returns",
    )
    add(
        "--value-coef",
        type=number(float, 0),
        default=0.1,
        help="weight of the critic's squared error",
    )
    add(
        "--entropy-coef", type=number(float, 0), default=0.03, help="weight of the sum(p^2) penalty"
    )
    add("--clip-grad", type=number(float, 0), default=4.0, help="gradient norm clip (0: none)")
    add(
        "--legacy-baseline",
        action="store_true",
        help="the original code's baseline: batch element 0's value for every element",
    )
    add(
        "--burn-in",
        type=number(int, 0),
        default=0,
        help="the first iterations take no optimizer step (the original code: 101, its "
        "'iteration > 100' counting from 0)",
    )
    add(
        "--weight-init",
        type=number(float, 0, strict=True),
        default=None,
        help="w and alpha drawn from U[0, x) (default: the layer's own, U[0, 0.001))",
    )
    add(
        "--eta-init",
        type=number(float),
        default=0.01,
        help="initial learned plasticity rate (types plastic, oja, oja-scalar)",
    )
    add(
        "--elig-rate-init",
        type=number(float, 0, maximum=1),
        default=0.1,
        help="initial learned eligibility-trace rate (type retroactive)",
    )
    add(
        "--impl",
        choices=("fused", "reference"),
        default="fused",
        help="fused: roll out without gradients, replay through the fused sequence op; "
        "reference: the papers' per-step autograd loop on the pure-PyTorch reference",
    )
    add(
        "--stepwise",
        action="store_true",
        help="with --impl fused: build the autograd graph while acting, as the papers' loop",
    )
    add("--device", type=torch_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    add(
        "--jobs",
        type=number(int, 1),
        default=None,
        help="runs trained at once, each in its own process with one thread (default: one per "
        "CPU core, at most one per run, on the CPU; 1 on CUDA)",
    )
    add("--out", default="runs", help="folder of the CSV logs, checkpoints and plots")
    add("--log-every", type=number(int, 1), default=10, help="iterations per CSV row (mean reward)")
    add("--save-every", type=number(int, 1), default=100, help="iterations between checkpoints")
    add(
        "--resume",
        action="store_true",
        help="continue every run from its checkpoint in --out (finished runs are skipped)",
    )
    add(
        "--time-limit",
        type=number(float, 0),
        default=0.0,
        help="seconds; past them every run stops at its next checkpoint, for --resume to "
        "continue (0: no limit)",
    )
    return p


def parse_args(parser, presets, argv=None):
    """Parses with the chosen preset's defaults (flags given explicitly still win)."""
    return parse_with_preset(parser, presets, argv)


def make_agent(args, obs_size, n_actions, network_type, hidden):
    """The agent of one run, initialised as args says."""
    return Agent(
        obs_size,
        n_actions,
        network_type,
        hidden,
        impl=args.impl,
        weight_init=args.weight_init,
        eta_init=args.eta_init,
        elig_rate_init=args.elig_rate_init,
    )


def hidden_sizes(args, obs_size, n_actions):
    """{type: hidden size}: the modulated types get --hidden, the others the size with the
    closest parameter count."""
    target = count_parameters(Agent(obs_size, n_actions, "simple", args.hidden, impl="reference"))
    return {
        t: args.hidden if t in MODULATED else matched_size(t, target, obs_size, n_actions)
        for t in args.types
    }


def run_name(network_type, seed):
    return f"{network_type}-seed{seed}"


def train_iteration(agent, optimizer, env, args, update=True):
    """One A2C step on a batch of episodes (the episodes and the loss alone when not `update`:
    the burn-in); returns (mean reward per episode, loss)."""
    if args.stepwise or args.impl == "reference":
        episode = play(agent, env, grad=update)
    else:
        episode = rollout_and_replay(agent, env)
    loss = a2c_loss(episode, args.gamma, args.value_coef, args.entropy_coef, args.legacy_baseline)
    if not update:
        return episode.rewards.sum(0).mean().item(), loss.item()
    optimizer.zero_grad()
    loss.backward()
    if args.clip_grad:
        torch.nn.utils.clip_grad_norm_(agent.parameters(), args.clip_grad)
    optimizer.step()
    agent.rnn.clamp_elig_rate_()  # a rate outside [0, 1] makes the eligibility trace diverge
    return episode.rewards.sum(0).mean().item(), loss.item()


# Flags a resumed run may change; all others (the task, the network, the hyperparameters, the
# logging interval) must be those of the run that wrote the checkpoint.
RESUME_MAY_CHANGE = (
    "preset",
    "types",
    "seeds",
    "iterations",
    "impl",
    "stepwise",
    "device",
    "jobs",
    "out",
    "save_every",
    "resume",
    "time_limit",
)


class TimeLimitReached(Exception):
    """--time-limit has passed and the run's last iteration is checkpointed."""


def train_agent(args, make_env, network_type, hidden, seed, out, deadline=None, bar_position=0):
    """Trains one agent (common.train_iterations with the A2C step, Adam with --eps, and the
    episodes drawn on --device from `seed`) until --iterations or, past the time.time()
    `deadline`, its next checkpoint. Writes <out>/<type>-seed<k>.csv, .checkpoint.pt and .json
    (the final metrics and the manifest). Returns (agent, whether it reached --iterations)."""
    started = time.time()
    name = run_name(network_type, seed)
    torch.manual_seed(seed)
    generator = torch.Generator(args.device).manual_seed(seed)
    env = make_env(args, generator)
    agent = make_agent(args, env.obs_size, env.n_actions, network_type, hidden).to(args.device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=args.eps)
    checkpoint = RunCheckpoint(
        out / f"{name}.checkpoint.pt", args, RESUME_MAY_CHANGE, agent, optimizer, generator
    )
    done = checkpoint.resume() if args.resume else 0
    if done == args.iterations and (out / f"{name}.json").exists():
        return agent, True  # finished before: its results file keeps the manifest of its training
    log = out / f"{name}.csv"
    resume_csv(log, LOG_FIELDS, "iteration", done)
    reached = done

    def step(iteration):  # the env draws from `generator`
        nonlocal reached
        if (
            deadline is not None
            and time.time() >= deadline
            and (iteration - 1) % args.save_every == 0
        ):  # iteration - 1 is checkpointed
            raise TimeLimitReached
        reward, loss = train_iteration(agent, optimizer, env, args, update=iteration > args.burn_in)
        reached = iteration
        return dict(reward=reward, loss=loss)

    try:
        train_iterations(
            args, name, checkpoint, done, log, LOG_FIELDS, step, bar_position=bar_position
        )
    except TimeLimitReached:
        pass
    finished = reached == args.iterations
    write_json(
        out / f"{name}.json",
        dict(
            type=network_type,
            seed=seed,
            hidden=hidden,
            parameters=count_parameters(agent),
            iterations=reached,
            episodes=reached * args.batch_size,
            finished=finished,
            final_reward=final_reward(log) if reached else None,
            final_reward_is="mean reward per episode over the last 10% of the log's rows",
            options=vars(args),
        ),
        started=started,
    )
    return agent, finished


def train_and_plot(args, make_env, network_type, hidden, seed, out, deadline=None, bar_position=0):
    """train_agent, then for the first seed of a finished run the plot of one episode
    (episode-<type>.png). Returns whether the run finished."""
    agent, finished = train_agent(
        args, make_env, network_type, hidden, seed, out, deadline, bar_position
    )
    if finished and seed == args.seeds[0]:
        env = make_env(args, torch.Generator(args.device).manual_seed(10_000 + seed))
        plot_episode(agent, env, out / f"episode-{network_type}.png")
    return finished


_bar_position = 0  # in a --jobs worker process: the terminal line of its progress bars


def _start_worker(free_lines, stop):
    """A --jobs worker process: one thread (the jobs share the cores), its own bar line. It
    leaves SIGINT to the parent (Ctrl-C reaches every process of the terminal's group; the
    parent stops the workers) and exits when the parent dies or sets `stop`."""
    global _bar_position
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(stop,), daemon=True).start()
    torch.set_num_threads(1)
    _bar_position = free_lines.get()


def _exit_with_parent(stop, poll_s=0.5):
    """Ends this worker process as soon as the parent process has died (its sentinel becomes
    ready, even after a SIGKILL, which runs no clean-up there) or has set `stop`: an orphaned
    worker would go on training and appending to the logs in --out, racing a resumed run."""
    parent = multiprocessing.parent_process()
    while not stop.is_set():
        if multiprocessing.connection.wait([parent.sentinel], timeout=poll_s):
            break
    os._exit(1)  # at once, whatever the main thread is doing; resume_csv drops a cut row


def _train_and_plot_in_worker(*run):
    return train_and_plot(*run, bar_position=_bar_position)


def usable_cores():
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_all(runs, jobs):
    """Calls train_and_plot(*run) for every run of `runs`, `jobs` at a time in worker
    processes (jobs > 1) or one after the other here; returns whether every run finished."""
    if jobs == 1:
        return all([train_and_plot(*run) for run in runs])
    # spawn, not fork: a forked child of a process that has used OpenMP threads can hang.
    context = multiprocessing.get_context("spawn")
    free_lines, stop = context.Queue(), context.Event()
    for line in range(jobs):
        free_lines.put(line)
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_start_worker, initargs=(free_lines, stop)
    ) as pool:
        futures = [pool.submit(_train_and_plot_in_worker, *run) for run in runs]
        try:
            return all([future.result() for future in futures])  # a failed run raises here
        except BaseException:  # a failed run, Ctrl-C, SIGTERM (sigterm_as_interrupt)
            stop.set()  # every worker exits now, not after its current run
            pool.shutdown(cancel_futures=True)
            raise


def main(args, make_env):
    """Trains every (type, seed) of args, `--jobs` runs at a time, then plots the learning
    curves (curves.png) and, for each trained type, one episode of its first seed
    (episode-<type>.png), and writes results.json (the final rewards and the manifest).
    SIGTERM stops every run as Ctrl-C does; either exits with a line saying that --resume
    continues the runs from their last checkpoints. Past --time-limit every run stops at its
    next checkpoint, and main says so and returns None."""
    started = time.time()
    deadline = started + args.time_limit if args.time_limit else None
    require_extras()
    require_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe = make_env(args, torch.Generator(args.device).manual_seed(0))
    sizes = hidden_sizes(args, probe.obs_size, probe.n_actions)
    counts = {
        t: count_parameters(Agent(probe.obs_size, probe.n_actions, t, n, "reference"))
        for t, n in sizes.items()
    }
    print(
        "network sizes (parameters matched):",
        ", ".join(f"{t} {n} ({counts[t]:,})" for t, n in sizes.items()),
        flush=True,
    )
    runs = [
        (args, make_env, t, sizes[t], seed, out, deadline)
        for t in args.types
        for seed in args.seeds
    ]
    jobs = args.jobs or (1 if torch.device(args.device).type != "cpu" else usable_cores())
    try:
        with sigterm_as_interrupt():
            finished = run_all(runs, min(jobs, len(runs)))
    except KeyboardInterrupt as interrupt:
        reason = str(interrupt) or "SIGINT"
        raise SystemExit(
            f"stopped ({reason}): every run has its last checkpoint in {out}; "
            "--resume continues from there"
        ) from None
    if not finished:
        print(
            f"time limit ({args.time_limit:g} s): the runs stopped at their last checkpoints "
            f"in {out} (see <type>-seed<k>.json); --resume continues from there",
            flush=True,
        )
        return None
    plot_curves(out, args.types, args.seeds, out / "curves.png")
    summary = final_rewards(out, args.types, args.seeds)
    for network_type, (median, low, high) in summary.items():
        print(
            f"{network_type:12s} reward over the last 10% of training: median {median:.2f} "
            f"(IQR {low:.2f} to {high:.2f})"
        )
    write_json(
        out / "results.json",
        dict(
            final_reward_is="reward per episode, mean over the last 10% of each run's log rows; "
            "median and quartiles over the seeds",
            final_reward={
                t: dict(
                    median=m,
                    q25=low,
                    q75=high,
                    per_seed={
                        seed: final_reward(out / f"{run_name(t, seed)}.csv") for seed in args.seeds
                    },
                )
                for t, (m, low, high) in summary.items()
            },
            sizes=sizes,
            iterations=args.iterations,
            episodes=args.iterations * args.batch_size,
            options=vars(args),
        ),
        started=started,
    )
    return summary


# ----------------------------------------------------------------------------------------------
# Results: learning curves over seeds


def load_curve(path):
    """(episodes, mean reward per episode) of one run's CSV log."""
    log = read_csv_columns(path)
    return log["episodes"], log["reward"]


def mean_of_last(values, fraction=0.1):
    """The mean of the last `fraction` of `values` (at least the last one)."""
    tail = values[-max(1, math.ceil(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def final_reward(log, fraction=0.1):
    """The mean reward per episode in the last `fraction` of the rows of a run's CSV log."""
    return mean_of_last(load_curve(log)[1], fraction)


def final_rewards(out, types, seeds, fraction=0.1):
    """{type: (median, 25th, 75th percentile) over seeds of the mean reward in the last
    `fraction` of each run's log}."""
    result = {}
    for network_type in types:
        finals = [
            final_reward(out / f"{run_name(network_type, seed)}.csv", fraction) for seed in seeds
        ]
        q = torch.tensor(finals).quantile(torch.tensor([0.5, 0.25, 0.75])).tolist()
        result[network_type] = tuple(q)
    return result


def plot_curves(out, types, seeds, path):
    """Median and inter-quartile range over seeds of the reward per episode against episodes
    trained, one line per network type (the papers' Figures 1 and 2)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for network_type in types:
        curves = [load_curve(out / f"{run_name(network_type, seed)}.csv") for seed in seeds]
        length = min(len(c[0]) for c in curves)
        episodes = curves[0][0][:length]
        rewards = torch.tensor([c[1][:length] for c in curves])
        low, median, high = rewards.quantile(torch.tensor([0.25, 0.5, 0.75]), dim=0)
        (line,) = ax.plot(episodes, median, label=f"{network_type} ({len(seeds)} seeds)")
        ax.fill_between(episodes, low, high, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="episodes", ylabel="reward per episode", title=path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_episode(agent, env, path):
    """Reward and neuromodulator output over one episode of the first sample (the
    Backpropamine paper's Figure 3); the modulator panel is left out for unmodulated types."""
    plt = pyplot()
    episode = play(agent, env)
    steps = torch.arange(env.episode_length)
    panels = 2 if episode.modulation is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.2 * panels + 0.6), sharex=True, squeeze=False)
    axes[0, 0].bar(steps.tolist(), episode.rewards[:, 0].tolist(), color="tab:green")
    axes[0, 0].set(ylabel="reward", title=f"{agent.network_type}: one episode, sample 0")
    if episode.modulation is not None:
        axes[1, 0].plot(steps.tolist(), episode.modulation[:, 0, 0].tolist(), color="tab:purple")
        axes[1, 0].axhline(0, color="grey", lw=0.5)
        axes[1, 0].set(ylabel="modulator output")
    axes[-1, 0].set(xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
