"""``csv_images``: a folder of image files listed, with their labels, in ``labels.csv``.

The layout Kaggle and many labelling tools export: images anywhere below a folder, and a
CSV file with a header row and the columns ``filename`` (the image's path relative to the
CSV file's folder; a name without a suffix is looked up with the usual image suffixes) and
``label`` (a class name or number). ``[data] root`` names either

* a folder holding ``labels.csv``: one labelled set, of which a fixed, class-stratified
  20 % is held out as the test split (the same for every run seed);
* a folder holding ``train/labels.csv`` and ``test/labels.csv`` (or ``val/``): two splits;
* a ``.csv`` file, when it is not called ``labels.csv`` (one labelled set, as above).

Classes are the train split's labels, sorted (numerically when every label is a number);
a test label that train lacks is an error. Images are decoded as grey (1 channel) when
every image is, else as RGB. The device pipeline decodes every image at ``[data]
image_size`` (or the native size, when all images share one); mean/std come from the train
split there, and from ``config_from`` or ImageNet on the stream pipeline. Augmentation
``crop_flip`` (random crop with padding image_size / 8, horizontal flip).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mutualkd.data import DatasetPlugin, DataSources, stratified_subset
from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["CSV_NAME", "CsvImageSource", "CsvImages", "read_labels"]

#: The CSV file looked for in ``[data] root`` (and in its ``train/`` and ``test/`` folders).
CSV_NAME = "labels.csv"
COLUMNS = ("filename", "label")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_SHARE = 0.2  # held out of a single labels.csv as the test split
_SPLIT_SEED = 0  # the held-out test split never follows the run seed
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class CsvImageSource:
    """Image files and their labels: a map-style source (:class:`mutualkd.data.Source`)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, num_classes: int, in_chans: int) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return img.convert("L" if self.in_chans == 1 else "RGB")  # decodes: a truncated file fails here

    def name(self, i: int) -> str:
        return str(self.paths[i])


# --------------------------------------------------------------------------- reading labels.csv


def _image_path(folder: Path, filename: str) -> Path | None:
    path = folder / filename
    if path.is_file():
        return path
    if not path.suffix:
        return next((p for s in IMAGE_SUFFIXES if (p := path.with_suffix(s)).is_file()), None)
    return None


def read_labels(csv_path: Path) -> tuple[list[Path], list[str]]:
    """The image paths and labels of ``csv_path``; a DataError naming the file, line and fix for a bad row."""
    fix = f"{csv_path} must start with the header row 'filename,label', then one image per row"
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM from spreadsheet exports
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise DataError(f"{csv_path}: no column {' or '.join(missing)} (the header is {','.join(header)})",
                                hint=fix)
            reader.fieldnames = header
            rows = [(reader.line_num, (r["filename"] or "").strip(), (r["label"] or "").strip()) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot be read as a CSV file ({type(e).__name__}: {e})", hint=fix) from None
    paths, labels = [], []
    for line, filename, label in rows:
        if not filename or not label:
            raise DataError(f"{csv_path}, line {line}: the {'filename' if not filename else 'label'} is empty",
                            hint="give each row an image file and its label, or remove the row")
        path = _image_path(csv_path.parent, filename)
        if path is None:
            raise DataError(f"{csv_path}, line {line}: the image {csv_path.parent / filename} does not exist",
                            hint=f"filename is the image's path relative to {csv_path.parent}; fix it or remove the row")
        paths.append(path)
        labels.append(label)
    if not paths:
        raise DataError(f"{csv_path}: no images listed", hint=fix)
    return paths, labels


def _find_csvs(root: str | None) -> tuple[Path, Path | None]:
    """``(train csv, test csv or None)`` for ``[data] root``; a DataError on ``data.root`` when there is none."""
    layout = (f"a folder with {CSV_NAME}, a folder with train/{CSV_NAME} and test/{CSV_NAME}, or a .csv file"
              " (columns filename,label)")
    if root is None:
        raise DataError("csv_images needs the folder (or CSV file) that lists the images", field="data.root",
                        hint=f"set root in [data] or --set data.root=PATH: {layout}")
    base = Path(root).expanduser()
    if base.is_file():
        return base, None
    train = base / "train" / CSV_NAME
    if train.is_file():
        return train, next((p for n in ("test", "val") if (p := base / n / CSV_NAME).is_file()), None)
    if (base / CSV_NAME).is_file():
        return base / CSV_NAME, None
    raise DataError(f"csv_images: no {CSV_NAME} in {base}" + ("" if base.is_dir() else " (no such folder)"),
                    field="data.root", hint=f"point data.root at {layout}")


def _sorted_classes(labels: list[str]) -> tuple[str, ...]:
    names = set(labels)
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return tuple(sorted(names, key=int if numeric else str))


def _image_facts(paths: list[Path]) -> tuple[int, tuple[int, int] | None]:
    """``(channels, size)``: 1 when every image is grey (else 3), and the one ``(h, w)`` they share (None if not).

    Reads each file's header only (PIL decodes pixels later), so this is quick.
    """
    from PIL import Image, UnidentifiedImageError

    grey, sizes = True, set()
    for path in paths:
        try:
            with Image.open(path) as img:
                grey = grey and img.mode in _GREY_MODES
                sizes.add((img.height, img.width))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: cannot be read as an image ({e})", hint="replace the file, or remove its row") \
                from None
    return (1 if grey else 3), (sizes.pop() if len(sizes) == 1 else None)


# --------------------------------------------------------------------------- the plugin


class CsvImages(DatasetPlugin):
    """Images listed in ``labels.csv`` (``filename,label``), under ``[data] root``."""

    def sources(self, cfg: DataConfig) -> DataSources:
        train_csv, test_csv = _find_csvs(cfg.root)
        paths, names = read_labels(train_csv)
        classes = _sorted_classes(names)
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[n] for n in names], dtype=np.int64)
        if test_csv is not None:
            test_paths, test_names = read_labels(test_csv)
            unknown = sorted(set(test_names) - set(classes))
            if unknown:
                raise DataError(f"{test_csv} has labels that {train_csv} lacks: {', '.join(unknown[:5])}",
                                hint="train numbers the classes: give it images of every class")
            test_labels = np.array([index[n] for n in test_names], dtype=np.int64)
            train_paths, train_labels = paths, labels
        else:
            import torch

            n_test = max(1, round(TEST_SHARE * len(paths)))
            if n_test >= len(paths):
                raise DataError(f"{train_csv} lists {len(paths)} image(s): too few to hold out a test split",
                                hint=f"list more images, or give a test split in test/{CSV_NAME}")
            test_idx = stratified_subset(torch.from_numpy(labels), n_test, seed=_SPLIT_SEED)
            assert test_idx is not None
            is_test = np.zeros(len(paths), dtype=bool)
            is_test[test_idx.numpy()] = True
            train_paths = [p for p, t in zip(paths, is_test) if not t]
            test_paths = [p for p, t in zip(paths, is_test) if t]
            train_labels, test_labels = labels[~is_test], labels[is_test]
        in_chans, size = _image_facts(train_paths + test_paths)
        return DataSources(
            CsvImageSource(train_paths, train_labels, len(classes), in_chans),
            CsvImageSource(test_paths, test_labels, len(classes), in_chans),
            classes,
            image_size=size,
            augment="crop_flip",
        )

    def pipeline(self, cfg: DataConfig) -> tuple[str, str]:
        """The device pipeline unless the decoded images would exceed ``data.memory_budget_gb``."""
        if cfg.image_size is None:
            return "device", "csv_images (data.image_size unset: the native size)"
        try:
            paths, _ = read_labels(_find_csvs(cfg.root)[0])
        except DataError:  # the loader names the problem
            return "device", "csv_images (size unknown)"
        need = len(paths) * 3 * cfg.image_size**2 / 2**30
        if need > cfg.memory_budget_gb:
            return "stream", f"{len(paths)} images are {need:.2f} GiB decoded, over data.memory_budget_gb"
        return "device", f"{len(paths)} images are {need:.2f} GiB decoded, within data.memory_budget_gb"
