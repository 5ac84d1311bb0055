"""Where the stream pipeline reads samples from: timm's readers, or a split held in memory.

A source is a list of samples that can each be opened on their own, in any process:

* :class:`ReaderSource` wraps one of timm's readers, made by
  ``timm.data.create_dataset``: ``ReaderImageFolder`` for an image folder in ImageNet
  layout (``<split>/<class>/<image>``), ``ReaderImageInTar`` for tar shards (one
  ``.tar`` file, or a folder of ``.tar`` shards whose members are ``<class>/<image>``).
  Only the list of file names and labels is held; each image is read and decoded when
  it is asked for;
* :class:`SplitSource` serves a :class:`~mutualkd.data.Split` (digits, MNIST, CIFAR, ...)
  as PIL images, so that the same recipe runs through either pipeline.

:func:`folder_sources` and :func:`tar_sources` find the splits under ``[data] root`` and
check that train and the evaluation split share their classes, raising
:class:`~mutualkd.errors.DataError` naming what is missing and where.
"""

from __future__ import annotations

from pathlib import Path
import tarfile
from typing import Any, Protocol

import numpy as np

from mutualkd.data._base import Split
from mutualkd.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ReaderSource",
    "Source",
    "SplitSource",
    "count_folder_images",
    "eval_split_dir",
    "folder_sources",
    "tar_sources",
]

#: File suffixes read as images in an image folder (timm's ``get_img_extensions``).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_EVAL_NAMES = ("val", "test", "validation")  # the evaluation split's folder, in the order looked for


class Source(Protocol):
    """Samples that can be opened one by one: ``labels[i]`` and :meth:`open`; :meth:`name` for messages."""

    labels: np.ndarray
    num_classes: int
    in_chans: int

    def __len__(self) -> int: ...

    def open(self, i: int) -> Any:
        """Sample ``i`` as a decoded PIL image; raises when the file cannot be read or decoded."""
        ...

    def name(self, i: int) -> str:
        """The file (or sample) that ``i`` is, for an error message."""
        ...


class ReaderSource:
    """A timm reader's samples, decoded with PIL in the process that asks for them."""

    in_chans = 3
    #: Members of damaged tar shards that no reader reaches (``skip_corrupt``): left out of every epoch.
    lost = 0
    #: What was found damaged (``skip_corrupt``), one line each, for the console.
    notes: list[str] = []

    def __init__(self, reader: Any, class_to_idx: dict[str, int]) -> None:
        self.reader = reader
        self.class_to_idx = dict(class_to_idx)
        self.num_classes = len(self.class_to_idx)
        targets = getattr(reader, "targets", None)
        if targets is None:
            targets = [t for _, t in reader.samples]
        self.labels = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def open(self, i: int) -> Any:
        from PIL import Image

        handle, _ = self.reader[i]
        try:
            img = Image.open(handle)
            return img.convert("RGB")  # decodes the pixels, so a truncated file fails here
        finally:
            close = getattr(handle, "close", None)
            if close is not None:
                close()

    def name(self, i: int) -> str:
        row = self.reader.samples[i]
        if len(row) == 3 and isinstance(row[0], tarfile.TarInfo):  # ReaderImageInTar: (member, shard, sub-tar)
            shard = Path(self.reader.root) / row[1] if row[1] else Path(self.reader.root)
            return f"{shard} (member {row[0].name})"
        return str(self.reader._filename(i, absolute=True))


class SplitSource:
    """A split held in memory (uint8 ``[N, C, H, W]``), served as PIL images (``L`` or ``RGB``)."""

    def __init__(self, split: Split, num_classes: int, what: str) -> None:
        self.images = split.images
        self.labels = split.labels.numpy().astype(np.int64)
        self.num_classes = int(num_classes)
        self.in_chans = int(split.images.shape[1])
        self.what = what

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def open(self, i: int) -> Any:
        from PIL import Image

        pixels = self.images[i].numpy()
        if pixels.shape[0] == 1:
            return Image.fromarray(pixels[0], mode="L")
        return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")

    def name(self, i: int) -> str:
        return f"{self.what} sample {i}"


# --------------------------------------------------------------------------- finding the splits


def _root(root: str | None, dataset: str, layout: str) -> Path:
    if root is None:
        raise DataError(
            f"{dataset} needs the folder that holds its splits",
            field="data.root",
            hint=f"set root in [data] or --set data.root=PATH; it must hold {layout}",
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(
            f"{dataset}: the folder {base} does not exist",
            field="data.root",
            hint=f"put the data set there ({layout}) or point --set data.root=PATH at it",
        )
    return base


def eval_split_dir(base: Path, suffix: str = "") -> Path | None:
    """``base/val`` (or ``test``, ``validation``), with ``suffix`` (e.g. ``.tar``); None if none exists."""
    for n in _EVAL_NAMES:
        p = base / f"{n}{suffix}"
        if p.exists():
            return p
    return None


def _check_classes(train: dict[str, int], other: dict[str, int], train_at: Path, other_at: Path) -> None:
    """Every class of the evaluation split is one of train's (which numbers them)."""
    unknown = sorted(set(other) - set(train))
    if unknown:
        raise DataError(
            f"{other_at} has classes that {train_at} lacks: {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""),
            hint="give both splits the same class folders (train numbers the classes)",
        )


def folder_sources(root: str | None) -> tuple[ReaderSource, ReaderSource]:
    """Train and evaluation sources of an image folder ``root/{train,val}/<class>/<image>``."""
    from timm.data import create_dataset

    layout = "train/<class>/<image> and val/<class>/<image> (val/ may be named test/)"
    base = _root(root, "image_folder", layout)
    train_dir, eval_dir = base / "train", eval_split_dir(base)
    missing = [str(p) for p, ok in ((train_dir, train_dir.is_dir()), (base / "val", eval_dir is not None)) if not ok]
    if missing:
        raise DataError(
            f"image_folder: missing folder(s) {', '.join(missing)}" + (" (or test/)" if eval_dir is None else ""),
            field="data.root",
            hint=f"lay out {base}/{layout}",
        )
    assert eval_dir is not None
    def dataset(at: Path, class_map: dict[str, int] | None = None) -> Any:
        try:
            return create_dataset("", root=str(at), search_split=False, class_map=class_map)
        except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
            raise DataError(f"image_folder: no images under {at} ({e})",
                            hint=f"put images ({', '.join(sorted(IMAGE_EXTENSIONS))}) into {at}/<class>/") from None

    train_ds = dataset(train_dir)
    classes = dict(train_ds.reader.class_to_idx)
    _check_classes(classes, dict(dataset(eval_dir).reader.class_to_idx), train_dir, eval_dir)
    eval_ds = dataset(eval_dir, classes)
    return ReaderSource(train_ds.reader, classes), ReaderSource(eval_ds.reader, classes)


def _tar_split(base: Path, name: str) -> Path | None:
    """``base/<name>.tar`` or the folder ``base/<name>`` of ``.tar`` shards."""
    if (base / f"{name}.tar").is_file():
        return base / f"{name}.tar"
    if (base / name).is_dir() and any((base / name).glob("*.tar")):
        return base / name
    return None


def _shard_damage(shard: Path) -> tuple[str, int, int] | None:
    """Where ``shard`` stops being readable: (last member read, byte offset, members beyond it); None if whole.

    tarfile ends its listing silently at the first header it cannot read, so the bytes after
    the listing's end are checked: a whole archive has only zero padding there. The members
    beyond the damage are counted by a second pass that skips unreadable blocks (``ignore_zeros``).
    """
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
        end = tf.offset
    with open(shard, "rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 16):
            if chunk.strip(b"\0"):
                break
        else:
            return None
    with tarfile.open(shard, ignore_zeros=True) as tf:
        beyond = sum(1 for m in tf.getmembers() if m.isfile()) - sum(1 for m in members if m.isfile())
    return (members[-1].name if members else "(none: the first header)"), end, max(beyond, 0)


def _check_shards(at: Path, skip_corrupt: bool) -> tuple[list[str], int]:
    """Every shard of ``at`` read to its end: a DataError naming a damaged one, or (``skip_corrupt``) what was
    found, one line per shard, and the number of members out of reach."""
    notes: list[str] = []
    lost = 0
    fix = "replace the shard with a good copy"
    for shard in sorted(at.glob("*.tar")) if at.is_dir() else [at]:
        try:
            damage = _shard_damage(shard)
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"{shard}: not a readable tar archive ({type(e).__name__}: {e})",
                            hint=f"{fix}, or remove it") from None
        if damage is None:
            continue
        after, offset, beyond = damage
        what = (f"{shard}: damaged after member {after} (at byte {offset} of {shard.stat().st_size}); tar cannot read"
                f" past it, so {beyond or 'an unknown number of'} member(s) after it are out of reach")
        if not skip_corrupt:
            raise DataError(what, field="data.skip_corrupt",
                            hint=f"{fix}, or set data.skip_corrupt = true to train without its unreadable part"
                            " (counted in metrics.jsonl as skipped_images)")
        lost += beyond
        notes.append(what)
    return notes, lost


def tar_sources(root: str | None, skip_corrupt: bool = False) -> tuple[ReaderSource, ReaderSource]:
    """Train and evaluation sources of tar shards under ``root`` (timm's ``ReaderImageInTar``).

    Every shard is checked to its end first (:func:`_shard_damage`): a damaged one is a
    DataError naming it and the last member read, or, with ``skip_corrupt``, its unreachable
    members are counted in each source's ``lost`` (and the train source's ``notes`` say which).
    """
    from timm.data import ImageDataset
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar

    layout = "train.tar and val.tar, or folders train/ and val/ of .tar shards whose members are <class>/<image>"
    base = _root(root, "image_tar", layout)
    train_at = _tar_split(base, "train")
    eval_at = next((p for n in _EVAL_NAMES if (p := _tar_split(base, n)) is not None), None)
    if train_at is None or eval_at is None:
        what = ", ".join(n for n, p in (("train", train_at), ("val", eval_at)) if p is None)
        raise DataError(f"image_tar: no {what} shards under {base}", field="data.root", hint=f"put {layout} there")
    train_notes, train_lost = _check_shards(train_at, skip_corrupt)
    eval_notes, eval_lost = _check_shards(eval_at, skip_corrupt)
    try:
        # create_dataset takes a single .tar file to timm's ReaderImageInTar but a folder to
        # the folder reader, so a folder of shards gets ReaderImageInTar as its reader.
        def dataset(at: Path, class_map: dict[str, int] | None = None) -> Any:
            # cache_tarinfo=False: no index pickle is read from (or written into) the data folder.
            return ImageDataset(str(at), reader=ReaderImageInTar(str(at), class_map=class_map or "",
                                                                 cache_tarinfo=False))

        train_ds = dataset(train_at)
        classes = dict(train_ds.reader.class_name_to_idx)
        _check_classes(classes, dict(dataset(eval_at).reader.class_name_to_idx), train_at, eval_at)
        eval_ds = dataset(eval_at, classes)
        train, test = ReaderSource(train_ds.reader, classes), ReaderSource(eval_ds.reader, classes)
    except (OSError, ValueError, AssertionError, tarfile.TarError) as e:
        raise DataError(f"image_tar: cannot read the shards under {base} ({type(e).__name__}: {e})",
                        hint=f"rewrite or remove the shard; the layout is {layout}") from None
    train.lost, test.lost = train_lost, eval_lost
    train.notes = train_notes + eval_notes
    return train, test


def count_folder_images(root: str | None) -> int | None:
    """Images under ``root/{train,val|test}/<class>/`` (a quick directory scan); None without the layout."""
    if root is None:
        return None
    base = Path(root).expanduser()
    splits = [base / "train", eval_split_dir(base)]
    if not all(p is not None and p.is_dir() for p in splits):
        return None
    n = 0
    for split in splits:
        assert split is not None
        for cls in split.iterdir():
            if cls.is_dir():
                n += sum(1 for f in cls.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    return n

