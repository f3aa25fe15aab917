"""Shared test cases of the defences: one valid parameter each, and which draw randomness.

Imported by the defence tests (pytest puts this folder on `sys.path`).
"""

PARAMS = {
  "none": None,
  "masking": 0.5,
  "clipping": 1.0,
  "clipping_ratio": 0.5,
  "value_clipping": 0.05,
  "pruning": 0.5,
  "noising": 0.1,
  "noising_ratio": 0.1,
  "dp": 0.5,
}
RANDOM = ("masking", "noising", "noising_ratio", "dp")
