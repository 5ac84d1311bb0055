"""``digits``: scikit-learn's 8x8 handwritten digits, shipped with scikit-learn.

1797 images, so no download is ever needed. Pixel values 0..16 are scaled to 0..255.
The train/test split is fixed: ``train_test_split(test_size=0.25, stratify=y,
random_state=0)``, independent of the run seed, so every run is evaluated on the same
450 test images (1347 train). Images stay 8x8 unless ``image_size`` is set; note that a
CIFAR-style ResNet (three stages, two stride-2 steps) ends at 2x2 feature maps on 8x8
input. mean/std are computed from the train split. Augmentation ``"crop"`` with
padding 1 (no flips: a flipped digit is another or no digit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from mutualkd.data._base import DatasetInfo, Split, mean_std
from mutualkd.data.plugin import InMemoryDataset

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["digits"]


def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images uint8 ``[N, 1, 8, 8]`` scaled to 0..255, labels int64 ``[N]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], values 0..16
    images = np.rint(raw * (255.0 / _MAX_VALUE)).clip(0, 255).astype(np.uint8)[:, None, :, :]
    return images, np.asarray(bunch.target, dtype=np.int64)


def _load_digits() -> tuple[Split, Split, DatasetInfo]:
    """The fixed stratified split of :func:`_digit_images`, with the train split's mean/std."""
    from sklearn.model_selection import train_test_split

    images, labels = _digit_images()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=_TEST_SIZE, stratify=labels, random_state=_SPLIT_SEED
    )
    train = _split(images, labels, np.sort(train_idx))
    test = _split(images, labels, np.sort(test_idx))
    mean, std = mean_std(train.images)
    info = DatasetInfo("digits", 10, 1, (8, 8), mean, std, "crop", _PADDING)
    return train, test, info


def _split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> Split:
    return Split(torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].copy()))


# --------------------------------------------------------------------------- defaults

_MAX_VALUE = 16.0  # scikit-learn's digits count set pixels of a 4x4 block: 0..16
_TEST_SIZE = 0.25
_SPLIT_SEED = 0  # the split never follows the run seed
_PADDING = 1  # crop padding in pixels at 8x8


# The plugin, declared in pyproject.toml's entry-point group mutualkd.datasets.


def _digits(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """scikit-learn's digits: 1347 train and 450 test images, 1x8x8, 10 classes."""
    return _load_digits()


digits = InMemoryDataset(_digits)
