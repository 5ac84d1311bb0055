"""Tests of the plugin registry (mutualkd.registry): discovery, duplicates, broken plugins, blocking."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import mutualkd
from mutualkd import registry
from mutualkd.cli import app
from mutualkd.errors import PluginError
from mutualkd.registry import GROUPS, RECIPE_BLOCK, get_metric, get_strategy
from mutualkd.strategy import Strategy

BUILTIN_STRATEGIES = {"independent", "kl_dml", "ie_kd", "ie_dml"}
BUILTIN_METRICS = {"l1", "l2", "l2_per_sample", "cka", "cka_debiased", "orthogonal", "orthogonal_sq"}

_real_entry_points = metadata.entry_points


class FakeDist:
    """What the registry reads of a distribution: metadata["Name"] and version."""

    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name: str, value: str, group: str, dist: FakeDist) -> None:
        self.name, self.value, self.group, self.dist = name, value, group, dist

    def load(self) -> Any:  # the registry loads through metadata.EntryPoint(...).load()
        return metadata.EntryPoint(self.name, self.value, self.group).load()


PLUGIN_MODULE = '''
import torch
from mutualkd.strategy import Strategy, Step


class Good(Strategy):
    """A third-party strategy."""

    def steps(self):
        return [Step("all", tuple(self.peers))]

    def compute(self, step, ctx):
        return {}


class NotAStrategy:
    pass


def good_metric(a, b):
    return (a - b).abs().mean()


def three_args(a, b, c):
    return a


not_callable = 3
'''


def _lift_blocks() -> None:
    for source in registry.blocks():
        registry.block([], source=source)


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from freshly discovered plugins with no block, and leaves none."""
    monkeypatch.delenv("MUTUALKD_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("MUTUALKD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    _lift_blocks()
    registry.reset()
    yield
    _lift_blocks()
    registry.reset()


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A third-party plugin module importable as ``thirdparty_plug`` (and a broken one)."""
    (tmp_path / "thirdparty_plug.py").write_text(PLUGIN_MODULE)
    (tmp_path / "thirdparty_broken.py").write_text("raise RuntimeError('plugin exploded at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "thirdparty_plug"
    for m in ("thirdparty_plug", "thirdparty_broken"):
        sys.modules.pop(m, None)


def install_fakes(monkeypatch: pytest.MonkeyPatch, fakes: list[tuple[str, str, str, str, str]]) -> None:
    """Make ``metadata.entry_points(group=...)`` also return ``fakes`` (kind, name, value, dist, version)."""

    def entry_points(**kw: Any):
        group = kw.get("group")
        if group not in GROUPS.values():
            return _real_entry_points(**kw)
        eps = list(_real_entry_points(**kw))
        for kind, name, value, dist, version in fakes:
            if GROUPS[kind] == group:  # type: ignore[index]
                eps.append(FakeEntryPoint(name, value, group, FakeDist(dist, version)))
        return eps

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    registry.reset()


# --------------------------------------------------------------------------- built-ins


def test_builtins_listed_with_distribution_mutualkd():
    infos = registry.infos(load=True)
    by_kind = {(i.kind, i.name): i for i in infos}
    for name in BUILTIN_STRATEGIES:
        info = by_kind[("strategy", name)]
        assert info.distribution == "mutualkd" and info.status == "ok", info
        assert info.version == mutualkd.__version__
        assert info.value.startswith("mutualkd_builtins.")
    for name in BUILTIN_METRICS:
        info = by_kind[("metric", name)]
        assert info.distribution == "mutualkd" and info.status == "ok", info
    assert set(registry.names("strategy")) >= BUILTIN_STRATEGIES
    assert set(registry.names("metric")) >= BUILTIN_METRICS


def test_get_builtins():
    cls = get_strategy("kl_dml")
    assert issubclass(cls, Strategy) and cls.__name__ == "KLDML"
    assert get_strategy("independent").min_peers == 1
    d = get_metric("l1")
    import torch

    a = torch.randn(3, 4)
    assert float(d(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert mutualkd.get_strategy is get_strategy and mutualkd.get_metric is get_metric


def test_as_dict_for_json():
    info = next(i for i in registry.infos() if i.name == "kl_dml")
    d = info.as_dict()
    assert d["kind"] == "strategy" and d["distribution"] == "mutualkd" and d["status"] == "ok"
    assert d["module"] == "mutualkd_builtins.strategies.kl_dml:KLDML" and d["error"] is None


# --------------------------------------------------------------------------- unknown names


def test_unknown_strategy_close_matches():
    with pytest.raises(PluginError) as ei:
        get_strategy("kl_dm", where="r.toml [strategy.name]")
    e = ei.value
    assert "unknown strategy 'kl_dm'" in str(e)
    assert e.where == "r.toml [strategy.name]"
    assert "did you mean" in e.hint and "'kl_dml'" in e.hint
    for name in BUILTIN_STRATEGIES:
        assert name in e.hint
    assert e.exit_code == 2


def test_unknown_metric_close_matches():
    with pytest.raises(PluginError) as ei:
        get_metric("l3")
    assert "'l1'" in ei.value.hint or "'l2'" in ei.value.hint


def test_unknown_name_without_close_match_lists_known():
    with pytest.raises(PluginError) as ei:
        get_strategy("zzzzzzzz")
    assert "did you mean" not in ei.value.hint and "kl_dml" in ei.value.hint


# --------------------------------------------------------------------------- third-party plugins


def test_third_party_plugin_loads(monkeypatch, plugin_module):
    install_fakes(
        monkeypatch,
        [
            ("strategy", "good", f"{plugin_module}:Good", "good-dist", "1.0"),
            ("metric", "mine", f"{plugin_module}:good_metric", "good-dist", "1.0"),
        ],
    )
    cls = get_strategy("good")
    assert cls.__name__ == "Good" and issubclass(cls, Strategy)
    assert callable(get_metric("mine"))
    info = next(i for i in registry.infos() if i.name == "good")
    assert (info.distribution, info.version, info.status) == ("good-dist", "1.0", "ok")


def test_duplicate_name_names_both_distributions(monkeypatch, plugin_module):
    install_fakes(monkeypatch, [("strategy", "kl_dml", f"{plugin_module}:Good", "other-dist", "2.3")])
    with pytest.raises(PluginError) as ei:
        get_strategy("kl_dml")
    text = str(ei.value)
    assert "more than one distribution" in text
    assert "mutualkd" in text and "other-dist" in text and "2.3" in text
    assert "mutualkd_builtins.strategies.kl_dml:KLDML" in text and f"{plugin_module}:Good" in text
    # Both providers are listed, both marked as errors naming the other.
    dupes = [i for i in registry.infos() if i.kind == "strategy" and i.name == "kl_dml"]
    assert {i.distribution for i in dupes} == {"mutualkd", "other-dist"}
    assert all(i.status == "error" and "duplicate" in i.error for i in dupes)
    mine = next(i for i in dupes if i.distribution == "mutualkd")
    assert "other-dist" in mine.error
    # The other plugins still work.
    assert get_strategy("independent").__name__ == "Independent"


def test_same_distribution_seen_twice_is_not_a_duplicate(monkeypatch):
    # An editable install next to a stale egg-info shows the same entry point twice.
    install_fakes(
        monkeypatch,
        [("strategy", "kl_dml", "mutualkd_builtins.strategies.kl_dml:KLDML", "mutualkd", mutualkd.__version__)],
    )
    assert get_strategy("kl_dml").__name__ == "KLDML"


def test_duplicate_metric(monkeypatch, plugin_module):
    install_fakes(monkeypatch, [("metric", "l1", f"{plugin_module}:good_metric", "metrics-plus", "0.1")])
    with pytest.raises(PluginError) as ei:
        get_metric("l1")
    assert "metrics-plus" in str(ei.value) and "mutualkd" in str(ei.value)
    assert callable(get_metric("l2"))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("no_such_module_xyz_123:Thing", "ModuleNotFoundError"),
        ("thirdparty_broken:Thing", "plugin exploded at import"),
        ("thirdparty_plug:Missing", "AttributeError"),
    ],
    ids=["missing-module", "raises-on-import", "missing-attribute"],
)
def test_broken_plugin_reported_and_others_load(monkeypatch, plugin_module, value, expected):
    install_fakes(monkeypatch, [("strategy", "broken", value, "broken-dist", "0.0.1")])
    infos = {i.name: i for i in registry.infos(load=True) if i.kind == "strategy"}
    bad = infos["broken"]
    assert bad.status == "error" and bad.distribution == "broken-dist" and bad.version == "0.0.1"
    assert expected in bad.error and "import failed" in bad.error
    for name in BUILTIN_STRATEGIES:
        assert infos[name].status == "ok"
    with pytest.raises(PluginError) as ei:
        get_strategy("broken")
    text = str(ei.value)
    assert "broken-dist" in text and "0.0.1" in text and value in text and expected in text
    assert get_strategy("kl_dml").__name__ == "KLDML"


@pytest.mark.parametrize(
    "kind, value, expected",
    [
        ("strategy", "thirdparty_plug:NotAStrategy", "subclass of mutualkd.Strategy"),
        ("metric", "thirdparty_plug:three_args", "exactly two required arguments"),
        ("metric", "thirdparty_plug:not_callable", "callable"),
    ],
)
def test_plugin_violating_contract_is_refused(monkeypatch, plugin_module, kind, value, expected):
    install_fakes(monkeypatch, [(kind, "odd", value, "odd-dist", "1")])
    with pytest.raises(PluginError) as ei:
        registry.get(kind, "odd")
    assert expected in str(ei.value) and "odd-dist" in str(ei.value)


# --------------------------------------------------------------------------- switches


def test_disable_autoload_keeps_only_mutualkd(monkeypatch, plugin_module):
    install_fakes(monkeypatch, [("strategy", "good", f"{plugin_module}:Good", "good-dist", "1.0"),
                                ("strategy", "kl_dml", f"{plugin_module}:Good", "other-dist", "1.0")])
    monkeypatch.setenv("MUTUALKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.reset()
    names = registry.names("strategy")
    assert "good" not in names and BUILTIN_STRATEGIES <= set(names)
    # The duplicate came from a third-party distribution, which is not loaded now.
    assert get_strategy("kl_dml").__name__ == "KLDML"
    monkeypatch.delenv("MUTUALKD_DISABLE_PLUGIN_AUTOLOAD")
    registry.reset()
    assert "good" in registry.names("strategy")


def test_block_by_env(monkeypatch):
    monkeypatch.setenv("MUTUALKD_BLOCK_PLUGINS", "kl_dml, metric:cka")
    with pytest.raises(PluginError) as ei:
        registry.get("strategy", "kl_dml")
    assert "blocked" in str(ei.value)
    with pytest.raises(PluginError):
        registry.get("metric", "cka")
    assert registry.get("metric", "l1") is not None
    assert registry.get("strategy", "independent") is not None
    statuses = {(i.kind, i.name): i.status for i in registry.infos()}
    assert statuses[("strategy", "kl_dml")] == "blocked" and statuses[("metric", "l2")] == "ok"


def test_block_method():
    registry.block(["strategy:ie_kd"])
    with pytest.raises(PluginError):
        registry.get("strategy", "ie_kd")
    assert registry.get("strategy", "ie_dml") is not None


def test_block_replaces_what_the_source_blocked_and_lists_every_source(monkeypatch):
    registry.block(["kl_dml", "metric:l2"])
    registry.block(["l1"], source="a notebook")
    registry.block(["metric:l2"])  # the second call of a source replaces its first
    monkeypatch.setenv("MUTUALKD_BLOCK_PLUGINS", "cka")
    assert registry.blocks() == {
        "--block-plugin": {"metric:l2"}, "a notebook": {"l1"}, "MUTUALKD_BLOCK_PLUGINS": {"cka"},
    }
    assert registry.get_strategy("kl_dml").__name__ == "KLDML"
    assert registry.is_blocked("metric", "l2") and not registry.is_blocked("strategy", "l2")
    with pytest.raises(PluginError, match="metric 'l1' from mutualkd is blocked by a notebook"):
        get_metric("l1")
    registry.block([], source="a notebook")
    assert get_metric("l1").__name__ == "l1_distance"


@pytest.mark.parametrize("blocked", [["kl_dml"], ["strategy:kl_dml"], ("other", " kl_dml ")])
def test_blocked_argument_refuses_one_lookup_only(blocked):
    with pytest.raises(PluginError) as ei:
        get_strategy("kl_dml", where="r.toml [strategy.name]", blocked=blocked)
    e = ei.value
    assert str(e).startswith("r.toml [strategy.name]: strategy 'kl_dml' from mutualkd is blocked by run.block_plugins (recipe)")
    assert e.hint == "remove 'kl_dml' from run.block_plugins (recipe), or choose another plugin"
    assert e.exit_code == 2
    # Nothing changed process-wide: the next lookup, the listing and the block list are as before.
    assert get_strategy("kl_dml").__name__ == "KLDML"
    assert registry.blocks() == {} and not registry.is_blocked("strategy", "kl_dml")
    assert registry.is_blocked("strategy", "kl_dml", blocked=blocked)
    assert next(i for i in registry.infos() if i.name == "kl_dml").status == "ok"


def test_blocked_argument_for_metrics_respects_the_kind():
    assert get_metric("l1", blocked=["strategy:l1", None, ""]).__name__ == "l1_distance"
    with pytest.raises(PluginError, match=re.escape(f"metric 'l1' from mutualkd is blocked by {RECIPE_BLOCK}")):
        get_metric("l1", blocked=["metric:l1"])
    assert get_metric("l1", blocked=None).__name__ == "l1_distance"


def _recipe(tmp_path: Path, strategy: str, block: list[str]) -> Path:
    path = tmp_path / "blocking.toml"
    path.write_text(textwrap.dedent(f"""
        [run]
        name = "blocking"
        out_dir = "{tmp_path.as_posix()}"
        block_plugins = {block!r}

        [data]
        dataset = "digits"

        [[peers]]
        model = "cifar_wrn_16_1"

        [[peers]]
        model = "cifar_wrn_16_1"

        [strategy]
        name = "{strategy}"
    """))
    return path


def test_recipe_check_blocks_for_that_recipe_only(tmp_path):
    """`mutualkd validate` refuses what the recipe blocks and leaves the registry unblocked."""
    ok = CliRunner().invoke(app, ["validate", str(_recipe(tmp_path, "kl_dml", ["metric:l2", "cka"])), "--no-data"])
    assert ok.exit_code == 0, ok.output
    assert registry.blocks() == {}
    assert get_metric("l2").__name__ == "l2_distance" and get_metric("cka") is not None
    assert {i.status for i in registry.infos() if i.distribution == "mutualkd"} == {"ok"}

    recipe = _recipe(tmp_path, "kl_dml", ["kl_dml"])
    refused = CliRunner().invoke(app, ["validate", str(recipe), "--no-data"])
    assert refused.exit_code == 2
    assert f"{recipe} [strategy.name]: strategy 'kl_dml' from mutualkd is blocked by run.block_plugins (recipe)" in refused.output
    assert "Traceback" not in refused.output
    assert registry.blocks() == {} and get_strategy("kl_dml").__name__ == "KLDML"


# --------------------------------------------------------------------------- in-process registration and validation


def test_register_checks_the_contract_refuses_taken_names_and_unregisters():
    def tiny(a, b):
        return (a - b).abs().mean()

    info = registry.register("metric", "tiny", tiny, distribution="notebook", version="1")
    assert (info.distribution, info.status, info.value) == ("notebook", "ok", f"{__name__}:{tiny.__qualname__}")
    assert get_metric("tiny") is tiny and "tiny" in registry.names("metric")
    registry.reset()  # kept over a re-discovery
    assert get_metric("tiny") is tiny
    with pytest.raises(PluginError, match=r"cannot register metric 'tiny' .* already provided by notebook 1"):
        registry.register("metric", "tiny", tiny)
    with pytest.raises(PluginError, match=r"cannot register metric 'bad' .*exactly two required arguments"):
        registry.register("metric", "bad", lambda a: a)
    registry.unregister("metric", "tiny")
    with pytest.raises(PluginError, match="unknown metric 'tiny'"):
        get_metric("tiny")
    with pytest.raises(PluginError, match="was not registered in-process"):
        registry.unregister("metric", "l1")  # entry points cannot be removed
    assert get_metric("l1").__name__ == "l1_distance"


def test_register_a_name_an_entry_point_takes_later_is_a_duplicate(monkeypatch, plugin_module):
    registry.register("strategy", "later", get_strategy("kl_dml"), distribution="notebook")
    install_fakes(monkeypatch, [("strategy", "later", f"{plugin_module}:Good", "late-dist", "3")])
    with pytest.raises(PluginError, match="more than one distribution: late-dist 3 .* and notebook"):
        get_strategy("later")
    registry.unregister("strategy", "later")  # the entry point is left, no longer a duplicate
    assert get_strategy("later").__name__ == "Good"


def test_plugin_validation_is_public():
    assert registry.validate_plugin("metric", lambda a, b: (a - b).sum()) is None
    assert registry.validate_plugin("strategy", get_strategy("kl_dml")) is None
    assert "subclass of mutualkd.Strategy" in registry.validate_plugin("strategy", dict)
    assert "exactly two required arguments" in registry.validate_plugin("metric", lambda a, b, c: a)
    assert "unknown plugin kind" in registry.validate_plugin("loss", len)  # type: ignore[arg-type]
    with pytest.raises(PluginError, match="unknown plugin kind 'loss'"):
        registry.names("loss")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a real distribution on sys.path


def _write_dist(root: Path, name: str, version: str, entry_points: str) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_installed_distribution_is_discovered(tmp_path, monkeypatch, plugin_module):
    _write_dist(
        tmp_path,
        "acme-kd",
        "4.5",
        f"""
        [mutualkd.strategies]
        acme = {plugin_module}:Good
        acme_broken = no_such_module_acme:X

        [mutualkd.metrics]
        acme_metric = {plugin_module}:good_metric
        """,
    )
    registry.reset()
    infos = {(i.kind, i.name): i for i in registry.infos()}
    assert infos[("strategy", "acme")].distribution == "acme-kd"
    assert infos[("strategy", "acme")].version == "4.5" and infos[("strategy", "acme")].status == "ok"
    assert infos[("strategy", "acme_broken")].status == "error"
    assert infos[("metric", "acme_metric")].status == "ok"
    assert infos[("strategy", "kl_dml")].status == "ok"
