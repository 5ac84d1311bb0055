"""Tests of the KL-DML loss, gradient isolation and the engine (mutualkd.engine.Trainer).

Engine runs are tiny: digits, batch 8, one to three steps, a 50-image test subset where
exact accuracy values do not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mutualkd import checkpoint as ckpt
from mutualkd.config import load_recipe
from mutualkd.engine import Callback, Trainer
from mutualkd.errors import RecipeError, UserError
from mutualkd.strategy import PeerOutput, Step, StepContext
from mutualkd_builtins.losses import kl_to_peers, soft_kl
from mutualkd_builtins.strategies.kl_dml import KLDML, KLDMLParams

SMALL_TEST = {"test_subset": 50}

# --------------------------------------------------------------------------- KL-DML loss

# Fixed logits, batch 3, 4 classes: a student and three other peers.
Z0 = [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, -3.0], [-1.5, 4.0, 0.0, 1.0]]
Z1 = [[1.0, 0.0, -0.5, 2.0], [3.0, -2.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
Z2 = [[-2.0, 1.0, 1.0, 0.0], [0.5, 0.5, -1.0, 2.5], [2.0, -1.0, 3.0, -0.5]]
Z3 = [[0.0, 3.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0], [-0.5, 0.5, 2.5, -2.5]]


def _softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_kl(student: Sequence[Sequence[float]], target: Sequence[Sequence[float]], t: float) -> float:
    """T^2 * mean over the batch of sum_c p_c (log p_c - log q_c), p = softmax(target/T), q = softmax(student/T)."""
    s = np.asarray(student, dtype=np.float64) / t
    g = np.asarray(target, dtype=np.float64) / t
    p, q = _softmax64(g), _softmax64(s)
    per_sample = (p * (np.log(p) - np.log(q))).sum(axis=1)
    return float(t * t * per_sample.mean())


def _t(z: Sequence[Sequence[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(z, dtype=torch.float32, requires_grad=grad)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_soft_kl_matches_reference(t):
    got = float(soft_kl(_t(Z0), _t(Z1), t))
    assert got == pytest.approx(ref_kl(Z0, Z1, t), rel=1e-5, abs=1e-7)


def test_soft_kl_temperature_squared_factor():
    # T^2 * KL at T = 4, computed by hand without the factor, differs by exactly 16.
    kl4_plain = ref_kl(Z0, Z1, 4.0) / 16.0
    assert float(soft_kl(_t(Z0), _t(Z1), 4.0)) == pytest.approx(16.0 * kl4_plain, rel=1e-5)
    assert ref_kl(Z0, Z1, 1.0) != pytest.approx(ref_kl(Z0, Z1, 4.0), rel=1e-3)


def test_soft_kl_direction_and_zero():
    # KL(p_target || p_student): not symmetric; zero for equal logits.
    assert float(soft_kl(_t(Z0), _t(Z0), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_kl(_t(Z0), _t(Z1))) == pytest.approx(ref_kl(Z0, Z1, 1.0), rel=1e-5)
    assert float(soft_kl(_t(Z1), _t(Z0))) == pytest.approx(ref_kl(Z1, Z0, 1.0), rel=1e-5)
    assert ref_kl(Z0, Z1, 1.0) != pytest.approx(ref_kl(Z1, Z0, 1.0), rel=1e-3)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_soft_kl_gradient(t):
    # d/dz_s [T^2 KL(p || softmax(z_s/T))] = T (q - p) / B.
    zs = _t(Z0, grad=True)
    soft_kl(zs, _t(Z2), t).backward()
    s = np.asarray(Z0, np.float64) / t
    g = np.asarray(Z2, np.float64) / t
    expected = t * (_softmax64(s) - _softmax64(g)) / len(Z0)
    np.testing.assert_allclose(zs.grad.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_soft_kl_float16_input_computed_in_float32():
    got = soft_kl(_t(Z0).half(), _t(Z1).half(), 1.0)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(ref_kl(np.float16(Z0), np.float16(Z1), 1.0), rel=1e-3)


@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("others", [[Z1, Z2], [Z1, Z2, Z3]], ids=["N=3", "N=4"])
def test_kl_to_peers_mean_and_sum(t, others):
    each = [ref_kl(Z0, z, t) for z in others]
    mean = float(kl_to_peers(_t(Z0), [_t(z) for z in others], t, "mean"))
    total = float(kl_to_peers(_t(Z0), [_t(z) for z in others], t, "sum"))
    assert mean == pytest.approx(sum(each) / len(each), rel=1e-5)
    assert total == pytest.approx(sum(each), rel=1e-5)
    assert total == pytest.approx(len(others) * mean, rel=1e-5)


def test_kl_to_peers_default_is_mean():
    a = float(kl_to_peers(_t(Z0), [_t(Z1), _t(Z2)]))
    assert a == pytest.approx((ref_kl(Z0, Z1, 1.0) + ref_kl(Z0, Z2, 1.0)) / 2, rel=1e-5)


def test_kl_to_peers_needs_a_peer():
    with pytest.raises(ValueError):
        kl_to_peers(_t(Z0), [])


# --------------------------------------------------------------------------- gradient isolation


def test_kl_to_peers_sends_no_gradient_to_peers():
    z0, z1, z2 = _t(Z0, True), _t(Z1, True), _t(Z2, True)
    kl_to_peers(z0, [z1, z2], 2.0).backward()
    assert z0.grad is not None and z0.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


class FakeContext(StepContext):
    """A StepContext over fixed peer outputs (what the engine hands to a strategy)."""

    def __init__(self, outputs: Sequence[PeerOutput], labels: torch.Tensor, names: Sequence[str] | None = None) -> None:
        self.outputs = list(outputs)
        self.names = list(names) if names is not None else [f"peer{i}" for i in range(len(self.outputs))]
        self.labels = labels
        self.inputs = torch.zeros(len(labels), 1)
        self.epoch = self.global_step = 0
        self.stage = "train"
        self.cache = {}

    def output(self, peer: str) -> PeerOutput:
        return self.outputs[self.names.index(peer)]

    def module(self, name: str) -> nn.Module:
        raise KeyError(name)


def _two_linear_peers(n: int = 2, names: Sequence[str] | None = None) -> tuple[list[nn.Module], FakeContext]:
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    models = [nn.Linear(5, 4) for _ in range(n)]
    outs = [PeerOutput(features=x, logits=m(x)) for m in models]
    return models, FakeContext(outs, labels, names)


def _grads(m: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("n", [2, 3])
def test_kl_dml_alternating_step_leaks_no_gradient(n):
    models, ctx = _two_linear_peers(n)
    names = [f"peer{i}" for i in range(n)]
    strat = KLDML(KLDMLParams(temperature=2.0), peers=names, mode="alternating")
    terms = strat.compute(Step("peer0", ("peer0",)), ctx)
    assert set(terms) == {"peer0"} and set(terms["peer0"]) == {"ce", "kl"}
    sum(terms["peer0"].values()).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(models[0]))
    for m in models[1:]:
        assert all(g is None for g in _grads(m)), "peer0's loss reached another peer"


def test_kl_dml_simultaneous_terms_are_isolated():
    models, ctx = _two_linear_peers(2)
    strat = KLDML(KLDMLParams(), peers=["peer0", "peer1"], mode="simultaneous")
    assert [s.name for s in strat.steps()] == ["all"]
    terms = strat.compute(strat.steps()[0], ctx)
    assert set(terms) == {"peer0", "peer1"}
    # peer0's own terms reach only peer0 ...
    sum(terms["peer0"].values()).backward(retain_graph=True)
    assert all(g is None for g in _grads(models[1]))
    only_own = _grads(models[0])
    # ... and the total gradient of peer0 is that of its own terms (no cross term).
    for m in models:
        m.zero_grad(set_to_none=True)
    (sum(terms["peer0"].values()) + sum(terms["peer1"].values())).backward()
    for a, b in zip(only_own, _grads(models[0])):
        torch.testing.assert_close(a, b)


def test_kl_dml_terms_values():
    models, ctx = _two_linear_peers(3, ["a", "b", "c"])
    strat = KLDML(KLDMLParams(temperature=4.0, weight=0.5, reduction="sum"), peers=["a", "b", "c"], mode="alternating")
    terms = strat.compute(Step("b", ("b",)), ctx)["b"]
    z = [o.logits.detach().double().numpy() for o in ctx.outputs]
    expected_kl = 0.5 * (ref_kl(z[1], z[0], 4.0) + ref_kl(z[1], z[2], 4.0))
    assert float(terms["kl"].detach()) == pytest.approx(expected_kl, rel=1e-5)
    ce = torch.nn.functional.cross_entropy(ctx.outputs[1].logits.detach().double(), ctx.labels)
    assert float(terms["ce"].detach()) == pytest.approx(float(ce), rel=1e-5)


# --------------------------------------------------------------------------- engine helpers


def _wrap_compute(trainer: Trainer, hook: Callable[[Step, StepContext, Any], None]) -> None:
    """Call ``hook(step, ctx, terms)`` after each strategy.compute of ``trainer``."""
    original = trainer.strategy.compute

    def compute(step, ctx):
        terms = original(step, ctx)
        hook(step, ctx, terms)
        return terms

    trainer.strategy.compute = compute  # type: ignore[method-assign]


# --------------------------------------------------------------------------- forward passes


@pytest.mark.parametrize(
    "strategy, mode, n, expected",
    [
        ("kl_dml", "alternating", 2, 3),
        ("kl_dml", "alternating", 3, 5),
        ("kl_dml", "alternating", 4, 7),
        ("kl_dml", "simultaneous", 2, 2),
        ("kl_dml", "simultaneous", 3, 3),
        ("ie_dml", "alternating", 2, 3),
        ("independent", "alternating", 2, 2),
        ("independent", "simultaneous", 3, 3),
    ],
)
def test_forward_passes_per_batch(tmp_path, strategy, mode, n, expected, make_trainer, read_metrics):
    tr = make_trainer(tmp_path, strategy=strategy, peers=n, mode=mode, max_steps=2, data=SMALL_TEST)
    counts: list[int] = []

    class Count(Callback):
        def on_batch_end(self, trainer, result):
            counts.append(result.forward_passes)

    tr.add_callback(Count())
    tr.fit()
    assert counts == [expected, expected]
    logged = [r["forward_passes"] for r in read_metrics(tr.run_dir) if r["kind"] == "step"]
    assert logged == [expected, expected]


# --------------------------------------------------------------------------- run folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, make_trainer) -> Trainer:
    out = tmp_path_factory.mktemp("runs")
    tr = make_trainer(out, name="kl", strategy={"name": "kl_dml", "temperature": 2.0}, max_steps=3)
    tr.summary_returned = tr.fit()
    return tr


def test_run_folder_contents(finished_run):
    rd = finished_run.run_dir
    assert rd == Path(finished_run.recipe.run.out_dir) / "kl"
    names = {p.name for p in rd.iterdir()}
    assert {"recipe.toml", "metrics.jsonl", "summary.json", "checkpoints"} <= names
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"


def test_saved_recipe_reloads(finished_run):
    again = load_recipe(finished_run.run_dir / "recipe.toml")
    assert again == finished_run.recipe
    assert again.strategy.params == {"temperature": 2.0}


def test_metrics_step_records(finished_run, read_metrics):
    recs = read_metrics(finished_run.run_dir)
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["global_step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["stage"] == "train" and r["epoch"] == 1
        assert set(r["steps"]) == {"peer0", "peer1"}  # one step per peer (alternating)
        assert set(r["steps"]["peer0"]) == {"peer0/ce", "peer0/kl"}
        assert set(r["steps"]["peer1"]) == {"peer1/ce", "peer1/kl"}
        for terms in r["steps"].values():
            assert all(math.isfinite(v) for v in terms.values())
            assert all(v >= 0 for k, v in terms.items() if k.endswith("/kl"))
        assert set(r["lr"]) == {"peer0", "peer1"} and all(v > 0 for v in r["lr"].values())
        assert r["images_per_s"] > 0
        assert r["forward_passes"] == 3


def test_metrics_epoch_record(finished_run, digits_test_size, read_metrics):
    recs = read_metrics(finished_run.run_dir)
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert len(epochs) == 1 and recs[-1] == epochs[0]
    e = epochs[0]
    assert e["global_step"] == 3 and e["epoch"] == 1
    assert set(e["loss"]) == {"peer0/ce", "peer0/kl", "peer1/ce", "peer1/kl"}
    # The epoch loss is the mean of the logged step values (every step logged here).
    steps = [r for r in recs if r["kind"] == "step"]
    for key in e["loss"]:
        peer = key.split("/")[0]
        mean = sum(r["steps"][peer][key] for r in steps) / len(steps)
        assert e["loss"][key] == pytest.approx(mean, rel=1e-6)
    assert set(e["top1"]) == {"peer0", "peer1", "ensemble"}
    assert set(e["lr"]) == {"peer0", "peer1"} and e["images_per_s"] > 0
    for v in e["top1"].values():
        # Every one of the 450 digits test images counted once.
        correct = v * digits_test_size / 100
        assert abs(correct - round(correct)) < 1e-6 and 0 <= v <= 100


def test_summary(finished_run, read_metrics):
    s = json.loads((finished_run.run_dir / "summary.json").read_text())
    assert s == finished_run.summary_returned
    assert s["strategy"] == "kl_dml" and s["global_steps"] == 3 and s["epochs"] == 1
    assert s["peers"] == {"peer0": "cifar_resnet20", "peer1": "cifar_wrn_16_1"}
    assert set(s["top1"]) == {"peer0", "peer1", "ensemble"}
    last = [r for r in read_metrics(finished_run.run_dir) if r["kind"] == "epoch"][-1]
    for k, row in s["top1"].items():
        assert set(row) == {"final", "best", "best_epoch"}
        assert row["final"] == pytest.approx(last["top1"][k]) and row["best"] >= row["final"]
        assert row["best_epoch"] == 1


def test_checkpoints(finished_run):
    cdir = finished_run.run_dir / "checkpoints"
    cks = ckpt.list_checkpoints(cdir)
    assert [s for s, _ in cks] == [3]
    for folder in (cks[0][1], cdir / "best"):
        assert (folder / "COMPLETE").is_file() and (folder / "state.pt").is_file()
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["global_step"] == 3 and meta["strategy"] == "kl_dml"
        assert meta["peers"]["peer0"]["model"] == "cifar_resnet20"
        assert set(meta["dataset"]) == {"name", "num_classes", "in_chans", "image_size", "mean", "std"}
        assert {k: meta["dataset"][k] for k in ("name", "num_classes", "in_chans", "image_size")} == {
            "name": "digits", "num_classes": 10, "in_chans": 1, "image_size": [8, 8]}
        assert meta["dataset"]["mean"] == list(finished_run.info.mean) and meta["dataset"]["std"] == list(finished_run.info.std)
        assert meta["recipe_hash"] == finished_run.recipe_hash
    state = ckpt.load_checkpoint(cks[0][1])
    assert {"peer0", "peer1"} <= set(state["modules"]) and set(state["optimizers"]) == {"peer0", "peer1"}
    # The saved weights are the trained ones.
    w = finished_run.unwrapped("peer0").model.state_dict()
    for k, v in state["modules"]["peer0"].items():
        torch.testing.assert_close(v, w[k])


def test_existing_run_folder_is_left_untouched(finished_run):
    rd = finished_run.run_dir
    before = {p.relative_to(rd): p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as ei:
        Trainer(finished_run.recipe, recipe_file="<test>")
    assert "already exists" in str(ei.value) and str(rd) in str(ei.value)
    assert "--resume" in ei.value.hint
    after = {p.relative_to(rd): p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    assert after == before


def test_existing_folder_with_foreign_file(tmp_path, make_trainer):
    rd = tmp_path / "t"
    rd.mkdir()
    (rd / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        make_trainer(tmp_path, data=SMALL_TEST)
    assert [p.name for p in rd.iterdir()] == ["notes.txt"] and (rd / "notes.txt").read_text() == "mine"


def test_empty_existing_folder_is_used(tmp_path, make_trainer):
    (tmp_path / "t").mkdir()
    tr = make_trainer(tmp_path, max_steps=1, data=SMALL_TEST)
    tr.fit()
    assert (tmp_path / "t" / "summary.json").is_file()


# --------------------------------------------------------------------------- faithful order


@pytest.mark.parametrize("n", [2, 3])
def test_alternating_peers_see_updated_predictions(tmp_path, n, make_trainer):
    tr = make_trainer(tmp_path, strategy="kl_dml", peers=n, max_steps=1, data=SMALL_TEST)
    seen: dict[str, dict[int, torch.Tensor]] = {}
    inputs: list[torch.Tensor] = []

    def hook(step, ctx, terms):
        seen[step.name] = {j: ctx.output(f"peer{j}").logits.detach().clone() for j in range(n)}
        inputs.append(ctx.inputs)

    _wrap_compute(tr, hook)
    tr.fit()
    assert list(seen) == [f"peer{k}" for k in range(n)]
    x = inputs[0]
    assert all(i is x for i in inputs)
    fresh = []
    for m in _peers(tr):
        m.train()  # as during training: BatchNorm on batch statistics
        with torch.no_grad():
            fresh.append(m(x)[1])
    for k in range(1, n):
        for j in range(k):
            # Peer k's step sees peer j after j's update on this batch ...
            torch.testing.assert_close(seen[f"peer{k}"][j], fresh[j], rtol=1e-4, atol=1e-5)
            # ... which differs from what peer j predicted before its update.
            assert not torch.allclose(seen["peer0"][j], seen[f"peer{k}"][j], atol=1e-5)
        for j in range(k, n):
            # Peers not yet updated are seen as they were at the start of the batch.
            torch.testing.assert_close(seen[f"peer{k}"][j], seen["peer0"][j])


def test_simultaneous_uses_start_of_batch_predictions(tmp_path, make_trainer):
    tr = make_trainer(tmp_path, strategy="kl_dml", peers=2, mode="simultaneous", max_steps=1, data=SMALL_TEST)
    seen = {}

    def hook(step, ctx, terms):
        seen[step.name] = [ctx.output(f"peer{j}").logits.detach().clone() for j in range(2)]
        seen["x"] = ctx.inputs

    _wrap_compute(tr, hook)
    tr.fit()
    assert [k for k in seen if k != "x"] == ["all"]
    for j, m in enumerate(_peers(tr)):
        m.train()
        with torch.no_grad():
            after = m(seen["x"])[1]
        assert not torch.allclose(after, seen["all"][j], atol=1e-5), "both peers are updated by the step"


# --------------------------------------------------------------------------- no gradient leaks in the engine


def _peers(tr: Trainer) -> list[nn.Module]:
    return [tr.unwrapped(name) for name in tr.peer_names]


def _grad_state(modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor | None]]:
    return {k: [None if p.grad is None else p.grad.clone() for p in m.parameters()] for k, m in modules.items()}


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the spy below
@pytest.mark.parametrize("strategy", ["kl_dml", "ie_dml"])
def test_engine_step_touches_only_its_units_gradients(tmp_path, strategy, make_trainer):
    tr = make_trainer(tmp_path, strategy=strategy, peers=2, max_steps=2, data=SMALL_TEST)
    modules = {name: tr.unwrapped(name) for name in tr.module_names}
    unit_of = {m: u.name for u in tr.units.values() for m in u.modules}
    checked: list[str] = []
    pending: dict[str, Any] = {}

    def hook(step, ctx, terms):
        pending["step"] = step
        pending["before"] = _grad_state(modules)

    _wrap_compute(tr, hook)
    for uname, unit in tr.units.items():
        original_step = unit.optimizer.step

        def opt_step(*a, _orig=original_step, _u=uname, **kw):
            st = pending["step"]
            if _u == st.updates[0]:  # after the step's backward, before any update
                after = _grad_state(modules)
                for m in modules:
                    if unit_of.get(m) not in st.updates:
                        assert _same(pending["before"][m], after[m]), f"step {st.name} changed the gradient of {m}"
                    else:
                        assert any(g is not None for g in after[m]), f"step {st.name} left {m} without gradient"
                checked.append(st.name)
            return _orig(*a, **kw)

        unit.optimizer.step = opt_step
    tr.fit()
    n_steps = len(tr.stages[0].steps)
    assert len(checked) == 2 * n_steps


# --------------------------------------------------------------------------- input errors


def test_unknown_model_is_a_recipe_error(tmp_path, make_trainer):
    with pytest.raises(RecipeError) as ei:
        make_trainer(tmp_path, peers=["cifar_resnet20", "cifar_resnt56"])
    assert ei.value.field == "peers[1].model" and "cifar_resnet56" in ei.value.hint
    assert not (tmp_path / "t").exists(), "nothing is written before the recipe is fully checked"


def test_batch_larger_than_train_set(tmp_path, make_trainer):
    with pytest.raises(UserError) as ei:
        make_trainer(tmp_path, batch_size=64, data={"train_subset": 20})
    assert "batch" in str(ei.value)
    assert not (tmp_path / "t").exists()


def test_strategy_peer_count_refused_before_writing(tmp_path, make_trainer):
    with pytest.raises(RecipeError):
        make_trainer(tmp_path, strategy="kl_dml", peers=1)
    assert not (tmp_path / "t").exists()


def test_max_steps_stops_the_run(tmp_path, make_trainer, read_metrics):
    tr = make_trainer(tmp_path, max_steps=2, epochs=3, data=SMALL_TEST)
    s = tr.fit()
    assert s["global_steps"] == 2
    assert [r["global_step"] for r in read_metrics(tr.run_dir) if r["kind"] == "step"] == [1, 2]


def test_training_step_calls_the_optimizers_directly(tmp_path, make_trainer):
    """The engine owns backward and the optimizer step (mutualkd.engine.precision): each unit's
    optimizer is a plain torch optimizer, no per-step wrapper around it, and the updates land
    in its state."""
    tr = make_trainer(tmp_path, strategy="kl_dml", peers=2, max_steps=2, data=SMALL_TEST)
    for unit in tr.units.values():
        assert type(unit.optimizer) is torch.optim.SGD  # not a wrapper class around it
    tr.fit()
    for unit in tr.units.values():
        momenta = [s["momentum_buffer"] for s in unit.optimizer.state_dict()["state"].values()]
        assert momenta and all(m is not None and m.abs().sum() > 0 for m in momenta)
