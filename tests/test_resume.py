"""Kill and resume: a run killed with SIGKILL mid-epoch and resumed ends exactly where an
uninterrupted run of the same recipe ends (CPU, ``run.deterministic = true``).

Every run here is a real ``mutualkd run`` process: ``python -m mutualkd`` for one process,
``torchrun --standalone --nproc_per_node 2`` (gloo on CPU) for two. A run is killed the way
a crash, the OOM killer or a pre-empted node kills it: SIGKILL to its process group and to
every process below it (torchrun puts each worker in a session of its own), right after
the COMPLETE marker of a chosen mid-epoch checkpoint appeared.

Runs are tiny: digits, 320 training images per process in batches of 32, so 10 steps per
epoch and 20 in all. The launch / kill / compare kit is the ``launch_kit`` fixture
(tests/fixtures/launch.py), shared with test_determinism, test_faults, test_signals and
test_nonfinite; an uninterrupted reference run of each (strategy, processes) pair is made
once per test session.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import shutil
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mutualkd.checkpoint import MARKER, latest_checkpoint, list_checkpoints, load_checkpoint, read_meta
from mutualkd.cli import app

#: The launch_kit fixture (tests/fixtures/launch.py): starts, kills and compares runs.
Kit = Any
#: The set_options fixture: set_options("key=value", ...) -> ["--set", "key=value", ...].
Sets = Callable[..., list[str]]

# =========================================================================== tests

RESUME_CASES = [
    pytest.param("kl_dml", 1, "dir", id="kl_dml-1proc"),
    pytest.param("ie_dml", 1, "recipe", id="ie_dml-1proc"),
    pytest.param("kl_dml", 2, "recipe", id="kl_dml-2proc"),
    pytest.param("ie_dml", 2, "auto", id="ie_dml-2proc"),
    pytest.param("pcl", 1, "dir", id="pcl-1proc"),
    pytest.param("pcl", 2, "dir", id="pcl-2proc"),
]


@pytest.mark.parametrize("strategy, nproc, how", RESUME_CASES)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(
    tmp_path: Path, launch_kit: Kit, set_options: Sets, strategy: str, nproc: int, how: str
) -> None:
    """SIGKILL after a mid-epoch checkpoint, resume: metrics, weights, optimizer state and
    summary equal those of an uninterrupted run.

    The killed run is also left with what a kill during a checkpoint write leaves (a
    ``.tmp-`` folder) and a newer checkpoint folder without its COMPLETE marker: resume must
    ignore both and start from the newest complete checkpoint. ``how`` is the way the run
    is resumed: ``dir`` (``mutualkd run --resume RUN_DIR``), ``recipe`` (``mutualkd run
    RECIPE --resume RUN_DIR``) or ``auto`` (``run.resume = "auto"``, no --resume).
    """
    kit = launch_kit
    kit.start_reference(strategy, nproc)  # runs while this test kills its own run
    run_dir = kit.copy_run(kit.killed_run(strategy, nproc), tmp_path)
    complete = kit.checkpoint_steps(run_dir)
    assert complete and kit.KILL_AFTER <= complete[-1] < kit.TOTAL_STEPS, complete
    resume_step = complete[-1]
    offset = load_checkpoint(kit.step_folder(run_dir, resume_step))["metrics_offset"]
    killed_log = (run_dir / "metrics.jsonl").read_bytes()

    # What a kill in the middle of a checkpoint write leaves, and a newer step folder
    # that lost its marker: neither may be resumed from.
    newest = kit.step_folder(run_dir, resume_step)
    shutil.copytree(newest, run_dir / "checkpoints" / f".tmp-step-{resume_step + 1:08d}-x")
    incomplete = kit.step_folder(run_dir, resume_step + 1)
    shutil.copytree(newest, incomplete)
    (incomplete / MARKER).unlink()
    meta = json.loads((incomplete / "meta.json").read_text())
    meta["global_step"] = resume_step + 1
    (incomplete / "meta.json").write_text(json.dumps(meta))

    extra = set_options(*kit.STRATEGY_SETS[strategy])
    if how == "dir":
        args = ["run", "--resume", str(run_dir)]
    elif how == "recipe":
        args = ["run", str(kit.write_recipe(tmp_path, nproc=nproc)), *extra, "--resume", str(run_dir)]
    else:
        args = ["run", str(kit.write_recipe(tmp_path, nproc=nproc)), *extra, *set_options('run.resume="auto"')]
    done = kit.run_mutualkd(args, tmp_path / "resume", nproc=nproc)
    assert done.rc == 0, done.explain()
    # It went on from the newest complete checkpoint: what was logged up to it is kept byte
    # for byte (wall-clock fields included), what the killed run logged after it is not.
    resumed_log = (run_dir / "metrics.jsonl").read_bytes()
    assert resumed_log[:offset] == killed_log[:offset]
    assert json.loads(killed_log[:offset].splitlines()[-1])["global_step"] == resume_step

    reference = kit.reference_run(strategy, nproc)
    assert sum(r["kind"] == "step" for r in kit.comparable_metrics(reference)) == kit.TOTAL_STEPS
    kit.assert_same_run(run_dir, reference)


def test_pruning_keeps_the_newest_k_complete_checkpoints(launch_kit: Kit) -> None:
    """keep_checkpoints = 3: the three newest step checkpoints (by meta.json step) and best/ stay."""
    reference = launch_kit.reference_run("kl_dml")
    # Checkpoints every 3 steps and at each epoch end (10, 20): 3 6 9 10 12 15 18 20.
    assert launch_kit.checkpoint_steps(reference) == [15, 18, 20]
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["best", "step-00000015", "step-00000018", "step-00000020"], names


def test_corrupted_state_is_refused_with_exit_code_2(tmp_path: Path, launch_kit: Kit,
                                                     folder_snapshot: Callable[[Path], dict[str, Any]]) -> None:
    """State.pt files whose bytes changed after they were written: resume stops with a message
    naming the checkpoint, not a traceback, and leaves the run folder as it was. (The CLI runs
    in this process; test_bad_input checks the same contract through a real process.) Every
    step checkpoint is corrupted: with one intact, resume falls back to it
    (test_faults.py::test_corrupt_newest_checkpoint_falls_back_to_an_older_one)."""
    run_dir = launch_kit.copy_run(launch_kit.killed_run("kl_dml"), tmp_path)
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None
    for _, folder in list_checkpoints(run_dir / "checkpoints"):
        state = folder / "state.pt"
        data = bytearray(state.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        state.write_bytes(bytes(data))
    before = folder_snapshot(run_dir)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)], env={"COLUMNS": "200"})
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    err = result.stderr
    assert "Traceback" not in err and str(latest) in err and "corrupted" in err and "fix:" in err, err
    assert folder_snapshot(run_dir) == before, "a refused resume must not touch the run folder"


# --------------------------------------------------------------------------- multi-process edge cases


def test_fresh_two_process_run_survives_rank0_creating_the_folder_first(tmp_path: Path, launch_kit: Kit,
                                                                        set_options: Sets) -> None:
    """Rank 1 looks at the run folder 3 s after rank 0 (the order happens by chance in about
    one fresh torchrun launch in four on 2 CPU cores); the run must still start."""
    recipe = launch_kit.write_recipe(tmp_path, nproc=2, epochs=1)
    done = launch_kit.run_mutualkd(["run", str(recipe), *set_options("run.max_steps=1")], tmp_path / "log", nproc=2,
                                   late_rank=1, timeout=180)
    assert done.rc == 0, done.explain()


def test_resume_with_another_process_count_is_refused_cleanly(tmp_path: Path, launch_kit: Kit) -> None:
    kit = launch_kit
    run_dir = kit.copy_run(kit.killed_run("kl_dml", 1), tmp_path)
    for step, folder in list_checkpoints(run_dir / "checkpoints"):
        if step != kit.KILL_AFTER:
            shutil.rmtree(folder)  # resume from batch 6 of epoch 1; with 2 processes an epoch has 5 batches
    assert read_meta(kit.step_folder(run_dir, kit.KILL_AFTER))["global_step"] == kit.KILL_AFTER
    done = kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume", nproc=2, timeout=180)
    assert done.rc != 0, "a 1-process checkpoint was resumed by 2 processes without complaint"
    # torchrun prints its own traceback when a worker fails; a worker's has a [rankN]: prefix.
    assert "]: Traceback" not in done.err and "fix:" in done.err, done.explain()
