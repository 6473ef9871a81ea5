"""Binary pattern memorisation and completion (patterns.py, run as a program); see README.md."""
