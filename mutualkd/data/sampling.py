"""Class-balanced batches: every batch holds ``m`` images of each of its ``batch_size / m`` classes.

Contrastive methods with label-defined positives (MCL's VCL and ICL) need every anchor to have
another image of its class in the batch; ``data.images_per_class = m`` asks for such batches in
either pipeline, for any strategy (a fair baseline uses the same batches).

Each epoch's batches are a pure function of ``(seed, epoch)``, like the shuffled order they
replace, so a resume at batch ``k`` continues the same sequence:

1. each class's images are shuffled and cut into groups of ``m`` (the rest is left out);
2. batches are filled one at a time with a group of each of the ``k = batch_size / m`` classes
   that have the most groups left (ties broken at random), which reaches the largest number of
   batches of ``k`` distinct classes the groups allow;
3. the batches are shuffled, and process ``r`` of ``W`` takes batches ``r, r + W, ...``.
"""

from __future__ import annotations

import numpy as np
import torch

from mutualkd.errors import DataError

__all__ = ["balanced_batches", "balanced_order", "check_balanced", "num_balanced_batches", "rank_batches"]

_MULT = 1_000_003
_TAG = 0x62616C


def check_balanced(labels: np.ndarray, batch_size: int, per_class: int) -> int:
    """The number of classes per batch, or a DataError saying which setting to change."""
    if batch_size % per_class:
        near = sorted({max(batch_size // per_class, 1) * per_class, (batch_size // per_class + 1) * per_class})
        raise DataError(f"batch_size {batch_size} is not a multiple of images_per_class {per_class}",
                        field="data.images_per_class",
                        hint=f"use a batch_size that is a multiple of {per_class} (e.g. {' or '.join(map(str, near))})")
    k = batch_size // per_class
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    usable = int((counts >= per_class).sum())
    if usable == 0:
        raise DataError(
            f"images_per_class is {per_class} but no class of the train split has {per_class} images"
            f" (the largest has {int(counts.max()) if counts.size else 0})",
            field="data.images_per_class",
            hint="lower images_per_class, or train on more images (data.train_subset)",
        )
    if k > usable:
        raise DataError(
            f"a batch of {batch_size} with {per_class} images per class needs {k} classes with at least {per_class}"
            f" images each; the train split has {usable}",
            field="data.images_per_class",
            hint=f"lower batch_size to at most {usable * per_class}, or raise images_per_class to at least"
            f" {-(-batch_size // max(usable, 1))}",
        )
    return k


def _rounds(groups: np.ndarray, k: int) -> int:
    """The most batches of ``k`` distinct classes: the largest t with sum_c min(g_c, t) >= k t."""
    lo, hi = 0, int(groups.sum()) // k
    while lo < hi:
        t = (lo + hi + 1) // 2
        if int(np.minimum(groups, t).sum()) >= k * t:
            lo = t
        else:
            hi = t - 1
    return lo


def num_balanced_batches(labels: np.ndarray, batch_size: int, per_class: int, world_size: int = 1) -> int:
    """Batches per epoch and process (the same every epoch: it depends on the class counts only)."""
    k = check_balanced(labels, batch_size, per_class)
    groups = np.bincount(np.asarray(labels, dtype=np.int64)) // per_class
    return _rounds(groups, k) // world_size


def balanced_batches(labels: np.ndarray, batch_size: int, per_class: int, *, seed: int, epoch: int) -> np.ndarray:
    """All class-balanced batches of an epoch as a ``[n_batches, batch_size]`` array of indices into ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    k = check_balanced(labels, batch_size, per_class)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, int(epoch), _TAG]))
    groups: list[list[np.ndarray]] = []
    for c in range(int(labels.max()) + 1 if labels.size else 0):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx) // per_class
        groups.append([idx[i * per_class:(i + 1) * per_class] for i in range(n)])
    left = np.array([len(g) for g in groups], dtype=np.int64)
    n_batches = _rounds(left, k)
    batches = np.empty((n_batches, batch_size), dtype=np.int64)
    for b in range(n_batches):
        # the k classes with the most groups left; a random key breaks ties
        chosen = np.lexsort((rng.random(len(left)), -left))[:k]
        batches[b] = np.concatenate([groups[c][len(groups[c]) - left[c]] for c in chosen])
        left[chosen] -= 1
    return batches[rng.permutation(n_batches)]


def rank_batches(batches: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Process ``rank``'s share: batches ``rank, rank + W, ...``, the same number on every process."""
    per = len(batches) // world_size
    return batches[rank::world_size][:per]


def balanced_order(labels: np.ndarray, batch_size: int, per_class: int, *, seed: int, epoch: int, rank: int,
                   world_size: int) -> torch.Tensor:
    """This process's epoch order (batches laid end to end), as the loaders' ``_order`` returns it."""
    batches = rank_batches(balanced_batches(labels, batch_size, per_class, seed=seed * _MULT, epoch=epoch),
                           rank, world_size)
    return torch.from_numpy(batches.reshape(-1).copy())
