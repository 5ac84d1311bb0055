"""The data set plugin contract: what a ``mutualkd.datasets`` entry point is and what it returns.

A data set is a plugin like a strategy or a metric: a distribution declares it in the
entry-point group ``mutualkd.datasets``, the key being the name a recipe gives as
``[data] dataset``, the value ``"module:object"``. mutualkd's own sets (digits, mnist,
fashion_mnist, cifar10, cifar100, image_folder, image_tar) are declared the same way in its
pyproject.toml; the core only ever asks :mod:`mutualkd.registry` for a name.

The object is a :class:`DatasetPlugin` (an instance, or a subclass that takes no
arguments). It has one required method, :meth:`DatasetPlugin.sources`, which returns a
:class:`DataSources`: both splits as map-style sources (labels, class names, one sample
opened at a time) and what is known of the images (native size, statistics, the
augmentation the device pipeline applies). Both pipelines are served from it:

* the stream pipeline (:mod:`mutualkd.data.stream`) reads the sources in worker processes;
* the device pipeline (:mod:`mutualkd.data.loader`) decodes every sample once with
  :meth:`DatasetPlugin.splits`, whose default (:func:`decode_sources`) opens each sample
  and brings it to ``[data] image_size`` (or the native size). A set that is in memory
  already, or that decodes in its own way, overrides ``splits``.

:meth:`DatasetPlugin.pipeline` says which pipeline ``data.pipeline = "auto"`` picks (the
device pipeline unless overridden). A plugin reads its settings from the recipe's ``[data]``
table (``root``, ``image_size``, ``download``, ...); the table has no free keys, so a plugin
reuses those fields (``root`` may name a file as well as a folder).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
import warnings

import numpy as np
import torch

from mutualkd.data._base import DatasetInfo, Split, check_image_memory, mean_std
from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig
    from mutualkd.data.sources import Source

__all__ = ["AUGMENTS", "DataSources", "DatasetPlugin", "InMemoryDataset", "decode_sources"]

#: The device pipeline's augmentations (:class:`~mutualkd.data.DatasetInfo` ``augment``).
AUGMENTS = ("crop_flip", "crop", "none")
_PADDING_DIVISOR = 8  # the default crop padding is the image's height / 8: 4 px at 32 px, as for CIFAR


@dataclass(frozen=True)
class DataSources:
    """What a data set plugin gives both pipelines: two map-style splits and what is known of them.

    ``train`` and ``test`` follow :class:`~mutualkd.data.sources.Source`: ``labels`` (int64
    ``[N]``, values ``0 .. num_classes - 1``), ``num_classes``, ``in_chans`` (1 or 3),
    ``len()``, ``open(i)`` (sample ``i`` as a decoded PIL image) and ``name(i)`` (the file
    or sample, for error messages). Both splits number the classes alike.

    ``classes`` are the class names, ``classes[label]``. ``image_size`` is the native
    ``(height, width)`` when every image has it, None when sizes vary (the device pipeline
    then needs ``[data] image_size``). ``mean``/``std`` are per channel in [0, 1] pixel
    units; None: unknown (the device pipeline computes them from the decoded train split,
    the stream pipeline uses ``config_from``'s or ImageNet's, averaged over its channels
    for grey images). ``augment`` is the device
    pipeline's training augmentation (one of :data:`AUGMENTS`: ``"crop_flip"`` for natural
    images, ``"crop"`` where a flip changes the class, as for digits), ``padding`` its crop
    padding in pixels at the native size (None: a height / 8).
    """

    train: Source
    test: Source
    classes: tuple[str, ...]
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: str = "crop_flip"
    padding: int | None = None

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise ValueError(f"DataSources.augment must be one of {', '.join(AUGMENTS)}, not {self.augment!r}")
        if len(self.classes) != self.train.num_classes:
            raise ValueError(f"DataSources names {len(self.classes)} classes but its train split has"
                             f" {self.train.num_classes}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train.in_chans)

    def info(self, name: str, image_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> DatasetInfo:
        """The :class:`DatasetInfo` of these splits decoded at ``image_size`` with these statistics."""
        padding = self.padding
        if padding is None:
            padding = max(1, round(image_size[0] / _PADDING_DIVISOR))
        elif self.image_size is not None and image_size != self.image_size and padding > 0:
            padding = max(1, round(padding * image_size[0] / self.image_size[0]))
        return DatasetInfo(name, self.num_classes, self.in_chans, image_size, mean, std, self.augment, padding)


class DatasetPlugin:
    """A data set, found under its name in the entry-point group ``mutualkd.datasets``.

    Subclass it and implement :meth:`sources`; the entry point names an instance or the
    subclass (which is then made with no arguments). Every method takes the recipe's
    ``[data]`` table and must raise :class:`~mutualkd.errors.DataError` for anything the user
    can fix (a missing folder, a bad file), naming the field (``field="data.root"``) or the
    file, and the fix. Any other exception is reported as a fault of the plugin, naming it.
    """

    def sources(self, cfg: DataConfig) -> DataSources:
        """Both splits as map-style sources, and what is known of their images (required)."""
        raise NotImplementedError(f"{type(self).__qualname__} does not implement sources(cfg)")

    def splits(self, cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
        """``(train, test, info)`` decoded for the device pipeline: uint8 ``[N, C, H, W]`` images, int64 labels.

        The default decodes :meth:`sources` with :func:`decode_sources`. ``info.image_size``
        is the size decoded at; the caller resizes to ``[data] image_size`` when it differs.
        """
        return decode_sources(self.sources(cfg), cfg)

    def pipeline(self, cfg: DataConfig) -> tuple[str, str]:
        """``(kind, reason)``: the pipeline (``"device"`` or ``"stream"``) that ``data.pipeline = "auto"`` picks."""
        return "device", f"{cfg.dataset} fits in memory"


class InMemoryDataset(DatasetPlugin):
    """A data set read whole by one function ``cfg -> (train, test, info)``: digits, MNIST, CIFAR.

    The device pipeline takes the splits as they are; the stream pipeline serves them as PIL
    images (:class:`~mutualkd.data.sources.SplitSource`). ``classes`` names the classes
    (default: ``"0"``, ``"1"``, ...).
    """

    def __init__(self, load: Callable[[DataConfig], tuple[Split, Split, DatasetInfo]],
                 classes: Sequence[str] | None = None) -> None:
        self.load = load
        self.classes = None if classes is None else tuple(classes)
        self.__doc__ = load.__doc__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.load.__module__}.{self.load.__qualname__})"

    def splits(self, cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
        return self.load(cfg)

    def sources(self, cfg: DataConfig) -> DataSources:
        from mutualkd.data.sources import SplitSource

        train, test, info = self.load(cfg)
        classes = self.classes or tuple(str(i) for i in range(info.num_classes))
        return DataSources(SplitSource(train, info.num_classes, f"{info.name} train"),
                           SplitSource(test, info.num_classes, f"{info.name} test"),
                           classes, info.image_size, info.mean, info.std, info.augment, info.padding)


# --------------------------------------------------------------------------- decoding a source


def _decode(source: Source, idx: Sequence[int] | None, size: tuple[int, int] | None, what: str) -> torch.Tensor:
    """Samples ``idx`` of ``source`` (all: None) as uint8 ``[N, C, H, W]`` at ``size`` (None: each one's own).

    Images of differing sizes with no ``size`` are a DataError on ``data.image_size``.
    """
    from PIL import Image

    mode = "L" if source.in_chans == 1 else "RGB"
    order = range(len(source)) if idx is None else idx
    out: np.ndarray | None = None
    for k, i in enumerate(order):
        try:
            # A decompression bomb is refused like an unreadable file, before it fills memory.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = source.open(i).convert(mode)
        except DataError:
            raise
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBomb*, ...
            raise DataError(f"{source.name(i)}: cannot be read as an image ({type(e).__name__}: {e})",
                            hint="replace or remove the file") from None
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
        if out is None:
            h, w = pixels.shape[:2]
            check_image_memory(len(order), source.in_chans, max(h, w), what=what)
            out = np.empty((len(order), h, w, source.in_chans), dtype=np.uint8)
        if pixels.shape[:2] != out.shape[1:3]:
            raise DataError(
                f"{source.name(i)} is {pixels.shape[1]}x{pixels.shape[0]} px but the images before it are"
                f" {out.shape[2]}x{out.shape[1]}",
                field="data.image_size",
                hint="set data.image_size (e.g. 32) to bring every image to one size, or use pipeline = \"stream\"",
            )
        out[k] = pixels.reshape(out.shape[1:])
    if out is None:
        raise DataError(f"{what}: no images", hint="check the data set's files")
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def decode_sources(src: DataSources, cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """Both splits of ``src`` decoded in memory: the device pipeline's view of any plugin.

    Splits held in memory already (:class:`~mutualkd.data.sources.SplitSource`) are taken
    as they are. Otherwise every sample is opened, converted to ``L`` (1 channel) or ``RGB``
    and resized (PIL bilinear) to ``[data] image_size`` when set, else kept at its native
    size (which must then be the same for all). mean/std are the plugin's, or computed from
    the decoded train split.
    """
    from mutualkd.data.sources import SplitSource

    name = cfg.dataset
    if isinstance(src.train, SplitSource) and isinstance(src.test, SplitSource):
        train = Split(src.train.images, torch.from_numpy(src.train.labels))
        test = Split(src.test.images, torch.from_numpy(src.test.labels))
    else:
        size = (cfg.image_size, cfg.image_size) if cfg.image_size is not None else src.image_size
        train = Split(_decode(src.train, None, size, f"the {len(src.train)} train images of {name}"),
                      torch.as_tensor(np.asarray(src.train.labels), dtype=torch.int64))
        test = Split(_decode(src.test, None, size, f"the {len(src.test)} test images of {name}"),
                     torch.as_tensor(np.asarray(src.test.labels), dtype=torch.int64))
    if train.images.shape[2:] != test.images.shape[2:]:
        raise DataError(f"{name}: the train images are {tuple(train.images.shape[2:])} px but the test images"
                        f" {tuple(test.images.shape[2:])}", field="data.image_size",
                        hint="set data.image_size to bring both splits to one size")
    mean, std = (src.mean, src.std) if src.mean is not None and src.std is not None else mean_std(train.images)
    h, w = (int(s) for s in train.images.shape[2:])
    return train, test, src.info(name, (h, w), mean, std)


def is_dataset_plugin(obj: Any) -> str | None:
    """The problem with ``obj`` as a ``mutualkd.datasets`` entry point, or None when it fits the contract."""
    cls = obj if isinstance(obj, type) else type(obj)
    if not issubclass(cls, DatasetPlugin):
        return (f"a dataset plugin must be a mutualkd.data.DatasetPlugin (an instance, or a subclass taking no"
                f" arguments), got {obj!r}")
    if cls.sources is DatasetPlugin.sources:
        return f"dataset plugin {cls.__qualname__} does not implement sources(cfg)"
    return None
