"""Determinism: two runs of one recipe with ``run.deterministic = true`` write the same
metrics.jsonl on CPU, timings aside, and end with the same weights.

This is what makes the exact-resume checks of test_resume meaningful: a resumed run is
compared with an uninterrupted one, which only says something if an uninterrupted run is
itself reproducible. One of the two runs is the shared reference run of the ``launch_kit``
fixture (tests/fixtures/launch.py), the one test_resume compares with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize("strategy", ["kl_dml", "ie_dml"])
def test_two_deterministic_runs_write_identical_metrics(
    tmp_path: Path, launch_kit: Any, set_options: Callable[..., list[str]], strategy: str
) -> None:
    kit = launch_kit
    kit.start_reference(strategy)  # the two runs go side by side
    recipe = kit.write_recipe(tmp_path)
    done = kit.run_mutualkd(["run", str(recipe), *set_options(*kit.STRATEGY_SETS[strategy])], tmp_path / "log")
    assert done.rc == 0, done.explain()
    run_dir = tmp_path / "runs" / kit.RUN_NAME
    reference = kit.reference_run(strategy)

    records = kit.comparable_metrics(run_dir)
    assert {r["kind"] for r in records} == {"step", "epoch"} and len(records) > 20
    # Every loss term of every step, the learning rates, the per-epoch means and top-1,
    # compared as parsed JSON floats: equal means bit-identical float32 values.
    kit.assert_same_run(run_dir, reference)
