"""Tests of mutualkd.config: reading, overriding and validating recipes."""

from __future__ import annotations

import copy
from pathlib import Path
import tomllib
from typing import Any

import pytest

from mutualkd.config import Recipe, apply_overrides, load_recipe, parse_recipe, read_toml
from mutualkd.errors import RecipeError, UserError

REPO = Path(__file__).resolve().parents[1]  # REFERENCE (below) is a module constant
FILE = "my_recipe.toml"


@pytest.fixture(scope="module")
def base(quickstart_recipe: Path) -> dict[str, Any]:
    with open(quickstart_recipe, "rb") as f:
        return tomllib.load(f)


def _bad(base: dict[str, Any], edit) -> RecipeError:
    d = copy.deepcopy(base)
    edit(d)
    with pytest.raises(RecipeError) as ei:
        parse_recipe(d, file=FILE)
    return ei.value


# --------------------------------------------------------------------------- valid recipes


def test_quickstart_parses(quickstart_recipe):
    r = load_recipe(quickstart_recipe)
    assert isinstance(r, Recipe)
    assert [p.model for p in r.peers] == ["cifar_resnet20", "cifar_wrn_16_1"]
    assert r.strategy.name == "kl_dml"
    assert r.strategy.params == {"temperature": 1.0, "weight": 1.0}
    assert r.schedule.mode == "alternating"
    assert r.run.epochs == 15 and r.data.batch_size == 32 and r.optimizer.lr == 0.05
    assert r.peer_names() == ["peer0", "peer1"]
    # A peer without its own optimizer/scheduler uses the shared ones.
    assert r.peer_optimizer(1) is r.optimizer and r.peer_scheduler(0) is r.scheduler


def test_minimal_recipe_gets_defaults():
    r = parse_recipe({"peers": [{"model": "cifar_resnet20"}]})
    assert r.run.epochs == 1 and r.data.dataset == "digits" and r.schedule.mode == "alternating"
    assert r.strategy.name == "kl_dml" and r.strategy.params == {}


def test_peer_overrides_and_names():
    r = parse_recipe(
        {
            "peers": [
                {"model": "cifar_resnet20", "name": "a", "optimizer": {"lr": 0.01}},
                {"model": "cifar_wrn_16_1"},
            ]
        }
    )
    assert r.peer_names() == ["a", "peer1"]
    assert r.peer_optimizer(0).lr == 0.01 and r.peer_optimizer(1).lr == 0.1


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "edit, field, key, suggestion",
    [
        (lambda d: d.__setitem__("runn", {"epochs": 2}), "runn", "runn", "run"),
        (lambda d: d["run"].__setitem__("epocs", 3), "run.epocs", "epocs", "epochs"),
        (lambda d: d["data"].__setitem__("batchsize", 3), "data.batchsize", "batchsize", "batch_size"),
        (lambda d: d["peers"][1].__setitem__("modle", "x"), "peers[1].modle", "modle", "model"),
        (lambda d: d["optimizer"].__setitem__("momentun", 0.5), "optimizer.momentun", "momentun", "momentum"),
    ],
    ids=["top-level", "run", "data", "peers", "optimizer"],
)
def test_unknown_key_names_file_path_and_close_match(base, edit, field, key, suggestion):
    e = _bad(base, edit)
    assert e.file == FILE
    assert e.field == field
    text = str(e)
    assert FILE in text and f"[{field}]" in text
    assert "unknown key" in text
    assert "did you mean" in text and repr(suggestion) in text
    assert key in (e.hint or "")


def test_unknown_key_in_peer_optimizer(base):
    e = _bad(base, lambda d: d["peers"][0].__setitem__("optimizer", {"lrr": 0.1}))
    assert e.field == "peers[0].optimizer.lrr"
    assert "'lr'" in str(e)


def test_unknown_key_without_close_match_lists_known_keys(base):
    e = _bad(base, lambda d: d["run"].__setitem__("zzzzzz", 1))
    assert "known keys" in str(e) and "epochs" in str(e)


def test_several_errors_are_all_reported(base):
    def edit(d):
        d["run"]["epocs"] = 3
        d["optimizer"]["lr"] = -1

    e = _bad(base, edit)
    text = str(e)
    assert "2 fields are invalid" in text
    assert "[run.epocs]" in text and "[optimizer.lr]" in text


# --------------------------------------------------------------------------- types and ranges


def test_wrong_type(base):
    e = _bad(base, lambda d: d["run"].__setitem__("epochs", "five"))
    assert e.field == "run.epochs"
    assert "integer" in str(e) and "'five'" in str(e)


def test_wrong_type_bool(base):
    e = _bad(base, lambda d: d["data"].__setitem__("augment", "maybe"))
    assert e.field == "data.augment" and "bool" in str(e).lower()


@pytest.mark.parametrize("lr", [0, 0.0, -0.1])
def test_lr_must_be_positive(base, lr):
    e = _bad(base, lambda d: d["optimizer"].__setitem__("lr", lr))
    assert e.field == "optimizer.lr"
    assert "greater than 0" in str(e)


def test_batch_size_zero(base):
    e = _bad(base, lambda d: d["data"].__setitem__("batch_size", 0))
    assert e.field == "data.batch_size" and "greater than 0" in str(e)


def test_literal_error_lists_allowed_values(base):
    e = _bad(base, lambda d: d["schedule"].__setitem__("mode", "alternate"))
    assert e.field == "schedule.mode"
    text = str(e)
    assert "'alternate'" in text and "'alternating'" in text and "'simultaneous'" in text


def test_dataset_literal(base):
    e = _bad(base, lambda d: d["data"].__setitem__("dataset", "cifar"))
    assert e.field == "data.dataset"
    for allowed in ("digits", "cifar10", "cifar100", "fashion_mnist"):
        assert allowed in str(e)


def test_peers_required_and_non_empty(base):
    e = _bad(base, lambda d: d.pop("peers"))
    assert e.field == "peers" and "missing" in str(e)
    e = _bad(base, lambda d: d.__setitem__("peers", []))
    assert e.field == "peers"


def test_reserved_kwargs_refused(base):
    e = _bad(base, lambda d: d["peers"][0].__setitem__("kwargs", {"num_classes": 3}))
    assert e.field == "peers[0].kwargs" and "num_classes" in str(e)
    e = _bad(base, lambda d: d["peers"][0].__setitem__("kwargs", {"pretrained": True}))
    assert "pretrained" in str(e)


def test_duplicate_peer_names(base):
    def edit(d):
        d["peers"][0]["name"] = "x"
        d["peers"][1]["name"] = "x"

    e = _bad(base, edit)
    assert "unique" in str(e) and "x" in str(e)


def test_milestones_must_increase(base):
    e = _bad(base, lambda d: d["scheduler"].update(name="multistep", milestones=[60, 30]))
    assert e.field == "scheduler.milestones" and "increasing" in str(e)


def test_nesterov_needs_momentum(base):
    e = _bad(base, lambda d: d["optimizer"].update(momentum=0.0, nesterov=True))
    assert "nesterov" in str(e)


def test_strategy_params_are_kept_for_the_plugin(base):
    d = copy.deepcopy(base)
    d["strategy"]["temperature"] = 3  # validated by the strategy's own model when the recipe loads
    recipe = parse_recipe(d)
    assert recipe.strategy.params["temperature"] == 3
    assert recipe.strategy.resolved is not None and recipe.strategy.resolved[1].temperature == 3.0


def test_a_key_the_strategy_does_not_take_is_refused_at_load(base):
    d = copy.deepcopy(base)
    d["strategy"]["anything"] = 1
    with pytest.raises(RecipeError) as ei:
        parse_recipe(d, file=FILE)
    assert ei.value.field == "strategy.anything" and "parameters of 'kl_dml'" in str(ei.value)


# --------------------------------------------------------------------------- --set overrides


def test_set_int(base):
    d = apply_overrides(base, ["run.epochs=5"])
    assert d["run"]["epochs"] == 5 and isinstance(d["run"]["epochs"], int)
    assert base["run"]["epochs"] == 15, "the input dict must not be modified"


def test_set_float_bool_string_list(base):
    d = apply_overrides(
        base,
        [
            "optimizer.lr=0.2",
            "run.progress=false",
            "data.augment=true",
            "run.name=hello",
            'run.out_dir="with space"',
            "scheduler.milestones=[3, 7]",
        ],
    )
    assert d["optimizer"]["lr"] == 0.2 and isinstance(d["optimizer"]["lr"], float)
    assert d["run"]["progress"] is False and d["data"]["augment"] is True
    assert d["run"]["name"] == "hello" and d["run"]["out_dir"] == "with space"
    assert d["scheduler"]["milestones"] == [3, 7]
    r = parse_recipe(d)
    assert r.scheduler.milestones == [3, 7] and r.run.progress is False


def test_set_list_index(base):
    d = apply_overrides(base, ["peers.0.model=x", "peers.1.kwargs.drop_rate=0.1"])
    assert d["peers"][0]["model"] == "x" and d["peers"][1]["model"] == "cifar_wrn_16_1"
    assert d["peers"][1]["kwargs"] == {"drop_rate": 0.1}


def test_set_inline_table(base):
    d = apply_overrides(base, ['strategy={name="ie_dml"}'])
    assert d["strategy"] == {"name": "ie_dml"}


def test_set_new_section_key(base):
    d = apply_overrides(base, ["strategy.temperature=4"])
    assert d["strategy"]["temperature"] == 4


@pytest.mark.parametrize("item", ["peers.2.model=x", "peers.-1.model=x", "peers.a.model=x", "peers.9=x"])
def test_set_bad_index(base, item):
    with pytest.raises(RecipeError) as ei:
        apply_overrides(base, [item], file=FILE)
    assert ei.value.file == FILE
    assert "index" in str(ei.value) and "0 to 1" in str(ei.value)


@pytest.mark.parametrize("item", ["run.epochs", "=3", "run..epochs=3"])
def test_set_malformed(base, item):
    with pytest.raises(RecipeError):
        apply_overrides(base, [item], file=FILE)


def test_set_into_a_value(base):
    with pytest.raises(RecipeError) as ei:
        apply_overrides(base, ["run.name.x=1"], file=FILE)
    assert ei.value.field == "run.name"


def test_set_wrong_value_is_a_validation_error(tmp_path, quickstart_recipe):
    p = tmp_path / "r.toml"
    p.write_bytes(quickstart_recipe.read_bytes())
    with pytest.raises(RecipeError) as ei:
        load_recipe(p, ["run.epochs=zero"])
    assert ei.value.field == "run.epochs" and ei.value.file == str(p)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p, ["run.epocs=3"])
    assert "'epochs'" in str(ei.value)


def test_load_recipe_applies_overrides(tmp_path, quickstart_recipe):
    r = load_recipe(quickstart_recipe, ["run.epochs=5", "peers.0.model=cifar_resnet32", "schedule.mode=simultaneous"])
    assert r.run.epochs == 5 and r.peers[0].model == "cifar_resnet32" and r.schedule.mode == "simultaneous"


# --------------------------------------------------------------------------- files


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError) as ei:
        load_recipe(tmp_path / "nope.toml")
    assert "not found" in str(ei.value) and "nope.toml" in str(ei.value)


def test_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError) as ei:
        load_recipe(tmp_path)
    assert "folder" in str(ei.value)


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('[run]\nname = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert "UTF-8" in str(ei.value) and str(p) in str(ei.value)


def test_toml_syntax_error_names_line(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text('[run]\nname = "x"\nepochs = = 3\n', encoding="utf-8")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    text = str(ei.value)
    assert "TOML syntax error" in text and str(p) in text
    assert "line 3" in text


def test_read_toml_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        read_toml(tmp_path / "missing.toml")


def test_every_recipe_error_is_a_user_error():
    assert issubclass(RecipeError, UserError) and RecipeError("x").exit_code == 2


def test_to_dict_round_trips(tmp_path, quickstart_recipe):
    from mutualkd.runlog import dump_toml

    r = load_recipe(quickstart_recipe, ["peers.1.kwargs.drop_rate=0.1"])
    p = Path(tmp_path) / "again.toml"
    p.write_text(dump_toml(r.to_dict()), encoding="utf-8")
    again = load_recipe(p)
    assert again == r


# --------------------------------------------------------------------------- strategy parameters


def _resolve(base: dict[str, Any], **strategy: Any):
    from mutualkd.engine import resolve_strategy

    d = copy.deepcopy(base)
    d["strategy"].update(strategy)
    return resolve_strategy(parse_recipe(d, file=FILE), FILE)


def test_strategy_params_validated_by_the_plugin(base):
    cls, params = _resolve(base, temperature=4.0, reduction="sum")
    assert cls.__name__ == "KLDML" and params.temperature == 4.0 and params.reduction == "sum"
    with pytest.raises(RecipeError) as ei:
        _resolve(base, reduction="avg")
    assert ei.value.field == "strategy.reduction" and "'mean'" in str(ei.value) and "'sum'" in str(ei.value)
    with pytest.raises(RecipeError) as ei:
        _resolve(base, temperature=0)
    assert ei.value.field == "strategy.temperature"


def test_unknown_strategy_param_names_path(base):
    with pytest.raises(RecipeError) as ei:
        _resolve(base, temprature=4.0)
    assert ei.value.file == FILE and ei.value.field == "strategy.temprature"
    assert "unknown key" in str(ei.value)


def test_unknown_strategy_param_suggests_close_match(base):
    with pytest.raises(RecipeError) as ei:
        _resolve(base, temprature=4.0)
    assert "did you mean" in str(ei.value) and "'temperature'" in str(ei.value)


def test_peer_count_checked_against_strategy(base):
    d = copy.deepcopy(base)
    d["peers"] = d["peers"][:1]
    from mutualkd.engine import resolve_strategy

    with pytest.raises(RecipeError) as ei:
        resolve_strategy(parse_recipe(d, file=FILE), FILE)
    assert ei.value.field == "peers" and "at least 2" in str(ei.value)


# --------------------------------------------------------------------------- the recipe reference

REFERENCE = REPO / "docs" / "recipes.md"


def _models() -> list[type]:
    from mutualkd import config

    return [config.Recipe, config.RunConfig, config.DataConfig, config.PeerConfig, config.OptimizerConfig,
            config.SchedulerConfig, config.StrategyConfig, config.ScheduleConfig]


def _repo_distributions() -> set[str]:
    """mutualkd and the example plugin distributions of plugins/: what `make install` installs."""
    names = {"mutualkd"}
    for p in (REPO / "plugins").glob("mutualkd-*/pyproject.toml"):
        names.add(tomllib.loads(p.read_text(encoding="utf-8"))["project"]["name"])
    return names


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_recipe_key_is_described(model):
    undescribed = [k for k, f in model.model_fields.items() if not (f.description or "").strip()]
    assert not undescribed, f"{model.__name__}: add Field(description=...) to {undescribed}"


def test_reference_is_up_to_date():
    from mutualkd.recipe_doc import REGENERATE, render_reference

    expected = render_reference(_repo_distributions())
    assert REFERENCE.is_file(), f"docs/recipes.md is missing; write it with `{REGENERATE}`"
    assert REFERENCE.read_text(encoding="utf-8") == expected, (
        f"docs/recipes.md is out of date with the recipe models; regenerate it with `{REGENERATE}` (make reference)"
    )


def test_reference_names_every_section_key_and_strategy_parameter():
    from mutualkd import get_strategy, registry
    from mutualkd.config import Recipe

    text = REFERENCE.read_text(encoding="utf-8")
    for section, info in Recipe.model_fields.items():
        assert f"### `[[{section}]]`" in text or f"### `[{section}]`" in text, section
    for model in _models()[1:]:
        for key in model.model_fields:
            assert f"| `{key}` |" in text, f"{model.__name__}.{key}"
    builtins = [i.name for i in registry.infos(load=False) if i.kind == "strategy" and i.distribution == "mutualkd"]
    assert {"independent", "kl_dml", "ie_kd", "ie_dml"} <= set(builtins)
    for name in builtins:
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        for key, field in get_strategy(name).Params.model_fields.items():
            assert f"| `{key}` |" in section, f"{name}: {key}"
            if field.description:
                assert field.description in section


def test_reference_rows_read_the_models():
    from mutualkd.config import DataConfig, OptimizerConfig, PeerConfig, RunConfig
    from mutualkd.recipe_doc import key_docs

    run = {d.key: d for d in key_docs(RunConfig)}
    assert (run["epochs"].type, run["epochs"].default) == ("integer > 0", "1")
    assert (run["max_steps"].type, run["max_steps"].default) == ("integer > 0", "unset")
    assert run["mixed_precision"].type == 'one of "no", "bf16", "fp16"'
    assert run["block_plugins"].type == "array of string (length >= 1)"
    assert run["name"].default == '"run"' and run["progress"].default == "true"
    opt = {d.key: d for d in key_docs(OptimizerConfig)}
    assert opt["momentum"].type == "float >= 0, < 1" and opt["betas"].default == "[0.9, 0.999]"
    peer = {d.key: d for d in key_docs(PeerConfig)}
    assert peer["model"].default == "required" and peer["kwargs"].default == "{}"
    assert peer["optimizer"].type == "table (the keys of [optimizer])"
    assert {d.key: d for d in key_docs(DataConfig)}["train_subset"].description.startswith("train on a class")


def test_reference_check_mode_fails_on_a_stale_page(tmp_path):
    from mutualkd.recipe_doc import main

    page = tmp_path / "recipes.md"
    assert main([str(page), "--distribution", "mutualkd"]) == 0
    assert "| `epochs` |" in page.read_text(encoding="utf-8")
    assert main([str(page), "--check", "--distribution", "mutualkd"]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("| `epochs` |", "| `epochz` |"), encoding="utf-8")
    assert main([str(page), "--check", "--distribution", "mutualkd"]) == 1
    assert main([str(tmp_path / "absent.md"), "--check"]) == 1


def test_explain_marks_what_the_recipe_sets(base):
    from mutualkd.engine import resolve_strategy
    from mutualkd.recipe_doc import explain

    d = copy.deepcopy(base)
    d["peers"][0]["optimizer"] = {"lr": 0.01}
    recipe = parse_recipe(d, file=FILE)
    _, params = resolve_strategy(recipe, FILE)
    rows = {r.key: r for r in explain(recipe, params)}
    assert (rows["peers[0].optimizer.lr"].value, rows["peers[0].optimizer.lr"].source) == ("0.01", "recipe")
    assert (rows["peers[0].optimizer.momentum"].value, rows["peers[0].optimizer.momentum"].source) == ("0.9", "default")
    assert rows["peers[1].optimizer"].value == "the shared [optimizer]"
    assert rows["strategy.weight"].source == "recipe" and rows["strategy.reduction"].source == "default"
    assert rows["schedule.mode"].source == "recipe" and rows["run.compile"].source == "default"
    last = list(Recipe.model_fields)[-1]  # the sections in the model's order
    assert list(rows)[0] == "run.name" and list(rows)[-1].split(".")[0] == last


def test_explain_flattens_a_default_table_of_a_strategy_as_defaults(base):
    """ie_kd's ae_optimizer default is built with keyword arguments; it is still a default."""
    from mutualkd import get_strategy
    from mutualkd.recipe_doc import explain

    d = copy.deepcopy(base)
    d["peers"] = d["peers"][:1]
    d["strategy"] = {"name": "ie_kd", "teacher": "runs/t"}
    recipe = parse_recipe(d, file=FILE)
    params = get_strategy("ie_kd").Params
    rows = {r.key: r for r in explain(recipe, params.model_validate(recipe.strategy.params))}
    assert (rows["strategy.teacher"].value, rows["strategy.teacher"].source) == ('"runs/t"', "recipe")
    default = params.model_fields["ae_optimizer"].default_factory()
    assert (rows["strategy.ae_optimizer.nesterov"].value, rows["strategy.ae_optimizer.nesterov"].source) == (
        "true" if default.nesterov else "false", "default")
    assert rows["strategy.ae_optimizer.lr"].value == repr(default.lr)
    assert rows["strategy.ae_epochs"].source == "default"
