"""``image_folder`` and ``image_tar``: the image-file data sets, as plugins of both pipelines.

* ``image_folder``: ``<root>/{train,test|val}/<class>/<image>``. The device pipeline reads
  it with :mod:`.folder` (every image decoded at ``image_size``); the stream pipeline with
  timm's folder reader (:func:`~mutualkd.data.sources.folder_sources`). ``auto`` picks
  the device pipeline while the decoded images fit ``data.memory_budget_gb``.
* ``image_tar``: tar shards under ``<root>`` (:func:`~mutualkd.data.sources.tar_sources`),
  read by the stream pipeline only.

Both are declared in pyproject.toml's entry-point group ``mutualkd.datasets``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mutualkd.data import folder
from mutualkd.data._base import DatasetInfo, Split
from mutualkd.data.plugin import DataSources, DatasetPlugin
from mutualkd.data.sources import ReaderSource, count_folder_images, folder_sources, tar_sources
from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["ImageFolder", "ImageTar", "image_folder", "image_tar"]


def _reader_sources(train: ReaderSource, test: ReaderSource) -> DataSources:
    """Sources of images whose size and statistics are unknown until they are read (ImageNet's by default)."""
    classes = tuple(sorted(train.class_to_idx, key=train.class_to_idx.__getitem__))
    return DataSources(train, test, classes, augment="crop_flip")


class ImageFolder(DatasetPlugin):
    """Images in ``<root>/{train,test}/<class>/``: RGB, brought to ``image_size`` on the device pipeline."""

    def sources(self, cfg: DataConfig) -> DataSources:
        return _reader_sources(*folder_sources(cfg.root))

    def splits(self, cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
        return folder.image_folder(cfg)

    def pipeline(self, cfg: DataConfig) -> tuple[str, str]:
        if cfg.image_size is None:  # the device loader asks for it, naming pipeline = "stream" as the other way
            return "device", "image folder (data.image_size unset)"
        n = count_folder_images(cfg.root)
        if n is None:  # no folder there: the device loader names what is missing
            return "device", "image folder (size unknown)"
        need = n * 3 * cfg.image_size**2 / 2**30
        budget = cfg.memory_budget_gb
        if need > budget:
            return "stream", (f"{n} images at {cfg.image_size} px are {need:.2f} GiB decoded, over"
                              f" data.memory_budget_gb = {budget:g}")
        return "device", (f"{n} images at {cfg.image_size} px are {need:.2f} GiB decoded, within"
                          f" data.memory_budget_gb = {budget:g}")


class ImageTar(DatasetPlugin):
    """Tar shards, streamed: the device pipeline (which decodes everything up front) does not read them."""

    def sources(self, cfg: DataConfig) -> DataSources:
        return _reader_sources(*tar_sources(cfg.root, cfg.skip_corrupt))

    def splits(self, cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
        raise DataError(
            "image_tar is read by the stream pipeline only",
            field="data.pipeline",
            hint='set data.pipeline = "stream" (or "auto"), or extract the shards into an image folder',
        )

    def pipeline(self, cfg: DataConfig) -> tuple[str, str]:
        return "stream", "tar shards are read as they are needed"


# The plugins, declared in pyproject.toml's entry-point group mutualkd.datasets.
image_folder = ImageFolder()
image_tar = ImageTar()
