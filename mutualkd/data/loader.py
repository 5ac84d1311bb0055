"""Device-resident batching with whole-batch augmentation.

A :class:`BatchLoader` moves a whole :class:`~mutualkd.data.Split` to the
training device once, as uint8, and then builds each batch there with a few tensor
operations: one gather that does random crop and horizontal flip for the whole
batch at once, a cast to float32 and the normalisation ``(x / 255 - mean) / std``.
Nothing is decoded or copied per sample, so loading never stalls a GPU.

Determinism
-----------
Everything random is a pure function of the constructor's ``seed`` and the epoch:

* train order: ``torch.randperm(N)`` from a CPU generator seeded with
  ``seed * 1_000_003 + epoch``; the permutation is truncated to a multiple of
  ``world_size`` and process ``rank`` takes ``perm[rank::world_size]`` (then, with
  ``drop_last``, whole batches only), so every process has the same number of batches;
* augmentation of batch ``b``: a CPU generator seeded from
  ``(seed, epoch, b, rank)`` through :class:`numpy.random.SeedSequence`, so a batch
  does not depend on which batches were drawn before it. Setting ``start_batch = k``
  therefore yields exactly the batches ``k, k+1, ...`` of a full pass (exact resume),
  on any device.

Evaluation (``train=False``) never shuffles, augments or drops: process ``r`` takes
samples ``r, r + W, r + 2W, ...``, so across processes every sample is seen once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from mutualkd.data._base import DatasetInfo, Split
from mutualkd.data.protocol import Loader
from mutualkd.data.sampling import balanced_order, num_balanced_batches
from mutualkd.errors import DataError

__all__ = ["BatchLoader", "augment_batch"]

_PERM_MULT = 1_000_003
_AUG_TAG = 0x6D6B64  # keeps the augmentation seed stream apart from any other use of the same words


def _source_index(
    offset: torch.Tensor, length: int, padding: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source coordinates ``[B, length]`` of a crop at ``offset`` in an image padded by ``padding``.

    ``mode="reflect"`` mirrors coordinates outside the image (like ``F.pad(mode="reflect")``);
    ``mode="zeros"`` clamps them and returns a validity mask for zeroing the padding.
    """
    pos = offset[:, None] + torch.arange(length, device=offset.device)[None, :] - padding
    if mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos > length - 1, 2 * (length - 1) - pos, pos)
        return pos, None
    valid = (pos >= 0) & (pos < length)
    return pos.clamp(0, length - 1), valid


def augment_batch(
    images: torch.Tensor,
    idx: torch.Tensor,
    *,
    padding: int,
    flip: bool,
    pad_mode: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random crop (and optional horizontal flip) of ``images[idx]``, vectorised over the batch.

    ``images`` is uint8 ``[N, C, H, W]`` (on any device), ``idx`` the batch's sample
    indices on the same device. Each sample is cropped back to ``H x W`` from the
    image padded by ``padding`` on every side (``pad_mode`` ``"reflect"`` or
    ``"zeros"``), at offsets drawn uniformly from ``0..2*padding``, and flipped left
    to right with probability 0.5 when ``flip``. The random numbers are drawn on the
    CPU from ``generator`` (so results do not depend on the device). Returns uint8
    ``[B, C, H, W]`` (strided as channels_last).
    """
    if pad_mode not in ("reflect", "zeros"):
        raise ValueError(f"pad_mode must be 'reflect' or 'zeros', not {pad_mode!r}")
    _, _, h, w = images.shape
    b = int(idx.shape[0])
    dev = images.device
    if pad_mode == "reflect":
        padding = min(padding, h - 1, w - 1)  # reflection cannot reach further than the image
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    # one small host-to-device copy for all the batch's random numbers
    oy, ox, flip_i = torch.stack([oy, ox, flips.to(torch.int64)]).to(dev).unbind(0)
    flips = flip_i.bool()

    rows, row_ok = _source_index(oy, h, padding, pad_mode)  # [B, H]
    cols, col_ok = _source_index(ox, w, padding, pad_mode)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    # Advanced indices separated by a slice put the indexed dims first: [B, H, W, C].
    out = images[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    if row_ok is not None and col_ok is not None:
        if flip:
            col_ok = torch.where(flips[:, None], col_ok.flip(1), col_ok)
        mask = (row_ok[:, :, None] & col_ok[:, None, :])[..., None]
        out = out * mask.to(out.dtype)
    return out.permute(0, 3, 1, 2)


class BatchLoader(Loader):
    """Iterates over a :class:`Split` held on ``device``, yielding ``(x, y)`` batches.

    ``x`` is float32 ``[B, C, H, W]`` normalised with ``info.mean``/``info.std``
    (channels_last when ``channels_last``), ``y`` int64 ``[B]``, both on ``device``.

    Call :meth:`set_epoch` before each epoch (the order of epoch ``e`` is a pure
    function of ``(seed, e)``). Set :attr:`start_batch` to ``k`` to skip the first
    ``k`` batches of the current epoch (exact resume); it returns to 0 once an
    epoch has been iterated to the end. :attr:`num_samples` is the number of samples
    this process sees per epoch and ``len(loader)`` its number of batches.

    Augmentation (``info.augment``: ``"crop_flip"`` reflect-pads and flips,
    ``"crop"`` zero-pads and never flips) is applied only when ``train`` and
    ``augment`` are both true.

    Raises :class:`DataError` when ``train`` and ``drop_last`` leave this process no
    whole batch.
    """

    start_batch: int
    num_samples: int

    def __init__(
        self,
        split: Split,
        info: DatasetInfo,
        *,
        batch_size: int,
        device: torch.device | str,
        train: bool,
        augment: bool,
        seed: int,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        views: int = 1,
        per_class: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        images, labels = split.images, split.labels
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"split.images must be uint8 [N, C, H, W], not {images.dtype} {list(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"split.labels must be [N] with N = {images.shape[0]}, not {list(labels.shape)}")
        c = images.shape[1]
        if len(info.mean) != c or len(info.std) != c:
            raise ValueError(f"info.mean/std have {len(info.mean)}/{len(info.std)} entries for {c} channels")
        if info.augment not in ("crop_flip", "crop", "none"):
            raise ValueError(f"unknown augmentation {info.augment!r}; expected crop_flip, crop or none")

        self.device = torch.device(device)
        self.info = info
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.augment = bool(train and augment and info.augment != "none")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.channels_last = bool(channels_last)
        self.views = int(views) if self.train else 1
        self.per_class = per_class if self.train else None  # class-balanced batches (mutualkd.data.sampling)
        self.epoch = 0
        self.start_batch = 0

        self.images = images.to(self.device, dtype=torch.uint8).contiguous()
        self.labels = labels.to(self.device, dtype=torch.int64)
        std = torch.tensor(info.std, dtype=torch.float32)
        mean = torch.tensor(info.mean, dtype=torch.float32)
        # (x / 255 - mean) / std == x * scale + shift
        self._scale = (1.0 / (255.0 * std)).view(1, c, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, c, 1, 1).to(self.device)

        n = int(labels.shape[0])
        self._total = n
        if self.per_class is not None:
            per_rank = num_balanced_batches(labels.numpy(), self.batch_size, self.per_class, self.world_size)
            if per_rank == 0:
                raise DataError(f"the train split has {n} samples: not one class-balanced batch per process",
                                field="data.images_per_class", hint="lower batch_size or images_per_class")
            self.num_samples = per_rank * self.batch_size
        elif self.train:
            per = n // self.world_size
            if self.drop_last:
                per = per // self.batch_size * self.batch_size
                if per == 0:
                    raise DataError(
                        f"the train split has {n} samples, {n // self.world_size} per process, fewer than one"
                        f" batch of {self.batch_size}, so an epoch would have no step",
                        field="data.batch_size",
                        hint="lower batch_size, set drop_last = false, or use a larger train_subset",
                    )
            self.num_samples = per
        else:
            self.num_samples = len(range(self.rank, n, self.world_size))
        self._order_cache: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ public

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        if self.train and self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches ``start_batch .. len(self) - 1`` of the current epoch."""
        n_batches = len(self)
        start = int(self.start_batch)
        if not 0 <= start <= n_batches:
            raise ValueError(f"start_batch {start} is not in 0..{n_batches}")
        order = self._order()
        for b in range(start, n_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._batch(idx, b)
        self.start_batch = 0

    def indices(self) -> torch.Tensor:
        """Sample indices (into the split) this process visits in the current epoch, in order."""
        return self._order().clone()

    # ------------------------------------------------------------------ internals

    def _order(self) -> torch.Tensor:
        if self._order_cache is not None and self._order_cache[0] == self.epoch:
            return self._order_cache[1]
        if self.per_class is not None:
            order = balanced_order(self.labels.cpu().numpy(), self.batch_size, self.per_class, seed=self.seed,
                                   epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        elif self.train:
            gen = torch.Generator().manual_seed(self.seed * _PERM_MULT + self.epoch)
            perm = torch.randperm(self._total, generator=gen)
            perm = perm[: self._total // self.world_size * self.world_size]
            order = perm[self.rank :: self.world_size][: self.num_samples]
        else:
            order = torch.arange(self.rank, self._total, self.world_size)
        order = order.to(self.device)
        self._order_cache = (self.epoch, order)
        return order

    def _aug_generator(self, batch_index: int, view: int = 0) -> torch.Generator:
        # View 0 draws exactly what a single-view run draws; view v > 0 its own stream.
        words = [self.seed % 2**64, self.epoch, batch_index, self.rank, _AUG_TAG] + ([view] if view else [])
        state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state) >> 1)

    def _batch(self, idx: torch.Tensor, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.views == 1:
            return self._view(idx, batch_index, 0), self.labels[idx]
        # Several views: [V, B, C, H, W], each an independent augmentation of the same images.
        return torch.stack([self._view(idx, batch_index, v) for v in range(self.views)]), self.labels[idx]

    def _view(self, idx: torch.Tensor, batch_index: int, view: int) -> torch.Tensor:
        if self.augment:
            raw = augment_batch(
                self.images,
                idx,
                padding=self.info.padding,
                flip=self.info.augment == "crop_flip",
                pad_mode="reflect" if self.info.augment == "crop_flip" else "zeros",
                generator=self._aug_generator(batch_index, view),
            )
        else:
            raw = self.images[idx]
        x = raw.to(torch.float32).mul_(self._scale).add_(self._shift)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)
