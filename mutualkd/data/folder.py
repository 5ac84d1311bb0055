"""``image_folder``: one folder of images per class, for a train and a test split.

``<root>/train/<class>/*.png|jpg|...`` and ``<root>/test/<class>/...`` (or ``val``),
converted to RGB and resized to ``image_size`` (required) with PIL's bilinear filter.
mean/std come from the train split. Augmentation ``"crop_flip"`` with padding
``max(1, round(image_size / 8))`` (4 at 32 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
import warnings

import numpy as np
import torch

from mutualkd.data._base import DatasetInfo, Split, check_image_memory, mean_std
from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["image_folder"]


def _class_dirs(split_dir: Path) -> list[str]:
    """The class folder names of ``split_dir``, sorted (hidden folders left out)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image_split(split_dir: Path, classes: Sequence[str], size: int) -> Split:
    """Every image under ``split_dir/<class>/``, as RGB ``size x size``, labelled by its class's index."""
    from PIL import Image, UnidentifiedImageError

    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise DataError(
            f"image_folder: no images under {split_dir}",
            hint=f"put images ({', '.join(sorted(_IMAGE_EXTENSIONS))}) into {split_dir}/<class>/",
        )
    check_image_memory(len(paths), 3, size, what=f"the {len(paths)} images of {split_dir}")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that: both are
            # refused here, before a small file decompresses into gigabytes.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    rgb = img.convert("RGB")
                    if rgb.size != (size, size):
                        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                    out[i] = np.asarray(rgb, dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"{path}: refused as a decompression bomb ({e})",
                            hint="replace the file with an image of ordinary size, or remove it") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: cannot be read as an image ({e})", hint="replace or remove the file") from None
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(labels, dtype=torch.int64))


# --------------------------------------------------------------------------- the loader


def _load_image_folder(root: str | None, image_size: int | None) -> tuple[Split, Split, DatasetInfo]:
    """Check ``[data] image_size`` and ``root`` and the layout below it, then read both splits."""
    if image_size is None:
        raise DataError(
            "image_folder needs an image size to bring every image to one shape",
            field="data.image_size",
            hint="set image_size in [data] (e.g. image_size = 32) or --set data.image_size=32; or set"
            ' pipeline = "stream", which resizes each image as it is read (to 224 px or config_from\'s size)',
        )
    if root is None:
        raise DataError(
            "image_folder needs the folder that holds train/ and test/",
            field="data.root",
            hint="set root in [data] or --set data.root=PATH; it must hold train/<class>/*.png and test/<class>/*.png",
        )
    base = Path(root).expanduser()
    train_dir, test_dir = _split_dirs(base)
    classes = _class_dirs(train_dir)
    test_classes = _class_dirs(test_dir)
    if not classes:
        raise DataError(
            f"image_folder: {train_dir} holds no class folders",
            hint=f"put each class's images into its own folder, {train_dir}/<class>/<image>",
        )
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"image_folder: the classes of {train_dir} and {test_dir} differ"
            + (f"; only in train: {', '.join(only_train)}" if only_train else "")
            + (f"; only in {test_dir.name}: {', '.join(only_test)}" if only_test else ""),
            hint="give train/ and test/ the same class folders",
        )
    train = _read_image_split(train_dir, classes, image_size)
    test = _read_image_split(test_dir, classes, image_size)
    mean, std = mean_std(train.images)
    padding = max(1, round(image_size / _PADDING_DIVISOR))
    info = DatasetInfo("image_folder", len(classes), 3, (image_size, image_size), mean, std, "crop_flip", padding)
    return train, test, info


def _split_dirs(base: Path) -> tuple[Path, Path]:
    """``base/train`` and ``base/test`` (or ``base/val``); a DataError on ``data.root`` if one is missing."""
    train_dir = base / "train"
    test_dir = next((base / n for n in _TEST_NAMES if (base / n).is_dir()), None)
    missing = [str(p) for p, ok in ((train_dir, train_dir.is_dir()), (base / "test", test_dir is not None)) if not ok]
    if missing or test_dir is None:
        raise DataError(
            f"image_folder: missing folder(s) {', '.join(missing)}" + (" (or val/)" if test_dir is None else ""),
            field="data.root",
            hint=f"lay out {base}/train/<class>/<image> and {base}/test/<class>/<image> (test/ may be named val/)",
        )
    return train_dir, test_dir


# --------------------------------------------------------------------------- defaults

_IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_TEST_NAMES = ("test", "val")  # the test split's folder, in the order they are looked for
_PADDING_DIVISOR = 8  # crop padding is image_size / 8: 4 px at 32 px, as for CIFAR


def image_folder(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """Images in ``<root>/{train,test}/<class>/``, RGB, brought to ``image_size``."""
    return _load_image_folder(cfg.root, cfg.image_size)
