"""Loading a data set by its ``[data] dataset`` name, with the subsets and resizing the recipe asks for.

Each source registers its names in :mod:`._base`'s table: ``digits`` (:mod:`.digits`),
``mnist`` and ``fashion_mnist`` (:mod:`.idx`), ``cifar10`` and ``cifar100``
(:mod:`.cifar`), ``image_folder`` (:mod:`.folder`); their module docstrings say where
the files are looked for and how each set is augmented.

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

from mutualkd.data import cifar, digits, folder, idx  # noqa: F401  (each registers its data sets)
from mutualkd.data._base import DatasetInfo, Split, dataset_entrypoint, resize_images, stratified_subset, take

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["load_dataset"]


def load_dataset(cfg: DataConfig, *, seed: int = 0) -> tuple[Split, Split, DatasetInfo]:
    """Return ``(train, test, info)`` for the data set ``cfg`` names.

    Applies ``cfg.train_subset`` (class-stratified, chosen with ``seed``),
    ``cfg.test_subset`` (class-stratified, fixed seed 0, so it does not depend on the
    run seed) and ``cfg.image_size`` (bilinear antialiased resize when set). Every
    problem the user can fix (missing, truncated or malformed files, a missing
    ``image_size`` for ``image_folder``) raises :class:`~mutualkd.errors.DataError`:
    about a ``[data]`` field it carries the field, about a data file it names the file.
    """
    train, test, info = dataset_entrypoint(cfg.dataset)(cfg)

    if cfg.train_subset is not None:
        train = take(train, stratified_subset(train.labels, cfg.train_subset, seed=seed))
    if cfg.test_subset is not None:
        test = take(test, stratified_subset(test.labels, cfg.test_subset, seed=0))

    if cfg.image_size is not None and info.image_size != (cfg.image_size, cfg.image_size):
        size = cfg.image_size
        train = Split(resize_images(train.images, size), train.labels)
        test = Split(resize_images(test.images, size), test.labels)
        padding = max(1, round(info.padding * size / info.image_size[0])) if info.padding > 0 else 0
        info = dataclasses.replace(info, image_size=(size, size), padding=padding)
    return train, test, info
