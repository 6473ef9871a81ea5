"""Omniglot 5-way 1-shot classification (omniglot.py, run as a program); see README.md."""
