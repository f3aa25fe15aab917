"""Drivers that reproduce and extend the paper (run as `python -m experiments.NAME`)."""
