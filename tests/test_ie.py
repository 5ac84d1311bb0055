"""Tests of the inheritance-and-exploration strategies: IE-DML's four-step schedule and IE-KD.

The central test snapshots every parameter around each of the four steps of one IE-DML
batch and checks that each step changes exactly the modules the method says it updates.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import shutil
from typing import Any

import pytest
import torch

from mutualkd import checkpoint as ckpt
from mutualkd.engine import Trainer
from mutualkd.errors import CheckpointError, RecipeError, UserError
from mutualkd.strategy import Step, StepContext
from mutualkd_builtins.metrics import l1_distance

SMALL_TEST = {"test_subset": 50}


def _wrap_compute(trainer: Trainer, before: Callable[[Step, StepContext], None] | None = None,
                  after: Callable[[Step, StepContext, Any], None] | None = None) -> None:
    original = trainer.strategy.compute

    def compute(step, ctx):
        if before is not None:
            before(step, ctx)
        terms = original(step, ctx)
        if after is not None:
            after(step, ctx, terms)
        return terms

    trainer.strategy.compute = compute  # type: ignore[method-assign]


def _all_modules(tr: Trainer) -> dict[str, torch.nn.Module]:
    return {name: tr.unwrapped(name) for name in tr.module_names}


def _aux_names(tr: Trainer) -> list[str]:
    return [name for name in tr.module_names if name not in tr.peer_names]


# --------------------------------------------------------------------------- IE-DML, two peers


def test_ie_dml_two_peer_schedule_declaration(one_batch):
    tr = one_batch["trainer"]
    stages = tr.strategy.stages()
    assert len(stages) == 1
    steps = stages[0].steps
    assert [s.name for s in steps] == ["ae:peer0", "peer1", "ae:peer1", "peer0"]
    assert [s.updates for s in steps] == [("peer0.ae",), ("peer1",), ("peer1.ae",), ("peer0",)]
    assert set(_aux_names(tr)) == {"peer0.ae", "peer1.ae", "peer0.ie.peer1", "peer1.ie.peer0"}
    # A student's encoders train with its backbone; each autoencoder is a unit of its own.
    assert sorted(tr.units) == ["peer0", "peer0.ae", "peer1", "peer1.ae"]
    assert tr.units["peer1"].modules == ["peer1", "peer1.ie.peer0"]
    assert tr.units["peer0"].modules == ["peer0", "peer0.ie.peer1"]
    assert tr.units["peer0.ae"].modules == ["peer0.ae"]


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory, make_trainer, param_snapshot) -> dict[str, Any]:
    """One IE-DML batch of two peers, with every parameter snapshotted before each step."""
    tr = make_trainer(tmp_path_factory.mktemp("iedml"), strategy="ie_dml", peers=2, max_steps=1, data=SMALL_TEST)
    mods = _all_modules(tr)
    rec: dict[str, Any] = {"trainer": tr, "snaps": [], "names": [], "feats": {}, "inputs": [], "ae0_calls": []}

    def before(step, ctx):
        rec["names"].append(step.name)
        rec["snaps"].append(param_snapshot(mods))

    def after(step, ctx, terms):
        rec["feats"][step.name] = {j: ctx.output(f"peer{j}").features.detach().clone() for j in range(2)}
        rec["inputs"].append(ctx.inputs)

    _wrap_compute(tr, before, after)
    ae0 = tr.unwrapped("peer0.ae")
    # Training calls the whole autoencoder (forward); the teacher factor only its encoder.
    for method in ("forward", "encode"):
        original = getattr(ae0, method)

        def recorded(f, _original=original):
            rec["ae0_calls"].append((torch.is_grad_enabled(), [p.detach().clone() for p in ae0.parameters()]))
            return _original(f)

        setattr(ae0, method, recorded)
    tr.fit()
    rec["snaps"].append(param_snapshot(mods))
    return rec


def test_ie_dml_each_step_changes_exactly_its_modules(one_batch, params_changed):
    """The four steps of one batch: 1 AE of net 1, 2 net 2, 3 AE of net 2, 4 net 1."""
    snaps, names = one_batch["snaps"], one_batch["names"]
    assert names == ["ae:peer0", "peer1", "ae:peer1", "peer0"]
    assert len(snaps) == 5
    expected = [
        {"peer0.ae"},
        {"peer1", "peer1.ie.peer0"},
        {"peer1.ae"},
        {"peer0", "peer0.ie.peer1"},
    ]
    for k, want in enumerate(expected):
        frac = params_changed(snaps[k], snaps[k + 1])
        assert set(frac) == {"peer0", "peer1", "peer0.ae", "peer1.ae", "peer0.ie.peer1", "peer1.ie.peer0"}
        moved = {m for m, f in frac.items() if f > 0}
        assert moved == want, f"step {k + 1} ({names[k]}) changed {sorted(moved)}, expected {sorted(want)}"
        for m in want:
            # Every parameter tensor of an updated module receives a gradient and moves.
            assert frac[m] == 1.0, f"step {k + 1}: only {frac[m]:.0%} of {m}'s parameters changed"


def test_ie_dml_recomputes_changed_nets_only(one_batch):
    feats, x = one_batch["feats"], one_batch["inputs"][0]
    assert all(i is x for i in one_batch["inputs"])
    # Step 3 trains net 2's autoencoder on net 2's *updated* features (recomputed after step 2).
    peer1 = one_batch["trainer"].unwrapped("peer1")
    peer1.train()
    with torch.no_grad():
        f1_now = peer1(x)[0]
    torch.testing.assert_close(feats["ae:peer1"][1], f1_now, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats["peer1"][1], feats["ae:peer1"][1], atol=1e-5)
    # Net 1 is unchanged until step 4, so its features are reused through steps 1-4.
    for name in ("peer1", "ae:peer1", "peer0"):
        torch.testing.assert_close(feats[name][0], feats["ae:peer0"][0])
    assert one_batch["trainer"].last_forward_passes == 3


def test_ie_dml_teacher_factor_uses_updated_autoencoder(one_batch):
    """Step 2's teacher factor comes from net 1's autoencoder *after* step 1 updated it."""
    calls = one_batch["ae0_calls"]
    # Step 1 trains it (with grad), step 2 uses it as the teacher (no grad).
    assert [g for g, _ in calls] == [True, False]
    used_in_step2 = calls[1][1]
    at_start = list(one_batch["snaps"][0]["peer0.ae"].values())
    after_step1 = list(one_batch["snaps"][1]["peer0.ae"].values())
    assert all(torch.equal(a, b) for a, b in zip(used_in_step2, after_step1))
    assert any(not torch.equal(a, b) for a, b in zip(used_in_step2, at_start))


def test_ie_dml_metrics_terms(one_batch, read_metrics):
    recs = read_metrics(one_batch["trainer"].run_dir)
    steps = [r for r in recs if r["kind"] == "step"]
    assert len(steps) == 1
    r = steps[0]
    assert list(r["steps"]) == ["ae:peer0", "peer1", "ae:peer1", "peer0"]
    assert set(r["steps"]["ae:peer0"]) == {"peer0/rec"}
    assert set(r["steps"]["peer1"]) == {"peer1/ce", "peer1/inh", "peer1/exp"}
    assert set(r["steps"]["ae:peer1"]) == {"peer1/rec"}
    assert set(r["steps"]["peer0"]) == {"peer0/ce", "peer0/inh", "peer0/exp"}
    for p in ("peer0", "peer1"):
        assert r["steps"][p][f"{p}/inh"] >= 0 >= r["steps"][p][f"{p}/exp"]
    assert r["forward_passes"] == 3
    assert set(r["lr"]) == {"peer0", "peer1", "peer0.ae", "peer1.ae"}
    epoch = [r for r in recs if r["kind"] == "epoch"][-1]
    assert {"peer0/ce", "peer0/inh", "peer0/exp", "peer0/rec", "peer1/rec"} <= set(epoch["loss"])


# --------------------------------------------------------------------------- IE-DML, three peers and simultaneous


def test_ie_dml_three_peers_order_and_averaging(tmp_path, make_trainer):
    tr = make_trainer(tmp_path, strategy={"name": "ie_dml", "lambda_inh": 3.0, "lambda_exp": 2.0},
                      peers=3, max_steps=1, data=SMALL_TEST)
    steps = tr.strategy.stages()[0].steps
    assert [s.name for s in steps] == ["ae:peer0,peer2", "peer1", "ae:peer0,peer1", "peer2", "ae:peer1,peer2", "peer0"]
    assert [s.updates for s in steps] == [
        ("peer0.ae", "peer2.ae"), ("peer1",), ("peer0.ae", "peer1.ae"), ("peer2",), ("peer1.ae", "peer2.ae"), ("peer0",)
    ]
    assert tr.units["peer1"].modules == ["peer1", "peer1.ie.peer0", "peer1.ie.peer2"]
    checked: list[str] = []

    def after(step, ctx, terms):
        if step.name.startswith("ae:"):
            assert set(terms) == {n.removesuffix(".ae") for n in step.updates}
            assert all(set(t) == {"rec"} for t in terms.values())
            return
        k = tr.peer_names.index(step.name)
        out = ctx.output(step.name)
        inh, exp = [], []
        with torch.no_grad():
            for j in range(3):
                if j == k:
                    continue
                ft, _ = tr.unwrapped(f"peer{j}.ae")(ctx.output(f"peer{j}").features.detach())
                f_inh, f_exp = tr.unwrapped(f"peer{k}.ie.peer{j}")(out.features)
                inh.append(3.0 * l1_distance(f_inh, ft))
                exp.append(-2.0 * l1_distance(f_exp, ft))
        assert len(inh) == 2
        got = terms[step.name]
        assert set(got) == {"ce", "inh", "exp"}
        assert float(got["inh"].detach()) == pytest.approx(float(sum(inh) / 2), rel=1e-4)
        assert float(got["exp"].detach()) == pytest.approx(float(sum(exp) / 2), rel=1e-4)
        ce = torch.nn.functional.cross_entropy(out.logits.detach().float(), ctx.labels)
        assert float(got["ce"].detach()) == pytest.approx(float(ce), rel=1e-5)
        checked.append(step.name)

    _wrap_compute(tr, after=after)
    tr.fit()
    assert checked == ["peer1", "peer2", "peer0"]
    assert tr.last_forward_passes == 5  # 2N - 1


def test_ie_dml_simultaneous(tmp_path, make_trainer, param_snapshot, params_changed):
    n = 2
    tr = make_trainer(tmp_path, strategy="ie_dml", peers=n, mode="simultaneous", max_steps=1, data=SMALL_TEST)
    steps = tr.strategy.stages()[0].steps
    assert [s.name for s in steps] == ["autoencoders", "peers"]
    assert steps[0].updates == tuple(f"peer{i}.ae" for i in range(n))
    assert steps[1].updates == tuple(f"peer{i}" for i in range(n))
    mods = _all_modules(tr)
    snaps = []
    _wrap_compute(tr, before=lambda step, ctx: snaps.append(param_snapshot(mods)))
    tr.fit()
    snaps.append(param_snapshot(mods))
    assert tr.last_forward_passes == n
    moved1 = {m for m, f in params_changed(snaps[0], snaps[1]).items() if f > 0}
    moved2 = {m for m, f in params_changed(snaps[1], snaps[2]).items() if f > 0}
    assert moved1 == {f"peer{i}.ae" for i in range(n)}
    assert moved2 == set(mods) - moved1


# --------------------------------------------------------------------------- IE-KD


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, make_trainer) -> Path:
    """A 1-peer cifar_resnet20 digits run trained for a few steps: the IE-KD teacher."""
    out = tmp_path_factory.mktemp("teacher")
    tr = make_trainer(out, name="teacher", strategy="independent", peers=["cifar_resnet20"], max_steps=3,
                      data=SMALL_TEST)
    tr.fit()
    return tr.run_dir


def _ie_kd(out: Path, teacher: Path | str, *, name: str = "kd", max_steps: int = 6, epochs: int = 1,
           **params: Any) -> dict[str, Any]:
    strategy = {"name": "ie_kd", "teacher": str(teacher), "ae_epochs": 1, "lambda_inh": 5.0, "lambda_exp": 5.0}
    strategy.update(params)
    # 32 train images, batches of 8: 4 steps per epoch, so stage 1 takes steps 1-4.
    return dict(out_dir=out, name=name, strategy=strategy, peers=["cifar_wrn_16_1"], max_steps=max_steps,
                epochs=epochs, data={"train_subset": 32, "test_subset": 50})


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, teacher_run, make_recipe) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kd")
    tr = Trainer(make_recipe(**_ie_kd(out, teacher_run, teacher_model="cifar_resnet20")), recipe_file="<test>")
    info: dict[str, Any] = {"trainer": tr, "stage_steps": []}
    ae = tr.unwrapped("teacher.ae")

    def before(step, ctx):
        info["stage_steps"].append((ctx.stage, step.name))
        if ctx.stage == "student" and "ae_at_student" not in info:
            info["ae_at_student"] = {k: v.clone() for k, v in ae.state_dict().items()}

    _wrap_compute(tr, before=before)
    tr.fit()
    return info


def test_ie_kd_stages(kd_run):
    tr = kd_run["trainer"]
    stages = tr.strategy.stages()
    assert [s.name for s in stages] == ["teacher_ae", "student"]
    assert stages[0].epochs == 1 and stages[0].evaluate is False
    assert [s.updates for s in stages[0].steps] == [("teacher.ae",)]
    assert [s.updates for s in stages[1].steps] == [("peer0",)]
    assert kd_run["stage_steps"] == [("teacher_ae", "teacher.ae")] * 4 + [("student", "peer0")] * 2
    assert tr.units["peer0"].modules == ["peer0", "student.ie"]
    assert "teacher" in tr.frozen_modules and "teacher" not in tr.units


def test_ie_kd_metrics(kd_run, read_metrics):
    recs = read_metrics(kd_run["trainer"].run_dir)
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["stage"] for r in steps] == ["teacher_ae"] * 4 + ["student"] * 2
    for r in steps[:4]:
        assert r["steps"] == {"teacher.ae": {"teacher/rec": pytest.approx(r["steps"]["teacher.ae"]["teacher/rec"])}}
        assert r["steps"]["teacher.ae"]["teacher/rec"] > 0
    for r in steps[4:]:
        terms = r["steps"]["peer0"]
        assert set(terms) == {"peer0/ce", "peer0/inh", "peer0/exp"}
        assert terms["peer0/inh"] >= 0 >= terms["peer0/exp"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [e["stage"] for e in epochs] == ["teacher_ae", "student"]
    assert "top1" not in epochs[0] and set(epochs[1]["top1"]) == {"peer0"}
    # The index of the first step record of the student stage comes after the AE epoch record.
    kinds = [(r["kind"], r["stage"]) for r in recs]
    assert kinds.index(("epoch", "teacher_ae")) < kinds.index(("step", "student"))


def test_ie_kd_teacher_and_autoencoder_frozen_in_stage_2(kd_run, teacher_run):
    tr = kd_run["trainer"]
    # The autoencoder does not change while the student trains (parameters and BN statistics).
    now = tr.unwrapped("teacher.ae").state_dict()
    for k, v in kd_run["ae_at_student"].items():
        assert torch.equal(v, now[k]), k
    # The teacher is exactly the checkpoint's network, BN statistics included.
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(teacher_run / "checkpoints"))["modules"]["peer0"]
    teacher = tr.unwrapped("teacher").model.state_dict()
    assert set(saved) == set(teacher)
    for k, v in saved.items():
        assert torch.equal(v, teacher[k]), k
    assert not tr.unwrapped("teacher").training


def test_ie_kd_checkpoint_holds_split_indices(kd_run):
    tr = kd_run["trainer"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tr.folder.checkpoints))
    enc = state["modules"]["student.ie"]
    assert tr.unwrapped("student.ie").in_channels == 64  # cifar_wrn_16_1's last stage
    assert torch.equal(enc["inh_index"], torch.arange(32))
    assert torch.equal(enc["exp_index"], torch.arange(32, 64))
    assert "teacher.ae" in state["modules"] and "teacher" in state["modules"]
    assert state["strategy"]["teacher"] == str(Path(kd_run["trainer"].recipe.strategy.params["teacher"]))


def test_ie_kd_random_split_saved_and_restored(tmp_path, teacher_run, make_recipe):
    kw = _ie_kd(tmp_path, teacher_run, split="random", split_seed=7, epochs=2, max_steps=6)
    tr = Trainer(make_recipe(**kw), recipe_file="<test>")
    tr.fit()
    latest = ckpt.latest_checkpoint(tr.folder.checkpoints)
    state = ckpt.load_checkpoint(latest)
    inh, exp = state["modules"]["student.ie"]["inh_index"], state["modules"]["student.ie"]["exp_index"]
    assert inh.numel() == exp.numel() == 32
    assert torch.equal(torch.sort(torch.cat([inh, exp])).values, torch.arange(64))
    assert not torch.equal(inh, torch.arange(32)), "random split equals the natural one"
    # Resuming restores the saved split (not one drawn again): rewrite the checkpoint with
    # another permutation and resume from it.
    other = torch.randperm(64, generator=torch.Generator().manual_seed(123))
    state["modules"]["student.ie"]["inh_index"] = other[:32].clone()
    state["modules"]["student.ie"]["exp_index"] = other[32:].clone()
    meta = json.loads((latest / "meta.json").read_text())
    ckpt.save_checkpoint(latest, state, meta)
    kw["max_steps"] = 7
    again = Trainer(make_recipe(**kw), recipe_file="<test>", resume=tr.run_dir)
    again.fit()
    assert torch.equal(again.unwrapped("student.ie").inh_index, other[:32])
    assert torch.equal(again.unwrapped("student.ie").exp_index, other[32:])


def test_ie_kd_teacher_model_mismatch(tmp_path, teacher_run, make_recipe):
    with pytest.raises(CheckpointError) as ei:
        Trainer(make_recipe(**_ie_kd(tmp_path, teacher_run, teacher_model="cifar_resnet56")), recipe_file="r.toml")
    text = str(ei.value)
    assert "cifar_resnet20" in text and "cifar_resnet56" in text and "strategy.teacher_model" in text
    assert not (tmp_path / "kd").exists()


def test_ie_kd_teacher_missing(tmp_path, make_recipe):
    with pytest.raises(CheckpointError) as ei:
        Trainer(make_recipe(**_ie_kd(tmp_path, tmp_path / "no_such_run")), recipe_file="r.toml")
    assert "no_such_run" in str(ei.value) and "strategy.teacher" in str(ei.value)


def test_ie_kd_teacher_peer_unknown(tmp_path, teacher_run, make_recipe):
    with pytest.raises(CheckpointError) as ei:
        Trainer(make_recipe(**_ie_kd(tmp_path, teacher_run, teacher_peer="peer9")), recipe_file="r.toml")
    assert "peer9" in str(ei.value) and "peer0" in str(ei.value)


def _teacher_copy_with_meta(tmp_path, teacher_run, edit):
    """A copy of the teacher run whose latest checkpoint's meta.json is changed by ``edit``."""
    copy = tmp_path / "teacher_copy"
    shutil.copytree(teacher_run, copy)
    latest = ckpt.latest_checkpoint(copy / "checkpoints")
    meta = json.loads((latest / "meta.json").read_text())
    edit(meta)
    (latest / "meta.json").write_text(json.dumps(meta))
    return copy


def test_ie_kd_teacher_class_count_mismatch(tmp_path, teacher_run, make_recipe):
    copy = _teacher_copy_with_meta(tmp_path, teacher_run, lambda m: m["dataset"].update(num_classes=100))
    with pytest.raises(CheckpointError) as ei:
        Trainer(make_recipe(**_ie_kd(tmp_path, copy)), recipe_file="r.toml")
    assert "100 classes" in str(ei.value) and "10 classes" in str(ei.value)


def test_ie_kd_teacher_incompatible_weights(tmp_path, teacher_run, make_recipe):
    """A checkpoint whose recorded architecture does not fit its weights is refused."""
    copy = _teacher_copy_with_meta(tmp_path, teacher_run, lambda m: m["peers"]["peer0"].update(model="cifar_wrn_16_1"))
    with pytest.raises(CheckpointError) as ei:
        Trainer(make_recipe(**_ie_kd(tmp_path, copy)), recipe_file="r.toml")
    assert "do not fit" in str(ei.value)


def test_ie_kd_needs_one_peer(tmp_path, teacher_run, make_recipe):
    kw = _ie_kd(tmp_path, teacher_run)
    kw["peers"] = ["cifar_resnet20", "cifar_resnet20"]
    with pytest.raises(RecipeError) as ei:
        Trainer(make_recipe(**kw), recipe_file="r.toml")
    assert "exactly 1" in str(ei.value)


def test_ie_kd_teacher_is_required(tmp_path, make_trainer):
    with pytest.raises(UserError) as ei:
        make_trainer(tmp_path, strategy={"name": "ie_kd"}, peers=["cifar_resnet20"])
    assert "strategy.teacher" in str(ei.value)


# --------------------------------------------------------------------------- IE-DML end to end


@pytest.mark.slow
def test_ie_dml_digits_accuracy(tmp_path, quickstart_recipe, read_metrics):
    """Two peers trained with IE-DML on digits reach >= 95 % top-1 each."""
    from mutualkd.config import load_recipe

    recipe = load_recipe(
        quickstart_recipe,
        [
            'strategy={name="ie_dml"}',
            "run.epochs=5",
            "run.log_every=10",
            "run.progress=false",
            "run.device=cpu",
            f"run.out_dir={json.dumps(str(tmp_path))}",
        ],
    )
    tr = Trainer(recipe, recipe_file=str(quickstart_recipe))
    summary = tr.fit()
    recs = read_metrics(tr.run_dir)
    terms = set()
    for r in recs:
        if r["kind"] == "step":
            for t in r["steps"].values():
                terms |= {k.split("/")[1] for k in t}
    assert {"ce", "inh", "exp", "rec"} <= terms
    for peer in ("peer0", "peer1"):
        assert summary["top1"][peer]["final"] >= 95.0, summary["top1"]
