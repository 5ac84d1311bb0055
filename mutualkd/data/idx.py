"""``mnist`` / ``fashion_mnist``: the four IDX files of MNIST and Fashion-MNIST.

The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) are
looked for in ``root`` (default ``./data``) or in torchvision's ``<root>/MNIST/raw`` /
``<root>/FashionMNIST/raw``. For Fashion-MNIST with no ``root``,
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package) is
searched too. ``download = true`` asks torchvision to fetch the files when none are
found. Augmentation ``"crop"`` with padding 2 (28x28: the same 1/7 relative shift as
4 px on 32x32 CIFAR), zero padding, no flips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import gzip
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING
import zlib

import numpy as np
import torch

from mutualkd.data._base import DatasetInfo, Split, resolve_root, torchvision_download
from mutualkd.data.plugin import InMemoryDataset
from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["FASHION_MNIST_SYSTEM_DIR", "IDX_FILES", "fashion_mnist", "mnist", "read_idx", "write_idx"]

#: The folder Debian's ``dataset-fashion-mnist`` package fills.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four IDX file names of MNIST and Fashion-MNIST (each may also end in ``.gz``).
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# IDX type codes (third byte of the magic number) and the big-endian dtypes they stand for.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[str, int] = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def _read_bytes(path: Path, fix: str) -> bytes:
    """The (decompressed, for ``.gz``) bytes of ``path``; DataError if the file is unreadable."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except EOFError:
        raise DataError(
            f"{path}: the gzip stream ends early, so the file is truncated",
            hint=fix,
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})", hint=fix) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})", hint=fix) from None


def read_idx(path: str | os.PathLike[str], *, expect_magic: int | None = None, fix: str | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped, by a ``.gz`` suffix) into a numpy array.

    The header is two zero bytes, a type code, the number of dimensions, then each
    dimension as a big-endian int32. ``expect_magic`` (e.g. ``0x00000803`` for a 3-d
    uint8 image file, ``0x00000801`` for a 1-d uint8 label file) is checked when given.
    A wrong magic number, a short header or a length that does not match the
    dimensions raises :class:`DataError` naming the file, the expected and actual
    sizes and ``fix``.
    """
    p = Path(path)
    fix = fix or "download the file again (or reinstall the package that provided it)"
    data = _read_bytes(p, fix)
    unpacked = " after decompression" if p.suffix == ".gz" else ""
    if len(data) < 4:
        raise DataError(
            f"{p}: truncated IDX file: {len(data)} bytes{unpacked}, fewer than the 4-byte magic number",
            hint=fix,
        )
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{p}: not an IDX file (magic number 0x{magic:08X})"
            + (f", expected 0x{expect_magic:08X}" if expect_magic is not None else ""),
            hint=fix,
        )
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{p}: IDX magic number is 0x{magic:08X}, expected 0x{expect_magic:08X}", hint=fix)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{p}: truncated IDX file: expected a {header}-byte header, found {len(data)} bytes{unpacked}",
            hint=fix,
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise DataError(f"{p}: IDX header has a negative dimension {dims}", hint=fix)
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated IDX file" if len(data) < expected else "IDX file longer than its header says"
        raise DataError(
            f"{p}: {what}: expected {expected} bytes{unpacked} (header {header} + data of shape"
            f" {list(dims)}), found {len(data)}",
            hint=fix,
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Supported dtypes: uint8, int8, int16, int32, float32, float64.
    """
    arr = np.asarray(array)
    key = f"{arr.dtype.kind}{arr.dtype.itemsize}"
    if key not in _IDX_CODES:
        raise ValueError(f"IDX cannot hold dtype {arr.dtype}; use uint8, int8, int16, int32, float32 or float64")
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError("IDX holds arrays of 1 to 255 dimensions")
    header = bytes([0, 0, _IDX_CODES[key], arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    body = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder(">")).tobytes()
    p = Path(path)
    if p.suffix == ".gz":
        with gzip.open(p, "wb") as f:
            f.write(header + body)
    else:
        p.write_bytes(header + body)


def _find_idx_files(dirs: Sequence[Path]) -> tuple[dict[str, Path] | None, Path, list[str]]:
    """The four IDX files from the first folder that holds all of them.

    Returns ``(files, best_dir, missing)``: ``files`` is None when no folder is
    complete, and then ``best_dir`` is the folder holding the most of them and
    ``missing`` the names it lacks.
    """
    best: tuple[int, Path, list[str]] | None = None
    for d in dirs:
        found: dict[str, Path] = {}
        for fname in IDX_FILES:
            for candidate in (d / fname, d / f"{fname}.gz"):
                if candidate.is_file():
                    found[fname] = candidate
                    break
        if len(found) == len(IDX_FILES):
            return found, d, []
        missing = [f for f in IDX_FILES if f not in found]
        if best is None or len(found) > best[0]:
            best = (len(found), d, missing)
    assert best is not None
    return None, best[1], best[2]


# --------------------------------------------------------------------------- the loader


def _load_idx(spec: _IdxSpec, root: str | None, download: bool) -> tuple[Split, Split, DatasetInfo]:
    """Find the four files of ``spec`` (downloading them if asked), read and check both splits."""
    dirs = _search_dirs(spec, root)
    files, best_dir, missing = _find_idx_files(dirs)
    if files is None and download:
        put = f"put the four IDX files ({', '.join(IDX_FILES)}, optionally .gz) into {resolve_root(root)}"
        if spec.apt_package:
            put = f"as root run `apt-get install {spec.apt_package}` and unset [data] root, or {put}"
        torchvision_download(spec.name, spec.tv_class, resolve_root(root), put)
        files, best_dir, missing = _find_idx_files(dirs)
    if files is None:
        searched = ", ".join(str(d) for d in dirs)
        lines = "\n  ".join(f"{best_dir / f}[.gz]" for f in missing)
        where_fix = f"put the four IDX files ({', '.join(IDX_FILES)}, optionally .gz) into {dirs[0]}"
        if spec.apt_package:
            hint = (
                f"as root run `apt-get install {spec.apt_package}` (fills "
                f"{FASHION_MNIST_SYSTEM_DIR}, searched when [data] root is not set), or {where_fix}"
                " (set it with --set data.root=PATH), or set download = true where there is network"
            )
        else:
            hint = f"{where_fix} (set it with --set data.root=PATH), or set download = true where there is network"
        raise DataError(
            f"{spec.title} not found: {len(missing)} of the 4 IDX files missing:\n  {lines}\n"
            f"  folders searched: {searched}",
            hint=hint,
        )
    if spec.apt_package and best_dir == FASHION_MNIST_SYSTEM_DIR:
        fix = f"reinstall the package: `apt-get install --reinstall {spec.apt_package}`"
    else:
        fix = f"download the {spec.title} IDX files again into {best_dir}"
    train, test = (_read_split(files, prefix, fix) for prefix in ("train", "t10k"))
    h, w = train.images.shape[2:]
    if tuple(test.images.shape[2:]) != (h, w):
        raise DataError(
            f"{spec.title}: train images are {h}x{w} but test images are"
            f" {test.images.shape[2]}x{test.images.shape[3]}",
            hint=fix,
        )
    info = DatasetInfo(spec.name, 10, 1, (int(h), int(w)), spec.mean, spec.std, "crop", _PADDING)
    return train, test, info


def _search_dirs(spec: _IdxSpec, root: str | None) -> list[Path]:
    """``root``, torchvision's ``<root>/<class>/raw``, then the system folder when ``root`` is unset."""
    base = resolve_root(root)
    dirs = [base, base / spec.tv_class / "raw"]
    if spec.apt_package and root is None:
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def _read_split(files: dict[str, Path], prefix: str, fix: str) -> Split:
    """The split ``prefix`` (``train`` or ``t10k``): its images and labels files, checked to agree."""
    images_file, labels_file = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
    imgs = read_idx(images_file, expect_magic=0x00000803, fix=fix)
    labs = read_idx(labels_file, expect_magic=0x00000801, fix=fix)
    if imgs.shape[0] != labs.shape[0]:
        raise DataError(
            f"{images_file} holds {imgs.shape[0]} images but {labels_file} holds {labs.shape[0]} labels", hint=fix
        )
    if labs.size and int(labs.max()) >= 10:
        raise DataError(f"{labels_file}: label {int(labs.max())} is out of range 0..9", hint=fix)
    return Split(torch.from_numpy(imgs[:, None, :, :].copy()), torch.from_numpy(labs.astype(np.int64)))


# --------------------------------------------------------------------------- defaults


@dataclass(frozen=True)
class _IdxSpec:
    """One IDX data set: its names, where torchvision puts it, its train-set statistics."""

    name: str
    title: str
    tv_class: str  # torchvision's class, also its folder under root: <root>/<tv_class>/raw
    mean: tuple[float, ...]
    std: tuple[float, ...]
    apt_package: str | None = None  # the Debian package that fills FASHION_MNIST_SYSTEM_DIR


_PADDING = 2  # crop padding in pixels at 28x28

_MNIST = _IdxSpec("mnist", "MNIST", "MNIST", (0.1307,), (0.3081,))
_FASHION_MNIST = _IdxSpec(
    "fashion_mnist", "Fashion-MNIST", "FashionMNIST", (0.2860,), (0.3530,), apt_package="dataset-fashion-mnist"
)


# The plugins, declared in pyproject.toml's entry-point group mutualkd.datasets.


def _mnist(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """MNIST: 60000 train and 10000 test handwritten digits, 1x28x28, 10 classes."""
    return _load_idx(_MNIST, cfg.root, cfg.download)


def _fashion_mnist(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """Fashion-MNIST: 60000 train and 10000 test clothing images, 1x28x28, 10 classes."""
    return _load_idx(_FASHION_MNIST, cfg.root, cfg.download)


mnist = InMemoryDataset(_mnist)
fashion_mnist = InMemoryDataset(
    _fashion_mnist,
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)
