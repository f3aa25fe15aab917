"""Drivers that reproduce and extend the paper (run as `python -m experiments.NAME`)."""

import os

# Entry points silence TensorFlow's C++ INFO/WARNING pages; users' own shells are untouched.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
