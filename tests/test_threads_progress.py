"""CPU threads (run.threads, OMP_NUM_THREADS, the default) and plain progress lines without a terminal."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mutualkd.engine import Callback
from mutualkd.engine.threads import resolve_threads


class _SeesThreads(Callback):
    """torch's thread count at each batch of the fit."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_batch_end(self, trainer, result) -> None:
        self.counts.append(torch.get_num_threads())


@pytest.mark.parametrize(
    ("recipe", "env", "expected"),
    [
        (None, {}, (1, "default")),
        (None, {"OMP_NUM_THREADS": "3"}, (3, "OMP_NUM_THREADS")),
        (None, {"MKL_NUM_THREADS": "2"}, (2, "MKL_NUM_THREADS")),
        (None, {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "2"}, (4, "OMP_NUM_THREADS")),
        (None, {"OMP_NUM_THREADS": "0"}, (1, "default")),  # not a count OpenMP accepts: ignored
        (None, {"OMP_NUM_THREADS": "two"}, (1, "default")),
        (2, {"OMP_NUM_THREADS": "3"}, (2, "recipe")),
    ],
)
def test_thread_precedence(recipe, env, expected):
    choice = resolve_threads(recipe, env)
    assert (choice.count, choice.source) == expected


def test_recipe_threads_are_used_during_fit_and_restored(tmp_path, make_trainer, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the recipe wins over it
    torch.set_num_threads(1)
    seen = _SeesThreads()
    tr = make_trainer(tmp_path, run={"threads": 2})
    assert torch.get_num_threads() == 1  # building the run leaves the caller's count in place
    tr.add_callback(seen)
    summary = tr.fit()
    assert seen.counts == [2, 2]
    assert torch.get_num_threads() == 1
    assert summary["threads"] == 2
    assert json.loads((tr.run_dir / "summary.json").read_text())["threads"] == 2


def test_recipe_threads_must_be_positive(make_recipe, tmp_path):
    from mutualkd.errors import UserError

    with pytest.raises((UserError, ValueError), match="threads"):
        make_recipe(tmp_path, run={"threads": 0})


def test_environment_sets_threads_and_start_line_says_so(tmp_path, run_cli, subprocess_env, quickstart_recipe,
                                                         tiny_overrides, set_options):
    # Output to a pipe: no terminal, so plain progress lines in place of the bar, one per step here.
    overrides = [o for o in tiny_overrides if not o.startswith("run.progress")]
    args = ["run", str(quickstart_recipe), *set_options(*overrides, f"run.out_dir={tmp_path}", "run.name=env",
                                                        "run.progress_every_s=0")]
    proc = run_cli(args, env=subprocess_env(OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr
    assert "; 2 CPU threads per process (from OMP_NUM_THREADS)" in proc.stdout
    assert json.loads((tmp_path / "env" / "summary.json").read_text())["threads"] == 2
    lines = [line for line in proc.stdout.splitlines() if re.search(r"step \d+/\d+", line)]
    assert len(lines) == 2, proc.stdout  # max_steps=2, a line after each
    pattern = (r"^progress: train epoch 1/1  step 1/\d+  [\d.]+ images/s  epoch \d+:\d\d, ETA \d+:\d\d"
               r"  run \d+:\d\d, ETA \d+:\d\d$")
    assert re.match(pattern, lines[0]), lines[0]
    assert lines[-1].rstrip().endswith("ETA 0:00")  # the last step: nothing left of the run


def test_progress_lines_follow_the_interval(tmp_path, make_trainer, caplog):
    caplog.set_level("INFO", logger="mutualkd")
    make_trainer(tmp_path, name="often", max_steps=3, run={"progress": True, "progress_every_s": 0}).fit()
    often = [r.getMessage() for r in caplog.records if " images/s " in r.getMessage()]
    assert len(often) == 3 and all("ETA" in m for m in often)
    caplog.clear()
    make_trainer(tmp_path, name="rare", max_steps=3, run={"progress": True, "progress_every_s": 3600}).fit()
    assert not [r for r in caplog.records if " images/s " in r.getMessage()]
    caplog.clear()
    make_trainer(tmp_path, name="off", max_steps=3, run={"progress": False, "progress_every_s": 0}).fit()
    assert not [r for r in caplog.records if " images/s " in r.getMessage()]
