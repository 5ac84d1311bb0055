"""SIGINT and SIGTERM: the run finishes the step in progress, writes a checkpoint, says how to
resume, and exits 130 / 143; resuming finishes the run as if it had never stopped.

One run is stopped twice: Ctrl-C (SIGINT to its process group) during the first epoch,
then, once resumed, SIGTERM (what a scheduler or ``docker stop`` sends) a few checkpoints
later; a second resume finishes it, and the result is compared with the uninterrupted
reference run of test_resume.
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
import signal
import time

import pytest

from mutualkd.checkpoint import MARKER, latest_checkpoint, load_checkpoint
from mutualkd.errors import CheckpointError
from test_resume import (
    RUN_NAME,
    TOTAL_STEPS,
    Done,
    Launch,
    assert_same_run,
    checkpoint_steps,
    comparable_metrics,
    reference_run,
    run_mutualkd,
    start,
    start_reference,
    step_folder,
    wait_for,
    write_recipe,
)


@dataclass
class Stop:
    """What a signal left: the process's result and the run folder's state right after."""

    done: Done
    steps: list[int]  # complete step checkpoints
    logged: list[int]  # global steps of the step records in metrics.jsonl
    summary: bool  # summary.json exists
    loaded: int | str  # global step of the newest checkpoint as loaded (hash checked), or the error


@dataclass
class Signalled:
    run_dir: Path
    sigint: Stop
    sigterm: Stop
    finish: Done


def _stop(launch: Launch, sig: signal.Signals, run_dir: Path) -> Stop:
    os.killpg(launch.proc.pid, sig)  # as a terminal or a process manager does: the whole group
    done = launch.wait(180)
    logged = [r["global_step"] for r in comparable_metrics(run_dir) if r["kind"] == "step"]
    latest = latest_checkpoint(run_dir / "checkpoints")
    try:
        loaded: int | str = load_checkpoint(latest)["position"]["global_step"] if latest else "no checkpoint"
    except CheckpointError as e:
        loaded = str(e)
    return Stop(done, checkpoint_steps(run_dir), logged, (run_dir / "summary.json").exists(), loaded)


def _wait_for_checkpoint_after(run_dir: Path, step: int, launch: Launch, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(s > step for s in checkpoint_steps(run_dir)):
        if launch.proc.poll() is not None:
            out, err = launch.output()
            pytest.fail(f"the resumed run ended (exit code {launch.proc.returncode}) early\n{out[-2000:]}\n{err[-2000:]}")
        assert time.monotonic() < deadline, f"no checkpoint after step {step} within {timeout:.0f} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory) -> Signalled:
    start_reference(tmp_path_factory, "kl_dml")  # side by side with the runs below
    folder = tmp_path_factory.mktemp("signals")
    recipe = write_recipe(folder)
    run_dir = folder / "runs" / RUN_NAME

    first = start(["run", str(recipe)], folder / "sigint")
    wait_for(step_folder(run_dir, 3) / MARKER, first)
    sigint = _stop(first, signal.SIGINT, run_dir)

    second = start(["run", "--resume", str(run_dir)], folder / "sigterm")
    _wait_for_checkpoint_after(run_dir, max(sigint.steps, default=0), second)
    sigterm = _stop(second, signal.SIGTERM, run_dir)

    finish = run_mutualkd(["run", "--resume", str(run_dir)], folder / "finish")
    return Signalled(run_dir, sigint, sigterm, finish)


def _check_stop(stop: Stop, code: int, run_dir: Path, after: int) -> None:
    done = stop.done
    assert done.rc == code, done.explain()
    assert "Traceback" not in done.err, done.explain()
    assert "mutualkd run --resume" in done.err and str(run_dir) in done.err, done.explain()
    assert not stop.summary, "an interrupted run must not write summary.json"
    # The step in progress was finished and checkpointed: the newest checkpoint is the
    # last step logged (log_every = 1), and nothing was logged after it.
    assert stop.steps and stop.logged, (stop.steps, stop.logged)
    assert stop.steps[-1] == stop.logged[-1], (stop.steps, stop.logged)
    assert after <= stop.steps[-1] < TOTAL_STEPS, stop.steps
    # ... and it is complete: it loads, its hash checked, at that step.
    assert stop.loaded == stop.steps[-1], stop.loaded


def test_sigint_finishes_the_step_writes_a_checkpoint_and_exits_130(signalled: Signalled) -> None:
    _check_stop(signalled.sigint, 130, signalled.run_dir, after=3)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(signalled: Signalled) -> None:
    _check_stop(signalled.sigterm, 143, signalled.run_dir, after=signalled.sigint.steps[-1] + 1)


def test_resuming_after_the_signals_finishes_the_run_exactly(
    signalled: Signalled, tmp_path_factory: pytest.TempPathFactory
) -> None:
    done = signalled.finish
    assert done.rc == 0, done.explain()
    assert (signalled.run_dir / "summary.json").exists()
    assert_same_run(signalled.run_dir, reference_run(tmp_path_factory, "kl_dml"))
