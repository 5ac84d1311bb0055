"""Kill and resume: a run killed with SIGKILL mid-epoch and resumed ends exactly where an
uninterrupted run of the same recipe ends (CPU, ``run.deterministic = true``).

Every run here is a real ``mutualkd run`` process: ``python -m mutualkd`` for one process,
``torchrun --standalone --nproc_per_node 2`` (gloo on CPU) for two. A run is killed the way
a crash, the OOM killer or a pre-empted node kills it: SIGKILL to its process group and to
every process below it (torchrun puts each worker in a session of its own), right after
the COMPLETE marker of a chosen mid-epoch checkpoint appeared.

Runs are tiny: digits, 320 training images per process in batches of 32, so 10 steps per
epoch and 20 in all. The helpers in the first half are shared with test_determinism,
test_signals and test_nonfinite; an uninterrupted reference run of each (strategy,
processes) pair is made once per test session.
"""

from __future__ import annotations

import atexit
from collections.abc import Mapping, Sequence
import contextlib
from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mutualkd.checkpoint import MARKER, latest_checkpoint, list_checkpoints, load_checkpoint, read_meta
from mutualkd.cli import app
from _helpers import REPO, sets, subprocess_env

STEPS_PER_EPOCH = 10
EPOCHS = 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
CHECKPOINT_EVERY = 3
KEEP = 3
#: The checkpoint whose COMPLETE marker triggers the kill: step 6 of the 10 of epoch 1.
KILL_AFTER = 6
#: Fields of metrics.jsonl that measure time, not training; they differ between any two runs.
TIMING_FIELDS = frozenset({"images_per_s", "train_seconds", "data_wait_share"})
#: ``--set`` options that pick the strategy; ie_dml replaces the whole [strategy] table.
STRATEGY_SETS: dict[str, tuple[str, ...]] = {"kl_dml": (), "ie_dml": ('strategy={name="ie_dml"}',)}
RUN_NAME = "dml"
LAUNCH_TIMEOUT = 300.0

RECIPE = """\
# A tiny two-peer run of the reliability tests (tests/test_resume.py).
[run]
name = "{name}"
seed = 0
epochs = {epochs}
out_dir = {out_dir}
deterministic = true
device = "cpu"
progress = false
log_every = 1
checkpoint_every = {checkpoint_every}
keep_checkpoints = {keep}

[data]
dataset = "digits"
batch_size = 32
eval_batch_size = 128
train_subset = {train_subset}
test_subset = 100

[[peers]]
model = "cifar_resnet20"

[[peers]]
model = "cifar_wrn_16_1"

[optimizer]
name = "sgd"
lr = 0.05
momentum = 0.9
nesterov = true
weight_decay = 5e-4

[scheduler]
name = "cosine"
warmup_epochs = 1

[strategy]
name = "kl_dml"
temperature = 2.0
weight = 1.0
"""

# Until the run-folder race of fresh multi-process runs is fixed (see
# test_fresh_two_process_run_survives_rank0_creating_the_folder_first), fresh torchrun
# launches go through this shim: the rank named LATE_RANK looks at the run folder 3 s
# after the others, so with LATE_RANK = 0 no other rank can find the folder rank 0 is
# creating; with LATE_RANK = 1 the race is reproduced every time.
LAUNCH_SHIM = """\
import sys
import time

from mutualkd.engine.state import RunFolder

LATE_RANK = {late_rank}
_init = RunFolder.__init__


def _init_late(self, recipe, accelerator, resume=None):
    if resume is None and accelerator.process_index == LATE_RANK:
        time.sleep(3.0)
    _init(self, recipe, accelerator, resume)


RunFolder.__init__ = _init_late
from mutualkd.cli import main

sys.argv[0] = "mutualkd"
main()
"""


# =========================================================================== helpers


def write_recipe(folder: Path, *, nproc: int = 1, name: str = RUN_NAME, **fields: Any) -> Path:
    """The test recipe in ``folder/recipe.toml``, writing its run to ``folder/runs/<name>``.

    Each process sees 320 training images, so every process count has 10 steps per epoch.
    """
    values: dict[str, Any] = dict(
        name=name, epochs=EPOCHS, checkpoint_every=CHECKPOINT_EVERY, keep=KEEP, train_subset=320 * nproc
    )
    values.update(fields)
    values["out_dir"] = json.dumps((folder / "runs").as_posix())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.toml"
    path.write_text(RECIPE.format(**values), encoding="utf-8")
    return path


def command(args: Sequence[str], *, nproc: int = 1, folder: Path | None = None, late_rank: int | None = None) -> list[str]:
    """``python -m mutualkd ARGS``, or its torchrun form for ``nproc`` > 1 processes.

    ``late_rank`` (multi-process only) runs through :data:`LAUNCH_SHIM` written to ``folder``.
    """
    if nproc == 1:
        return [sys.executable, "-m", "mutualkd", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if late_rank is None:
        return [*launcher, "-m", "mutualkd", *args]
    assert folder is not None
    shim = folder / f"launch_late_rank{late_rank}.py"
    shim.write_text(LAUNCH_SHIM.format(late_rank=late_rank), encoding="utf-8")
    return [*launcher, str(shim), *args]


@dataclass
class Launch:
    """A running ``mutualkd`` process (group), its output going to ``<log>.out``/``<log>.err``."""

    proc: subprocess.Popen[bytes]
    log: Path
    cmd: list[str]

    def output(self) -> tuple[str, str]:
        read = lambda suffix: self.log.with_suffix(suffix).read_text(encoding="utf-8", errors="replace")  # noqa: E731
        return read(".out"), read(".err")

    def kill(self) -> None:
        """SIGKILL the process group and every process below it, at once.

        torchrun starts each worker in a session of its own, so killing torchrun's group
        alone would leave the workers training; like a node that dies, all of them go.
        """
        tree = descendants(self.proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group not in (os.getpgrp(), 0, 1):  # never this test session's own group
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(60)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> Done:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.output()
            pytest.fail(f"{' '.join(self.cmd)} did not end within {timeout:.0f} s (hang?)\n{_tail(out, err)}")
        out, err = self.output()
        return Done(self.proc.returncode, out, err, self.cmd)


@dataclass
class Done:
    rc: int
    out: str
    err: str
    cmd: list[str]

    def explain(self) -> str:
        return f"{' '.join(self.cmd)}\nexit code {self.rc}\n{_tail(self.out, self.err)}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(out: str, err: str, n: int = 4000) -> str:
    return f"--- stdout (tail)\n{out[-n:]}\n--- stderr (tail)\n{err[-n:]}"


def start(args: Sequence[str], log: Path, *, nproc: int = 1, late_rank: int | None = None, **env: str) -> Launch:
    """Start ``mutualkd ARGS`` in its own session (so its whole group can be killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(args, nproc=nproc, folder=log.parent, late_rank=late_rank)
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=subprocess_env(**env), start_new_session=True)
    launch = Launch(proc, log, cmd)
    _launched.append(launch)
    return launch


_launched: list[Launch] = []


@atexit.register
def _kill_leftovers() -> None:
    """No run started here outlives the test session (e.g. a reference nobody waited for)."""
    for launch in _launched:
        if launch.proc.poll() is None:
            launch.kill()


def run_mutualkd(args: Sequence[str], log: Path, *, nproc: int = 1, late_rank: int | None = None,
                 timeout: float = LAUNCH_TIMEOUT, **env: str) -> Done:
    return start(args, log, nproc=nproc, late_rank=late_rank, **env).wait(timeout)


def fresh_late_rank(nproc: int) -> int | None:
    """The shim setting for a fresh (not resumed) launch: rank 0 creates the run folder last."""
    return 0 if nproc > 1 else None


def wait_for(path: Path, launch: Launch, timeout: float = 180.0) -> None:
    """Poll (every 10 ms) until ``path`` exists; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if launch.proc.poll() is not None:
            out, err = launch.output()
            pytest.fail(f"the run ended (exit code {launch.proc.returncode}) before {path} appeared\n{_tail(out, err)}")
        if time.monotonic() > deadline:
            launch.kill()
            pytest.fail(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.01)


def step_folder(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def comparable_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records, without the timing fields."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines if line.strip()]


def assert_same_metrics(got: Path, want: Path) -> None:
    a, b = comparable_metrics(got), comparable_metrics(want)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"metrics.jsonl line {i + 1} differs:\n  {got}: {x}\n  {want}: {y}"
    assert len(a) == len(b), f"{got} has {len(a)} metrics lines, {want} has {len(b)}"


def final_state(run_dir: Path) -> dict[str, Any]:
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None, f"{run_dir} has no complete checkpoint"
    return load_checkpoint(latest)


def assert_equal_tree(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: keys differ: {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(got: Path, want: Path) -> None:
    """Same metrics (timings aside), same final weights and optimizer state, same summary."""
    assert_same_metrics(got, want)
    a, b = final_state(got), final_state(want)
    assert a["position"] == b["position"]
    assert_equal_tree(a["modules"], b["modules"], "modules")
    assert_equal_tree(a["optimizers"], b["optimizers"], "optimizers")
    summary = lambda d: json.loads((d / "summary.json").read_text())  # noqa: E731
    assert summary(got) == summary(want)


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: (size, mtime in ns, contents)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


# --------------------------------------------------------------------------- shared runs

_references: dict[tuple[str, int], Path | Launch] = {}
_killed: dict[tuple[str, int], Path] = {}


def start_reference(factory: pytest.TempPathFactory, strategy: str, nproc: int = 1) -> None:
    """Start the uninterrupted reference run of (strategy, nproc) unless it exists or runs."""
    key = (strategy, nproc)
    if key not in _references:
        folder = factory.mktemp(f"reference-{strategy}-{nproc}p")
        recipe = write_recipe(folder, nproc=nproc)
        _references[key] = start(["run", str(recipe), *sets(*STRATEGY_SETS[strategy])], folder / "log",
                                 nproc=nproc, late_rank=fresh_late_rank(nproc))


def reference_run(factory: pytest.TempPathFactory, strategy: str, nproc: int = 1) -> Path:
    """The run folder of the uninterrupted reference run of (strategy, nproc)."""
    start_reference(factory, strategy, nproc)
    key = (strategy, nproc)
    ref = _references[key]
    if isinstance(ref, Launch):
        done = ref.wait()
        if done.rc != 0:
            del _references[key]
            pytest.fail(f"the reference run failed\n{done.explain()}")
        _references[key] = ref.log.parent / "runs" / RUN_NAME
    result = _references[key]
    assert isinstance(result, Path)
    return result


def kill_mid_epoch(folder: Path, strategy: str, nproc: int = 1) -> Path:
    """Start the test recipe in ``folder``, SIGKILL it after checkpoint KILL_AFTER; its run folder."""
    recipe = write_recipe(folder, nproc=nproc)
    run_dir = folder / "runs" / RUN_NAME
    launch = start(["run", str(recipe), *sets(*STRATEGY_SETS[strategy])], folder / "killed",
                   nproc=nproc, late_rank=fresh_late_rank(nproc))
    try:
        wait_for(step_folder(run_dir, KILL_AFTER) / MARKER, launch)
    finally:
        launch.kill()
    assert not (run_dir / "summary.json").exists(), "the run ended before it was killed; the test cannot check resume"
    return run_dir


def killed_run(factory: pytest.TempPathFactory, strategy: str, nproc: int = 1) -> Path:
    """A pristine run killed mid-epoch (made once per session; copy it before touching it)."""
    key = (strategy, nproc)
    if key not in _killed:
        _killed[key] = kill_mid_epoch(factory.mktemp(f"killed-{strategy}-{nproc}p"), strategy, nproc)
    return _killed[key]


def copy_run(run_dir: Path, dest_parent: Path) -> Path:
    dest = dest_parent / "runs" / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir / "checkpoints")]


# =========================================================================== tests

RESUME_CASES = [
    pytest.param("kl_dml", 1, "dir", id="kl_dml-1proc"),
    pytest.param("ie_dml", 1, "recipe", id="ie_dml-1proc"),
    pytest.param("kl_dml", 2, "recipe", id="kl_dml-2proc"),
    pytest.param("ie_dml", 2, "auto", id="ie_dml-2proc"),
]


@pytest.mark.parametrize("strategy, nproc, how", RESUME_CASES)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, strategy: str, nproc: int, how: str
) -> None:
    """SIGKILL after a mid-epoch checkpoint, resume: metrics, weights, optimizer state and
    summary equal those of an uninterrupted run.

    The killed run is also left with what a kill during a checkpoint write leaves (a
    ``.tmp-`` folder) and a newer checkpoint folder without its COMPLETE marker: resume must
    ignore both and start from the newest complete checkpoint. ``how`` is the way the run
    is resumed: ``dir`` (``mutualkd run --resume RUN_DIR``), ``recipe`` (``mutualkd run
    RECIPE --resume RUN_DIR``) or ``auto`` (``run.resume = "auto"``, no --resume).
    """
    start_reference(tmp_path_factory, strategy, nproc)  # runs while this test kills its own run
    run_dir = copy_run(killed_run(tmp_path_factory, strategy, nproc), tmp_path)
    complete = checkpoint_steps(run_dir)
    assert complete and KILL_AFTER <= complete[-1] < TOTAL_STEPS, complete
    resume_step = complete[-1]
    offset = load_checkpoint(step_folder(run_dir, resume_step))["metrics_offset"]
    killed_log = (run_dir / "metrics.jsonl").read_bytes()

    # What a kill in the middle of a checkpoint write leaves, and a newer step folder
    # that lost its marker: neither may be resumed from.
    newest = step_folder(run_dir, resume_step)
    shutil.copytree(newest, run_dir / "checkpoints" / f".tmp-step-{resume_step + 1:08d}-x")
    incomplete = step_folder(run_dir, resume_step + 1)
    shutil.copytree(newest, incomplete)
    (incomplete / MARKER).unlink()
    meta = json.loads((incomplete / "meta.json").read_text())
    meta["global_step"] = resume_step + 1
    (incomplete / "meta.json").write_text(json.dumps(meta))

    extra = sets(*STRATEGY_SETS[strategy])
    if how == "dir":
        args = ["run", "--resume", str(run_dir)]
    elif how == "recipe":
        args = ["run", str(write_recipe(tmp_path, nproc=nproc)), *extra, "--resume", str(run_dir)]
    else:
        args = ["run", str(write_recipe(tmp_path, nproc=nproc)), *extra, *sets('run.resume="auto"')]
    done = run_mutualkd(args, tmp_path / "resume", nproc=nproc)
    assert done.rc == 0, done.explain()
    # It went on from the newest complete checkpoint: what was logged up to it is kept byte
    # for byte (wall-clock fields included), what the killed run logged after it is not.
    resumed_log = (run_dir / "metrics.jsonl").read_bytes()
    assert resumed_log[:offset] == killed_log[:offset]
    assert json.loads(killed_log[:offset].splitlines()[-1])["global_step"] == resume_step

    reference = reference_run(tmp_path_factory, strategy, nproc)
    assert sum(r["kind"] == "step" for r in comparable_metrics(reference)) == TOTAL_STEPS
    assert_same_run(run_dir, reference)


def test_pruning_keeps_the_newest_k_complete_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> None:
    """keep_checkpoints = 3: the three newest step checkpoints (by meta.json step) and best/ stay."""
    reference = reference_run(tmp_path_factory, "kl_dml")
    # Checkpoints every 3 steps and at each epoch end (10, 20): 3 6 9 10 12 15 18 20.
    assert checkpoint_steps(reference) == [15, 18, 20]
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["best", "step-00000015", "step-00000018", "step-00000020"], names


def test_corrupted_state_is_refused_with_exit_code_2(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """State.pt files whose bytes changed after they were written: resume stops with a message
    naming the checkpoint, not a traceback, and leaves the run folder as it was. (The CLI runs
    in this process; test_bad_input checks the same contract through a real process.) Every
    step checkpoint is corrupted: with one intact, resume falls back to it
    (test_faults.py::test_corrupt_newest_checkpoint_falls_back_to_an_older_one)."""
    run_dir = copy_run(killed_run(tmp_path_factory, "kl_dml"), tmp_path)
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None
    for _, folder in list_checkpoints(run_dir / "checkpoints"):
        state = folder / "state.pt"
        data = bytearray(state.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        state.write_bytes(bytes(data))
    before = snapshot(run_dir)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)], env={"COLUMNS": "200"})
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    err = result.stderr
    assert "Traceback" not in err and str(latest) in err and "corrupted" in err and "fix:" in err, err
    assert snapshot(run_dir) == before, "a refused resume must not touch the run folder"


# --------------------------------------------------------------------------- multi-process edge cases


def test_fresh_two_process_run_survives_rank0_creating_the_folder_first(tmp_path: Path) -> None:
    """Rank 1 looks at the run folder 3 s after rank 0 (the order happens by chance in about
    one fresh torchrun launch in four on 2 CPU cores); the run must still start."""
    recipe = write_recipe(tmp_path, nproc=2, epochs=1)
    done = run_mutualkd(["run", str(recipe), *sets("run.max_steps=1")], tmp_path / "log", nproc=2, late_rank=1,
                        timeout=180)
    assert done.rc == 0, done.explain()


def test_resume_with_another_process_count_is_refused_cleanly(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
                                                              ) -> None:
    run_dir = copy_run(killed_run(tmp_path_factory, "kl_dml", 1), tmp_path)
    for step, folder in list_checkpoints(run_dir / "checkpoints"):
        if step != KILL_AFTER:
            shutil.rmtree(folder)  # resume from batch 6 of epoch 1; with 2 processes an epoch has 5 batches
    assert read_meta(step_folder(run_dir, KILL_AFTER))["global_step"] == KILL_AFTER
    done = run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume", nproc=2, timeout=180)
    assert done.rc != 0, "a 1-process checkpoint was resumed by 2 processes without complaint"
    # torchrun prints its own traceback when a worker fails; a worker's has a [rankN]: prefix.
    assert "]: Traceback" not in done.err and "fix:" in done.err, done.explain()
