"""Choosing and building a run's data pipeline: ``device`` or ``stream``, from one recipe vocabulary.

* ``device`` (:class:`~mutualkd.data.BatchLoader`): the whole data set decoded once and
  held on the training device; batches are cropped and flipped there. Right for data that
  fits (digits, MNIST, CIFAR: loading never stalls a GPU).
* ``stream`` (:class:`~mutualkd.data.stream.StreamLoader`): worker processes read,
  decode and augment each image with timm's transforms. Right for image folders and tar
  shards of any size (ImageNet), and for ImageNet-style augmentation.

``data.pipeline = "auto"`` keeps every set that fitted before on the device pipeline: the
bundled sets, and image folders whose decoded images fit ``data.memory_budget_gb`` (the
device pipeline needs their ``image_size``, as before); a larger folder and tar shards stream. :func:`choose_pipeline`
says which and why; the run prints it at start.

:func:`resolve_data` resolves the ``[data]`` table once: the pipeline, the data set and
the input spec (:func:`~mutualkd.data.transforms.resolve_input`, for both pipelines: the
device pipeline resizes its splits to the spec's size once). ``mutualkd validate``
(:func:`check_data`) and a run (:func:`build_pipeline`) both start from it.

Mixup, cutmix and label smoothing (:class:`~mutualkd.data.transforms.BatchMixup`) act on
training batches on the device, in both pipelines. A validation split held out of train
(``data.val_fraction``) is evaluated like the test split.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mutualkd.data._base import (
    DatasetInfo,
    Split,
    stratified_subset,
)
from mutualkd.data.datasets import load_splits, resize_splits, split_indices
from mutualkd.data.lookup import dataset_pipeline, dataset_sources
from mutualkd.data.loader import BatchLoader
from mutualkd.data.protocol import Loader  # what the engine iterates over: either pipeline's loader
from mutualkd.data.sources import Source
from mutualkd.data.sampling import check_balanced
from mutualkd.data.stream import StreamDataset, StreamLoader
from mutualkd.data.transforms import BatchMixup, InputConfig, build_mixup, build_transform, resolve_input
from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["Loader", "Pipeline", "StreamPlan", "DevicePlan", "ResolvedData", "build_pipeline", "check_data",
           "check_resolved", "choose_pipeline", "plan_stream", "plan_device", "resolve_data"]


@dataclass
class Pipeline:
    """A run's data: the loaders, the data set's info, the batch mixing, and why this pipeline."""

    kind: str  # "device" or "stream"
    reason: str
    info: DatasetInfo
    train: Loader
    test: Loader
    val: Loader | None = None
    mixup: BatchMixup | None = None
    input: InputConfig | None = None  # the resolved input: size and normalisation of what the peers are fed

    def describe(self, batch_size: int, world: int, num_workers: int) -> str:
        """The pipeline and why, and the global batch (a line of what a run prints at start)."""
        line = (f"{self.kind} pipeline ({self.reason}); global batch {batch_size * world}"
                f" = data.batch_size {batch_size} x {world} process{'es' if world > 1 else ''}")
        if self.kind == "stream":
            c, h, w = self.input.input_size if self.input else (0, 0, 0)
            line += f"; {num_workers} worker(s) per process; input {c}x{h}x{w}"
        return line


@dataclass
class StreamPlan:
    """A stream pipeline's sources, the indices each split reads, and its input config (no loader yet)."""

    info: DatasetInfo
    input: InputConfig
    train: Source
    test: Source
    train_idx: np.ndarray
    val_idx: np.ndarray | None
    test_idx: np.ndarray


@dataclass
class DevicePlan:
    """A device pipeline's splits, decoded and brought to the resolved input size (no loader yet)."""

    info: DatasetInfo
    input: InputConfig
    train: Split
    val: Split | None
    test: Split


@dataclass
class ResolvedData:
    """A recipe's ``[data]`` resolved once: the pipeline and why, the data set, the input spec, the plan.

    What ``mutualkd validate`` checks (:func:`check_data`) and what a run builds its loaders
    from (:func:`build_pipeline`): both come from :func:`resolve_data`.
    """

    kind: str
    reason: str
    plan: DevicePlan | StreamPlan

    @property
    def info(self) -> DatasetInfo:
        return self.plan.info

    @property
    def input(self) -> InputConfig:
        return self.plan.input


# --------------------------------------------------------------------------- choosing


def choose_pipeline(cfg: DataConfig) -> tuple[str, str]:
    """``(kind, reason)``: the pipeline ``cfg`` asks for, or the one ``auto`` picks, and why."""
    if cfg.pipeline != "auto":
        return cfg.pipeline, f'data.pipeline = "{cfg.pipeline}"'
    return dataset_pipeline(cfg)  # the data set plugin's choice (image folders: by data.memory_budget_gb)


# --------------------------------------------------------------------------- the stream plan


def _arange_or(idx: torch.Tensor | None, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) if idx is None else idx.numpy().astype(np.int64)


def plan_stream(cfg: DataConfig, *, seed: int, peers: Mapping[str, str]) -> StreamPlan:
    """Sources, split indices and the input config of a stream pipeline; reads no image.

    ``peers`` maps each peer's recipe name to its timm model (for ``config_from``).
    """
    src = dataset_sources(cfg)  # the data set plugin's map-style splits
    train_src, test_src, name = src.train, src.test, cfg.dataset
    native, mean, std = src.image_size, src.mean, src.std
    inp = resolve_input(cfg, dataset=name, in_chans=train_src.in_chans, native_size=native, mean=mean, std=std,
                        peers=peers)
    train_idx, val_idx = split_indices(torch.from_numpy(train_src.labels), cfg, seed=seed)
    test_idx = None
    if cfg.test_subset is not None:
        test_idx = stratified_subset(torch.from_numpy(test_src.labels), cfg.test_subset, seed=0)
    info = DatasetInfo(name, train_src.num_classes, train_src.in_chans, inp.input_size[1:], inp.mean, inp.std,
                       "none", 0)
    return StreamPlan(info, inp, train_src, test_src, _arange_or(train_idx, len(train_src)),
                      None if val_idx is None else _arange_or(val_idx, len(train_src)),
                      _arange_or(test_idx, len(test_src)))


def plan_device(cfg: DataConfig, *, seed: int, peers: Mapping[str, str]) -> DevicePlan:
    """The device pipeline's splits at the resolved input size, with the subsets the recipe asks for.

    The data set is read at its native size (an image folder: at ``image_size``, which it
    needs to decode), the input spec is resolved from that native info and the recipe
    (:func:`~mutualkd.data.transforms.resolve_input`, the stream pipeline's resolution too),
    and every split is resized once to the spec's size (bilinear, antialiased), the crop
    padding scaled with it.
    """
    train, val, test, info = load_splits(cfg, seed=seed, resize=False)
    inp = resolve_input(cfg, dataset=info.name, in_chans=info.in_chans, native_size=info.image_size,
                        mean=info.mean, std=info.std, peers=peers)
    _, h, w = inp.input_size
    if (h, w) != info.image_size:
        if h != w:
            raise DataError(f"the device pipeline resizes to square images; the resolved input is {h}x{w}",
                            field="data.image_size", hint="set data.image_size, or data.pipeline = \"stream\"")
        train, val, test, info = resize_splits(train, val, test, info, h)
    info = dataclasses.replace(info, mean=inp.mean, std=inp.std)
    return DevicePlan(info, inp, train, val, test)


def resolve_data(cfg: DataConfig, *, seed: int, peers: Mapping[str, str] | None = None) -> ResolvedData:
    """The pipeline :func:`choose_pipeline` picks and its plan, with the one resolved input spec."""
    kind, reason = choose_pipeline(cfg)
    if kind == "device":
        return ResolvedData(kind, reason, plan_device(cfg, seed=seed, peers=peers or {}))
    return ResolvedData(kind, reason, plan_stream(cfg, seed=seed, peers=peers or {}))


# --------------------------------------------------------------------------- building


def _clamped(cfg: DataConfig, n_train: int, n_test: int) -> str:
    """A note for the start line when train_subset or test_subset asks for more images than the split has."""
    notes = [f"note: data.{key} = {asked} is more than the {n} images of the {split} split, which are all used"
             for key, asked, n, split in (("train_subset", cfg.train_subset, n_train, "train"),
                                          ("test_subset", cfg.test_subset, n_test, "test"))
             if asked is not None and asked > n]
    return "".join(f"; {n}" for n in notes)




def build_pipeline(cfg: DataConfig, *, seed: int, device: torch.device | str, rank: int = 0, world_size: int = 1,
                   channels_last: bool = False, peers: Mapping[str, str] | None = None, views: int = 1) -> Pipeline:
    """The loaders of the pipeline :func:`choose_pipeline` picks, for process ``rank`` of ``world_size``.

    ``views > 1``: the train loader yields ``x`` as ``[views, B, C, H, W]``, each view an
    independent augmentation of the same images (view 0 is the one a single-view run draws).
    """
    resolved = resolve_data(cfg, seed=seed, peers=peers)
    kind, reason, plan = resolved.kind, resolved.reason, resolved.plan
    common: dict[str, Any] = dict(device=device, rank=rank, world_size=world_size, channels_last=channels_last)
    if isinstance(plan, DevicePlan):
        train, val, test, info = plan.train, plan.val, plan.test, plan.info
        reason += _clamped(cfg, len(train), len(test))
        pipe = Pipeline(
            kind, reason, info,
            BatchLoader(train, info, batch_size=cfg.batch_size, train=True, augment=cfg.augment, seed=seed,
                        drop_last=cfg.drop_last, views=views, per_class=cfg.images_per_class, **common),
            BatchLoader(test, info, batch_size=cfg.eval_batch_size, train=False, augment=False, seed=seed, **common),
        )
        if val is not None:
            pipe.val = BatchLoader(val, info, batch_size=cfg.eval_batch_size, train=False, augment=False, seed=seed,
                                   **common)
        pipe.input = plan.input
        pipe.mixup = build_mixup(cfg, info.num_classes, seed=seed)
        return pipe

    stream: dict[str, Any] = dict(seed=seed, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                                  skip_corrupt=cfg.skip_corrupt, **common)
    train_tf = build_transform(cfg, plan.input, dataset=plan.info.name, train=True)
    eval_tf = build_transform(cfg, plan.input, dataset=plan.info.name, train=False)

    def eval_loader(source: Source, idx: np.ndarray) -> StreamLoader:
        ds = StreamDataset(source, idx, eval_tf, seed=seed, train=False)
        return StreamLoader(ds, batch_size=cfg.eval_batch_size, train=False, **stream)

    reason += _clamped(cfg, len(plan.train_idx), len(plan.test_idx))
    train_ds = StreamDataset(plan.train, plan.train_idx, train_tf, seed=seed, train=True, views=views)
    train = StreamLoader(train_ds, batch_size=cfg.batch_size, train=True, drop_last=cfg.drop_last,
                         per_class=cfg.images_per_class, **stream)
    notes = getattr(plan.train, "notes", [])
    if notes:  # damaged tar shards, skip_corrupt: their unreachable members count as skipped every epoch
        train.lost = int(getattr(plan.train, "lost", 0))
        reason += f"; data.skip_corrupt: {'; '.join(notes)}"
    pipe = Pipeline(
        kind, reason, plan.info,
        train,
        eval_loader(plan.test, plan.test_idx),
        input=plan.input,
    )
    if plan.val_idx is not None:
        pipe.val = eval_loader(plan.train, plan.val_idx)
    pipe.mixup = build_mixup(cfg, plan.info.num_classes, seed=seed)
    return pipe


def check_data(cfg: DataConfig, *, seed: int, peers: Mapping[str, str]) -> tuple[DatasetInfo, str, str]:
    """What ``mutualkd validate`` checks of the data: ``(info, kind, reason)``, building no loader.

    The same resolution as a run's (:func:`resolve_data`); :func:`check_resolved` gives all of it.
    """
    resolved = check_resolved(cfg, seed=seed, peers=peers)
    return resolved.info, resolved.kind, resolved.reason


def check_resolved(cfg: DataConfig, *, seed: int, peers: Mapping[str, str]) -> ResolvedData:
    """:func:`resolve_data`, then what the loaders would check of it (transforms, class-balanced batches)."""
    resolved = resolve_data(cfg, seed=seed, peers=peers)
    plan = resolved.plan
    if isinstance(plan, DevicePlan):
        labels = plan.train.labels.numpy()
    else:
        build_transform(cfg, plan.input, dataset=plan.info.name, train=True)
        labels = np.asarray(plan.train.labels)[plan.train_idx]
    if cfg.images_per_class is not None:  # the loaders' own check, without building them
        check_balanced(labels, cfg.batch_size, cfg.images_per_class)
    return resolved
