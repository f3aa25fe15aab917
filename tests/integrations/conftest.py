"""Flower's tests need the `flower` extra, and its simulation engine's also Ray (the
`simulation` extra): they are left out where those are not installed (the pinned TFF
environment has neither)."""

import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("flwr") is None:
  collect_ignore_glob += ["test_flower*.py"]
elif importlib.util.find_spec("ray") is None:
  collect_ignore_glob += ["test_flower_engine*.py", "test_flower_ray*.py"]
