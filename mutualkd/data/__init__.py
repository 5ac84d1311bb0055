"""Data: two pipelines, one recipe vocabulary.

A data set is a plugin (:class:`DatasetPlugin`, :mod:`.plugin`) found by its ``[data] dataset``
name in the entry-point group ``mutualkd.datasets``; the built-ins are declared there too:
:mod:`.digits`, :mod:`.idx` (MNIST, Fashion-MNIST), :mod:`.cifar`, :mod:`.images` (image
folders, tar shards). A plugin gives map-style sources (:class:`DataSources`) that serve both pipelines.

The device pipeline: :func:`load_dataset` (:mod:`.datasets`) decodes the data set once;
:class:`BatchLoader` (:mod:`.loader`) serves batches from the training device.

The stream pipeline: :class:`StreamLoader` (:mod:`.stream`), a torch DataLoader with
worker processes over timm's readers or an in-memory split (:mod:`.sources`), with timm's
transforms (:mod:`.transforms`). :func:`build_pipeline` (:mod:`.pipeline`) picks one.
"""

from __future__ import annotations

from mutualkd.data._base import (
    DEFAULT_ROOT,
    DatasetInfo,
    Split,
    resize_images,
    stratified_subset,
)
from mutualkd.data.datasets import load_dataset
from mutualkd.data.lookup import dataset_plugin, list_datasets, register_dataset
from mutualkd.data.idx import FASHION_MNIST_SYSTEM_DIR, IDX_FILES, read_idx, write_idx
from mutualkd.data.loader import BatchLoader, augment_batch
from mutualkd.data.pipeline import Pipeline, build_pipeline, check_data, choose_pipeline
from mutualkd.data.plugin import DataSources, DatasetPlugin, InMemoryDataset, decode_sources
from mutualkd.data.sources import Source, SplitSource
from mutualkd.data.stream import StreamLoader

__all__ = [
    "DatasetInfo",
    "Split",
    "load_dataset",
    "list_datasets",
    "register_dataset",
    "dataset_plugin",
    "DatasetPlugin",
    "DataSources",
    "InMemoryDataset",
    "Source",
    "SplitSource",
    "decode_sources",
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
