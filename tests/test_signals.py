"""SIGINT and SIGTERM: the run finishes the step in progress, writes a checkpoint, says how to
resume, and exits 130 / 143; resuming finishes the run as if it had never stopped.

One run is stopped twice: Ctrl-C (SIGINT to its process group) during the first epoch,
then, once resumed, SIGTERM (what a scheduler or ``docker stop`` sends) a few checkpoints
later; a second resume finishes it, and the result is compared with the uninterrupted
reference run of the ``launch_kit`` fixture (tests/fixtures/launch.py), as in test_resume.
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
import signal
import time
from typing import Any

import pytest

from mutualkd.checkpoint import MARKER, latest_checkpoint, load_checkpoint
from mutualkd.errors import CheckpointError

#: The launch_kit fixture (tests/fixtures/launch.py): starts, kills and compares runs.
Kit = Any


@dataclass
class Stop:
    """What a signal left: the process's result and the run folder's state right after."""

    done: Any  # launch_kit.Done
    steps: list[int]  # complete step checkpoints
    logged: list[int]  # global steps of the step records in metrics.jsonl
    summary: bool  # summary.json exists
    loaded: int | str  # global step of the newest checkpoint as loaded (hash checked), or the error


@dataclass
class Signalled:
    run_dir: Path
    sigint: Stop
    sigterm: Stop
    finish: Any  # launch_kit.Done


def _stop(kit: Kit, launch: Any, sig: signal.Signals, run_dir: Path) -> Stop:
    os.killpg(launch.proc.pid, sig)  # as a terminal or a process manager does: the whole group
    done = launch.wait(180)
    logged = [r["global_step"] for r in kit.comparable_metrics(run_dir) if r["kind"] == "step"]
    latest = latest_checkpoint(run_dir / "checkpoints")
    try:
        loaded: int | str = load_checkpoint(latest)["position"]["global_step"] if latest else "no checkpoint"
    except CheckpointError as e:
        loaded = str(e)
    return Stop(done, kit.checkpoint_steps(run_dir), logged, (run_dir / "summary.json").exists(), loaded)


def _wait_for_checkpoint_after(kit: Kit, run_dir: Path, step: int, launch: Any, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(s > step for s in kit.checkpoint_steps(run_dir)):
        if launch.proc.poll() is not None:
            out, err = launch.output()
            pytest.fail(f"the resumed run ended (exit code {launch.proc.returncode}) early\n{out[-2000:]}\n{err[-2000:]}")
        assert time.monotonic() < deadline, f"no checkpoint after step {step} within {timeout:.0f} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory, launch_kit: Kit) -> Signalled:
    kit = launch_kit
    kit.start_reference("kl_dml")  # side by side with the runs below
    folder = tmp_path_factory.mktemp("signals")
    recipe = kit.write_recipe(folder)
    run_dir = folder / "runs" / kit.RUN_NAME

    first = kit.start(["run", str(recipe)], folder / "sigint")
    kit.wait_for(kit.step_folder(run_dir, 3) / MARKER, first)
    sigint = _stop(kit, first, signal.SIGINT, run_dir)

    second = kit.start(["run", "--resume", str(run_dir)], folder / "sigterm")
    _wait_for_checkpoint_after(kit, run_dir, max(sigint.steps, default=0), second)
    sigterm = _stop(kit, second, signal.SIGTERM, run_dir)

    finish = kit.run_mutualkd(["run", "--resume", str(run_dir)], folder / "finish")
    return Signalled(run_dir, sigint, sigterm, finish)


def _check_stop(stop: Stop, code: int, run_dir: Path, after: int, total_steps: int) -> None:
    done = stop.done
    assert done.rc == code, done.explain()
    assert "Traceback" not in done.err, done.explain()
    assert "mutualkd run --resume" in done.err and str(run_dir) in done.err, done.explain()
    assert not stop.summary, "an interrupted run must not write summary.json"
    # The step in progress was finished and checkpointed: the newest checkpoint is the
    # last step logged (log_every = 1), and nothing was logged after it.
    assert stop.steps and stop.logged, (stop.steps, stop.logged)
    assert stop.steps[-1] == stop.logged[-1], (stop.steps, stop.logged)
    assert after <= stop.steps[-1] < total_steps, stop.steps
    # ... and it is complete: it loads, its hash checked, at that step.
    assert stop.loaded == stop.steps[-1], stop.loaded


def test_sigint_finishes_the_step_writes_a_checkpoint_and_exits_130(signalled: Signalled, launch_kit: Kit) -> None:
    _check_stop(signalled.sigint, 130, signalled.run_dir, after=3, total_steps=launch_kit.TOTAL_STEPS)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(signalled: Signalled, launch_kit: Kit) -> None:
    _check_stop(signalled.sigterm, 143, signalled.run_dir, after=signalled.sigint.steps[-1] + 1,
                total_steps=launch_kit.TOTAL_STEPS)


def test_resuming_after_the_signals_finishes_the_run_exactly(signalled: Signalled, launch_kit: Kit) -> None:
    done = signalled.finish
    assert done.rc == 0, done.explain()
    assert (signalled.run_dir / "summary.json").exists()
    launch_kit.assert_same_run(signalled.run_dir, launch_kit.reference_run("kl_dml"))
