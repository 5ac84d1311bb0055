"""Shared test set-up, and factory fixtures that write tiny stand-in data sets.

The other shared fixtures live in ``tests/fixtures/`` and are loaded as plugins below:
``fixtures.recipes`` (tiny recipes and trainers, metrics, the repository's paths),
``fixtures.cli`` (``mutualkd`` in a fresh interpreter, ``--set`` options, folder snapshots)
and ``fixtures.launch`` (the launch / kill / compare kit of the reliability tests). Tests
take them as arguments; no test module imports from another.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
import pickle
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

# No test may reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The tiny networks of these tests gain nothing from intra-op threads, and on a shared
# 2-core machine OpenMP's spinning threads made runs ~10x slower (measured: 10 IE-DML
# steps, 1 thread 1 s CPU, 2 threads 12 s CPU). Subprocesses get OMP_NUM_THREADS=1
# (the subprocess_env fixture).
torch.set_num_threads(1)

pytest_plugins = ["fixtures.recipes", "fixtures.cli", "fixtures.launch"]


# --------------------------------------------------------------------------- fake data sets


def _fake_cifar(root: Path, kind: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
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
    if kind not in ("cifar10", "cifar100"):
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', not {kind!r}")
    rng = np.random.default_rng(seed)
    folder = Path(root) / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    k = 10 if kind == "cifar10" else 100

    def batch(n: int, label: str) -> dict[bytes, object]:
        fine = rng.permutation(np.arange(n) % k).astype(np.int64)
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
        meta: dict[bytes, object] = {
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_cases_per_batch": 10000,
            b"num_vis": 3072,
        }
        dump(meta, folder / "batches.meta")
    else:
        dump(batch(n_train, "training batch 1 of 1"), folder / "train")
        dump(batch(n_test, "testing batch 1 of 1"), folder / "test")
        meta = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
        dump(meta, folder / "meta")
    return folder


def _fake_mnist(
    folder: Path, n_train: int = 30, n_test: int = 12, *, gz: bool = False, size: int = 28, seed: int = 0
) -> Path:
    """Write the four MNIST IDX files (``.gz`` when ``gz``) into ``folder``; returns ``folder``.

    Images are seeded random ``size x size`` pixels; labels are ``0, 1, ..., 9, 0, ...``.
    """
    from mutualkd.data import write_idx

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))
    return folder


@pytest.fixture(scope="session")
def write_fake_cifar() -> Callable[..., Path]:
    """``write_fake_cifar(root, kind="cifar10", n_train=50, n_test=20, seed=0) -> folder``: a tiny CIFAR tree."""
    return _fake_cifar


@pytest.fixture(scope="session")
def write_fake_mnist() -> Callable[..., Path]:
    """``write_fake_mnist(folder, n_train=30, n_test=12, *, gz=False, size=28, seed=0)``: four tiny IDX files."""
    return _fake_mnist


# --------------------------------------------------------------------------- image folders of real images


def _image_folder(root: Path, *, source: str = "digits", n_train: int = 120, n_test: int = 40, size: int = 24,
                  fmt: str = "JPEG") -> Path:
    """Write real images as an image folder in ImageNet layout (``root/{train,val}/<class>/*.jpg``).

    ``source`` is ``"digits"`` (scikit-learn's, always there) or ``"fashion_mnist"``
    (Debian's ``dataset-fashion-mnist``; the test is skipped when it is not installed).
    The first ``n_train`` / ``n_test`` images of each split, resized to ``size``.
    """
    from mutualkd.config import DataConfig
    from mutualkd.data import FASHION_MNIST_SYSTEM_DIR, load_dataset
    from mutualkd.data._base import Split
    from mutualkd.data.export import write_image_folder

    if source == "fashion_mnist" and not FASHION_MNIST_SYSTEM_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_SYSTEM_DIR}"
                    " (apt-get install dataset-fashion-mnist)")
    train, test, _ = load_dataset(DataConfig(dataset=source))
    head = lambda s, n: Split(s.images[:n], s.labels[:n])  # noqa: E731
    return write_image_folder(head(train, n_train), head(test, n_test), root, size=size, fmt=fmt)


@pytest.fixture(scope="session")
def write_image_folder() -> Callable[..., Path]:
    """``write_image_folder(root, *, source="digits", n_train=120, n_test=40, size=24, fmt="JPEG")``: real images as files."""
    return _image_folder


# --------------------------------------------------------------------------- weights and checkpoints


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, make_trainer: Callable[..., Any]) -> Path:
    """A finished two-peer KL-DML digits run (cifar_resnet20, cifar_wrn_16_1; 2 steps); its run folder.

    Read-only: tests that change it copy it first.
    """
    tr = make_trainer(tmp_path_factory.mktemp("tiny"), name="tiny", max_steps=2)
    tr.fit()
    return tr.run_dir


@pytest.fixture(scope="session")
def pip_install_copy(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """``pip_install_copy(source) -> folder``: a distribution's source tree installed with pip
    (no dependencies) into a folder of its own, for PYTHONPATH or ``sys.path``.

    pip builds in place, so it builds a copy: no build files land in the repository.
    """

    def install(source: Path) -> Path:
        src = tmp_path_factory.mktemp("src") / source.name
        shutil.copytree(source, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
        target = tmp_path_factory.mktemp(f"{source.name}-site")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "--target", str(target), str(src)],
            check=True,
        )
        return target

    return install


@pytest.fixture(scope="session")
def write_hub_entry() -> Callable[..., Path]:
    """``write_hub_entry(cache, repo_id, files) -> snapshot``: a Hugging Face cache entry written by hand.

    ``files`` maps file names to writers ``(path) -> None``. The layout is the cache's own
    (``models--ORG--NAME/refs/main`` holding a commit hash, ``snapshots/<hash>/<files>``), so
    ``huggingface_hub.try_to_load_from_cache`` finds the files as if they had been downloaded.
    """

    def write(cache: Path, repo_id: str, files: dict[str, Callable[[Path], None]]) -> Path:
        repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        for name, writer in files.items():
            writer(snapshot / name)
        return snapshot

    return write
