"""A recipe is resolved once, when it is loaded: the strategy's parameters, the pipeline's keys, the input spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mutualkd.config import load_recipe, parse_recipe
from mutualkd.errors import RecipeError, UserError

FILE = "r.toml"
PEERS = [{"model": "cifar_resnet20"}, {"model": "cifar_resnet20"}]


def _recipe_file(tmp_path: Path, quickstart: Path, *lines: str) -> Path:
    """The quickstart recipe with ``lines`` added to its [strategy] table (the last table it has)."""
    text = quickstart.read_text(encoding="utf-8")
    p = tmp_path / "r.toml"
    p.write_text(text.replace("[strategy]\n", "[strategy]\n" + "".join(f"{x}\n" for x in lines), 1), encoding="utf-8")
    return p


@pytest.fixture
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if an Accelerator is constructed or a run lock taken."""
    import accelerate

    import mutualkd.runlock as runlock

    def boom(*_: Any, **__: Any) -> None:
        raise AssertionError("built something before the recipe was refused")

    monkeypatch.setattr(accelerate.Accelerator, "__init__", boom)
    monkeypatch.setattr(runlock.RunLock, "__init__", boom)


# --------------------------------------------------------------------------- the strategy's parameters


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_misspelt_strategy_parameter_exits_2_before_anything_is_built(
        command: str, tmp_path: Path, quickstart_recipe: Path, nothing_built: None) -> None:
    from mutualkd.cli import app

    recipe = _recipe_file(tmp_path, quickstart_recipe, "temprature = 3.0")
    out_dir = tmp_path / "runs"
    result = CliRunner().invoke(app, [command, str(recipe), "--set", f"run.out_dir={out_dir.as_posix()!r}"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "[strategy.temprature]" in text and "did you mean 'temperature'" in text, text
    assert "Traceback" not in result.output
    assert not out_dir.exists(), "no run folder may be created for a refused recipe"


def test_the_parameters_are_validated_once_at_load(quickstart_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mutualkd.engine import check_recipe, resolve_strategy
    from mutualkd.recipe_doc import explain

    recipe = load_recipe(quickstart_recipe, ["strategy.temperature=3"])
    cls, params = recipe.strategy.resolved  # type: ignore[misc]
    assert params.temperature == 3.0

    def again(*_: Any, **__: Any) -> None:
        raise AssertionError("the strategy's parameters were validated again")

    monkeypatch.setattr(cls.Params, "model_validate", classmethod(again))
    assert resolve_strategy(recipe, FILE) == (cls, params)
    check_recipe(recipe, recipe_file=FILE, data=False)
    rows = {r.key: r for r in explain(recipe)}  # what validate --explain prints
    assert rows["strategy.temperature"].value == "3.0" and rows["strategy.temperature"].source == "recipe"


def test_an_unknown_strategy_is_refused_at_load_listing_the_installed_ones() -> None:
    with pytest.raises(UserError) as ei:
        parse_recipe({"peers": PEERS, "strategy": {"name": "kl_dmll"}}, file=FILE)
    assert ei.value.exit_code == 2 and ei.value.where == f"{FILE} [strategy.name]"
    assert "did you mean 'kl_dml'" in str(ei.value) and "independent" in str(ei.value)


# --------------------------------------------------------------------------- keys the pipeline would ignore


@pytest.mark.parametrize("key,value", [("num_workers", 4), ("auto_augment", "rand-m9-mstd0.5"), ("hflip", 0.0),
                                       ("crop_pct", 0.9), ("mean", [0.5])])
def test_a_stream_only_key_under_the_device_pipeline_is_refused(key: str, value: Any) -> None:
    with pytest.raises(RecipeError) as ei:
        parse_recipe({"peers": PEERS, "data": {"dataset": "digits", key: value}}, file=FILE)
    text = str(ei.value)
    assert ei.value.field == f"data.{key}" and f"data.{key} is used only by the stream pipeline" in text
    assert "resolved to 'device' because digits fits in memory" in text and 'data.pipeline = "stream"' in text


def test_a_stream_only_key_is_refused_by_mutualkd_validate(tmp_path: Path, quickstart_recipe: Path) -> None:
    from mutualkd.cli import app

    result = CliRunner().invoke(app, ["validate", str(quickstart_recipe), "--no-data", "--set",
                                      "data.auto_augment='rand-m9-mstd0.5'", "--set", "data.reprob=0.25"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "data.auto_augment, data.reprob are used only by the stream pipeline" in text, text


def test_stream_keys_are_taken_by_the_stream_pipeline_and_at_their_defaults() -> None:
    parse_recipe({"peers": PEERS, "data": {"dataset": "digits", "pipeline": "stream", "num_workers": 0,
                                           "auto_augment": "rand-m9-mstd0.5"}}, file=FILE)
    recipe = parse_recipe({"peers": PEERS, "data": {"dataset": "digits", "num_workers": 2, "hflip": None}}, file=FILE)
    assert "num_workers" in recipe.data.model_fields_set  # written out, at the default: nothing is ignored


def test_a_full_recipe_written_out_loads_again(tmp_path: Path, quickstart_recipe: Path) -> None:
    """A run folder's recipe.toml holds every key, the stream pipeline's defaults too."""
    from mutualkd.runlog import dump_toml

    recipe = load_recipe(quickstart_recipe)
    p = tmp_path / "recipe.toml"
    p.write_text(dump_toml(recipe.to_dict()), encoding="utf-8")
    assert load_recipe(p) == recipe


def test_augmentation_keys_with_augment_off_are_refused() -> None:
    with pytest.raises(RecipeError) as ei:
        parse_recipe({"peers": PEERS, "data": {"pipeline": "stream", "augment": False, "reprob": 0.25}}, file=FILE)
    assert ei.value.field == "data.reprob" and "data.augment = false" in str(ei.value)
    parse_recipe({"peers": PEERS, "data": {"pipeline": "stream", "augment": False, "num_workers": 0}}, file=FILE)


def test_memory_budget_only_with_the_auto_pipeline() -> None:
    with pytest.raises(RecipeError) as ei:
        parse_recipe({"peers": PEERS, "data": {"pipeline": "device", "memory_budget_gb": 8}}, file=FILE)
    assert ei.value.field == "data.memory_budget_gb" and 'data.pipeline = "auto"' in str(ei.value)


# --------------------------------------------------------------------------- the input spec


def test_validate_and_the_engine_resolve_the_same_input_spec(quickstart_recipe: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mutualkd.data import build_pipeline
    from mutualkd.data import pipeline as pipeline_mod
    from mutualkd.engine import check_recipe

    seen: list[Any] = []
    real = pipeline_mod.resolve_data

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(pipeline_mod, "resolve_data", spy)
    recipe = load_recipe(quickstart_recipe, ["data.image_size=16", "data.train_subset=100", "data.test_subset=50"])
    check_recipe(recipe, recipe_file=FILE, data=True)
    pipe = build_pipeline(recipe.data, seed=recipe.run.seed, device=torch.device("cpu"))
    assert len(seen) == 2, "validate and the engine each resolve the data once, through resolve_data"
    validated, built = seen
    assert validated.input == built.input == pipe.input
    assert pipe.input.input_size == (1, 16, 16) and pipe.info.image_size == (16, 16)
    assert (pipe.input.mean, pipe.input.std) == (pipe.info.mean, pipe.info.std)
    x, _ = next(iter(pipe.test))
    assert tuple(x.shape[1:]) == pipe.input.input_size
