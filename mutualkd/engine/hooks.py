"""Lifecycle hooks: the callback protocol, and the engine's own logging, progress and checkpoint cadence.

Progress is a rich bar on an interactive terminal, and plain lines of the logger otherwise.

A callback subclasses :class:`Callback` and overrides the hooks it needs; pass it to
``Trainer(..., callbacks=[...])``. Hooks run on every process, in order: the engine's
own callbacks first (metrics.jsonl, console, progress bar, checkpoints), then the
user's. Use ``trainer.is_main`` to act on one process only. A callback with state to
keep across a resume satisfies :class:`StatefulCallback`: its state goes into every
checkpoint under its ``state_key``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import logging
from pathlib import Path
import time
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

from mutualkd._logging import get_logger
from mutualkd.runlog import console, plain_text, summary_table
from mutualkd.strategy import LossTerms, Stage, Step, StepContext

if TYPE_CHECKING:
    from mutualkd.engine.step import StepResult
    from mutualkd.engine.trainer import Trainer

__all__ = [
    "Callback", "StatefulCallback", "CallbackList", "step_record", "MetricsLog", "ConsoleLog", "ProgressBar", "ProgressLog",
    "progress_callback", "Checkpointing",
]

log = get_logger(__name__)


class Callback:
    """Hooks around the fit loop; every method is optional (the base does nothing).

    Order of calls: ``on_fit_start``; for each epoch ``on_epoch_start``, then per batch
    ``on_batch_start``, ``on_before_backward`` for each step, and ``on_batch_end``, then ``on_epoch_end``; ``on_checkpoint``
    after each checkpoint is complete on disk; ``on_fit_end`` last, always.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first batch (after a resume has restored the state)."""

    def on_epoch_start(self, trainer: Trainer, stage: Stage, epoch: int) -> None:
        """Before the first batch of global epoch ``epoch`` (0-based) of ``stage``."""

    def on_batch_start(self, trainer: Trainer, inputs: Tensor, labels: Tensor) -> None:
        """The batch is loaded; its training step is next."""

    def on_before_backward(self, trainer: Trainer, step: Step, ctx: StepContext, terms: LossTerms) -> None:
        """A step's loss terms, as the strategy returned them, before the engine sums and backpropagates
        them; ``ctx`` is the strategy's context (its ``skipped`` units, views, outputs)."""

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        """After the batch's training step; ``result.terms`` are its loss terms (detached)."""

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        """After evaluation; ``record`` is the epoch record written to metrics.jsonl."""

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        """A checkpoint of ``kind`` (``"step"`` or ``"best"``) is complete at ``path`` (main process)."""

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        """The run ended: ``summary`` as written to summary.json, or None when it stopped early
        (a signal, a non-finite loss, an error)."""

    @property
    def state_key(self) -> str:
        """The name of this callback's state in a checkpoint, when it is a :class:`StatefulCallback`
        (default: the class name; set it as a class attribute to keep it stable across renames)."""
        return type(self).__name__


@runtime_checkable
class StatefulCallback(Protocol):
    """A callback whose state is saved in every checkpoint and restored on resume (an EMA, a tracker).

    ``state_dict()`` returns what :meth:`load_state_dict` needs to continue exactly: tensors,
    numbers, strings and containers only (checkpoints are read with torch's restricted
    unpickler, :mod:`mutualkd.trust`). The state is saved under ``state_key``, which must be
    unique among a trainer's callbacks and stable from run to run: a resumed run gives each
    callback the state saved under its key, and a callback whose key the checkpoint lacks
    (added on resume) starts afresh. ``load_state_dict`` is called before ``on_fit_start``.
    """

    state_key: str

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ...


class CallbackList(Callback):
    """Calls each callback's hook in order."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_fit_start(self, trainer: Trainer) -> None:
        for c in self.callbacks:
            c.on_fit_start(trainer)

    def on_epoch_start(self, trainer: Trainer, stage: Stage, epoch: int) -> None:
        for c in self.callbacks:
            c.on_epoch_start(trainer, stage, epoch)

    def on_batch_start(self, trainer: Trainer, inputs: Tensor, labels: Tensor) -> None:
        for c in self.callbacks:
            c.on_batch_start(trainer, inputs, labels)

    def on_before_backward(self, trainer: Trainer, step: Step, ctx: StepContext, terms: LossTerms) -> None:
        for c in self.callbacks:
            c.on_before_backward(trainer, step, ctx, terms)

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        for c in self.callbacks:
            c.on_batch_end(trainer, result)

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        for c in self.callbacks:
            c.on_epoch_end(trainer, record)

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None:
        for c in self.callbacks:
            c.on_checkpoint(trainer, path, kind)

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        for c in self.callbacks:
            c.on_fit_end(trainer, summary)


def _is_log_step(trainer: Trainer) -> bool:
    pos = trainer.position
    return pos.global_step % trainer.recipe.run.log_every == 0 or pos.batch == len(trainer.train_loader)


def step_record(trainer: Trainer, result: StepResult) -> dict[str, Any]:
    """The metrics.jsonl step record of the batch just trained (what trackers get too)."""
    pos = trainer.position
    return {
        "kind": "step",
        "stage": trainer.current_stage.name,
        "epoch": pos.epoch + 1,
        "global_step": pos.global_step,
        "batch": pos.batch,
        "steps": {name: {k: float(v) for k, v in terms.items()} for name, terms in result.terms.items()},
        "lr": trainer.learning_rates(),
        "images_per_s": trainer.clock.images_per_s(),
        "forward_passes": result.forward_passes,
        **({"scalars": {k: float(v) for k, v in result.scalars.items()}} if result.scalars else {}),
    }


class MetricsLog(Callback):
    """Step records every ``run.log_every`` steps and at the end of each epoch, and the epoch records."""

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        if _is_log_step(trainer):
            trainer.last_step_record = step_record(trainer, result)
            trainer.writer.write(trainer.last_step_record)

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        trainer.writer.write(record)

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        # The images data.skip_corrupt left out, over the whole run (the epochs before a resume too):
        # read back from metrics.jsonl, which holds every epoch record.
        path = trainer.writer.path
        if summary is None or path is None or not trainer.recipe.data.skip_corrupt:
            return
        total = 0
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("kind") == "epoch" and isinstance(rec.get("skipped_images"), int):
                    total += rec["skipped_images"]
        except (OSError, ValueError):
            return
        if total:
            log.info("note: %d unreadable image(s) were skipped over the run (data.skip_corrupt);"
                     " metrics.jsonl has them per epoch (skipped_images)", total)


class ConsoleLog(Callback):
    """One line per epoch and the summary table, on the main process when ``run.progress`` is on.

    They are records of the ``mutualkd.engine.hooks`` logger (INFO): the console handler
    prints them with rich (the summary as a table), another handler gets plain text.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.resumed_from is not None:
            log.info("resumed %s at step %d (epoch %d)", trainer.run_dir, trainer.position.global_step,
                     trainer.position.epoch, extra={"head": "resumed"})

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        acc_text = "  ".join(f"{k} {v:.2f}%" for k, v in record.get("top1", {}).items())
        loss_text = "  ".join(f"{k} {v:.3f}" for k, v in record["loss"].items())
        head = f"{record['stage']} epoch {record['epoch']}"
        log.info("%s", f"{head}  {loss_text}  {acc_text}".rstrip(), extra={"head": head})

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        if summary is not None and log.isEnabledFor(logging.INFO):
            table = summary_table(summary)
            log.info("%s", plain_text(table), extra={"renderable": table})


class ProgressBar(Callback):
    """A transient rich progress bar per epoch, with the latest loss terms."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=True,
        )
        self.task: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.progress.start()

    def on_epoch_start(self, trainer: Trainer, stage: Stage, epoch: int) -> None:
        stage_epochs = trainer.stage_epochs[trainer.position.stage]
        self.task = self.progress.add_task(
            f"{stage.name} epoch {trainer.position.stage_epoch + 1}/{stage_epochs}",
            total=len(trainer.train_loader), completed=trainer.position.batch, info="",
        )

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        if _is_log_step(trainer):
            parts = [f"{k} {float(v):.3f}" for terms in result.terms.values() for k, v in terms.items()]
            self.progress.update(self.task, info="  ".join(parts[:6]))
        self.progress.update(self.task, completed=trainer.position.batch)

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        self.progress.stop()


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    m, s = divmod(int(max(seconds, 0.0) + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLog(Callback):
    """Without a terminal (output to a file or a pipe), a plain line every ``every_s`` seconds:
    the epoch, the step within it, images/s, and the elapsed time and ETA of the epoch and of the run.

    The epoch's ETA comes from its own training rate; the run's from the rate since the fit
    started, evaluation and checkpoints included, so both settle after a few lines.
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.fit_start = self.last = 0.0
        self.first_step = 0
        self.epoch_first_batch = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.fit_start = self.last = time.perf_counter()
        self.first_step = trainer.position.global_step

    def on_epoch_start(self, trainer: Trainer, stage: Stage, epoch: int) -> None:
        self.epoch_first_batch = trainer.position.batch  # a resumed epoch starts part-way

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        pos, clock, steps = trainer.position, trainer.clock, len(trainer.train_loader)
        epoch_s = clock.elapsed()
        epoch_eta = (steps - pos.batch) * epoch_s / max(pos.batch - self.epoch_first_batch, 1)
        total = sum(trainer.stage_epochs) * steps
        if trainer.recipe.run.max_steps is not None:
            total = min(total, trainer.recipe.run.max_steps)
        run_s = now - self.fit_start
        run_eta = (total - pos.global_step) * run_s / max(pos.global_step - self.first_step, 1)
        stage_epochs = trainer.stage_epochs[pos.stage]
        log.info("progress: %s epoch %d/%d  step %d/%d  %.1f images/s  epoch %s, ETA %s  run %s, ETA %s",
                 trainer.current_stage.name, pos.stage_epoch + 1, stage_epochs, pos.batch, steps,
                 clock.images_per_s(), _clock(epoch_s), _clock(epoch_eta), _clock(run_s), _clock(max(run_eta, 0.0)))


def progress_callback(every_s: float) -> Callback:
    """The rich progress bar on an interactive terminal, else plain progress lines every ``every_s`` seconds."""
    return ProgressBar() if console.is_terminal and console.is_interactive else ProgressLog(every_s)


class Checkpointing(Callback):
    """The checkpoint cadence: every ``run.checkpoint_every`` steps inside an epoch, at each
    epoch's end, and ``best/`` when the epoch's mean peer top-1 is the best so far."""

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        every = trainer.recipe.run.checkpoint_every
        pos = trainer.position
        if every and pos.global_step % every == 0 and pos.batch < len(trainer.train_loader):
            trainer.save_checkpoint("step")

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        trainer.save_checkpoint("step")
        if "top1" in record and trainer.history.best_epoch == record["epoch"]:
            trainer.save_checkpoint("best")
