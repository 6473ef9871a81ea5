"""The two reinforcement-learning tasks of the Backpropamine paper (Miconi et al., ICLR 2019),
each stepping a batch of B independent episodes at once with tensor operations.

Both tasks are redrawn at random every episode (where the reward is, which cue pays), so weights
trained across episodes cannot know the answer: the agent has to find it by trial and error and
remember it for the rest of the episode, the within-episode learning that neuromodulated
plasticity is meant to provide.

Shared interface:

    env = GridMaze(batch_size, ..., episode_length=..., device="cpu", generator=None)
    obs = env.reset()                # (B, obs_size) float32; starts a new episode in every row
    obs, reward = env.step(action)   # action (B,) integer in [0, n_actions); reward (B,) float32

step() is called exactly `episode_length` times per episode. The observation is what the agent
sees before choosing its next action: the task's stimulus, then the same four inputs in both
tasks: a bias 1, the normalised time t / episode_length (t = steps taken so far in the
episode), the previous step's reward and a one-hot of the previous action (both zero after
reset). The OBS_* class attributes give each input's place (an int for one value, a slice for a
block), so code that reads, say, the previous reward works with either task.

All randomness comes from `generator` (on the env's device), so a training script that saves
generator.get_state() with its checkpoint resumes on exactly the same episodes.
"""

import numbers

import torch


def _check(ok, name, expected, got):
    """Raises the ValueError every check here uses: which argument, what it needed, what came."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got!r}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name, value, minimum):
    _check(_is_int(value) and value >= minimum, name, f"an integer >= {minimum}", value)


def _check_real(name, value):
    _check(
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and abs(value) < float("inf"),
        name,
        "a finite real number",
        value,
    )


class _BatchedEpisodes:
    """Episode bookkeeping and the observation inputs shared by both tasks. A task defines
    obs_size, n_actions, its stimulus (`_stimulus`), what an episode starts with
    (`_start_episode`) and what an action does (`_apply`, returning the reward)."""

    obs_size: int
    n_actions: int

    def __init__(self, batch_size, episode_length, device, generator):
        _check_int("batch_size", batch_size, 1)
        _check_int("episode_length", episode_length, 1)
        self.batch_size = int(batch_size)
        self.episode_length = int(episode_length)
        self.device = torch.device(device)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(torch.randint(2**62, ()).item())
        _check(
            isinstance(generator, torch.Generator) and generator.device.type == self.device.type,
            "generator",
            f"a torch.Generator on device {self.device}",
            generator,
        )
        self.generator = generator
        self.t = None  # steps taken in the current episode; None until the first reset()
        self._bias = torch.ones(self.batch_size, 1, device=self.device)
        self._one_hot = torch.eye(self.n_actions, device=self.device)

    def reset(self):
        """Starts a new episode in every row and returns its first observation."""
        self.t = 0
        self._previous_reward = torch.zeros(self.batch_size, device=self.device)
        self._previous_action = torch.zeros(self.batch_size, self.n_actions, device=self.device)
        self._start_episode()
        return self._observation()

    def step(self, action):
        """Takes one action in every row; returns the next observation and this step's reward."""
        action = self._checked_action(action)
        reward = self._apply(action)
        self.t += 1
        self._previous_reward = reward
        self._previous_action = self._one_hot[action]
        return self._observation(), reward

    def _checked_action(self, action):
        if self.t is None:
            raise ValueError("step() called before reset(): call reset() to start an episode")
        if self.t == self.episode_length:
            raise ValueError(
                f"step() called after the episode ended (episode_length="
                f"{self.episode_length} steps taken): call reset() to start a new one"
            )
        expected_shape = (self.batch_size,)
        _check(
            isinstance(action, torch.Tensor),
            "action",
            f"a torch.Tensor of shape {expected_shape}",
            type(action),
        )
        _check(
            tuple(action.shape) == expected_shape,
            "action",
            f"of shape {expected_shape}",
            tuple(action.shape),
        )
        _check(
            not (
                action.dtype.is_floating_point
                or action.dtype.is_complex
                or action.dtype == torch.bool
            ),
            "action",
            "of an integer dtype",
            action.dtype,
        )
        action = action.to(self.device, torch.long)
        low, high = (v.item() for v in torch.aminmax(action))
        if low < 0 or high >= self.n_actions:
            raise ValueError(
                f"action values must be in [0, {self.n_actions}), got values from {low} to {high}"
            )
        return action

    def _observation(self):
        rows = self.batch_size
        return torch.cat(
            [
                self._stimulus(),
                self._bias,
                torch.full((rows, 1), self.t / self.episode_length, device=self.device),
                self._previous_reward[:, None],
                self._previous_action,
            ],
            1,
        )


class GridMaze(_BatchedEpisodes):
    """Find an invisible reward in a grid maze, then keep coming back to it.

    The grid is size x size cells (size odd). Walls are the border and every cell whose row and
    column are both even, a lattice of pillars between corridors; the centre cell is always
    free. Each episode the agent starts at the centre, and the reward cell is drawn uniformly
    among the other free cells. The agent sees only the walls right around it, so it must
    explore until it steps on the reward; it is then teleported to a random free cell, and
    collecting the reward again means remembering where it was and finding the way back.

    Actions: 0 up (row - 1), 1 down (row + 1), 2 left (column - 1), 3 right (column + 1).
    Moving into a wall leaves the agent where it is, with reward -wall_penalty. Landing on the
    reward cell gives +reward and teleports the agent to a free cell other than the reward cell,
    drawn uniformly.

    Observation (16 values): OBS_WALLS, the 3x3 neighbourhood of the agent's cell after the
    step (row-major, 1 = wall; the middle entry is the agent's own cell, so 0), then the shared
    inputs (see the module docstring).

    For tests and plots: `walls` (size, size) bool, `centre` (2,) long, and `position` and
    `reward_position` (B, 2) long (row, column), which a test may overwrite after reset() to
    stage a situation.
    """

    OBS_WALLS = slice(0, 9)
    OBS_BIAS = 9
    OBS_TIME = 10
    OBS_PREVIOUS_REWARD = 11
    OBS_PREVIOUS_ACTION = slice(12, 16)
    obs_size = 16
    n_actions = 4
    MAX_SIZE = 2001  # the layout's tables take about 50 bytes a cell: 200 MB at this size

    @classmethod
    def check_size(cls, size):
        """A ValueError unless `size` is a side the maze can have: odd (walls on the even rows
        and columns), >= 5 (below, no free cell is left for the reward besides the centre),
        <= MAX_SIZE."""
        _check(
            _is_int(size) and 5 <= size <= cls.MAX_SIZE and size % 2 == 1,
            "size",
            f"an odd integer from 5 to {cls.MAX_SIZE}",
            size,
        )

    def __init__(
        self,
        batch_size,
        size=11,
        reward=10.0,
        wall_penalty=0.0,
        episode_length=200,
        device="cpu",
        generator=None,
    ):
        super().__init__(batch_size, episode_length, device, generator)
        self.check_size(size)
        _check_real("reward", reward)
        _check_real("wall_penalty", wall_penalty)
        self.size, self.reward, self.wall_penalty = int(size), float(reward), float(wall_penalty)

        index = torch.arange(self.size, device=self.device)
        border = (index == 0) | (index == self.size - 1)
        even = index % 2 == 0
        self.walls = border[:, None] | border[None, :] | (even[:, None] & even[None, :])
        middle = self.size // 2
        self.walls[middle, middle] = False
        self.centre = torch.tensor([middle, middle], device=self.device)
        # Cells are stepped as flat indices row * size + column: one gather per lookup.
        is_wall = self.walls.flatten()
        self._free_cells = (~is_wall).nonzero().squeeze(1)  # (F,), row-major
        # Each free cell's place in _free_cells, to exclude one cell per sample when drawing.
        self._free_cell_index = torch.full_like(is_wall, -1, dtype=torch.long)
        self._free_cell_index[self._free_cells] = torch.arange(
            len(self._free_cells), device=self.device
        )
        self._is_wall = is_wall
        self._moves = torch.tensor([-self.size, self.size, -1, 1], device=self.device)
        # The 3x3 wall neighbourhood of every free cell, looked up once per step.
        offsets = (
            torch.arange(-1, 2, device=self.device)[:, None] * self.size
            + torch.arange(-1, 2, device=self.device)
        ).flatten()
        self._neighbourhoods = torch.zeros(self.size**2, 9, device=self.device)
        self._neighbourhoods[self._free_cells] = is_wall[
            self._free_cells[:, None] + offsets
        ].float()

    @property
    def position(self):
        """(B, 2) long: each sample's cell (row, column)."""
        return self._cells_to_rows_columns(self._cell)

    @position.setter
    def position(self, rows_columns):
        self._cell = self._rows_columns_to_cells(rows_columns)

    @property
    def reward_position(self):
        """(B, 2) long: each sample's reward cell (row, column)."""
        return self._cells_to_rows_columns(self._reward_cell)

    @reward_position.setter
    def reward_position(self, rows_columns):
        self._reward_cell = self._rows_columns_to_cells(rows_columns)

    def _rows_columns_to_cells(self, rows_columns):
        rows_columns = torch.as_tensor(rows_columns, device=self.device)
        return rows_columns[:, 0] * self.size + rows_columns[:, 1]

    def _cells_to_rows_columns(self, cells):
        return torch.stack([cells // self.size, cells % self.size], 1)

    def _random_free_cells(self, excluded):
        """One cell per sample, uniform among the free cells other than `excluded` (B,)."""
        index = torch.randint(
            len(self._free_cells) - 1,
            (self.batch_size,),
            generator=self.generator,
            device=self.device,
        )
        return self._free_cells[index + (index >= self._free_cell_index[excluded])]

    def _start_episode(self):
        self._cell = self._rows_columns_to_cells(self.centre.expand(self.batch_size, 2))
        self._reward_cell = self._random_free_cells(excluded=self._cell)

    def _apply(self, action):
        target = self._cell + self._moves[action]
        bumped = self._is_wall[target]
        cell = torch.where(bumped, self._cell, target)
        found = ~bumped & (cell == self._reward_cell)
        # Drawn for every sample, found or not, so the generator advances the same every step.
        teleport = self._random_free_cells(excluded=self._reward_cell)
        self._cell = torch.where(found, teleport, cell)
        return torch.where(found, self.reward, torch.where(bumped, 0.0 - self.wall_penalty, 0.0))

    def _stimulus(self):
        return self._neighbourhoods[self._cell]


class CueReward(_BatchedEpisodes):
    """Cue-reward association (Backpropamine, Task 1): find out within an episode which of four
    random cues is the rewarded one, and answer whether it was among the cues just shown.

    Each episode draws N_CUES cues, random vectors of CUE_BITS values +-1 per sample; cue
    TARGET_CUE is the rewarded one (the cues are random, so its index tells nothing). Nothing
    in the observation says which cue is the target: only the rewards do. The episode is a
    series of trials, each on its own clock per sample, of length L drawn uniformly from
    [trial_min, trial_max]. In a trial, steps 0 .. L-1:

      - two of the steps 0 .. L-3 (1 .. L-3 with blank_first_step), drawn uniformly, show one
        cue each: two distinct cues drawn uniformly from the N_CUES, in random order; the other
        steps before GO are blank;
      - step L-2 shows GO, and the action taken there is the response: 1 = "the target was
        shown", 0 = "it was not"; it earns `reward` if right, `penalty` if wrong;
      - step L-1 is blank, and its observation carries that reward as the previous reward.

    Actions at the other steps do nothing and earn 0. The episode ends after episode_length
    steps, cutting its last trial short.

    blank_first_step=True keeps step 0 of every trial blank, as the original code's trials
    (blank, the cues among blanks, GO, blank); it needs trial_min >= 5.

    fixed_cues=True is the control task: four cues are drawn once, when the environment is made,
    and every sample of every episode uses them, so weights trained across episodes can learn
    which cue pays and no within-episode learning is needed.

    Observation (26 values), describing the upcoming step, the one whose action comes next:
    OBS_CUE (the cue's bits, 0 when blank), OBS_GO (1 at GO), then the shared inputs (see the
    module docstring).

    For tests and plots: `cues` (B, N_CUES, CUE_BITS), and the current trial of each sample as
    (B,) tensors `trial_length` and `trial_step` (the upcoming step's index) and (B, 2) tensors
    `cue_steps` (where the two cues appear) and `shown_cues` (which cues, in that order); the
    properties `is_go` and `target_shown` follow from these.
    """

    N_CUES = 4
    CUE_BITS = 20
    TARGET_CUE = 0
    OBS_CUE = slice(0, 20)
    OBS_GO = 20
    OBS_BIAS = 21
    OBS_TIME = 22
    OBS_PREVIOUS_REWARD = 23
    OBS_PREVIOUS_ACTION = slice(24, 26)
    obs_size = 26
    n_actions = 2

    def __init__(
        self,
        batch_size,
        trial_min=5,
        trial_max=8,
        reward=1.0,
        penalty=-1.0,
        episode_length=120,
        fixed_cues=False,
        blank_first_step=False,
        device="cpu",
        generator=None,
    ):
        super().__init__(batch_size, episode_length, device, generator)
        _check(
            isinstance(blank_first_step, bool),
            "blank_first_step",
            "True or False",
            blank_first_step,
        )
        self.blank_first_step = blank_first_step
        # Two cue steps, GO and the step after it (and the blank first step) need 4 (5) steps.
        _check_int("trial_min", trial_min, 5 if blank_first_step else 4)
        _check_int("trial_max", trial_max, trial_min)
        _check_real("reward", reward)
        _check_real("penalty", penalty)
        self.trial_min, self.trial_max = int(trial_min), int(trial_max)
        self.reward, self.penalty = float(reward), float(penalty)
        _check(isinstance(fixed_cues, bool), "fixed_cues", "True or False", fixed_cues)
        # The control task: the same cues, and so the same rewarded one, in every episode.
        self._fixed_cues = (
            self._draw_cues(1).expand(self.batch_size, -1, -1) if fixed_cues else None
        )

    @property
    def is_go(self):
        """(B,) bool: the upcoming step is its trial's GO step."""
        return self.trial_step == self.trial_length - 2

    @property
    def target_shown(self):
        """(B,) bool: the current trial shows the target cue, so the right response is 1."""
        return (self.shown_cues == self.TARGET_CUE).any(1)

    def _start_trials(self, starting):
        """Draws a new trial for every sample where `starting` is True, from its step 0. All
        samples draw, so the generator advances the same whoever starts a trial."""
        rows, device, generator = self.batch_size, self.device, self.generator
        length = torch.randint(
            self.trial_min, self.trial_max + 1, (rows,), generator=generator, device=device
        )
        # Two distinct uniform steps among 0 (or 1) .. length-3: the first two of a random order
        # in which the steps outside that range are sent to the end.
        steps = torch.arange(self.trial_max - 2, device=device)
        keys = torch.rand(rows, len(steps), generator=generator, device=device)
        excluded = (steps >= (length - 2)[:, None]) | (self.blank_first_step & (steps == 0))
        cue_steps = keys.masked_fill(excluded, 2.0).argsort(1)[:, :2]
        shown_cues = torch.rand(rows, self.N_CUES, generator=generator, device=device).argsort(1)[
            :, :2
        ]
        self.trial_length = torch.where(starting, length, self.trial_length)
        self.trial_step = torch.where(starting, 0, self.trial_step)
        self.cue_steps = torch.where(starting[:, None], cue_steps, self.cue_steps)
        self.shown_cues = torch.where(starting[:, None], shown_cues, self.shown_cues)

    def _draw_cues(self, rows=None):
        rows = self.batch_size if rows is None else rows
        bits = torch.randint(
            2, (rows, self.N_CUES, self.CUE_BITS), generator=self.generator, device=self.device
        )
        return bits.float() * 2 - 1

    def _start_episode(self):
        rows, device = self.batch_size, self.device
        self.cues = self._draw_cues() if self._fixed_cues is None else self._fixed_cues.clone()
        self.trial_length = self.trial_step = torch.zeros(rows, dtype=torch.long, device=device)
        self.cue_steps = self.shown_cues = torch.zeros(rows, 2, dtype=torch.long, device=device)
        self._start_trials(torch.ones(rows, dtype=torch.bool, device=device))

    def _apply(self, action):
        correct = (action == 1) == self.target_shown
        reward = torch.where(self.is_go, torch.where(correct, self.reward, self.penalty), 0.0)
        self.trial_step = self.trial_step + 1
        self._start_trials(self.trial_step == self.trial_length)
        return reward

    def _stimulus(self):
        at_first = self.trial_step == self.cue_steps[:, 0]
        at_second = self.trial_step == self.cue_steps[:, 1]
        cue = torch.where(at_second, self.shown_cues[:, 1], self.shown_cues[:, 0])
        bits = self.cues[torch.arange(self.batch_size, device=self.device), cue]
        bits = bits * (at_first | at_second)[:, None]
        return torch.cat([bits, self.is_go.float()[:, None]], 1)
