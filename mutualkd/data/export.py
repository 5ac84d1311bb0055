"""Writing a data set held in memory as an image folder in ImageNet layout, or as tar shards.

``write_image_folder(train, test, root)`` writes ``root/train/<class>/<i>.jpg`` and
``root/val/<class>/<i>.jpg``: the layout the stream pipeline (and ``image_folder``) reads.
``write_tar_shards(folder, root)`` packs such a folder into ``root/train/shard-*.tar`` and
``root/val/shard-*.tar`` whose members are ``<class>/<file>`` (``image_tar``). The tests
and the data benchmark use them to turn real images (digits, Fashion-MNIST) into files.
"""

from __future__ import annotations

from pathlib import Path
import tarfile

import numpy as np
import torch

from mutualkd.data._base import Split

__all__ = ["write_image_folder", "write_tar_shards"]


def _save(pixels: np.ndarray, path: Path, size: int | None, fmt: str, quality: int) -> None:
    from PIL import Image

    img = Image.fromarray(pixels[0], mode="L") if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    img.save(path, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))


def write_image_folder(train: Split, test: Split, root: str | Path, *, size: int | None = None, fmt: str = "JPEG",
                       quality: int = 90, classes: list[str] | None = None) -> Path:
    """Write both splits under ``root`` (``train/`` and ``val/``) as RGB image files; returns ``root``.

    ``size`` resizes each image to ``size x size`` (bilinear); ``classes`` names the class
    folders (default ``class<k>``, zero-padded so that sorted names keep the label order).
    """
    root = Path(root)
    suffix = ".jpg" if fmt == "JPEG" else f".{fmt.lower()}"
    k = int(max(int(train.labels.max()), int(test.labels.max()))) + 1
    names = classes or [f"class{c:0{len(str(k - 1))}d}" for c in range(k)]
    for split_name, split in (("train", train), ("val", test)):
        for name in names:
            (root / split_name / name).mkdir(parents=True, exist_ok=True)
        images = split.images.to(torch.uint8).numpy()
        for i, label in enumerate(split.labels.tolist()):
            _save(images[i], root / split_name / names[label] / f"{i:06d}{suffix}", size, fmt, quality)
    return root


def write_tar_shards(folder: str | Path, root: str | Path, *, shards: int = 2) -> Path:
    """Pack ``folder/{train,val}/<class>/<file>`` into ``shards`` tar files per split under ``root``."""
    folder, root = Path(folder), Path(root)
    for split in ("train", "val"):
        files = sorted(p for p in (folder / split).rglob("*") if p.is_file())
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            with tarfile.open(root / split / f"shard-{s:04d}.tar", "w") as tf:
                for p in files[s::shards]:
                    tf.add(p, arcname=str(p.relative_to(folder / split)))
    return root
