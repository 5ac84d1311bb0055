"""Data: whole data sets in memory, one module per source, and device-resident batching.

:func:`load_dataset` (:mod:`.datasets`) looks the ``[data] dataset`` name up in the
table of :mod:`._base`, which the sources fill: :mod:`.digits`, :mod:`.idx` (MNIST,
Fashion-MNIST), :mod:`.cifar`, :mod:`.folder` (image folders). :class:`BatchLoader`
(:mod:`.loader`) serves batches from the training device.
"""

from __future__ import annotations

from mutualkd.data._base import (
    DEFAULT_ROOT,
    DatasetInfo,
    Split,
    list_datasets,
    resize_images,
    stratified_subset,
)
from mutualkd.data.datasets import load_dataset
from mutualkd.data.idx import FASHION_MNIST_SYSTEM_DIR, IDX_FILES, read_idx, write_idx
from mutualkd.data.loader import BatchLoader, augment_batch

__all__ = [
    "DatasetInfo",
    "Split",
    "load_dataset",
    "list_datasets",
    "BatchLoader",
    "augment_batch",
    "read_idx",
    "write_idx",
    "stratified_subset",
    "resize_images",
    "DEFAULT_ROOT",
    "FASHION_MNIST_SYSTEM_DIR",
    "IDX_FILES",
]
