"""The benchmark's cases and settings, and the recipe the engine runs for each case.

A case is a strategy, its schedule mode and a number of peers. The hand-written and
naive loops (reference.py) read their settings from the same recipe, so every
implementation trains the same peers with the same optimizer on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
import pickle
from typing import Any

import numpy as np

from mutualkd.config import parse_recipe
from mutualkd.engine import Callback, Trainer

__all__ = [
    "IMPLS",
    "MODELS",
    "IE_LAMBDA",
    "Case",
    "CASES",
    "Settings",
    "min_forwards",
    "naive_forwards",
    "peer_models",
    "recipe_dict",
    "build_trainer",
    "write_fake_cifar",
]

IMPLS = ("engine", "hand", "naive")
MODELS = ("cifar_resnet20", "cifar_wrn_16_1")
#: IE-DML hyper-parameters shared by the engine's recipe and the hand-written loops.
IE_LAMBDA = 50.0


@dataclass(frozen=True)
class Case:
    """One benchmark case: a strategy, its schedule mode and the number of peers."""

    name: str
    strategy: str  # "kl_dml" or "ie_dml"
    mode: str  # "alternating" or "simultaneous"
    n: int


CASES: tuple[Case, ...] = (
    Case("kl_dml_alt_n2", "kl_dml", "alternating", 2),
    Case("kl_dml_alt_n3", "kl_dml", "alternating", 3),
    Case("kl_dml_alt_n4", "kl_dml", "alternating", 4),
    Case("kl_dml_sim_n2", "kl_dml", "simultaneous", 2),
    Case("ie_dml_alt_n2", "ie_dml", "alternating", 2),
)


@dataclass
class Settings:
    """Everything a run of the benchmark depends on (recorded in the JSON output)."""

    device: str = "cpu"
    batch_size: int = 64
    warmup: int = 2  # batches of epoch 0, not timed
    steps: int = 1  # batches per implementation and round
    repeats: int = 18  # rounds (timed windows per implementation)
    mixed_precision: str = "no"
    channels_last: bool = False
    compile: bool = False
    dataset: str = "digits"  # digits (resized), fake-cifar10, fake-cifar100
    image_size: int = 32
    models: tuple[str, ...] = MODELS
    impls: tuple[str, ...] = IMPLS
    seed: int = 0
    threads: int | None = None
    fake_train: int = 2000  # images of the fake CIFAR train split
    fake_test: int = 200
    eval_test: bool = False  # time one evaluation over the whole test split (engine)
    stat: str = "median"  # statistic over the timed windows: median, or min (less sensitive to load)
    clock: str = "wall"  # time behind images/s and the ratios: wall, or process CPU time
    work_dir: str | None = None


def min_forwards(case: Case) -> int:
    """The fewest forward passes per batch a faithful schedule needs."""
    if case.strategy == "ie_dml":
        return 3 if case.n == 2 else 2 * case.n - 1  # N = 2: the four-step schedule
    return 2 * case.n - 1 if case.mode == "alternating" else case.n


def naive_forwards(case: Case) -> int:
    """Forward passes per batch of the naive loops (every update re-forwards every peer)."""
    if case.strategy == "ie_dml":
        return 4 * case.n  # four steps, each re-forwarding both peers
    return case.n * case.n if case.mode == "alternating" else case.n


def peer_models(case: Case, models: Sequence[str]) -> list[str]:
    """Peer i's model: ``models[i % len(models)]``."""
    return [models[i % len(models)] for i in range(case.n)]


def recipe_dict(case: Case, s: Settings, out_dir: Path, data_root: str | None) -> dict[str, Any]:
    """The recipe the engine runs for ``case`` (also the source of the loops' settings)."""
    if s.dataset == "digits":
        data: dict[str, Any] = {"dataset": "digits", "image_size": s.image_size}
    else:
        data = {"dataset": s.dataset.removeprefix("fake-"), "root": data_root}
    data.update(batch_size=s.batch_size, eval_batch_size=512, augment=True, drop_last=True)
    if not s.eval_test:
        data["test_subset"] = 20  # evaluation runs after each window plan, outside the timing
    strategy: dict[str, Any] = {"name": case.strategy}
    if case.strategy == "ie_dml":
        strategy.update(inh_metric="l1", exp_metric="l1", lambda_inh=IE_LAMBDA, lambda_exp=IE_LAMBDA)
    return {
        "run": {
            "name": case.name,
            "seed": s.seed,
            "epochs": 100_000,  # each window plan is a new epoch; max_steps ends it
            "out_dir": str(out_dir),
            "progress": False,
            "device": "cpu" if s.device == "cpu" else "auto",
            "mixed_precision": s.mixed_precision,
            "channels_last": s.channels_last,
            "compile": s.compile,
            "max_steps": max(s.warmup, 1),
            "keep_checkpoints": 2,
        },
        "data": data,
        "peers": [{"model": m} for m in peer_models(case, s.models)],
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "scheduler": {"name": "constant"},
        "strategy": strategy,
        "schedule": {"mode": case.mode},
    }


def build_trainer(case: Case, s: Settings, out_dir: Path, data_root: str | None = None,
                  callbacks: Sequence[Callback] = ()) -> Trainer:
    """The engine's Trainer for ``case``, built from :func:`recipe_dict`."""
    where = f"<bench {case.name}>"
    return Trainer(parse_recipe(recipe_dict(case, s, out_dir, data_root), file=where), recipe_file=where,
                   callbacks=callbacks)


def write_fake_cifar(root: Path, kind: str, *, n_train: int, n_test: int, seed: int) -> Path:
    """A CIFAR tree of seeded random images in torchvision's pickle layout under ``root`` (the data to time on)."""
    rng = np.random.default_rng(seed)
    k = 10 if kind == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"

    def dump(obj: dict[bytes, object], name: str) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def batch(n: int) -> dict[bytes, object]:
        labels = rng.permutation(np.arange(n) % k)
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [int(v) for v in labels]}

    if kind == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            dump(batch(len(part)), f"data_batch_{i}")
        dump(batch(n_test), "test_batch")
        dump({b"label_names": [f"class{i}".encode() for i in range(k)]}, "batches.meta")
    else:
        dump(batch(n_train), "train")
        dump(batch(n_test), "test")
        dump({b"fine_label_names": [f"fine{i}".encode() for i in range(k)]}, "meta")
    return folder
