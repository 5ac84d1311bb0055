"""Data: two pipelines, one recipe vocabulary.

The device pipeline: :func:`load_dataset` (:mod:`.datasets`) looks the ``[data] dataset``
name up in the table of :mod:`._base`, which the sources fill: :mod:`.digits`, :mod:`.idx`
(MNIST, Fashion-MNIST), :mod:`.cifar`, :mod:`.folder` (image folders); :class:`BatchLoader`
(:mod:`.loader`) serves batches from the training device.

The stream pipeline: :class:`StreamLoader` (:mod:`.stream`), a torch DataLoader with
worker processes over timm's readers or an in-memory split (:mod:`.sources`), with timm's
transforms (:mod:`.transforms`). :func:`build_pipeline` (:mod:`.pipeline`) picks one.
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
from mutualkd.data.pipeline import Pipeline, build_pipeline, check_data, choose_pipeline
from mutualkd.data.stream import StreamLoader

__all__ = [
    "DatasetInfo",
    "Split",
    "load_dataset",
    "list_datasets",
    "BatchLoader",
    "augment_batch",
    "StreamLoader",
    "Pipeline",
    "build_pipeline",
    "check_data",
    "choose_pipeline",
    "read_idx",
    "write_idx",
    "stratified_subset",
    "resize_images",
    "DEFAULT_ROOT",
    "FASHION_MNIST_SYSTEM_DIR",
    "IDX_FILES",
]
