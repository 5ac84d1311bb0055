"""The online-distillation contract end to end: branched peers, temporal means, views, declared
outputs, per-batch updates, and the strategies one, cl_ilr, okddip and pcl on it."""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mutualkd import get_strategy, registry
from mutualkd.branching import BranchedNet, branch_state_dict
from mutualkd.cli import app
from mutualkd.config import parse_recipe
from mutualkd.errors import RecipeError
from mutualkd.testing import check_strategy

import mutualkd.models  # noqa: F401  (the CIFAR families in timm)

Factory = Callable[..., Any]
ONLINE = ("one", "cl_ilr", "okddip", "pcl")
BRANCHED = [{"model": "cifar_resnet20", "name": "net", "branches": 3, "split_after": "layer2"}]


def _online_recipe(recipe_dict: Factory, tmp: Path, strategy: Any, peers: list[dict[str, Any]] | None = None,
                   **kw: Any) -> dict[str, Any]:
    d = recipe_dict(tmp, strategy=strategy, peers=1, **kw)
    d["peers"] = peers or [dict(p) for p in BRANCHED]
    return d


def _trainer(raw: dict[str, Any]) -> Any:
    from mutualkd.engine import Trainer

    return Trainer(parse_recipe(raw, file="<test>"), recipe_file="<test>")


# --------------------------------------------------------------------------- registry and kit


def test_the_online_strategies_are_installed_plugins() -> None:
    names = set(registry.names("strategy"))
    assert set(ONLINE) <= names
    for name in ONLINE:
        assert "branched" in get_strategy(name).topologies


@pytest.mark.parametrize("name, params", [("one", {"rampup_epochs": 1}), ("cl_ilr", {}),
                                          ("okddip", {"rampup_epochs": 1}), ("pcl", {"rampup_epochs": 1})])
def test_each_online_strategy_passes_the_conformance_kit(tmp_path: Path, name: str, params: dict[str, Any]) -> None:
    check_strategy(get_strategy(name), params=params, peers=3, tmp_path=tmp_path, modes=["alternating"])


# --------------------------------------------------------------------------- topology


def test_branches_share_one_trunk_and_each_is_a_whole_timm_model() -> None:
    import timm

    models = [timm.create_model("cifar_resnet20", num_classes=10) for _ in range(3)]
    net = BranchedNet(models, "cifar_resnet20", "layer2")
    assert all(m.layer1 is net.trunk["layer1"] for m in models)
    assert models[0].layer3 is not models[1].layer3  # each branch its own layer3 and classifier
    assert not torch.equal(models[0].fc.weight, models[1].fc.weight)  # initialised independently
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        trunks, _, logits = net(x)
        for k, m in enumerate(models):  # branch k through the shared trunk is model k itself
            torch.testing.assert_close(logits[k], m(x))
    assert all(t is trunks[0] for t in trunks)
    # The state dict holds the trunk once; a branch's timm state dict is rebuilt from it.
    state = net.state_dict()
    assert sum(k.startswith("trunk.layer1.") for k in state) == sum(k.startswith("layer1.") for k in models[0].state_dict())
    fresh = timm.create_model("cifar_resnet20", num_classes=10).eval()
    fresh.load_state_dict(branch_state_dict(state, 2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), logits[2])


@pytest.mark.parametrize("model, split", [("resnet18", "layer3"), ("cifar_wrn_16_1", "layer1")])
def test_timm_resnets_and_cifar_wrns_split_too(model: str, split: str) -> None:
    import timm

    models = [timm.create_model(model, num_classes=5) for _ in range(2)]
    net = BranchedNet(models, model, split).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, feats, logits = net(x)
        for k, m in enumerate(models):
            torch.testing.assert_close(logits[k], m(x))
            torch.testing.assert_close(feats[k], m.forward_features(x))


def test_ilr_divides_the_gradient_into_the_trunk_by_the_number_of_branches() -> None:
    import timm

    def trunk_grad(ilr: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = BranchedNet([timm.create_model("cifar_resnet20", num_classes=10) for _ in range(4)], "cifar_resnet20",
                          "layer1", ilr=ilr)
        torch.manual_seed(1)
        _, _, logits = net(torch.randn(4, 3, 16, 16))
        torch.stack([z.sum() for z in logits]).sum().backward()
        return net.trunk["conv1"].weight.grad.clone()

    torch.testing.assert_close(trunk_grad(True), trunk_grad(False) / 4)


def test_refusals_name_the_field_and_what_is_supported(tmp_path: Path, recipe_dict: Factory) -> None:
    vit = [{"model": "vit_tiny_patch16_224", "branches": 2, "split_after": "blocks"}]
    with pytest.raises(RecipeError) as e:
        _trainer(_online_recipe(recipe_dict, tmp_path / "a", "one", peers=vit))
    assert "vit_tiny_patch16_224" in str(e.value) and "cifar_resnet" in str(e.value)
    with pytest.raises(RecipeError) as e:
        _trainer(_online_recipe(recipe_dict, tmp_path / "b", "one",
                                peers=[{**BRANCHED[0], "split_after": "layer9"}]))
    assert e.value.field == "peers[0].split_after" and "layer1" in str(e.value)
    with pytest.raises(RecipeError) as e:  # a strategy for whole networks refuses branches
        _trainer(_online_recipe(recipe_dict, tmp_path / "c", "ie_dml"))
    assert e.value.field == "peers[0].branches"
    with pytest.raises(RecipeError) as e:  # and a strategy for branches refuses whole networks
        _trainer(recipe_dict(tmp_path / "d", strategy="one", peers=2))
    assert "branches" in str(e.value)
    with pytest.raises(RecipeError) as e:
        _trainer(_online_recipe(recipe_dict, tmp_path / "e", "one", run={"best_output": "gatde"}))
    assert e.value.field == "run.best_output" and "gated" in str(e.value)
    assert not any((tmp_path / x).exists() for x in "abcde")  # nothing written


# --------------------------------------------------------------------------- the engine's work per batch


def _trunk_calls(trainer: Any, net: str = "net") -> list[int]:
    calls: list[int] = []
    trainer.unwrapped(net).trunk["conv1"].register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_trunk_runs_once_per_batch_and_once_per_view(tmp_path: Path, recipe_dict: Factory) -> None:
    one = _trainer(_online_recipe(recipe_dict, tmp_path / "one", {"name": "one", "rampup_epochs": 1}))
    calls = _trunk_calls(one)
    x, y = next(iter(one.train_loader))
    result = one.train_step(x, y)
    assert len(calls) == 1 and result.forward_passes == 1  # 3 branches, 1 trunk pass
    pcl = _trainer(_online_recipe(recipe_dict, tmp_path / "pcl", {"name": "pcl", "rampup_epochs": 1}))
    calls = _trunk_calls(pcl)
    x, y = next(iter(pcl.train_loader))
    assert x.shape[0] == 3 and not torch.equal(x[0], x[1])  # [views, B, C, H, W], each its own augmentation
    result = pcl.train_step(x, y)
    # 3 views through the live trunk once each; the temporal mean is one more network pass
    assert len(calls) == 3 and result.forward_passes == 2


def test_views_in_the_stream_pipeline(tmp_path: Path, write_image_folder: Factory) -> None:
    from mutualkd.data import build_pipeline
    from mutualkd.config import DataConfig

    root = write_image_folder(tmp_path / "imgs")
    cfg = DataConfig(dataset="image_folder", root=str(root), image_size=16, pipeline="stream", num_workers=0,
                     batch_size=4)
    one = build_pipeline(cfg, seed=0, device="cpu", views=1)
    three = build_pipeline(cfg, seed=0, device="cpu", views=3)
    x1, y1 = next(iter(one.train))
    x3, y3 = next(iter(three.train))
    assert x3.shape == (3, *x1.shape) and torch.equal(y1, y3)
    assert torch.equal(x3[0], x1)  # view 0 is what a single-view run draws
    assert not torch.equal(x3[1], x3[0]) and not torch.equal(x3[2], x3[1])


def test_temporal_mean_follows_the_pcl_decay(tmp_path: Path, recipe_dict: Factory) -> None:
    from mutualkd_builtins.strategies.pcl import pcl_decay

    tr = _trainer(_online_recipe(recipe_dict, tmp_path, {"name": "pcl", "rampup_epochs": 1}))
    mean, net = tr.unwrapped("net_ema"), tr.unwrapped("net")
    loader = iter(tr.train_loader)
    for t in range(3):
        before = [p.detach().clone() for p in mean.parameters()]
        x, y = next(loader)
        tr.train_step(x, y)
        a = pcl_decay(t)
        assert a == min(1 - 1 / (t + 1), 0.999)
        for p_mean, p_old, p_net in zip(mean.parameters(), before, net.parameters()):
            torch.testing.assert_close(p_mean, a * p_old + (1 - a) * p_net.detach())
    assert not any(p.requires_grad for p in mean.parameters()) and not mean.training


def test_skip_update_leaves_a_unit_and_its_optimizer_untouched(tmp_path: Path, recipe_dict: Factory) -> None:
    from mutualkd.strategy import Step
    from mutualkd.testing import registered
    import torch.nn.functional as F

    from mutualkd_builtins.strategies.independent import Independent

    class SkipOdd(Independent):
        """Trains peer1 on even global steps only, logging whether it skipped."""

        def steps(self):  # type: ignore[no-untyped-def]
            return [Step("all", tuple(self.networks))]

        def compute(self, step, ctx):  # type: ignore[no-untyped-def]
            skip = ctx.global_step % 2 == 1
            if skip:
                ctx.skip_update("peer1")
            ctx.log("skipped", float(skip))
            return {n: {"ce": F.cross_entropy(ctx.output(n).logits, ctx.labels)} for n in self.peers}

    with registered("strategy", "skip_odd", SkipOdd):
        tr = _trainer(recipe_dict(tmp_path, strategy="skip_odd", peers=2, max_steps=4))
        opt = tr.units["peer1"].optimizer
        loader = iter(tr.train_loader)
        seen = []
        for step in range(3):
            tr.position.global_step = step
            before = [p.detach().clone() for p in tr.unwrapped("peer1").parameters()]
            state = {k: v["momentum_buffer"].clone() for k, v in enumerate(opt.state.values())} if opt.state else {}
            x, y = next(loader)
            result = tr.train_step(x, y)
            same = all(torch.equal(a, b) for a, b in zip(before, tr.unwrapped("peer1").parameters()))
            if step % 2 == 1:
                assert same and all(torch.equal(state[k], v["momentum_buffer"]) for k, v in enumerate(opt.state.values()))
                assert all(p.grad is None for p in tr.unwrapped("peer1").parameters())
            else:
                assert not same
            seen.append(float(result.scalars["skipped"]))
        assert seen == [0.0, 1.0, 0.0]


# --------------------------------------------------------------------------- runs, outputs, export


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory, recipe_dict: Factory) -> tuple[Path, dict[str, Any]]:
    """A short ONE run on digits (3 branches of a ResNet-20), 2 epochs."""
    tmp = tmp_path_factory.mktemp("one")
    raw = _online_recipe(recipe_dict, tmp, {"name": "one", "rampup_epochs": 1}, name="one", max_steps=None,
                         epochs=2, batch_size=32)
    summary = _trainer(raw).fit()
    return tmp / "one", summary


def test_summary_and_metrics_show_branches_declared_outputs_and_the_chooser(one_run: tuple[Path, dict[str, Any]]
                                                                             ) -> None:
    run, summary = one_run
    assert set(summary["top1"]) == {"net_b0", "net_b1", "net_b2", "ensemble", "gated"}
    assert summary["best_output"] == "net_b0"  # the authors report branch 1
    assert summary["outputs"]["declared"] == ["gated"]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line[:20]]
    assert all("gated" in r["top1"] for r in epochs)
    best = max(range(len(epochs)), key=lambda i: epochs[i]["top1"]["net_b0"])  # first max, as History keeps it
    assert summary["best_epoch"] == epochs[best]["epoch"]
    assert summary["top1"]["net_b0"]["final"] > 50  # trained, not chance
    # The report reads the same: every branch a peer, the declared output a model, and the chooser.
    from mutualkd.report.runs import group_runs, load_run
    from mutualkd.report.tables import run_rows

    report = load_run(run)
    assert report.peers == ["net_b0", "net_b1", "net_b2"]
    assert set(report.top1()) == set(summary["top1"])
    finals = [summary["top1"][f"net_b{k}"]["final"] for k in range(3)]
    assert report.peer_mean("final") == pytest.approx(sum(finals) / 3)
    head, rows = run_rows(group_runs([report]))
    row = dict(zip(head, rows[0]))
    assert row["best/ chosen by"] == "net_b0 (test)" and row["best epoch"] == str(summary["best_epoch"])
    assert {"gated final / best", "net_b2 final / best"} <= set(head)


FRESH = """
import json, sys
import mutualkd, timm, torch
from mutualkd.config import DataConfig
from mutualkd.data import load_dataset

_, test, _ = load_dataset(DataConfig(dataset="digits"))
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
cfg = model.pretrained_cfg
mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
with torch.no_grad():
    pred = model((test.images.float() / 255 - mean) / std).argmax(1)
print(json.dumps({"arch": cfg.get("architecture", type(model).__name__), "correct": int((pred == test.labels).sum()),
                  "n": len(test)}))
"""


def test_an_exported_branch_is_a_plain_timm_model_with_the_recorded_top1(
    one_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run, summary = one_run
    result = CliRunner().invoke(app, ["export", str(run), "--peer", "net_b1", "--out", str(tmp_path / "b1")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "b1" / "config.json").read_text())
    assert config["architecture"] == "cifar_resnet20"
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "b1")], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert fresh.returncode == 0, fresh.stderr
    got = json.loads(fresh.stdout)
    assert got["correct"] == round(summary["top1"]["net_b1"]["final"] * got["n"] / 100)


def test_pcl_exports_its_temporal_mean(tmp_path: Path, recipe_dict: Factory) -> None:
    raw = _online_recipe(recipe_dict, tmp_path, {"name": "pcl", "rampup_epochs": 1}, name="pcl", max_steps=3)
    summary = _trainer(raw).fit()
    assert summary["best_output"] == "net_b0_ema"
    assert {"net_b0_ema", "net_b1_ema", "net_b2_ema", "peer_ensemble"} <= set(summary["top1"])
    from mutualkd.report.runs import load_run

    assert set(load_run(tmp_path / "pcl").top1()) == set(summary["top1"])  # the report shows the temporal means
    result = CliRunner().invoke(app, ["export", str(tmp_path / "pcl"), "--peer", "net_b0_ema", "--out",
                                      str(tmp_path / "mean")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file
    from mutualkd import checkpoint as ckpt

    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "pcl" / "checkpoints"))
    want = branch_state_dict(state["modules"]["net_ema"], 0)
    got = load_file(str(tmp_path / "mean" / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


# --------------------------------------------------------------------------- a third-party strategy

THIRD_PARTY = '''
"""A strategy of its own: a gate over whole peers, an EMA teacher of each peer, a view per peer."""

from collections.abc import Mapping, Sequence
from functools import partial

from pydantic import Field
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.strategy import (
    EMA_SUFFIX, LossTerms, SetupContext, Step, StepContext, Strategy, StrategyParams, TemporalMean,
)


def gate_decay(n: int, cap: float) -> float:
    return min(1 - 1 / (n + 1), cap)


class GatedMeanParams(StrategyParams):
    weight: float = Field(1.0, ge=0.0, description="weight of the distillation from the EMA teachers")


class GatedMean(Strategy[GatedMeanParams]):
    """Peers learn from their EMA teachers and from a gated ensemble of themselves."""

    min_peers = 2

    def setup(self, ctx: SetupContext) -> None:
        self.gate = nn.Linear(ctx.peers[0].feature_shape[0], len(self.peers))
        ctx.add_module("gate", self.gate, unit="gate")

    def steps(self) -> Sequence[Step]:
        return [Step("all", (*self.networks, "gate"))]

    def temporal_means(self) -> Sequence[TemporalMean]:
        return [TemporalMean(p, decay=partial(gate_decay, cap=0.99)) for p in self.peers]

    def views(self) -> Mapping[str, int]:
        return {p: k for k, p in enumerate(self.peers)}

    def _gated(self, ctx: StepContext) -> Tensor:
        outs = [ctx.output(p) for p in self.peers]
        g = ctx.module("gate")(outs[0].features.mean(dim=(2, 3))).softmax(1)
        return torch.einsum("bk,kbc->bc", g, torch.stack([o.logits.float() for o in outs]))

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        terms: LossTerms = {}
        for p in self.peers:
            z = ctx.output(p).logits.float()
            teacher = ctx.output(p + EMA_SUFFIX).logits.float()  # no graph: a target
            kd = F.kl_div(F.log_softmax(z, 1), F.log_softmax(teacher, 1), reduction="batchmean", log_target=True)
            terms[p] = {"ce": F.cross_entropy(z, ctx.labels), "kd": self.params.weight * kd}
        terms["gate"] = {"ce": F.cross_entropy(self._gated(ctx), ctx.labels)}
        return terms

    def outputs(self) -> Sequence[str]:
        return ("gated",)

    def compute_outputs(self, ctx: StepContext) -> Mapping[str, Tensor]:
        return {"gated": self._gated(ctx)}
'''


def test_a_third_party_strategy_with_a_gate_ema_teachers_and_views_passes_the_kit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written against the public contract (mutualkd.strategy) alone, in a package outside the repository."""
    pkg = tmp_path / "site" / "gated_mean_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(THIRD_PARTY))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from gated_mean_plugin import GatedMean  # type: ignore[import-not-found]

    check_strategy(GatedMean, peers=2, tmp_path=tmp_path / "kit", modes=["simultaneous"])


def test_built_in_strategies_import_only_the_public_plugin_api(repo_root: Path) -> None:
    import ast

    allowed = {"mutualkd", "mutualkd.strategy"}
    for path in sorted((repo_root / "plugins" / "mutualkd_builtins").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name == "mutualkd" or name.startswith("mutualkd."):
                    assert name in allowed, f"{path.relative_to(repo_root)} imports {name}; use mutualkd.strategy"


def test_the_benchmark_hand_loop_does_the_engines_work(tmp_path: Path, repo_root: Path) -> None:
    """benchmarks/bench_online.py: one batch of the hand-written ONE leaves the same weights as the engine's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_online", repo_root / "benchmarks" / "bench_online.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tr = _trainer(bench.recipe(tmp_path, "one", 16, "cpu"))
    hand = bench.HandONE(tr)
    x, y = next(iter(tr.train_loader))
    tr.train_step(x, y)
    hand.step(x, y)
    engine = dict(tr.unwrapped("net").named_parameters()) | {f"gate.{k}": v for k, v in tr.unwrapped("gate").named_parameters()}
    mine = dict(hand.net.named_parameters()) | {f"gate.{k}": v for k, v in hand.gate.named_parameters()}
    assert set(engine) == set(mine)
    for k in engine:
        torch.testing.assert_close(mine[k], engine[k], rtol=1e-4, atol=1e-6, msg=k)
