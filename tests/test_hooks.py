"""The engine's public seams: lifecycle hooks, the per-batch ``train_step``, precision in one
place, and the launcher/recipe precision note."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from mutualkd import checkpoint as ckpt
from mutualkd.engine import Callback, Precision, StepResult, Trainer
from mutualkd.errors import NonFiniteLossError
from mutualkd.strategy import Stage

SMALL_TEST = {"test_subset": 50}


class Recorder(Callback):
    """Every hook call, in order, with what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append(("fit_start", trainer.position.global_step))

    def on_epoch_start(self, trainer: Trainer, stage: Stage, epoch: int) -> None:
        self.calls.append(("epoch_start", stage.name, epoch))

    def on_batch_start(self, trainer: Trainer, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.calls.append(("batch_start", trainer.position.global_step, tuple(inputs.shape), int(labels.numel())))

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        self.calls.append(("batch_end", trainer.position.global_step, result.forward_passes,
                           {k: float(v) for terms in result.terms.values() for k, v in terms.items()}))

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        self.calls.append(("epoch_end", dict(record)))

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        self.calls.append(("checkpoint", kind, path, ckpt.is_complete(path)))

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        self.calls.append(("fit_end", summary))


def test_hooks_run_in_order_with_what_the_run_logs(tmp_path, make_recipe, read_metrics):
    rec = Recorder()
    tr = Trainer(make_recipe(tmp_path, strategy="kl_dml", peers=2, max_steps=3, data=SMALL_TEST), recipe_file="<test>",
                 callbacks=[rec])
    summary = tr.fit()
    kinds = [c[0] for c in rec.calls]
    # The engine's own callbacks run first: its end-of-epoch checkpoints are complete on
    # disk before a user's on_epoch_end sees the record.
    assert kinds == ["fit_start", "epoch_start"] + ["batch_start", "batch_end"] * 3 + [
        "checkpoint", "checkpoint", "epoch_end", "fit_end"]
    # batch_start sees the position before the step, batch_end after it
    assert [c[1] for c in rec.calls if c[0] == "batch_start"] == [0, 1, 2]
    assert [c[1] for c in rec.calls if c[0] == "batch_end"] == [1, 2, 3]
    assert all(c[2] == (8, 1, 8, 8) and c[3] == 8 for c in rec.calls if c[0] == "batch_start")
    # the terms handed to on_batch_end are the ones metrics.jsonl records (log_every = 1)
    logged = [r for r in read_metrics(tr.run_dir) if r["kind"] == "step"]
    ends = [c for c in rec.calls if c[0] == "batch_end"]
    for r, c in zip(logged, ends):
        assert c[2] == r["forward_passes"] == 3
        flat = {k: v for terms in r["steps"].values() for k, v in terms.items()}
        assert flat == pytest.approx(c[3], rel=1e-6)
    epoch = next(c[1] for c in rec.calls if c[0] == "epoch_end")
    assert epoch == [r for r in read_metrics(tr.run_dir) if r["kind"] == "epoch"][0]
    step_ck, best_ck = (c for c in rec.calls if c[0] == "checkpoint")
    assert step_ck[1] == "step" and step_ck[3] and step_ck[2] == ckpt.latest_checkpoint(tr.run_dir / "checkpoints")
    assert best_ck[1] == "best" and best_ck[3] and best_ck[2].name == "best"
    assert rec.calls[-1] == ("fit_end", summary) and summary["global_steps"] == 3


def test_fit_end_gets_none_when_the_run_stops_early(tmp_path, make_recipe):
    rec = Recorder()
    tr = Trainer(make_recipe(tmp_path, strategy="kl_dml", peers=2, max_steps=3, data=SMALL_TEST,
                             optimizer={"lr": 1e12}), recipe_file="<test>", callbacks=[rec])
    with pytest.raises(NonFiniteLossError):
        tr.fit()
    assert rec.calls[-1] == ("fit_end", None)
    assert "epoch_end" not in [c[0] for c in rec.calls]


def test_train_step_is_the_batch_of_the_fit_loop(tmp_path, make_trainer):
    """Two trainers from one recipe: one batch through the public train_step equals the
    first batch of fit() (same terms, same forward count, same weights after it)."""
    a = make_trainer(tmp_path / "a", strategy="ie_dml", peers=2, max_steps=1, data=SMALL_TEST)
    b = make_trainer(tmp_path / "b", strategy="ie_dml", peers=2, max_steps=1, data=SMALL_TEST)
    rec = Recorder()
    a.add_callback(rec)
    a.fit()
    b.train_loader.set_epoch(0)
    x, y = next(iter(b.train_loader))
    result = b.train_step(x, y)
    fitted = next(c for c in rec.calls if c[0] == "batch_end")
    assert result.forward_passes == fitted[2] == 3
    assert {k: float(v) for t in result.terms.values() for k, v in t.items()} == pytest.approx(fitted[3], rel=1e-6)
    for name in a.module_names:
        for (k, p), q in zip(a.unwrapped(name).state_dict().items(), b.unwrapped(name).state_dict().values()):
            assert torch.equal(p, q), f"{name}.{k} differs"
    assert b.position.global_step == 0, "train_step does not advance the position; fit() does"


def test_precision_scales_once_per_iteration_and_between_repeated_steps():
    """One GradScaler for every optimizer: its scale is updated at the end of the iteration,
    and before an optimizer is stepped a second time within it (GradScaler allows one step
    per optimizer between updates)."""
    p = Precision("no", torch.device("cpu"))
    assert p.scaler is None and p.state_dict() is None
    p.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    p.update((w * 2).sum(), {"a": opt})
    assert torch.allclose(w.detach(), torch.full((3,), 0.8)), "the step is unscaled"
    scale = p.scaler.get_scale()
    p.update((w * 2).sum(), {"a": opt})  # same optimizer again: an update in between
    assert p.scaler.get_scale() == scale * 2
    p.end_iteration()
    assert p.scaler.get_scale() == scale * 4


def test_launcher_precision_that_agrees_is_silent(tmp_path, monkeypatch, caplog, make_trainer):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    tr = make_trainer(tmp_path, strategy="kl_dml", peers=2, max_steps=1, data=SMALL_TEST, run={"mixed_precision": "bf16"})
    assert "launcher" not in caplog.text
    assert tr.precision.dtype == torch.bfloat16
