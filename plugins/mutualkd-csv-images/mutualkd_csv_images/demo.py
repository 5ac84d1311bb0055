"""A small csv_images data set to try the plugin on: scikit-learn's digits as PNG files.

``python -m mutualkd_csv_images.demo OUT`` writes ``OUT/images/<n>.png`` (8x8 grey) and
``OUT/labels.csv`` (``filename,label``, the label a digit's name: ``zero`` .. ``nine``);
``--split`` writes ``OUT/train/`` and ``OUT/test/``, each with its own ``labels.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

__all__ = ["NAMES", "write_digits"]

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _write(out: Path, images: np.ndarray, labels: np.ndarray, offset: int) -> None:
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for k, (img, label) in enumerate(zip(images, labels)):
            name = f"images/{offset + k:05d}.png"
            Image.fromarray(img, mode="L").save(out / name)
            w.writerow([name, NAMES[int(label)]])


def write_digits(out: Path, *, n: int | None = None, split: bool = False) -> Path:
    """Write the first ``n`` digits (all 1797: None) as PNGs with a labels.csv under ``out``; return ``out``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:n]
    labels = np.asarray(bunch.target)[:n]
    if split:
        cut = len(labels) * 4 // 5
        _write(out / "train", images[:cut], labels[:cut], 0)
        _write(out / "test", images[cut:], labels[cut:], cut)
    else:
        _write(out, images, labels, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("-n", type=int, default=None, help="how many digits (default: all 1797)")
    parser.add_argument("--split", action="store_true", help="write train/ and test/ folders")
    args = parser.parse_args()
    print(write_digits(args.out, n=args.n, split=args.split))


if __name__ == "__main__":
    main()
