"""``cifar10`` / ``cifar100``: CIFAR in torchvision's on-disk layout.

Under ``root`` (default ``./data``): ``cifar-10-batches-py/{data_batch_1..5,test_batch,
batches.meta}`` or ``cifar-100-python/{train,test,meta}``, read from the pickles
by a restricted unpickler that builds arrays, lists, strings and numbers only
(:func:`mutualkd.trust.load_data_pickle`): a file that asks to call anything else is
refused, naming it, and nothing in it runs. ``download = true`` asks
torchvision to fetch the archive when files are missing. Augmentation ``"crop_flip"``
with padding 4 (reflect padding, as in the DML paper).

The per-channel statistics (:data:`CIFAR10_MEAN` ...) are defined here, once; the CIFAR
models' timm default cfgs (:mod:`mutualkd.models._register`) import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mutualkd.data._base import DatasetInfo, Split, resolve_root, torchvision_download
from mutualkd.data.plugin import InMemoryDataset
from mutualkd.errors import DataError
from mutualkd.trust import load_data_pickle

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "cifar10", "cifar100"]


def _unpickle(path: Path, fix: str) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys; DataError (UnsafeFileError) naming the file if it is not one."""
    obj = load_data_pickle(path, fix=fix, what="CIFAR pickle")
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}", hint=fix)
    # Python 2 pickles read with encoding="bytes" have bytes keys; accept str keys too.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batches(folder: Path, names: Sequence[str], spec: _CifarSpec, fix: str) -> Split:
    """The batches ``names`` of ``folder`` as one split, each checked for keys, shape and labels."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for fname in names:
        path = folder / fname
        entry = _unpickle(path, fix)
        if "data" not in entry or spec.label_key not in entry:
            raise DataError(
                f"{path}: missing key {'data' if 'data' not in entry else spec.label_key!r}"
                f" (keys found: {sorted(entry)})",
                hint=fix,
            )
        data = np.asarray(entry["data"])
        try:
            raw_labels = np.asarray(entry[spec.label_key])
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: {spec.label_key!r} is not a list of class indices ({e})", hint=fix) from None
        if raw_labels.dtype.kind not in "iu":  # floats, strings, objects: not class indices
            raise DataError(
                f"{path}: {spec.label_key!r} holds {raw_labels.dtype} values, expected integer class indices", hint=fix
            )
        labs = raw_labels.astype(np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]", hint=fix)
        if labs.shape[0] != data.shape[0]:
            raise DataError(f"{path}: {data.shape[0]} images but {labs.shape[0]} labels", hint=fix)
        if labs.size and (int(labs.min()) < 0 or int(labs.max()) >= spec.num_classes):
            raise DataError(
                f"{path}: labels outside 0..{spec.num_classes - 1} (found {int(labs.min())}..{int(labs.max())})",
                hint=fix,
            )
        images.append(data.reshape(-1, 3, 32, 32))  # rows are the R, G and B planes, each 32x32 row-major
        labels.append(labs)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


# --------------------------------------------------------------------------- the loader


def _load_cifar(spec: _CifarSpec, root: str | None, download: bool) -> tuple[Split, Split, DatasetInfo]:
    """Find the files of ``spec`` under ``root`` (downloading them if asked) and read both splits."""
    base = resolve_root(root)
    folder = base / spec.folder
    needed = spec.files

    def missing_files() -> list[str]:
        return [f for f in needed if not (folder / f).is_file()]

    missing = missing_files()
    if missing and download:
        put = f"put {spec.archive} extracted into {base} so that {folder} holds {', '.join(needed)}"
        torchvision_download(spec.name, spec.tv_class, base, put)
        missing = missing_files()
    if missing:
        listed = "\n  ".join(str(folder / f) for f in missing)
        raise DataError(
            f"{spec.title} not found: {len(missing)} of {len(needed)} files missing under {base}:\n  {listed}",
            hint=(
                f"set download = true in [data] where there is network; or download {spec.archive} and "
                f"extract it into {base} (it holds the folder {spec.folder}/); or point to an existing copy "
                "with --set data.root=PATH"
            ),
        )
    fix = f"replace {folder} with a fresh copy extracted from {spec.archive}"
    meta = _unpickle(folder / spec.meta, fix)
    class_names = meta.get(spec.names_key)
    if class_names is not None and not isinstance(class_names, (list, tuple, np.ndarray)):
        raise DataError(f"{folder / spec.meta}: {spec.names_key!r} is a {type(class_names).__name__}, expected a list"
                        " of class names", hint=fix)
    if class_names is not None and len(class_names) != spec.num_classes:
        raise DataError(f"{folder / spec.meta}: {len(class_names)} class names, expected {spec.num_classes}", hint=fix)
    train = _read_batches(folder, spec.train, spec, fix)
    test = _read_batches(folder, spec.test, spec, fix)
    info = DatasetInfo(spec.name, spec.num_classes, 3, (32, 32), spec.mean, spec.std, "crop_flip", _PADDING)
    return train, test, info


# --------------------------------------------------------------------------- defaults

#: Per-channel statistics of the CIFAR training sets (Krizhevsky 2009), RGB in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_PADDING = 4  # crop padding in pixels at 32x32, as in the DML paper


@dataclass(frozen=True)
class _CifarSpec:
    """One CIFAR variant: its files in torchvision's layout, the pickles' keys, its statistics."""

    name: str
    title: str
    tv_class: str  # torchvision's class that downloads it
    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def files(self) -> list[str]:
        return [*self.train, *self.test, self.meta]


_CIFAR10 = _CifarSpec(
    name="cifar10",
    title="CIFAR-10",
    tv_class="CIFAR10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test=("test_batch",),
    meta="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
_CIFAR100 = _CifarSpec(
    name="cifar100",
    title="CIFAR-100",
    tv_class="CIFAR100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train=("train",),
    test=("test",),
    meta="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)


# The plugins, declared in pyproject.toml's entry-point group mutualkd.datasets.


def _cifar10(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """CIFAR-10: 50000 train and 10000 test images, 3x32x32, 10 classes."""
    return _load_cifar(_CIFAR10, cfg.root, cfg.download)


def _cifar100(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """CIFAR-100: 50000 train and 10000 test images, 3x32x32, 100 fine classes."""
    return _load_cifar(_CIFAR100, cfg.root, cfg.download)


cifar10 = InMemoryDataset(
    _cifar10, ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
)
cifar100 = InMemoryDataset(_cifar100)
