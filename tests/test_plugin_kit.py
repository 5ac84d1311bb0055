"""The plugin story: the conformance kit, in-process registration, the example plugins,
a broken plugin, blocking and disabling plugins.

The example distributions (plugins/mutualkd-cosine, plugins/mutualkd-hinton-kd) are
installed editable by `make install`; the broken fixture (tests/fixtures/broken-plugin)
is installed into a temporary folder that is put on PYTHONPATH / sys.path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import json
import os
from pathlib import Path
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import Tensor, nn
import torch.nn.functional as F
from typer.testing import CliRunner

from mutualkd import get_metric, get_strategy, registry
from mutualkd.cli import app
from mutualkd.config import load_recipe, parse_recipe
from mutualkd.engine import Trainer
from mutualkd.errors import PluginError
from mutualkd.registry import ENV_DISABLE_AUTOLOAD
from mutualkd.strategy import LossTerms, SetupContext, Step, StepContext, Strategy, StrategyParams
from mutualkd.testing import check_metric, check_strategy, make_teacher, registered

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "broken-plugin"
BUILTIN_METRICS = ["l1", "l2", "l2_per_sample", "cka", "cka_debiased", "orthogonal", "orthogonal_sq"]
EXAMPLES = {("metric", "cosine"): "mutualkd-cosine", ("strategy", "hinton_kd"): "mutualkd-hinton-kd"}


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from freshly discovered plugins with no block, and leaves none."""
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv("MUTUALKD_BLOCK_PLUGINS", raising=False)
    _lift_blocks()
    registry.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared machine
    yield
    torch.set_num_threads(threads)
    _lift_blocks()
    registry.reset()


def _lift_blocks() -> None:
    """Lift every process-wide block (a test may have used --block-plugin in-process)."""
    for source in registry.blocks():
        registry.block([], source=source)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def broken_site(pip_install_copy: Callable[[Path], Path]) -> Path:
    """The broken fixture distribution, installed with pip into a folder of its own."""
    return pip_install_copy(FIXTURE)


@pytest.fixture
def on_sys_path(broken_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The broken distribution visible in this process (entry points are read from sys.path)."""
    monkeypatch.syspath_prepend(str(broken_site))
    registry.reset()
    yield broken_site
    sys.modules.pop("mutualkd_broken_fixture", None)


def _example_installed(kind: str, name: str) -> None:
    if name not in registry.names(kind):  # type: ignore[arg-type]
        pytest.fail(f"the example plugin distribution {EXAMPLES[(kind, name)]} is not installed; run `make install`")


def _mutualkd(args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = env or {}
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if ENV_DISABLE_AUTOLOAD not in env:
        full.pop(ENV_DISABLE_AUTOLOAD, None)
    return subprocess.run([sys.executable, "-m", "mutualkd", *args], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=120)


def _pythonpath(extra: Path) -> str:
    return os.pathsep.join([str(extra), *filter(None, [os.environ.get("PYTHONPATH")])])


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


# ============================================================================ check_metric


@pytest.mark.parametrize("name", BUILTIN_METRICS)
def test_builtin_metrics_pass_the_kit(name: str) -> None:
    check_metric(get_metric(name), name=name)


def _normalised(x: Tensor) -> Tensor:
    return F.normalize(x.flatten(1).float(), dim=1)


def _checked(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn`` with the shape check every metric needs, so one defect is tested at a time."""

    def metric(a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape or a.ndim < 2:
            raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)}")
        return fn(a, b)

    return metric


BAD_METRICS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "per-sample vector": (_checked(lambda a, b: (_normalised(a) - _normalised(b)).abs().mean(1)), "scalar output"),
    "signed": (_checked(lambda a, b: (_normalised(a) - _normalised(b)).mean()), "non-negativity"),
    "constant": (_checked(lambda a, b: (a - b).sum() * 0.0), "separates"),
    "one-sided": (_checked(lambda a, b: (_normalised(a) - _normalised(b)).clamp(min=0).mean()), "symmetry"),
    "plain sqrt": (_checked(lambda a, b: ((_normalised(a) - _normalised(b)) ** 2).sum(1).sqrt().mean()), "gradients (a == b)"),
    "detached": (_checked(lambda a, b: (_normalised(a) - _normalised(b).detach()).abs().mean()), "no gradient reaches b"),
    "no shape check": (lambda a, b: (_normalised(a) - _normalised(b)).abs().mean(), "shape mismatch"),
    "needs B >= 3": (
        _checked(lambda a, b: (_ for _ in ()).throw(ValueError("B < 3")) if a.shape[0] < 3
                 else (_normalised(a) - _normalised(b)).abs().mean()),
        "batch size 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_METRICS))
def test_kit_names_the_property_a_bad_metric_breaks(case: str) -> None:
    fn, prop = BAD_METRICS[case]
    with pytest.raises(AssertionError, match=f"metric 'bad': .*{prop}".replace("(", r"\(").replace(")", r"\)")):
        check_metric(fn, name="bad")


def test_kit_accepts_a_metric_that_refuses_batch_size_one() -> None:
    l1 = get_metric("l1")

    def needs_two(a: Tensor, b: Tensor) -> Tensor:
        if a.shape[0] < 2:
            raise ValueError("needs B >= 2")
        return l1(a, b)

    check_metric(needs_two)


# ============================================================================ check_strategy


@pytest.mark.parametrize("name", ["independent", "kl_dml", "ie_dml"])
def test_builtin_strategies_pass_the_kit(name: str, tmp_path: Path) -> None:
    check_strategy(get_strategy(name), tmp_path=tmp_path)


def test_ie_kd_passes_the_kit_with_a_prepared_teacher(teacher: Path, tmp_path: Path) -> None:
    check_strategy(get_strategy("ie_kd"), params={"ae_epochs": 1}, prepare=lambda _: {"teacher": str(teacher)},
                   tmp_path=tmp_path, modes=["alternating"])


class _Peers(Strategy):
    """Base of the faulty strategies below: CE per peer, one step per peer."""

    min_peers = 2
    modes = ("alternating",)

    def steps(self) -> Sequence[Step]:
        return [Step(p, (p,)) for p in self.peers]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        return {step.name: {"ce": F.cross_entropy(ctx.output(step.name).logits.float(), ctx.labels)}}


class LeakyDML(_Peers):
    """DML with the classic bug: the other peer's logits are not detached."""

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        other_name = next(p for p in self.peers if p != step.name)
        mine, other = ctx.output(step.name).logits, ctx.output(other_name).logits
        kl = F.kl_div(mine.log_softmax(1), other.log_softmax(1), reduction="batchmean", log_target=True)
        return {step.name: {"ce": F.cross_entropy(mine, ctx.labels), "kl": kl}}


class UnusedModule(_Peers):
    """Attaches a module to peer0's unit that no loss term uses."""

    def setup(self, ctx: SetupContext) -> None:
        ctx.add_module("peer0.head", nn.Linear(4, 4), unit=self.peers[0])


class ForgetfulState(_Peers):
    """Saves a counter that load_state_dict does not restore."""

    def __init__(self, params: StrategyParams, *, peers: Sequence[str], mode: Any) -> None:
        super().__init__(params, peers=peers, mode=mode)
        self.calls = 0

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        self.calls += 1
        return super().compute(step, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (LeakyDML, r"sends gradient into unit\(s\) \['peer1'\].*detach"),
        (UnusedModule, r"module 'peer0.head' of unit 'peer0' never changed"),
        (ForgetfulState, r"state: load_state_dict\(saved\) then state_dict\(\)"),
    ],
)
def test_kit_catches_a_faulty_strategy(cls: type, message: str, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match=message):
        check_strategy(cls, tmp_path=tmp_path)


def test_kit_rejects_a_class_that_is_not_a_strategy() -> None:
    with pytest.raises(AssertionError, match="contract: a strategy must be a subclass of mutualkd.Strategy"):
        check_strategy(dict)


# ============================================================================ registered()


def test_registered_is_temporary_and_visible_by_name() -> None:
    def tiny(a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().mean()

    with registered("metric", "tiny_test_metric", tiny):
        assert get_metric("tiny_test_metric") is tiny
        row = next(i for i in registry.infos() if i.name == "tiny_test_metric")
        assert (row.distribution, row.status) == ("<test>", "ok")
    with pytest.raises(PluginError, match="unknown metric 'tiny_test_metric'"):
        get_metric("tiny_test_metric")


def test_registered_refuses_a_taken_name_and_an_invalid_object() -> None:
    with pytest.raises(PluginError, match=r"already provided by mutualkd 0\.1\.0 \(mutualkd_builtins\.metrics:l1_distance\)"):
        with registered("metric", "l1", lambda a, b: a.sum()):
            pass
    assert get_metric("l1").__name__ == "l1_distance"  # nothing was overwritten
    with pytest.raises(PluginError, match="takes exactly two required arguments"):
        with registered("metric", "three_args", lambda a, b, c: a.sum()):
            pass


# ============================================================================ the example plugins


def test_example_metric_is_used_by_a_recipe(tmp_path: Path) -> None:
    _example_installed("metric", "cosine")
    recipe = tmp_path / "ie_dml_cosine.toml"
    recipe.write_text(
        f"""
[run]
name = "cosine"
out_dir = "{tmp_path.as_posix()}"
max_steps = 3
progress = false
device = "cpu"

[data]
dataset = "digits"
batch_size = 16
train_subset = 64
test_subset = 32

[[peers]]
model = "cifar_wrn_16_1"

[[peers]]
model = "cifar_wrn_16_1"

[strategy]
name = "ie_dml"
inh_metric = "cosine"
exp_metric = "orthogonal"
"""
    )
    summary = Trainer(load_recipe(recipe), recipe_file=str(recipe)).fit()
    assert summary["global_steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "cosine" / "metrics.jsonl").read_text().splitlines()]
    loss = next(r["loss"] for r in records if r["kind"] == "epoch")
    inh = [v for k, v in loss.items() if k.endswith("/inh")]
    assert len(inh) == 2 and all(0.0 < v <= 2 * 50.0 for v in inh)  # lambda_inh * d, cosine d in [0, 2]


def test_example_plugins_are_listed_ok() -> None:
    rows = {(i.kind, i.name): i for i in registry.infos()}
    for (kind, name), dist in EXAMPLES.items():
        _example_installed(kind, name)
        assert (rows[(kind, name)].distribution, rows[(kind, name)].status) == (dist, "ok")


# ============================================================================ a broken plugin


def test_broken_plugin_is_reported_and_the_rest_works(broken_site: Path) -> None:
    proc = _mutualkd(["plugins", "--json"], env={"PYTHONPATH": _pythonpath(broken_site)})
    assert proc.returncode == 0, proc.stderr
    rows = _by_name(json.loads(proc.stdout))
    broken = rows.pop("broken_metric")
    assert broken["kind"] == "metric" and broken["status"] == "error"
    assert (broken["distribution"], broken["version"]) == ("mutualkd-broken-fixture", "0.0.1")
    assert broken["module"] == "mutualkd_broken_fixture:distance"
    assert "RuntimeError" in broken["error"] and "fails on import on purpose" in broken["error"]
    assert {"cosine", "hinton_kd", *BUILTIN_METRICS, "kl_dml"} <= set(rows)
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_a_run_that_does_not_use_the_broken_plugin_succeeds(on_sys_path: Path, tmp_path: Path) -> None:
    assert "broken_metric" in registry.names("metric")
    result = CliRunner().invoke(app, [
        "run", str(ROOT / "recipes" / "quickstart.toml"), "--set", "run.max_steps=2", "--set", "run.epochs=1",
        "--set", "run.progress=false", "--set", f"run.out_dir={json.dumps(str(tmp_path))}",
        "--set", "data.train_subset=32", "--set", "data.test_subset=32", "--set", "run.device=cpu",
    ])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "quickstart" / "summary.json").is_file()


def test_using_the_broken_plugin_names_its_distribution_and_error(on_sys_path: Path) -> None:
    with pytest.raises(PluginError) as err:
        get_metric("broken_metric", where="r.toml [strategy.inh_metric]")
    text = str(err.value)
    assert "r.toml [strategy.inh_metric]" in text and "mutualkd-broken-fixture 0.0.1" in text
    assert "fails on import on purpose" in text and "`mutualkd plugins`" in text
    assert get_metric("l1").__name__ == "l1_distance"
    table = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "broken_metric" in table.stdout and "fails on import on purpose" in table.stdout


# ============================================================================ blocking and disabling


def test_block_plugin_option_blocks_one_plugin() -> None:
    _example_installed("metric", "cosine")
    result = CliRunner().invoke(app, ["plugins", "--json", "--block-plugin", "cosine", "--block-plugin", "nothing_like_it"])
    assert result.exit_code == 0, result.output
    rows = _by_name(json.loads(result.stdout))
    assert (rows["cosine"]["status"], rows["cosine"]["error"]) == ("blocked", "blocked by --block-plugin")
    assert {r["status"] for n, r in rows.items() if n != "cosine"} == {"ok"}
    with pytest.raises(PluginError, match="metric 'cosine' from mutualkd-cosine is blocked by --block-plugin"):
        get_metric("cosine")


def test_block_by_kind_and_name_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.block(["strategy:l1"])  # the wrong kind blocks nothing
    assert get_metric("l1").__name__ == "l1_distance"
    registry.block(["metric:l1"])
    with pytest.raises(PluginError, match="blocked by --block-plugin"):
        get_metric("l1")
    registry.block([])
    assert get_metric("l1").__name__ == "l1_distance"  # lifted, loaded again
    monkeypatch.setenv("MUTUALKD_BLOCK_PLUGINS", "l2, cka")
    with pytest.raises(PluginError, match="blocked by MUTUALKD_BLOCK_PLUGINS"):
        get_metric("cka")


def _ie_dml_recipe(tmp_path: Path, name: str, block: list[str] | None) -> Any:
    run: dict[str, Any] = {"name": name, "out_dir": str(tmp_path), "max_steps": 1, "progress": False, "device": "cpu"}
    if block is not None:
        run["block_plugins"] = block
    return parse_recipe({
        "run": run,
        "data": {"dataset": "digits", "batch_size": 16, "train_subset": 32, "test_subset": 32},
        "peers": [{"model": "cifar_wrn_16_1"}, {"model": "cifar_wrn_16_1"}],
        "strategy": {"name": "ie_dml", "inh_metric": "cosine"},
    }, file="block.toml")


def test_recipe_block_plugins_blocks_for_that_recipe_only(tmp_path: Path) -> None:
    _example_installed("metric", "cosine")
    with pytest.raises(PluginError, match=r"block\.toml \[strategy\.inh_metric\]: metric 'cosine' .* blocked by run\.block_plugins"):
        Trainer(_ie_dml_recipe(tmp_path, "blocked", ["cosine"]), recipe_file="block.toml")
    assert registry.blocks() == {}  # the recipe blocked for its own lookups, not process-wide
    # The next recipe of the same process does not inherit the block.
    Trainer(_ie_dml_recipe(tmp_path, "free", None), recipe_file="block.toml").fit()
    assert "block_plugins" not in _ie_dml_recipe(tmp_path, "x", None).to_dict()["run"]  # old recipe hashes unchanged


def test_disable_autoload_keeps_only_mutualkd_own_plugins(on_sys_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    registry.reset()  # the variable is read when plugins are discovered
    rows = {i.name: i for i in registry.infos()}
    for name in ("cosine", "hinton_kd", "broken_metric"):
        assert rows[name].status == "disabled", rows[name]
    assert {rows[n].status for n in BUILTIN_METRICS} == {"ok"}
    assert "mutualkd_broken_fixture" not in sys.modules  # disabled plugins are never imported
    with pytest.raises(PluginError, match=f"metric 'cosine' .*not loaded because {ENV_DISABLE_AUTOLOAD} is set"):
        get_metric("cosine")


def test_disable_autoload_in_a_fresh_process(broken_site: Path) -> None:
    proc = _mutualkd(["plugins", "--json"], env={"PYTHONPATH": _pythonpath(broken_site), ENV_DISABLE_AUTOLOAD: "1"})
    assert proc.returncode == 0, proc.stderr
    rows = _by_name(json.loads(proc.stdout))
    assert {n: r["status"] for n, r in rows.items() if r["distribution"] != "mutualkd"} == {
        "cosine": "disabled", "hinton_kd": "disabled", "csv_images": "disabled", "broken_metric": "disabled",
    }
    assert {r["status"] for r in rows.values() if r["distribution"] == "mutualkd"} == {"ok"}
