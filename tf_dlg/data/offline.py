"""Offline stand-ins from scikit-learn and scikit-image: real images, no network.

`digits` (sklearn's 8x8 digits at 28x28), `lfw_subset` (skimage's 200 LFW crops, faces
and non-faces), `lfw_faces` (its 100 faces) and `photos` (seeded 32x32 crops of
skimage's colour photos). Each loader takes the seed of its stratified train/test split.
"""

from __future__ import annotations

import numpy as np

from tf_dlg.data.dataset import ImageDataset, resize, split_dataset


def load_digits(seed: int) -> ImageDataset:
  from sklearn import datasets as sk_datasets

  digits = sk_datasets.load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  x = resize(x, 28)
  y = digits.target.astype(np.int64)
  source = (
    "sklearn.datasets.load_digits: 1,797 real 8x8 handwritten digits, "
    "upsampled to 28x28 (offline stand-in for MNIST)"
  )
  return split_dataset("digits", source, x, y, seed, [str(i) for i in range(10)])


def load_lfw_subset(seed: int) -> ImageDataset:
  from skimage import data as sk_data

  faces = sk_data.lfw_subset().astype(np.float32)  # [200, 25, 25]: 100 faces, 100 non-faces
  x = resize(faces[..., None], 32)
  y = np.array([1] * 100 + [0] * 100, dtype=np.int64)
  source = (
    "skimage.data.lfw_subset: 200 real 25x25 grey LFW crops (100 faces, 100 "
    "non-faces), resized to 32x32 (offline stand-in for LFW)"
  )
  return split_dataset("lfw_subset", source, x, y, seed, ["non-face", "face"])


# Colour photos bundled inside scikit-image (no download needed).
PHOTO_SOURCES = (
  "astronaut",
  "chelsea",
  "coffee",
  "rocket",
  "immunohistochemistry",
  "hubble_deep_field",
  "retina",
  "colorwheel",
)
PHOTO_CROPS_PER_SOURCE = 40
PHOTO_SHORT_SIDE = 128  # photos are downscaled first, so a 32x32 crop shows an object part


def load_photos(seed: int) -> ImageDataset:
  """A fixed, seeded set of 32x32 crops of skimage's colour photos, labelled by photo."""
  import tensorflow as tf
  from skimage import data as sk_data

  # The crop set itself is fixed (seed 1234) so that "photo #i" means the same image in
  # every run; `seed` only changes the train/test split.
  rng = np.random.default_rng(1234)
  crops, labels = [], []
  for label, name in enumerate(PHOTO_SOURCES):
    img = getattr(sk_data, name)()
    img = np.asarray(img)[..., :3].astype(np.float32) / 255.0
    h, w = img.shape[:2]
    scale = PHOTO_SHORT_SIDE / min(h, w)
    img = tf.image.resize(
      img, (int(round(h * scale)), int(round(w * scale))), antialias=True
    ).numpy()
    h, w = img.shape[:2]
    for _ in range(PHOTO_CROPS_PER_SOURCE):
      top, left = rng.integers(0, h - 32 + 1), rng.integers(0, w - 32 + 1)
      crops.append(img[top : top + 32, left : left + 32])
      labels.append(label)
  x = np.clip(np.stack(crops), 0.0, 1.0).astype(np.float32)
  y = np.asarray(labels, dtype=np.int64)
  source = (
    f"skimage.data colour photos ({', '.join(PHOTO_SOURCES)}): "
    f"{len(x)} seeded 32x32 crops labelled by source photo "
    "(offline stand-in for CIFAR-10)"
  )
  return split_dataset("photos", source, x, y, seed, list(PHOTO_SOURCES))


def load_lfw_faces(seed: int) -> ImageDataset:
  """The 100 faces of skimage's lfw_subset (its first half), resized like lfw_subset."""
  from skimage import data as sk_data

  faces = sk_data.lfw_subset()[:100].astype(np.float32)
  x = resize(faces[..., None], 32)
  y = np.zeros(len(x), dtype=np.int64)
  source = (
    "skimage.data.lfw_subset faces: 100 real 25x25 grey LFW face crops, resized "
    "to 32x32 (one class: no identities; for attacks, not training)"
  )
  return split_dataset("lfw_faces", source, x, y, seed, ["face"])
