"""Shared helpers of the engine, IE, CLI, recipe and distributed tests.

Runs are kept tiny: scikit-learn's 8x8 digits, small batches, ``run.max_steps``, the
CIFAR-style ResNet-20 / WRN-16-1 peers, no progress bar.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import copy
import json
import os
from pathlib import Path
import subprocess
import sys
from typing import Any

import torch
from torch import nn

from mutualkd.config import Recipe, parse_recipe

# The tiny networks of these tests gain nothing from intra-op threads, and on a shared
# 2-core machine OpenMP's spinning threads made runs ~10x slower (measured: 10 IE-DML
# steps, 1 thread 1 s CPU, 2 threads 12 s CPU). Subprocesses get OMP_NUM_THREADS=1.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
QUICKSTART = RECIPES / "quickstart.toml"
#: Size of the digits test split (fixed: 25 % of 1797, stratified).
DIGITS_TEST = 450

SMALL_MODELS = ("cifar_resnet20", "cifar_wrn_16_1")


def recipe_dict(
    out_dir: str | Path,
    *,
    strategy: str | Mapping[str, Any] = "kl_dml",
    peers: Iterable[str] | int = 2,
    mode: str = "alternating",
    name: str = "t",
    max_steps: int | None = 2,
    epochs: int = 1,
    batch_size: int = 8,
    log_every: int = 1,
    **sections: Mapping[str, Any],
) -> dict[str, Any]:
    """A raw recipe dict for a tiny digits run written under ``out_dir``.

    ``sections`` (``run=...``, ``data=...``, ``optimizer=...``) are merged into the
    defaults; ``strategy`` is a name or a whole ``[strategy]`` table.
    """
    if isinstance(peers, int):
        peers = [SMALL_MODELS[i % 2] for i in range(peers)]
    run: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "epochs": epochs,
        "out_dir": str(out_dir),
        "progress": False,
        "log_every": log_every,
        "device": "cpu",
    }
    if max_steps is not None:
        run["max_steps"] = max_steps
    data: dict[str, Any] = {"dataset": "digits", "batch_size": batch_size, "eval_batch_size": 512}
    d: dict[str, Any] = {
        "run": run,
        "data": data,
        "peers": [{"model": m} for m in peers],
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "scheduler": {"name": "constant"},
        "strategy": {"name": strategy} if isinstance(strategy, str) else dict(strategy),
        "schedule": {"mode": mode},
    }
    for key, table in sections.items():
        if isinstance(table, Mapping) and isinstance(d.get(key), dict):
            d[key].update(table)
        else:
            d[key] = copy.deepcopy(table)
    return d


def make_recipe(out_dir: str | Path, **kw: Any) -> Recipe:
    return parse_recipe(recipe_dict(out_dir, **kw), file="<test>")


def make_trainer(out_dir: str | Path, **kw: Any):
    from mutualkd.engine import Trainer

    return Trainer(make_recipe(out_dir, **kw), recipe_file="<test>")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def step_terms(records: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The flat ``peer/term`` values of each step record (all steps of a batch merged)."""
    out = []
    for r in records:
        if r.get("kind") != "step":
            continue
        flat: dict[str, float] = {}
        for terms in r["steps"].values():
            flat.update(terms)
        out.append(flat)
    return out


def param_snapshot(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of every parameter (not buffers) of each named module (as ``Trainer.unwrapped`` gives them)."""
    return {name: {k: p.detach().clone() for k, p in m.named_parameters()} for name, m in modules.items()}


def changed(before: Mapping[str, Mapping[str, torch.Tensor]], after: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Per module, the fraction of its parameter tensors that differ between two snapshots."""
    out = {}
    for name, params in before.items():
        diff = [not torch.equal(params[k], after[name][k]) for k in params]
        out[name] = sum(diff) / max(len(diff), 1)
    return out


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "200"  # rich wraps error messages at the terminal width
    env.update(extra)
    return env


def run_cli(args: list[str], *, cwd: str | Path | None = None, timeout: float = 240, env: Mapping[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``python -m mutualkd ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "mutualkd", *args],
        cwd=str(cwd) if cwd is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else subprocess_env(),
    )


TINY_SET = [
    "run.progress=false",
    "run.max_steps=2",
    "run.epochs=1",
    "data.batch_size=8",
    "data.eval_batch_size=64",
]


def sets(*items: str) -> list[str]:
    """``--set`` options for the CLI."""
    out: list[str] = []
    for it in items:
        out += ["--set", it]
    return out
