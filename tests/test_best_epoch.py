"""A staged run (IE-KD: the teacher's autoencoder stage, then the student) numbers its epochs once:
summary.json, the console table, the report and checkpoints/best agree on the best epoch and the
figures there, with and without a validation split, including a best epoch earlier than the last
(forced: the last epoch zeroes the classifier)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
import torch

from mutualkd.checkpoint import read_meta
from mutualkd.config import parse_recipe
from mutualkd.engine import Trainer
from mutualkd.engine.hooks import Callback
from mutualkd.report.runs import load_run
from mutualkd.report.tables import run_rows
from mutualkd.runlog import summary_table

AE_EPOCHS, STUDENT_EPOCHS = 1, 3
LAST = AE_EPOCHS + STUDENT_EPOCHS


class ForgetAtTheEnd(Callback):
    """After each batch of the last epoch, zero the student's classifier: every logit equal, that
    epoch's top-1 falls to one class's share, so the best epoch is an earlier one."""

    def on_batch_end(self, trainer: Any, result: Any) -> None:
        if trainer.position.epoch + 1 == LAST:
            with torch.no_grad():
                head = trainer.unwrapped("peer0").model.get_classifier()
                head.weight.zero_()
                head.bias.zero_()


def _records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]


@pytest.mark.parametrize("forget", [False, True], ids=["trained", "forgets-at-the-end"])
@pytest.mark.parametrize("val", [None, 0.2], ids=["test-chooses", "val-chooses"])
def test_a_staged_run_reports_one_best_epoch(tmp_path: Path, tiny_run: Path, val: float | None, forget: bool) -> None:
    torch.manual_seed(0)
    data: dict[str, Any] = {"dataset": "digits", "batch_size": 32, "train_subset": 640, "test_subset": 200}
    if val is not None:
        data["val_fraction"] = val
    recipe = parse_recipe({
        "run": {"name": "kd", "out_dir": str(tmp_path), "epochs": STUDENT_EPOCHS, "progress": False, "device": "cpu",
                "seed": 1},
        "data": data,
        "peers": [{"model": "cifar_wrn_16_1"}],
        "strategy": {"name": "ie_kd", "teacher": str(tiny_run), "ae_epochs": AE_EPOCHS},
        "optimizer": {"lr": 0.1},
    }, file="<test>")
    tr = Trainer(recipe, recipe_file="<test>", callbacks=[ForgetAtTheEnd()] if forget else [])
    tr.fit()
    summary = json.loads((tr.run_dir / "summary.json").read_text(encoding="utf-8"))
    records = _records(tr.run_dir)

    # metrics.jsonl: one global count; the autoencoder stage is epoch 1 and not evaluated.
    assert [r["epoch"] for r in records] == list(range(1, LAST + 1))
    assert [r["stage"] for r in records] == ["teacher_ae"] * AE_EPOCHS + ["student"] * STUDENT_EPOCHS
    evaluated = [r for r in records if "top1" in r]
    assert [r["epoch"] for r in evaluated] == list(range(AE_EPOCHS + 1, LAST + 1))
    assert summary["stages"] == [
        {"name": "teacher_ae", "first_epoch": 1, "last_epoch": AE_EPOCHS, "evaluated": False},
        {"name": "student", "first_epoch": AE_EPOCHS + 1, "last_epoch": LAST, "evaluated": True},
    ]

    # The best epoch: the best peers' top-1 on the split that chooses (the first of equals).
    key = "top1" if val is None else "val_top1"
    chooser = [r for r in evaluated if key in r]
    scores = [sum(r[key][p] for p in summary["peers"]) / len(summary["peers"]) for r in chooser]
    best_record = chooser[scores.index(max(scores))]
    assert summary["best_epoch"] == best_record["epoch"]
    assert summary["best_chosen_by"] == ("test" if val is None else "validation")
    assert summary["top1_at_best_epoch"] == best_record["top1"]
    if forget:
        assert summary["best_epoch"] < LAST, scores
    else:
        assert evaluated[-1]["top1"]["peer0"] > 40.0  # the student learnt: the forgetting case means something

    # Each model's own best and final, with the global epoch of its best.
    for name, row in summary["top1"].items():
        values = [r["top1"][name] for r in evaluated]
        assert row["final"] == values[-1] and row["best"] == max(values)
        assert row["best_epoch"] == evaluated[values.index(max(values))]["epoch"]

    # checkpoints/best holds that epoch.
    assert read_meta(tr.run_dir / "checkpoints" / "best")["epoch"] == summary["best_epoch"]

    # The console table shows the same epoch and figures.
    console = Console(width=200, record=True, color_system=None)
    console.print(summary_table(summary))
    text = console.export_text()
    assert f"at epoch {summary['best_epoch']}" in text and f"best/ holds epoch {summary['best_epoch']}" in text
    assert f"{AE_EPOCHS + 1}-{LAST}: student" in text
    row = next(line for line in text.splitlines() if "peer0" in line)
    cells = row.replace("│", " ").split()
    assert cells[1:] == [f"{summary['top1']['peer0']['final']:.2f}", f"{summary['top1']['peer0']['best']:.2f}",
                         str(summary["top1"]["peer0"]["best_epoch"]), f"{summary['top1_at_best_epoch']['peer0']:.2f}"]

    # The report reads the same epoch and figure from the run folder.
    run = load_run(tr.run_dir)
    assert run.best_epoch() == summary["best_epoch"]
    assert run.top1_at(summary["best_epoch"]) == pytest.approx(summary["top1_at_best_epoch"])
    from mutualkd.report.runs import group_runs

    head, rows = run_rows(group_runs([run]))
    cell = dict(zip(head, rows[0]))
    assert cell["best epoch"] == str(summary["best_epoch"])
    assert cell["best/ chosen by"] == f"{summary['best_output']} ({summary['best_chosen_by']})"
    assert cell["peers at best epoch"] == f"{summary['top1_at_best_epoch']['peer0']:.2f}"
