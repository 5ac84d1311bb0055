"""Determinism: two runs of one recipe with ``run.deterministic = true`` write the same
metrics.jsonl on CPU, timings aside, and end with the same weights.

This is what makes the exact-resume checks of test_resume meaningful: a resumed run is
compared with an uninterrupted one, which only says something if an uninterrupted run is
itself reproducible. One of the two runs is the shared reference run of test_resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _helpers import sets
from test_resume import (
    RUN_NAME,
    STRATEGY_SETS,
    assert_same_run,
    comparable_metrics,
    reference_run,
    run_mutualkd,
    start_reference,
    write_recipe,
)


@pytest.mark.parametrize("strategy", ["kl_dml", "ie_dml"])
def test_two_deterministic_runs_write_identical_metrics(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, strategy: str
) -> None:
    start_reference(tmp_path_factory, strategy)  # the two runs go side by side
    recipe = write_recipe(tmp_path)
    done = run_mutualkd(["run", str(recipe), *sets(*STRATEGY_SETS[strategy])], tmp_path / "log")
    assert done.rc == 0, done.explain()
    run_dir = tmp_path / "runs" / RUN_NAME
    reference = reference_run(tmp_path_factory, strategy)

    records = comparable_metrics(run_dir)
    assert {r["kind"] for r in records} == {"step", "epoch"} and len(records) > 20
    # Every loss term of every step, the learning rates, the per-epoch means and top-1,
    # compared as parsed JSON floats: equal means bit-identical float32 values.
    assert_same_run(run_dir, reference)

