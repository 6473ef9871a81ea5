"""The RL tasks of experiments/rl/envs.py on hand-made cases: the maze's walls, moves, wall bumps,
reward and teleport, and observations at hand-placed positions; the cue-reward task's trial
schedule checked step by step from the observations over whole episodes, its rewards and its
statistics; episode-length enforcement and every validation message; determinism from the
generator, exact resume from its state, and rows that do not depend on each other's actions."""

import re
from collections import Counter

import pytest
import torch

from helpers import ROOT

if not (ROOT / "experiments" / "rl").is_dir():
    pytest.skip("experiments/ is not next to the tests", allow_module_level=True)
from experiments.rl import envs  # noqa: E402

UP, DOWN, LEFT, RIGHT = range(4)

MAZE_9 = """
#########
#.......#
#.#.#.#.#
#.......#
#.#...#.#
#.......#
#.#.#.#.#
#.......#
#########
"""


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def actions(*values):
    return torch.tensor(values, dtype=torch.long)


def expected_walls(size):
    """The wall rule written cell by cell: border, both coordinates even, centre free."""
    centre = size // 2
    return torch.tensor(
        [
            [
                (r in (0, size - 1) or c in (0, size - 1) or (r % 2 == 0 and c % 2 == 0))
                and (r, c) != (centre, centre)
                for c in range(size)
            ]
            for r in range(size)
        ]
    )


def neighbourhood(walls, row, col):
    return [float(walls[row + dr, col + dc]) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


def place(env, positions, reward_positions):
    env.position = torch.tensor(positions)
    env.reward_position = torch.tensor(reward_positions)


# ---------------------------------------------------------------------------------- GridMaze


@pytest.mark.parametrize(
    "task, stimulus, obs_size, n_actions",
    [(envs.GridMaze, ["OBS_WALLS"], 16, 4), (envs.CueReward, ["OBS_CUE", "OBS_GO"], 26, 2)],
)
def test_observation_layout_covers_each_input_once(task, stimulus, obs_size, n_actions):
    names = stimulus + ["OBS_BIAS", "OBS_TIME", "OBS_PREVIOUS_REWARD", "OBS_PREVIOUS_ACTION"]
    covered = []
    for part in (getattr(task, name) for name in names):
        covered += range(obs_size)[part] if isinstance(part, slice) else [part]
    assert covered == list(range(obs_size))
    assert (task.obs_size, task.n_actions) == (obs_size, n_actions)
    assert len(range(obs_size)[task.OBS_PREVIOUS_ACTION]) == n_actions


def test_maze_walls_by_hand():
    drawn = torch.tensor([[ch == "#" for ch in line] for line in MAZE_9.split()])
    assert torch.equal(envs.GridMaze(1, size=9).walls, drawn)


@pytest.mark.parametrize("size", [5, 9, 11, 13])
def test_maze_walls_follow_the_rule(size):
    walls = envs.GridMaze(1, size=size).walls
    assert walls.dtype == torch.bool and walls.shape == (size, size)
    assert torch.equal(walls, expected_walls(size))
    assert not walls[size // 2, size // 2]


@pytest.mark.parametrize(
    "size, around_centre",
    [
        (9, [0, 0, 0, 0, 0, 0, 0, 0, 0]),  # the centre (4, 4) is a removed pillar: open all round
        (11, [1, 0, 1, 0, 0, 0, 1, 0, 1]),  # the centre (5, 5) has pillars on its diagonals
    ],
)
def test_reset_starts_at_the_centre_and_observes_nothing_yet(size, around_centre):
    env = envs.GridMaze(3, size=size, episode_length=50, generator=seeded(0))
    obs = env.reset()
    assert obs.shape == (3, 16) and obs.dtype == torch.float32 and env.t == 0
    assert env.position.tolist() == [[size // 2] * 2] * 3
    assert obs[:, env.OBS_WALLS].tolist() == [around_centre] * 3
    assert obs[:, env.OBS_BIAS].tolist() == [1] * 3
    assert obs[:, env.OBS_TIME].tolist() == [0] * 3
    assert obs[:, env.OBS_PREVIOUS_REWARD].tolist() == [0] * 3
    assert obs[:, env.OBS_PREVIOUS_ACTION].tolist() == [[0] * 4] * 3


@pytest.mark.parametrize("size", [5, 9])
def test_reward_cell_is_uniform_over_free_cells_but_the_centre(size):
    env = envs.GridMaze(4000, size=size, generator=seeded(1))
    env.reset()
    cells = Counter(map(tuple, env.reward_position.tolist()))
    centre = (size // 2, size // 2)
    free = {(r, c) for r in range(size) for c in range(size) if not env.walls[r, c]}
    assert set(cells) == free - {centre}
    expected = 4000 / len(cells)
    assert all(0.6 * expected < n < 1.4 * expected for n in cells.values())
    first = env.reward_position
    env.reset()  # a new episode draws a new cell
    assert not torch.equal(env.reward_position, first)


def test_moves_and_wall_bumps_at_hand_placed_positions():
    env = envs.GridMaze(5, size=9, wall_penalty=0.5, generator=seeded(2))
    env.reset()
    place(env, [[1, 1], [1, 2], [3, 3], [1, 1], [7, 7]], [[7, 1]] * 5)
    obs, reward = env.step(actions(UP, DOWN, LEFT, RIGHT, DOWN))
    # Rows 0, 1 and 4 bump (border, pillar, border) and stay; rows 2 and 3 move.
    assert env.position.tolist() == [[1, 1], [1, 2], [3, 2], [1, 2], [7, 7]]
    assert reward.tolist() == [-0.5, -0.5, 0.0, 0.0, -0.5]
    assert reward.dtype == torch.float32
    walls = env.walls
    assert obs[:, env.OBS_WALLS].tolist() == [
        neighbourhood(walls, r, c) for r, c in env.position.tolist()
    ]
    assert obs[0, env.OBS_WALLS].tolist() == [1, 1, 1, 1, 0, 0, 1, 0, 1]
    assert obs[1, env.OBS_WALLS].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 0]
    assert obs[2, env.OBS_WALLS].tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert obs[4, env.OBS_WALLS].tolist() == [1, 0, 1, 0, 0, 1, 1, 1, 1]
    assert obs[:, env.OBS_PREVIOUS_REWARD].tolist() == [-0.5, -0.5, 0.0, 0.0, -0.5]
    assert obs[:, env.OBS_PREVIOUS_ACTION].tolist() == [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [0, 1, 0, 0],
    ]


def test_reaching_the_reward_pays_and_teleports_uniformly_elsewhere():
    rows = 2000
    env = envs.GridMaze(
        rows, size=5, reward=10.0, wall_penalty=1.0, episode_length=40, generator=seeded(3)
    )
    env.reset()
    place(env, [[1, 1]] * rows, [[1, 2]] * rows)
    obs, reward = env.step(torch.full((rows,), RIGHT))
    assert reward.tolist() == [10.0] * rows
    landed = Counter(map(tuple, env.position.tolist()))
    free = {(r, c) for r in range(5) for c in range(5) if not env.walls[r, c]}
    assert set(landed) == free - {(1, 2)}
    assert all(0.6 * rows / 8 < n < 1.4 * rows / 8 for n in landed.values())
    assert env.reward_position.tolist() == [[1, 2]] * rows  # the reward stays put
    assert obs[:, env.OBS_PREVIOUS_REWARD].tolist() == [10.0] * rows
    assert obs[:, env.OBS_PREVIOUS_ACTION].tolist() == [[0, 0, 0, 1]] * rows
    assert obs[:, env.OBS_TIME].tolist() == pytest.approx([1 / 40] * rows)
    assert obs[:8, env.OBS_WALLS].tolist() == [
        neighbourhood(env.walls, r, c) for r, c in env.position[:8].tolist()
    ]


def test_maze_time_and_previous_step_over_an_episode():
    env = envs.GridMaze(2, size=7, episode_length=6, generator=seeded(4))
    env.reset()
    taken = [UP, DOWN, LEFT, RIGHT, UP, UP]
    for t, action in enumerate(taken, start=1):
        obs, reward = env.step(torch.full((2,), action))
        assert env.t == t
        assert obs[:, env.OBS_TIME].tolist() == pytest.approx([t / 6] * 2)
        one_hot = [float(a == action) for a in range(4)]
        assert obs[:, env.OBS_PREVIOUS_ACTION].tolist() == [one_hot] * 2
        assert obs[:, env.OBS_PREVIOUS_REWARD].tolist() == reward.tolist()


def test_random_walk_stays_on_free_cells_and_pays_only_for_the_reward():
    env = envs.GridMaze(
        64, size=7, reward=3.0, wall_penalty=0.25, episode_length=100, generator=seeded(5)
    )
    env.reset()
    policy, moves = seeded(6), torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]])
    paid = 0
    for _ in range(100):
        before = env.position.clone()
        action = torch.randint(4, (64,), generator=policy)
        target = before + moves[action]
        bump = env.walls[target[:, 0], target[:, 1]]
        found = ~bump & (target == env.reward_position).all(1)
        _, reward = env.step(action)
        assert reward.tolist() == (3.0 * found - 0.25 * bump).tolist()
        assert torch.equal(env.position[bump], before[bump])
        assert torch.equal(env.position[~bump & ~found], target[~bump & ~found])
        assert not env.walls[env.position[:, 0], env.position[:, 1]].any()
        assert not (env.position == env.reward_position).all(1).any()
        paid += int(found.sum())
    assert paid > 0


# --------------------------------------------------------------------------------- CueReward


def play_cue_reward(env, policy_seed):
    """One episode with random actions; per step the observation seen, the action, the reward
    and the env's own view (is_go, target_shown) of the step the action answers."""
    policy = seeded(policy_seed)
    obs = env.reset()
    steps = []
    for _ in range(env.episode_length):
        action = torch.randint(2, (env.batch_size,), generator=policy)
        is_go, target_shown = env.is_go.clone(), env.target_shown.clone()
        next_obs, reward = env.step(action)
        steps.append((obs, action, reward, is_go, target_shown))
        obs = next_obs
    return steps, obs


def shown_cue(obs_row, cues):
    """Which cue an observation shows (None when blank), by matching its bits."""
    bits = obs_row[envs.CueReward.OBS_CUE]
    if not bits.any():
        return None
    (index,) = [i for i in range(len(cues)) if torch.equal(bits, cues[i])]
    return index


def test_cue_reward_schedule_over_whole_episodes():
    env = envs.CueReward(16, episode_length=120, generator=seeded(7))
    steps, _ = play_cue_reward(env, policy_seed=8)
    cues = env.cues
    assert cues.shape == (16, 4, 20) and set(cues.unique().tolist()) == {-1.0, 1.0}
    lengths = Counter()
    for row in range(16):
        trial, previous_reward = [], 0.0
        for t, (obs, action, reward, is_go, target_shown) in enumerate(steps):
            o = obs[row]
            assert o[env.OBS_BIAS] == 1 and o[env.OBS_TIME] == pytest.approx(t / 120)
            assert o[env.OBS_PREVIOUS_REWARD] == previous_reward
            go = bool(o[env.OBS_GO])
            assert go == bool(is_go[row])
            cue = shown_cue(o, cues[row])
            assert not (go and cue is not None)
            trial.append(cue)
            if go:  # the response: +1 exactly when right, and only here
                shown = [c for c in trial if c is not None]
                assert len(shown) == 2 and shown[0] != shown[1]
                assert bool(target_shown[row]) == (0 in shown)
                right = bool(action[row]) == (0 in shown)
                assert reward[row] == (1.0 if right else -1.0)
            else:
                assert reward[row] == 0
            if len(trial) >= 2 and trial[-2] == "GO":  # the blank step after GO ends the trial
                assert cue is None and not go
                lengths[len(trial)] += 1
                trial = []
            elif go:
                trial[-1] = "GO"
            previous_reward = float(reward[row])
        # The episode cuts its last trial: what was seen so far still fits a trial.
        assert len(trial) <= env.trial_max and len([c for c in trial if c not in (None, "GO")]) <= 2
    assert set(lengths) == {5, 6, 7, 8}


@pytest.mark.parametrize("blank_first_step", [False, True])
def test_cue_reward_state_matches_the_trial_rules(blank_first_step):
    shortest, first_cue_step = (5, 1) if blank_first_step else (4, 0)
    env = envs.CueReward(
        512,
        trial_min=shortest,
        trial_max=9,
        episode_length=60,
        blank_first_step=blank_first_step,
        generator=seeded(9),
    )
    env.reset()
    seen_lengths, seen_cue_steps = Counter(), Counter()
    target_shown = target_first = trials = 0
    for _ in range(60):
        starting = env.trial_step == 0
        length, cue_steps, shown = env.trial_length, env.cue_steps, env.shown_cues
        assert ((length >= shortest) & (length <= 9)).all()
        assert (cue_steps[:, 0] != cue_steps[:, 1]).all()
        assert (cue_steps.max(1).values <= length - 3).all()
        assert (cue_steps >= first_cue_step).all()
        assert (shown[:, 0] != shown[:, 1]).all() and ((shown >= 0) & (shown < 4)).all()
        assert torch.equal(env.is_go, env.trial_step == length - 2)
        seen_lengths.update(length[starting].tolist())
        seen_cue_steps.update(cue_steps[starting & (length == 9)].flatten().tolist())
        trials += int(starting.sum())
        target_shown += int(env.target_shown[starting].sum())
        target_first += int((shown[starting, 0] == 0).sum())
        env.step(torch.zeros(512, dtype=torch.long))
    assert set(seen_lengths) == set(range(shortest, 10))
    assert set(seen_cue_steps) == set(range(first_cue_step, 7))
    assert 0.45 < target_shown / trials < 0.55  # 2 of 4 cues shown: the target half the time
    assert 0.45 < target_first / target_shown < 0.55  # in random order


@pytest.mark.parametrize("always_right", [True, False])
def test_cue_reward_pays_reward_or_penalty_at_go_only(always_right):
    env = envs.CueReward(32, reward=2.0, penalty=-0.5, episode_length=50, generator=seeded(10))
    env.reset()
    answers = 0
    for _ in range(50):
        is_go = env.is_go.clone()
        right = env.target_shown.long()
        obs, reward = env.step(right if always_right else 1 - right)
        assert reward[~is_go].eq(0).all()
        assert reward[is_go].eq(2.0 if always_right else -0.5).all()
        assert torch.equal(obs[:, env.OBS_PREVIOUS_REWARD], reward)
        assert not env.is_go[is_go].any()  # the step after GO is never GO
        answers += int(is_go.sum())
    assert answers > 32 * 5


def test_cue_reward_reset_starts_blank_history():
    env = envs.CueReward(4, generator=seeded(11))
    obs = env.reset()
    assert obs.shape == (4, 26) and obs.dtype == torch.float32
    assert (env.trial_step == 0).all() and not env.is_go.any()
    assert obs[:, env.OBS_TIME].eq(0).all() and obs[:, env.OBS_PREVIOUS_REWARD].eq(0).all()
    assert obs[:, env.OBS_PREVIOUS_ACTION].eq(0).all() and obs[:, env.OBS_BIAS].eq(1).all()


@pytest.mark.parametrize("fixed_cues", [False, True])
def test_cue_reward_fixed_cues_repeat_across_episodes(fixed_cues):
    env = envs.CueReward(8, episode_length=10, fixed_cues=fixed_cues, generator=seeded(13))
    env.reset()
    first = env.cues.clone()
    for _ in range(10):
        env.step(torch.ones(8, dtype=torch.long))
    env.reset()
    assert torch.equal(env.cues, first) == fixed_cues
    assert env.cues.abs().eq(1).all()
    assert torch.equal(env.cues[0], env.cues[1]) == fixed_cues  # fixed: the same in every row


# ------------------------------------------------------------------- both tasks: episodes, RNG

TASKS = {
    "maze": lambda rows, **kw: envs.GridMaze(rows, size=7, episode_length=30, **kw),
    "cue": lambda rows, **kw: envs.CueReward(rows, episode_length=30, **kw),
}


def rollout(env, policy_seed, steps=None):
    policy = seeded(policy_seed)
    observations, rewards = [env.reset()], []
    for _ in range(steps or env.episode_length):
        obs, reward = env.step(torch.randint(env.n_actions, (env.batch_size,), generator=policy))
        observations.append(obs)
        rewards.append(reward)
    return torch.stack(observations), torch.stack(rewards)


@pytest.mark.parametrize("task", TASKS)
def test_episode_length_is_enforced(task):
    env = TASKS[task](2, generator=seeded(12))
    with pytest.raises(ValueError, match=re.escape("step() called before reset()")):
        env.step(torch.zeros(2, dtype=torch.long))
    rollout(env, policy_seed=0)
    assert env.t == env.episode_length
    with pytest.raises(
        ValueError, match=re.escape("step() called after the episode ended (episode_length=30")
    ):
        env.step(torch.zeros(2, dtype=torch.long))
    env.reset()
    env.step(torch.zeros(2, dtype=torch.long))  # a new episode steps again
    assert env.t == 1


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_episodes_other_seed_other_episodes(task):
    first = rollout(TASKS[task](8, generator=seeded(13)), policy_seed=1)
    again = rollout(TASKS[task](8, generator=seeded(13)), policy_seed=1)
    other = rollout(TASKS[task](8, generator=seeded(14)), policy_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(5)  # without a generator, the seed comes from torch's global RNG
    unseeded = rollout(TASKS[task](8), policy_seed=1)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(unseeded, rollout(TASKS[task](8), policy_seed=1)))


@pytest.mark.parametrize("task", TASKS)
def test_generator_state_resumes_exactly(task):
    generator = seeded(15)
    env = TASKS[task](8, generator=generator)
    rollout(env, policy_seed=2)
    state = generator.get_state()
    expected = rollout(env, policy_seed=3)
    resumed = seeded(99)
    resumed.set_state(state)
    assert all(
        torch.equal(a, b)
        for a, b in zip(expected, rollout(TASKS[task](8, generator=resumed), policy_seed=3))
    )


@pytest.mark.parametrize("task", TASKS)
def test_a_row_does_not_depend_on_the_other_rows_actions(task):
    envs_ = [TASKS[task](6, generator=seeded(16)) for _ in range(2)]
    observations = [[env.reset()] for env in envs_]
    policy = seeded(4)
    for _ in range(30):
        row0 = torch.randint(envs_[0].n_actions, (1,), generator=policy)
        for env, seen in zip(envs_, observations):
            others = torch.randint(env.n_actions, (5,), generator=policy)
            seen.append(env.step(torch.cat([row0, others]))[0])
    first, second = (torch.stack(seen) for seen in observations)
    assert torch.equal(first[:, 0], second[:, 0])
    assert not torch.equal(first[:, 1:], second[:, 1:])


# ------------------------------------------------------------------------------- validation

MAZE, CUE = envs.GridMaze, envs.CueReward


@pytest.mark.parametrize(
    "task, arguments, message",
    [
        (MAZE, dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (MAZE, dict(batch_size=2.0), "batch_size must be an integer >= 1, got 2.0"),
        (MAZE, dict(batch_size=True), "batch_size must be an integer >= 1, got True"),
        (MAZE, dict(episode_length=0), "episode_length must be an integer >= 1, got 0"),
        (MAZE, dict(size=10), "size must be an odd integer from 5 to 2001, got 10"),
        (MAZE, dict(size=3), "size must be an odd integer from 5 to 2001, got 3"),
        (MAZE, dict(size=9.0), "size must be an odd integer from 5 to 2001, got 9.0"),
        (MAZE, dict(size=2003), "size must be an odd integer from 5 to 2001, got 2003"),
        (MAZE, dict(reward=float("nan")), "reward must be a finite real number, got nan"),
        (MAZE, dict(wall_penalty="1"), "wall_penalty must be a finite real number, got '1'"),
        (MAZE, dict(generator=0), "generator must be a torch.Generator on device cpu, got 0"),
        (CUE, dict(trial_min=3), "trial_min must be an integer >= 4, got 3"),
        (CUE, dict(trial_min=6, trial_max=5), "trial_max must be an integer >= 6, got 5"),
        (CUE, dict(penalty=float("-inf")), "penalty must be a finite real number, got -inf"),
        (CUE, dict(episode_length=-3), "episode_length must be an integer >= 1, got -3"),
        (CUE, dict(fixed_cues=1), "fixed_cues must be True or False, got 1"),
        (CUE, dict(blank_first_step=True, trial_min=4), "trial_min must be an integer >= 5, got 4"),
        (CUE, dict(blank_first_step=1), "blank_first_step must be True or False, got 1"),
    ],
)
def test_constructor_validation(task, arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task(**{"batch_size": 1, **arguments})


@pytest.mark.parametrize(
    "task, action, message",
    [
        ("maze", [0, 1, 2], "action must be a torch.Tensor of shape (3,), got <class 'list'>"),
        ("maze", torch.zeros(3, 1, dtype=torch.long), "action must be of shape (3,), got (3, 1)"),
        ("maze", torch.zeros(2, dtype=torch.long), "action must be of shape (3,), got (2,)"),
        ("maze", torch.zeros(3), "action must be of an integer dtype, got torch.float32"),
        (
            "cue",
            torch.zeros(3, dtype=torch.bool),
            "action must be of an integer dtype, got torch.bool",
        ),
        (
            "maze",
            torch.tensor([0, 4, 1]),
            "action values must be in [0, 4), got values from 0 to 4",
        ),
        (
            "cue",
            torch.tensor([-1, 0, 1]),
            "action values must be in [0, 2), got values from -1 to 1",
        ),
        (
            "cue",
            torch.tensor([0, 2, 1], dtype=torch.int32),
            "action values must be in [0, 2), got values from 0 to 2",
        ),
    ],
)
def test_action_validation(task, action, message):
    env = TASKS[task](3, generator=seeded(17))
    env.reset()
    with pytest.raises(ValueError, match=re.escape(message)):
        env.step(action)
    assert env.t == 0  # a refused action takes no step
    env.step(torch.tensor([1, 0, 1], dtype=torch.int32))  # any integer dtype will do
