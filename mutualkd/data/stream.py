"""The stream pipeline: a torch ``DataLoader`` with worker processes over a :mod:`.sources` source.

For data that does not fit in memory (an ImageNet folder, tar shards) or that needs
per-image augmentation (RandomResizedCrop, RandAugment): images are read and decoded by
``data.num_workers`` worker processes, transformed by timm's transforms
(:mod:`.transforms`), collated into pinned memory and copied to the device while the
previous batch trains. Only the list of file names is held; memory does not grow with
the number of images.

:class:`StreamLoader` has the interface of :class:`~mutualkd.data.BatchLoader`
(``set_epoch``, ``start_batch``, ``num_samples``, ``len``, ``indices``), so the engine
drives both the same way.

Determinism
-----------
* order: the train order of epoch ``e`` is ``torch.randperm(N)`` seeded with
  ``seed * 1_000_003 + e``, truncated to a multiple of ``world_size``; process ``rank``
  takes ``perm[rank::world_size]``: the device pipeline's order, so both pipelines see the
  same samples in the same order. Evaluation takes samples ``rank, rank + W, ...``: every
  sample once across the processes;
* augmentation: every random draw of sample ``i`` in epoch ``e`` is seeded from
  ``(seed, e, i)`` (:func:`~mutualkd.data.transforms.seeded`), in whichever worker it runs,
  so the batches do not depend on ``num_workers``, and ``start_batch = k`` yields exactly
  the batches ``k, k+1, ...`` of the full pass without reading the first ``k`` (exact resume).

Bad data
--------
An image that cannot be read or decoded does not raise inside the worker (that would
print the worker's traceback); the worker hands back its file name and the reason, and
the loader stops with a :class:`~mutualkd.errors.DataError` naming the file and the fix,
or, with ``skip_corrupt``, leaves it out of the batch and counts it in :attr:`skipped`.
A worker process that dies (killed, out of memory) is one ``DataError``, not a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mutualkd.data.protocol import Loader
from mutualkd.data.sources import Source
from mutualkd.data.transforms import seeded
from mutualkd.data.sampling import balanced_order, num_balanced_batches
from mutualkd.errors import DataError

__all__ = ["ShardSampler", "StreamDataset", "StreamLoader", "Unreadable"]

_PERM_MULT = 1_000_003  # as in mutualkd.data.loader: the same order in both pipelines
_AUG_TAG = 0x737472  # keeps the per-sample augmentation seeds apart from other uses of the same words


class Unreadable(NamedTuple):
    """What a worker hands back for an image it could not read: its index, file and the reason."""

    index: int
    name: str
    reason: str


class StreamDataset(Dataset[Any]):
    """The samples ``indices`` of ``source``, transformed; keys are ``(epoch, position)`` pairs.

    The epoch travels with each key (from :class:`ShardSampler`) because persistent worker
    processes hold their own copy of the dataset: no attribute set later reaches them.
    """

    def __init__(self, source: Source, indices: np.ndarray, transform: Any, *, seed: int, train: bool,
                 views: int = 1) -> None:
        self.views = int(views) if train else 1
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = int(seed)
        self.train = bool(train)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int] | Unreadable:
        epoch, pos = key
        i = int(self.indices[pos])
        try:
            img = self.source.open(i)
        except MemoryError:
            raise
        except Exception as e:  # PIL reports bad files with many types (OSError, ValueError, SyntaxError, ...)
            return Unreadable(i, self.source.name(i), f"{type(e).__name__}: {e}")
        if self.train:
            with seeded([self.seed, epoch, i, _AUG_TAG]):
                x = self.transform(img)
            if self.views > 1:  # [V, C, H, W]: view 0 as a single-view run draws it, then one stream per view
                extra = []
                for v in range(1, self.views):
                    with seeded([self.seed, epoch, i, _AUG_TAG, v]):
                        extra.append(self.transform(img))
                x = torch.stack([x, *extra])
        else:
            x = self.transform(img)
        return x, int(self.source.labels[i])


class ShardSampler:
    """Batches of ``(epoch, position)`` keys: this process's share of an epoch, from ``start_batch`` on."""

    def __init__(self, n: int, *, batch_size: int, train: bool, seed: int, drop_last: bool, rank: int,
                 world_size: int, labels: np.ndarray | None = None, per_class: int | None = None) -> None:
        self.n, self.batch_size, self.train, self.seed = int(n), int(batch_size), bool(train), int(seed)
        self.drop_last, self.rank, self.world_size = bool(drop_last), int(rank), int(world_size)
        self.epoch = 0
        self.start_batch = 0
        self.per_class = per_class if train else None  # class-balanced batches (mutualkd.data.sampling)
        self.labels = labels
        if self.per_class is not None:
            assert labels is not None
            self.num_samples = num_balanced_batches(labels, batch_size, self.per_class, world_size) * self.batch_size
        elif self.train:
            per = self.n // self.world_size
            self.num_samples = per // self.batch_size * self.batch_size if self.drop_last else per
        else:
            self.num_samples = len(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        if self.train and self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def order(self) -> np.ndarray:
        """Positions (into the dataset) this process visits in the current epoch, in order."""
        if not self.train:
            return np.arange(self.rank, self.n, self.world_size, dtype=np.int64)
        if self.per_class is not None:
            return balanced_order(self.labels, self.batch_size, self.per_class, seed=self.seed, epoch=self.epoch,
                                  rank=self.rank, world_size=self.world_size).numpy()
        gen = torch.Generator().manual_seed(self.seed * _PERM_MULT + self.epoch)
        perm = torch.randperm(self.n, generator=gen)[: self.n // self.world_size * self.world_size]
        return perm[self.rank :: self.world_size][: self.num_samples].numpy()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, bs = self.order(), self.batch_size
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, int(p)) for p in order[b * bs : (b + 1) * bs]]


def _collate(samples: Sequence[tuple[Tensor, int] | Unreadable]) -> tuple[Tensor, Tensor, list[Unreadable]]:
    """Stack the readable samples; the unreadable ones travel beside them (see the module docstring)."""
    bad = [s for s in samples if isinstance(s, Unreadable)]
    good = [s for s in samples if not isinstance(s, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    x = torch.stack([s[0] for s in good])
    if x.ndim == 5:  # several views per sample: [B, V, C, H, W] -> [V, B, C, H, W]
        x = x.transpose(0, 1)
    y = torch.tensor([s[1] for s in good], dtype=torch.int64)
    return x, y, bad


def _worker_init(_: int) -> None:
    # Workers decode and augment one image at a time: intra-op threads would only compete
    # with the training process (and with each other) for the cores.
    torch.set_num_threads(1)


class StreamLoader(Loader):
    """Iterates over a :class:`StreamDataset` with worker processes, yielding ``(x, y)`` on ``device``.

    ``x`` float32 ``[B, C, H, W]`` normalised by the transform (channels_last when asked),
    ``y`` int64 ``[B]``. Same contract as :class:`~mutualkd.data.BatchLoader`; raises
    :class:`DataError` when ``train`` and ``drop_last`` leave this process no whole batch.
    """

    def __init__(self, dataset: StreamDataset, *, batch_size: int, device: torch.device | str, train: bool,
                 seed: int, drop_last: bool = True, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 num_workers: int = 2, prefetch_factor: int = 2, skip_corrupt: bool = False,
                 per_class: int | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        self.dataset = dataset
        self.device = torch.device(device)
        self.train = bool(train)
        self.batch_size = int(batch_size)
        self.channels_last = bool(channels_last)
        self.skip_corrupt = bool(skip_corrupt)
        self.num_workers = int(num_workers)
        #: Unreadable images left out since the counter was last reset (``skip_corrupt``).
        self.skipped = 0
        labels = np.asarray(dataset.source.labels)[dataset.indices] if per_class is not None and train else None
        #: Images of the data set no reader reaches (members of a damaged tar shard, ``skip_corrupt``):
        #: added to :attr:`skipped` at the start of every epoch, by process 0 only.
        self.lost = 0
        self.sampler = ShardSampler(len(dataset), batch_size=batch_size, train=train, seed=seed, drop_last=drop_last,
                                    rank=rank, world_size=world_size, labels=labels, per_class=per_class)
        if self.train and drop_last and self.sampler.num_samples == 0:
            n = len(dataset)
            raise DataError(
                f"the train split has {n} samples, {n // world_size} per process, fewer than one"
                f" batch of {batch_size}, so an epoch would have no step",
                field="data.batch_size",
                hint="lower batch_size, set drop_last = false, or use a larger train_subset",
            )
        workers = self.num_workers > 0
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=self.num_workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=workers,
            prefetch_factor=prefetch_factor if workers else None, worker_init_fn=_worker_init if workers else None,
        )

    # ------------------------------------------------------------------ the BatchLoader interface
    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    @property
    def start_batch(self) -> int:
        return self.sampler.start_batch

    @start_batch.setter
    def start_batch(self, k: int) -> None:
        if not 0 <= int(k) <= len(self):
            raise ValueError(f"start_batch {k} is not in 0..{len(self)}")
        self.sampler.start_batch = int(k)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        self.sampler.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def indices(self) -> Tensor:
        """Sample indices (into the source) this process visits in the current epoch, in order."""
        return torch.from_numpy(self.dataset.indices[self.sampler.order()])

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))

    def close(self) -> None:
        """End the worker processes now (they also end with the loader)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield batches ``start_batch .. len(self) - 1`` of the current epoch."""
        batch = self.sampler.start_batch
        if batch == 0 and self.sampler.rank == 0:
            self.skipped += self.lost
        batches = iter(self.loader)
        while True:
            try:
                x, y, bad = next(batches)
            except StopIteration:
                break
            except RuntimeError as e:
                if str(e).startswith("DataLoader worker"):
                    raise self._worker_died(e) from None
                raise
            if bad:
                self._unreadable(bad, batch, x.shape[0])
            batch += 1
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.ndim == 4:  # (views, [V, B, C, H, W], stay contiguous)
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
        self.sampler.start_batch = 0

    def _unreadable(self, bad: list[Unreadable], batch: int, readable: int) -> None:
        first = bad[0]
        more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
        if not self.skip_corrupt:
            raise DataError(
                f"{first.name}: cannot be read as an image ({first.reason}){more}",
                field="data.skip_corrupt",
                hint="replace or remove the file, or set data.skip_corrupt = true to skip unreadable images"
                " (each is counted in metrics.jsonl as skipped_images)",
            )
        if readable == 0:
            raise DataError(f"every image of batch {batch} is unreadable, e.g. {first.name} ({first.reason})",
                            hint="check the data set's files; so many bad files is not a few corrupt images")
        self.skipped += len(bad)

    def _worker_died(self, e: RuntimeError) -> DataError:
        cause = str(e).splitlines()[0].rstrip(". ")
        return DataError(
            f"a data-loading worker process died: {cause}",
            field="data.num_workers",
            hint="a worker killed by the system is usually out of memory: lower data.num_workers,"
            " data.prefetch_factor or data.batch_size; data.num_workers = 0 loads in the training process",
        )
