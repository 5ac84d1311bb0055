"""Loading a data set by its ``[data] dataset`` name, with the subsets and resizing the recipe asks for.

Each data set is a plugin of the entry-point group ``mutualkd.datasets`` (the contract:
:mod:`.plugin`). The built-ins are ``digits`` (:mod:`.digits`), ``mnist`` and
``fashion_mnist`` (:mod:`.idx`), ``cifar10`` and ``cifar100`` (:mod:`.cifar`),
``image_folder`` and ``image_tar`` (:mod:`.images`); their module docstrings say where the
files are looked for and how each set is augmented.

Subsets and resizing
--------------------
``train_subset`` takes a class-stratified subset of the train split, chosen with
the run ``seed`` (each class keeps its share of the split, ties broken at random);
``test_subset`` does the same on the test split with a fixed seed (0), so every run
with the same ``test_subset`` is evaluated on the same images. A subset at least as
large as the split keeps the whole split. ``image_size`` (when set, for every data
set but ``image_folder``, which is loaded at that size) resizes both splits to
``image_size x image_size`` with bilinear antialiased interpolation, and scales the
crop padding with the image: ``max(1, round(padding * image_size / native_height))``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mutualkd.data._base import (
    DatasetInfo,
    Split,
    check_image_memory,
    resize_images,
    stratified_subset,
    take,
)
from mutualkd.data.lookup import dataset_splits
from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["load_dataset", "load_splits", "split_indices"]


def split_indices(labels: torch.Tensor, cfg: DataConfig, *, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(train, val)`` indices into a train split of ``labels``: the held-out share, then the subset.

    ``val_fraction`` holds out a class-stratified share (fixed seed 0, so it is the same
    for every run seed); ``train_subset`` is then taken from the rest with ``cfg.subset_seed``,
    or with ``seed`` when that is unset.
    ``train`` is None when the whole split trains; ``val`` is None without ``val_fraction``.
    """
    n = int(labels.shape[0])
    rest: torch.Tensor | None = None
    val: torch.Tensor | None = None
    if cfg.val_fraction is not None:
        n_val = max(1, round(cfg.val_fraction * n))
        if n_val >= n:
            raise DataError(f"val_fraction = {cfg.val_fraction} of {n} train images leaves none to train on",
                            field="data.val_fraction", hint="use a smaller val_fraction")
        val = stratified_subset(labels, n_val, seed=0)
        assert val is not None
        keep = torch.ones(n, dtype=torch.bool)
        keep[val] = False
        rest = torch.nonzero(keep).flatten()
    if cfg.train_subset is not None:
        pool = labels if rest is None else labels[rest]
        sub = stratified_subset(pool, cfg.train_subset, seed=seed if cfg.subset_seed is None else cfg.subset_seed)
        if sub is not None:
            rest = sub if rest is None else rest[sub]
    return rest, val


def load_splits(cfg: DataConfig, *, seed: int = 0, resize: bool = True) -> tuple[Split, Split | None, Split, DatasetInfo]:
    """``(train, val, test, info)``: :func:`load_dataset` with the validation split held out of train.

    ``val`` is None without ``cfg.val_fraction``. ``resize=False`` keeps the native size
    (the stream pipeline resizes per image in its transforms).
    """
    train, test, info = dataset_splits(cfg)

    train_idx, val_idx = split_indices(train.labels, cfg, seed=seed)
    val = take(train, val_idx) if val_idx is not None else None
    train = take(train, train_idx)
    if cfg.test_subset is not None:
        test = take(test, stratified_subset(test.labels, cfg.test_subset, seed=0))

    if resize and cfg.image_size is not None and info.image_size != (cfg.image_size, cfg.image_size):
        train, val, test, info = resize_splits(train, val, test, info, cfg.image_size)
    return train, val, test, info


def resize_splits(train: Split, val: Split | None, test: Split, info: DatasetInfo,
                  size: int) -> tuple[Split, Split | None, Split, DatasetInfo]:
    """Every split resized to ``size`` x ``size`` (memory checked first), the crop padding scaled with it."""
    n = len(train) + len(test) + (len(val) if val is not None else 0)
    check_image_memory(n, info.in_chans, size, what=f"the {n} images of {info.name}")
    train = Split(resize_images(train.images, size), train.labels)
    test = Split(resize_images(test.images, size), test.labels)
    if val is not None:
        val = Split(resize_images(val.images, size), val.labels)
    padding = max(1, round(info.padding * size / info.image_size[0])) if info.padding > 0 else 0
    return train, val, test, dataclasses.replace(info, image_size=(size, size), padding=padding)


def load_dataset(cfg: DataConfig, *, seed: int = 0) -> tuple[Split, Split, DatasetInfo]:
    """Return ``(train, test, info)`` for the data set ``cfg`` names.

    Applies ``cfg.val_fraction`` (held out of train, see :func:`split_indices`),
    ``cfg.train_subset`` (class-stratified, chosen with ``seed``), ``cfg.test_subset``
    (class-stratified, fixed seed 0, so it does not depend on the run seed) and
    ``cfg.image_size`` (bilinear antialiased resize when set). Every problem the user can
    fix (missing, truncated or malformed files, a missing ``image_size`` for
    ``image_folder``) raises :class:`~mutualkd.errors.DataError`: about a ``[data]`` field
    it carries the field, about a data file it names the file.
    """
    train, _, test, info = load_splits(cfg, seed=seed)
    return train, test, info
