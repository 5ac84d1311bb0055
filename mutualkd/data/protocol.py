"""The loader contract: what the engine asks of a training or evaluation loader.

Two loaders satisfy it: :class:`~mutualkd.data.loader.BatchLoader` (a small data set held on
the device) and :class:`~mutualkd.data.stream.StreamLoader` (images decoded by worker
processes). The trainer and its checkpoints are typed against :class:`Loader` only, so a
third pipeline needs nothing from the engine but this.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Loader"]


@runtime_checkable
class Loader(Protocol):
    """Batches of one process's share of a split, in an order that is a pure function of ``(seed, epoch)``.

    Iterating yields ``(x, y)`` on the loader's device: ``x`` float32 ``[B, C, H, W]``
    normalised (``[V, B, C, H, W]`` with several views), ``y`` int64 ``[B]``. :meth:`set_epoch`
    picks the epoch whose order the next iteration uses; ``start_batch = k`` makes it begin at
    batch ``k`` (an exact resume) and returns to 0 once an epoch is iterated to the end.
    ``len(loader)`` is this process's batches per epoch, ``num_samples`` its samples, and
    :meth:`indices` the sample indices it visits this epoch, in order.

    ``skipped`` counts the unreadable images left out since the engine last reset it (None:
    a loader that never leaves one out). :meth:`state_dict` / :meth:`load_state_dict` carry
    what a resume needs besides the position (by default nothing).
    """

    start_batch: int
    num_samples: int
    skipped: int | None = None

    def set_epoch(self, epoch: int) -> None:
        ...

    def __len__(self) -> int:
        ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        ...

    def indices(self) -> Tensor:
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides the position; nothing by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; nothing to restore by default."""
