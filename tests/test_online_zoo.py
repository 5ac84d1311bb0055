"""KDCL, FFL, MCL and SwitOKD on the engine, and the class-balanced batches MCL needs."""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mutualkd import get_strategy, registry
from mutualkd.config import DataConfig, parse_recipe
from mutualkd.data import build_pipeline
from mutualkd.data.sampling import balanced_batches, check_balanced
from mutualkd.errors import DataError
from mutualkd.testing import check_strategy

Factory = Callable[..., Any]


def _trainer(raw: dict[str, Any]) -> Any:
    from mutualkd.engine import Trainer

    return Trainer(parse_recipe(raw, file="<test>"), recipe_file="<test>")


def test_the_zoo_is_installed() -> None:
    assert {"kdcl", "ffl", "mcl", "switokd"} <= set(registry.names("strategy"))


@pytest.mark.parametrize("name, params, peers", [
    ("kdcl", {"variant": "mean"}, 2), ("kdcl", {"variant": "min_logit"}, 3), ("kdcl", {"variant": "best"}, 2),
    ("ffl", {"rampup_epochs": 1}, 2), ("mcl", {}, 2), ("switokd", {}, 2),
])
def test_each_passes_the_conformance_kit(tmp_path: Path, name: str, params: dict[str, Any], peers: int) -> None:
    check_strategy(get_strategy(name), params=params, peers=peers, tmp_path=tmp_path, modes=["alternating"])


def test_ffl_fusion_has_its_own_optimizer_and_weight_decay(tmp_path: Path, recipe_dict: Factory) -> None:
    raw = recipe_dict(tmp_path, strategy={"name": "ffl", "rampup_epochs": 1}, peers=1)
    raw["peers"] = [{"model": "cifar_resnet20", "name": "net", "branches": 2, "split_after": "layer2"}]
    tr = _trainer(raw)
    assert set(tr.units) == {"net", "fusion"}
    fusion_wd = {g["weight_decay"] for g in tr.units["fusion"].optimizer.param_groups}
    net_wd = {g["weight_decay"] for g in tr.units["net"].optimizer.param_groups}
    assert fusion_wd == {1e-5} and net_wd == {5e-4}


def test_kdcl_networks_see_their_own_views(tmp_path: Path, recipe_dict: Factory) -> None:
    tr = _trainer(recipe_dict(tmp_path, strategy="kdcl", peers=2))
    x, _ = next(iter(tr.train_loader))
    assert x.ndim == 5 and x.shape[0] == 2 and not torch.equal(x[0], x[1])


# --------------------------------------------------------------------------- SwitOKD


def test_switokd_expert_batches_leave_the_teacher_untouched(tmp_path: Path, recipe_dict: Factory) -> None:
    """A trained teacher and a fresh student: expert mode appears, and on those batches only the student moves."""
    teacher_run = _trainer(recipe_dict(tmp_path / "t", strategy="independent", peers=["cifar_resnet20"], name="teacher",
                                       max_steps=None, epochs=3, batch_size=32))
    teacher_run.fit()
    raw = recipe_dict(tmp_path / "s", strategy="switokd", peers=["cifar_resnet20", "cifar_resnet20"], max_steps=None,
                      epochs=1, batch_size=32)
    raw["peers"][0]["weights"] = str(tmp_path / "t" / "teacher")
    tr = _trainer(raw)
    teacher = tr.unwrapped("peer0")
    modes = []
    loader = iter(tr.train_loader)
    for _ in range(6):
        before = [p.detach().clone() for p in teacher.parameters()]
        x, y = next(loader)
        result = tr.train_step(x, y)
        expert = float(result.scalars["expert"])
        moved = not all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
        assert moved == (expert == 0.0), (expert, moved)
        assert ("peer0/ce" in result.terms["all"]) == (expert == 0.0)
        modes.append(expert)
    assert 1.0 in modes  # a trained teacher, an untrained student: expert mode


def test_switokd_logs_the_share_of_expert_batches_per_epoch(tmp_path: Path, recipe_dict: Factory) -> None:
    tr = _trainer(recipe_dict(tmp_path, strategy="switokd", peers=2, max_steps=None, epochs=2, batch_size=64))
    tr.fit()
    lines = [json.loads(s) for s in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    steps = [r for r in lines if r["kind"] == "step"]
    assert len(epochs) == 2 and all(0.0 <= r["scalars"]["expert"] <= 1.0 for r in epochs)
    first = [r["scalars"]["expert"] for r in steps if r["epoch"] == 1]  # log_every = 1: every batch
    assert epochs[0]["scalars"]["expert"] == pytest.approx(sum(first) / len(first))


# --------------------------------------------------------------------------- class-balanced batches


def _labels(n_per_class: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])


def test_every_balanced_batch_holds_m_images_of_each_of_its_classes() -> None:
    labels = _labels([23, 40, 17, 31, 9, 50])
    batches = balanced_batches(labels, 8, 2, seed=3, epoch=1)
    assert len(batches) > 0 and len({i for b in batches for i in b}) == batches.size  # no image twice
    for b in batches:
        counts = np.bincount(labels[b])
        assert sorted(counts[counts > 0]) == [2, 2, 2, 2]
    again = balanced_batches(labels, 8, 2, seed=3, epoch=1)
    assert np.array_equal(batches, again)  # a pure function of (seed, epoch)
    assert not np.array_equal(batches, balanced_batches(labels, 8, 2, seed=3, epoch=2))
    with pytest.raises(DataError) as e:
        check_balanced(labels, 16, 2)  # 8 classes per batch, 6 exist
    assert e.value.field == "data.images_per_class"
    # Each hint names settings that would work, never a batch of 0.
    with pytest.raises(DataError) as e:
        check_balanced(labels, 8, 12)
    assert "e.g. 12)" in e.value.hint
    with pytest.raises(DataError) as e:
        check_balanced(labels, 20, 3)
    assert "e.g. 18 or 21" in e.value.hint
    with pytest.raises(DataError) as e:
        check_balanced(np.arange(10), 4, 2)  # one image of each class
    assert "no class" in str(e.value) and "lower images_per_class" in e.value.hint


@pytest.mark.parametrize("pipeline", ["device", "stream"])
def test_balanced_batches_in_both_pipelines_resume_the_same_sequence(
    tmp_path: Path, pipeline: str, write_image_folder: Factory
) -> None:
    if pipeline == "device":
        cfg = DataConfig(dataset="digits", batch_size=20, images_per_class=2, augment=False)
    else:
        root = write_image_folder(tmp_path / "imgs", n_train=120, n_test=20)
        cfg = DataConfig(dataset="image_folder", root=str(root), image_size=8, pipeline="stream", num_workers=0,
                         batch_size=20, images_per_class=2, augment=False)
    pipe = build_pipeline(cfg, seed=5, device="cpu")
    loader = pipe.train
    loader.set_epoch(1)
    full = list(loader)
    for _, y in full:
        counts = torch.bincount(y)
        assert sorted(counts[counts > 0].tolist()) == [2] * 10
    loader.set_epoch(1)
    loader.start_batch = 2
    rest = list(loader)
    assert len(rest) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_a_recipe_whose_batch_cannot_be_balanced_exits_2(tmp_path: Path, recipe_dict: Factory, run_cli: Factory
                                                          ) -> None:
    raw = recipe_dict(tmp_path, strategy="mcl", peers=2, data={"batch_size": 64, "images_per_class": 2})
    path = tmp_path / "mcl.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    done = run_cli(["validate", str(path)])
    assert done.returncode == 2 and "images_per_class" in done.stderr and "Traceback" not in done.stderr
