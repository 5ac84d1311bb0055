"""Loading each data set fully into memory as uint8 tensors.

Every loader returns a train :class:`Split`, a test :class:`Split` and a
:class:`DatasetInfo`. Images are ``uint8 [N, C, H, W]`` on the CPU and labels are
``int64 [N]``; normalisation and augmentation happen later, per batch, on the
training device (see :mod:`mutualkd.data.loader`).

Data sets
---------
``digits``
    scikit-learn's 8x8 handwritten digits (1797 images, shipped with scikit-learn,
    so no download is ever needed). Pixel values 0..16 are scaled to 0..255. The
    train/test split is fixed: ``train_test_split(test_size=0.25, stratify=y,
    random_state=0)``, independent of the run seed, so every run is evaluated on the
    same 450 test images (1347 train). Images stay 8x8 unless ``image_size`` is set;
    note that a CIFAR-style ResNet (three stages, two stride-2 steps) ends at 2x2
    feature maps on 8x8 input. mean/std are computed from the train split.
    Augmentation ``"crop"`` with padding 1 (no flips: a flipped digit is another or
    no digit).
``mnist`` / ``fashion_mnist``
    The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``)
    in ``root`` (default ``./data``) or in torchvision's ``<root>/MNIST/raw`` /
    ``<root>/FashionMNIST/raw``. For Fashion-MNIST with no ``root``,
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``
    package) is searched too. Augmentation ``"crop"`` with padding 2 (28x28: the
    same 1/7 relative shift as 4 px on 32x32 CIFAR), zero padding, no flips.
``cifar10`` / ``cifar100``
    torchvision's on-disk layout under ``root`` (default ``./data``):
    ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or
    ``cifar-100-python/{train,test,meta}``, read directly from the pickles (the
    files are trusted like any data set the user puts there). ``download = true``
    asks torchvision to fetch the archive when files are missing. Augmentation
    ``"crop_flip"`` with padding 4 (reflect padding, as in the DML paper).
``image_folder``
    ``<root>/train/<class>/*.png|jpg|...`` and ``<root>/test/<class>/...`` (or
    ``val``), converted to RGB and resized to ``image_size`` (required) with PIL's
    bilinear filter. mean/std come from the train split. Augmentation
    ``"crop_flip"`` with padding ``max(1, round(image_size / 8))`` (4 at 32 px).

Subsets and resizing
--------------------
``train_subset`` takes a class-stratified subset of the train split, chosen with
the run ``seed`` (each class keeps its share of the split, ties broken at random);
``test_subset`` does the same on the test split with a fixed seed (0), so every run
with the same ``test_subset`` is evaluated on the same images. A subset at least as
large as the split keeps the whole split. ``image_size`` (when set, for every data
set but ``image_folder``, which is loaded at that size) resizes both splits to
``image_size x image_size`` with bilinear antialiased interpolation, and scales the
crop padding with the image: ``max(1, round(padding * image_size / native_height))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import gzip
import math
import os
from pathlib import Path
import pickle
from typing import Any
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from mutualkd.config import DataConfig
from mutualkd.errors import DataError

__all__ = [
    "DatasetInfo",
    "Split",
    "load_dataset",
    "read_idx",
    "write_idx",
    "write_fake_cifar",
    "stratified_subset",
    "resize_images",
    "DEFAULT_ROOT",
    "FASHION_MNIST_SYSTEM_DIR",
    "IDX_FILES",
]

#: Where data sets are looked for when ``[data] root`` is not set.
DEFAULT_ROOT = "./data"
#: The folder Debian's ``dataset-fashion-mnist`` package fills.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four IDX file names of MNIST and Fashion-MNIST (each may also end in ``.gz``).
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the batch loader need to know about a data set.

    ``mean``/``std`` are per channel in [0, 1] pixel units. ``augment`` is
    ``"crop_flip"`` (random crop from a reflect-padded image plus horizontal flip),
    ``"crop"`` (random crop from a zero-padded image, no flip) or ``"none"``;
    ``padding`` is the crop padding in pixels.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    padding: int


@dataclass
class Split:
    """One split held in memory: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N], on CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- entry point


def load_dataset(cfg: DataConfig, *, seed: int = 0) -> tuple[Split, Split, DatasetInfo]:
    """Return ``(train, test, info)`` for the data set ``cfg`` names.

    Applies ``cfg.train_subset`` (class-stratified, chosen with ``seed``),
    ``cfg.test_subset`` (class-stratified, fixed seed 0, so it does not depend on the
    run seed) and ``cfg.image_size`` (bilinear antialiased resize when set). Every
    problem the user can fix (missing, truncated or malformed files, a missing
    ``image_size`` for ``image_folder``) raises :class:`~mutualkd.errors.DataError`.
    """
    name = cfg.dataset
    if name == "digits":
        train, test, info = _load_digits()
    elif name in ("mnist", "fashion_mnist"):
        train, test, info = _load_mnist_like(name, cfg.root, cfg.download)
    elif name in ("cifar10", "cifar100"):
        train, test, info = _load_cifar(name, cfg.root, cfg.download)
    elif name == "image_folder":
        train, test, info = _load_image_folder(cfg.root, cfg.image_size)
    else:  # pragma: no cover - the recipe schema only admits the names above
        raise DataError(
            f"unknown data set {name!r}",
            where="[data.dataset]",
            hint="use one of digits, mnist, fashion_mnist, cifar10, cifar100, image_folder",
        )

    if cfg.train_subset is not None:
        train = _take(train, stratified_subset(train.labels, cfg.train_subset, seed=seed))
    if cfg.test_subset is not None:
        test = _take(test, stratified_subset(test.labels, cfg.test_subset, seed=0))

    if cfg.image_size is not None and info.image_size != (cfg.image_size, cfg.image_size):
        size = cfg.image_size
        native_h = info.image_size[0]
        train = Split(resize_images(train.images, size), train.labels)
        test = Split(resize_images(test.images, size), test.labels)
        padding = max(1, round(info.padding * size / native_h)) if info.padding > 0 else 0
        info = DatasetInfo(
            name=info.name,
            num_classes=info.num_classes,
            in_chans=info.in_chans,
            image_size=(size, size),
            mean=info.mean,
            std=info.std,
            augment=info.augment,
            padding=padding,
        )
    return train, test, info


# --------------------------------------------------------------------------- helpers


def stratified_subset(labels: torch.Tensor, n: int, *, seed: int) -> torch.Tensor | None:
    """Indices (ascending) of a deterministic class-stratified subset of ``n`` samples.

    Samples are shuffled with a generator seeded by ``seed``; each sample's key is
    ``(rank within its class + 0.5) / class size``, and the ``n`` smallest keys are
    taken, so every class keeps (up to rounding) its share of the split. Returns
    ``None`` when ``n`` covers the whole split.
    """
    total = int(labels.shape[0])
    if n >= total:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=gen)
    lab = labels.to(torch.int64)[perm]
    counts = torch.bincount(lab)
    grouped = torch.argsort(lab, stable=True)  # by class, in shuffled order within a class
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(total, dtype=torch.int64)
    rank[grouped] = torch.arange(total) - starts[lab[grouped]]
    key = (rank.to(torch.float64) + 0.5) / counts[lab].to(torch.float64)
    chosen = perm[torch.argsort(key, stable=True)[:n]]
    return torch.sort(chosen).values


def _take(split: Split, idx: torch.Tensor | None) -> Split:
    if idx is None:
        return split
    return Split(split.images[idx].contiguous(), split.labels[idx].contiguous())


def resize_images(images: torch.Tensor, size: int, *, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` images to ``size x size`` (bilinear, antialiased), in chunks."""
    n, c = images.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = images[start : start + chunk].to(torch.float32)
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units.

    Computed exactly from a 256-bin histogram per channel, so memory stays at one
    uint8 copy of a channel whatever the size of the split.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum().clamp_min(1.0)
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var**0.5, 1e-6))
    return tuple(means), tuple(stds)


def _resolve_root(root: str | None) -> Path:
    return Path(root if root is not None else DEFAULT_ROOT).expanduser()


# --------------------------------------------------------------------------- digits


def _load_digits() -> tuple[Split, Split, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], values 0..16
    images = np.rint(raw * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)
    train_idx = np.sort(train_idx)
    test_idx = np.sort(test_idx)
    train = Split(torch.from_numpy(images[train_idx].copy()), torch.from_numpy(labels[train_idx].copy()))
    test = Split(torch.from_numpy(images[test_idx].copy()), torch.from_numpy(labels[test_idx].copy()))
    mean, std = _mean_std(train.images)
    info = DatasetInfo("digits", 10, 1, (8, 8), mean, std, "crop", 1)
    return train, test, info


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

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


_MNIST_INFO = {
    "mnist": ("MNIST", "MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": ("Fashion-MNIST", "FashionMNIST", (0.2860,), (0.3530,)),
}


def _idx_search_dirs(name: str, root: str | None) -> list[Path]:
    base = _resolve_root(root)
    tv_folder = _MNIST_INFO[name][1]
    dirs = [base, base / tv_folder / "raw"]
    if name == "fashion_mnist" and root is None:
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


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


def _load_mnist_like(name: str, root: str | None, download: bool) -> tuple[Split, Split, DatasetInfo]:
    title, tv_folder, mean, std = _MNIST_INFO[name]
    dirs = _idx_search_dirs(name, root)
    files, best_dir, missing = _find_idx_files(dirs)
    if files is None and download:
        _torchvision_download(name, _resolve_root(root))
        files, best_dir, missing = _find_idx_files(dirs)
    if files is None:
        searched = ", ".join(str(d) for d in dirs)
        lines = "\n  ".join(f"{best_dir / f}[.gz]" for f in missing)
        where_fix = f"put the four IDX files ({', '.join(IDX_FILES)}, optionally .gz) into {dirs[0]}"
        if name == "fashion_mnist":
            hint = (
                "as root run `apt-get install dataset-fashion-mnist` (fills "
                f"{FASHION_MNIST_SYSTEM_DIR}, searched when [data] root is not set), or {where_fix}"
                " (set it with --set data.root=PATH), or set download = true where there is network"
            )
        else:
            hint = f"{where_fix} (set it with --set data.root=PATH), or set download = true where there is network"
        raise DataError(
            f"{title} not found: {len(missing)} of the 4 IDX files missing:\n  {lines}\n  folders searched: {searched}",
            hint=hint,
        )
    if name == "fashion_mnist" and best_dir == FASHION_MNIST_SYSTEM_DIR:
        fix = "reinstall the package: `apt-get install --reinstall dataset-fashion-mnist`"
    else:
        fix = f"download the {title} IDX files again into {best_dir}"
    arrays = {
        fname: read_idx(files[fname], expect_magic=0x00000803 if "images" in fname else 0x00000801, fix=fix)
        for fname in IDX_FILES
    }
    splits = []
    for prefix in ("train", "t10k"):
        imgs = arrays[f"{prefix}-images-idx3-ubyte"]
        labs = arrays[f"{prefix}-labels-idx1-ubyte"]
        if imgs.shape[0] != labs.shape[0]:
            raise DataError(
                f"{files[f'{prefix}-images-idx3-ubyte']} holds {imgs.shape[0]} images but "
                f"{files[f'{prefix}-labels-idx1-ubyte']} holds {labs.shape[0]} labels",
                hint=fix,
            )
        if labs.size and int(labs.max()) >= 10:
            raise DataError(
                f"{files[f'{prefix}-labels-idx1-ubyte']}: label {int(labs.max())} is out of range 0..9", hint=fix
            )
        splits.append(Split(torch.from_numpy(imgs[:, None, :, :].copy()), torch.from_numpy(labs.astype(np.int64))))
    train, test = splits
    h, w = train.images.shape[2:]
    if tuple(test.images.shape[2:]) != (h, w):
        raise DataError(
            f"{title}: train images are {h}x{w} but test images are {test.images.shape[2]}x{test.images.shape[3]}",
            hint=fix,
        )
    info = DatasetInfo(name, 10, 1, (int(h), int(w)), mean, std, "crop", 2)
    return train, test, info


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarSpec:
    title: str
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


_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarSpec(
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _unpickle(path: Path, fix: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})", hint=fix) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})", hint=fix) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}", hint=fix)
    # Python 2 pickles read with encoding="bytes" have bytes keys; accept str keys too.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_batches(folder: Path, names: Sequence[str], spec: _CifarSpec, fix: str) -> Split:
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
        labs = np.asarray(entry[spec.label_key], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]", hint=fix)
        if labs.shape[0] != data.shape[0]:
            raise DataError(f"{path}: {data.shape[0]} images but {labs.shape[0]} labels", hint=fix)
        if labs.size and (int(labs.min()) < 0 or int(labs.max()) >= spec.num_classes):
            raise DataError(
                f"{path}: labels outside 0..{spec.num_classes - 1} (found {int(labs.min())}..{int(labs.max())})",
                hint=fix,
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(labs)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _torchvision_download(name: str, root: Path) -> None:
    """Ask torchvision to download ``name`` into ``root``; DataError (with the cause) when that fails."""
    import torchvision.datasets as tvd

    cls = {
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
        "mnist": tvd.MNIST,
        "fashion_mnist": tvd.FashionMNIST,
    }[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=True, download=True)
        cls(root=str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types (URLError, RuntimeError, OSError, ...)
        if name.startswith("cifar"):
            spec = _CIFAR[name]
            manual = (
                f"put {spec.archive} extracted into {root} so that {root / spec.folder} holds {', '.join(spec.files)}"
            )
        else:
            manual = f"put the four IDX files ({', '.join(IDX_FILES)}, optionally .gz) into {root}"
            if name == "fashion_mnist":
                manual = f"as root run `apt-get install dataset-fashion-mnist` and unset [data] root, or {manual}"
        raise DataError(
            f"downloading {name} into {root} failed ({type(e).__name__}: {e})",
            where="[data.download]",
            hint=(
                f"without network, {manual}; then set download = false"
                " (or keep it: files already present are not fetched again)"
            ),
        ) from None


def _load_cifar(name: str, root: str | None, download: bool) -> tuple[Split, Split, DatasetInfo]:
    spec = _CIFAR[name]
    base = _resolve_root(root)
    folder = base / spec.folder
    needed = spec.files

    def missing_files() -> list[str]:
        return [f for f in needed if not (folder / f).is_file()]

    missing = missing_files()
    if missing and download:
        _torchvision_download(name, base)
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
    if class_names is not None and len(class_names) != spec.num_classes:
        raise DataError(f"{folder / spec.meta}: {len(class_names)} class names, expected {spec.num_classes}", hint=fix)
    train = _read_cifar_batches(folder, spec.train, spec, fix)
    test = _read_cifar_batches(folder, spec.test, spec, fix)
    info = DatasetInfo(name, spec.num_classes, 3, (32, 32), spec.mean, spec.std, "crop_flip", 4)
    return train, test, info


def write_fake_cifar(root: Path, kind: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """Write a tiny CIFAR tree in torchvision's on-disk pickle format under ``root``.

    ``kind`` is ``"cifar10"`` (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
    ``batches.meta``; the train samples are spread over the five batches) or
    ``"cifar100"`` (``cifar-100-python/train``, ``test``, ``meta``). Each batch is a
    dict with bytes keys as the real files read with ``encoding="bytes"``:
    ``b"data"`` uint8 [N, 3072], ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` and
    ``b"coarse_labels"`` (CIFAR-100), ``b"filenames"`` and ``b"batch_label"``.
    Labels cycle through the classes (from a seeded shuffle), images are seeded
    random pixels. Returns the data folder written.
    """
    if kind not in _CIFAR:
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', not {kind!r}")
    spec = _CIFAR[kind]
    rng = np.random.default_rng(seed)
    folder = Path(root) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    k = spec.num_classes

    def labels_for(n: int) -> np.ndarray:
        return rng.permutation(np.arange(n) % k).astype(np.int64)

    def batch(n: int, label: str) -> dict[bytes, object]:
        fine = labels_for(n)
        entry: dict[bytes, object] = {
            b"batch_label": label.encode(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"fake_{label.replace(' ', '_')}_{i}.png".encode() for i in range(n)],
        }
        if kind == "cifar10":
            entry[b"labels"] = [int(v) for v in fine]
        else:
            entry[b"fine_labels"] = [int(v) for v in fine]
            entry[b"coarse_labels"] = [int(v) // 5 for v in fine]
        return entry

    def dump(obj: object, path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if kind == "cifar10":
        sizes = [len(part) for part in np.array_split(np.arange(n_train), 5)]
        for i, n in enumerate(sizes, start=1):
            dump(batch(n, f"training batch {i} of 5"), folder / f"data_batch_{i}")
        dump(batch(n_test, "testing batch 1 of 1"), folder / "test_batch")
        dump(
            {
                b"label_names": [f"class{i}".encode() for i in range(10)],
                b"num_cases_per_batch": 10000,
                b"num_vis": 3072,
            },
            folder / "batches.meta",
        )
    else:
        dump(batch(n_train, "training batch 1 of 1"), folder / "train")
        dump(batch(n_test, "testing batch 1 of 1"), folder / "test")
        dump(
            {
                b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
            },
            folder / "meta",
        )
    return folder


# --------------------------------------------------------------------------- image folder


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_image_folder(root: str | None, image_size: int | None) -> tuple[Split, Split, DatasetInfo]:
    if image_size is None:
        raise DataError(
            "image_folder needs an image size to bring every image to one shape",
            where="[data.image_size]",
            hint="set image_size in [data] (e.g. image_size = 32) or --set data.image_size=32",
        )
    if root is None:
        raise DataError(
            "image_folder needs the folder that holds train/ and test/",
            where="[data.root]",
            hint="set root in [data] or --set data.root=PATH; it must hold train/<class>/*.png and test/<class>/*.png",
        )
    base = Path(root).expanduser()
    train_dir = base / "train"
    test_dir = next((base / n for n in ("test", "val") if (base / n).is_dir()), None)
    missing = [str(p) for p, ok in ((train_dir, train_dir.is_dir()), (base / "test", test_dir is not None)) if not ok]
    if missing:
        raise DataError(
            f"image_folder: missing folder(s) {', '.join(missing)}" + (" (or val/)" if test_dir is None else ""),
            where="[data.root]",
            hint=f"lay out {base}/train/<class>/<image> and {base}/test/<class>/<image> (test/ may be named val/)",
        )
    assert test_dir is not None
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
    mean, std = _mean_std(train.images)
    padding = max(1, round(image_size / 8))
    info = DatasetInfo("image_folder", len(classes), 3, (image_size, image_size), mean, std, "crop_flip", padding)
    return train, test, info


def _read_image_split(split_dir: Path, classes: Sequence[str], size: int) -> Split:
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
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(rgb, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{path}: cannot be read as an image ({e})", hint="replace or remove the file") from None
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(labels, dtype=torch.int64))
