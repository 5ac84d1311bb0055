"""Multi-process runs on CPU (gloo): torchrun and ``accelerate launch``.

Each run goes through a small wrapper around the ``mutualkd`` command that (a) can hold
one rank back for a few seconds before it resolves the run folder (the deterministic
form of a race between ranks that once made ~3 in 10 runs fail), and (b) records, on
every rank, which test samples it evaluated, what it reported and hashes of the
parameters and buffers it evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
from typing import Any

import pytest

from mutualkd import checkpoint as ckpt

BIN = Path(sys.executable).parent
TIMEOUT = 240
MAX_STEPS = 3

WRAPPER = r'''
import hashlib, json, os, sys, time
from pathlib import Path

from mutualkd import engine
from mutualkd.engine.state import RunFolder

_delay_rank = int(os.environ.get("MKD_TEST_DELAY_RANK", "-1"))
_delay_s = float(os.environ.get("MKD_TEST_DELAY_S", "3"))
_record = os.environ.get("MKD_TEST_RECORD")
_init = RunFolder.__init__
_evaluate = engine.Trainer.evaluate


def init(self, recipe, accelerator, resume=None):
    if accelerator.process_index == _delay_rank:
        time.sleep(_delay_s)
    _init(self, recipe, accelerator, resume)


def _hash(tensors):
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def evaluate(self):
    out = _evaluate(self)
    if _record:
        acc = self.accelerator
        models = [self.unwrapped(name) for name in self.peer_names]
        rec = {
            "rank": acc.process_index,
            "world": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "indices": self.test_loader.indices().tolist(),
            "top1": out,
            "params": [_hash(dict(m.named_parameters())) for m in models],
            "buffers": [_hash(dict(m.named_buffers())) for m in models],
        }
        with open(Path(_record) / f"eval-{os.getpid()}.json", "w") as f:
            json.dump(rec, f)
    return out


RunFolder.__init__ = init
engine.Trainer.evaluate = evaluate
from mutualkd.cli import main

sys.argv[0] = "mutualkd"
main()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, tmp_path: Path, quickstart: Path, subprocess_env: Callable[..., dict[str, str]], *,
            device: str | None, delay_rank: int = -1, delay_s: float = 3.0
            ) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    wrapper = tmp_path / "mkd_wrapper.py"
    wrapper.write_text(WRAPPER)
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "runs"
    args = [
        "run", str(quickstart),
        "--set", f"run.out_dir={json.dumps(str(out))}",
        "--set", "run.name=dist",
        "--set", f"run.max_steps={MAX_STEPS}",
        "--set", "run.epochs=1",
        "--set", "run.log_every=1",
        "--set", "run.progress=false",
        "--set", "data.batch_size=8",
        "--set", "data.eval_batch_size=64",
    ]
    if device is not None:
        args += ["--set", f"run.device={device}"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper), *args]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(wrapper), *args]
    env = subprocess_env(
        MKD_TEST_DELAY_RANK=str(delay_rank), MKD_TEST_DELAY_S=str(delay_s), MKD_TEST_RECORD=str(record),
    )
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    return proc, out / "dist", record


def _records(record: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(record.glob("eval-*.json"))]


def _check_distributed_run(proc: subprocess.CompletedProcess[str], run_dir: Path, record: Path, *,
                           read_metrics: Callable[[Path], list[dict[str, Any]]], test_size: int) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    # One writer: exactly the records a single process writes, none twice.
    recs = read_metrics(run_dir)
    steps = [r for r in recs if r["kind"] == "step"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["global_step"] for r in steps] == list(range(1, MAX_STEPS + 1))
    assert len(epochs) == 1 and len(recs) == MAX_STEPS + 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == MAX_STEPS + 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_steps"] == MAX_STEPS
    assert not list(run_dir.glob(".*")), "temporary files left in the run folder"
    # Both ranks took part: the checkpoint holds the RNG states of two processes.
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert len(state["rng"]) == 2
    # Evaluation: the two ranks' shares are disjoint and cover the test split once, and
    # both report the same, summed result.
    evals = _records(record)
    assert sorted(e["rank"] for e in evals) == [0, 1], [e["distributed_type"] for e in evals]
    assert all(e["world"] == 2 for e in evals)
    a, b = (set(e["indices"]) for e in evals)
    assert not a & b and len(a | b) == test_size
    assert evals[0]["top1"] == evals[1]["top1"]
    top1 = epochs[0]["top1"]
    assert top1 == pytest.approx(evals[0]["top1"])
    for name, v in top1.items():
        correct = v * test_size / 100
        assert abs(correct - round(correct)) < 1e-6, (name, v)
    # The ranks hold the same weights (DDP keeps parameters in sync).
    assert evals[0]["params"] == evals[1]["params"]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, quickstart_recipe, subprocess_env
                 ) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """``torchrun --nproc_per_node 2`` with ``run.device = "cpu"``: two gloo processes."""
    return _launch("torchrun", tmp_path_factory.mktemp("torchrun"), quickstart_recipe, subprocess_env, device="cpu",
                   delay_rank=-1)


def test_torchrun_two_processes_one_writer_each_sample_once(torchrun_run, read_metrics, digits_test_size):
    _check_distributed_run(*torchrun_run, read_metrics=read_metrics, test_size=digits_test_size)


def test_ranks_evaluate_the_same_model(torchrun_run):
    """Every rank evaluates the saved model: same parameters *and* BatchNorm statistics."""
    proc, run_dir, record = torchrun_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    evals = _records(record)
    assert len(evals) == 2
    assert evals[0]["params"] == evals[1]["params"]
    assert evals[0]["buffers"] == evals[1]["buffers"], "ranks evaluate with different BatchNorm statistics"


def test_accelerate_launch_multi_gpu_plain_on_cpu_machine(tmp_path, quickstart_recipe, subprocess_env, read_metrics,
                                                         digits_test_size):
    """Plain ``accelerate launch --multi_gpu --num_processes 2`` (device "auto") works on a CPU-only machine.

    Without a GPU, Accelerate only sets up gloo when told to use the CPU; otherwise each
    process ran alone, each a "main process" writing the same run folder. (``--cpu`` is no
    way to two CPU processes: with it the launcher runs the script once, and the run says so.)
    """
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has a GPU")
    proc, run_dir, record = _launch("accelerate", tmp_path, quickstart_recipe, subprocess_env, device=None,
                                    delay_rank=-1)
    _check_distributed_run(proc, run_dir, record, read_metrics=read_metrics, test_size=digits_test_size)
    # The start line says how many processes run and where the precision came from (the
    # launcher's --mixed_precision no, found through torchrun's agent, two levels up).
    assert "run: 2 processes on cpu (DDP); mixed precision no (from accelerate launch --mixed_precision)" in \
        " ".join(proc.stdout.split())
    assert json.loads((run_dir / "summary.json").read_text())["num_processes"] == 2


def test_run_folder_race_between_ranks(tmp_path, quickstart_recipe, subprocess_env, read_metrics, digits_test_size):
    """A slow rank must not find the run folder that rank 0 just created "already there"."""
    # Rank 1 reaches the check 4 s after rank 0: deterministic form of the race.
    proc, run_dir, record = _launch("torchrun", tmp_path, quickstart_recipe, subprocess_env, device="cpu", delay_rank=1,
                                    delay_s=4.0)
    _check_distributed_run(proc, run_dir, record, read_metrics=read_metrics, test_size=digits_test_size)


def test_a_launched_process_ends_at_once_with_its_code(tmp_path: Path) -> None:
    """A command's end, in a process of a launch: the process group is torn down and the process
    exits with the command's code before the interpreter's teardown (where torch.distributed's
    threads can abort a rank that ended well); without a process group nothing happens."""
    script = tmp_path / "end.py"
    script.write_text(
        "import atexit, sys\n"
        "import torch.distributed as dist\n"
        "from mutualkd.engine.process import end_launched_process\n"
        "end_launched_process(5)  # no process group: returns\n"
        "print('alone: returned', flush=True)\n"
        "atexit.register(lambda: print('interpreter teardown ran', flush=True))\n"
        f"dist.init_process_group('gloo', store=dist.FileStore({str(tmp_path / 'store')!r}, 1), rank=0, world_size=1)\n"
        "print('launched: ending', end='')  # unflushed: end_launched_process flushes it\n"
        "end_launched_process(143)\n"
        "print('not reached')\n",
        encoding="utf-8",
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout == "alone: returned\nlaunched: ending", proc.stdout
    assert "terminate called" not in proc.stderr
