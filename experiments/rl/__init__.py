"""A2C on the maze and cue-reward tasks (maze.py, cue_reward.py, run as programs); see README.md."""
