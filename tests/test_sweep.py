"""``mutualkd sweep``: the grid's runs, each a normal run folder; finished ones skipped, interrupted
ones resumed; the report grouped by the swept values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import shlex
from typing import Any

import pytest

from mutualkd.errors import RecipeError
from mutualkd.sweep import plan_sweep, print_commands, run_state

#: The factory fixtures of tests/fixtures/ used here (run_cli, set_options).
Factory = Callable[..., Any]

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.toml"


def test_plan_is_the_grid_times_the_seeds(tmp_path: Path):
    plan = plan_sweep(QUICKSTART, ["strategy.weight=0.5,1", "strategy.temperature=2"], [0, 1], out_dir=tmp_path)
    assert [r.name for r in plan.runs] == [
        "quickstart-weight0.5-temperature2-s0", "quickstart-weight0.5-temperature2-s1",
        "quickstart-weight1-temperature2-s0", "quickstart-weight1-temperature2-s1",
    ]
    assert plan.runs[2].values == {"strategy.weight": 1, "strategy.temperature": 2}
    assert all(r.folder.parent == tmp_path for r in plan.runs)
    line = print_commands(plan).splitlines()[1]
    assert shlex.split(line)[:3] == ["mutualkd", "run", str(QUICKSTART)]
    assert "run.seed=1" in line and "run.resume=auto" in line and "strategy.weight=0.5" in line


def test_a_sweep_table_in_the_recipe(tmp_path: Path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(QUICKSTART.read_text() + '\n[sweep]\nseeds = [3]\ngrid = { "optimizer.lr" = [0.1, 0.01] }\n')
    plan = plan_sweep(recipe, out_dir=tmp_path / "s")
    assert [(r.values, r.seed) for r in plan.runs] == [({"optimizer.lr": 0.1}, 3), ({"optimizer.lr": 0.01}, 3)]
    # the runs read a copy without [sweep]
    assert plan.recipe != recipe and "[sweep]" not in plan.recipe.read_text()


@pytest.mark.parametrize("grid, message", [
    (["strategy.weight"], "key=value1,value2"),
    (["run.seed=1,2"], "--seeds"),
    (["strategy.wieght=1,2"], "wieght"),  # every run's recipe is validated before any starts
])
def test_bad_grids_are_refused_before_any_run(tmp_path: Path, grid: list[str], message: str):
    with pytest.raises(RecipeError) as e:
        plan_sweep(QUICKSTART, grid, [0], out_dir=tmp_path)
    assert message in str(e.value)
    assert not any(tmp_path.iterdir())


def test_nothing_to_sweep(tmp_path: Path, run_cli: Factory):
    proc = run_cli(["sweep", str(QUICKSTART), "--out-dir", str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and "nothing to sweep" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sweep_runs_skips_resumes_and_reports_by_swept_value(tmp_path: Path, run_cli: Factory, set_options: Factory):
    tiny = set_options("run.epochs=1", "data.train_subset=64", "data.test_subset=64", "run.progress=false")
    args = ["sweep", str(QUICKSTART), "--grid", "strategy.weight=0.5,1", "--seeds", "0,1", "--out-dir", str(tmp_path), *tiny]
    proc = run_cli(args, timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    names = ["quickstart-weight0.5-s0", "quickstart-weight0.5-s1", "quickstart-weight1-s0", "quickstart-weight1-s1"]
    assert all(run_state(tmp_path / n) == "done" for n in names)
    assert "4 run(s) done, 0 resumed, 0 skipped, 0 failed" in proc.stdout

    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    groups = md.split("## Per group", 1)[1].split("## Per run", 1)[0]
    rows = [r for r in groups.splitlines() if r.startswith("| quickstart")]
    assert len(rows) == 2
    assert rows[0].startswith("| quickstart-weight0.5 |") and rows[0].rstrip().endswith("| strategy.weight=0.5 |")
    assert "| 0, 1 |" in rows[0] and "±" in rows[0]
    swept = md.split("## Per swept value", 1)[1].split("## Plots", 1)[0]
    assert "| strategy.weight | 0.5 | quickstart-weight0.5 | 2 |" in swept
    assert "| strategy.weight | 1 | quickstart-weight1 | 2 |" in swept

    # again: finished runs are skipped; a run that lost its summary (interrupted at its last
    # checkpoint) is resumed, not started again
    (tmp_path / names[3] / "summary.json").unlink()
    proc = run_cli(args, timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "0 run(s) done, 1 resumed, 3 skipped, 0 failed" in proc.stdout
    assert run_state(tmp_path / names[3]) == "done"
