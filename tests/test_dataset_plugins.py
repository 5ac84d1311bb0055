"""Data sets as plugins: the built-ins come through the entry-point group ``mutualkd.datasets``,
a recipe's name is checked against what is installed, one plugin serves both pipelines, and a
broken plugin is reported naming it while the others keep working."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata
import json
from pathlib import Path
import tomllib
from typing import Any

import numpy as np
import pytest
import torch

from mutualkd import registry
from mutualkd.config import DataConfig, parse_recipe
from mutualkd.data import (
    DatasetPlugin,
    DataSources,
    SplitSource,
    build_pipeline,
    dataset_plugin,
    list_datasets,
    load_dataset,
    register_dataset,
)
from mutualkd.data.digits import digits as digits_plugin
from mutualkd.errors import DataError, PluginError, RecipeError
from mutualkd.testing import registered

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "broken-dataset"
TWO_PEERS = '\n[[peers]]\nmodel = "cifar_resnet20"\n\n[[peers]]\nmodel = "cifar_resnet20"\n'
BUILTINS = {
    "digits": "mutualkd.data.digits:digits",
    "mnist": "mutualkd.data.idx:mnist",
    "fashion_mnist": "mutualkd.data.idx:fashion_mnist",
    "cifar10": "mutualkd.data.cifar:cifar10",
    "cifar100": "mutualkd.data.cifar:cifar100",
    "image_folder": "mutualkd.data.images:image_folder",
    "image_tar": "mutualkd.data.images:image_tar",
}


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(registry.ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(registry.ENV_BLOCK, raising=False)
    registry.reset()
    yield
    for source in registry.blocks():
        registry.block([], source=source)
    registry.reset()


# --------------------------------------------------------------------------- the built-ins, through the same door


def test_builtins_are_entry_points_of_the_mutualkd_distribution() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mutualkd.datasets"]
    assert declared == BUILTINS
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="mutualkd.datasets")
                 if ep.dist is not None and ep.dist.metadata["Name"] == "mutualkd"}
    assert installed == BUILTINS, "reinstall mutualkd (make install) to refresh its entry points"
    rows = {i.name: i for i in registry.infos(load=True) if i.kind == "dataset"}
    for name, value in BUILTINS.items():
        assert (rows[name].distribution, rows[name].value, rows[name].status) == ("mutualkd", value, "ok")
    assert set(BUILTINS) <= set(list_datasets())
    assert dataset_plugin("digits") is digits_plugin


def test_a_blocked_builtin_is_refused_like_any_plugin() -> None:
    # the core holds no table of its own: blocking the entry point takes the set away
    registry.block(["dataset:digits"])
    with pytest.raises(PluginError, match="dataset 'digits' from mutualkd is blocked by --block-plugin"):
        load_dataset(DataConfig(dataset="digits"))
    registry.block([])
    assert load_dataset(DataConfig(dataset="digits", test_subset=10))[1].labels.shape == (10,)


def test_old_style_loader_function_registers_in_process() -> None:
    def tiny_set(cfg: DataConfig) -> Any:
        train, test, info = digits_plugin.splits(cfg)
        return train, test, info

    try:
        assert register_dataset(tiny_set) is tiny_set
        assert "tiny_set" in list_datasets() and DataConfig(dataset="tiny_set").dataset == "tiny_set"
        assert load_dataset(DataConfig(dataset="tiny_set"))[2].name == "digits"
        with pytest.raises(ValueError, match=r"'image_tar' is registered twice: mutualkd\.data\.images\.image_tar"):
            register_dataset(tiny_set, "image_tar")
    finally:
        registry.unregister("dataset", "tiny_set")


# --------------------------------------------------------------------------- the recipe's name


def test_unknown_name_is_a_recipe_error_listing_the_installed_sets() -> None:
    with pytest.raises(RecipeError) as exc:
        parse_recipe({"data": {"dataset": "cifar11"}, "peers": [{"model": "cifar_resnet20"}] * 2}, file="r.toml")
    text = str(exc.value)
    assert exc.value.field == "data.dataset" and "r.toml" in text
    assert "did you mean 'cifar10' or 'cifar100'?" in text
    assert "known data set names: " + ", ".join(sorted(list_datasets())) in text


def test_validate_exits_2_for_an_unknown_name(tmp_path: Path, run_cli: Any) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ndataset = "fashion_mnis"\n{TWO_PEERS}')
    proc = run_cli(["validate", str(recipe)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "[data.dataset]: unknown data set 'fashion_mnis'" in err and "did you mean 'fashion_mnist'" in err
    assert "known data set names: " in err and "image_folder" in err and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- one plugin, both pipelines


class _Files:
    """A map-style source of generated images (not in memory as a Split): what a file-backed plugin gives."""

    def __init__(self, n: int, offset: int) -> None:
        g = np.random.default_rng(offset)
        self.pixels = g.integers(0, 256, size=(n, 12, 12, 3), dtype=np.uint8)
        self.labels = np.arange(n, dtype=np.int64) % 3
        self.num_classes, self.in_chans = 3, 3

    def __len__(self) -> int:
        return len(self.labels)

    def open(self, i: int) -> Any:
        from PIL import Image

        return Image.fromarray(self.pixels[i], mode="RGB")

    def name(self, i: int) -> str:
        return f"generated image {i}"


class Generated(DatasetPlugin):
    def sources(self, cfg: DataConfig) -> DataSources:
        return DataSources(_Files(30, 0), _Files(12, 1), ("a", "b", "c"), image_size=(12, 12), augment="crop")


def test_one_plugin_serves_the_device_and_the_stream_pipeline() -> None:
    with registered("dataset", "generated", Generated):
        train, test, info = load_dataset(DataConfig(dataset="generated"))
        assert train.images.shape == (30, 3, 12, 12) and test.images.shape == (12, 3, 12, 12)
        assert torch.equal(train.images[4], torch.from_numpy(_Files(30, 0).pixels[4]).permute(2, 0, 1))
        assert (info.name, info.num_classes, info.augment, info.padding) == ("generated", 3, "crop", 2)
        assert len(info.mean) == 3  # computed from the decoded train split
        resized = load_dataset(DataConfig(dataset="generated", image_size=24))[2]
        assert resized.image_size == (24, 24) and resized.padding == 3
        cfg = DataConfig(dataset="generated", pipeline="stream", num_workers=0, batch_size=8, image_size=16)
        pipe = build_pipeline(cfg, seed=0, device="cpu")
        x, y = next(iter(pipe.train))
        assert pipe.kind == "stream" and x.shape == (8, 3, 16, 16) and set(y.tolist()) <= {0, 1, 2}
        assert build_pipeline(cfg.model_copy(update={"pipeline": "auto"}), seed=0, device="cpu").kind == "device"


def test_in_memory_builtins_keep_their_splits_on_both_pipelines() -> None:
    cfg = DataConfig(dataset="digits")
    src = dataset_plugin("digits").sources(cfg)
    train, _, info = load_dataset(cfg)
    assert isinstance(src.train, SplitSource) and src.image_size == (8, 8) and src.mean == info.mean
    assert torch.equal(src.train.images, train.images) and src.classes == tuple("0123456789")


# --------------------------------------------------------------------------- broken plugins


class Raises(DatasetPlugin):
    def sources(self, cfg: DataConfig) -> DataSources:
        raise RuntimeError("the reader lost its index")


def test_a_plugin_that_raises_while_loading_is_named() -> None:
    with registered("dataset", "raises", Raises):
        with pytest.raises(DataError) as exc:
            load_dataset(DataConfig(dataset="raises"))
    text = str(exc.value)
    assert exc.value.field == "data.dataset"
    assert "data set plugin 'raises' from <test>" in text and "test_dataset_plugins:Raises" in text
    assert "failed in splits(): RuntimeError: the reader lost its index" in text
    assert "fault of the plugin, not of the recipe" in text


def test_a_plugin_that_raises_a_data_error_keeps_its_message() -> None:
    class Missing(DatasetPlugin):
        def sources(self, cfg: DataConfig) -> DataSources:
            raise DataError("no files under /nowhere", field="data.root", hint="point root at them")

    with registered("dataset", "missing", Missing), pytest.raises(DataError) as exc:
        load_dataset(DataConfig(dataset="missing"))
    assert str(exc.value).startswith("[data.root]: no files under /nowhere")


def test_register_refuses_what_is_not_a_dataset_plugin() -> None:
    with pytest.raises(PluginError, match="must be a mutualkd.data.DatasetPlugin"):
        registry.register("dataset", "nope", lambda cfg: None)

    class NoSources(DatasetPlugin):
        pass

    with pytest.raises(PluginError, match="does not implement sources"):
        registry.register("dataset", "nope", NoSources)


@pytest.fixture(scope="module")
def broken_site(pip_install_copy: Callable[[Path], Path]) -> Path:
    """The broken fixture distribution, installed with pip into a folder of its own."""
    return pip_install_copy(FIXTURE)


def test_installed_broken_plugins_are_reported_and_the_rest_work(broken_site: Path, tmp_path: Path,
                                                                 run_cli: Any, subprocess_env: Any) -> None:
    env = subprocess_env(PYTHONPATH=f"{broken_site}:{ROOT}:{ROOT / 'plugins'}")
    proc = run_cli(["plugins", "--json"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    broken = rows[("dataset", "broken_import")]
    assert broken["status"] == "error" and broken["distribution"] == "mutualkd-broken-dataset"
    assert "import failed: ImportError: mutualkd_broken_dataset_import needs the package 'no_such_reader'" in broken[
        "error"]
    assert "must be a mutualkd.data.DatasetPlugin" in rows[("dataset", "not_a_dataset")]["error"]
    assert rows[("dataset", "digits")]["status"] == "ok"

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ndataset = "broken_import"\n{TWO_PEERS}')
    proc = run_cli(["validate", str(recipe)], cwd=tmp_path, env=env)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert "dataset 'broken_import' from mutualkd-broken-dataset 0.0.1" in err and "no_such_reader" in err
    assert "Traceback" not in proc.stderr
