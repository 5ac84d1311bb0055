"""Processes and devices: the Accelerator of a run, its seeds and determinism, the collectives the loop needs."""

from __future__ import annotations

from collections.abc import Callable
import contextlib
from datetime import timedelta
import logging
import os
from pathlib import Path
import sys
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
import torch
from torch import Tensor

from mutualkd.config import RunConfig
from mutualkd.errors import UserError

__all__ = ["has_gpu", "make_accelerator", "configure_determinism", "reduce_max", "broadcast_from_main", "on_main",
           "end_launched_process"]

T = TypeVar("T")


def has_gpu() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def make_accelerator(run: RunConfig, project_dir: Path, *, cpu: bool) -> Accelerator:
    """The Accelerator of a run: processes, devices and DistributedDataParallel, trackers.

    Precision and compilation are the engine's own (precision.py; launcher.py decides both,
    honouring ``accelerate launch``), so Accelerate's stay off. Without a GPU, Accelerate only
    sets up gloo for several processes when told to use the CPU.
    A lost process (killed without the launcher noticing, stopped, on a dead node) ends
    the others' wait in their next collective after ``run.collective_timeout``.
    """
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=run.collective_timeout))
    return Accelerator(mixed_precision="no", dynamo_backend="no", cpu=cpu, step_scheduler_with_optimizer=False,
                       log_with=run.log_with or None, project_dir=str(project_dir), kwargs_handlers=[timeout])


def configure_determinism(run: RunConfig) -> None:
    """Seed every generator; deterministic kernels when ``run.deterministic``, else autotuned cuDNN."""
    if run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    set_seed(run.seed)


def reduce_max(t: Tensor) -> Tensor:
    """All-reduce ``t`` with max across the processes (the per-batch finiteness check and stop request)."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def broadcast_from_main(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` (in place) with the main process's values, in one collective."""
    if not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    torch.distributed.broadcast(flat, src=0)
    for t, v in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(v)


def on_main(acc: Accelerator, work: Callable[[], T], *, error: type[UserError] = UserError,
            if_failed: Callable[[], object] | None = None) -> T | None:
    """``work()`` on the main process only; its result, or the UserError it raised, reaches every process.

    Every process must call it: with several, it is a collective (and so a barrier). A
    UserError raised by ``work`` (after ``if_failed()``, on the main process) is raised on
    every process as ``error`` with the same message, place and fix, so that all of them stop
    together instead of the others waiting in their next collective until it times out.
    Returns ``work()``'s result on every process.
    """
    result: T | None = None
    problem: tuple[str, str | None, str | None] | None = None
    if acc.is_main_process:
        try:
            result = work()
        except UserError as e:
            if if_failed is not None:
                if_failed()
            problem = (e.message, e.where, e.hint)
    if acc.num_processes > 1:
        result, problem = broadcast_object_list([result, problem], from_process=0)
    if problem is not None:
        raise error(problem[0], where=problem[1], hint=problem[2])
    return result


def end_launched_process(code: int) -> None:
    """End a process of a launch (several processes) now, with exit code ``code``; return otherwise.

    For a command's end, once everything is written and every process has reached the same
    ending (the run's end, a stop after a signal or a non-finite loss, a UserError shared by
    ``on_main``). The process group is torn down while the interpreter is whole, and the
    interpreter's own teardown is skipped: in it, C++ threads of torch.distributed can still be
    joinable when their destructors run and abort the process (SIGABRT, "terminate called
    without an active exception") after the run ended well, so that torchrun reports the
    launch as failed and stops the other ranks. ``destroy_process_group()`` alone does not
    prevent it.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
