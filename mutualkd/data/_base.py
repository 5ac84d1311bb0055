"""What every data source shares: the split and info types, the plugin lookup, common steps.

A data set is a plugin (:mod:`.plugin` states the contract) found by its ``[data] dataset``
name in the entry-point group ``mutualkd.datasets`` through :mod:`mutualkd.registry`; the
built-in ones (:mod:`.digits`, :mod:`.idx`, :mod:`.cifar`, :mod:`.images`) are declared
there by mutualkd's pyproject.toml like any other. :func:`dataset_splits` gives the device
pipeline ``(train, test, info)``: images ``uint8 [N, C, H, W]`` and labels ``int64 [N]`` on
the CPU; :func:`dataset_sources` gives the stream pipeline map-style sources.
Normalisation and augmentation happen later, per batch (see :mod:`mutualkd.data.loader`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mutualkd import registry
from mutualkd.errors import DataError, UserError, unknown_name_hint

if TYPE_CHECKING:
    from mutualkd.config import DataConfig
    from mutualkd.data.plugin import DataSources, DatasetPlugin

__all__ = [
    "DEFAULT_ROOT",
    "DatasetFn",
    "DatasetInfo",
    "Split",
    "dataset_entrypoint",
    "dataset_pipeline",
    "dataset_plugin",
    "dataset_sources",
    "dataset_splits",
    "list_datasets",
    "mean_std",
    "check_image_memory",
    "register_dataset",
    "resize_images",
    "resolve_root",
    "stratified_subset",
    "take",
    "torchvision_download",
]

#: Where data sets are looked for when ``[data] root`` is not set.
DEFAULT_ROOT = "./data"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the batch loader need to know about a data set.

    ``mean``/``std`` are per channel in [0, 1] pixel units. ``augment`` is
    ``"crop_flip"`` (random crop from a reflect-padded image plus horizontal flip),
    ``"crop"`` (random crop from a zero-padded image, no flip) or ``"none"``;
    ``padding`` is the crop padding in pixels.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    padding: int


@dataclass
class Split:
    """One split held in memory: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N], on CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- the data set plugins

#: The old entrypoint form: the recipe's ``[data]`` table in, ``(train, test, info)`` out.
#: :func:`register_dataset` still takes one (as an :class:`~mutualkd.data.plugin.InMemoryDataset`).
DatasetFn = Callable[["DataConfig"], tuple[Split, Split, DatasetInfo]]
_KIND = "dataset"


def register_dataset(plugin: Any, name: str | None = None) -> Any:
    """Register a data set in-process under ``name`` (default: the object's ``__name__``).

    For tests and notebooks: an installed set is an entry point in ``mutualkd.datasets``.
    ``plugin`` is a :class:`~mutualkd.data.plugin.DatasetPlugin` (instance or subclass) or a
    function ``cfg -> (train, test, info)``. A name that is taken by another object is an
    error naming both; the same object (its module reloaded) is left as it is. Returns
    ``plugin``, so it works as a decorator.
    """
    from mutualkd.data.plugin import DatasetPlugin, InMemoryDataset

    name = name or getattr(plugin, "__name__", "")
    value = f"{getattr(plugin, '__module__', '?')}:{getattr(plugin, '__qualname__', name)}"
    if name in registry.names(_KIND):
        old = registry.provider(_KIND, name)
        if old is not None and old.value != value and old.obj is not plugin:
            raise ValueError(f"data set {name!r} is registered twice: {old.value.replace(':', '.')}"
                             f" and {value.replace(':', '.')}")
        return plugin
    obj = plugin if isinstance(plugin, DatasetPlugin) or isinstance(plugin, type) else InMemoryDataset(plugin)
    registry.register(_KIND, name, obj, distribution=f"<in-process: {value}>")
    return plugin


def list_datasets() -> list[str]:
    """The installed data set names (entry points of ``mutualkd.datasets``, and in-process ones), sorted."""
    return registry.names(_KIND)


def dataset_plugin(name: str) -> DatasetPlugin:
    """The plugin of the data set ``name``: a :class:`DataError` on ``data.dataset`` if none is installed.

    A plugin that cannot be imported, is not a DatasetPlugin, has two providers or is blocked
    is a :class:`~mutualkd.errors.PluginError` naming its distribution and the reason.
    """
    if name not in registry.names(_KIND) and not registry.provider(_KIND, name, disabled=True):
        raise DataError(
            f"unknown data set {name!r}",
            field="data.dataset",
            hint=unknown_name_hint("data set", name, list_datasets()) + "; `mutualkd plugins` lists what is installed",
        )
    obj = registry.get(_KIND, name, where="[data.dataset]")
    return obj() if isinstance(obj, type) else obj  # type: ignore[no-any-return]


def _guarded(cfg: DataConfig, method: str) -> Any:
    """``plugin.<method>(cfg)``; an exception that is not a UserError is reported as the plugin's fault."""
    plugin = dataset_plugin(cfg.dataset)
    try:
        return getattr(plugin, method)(cfg)
    except UserError:
        raise
    except Exception as e:  # a bug in the plugin, not in the recipe: say whose
        info = registry.provider(_KIND, cfg.dataset)
        who = f"{info.distribution} {info.version} ({info.value})".replace("  ", " ") if info else "?"
        raise DataError(
            f"data set plugin '{cfg.dataset}' from {who} failed in {method}(): {type(e).__name__}: {e}",
            field="data.dataset",
            hint=f"this is a fault of the plugin, not of the recipe: report it to the authors of"
            f" {info.distribution if info else 'the plugin'}, or choose another data set",
        ) from e


def dataset_sources(cfg: DataConfig) -> DataSources:
    """The map-style sources of ``cfg.dataset`` (the stream pipeline's view).

    Grey images of unknown statistics get ImageNet's averaged over its channels, as the
    stream pipeline's default (ImageNet's own) has three.
    """
    src: DataSources = _guarded(cfg, "sources")
    if src.in_chans == 1 and (src.mean is None or src.std is None):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        grey = (sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,)
        src = dataclasses.replace(src, mean=grey[0], std=grey[1])
    return src


def dataset_splits(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """``(train, test, info)`` of ``cfg.dataset`` decoded in memory (the device pipeline's view)."""
    return _guarded(cfg, "splits")  # type: ignore[no-any-return]


def dataset_pipeline(cfg: DataConfig) -> tuple[str, str]:
    """``(kind, reason)``: the pipeline ``data.pipeline = "auto"`` picks for ``cfg.dataset``."""
    return _guarded(cfg, "pipeline")  # type: ignore[no-any-return]


def dataset_entrypoint(name: str) -> DatasetFn:
    """A function ``cfg -> (train, test, info)`` for ``name``: :func:`dataset_splits` with the name checked first."""
    dataset_plugin(name)
    return dataset_splits


# --------------------------------------------------------------------------- common steps


def resolve_root(root: str | None) -> Path:
    """``[data] root``, or :data:`DEFAULT_ROOT` when it is not set, with ``~`` expanded."""
    return Path(root if root is not None else DEFAULT_ROOT).expanduser()


def mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units.

    Computed exactly from a 256-bin histogram per channel, so memory stays at one
    uint8 copy of a channel whatever the size of the split.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum().clamp_min(1.0)
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var**0.5, 1e-6))
    return tuple(means), tuple(stds)


def torchvision_download(name: str, tv_class: str, root: Path, manual: str) -> None:
    """Ask torchvision's ``tv_class`` to download both splits of ``name`` into ``root``.

    A failure (no network, a bad mirror) is a :class:`DataError` on ``data.download``
    with the cause and ``manual``, how to put the files there by hand.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, tv_class)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=True, download=True)
        cls(root=str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types (URLError, RuntimeError, OSError, ...)
        raise DataError(
            f"downloading {name} into {root} failed ({type(e).__name__}: {e})",
            field="data.download",
            hint=(
                f"without network, {manual}; then set download = false"
                " (or keep it: files already present are not fetched again)"
            ),
        ) from None


def stratified_subset(labels: torch.Tensor, n: int, *, seed: int) -> torch.Tensor | None:
    """Indices (ascending) of a deterministic class-stratified subset of ``n`` samples.

    Samples are shuffled with a generator seeded by ``seed``; each sample's key is
    ``(rank within its class + 0.5) / class size``, and the ``n`` smallest keys are
    taken, so every class keeps (up to rounding) its share of the split. Returns
    ``None`` when ``n`` covers the whole split.
    """
    total = int(labels.shape[0])
    if n >= total:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=gen)
    lab = labels.to(torch.int64)[perm]
    counts = torch.bincount(lab)
    grouped = torch.argsort(lab, stable=True)  # by class, in shuffled order within a class
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(total, dtype=torch.int64)
    rank[grouped] = torch.arange(total) - starts[lab[grouped]]
    key = (rank.to(torch.float64) + 0.5) / counts[lab].to(torch.float64)
    chosen = perm[torch.argsort(key, stable=True)[:n]]
    return torch.sort(chosen).values


def take(split: Split, idx: torch.Tensor | None) -> Split:
    """The samples ``idx`` of ``split`` (all of it when ``idx`` is None)."""
    if idx is None:
        return split
    return Split(split.images[idx].contiguous(), split.labels[idx].contiguous())


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_image_memory(n: int, channels: int, size: int, *, what: str) -> None:
    """A DataError on ``data.image_size`` when ``n`` uint8 images of ``size x size`` cannot fit in memory.

    The limit is half of this machine's memory: the images are held once more on the training device.
    """
    need = n * channels * size * size
    total = _memory_bytes()
    if total is not None and need > total // 2:
        raise DataError(
            f"{what} at {size}x{size} take {need / 2**30:.1f} GiB, more than half of this machine's memory"
            f" ({total / 2**30:.1f} GiB)",
            field="data.image_size",
            hint="set data.image_size to the size the models need (e.g. 32 or 224), or a train_subset",
        )


def resize_images(images: torch.Tensor, size: int, *, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` images to ``size x size`` (bilinear, antialiased), in chunks."""
    n, c = images.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = images[start : start + chunk].to(torch.float32)
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
