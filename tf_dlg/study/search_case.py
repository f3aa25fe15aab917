"""The threshold search's case: per dataset, its attacked images, model and gallery.

Built once per dataset and shared by every attack: the training images 0..num_images-1
of a seeded permutation (so every defence sees the same images), the attack LeNet, and
the gallery of all the dataset's images that reconstructions are identified among.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from tf_dlg.study import matching


class SearchCases:
  """The case of each dataset, built on first use.

  Args:
    num_images: Images attacked per dataset.
    seed: Seeds the image choice and the model's weights.
    data_dir: tfds data directory for mnist / cifar10 / lfw.
  """

  def __init__(self, num_images: int, seed: int, data_dir: Optional[str] = None):
    self.num_images, self.seed, self.data_dir = num_images, seed, data_dir
    self._cases: Dict[str, Any] = {}
    self._galleries: Dict[Any, Any] = {}

  def case(self, dataset: str):
    """(dataset object, model, images, labels, dataset indices) of one dataset, built once."""
    if dataset not in self._cases:
      from tf_dlg import data, models

      ds = data.load_dataset(dataset, data_dir=self.data_dir, seed=self.seed)
      if self.num_images > len(ds.x_train):
        raise ValueError(
          f"num_images={self.num_images} exceeds the {len(ds.x_train)} "
          f"training images of {dataset!r}."
        )
      idx = np.random.default_rng(self.seed).permutation(len(ds.x_train))[: self.num_images]
      model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=self.seed)
      self._cases[dataset] = (ds, model, ds.x_train[idx], ds.y_train[idx], idx)
    return self._cases[dataset]

  def gallery(self, dataset: str):
    """Every image of `dataset` (train then test: training index i is gallery index i)."""
    if dataset not in self._galleries:
      from tf_dlg.analysis import identification

      self._galleries[dataset] = identification.Gallery.from_dataset(self.case(dataset)[0])
    return self._galleries[dataset]

  def gallery_arrays(self, dataset: str):
    """(images, labels) of the gallery, for the gallery matcher (same order as `gallery`)."""
    key = ("arrays", dataset)
    if key not in self._galleries:
      self._galleries[key] = matching.gallery_arrays(self.case(dataset)[0])
    return self._galleries[key]

  def gallery_image(self, dataset: str, index: int) -> np.ndarray:
    """The image at gallery `index` (the attacker's pick), as the dataset stores it."""
    ds = self.case(dataset)[0]
    n = len(ds.x_train)
    return ds.x_train[index] if index < n else ds.x_test[index - n]
