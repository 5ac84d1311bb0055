"""Data: whole data sets in memory (:mod:`.datasets`) and device-resident batching (:mod:`.loader`)."""

from __future__ import annotations

from mutualkd.data.datasets import (
    DEFAULT_ROOT,
    FASHION_MNIST_SYSTEM_DIR,
    IDX_FILES,
    DatasetInfo,
    Split,
    load_dataset,
    read_idx,
    resize_images,
    stratified_subset,
    write_fake_cifar,
    write_idx,
)
from mutualkd.data.loader import BatchLoader, augment_batch

__all__ = [
    "DatasetInfo",
    "Split",
    "load_dataset",
    "BatchLoader",
    "augment_batch",
    "read_idx",
    "write_idx",
    "write_fake_cifar",
    "stratified_subset",
    "resize_images",
    "DEFAULT_ROOT",
    "FASHION_MNIST_SYSTEM_DIR",
    "IDX_FILES",
]
