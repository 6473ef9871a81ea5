"""Penn Treebank language models (main.py, run as a program); see README.md."""
