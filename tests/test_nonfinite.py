"""The non-finite guard: a loss term that becomes NaN or Inf stops training with exit code 3
(not 2: the input was valid, training diverged), a message naming the peer, the loss term,
the schedule step, the epoch and the global step, and the last complete checkpoint intact.
With two processes both stop at the same step, neither waits for the other forever.

Divergence is forced with a learning rate of 1e12 (one SGD step sends the weights past
float32 range) and a checkpoint after every step. Runs are started by the ``launch_kit``
fixture (tests/fixtures/launch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import re
from typing import Any

import pytest

from mutualkd.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from mutualkd.errors import EXIT_BAD_INPUT, EXIT_NON_FINITE

DIVERGE = ["--set", "optimizer.lr=1e12"]
MESSAGE = re.compile(
    r"loss term (?P<peer>peer\d)/(?P<term>\w+) became non-finite in step '(?P<step>[^']+)' of stage"
    r" '(?P<stage>\w+)', epoch (?P<epoch>\d+), global step (?P<global_step>\d+)"
)


@dataclass
class Diverged:
    run_dir: Path
    done: Any  # launch_kit.Done


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory, launch_kit: Any) -> Diverged:
    folder = tmp_path_factory.mktemp("nonfinite")
    recipe = launch_kit.write_recipe(folder, checkpoint_every=1)
    done = launch_kit.run_mutualkd(["run", str(recipe), *DIVERGE], folder / "log", timeout=120)
    return Diverged(folder / "runs" / launch_kit.RUN_NAME, done)


def test_divergence_exits_3_naming_peer_term_epoch_and_step(diverged: Diverged, launch_kit: Any) -> None:
    done = diverged.done
    assert done.rc == EXIT_NON_FINITE == 3 and EXIT_NON_FINITE != EXIT_BAD_INPUT, done.explain()
    assert "Traceback" not in done.err, done.explain()
    m = MESSAGE.search(done.err)
    assert m, f"no 'loss term <peer>/<term> became non-finite ...' message:\n{done.err}"
    # kl_dml alternating: the step that updates a peer is named after it and reports its terms.
    assert m["term"] in ("ce", "kl") and m["step"] == m["peer"] and m["stage"] == "train"
    assert m["epoch"] == "1"
    # The step named is the one after the last step logged (log_every = 1): nothing of it was written.
    logged = [r["global_step"] for r in launch_kit.comparable_metrics(diverged.run_dir) if r["kind"] == "step"]
    assert logged and int(m["global_step"]) == logged[-1] + 1, (m["global_step"], logged)
    assert "Lower the learning rate" in done.err
    assert not (diverged.run_dir / "summary.json").exists()


def test_last_complete_checkpoint_before_divergence_is_intact(diverged: Diverged, launch_kit: Any) -> None:
    m = MESSAGE.search(diverged.done.err)
    assert m, diverged.done.explain()
    bad = int(m["global_step"])
    ckpts = diverged.run_dir / "checkpoints"
    assert not launch_kit.step_folder(diverged.run_dir, bad).exists(), "a checkpoint of the diverged step was written"
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")], "a checkpoint write was left half done"
    latest = latest_checkpoint(ckpts)
    assert latest is not None and launch_kit.checkpoint_steps(diverged.run_dir)[-1] == bad - 1
    state = load_checkpoint(latest)  # verifies state.pt against the hash in COMPLETE
    assert state["position"]["global_step"] == read_meta(latest)["global_step"] == bad - 1
    assert set(state["modules"]) == {"peer0", "peer1"}


def test_two_processes_both_stop_at_the_same_step_without_hanging(tmp_path: Path, launch_kit: Any) -> None:
    recipe = launch_kit.write_recipe(tmp_path, nproc=2, checkpoint_every=1)
    done = launch_kit.run_mutualkd(["run", str(recipe), *DIVERGE], tmp_path / "log", nproc=2, late_rank=0, timeout=120)
    assert done.rc != 0, done.explain()
    # Both workers stopped through the guard, at the same step, and said so (their two
    # messages share one stderr and may interleave).
    assert done.err.count("training stopped:") == 2, done.explain()
    steps = re.findall(r"non-finite[^\n]*? global step (\d+)", done.err)
    assert len(steps) == 2 and steps[0] == steps[1], done.explain()
    # torchrun reports each worker's exit code: 3, or SIGTERM (-15) for a worker that was
    # still shutting down after its message when torchrun saw the first one exit.
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", done.err, flags=re.M)
    assert len(codes) == 2 and "3" in codes and set(codes) <= {"3", "-15"}, done.explain()
    assert "]: Traceback" not in done.err, done.explain()
