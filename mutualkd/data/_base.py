"""What every data source shares: the split and info types and the common steps (subsets, resizing, memory).

A data set is a plugin (:mod:`.plugin` states the contract) found by its ``[data] dataset``
name in the entry-point group ``mutualkd.datasets`` (:mod:`.lookup`); the built-in ones
(:mod:`.digits`, :mod:`.idx`, :mod:`.cifar`, :mod:`.images`) are declared there by
mutualkd's pyproject.toml like any other. ``lookup.dataset_splits`` gives the device
pipeline ``(train, test, info)``: images ``uint8 [N, C, H, W]`` and labels ``int64 [N]`` on
the CPU; ``lookup.dataset_sources`` gives the stream pipeline map-style sources.
Normalisation and augmentation happen later, per batch (see :mod:`mutualkd.data.loader`).
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = [
    "DEFAULT_ROOT",
    "DatasetInfo",
    "Split",
    "mean_std",
    "check_image_memory",
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
