"""Label inference from an observed update (iDLG and its batch extension).

iDLG (Zhao et al. 2020): for one example with softmax cross-entropy, the gradient of
the last dense layer w.r.t. logit j is h * (p_j - y_j) where h is the layer input. With
non-negative h (sigmoid/ReLU features) only the true class has a negative column sum,
so label = argmin_j sum_i dW[i, j]. Keras kernels are [in, out], so the sum runs over
axis 0 (PyTorch's [out, in] sums over the last axis).

Batch extension (N > 1, in the spirit of Wainakh et al.'s LLG): the summed column
s_j ~ sum_n (p_nj - y_nj) * |h_n|. Every class with a negative sum occurs; further
occurrences are assigned greedily, each time to the class with the smallest remaining
value, after which that class's value is raised by the estimated impact of one example
m = -sum(negative s_j) / N. For N = 1 this is exactly the iDLG argmin.

A `fedavg_delta` (initial - final) is lr x a sum of gradients, so the same sign rule
applies to it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def last_dense_kernel_index(shapes: Sequence[tuple], num_classes: int) -> int:
  """Index of the last rank-2 [in, num_classes] tensor among the trainable shapes."""
  for i in range(len(shapes) - 1, -1, -1):
    if len(shapes[i]) == 2 and shapes[i][1] == num_classes:
      return i
  raise ValueError(f"No dense kernel [in, {num_classes}] found among update shapes {shapes}.")


def infer_labels(kernel_update: np.ndarray, num_examples: int = 1) -> np.ndarray:
  """Labels [num_examples] (sorted) from a last-layer kernel update [in, classes]."""
  kernel_update = np.asarray(kernel_update, np.float64)
  if kernel_update.ndim != 2:
    raise ValueError(f"kernel_update must be [in, classes], got shape {kernel_update.shape}.")
  column = kernel_update.sum(axis=0)
  if num_examples == 1:
    return np.array([int(np.argmin(column))], np.int64)
  negative = column[column < 0]
  impact = -negative.sum() / num_examples if negative.size else np.abs(column).mean()
  impact = max(impact, 1e-30)
  value = column.copy()
  labels = []
  for _ in range(num_examples):
    j = int(np.argmin(value))
    labels.append(j)
    value[j] += impact
  return np.sort(np.asarray(labels, np.int64))
