"""The papers' experiments, one folder per task, each run as a program (see README.md), and
common.py, what their scripts and the benchmarks share."""
