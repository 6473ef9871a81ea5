"""Natural-image memorisation and completion (images.py, run as a program); see README.md."""
