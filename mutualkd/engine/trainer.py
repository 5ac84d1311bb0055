"""The Trainer: builds a run from its recipe and runs the fit loop (stages -> epochs -> batches).

Reading order: ``Trainer.__init__`` builds everything that can fail on bad input
(:mod:`.build`) and checks the run folder (:mod:`.state`) before anything is written;
:meth:`Trainer.fit` is the loop, its phases labelled; :meth:`Trainer.train_step` is one
batch (:mod:`.step`); lifecycle hooks (:mod:`.hooks`) do the logging, the progress bar and
the checkpoint cadence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
import json
import os
from pathlib import Path
import random
import time
from typing import Any

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
import numpy as np
from rich.markup import escape
import torch
from torch import Tensor, nn

from mutualkd import checkpoint as ckpt
from mutualkd.config import Recipe
from mutualkd.engine.build import Unit, build_run
from mutualkd.engine.ema import EmaPeers
from mutualkd.engine.evaluate import evaluate_topk
from mutualkd.engine.hooks import Callback, CallbackList, Checkpointing, ConsoleLog, MetricsLog, ProgressBar
from mutualkd.engine.precision import Precision, launcher_precision
from mutualkd.runlock import ensure_not_busy
from mutualkd.engine.signals import RunInterrupted, StopRequest
from mutualkd.engine.state import History, Position, RunFolder, resume_folder
from mutualkd.engine.step import BatchStep, StagePlan, StepResult, plan_stage
from mutualkd.engine.tracking import TrackerLog, check_trackers
from mutualkd.errors import CheckpointError, RecipeError, UserError
from mutualkd.runlog import MetricsWriter, atomic_write_text, console, dump_toml
from mutualkd.strategy import Stage

__all__ = ["Trainer", "RunInterrupted", "EpochClock"]


class EpochClock:
    """Wall time, images and time spent waiting for data in the current epoch."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def images_per_s(self) -> float:
        return self.images / max(self.elapsed(), 1e-9)


def _reduce_max(t: Tensor) -> Tensor:
    """All-reduce ``t`` with max across the processes (the per-batch finiteness check and stop request)."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def _has_gpu() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


class Trainer:
    """Trains the peers of a recipe with its strategy. ``fit()`` runs it to the end.

    ``callbacks`` are :class:`mutualkd.engine.Callback` objects called after the engine's
    own (metrics.jsonl, console, progress bar, checkpoints).
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        recipe_file: str = "<recipe>",
        resume: str | Path | None = None,
        accelerator: Accelerator | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.recipe = recipe
        self.recipe_file = recipe_file
        run = recipe.run
        cpu = run.device == "cpu" or not _has_gpu()
        if run.mixed_precision == "fp16" and cpu:
            raise RecipeError(
                "mixed_precision = \"fp16\" needs a GPU (on a CPU it would silently train in fp32)",
                file=recipe_file, field="run.mixed_precision", hint='use "bf16" (CPU autocast) or "no" on this machine',
            )
        # Precision is the engine's own (see precision.py); the Accelerator sets up
        # processes, devices and DistributedDataParallel. Without a GPU, Accelerate only
        # sets up gloo for several processes when told to use the CPU.
        # Trackers (run.log_with) are Accelerate's; a missing package exits before anything starts.
        check_trackers(run.log_with, file=recipe_file)
        folder_path = resume_folder(resume) if resume is not None else Path(run.out_dir) / run.name
        # A lost process (killed without the launcher noticing, stopped, on a dead node)
        # ends the others' wait in their next collective after run.collective_timeout.
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=run.collective_timeout))
        self.accelerator = accelerator or Accelerator(mixed_precision="no", cpu=cpu, step_scheduler_with_optimizer=False,
                                                      log_with=run.log_with or None, project_dir=str(folder_path),
                                                      kwargs_handlers=[timeout])
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
        if self.is_main:
            ensure_not_busy(folder_path)  # a run folder another process writes: refused before building anything
        self.precision = Precision(run.mixed_precision, self.device)
        launched = launcher_precision()
        if launched is not None and launched != run.mixed_precision and self.is_main:
            console.print(f"[yellow]note:[/] the launcher asked for mixed precision '{launched}'; this run uses the"
                          f" recipe's run.mixed_precision = \"{run.mixed_precision}\" ({recipe_file}). Set it in the"
                          " recipe (or --set run.mixed_precision=...) to change it.", highlight=False)
        self._configure_determinism()

        # --- everything that can fail on bad input, before anything is written
        built = build_run(recipe, acc, recipe_file=recipe_file)
        self.strategy = built.strategy
        self.info = built.info
        self.train_loader, self.test_loader = built.train_loader, built.test_loader
        #: The validation split held out of train (data.val_fraction), None without one.
        self.val_loader = built.data.val
        self.data = built.data  # the pipeline: its kind, why it was chosen, the batch mixing
        self._lr_note = built.lr_note
        self.peer_names = built.peer_names
        self.units: dict[str, Unit] = built.units
        self.stages: list[Stage] = built.stages
        self.stage_epochs: list[int] = built.stage_epochs
        self._slots = built.slots
        self._plans: list[StagePlan] = [plan_stage(s, self.units) for s in self.stages]
        self._batch = BatchStep(self.strategy, self._slots, self.units, self.peer_names, self.precision,
                                reduce_max=_reduce_max if acc.num_processes > 1 else None)
        self._mode_plan: StagePlan | None = None

        self.position = Position()
        # With a validation split, best/ and the best epoch are chosen on it (val_history)
        # and history keeps the test top-1; without one, the test split chooses.
        self.history = History()
        self.val_history: History | None = History() if self.val_loader is not None else None
        #: The latest evaluation: {"top1": {...}, "top5": {...}} per model (and "val_top1", "val_top5").
        self.last_eval: dict[str, dict[str, float]] = {}
        self.clock = EpochClock()
        self.last_forward_passes = 0
        self.last_step_record: dict[str, Any] | None = None  # the latest step record of metrics.jsonl
        #: Models evaluated after each epoch next to the peers (not in their ensemble), e.g. EMA copies.
        self.eval_models: dict[str, nn.Module] = {}
        self._epoch_sums: dict[str, Tensor] = {}  # per-term sums over the epoch, kept on the device
        self._epoch_count = 0
        self._stop = StopRequest()

        # --- the run folder: refuse to touch an existing run unless resuming it
        self.folder = RunFolder(recipe, acc, resume)  # locked by the main process from here on
        self.run_dir = self.folder.path
        self.recipe_hash = self.folder.recipe_hash
        try:
            self._resume_state = self.folder.load_resume_state()
        except BaseException:
            self.folder.release()
            raise
        self.resumed_from: Path | None = self.folder.resume_from
        self.writer = MetricsWriter(None)
        self._last_saved_step = -1

        own: list[Callback] = [MetricsLog()]
        if self.is_main and run.progress:
            own += [ProgressBar(), ConsoleLog()]
        # EMA updates and tracker logs come before the checkpoint of the same step.
        self.ema = EmaPeers(self)
        if self.ema:
            own.append(self.ema)
        if run.log_with:
            own.append(TrackerLog(run.log_with))
        own.append(Checkpointing())
        self.callbacks = CallbackList([*own, *callbacks])

    def add_callback(self, callback: Callback) -> None:
        """Call ``callback``'s hooks too, after those already registered."""
        self.callbacks.callbacks.append(callback)

    # ------------------------------------------------------------------ the fit loop
    def fit(self) -> dict[str, Any]:
        """Train to the end of the last stage (or ``run.max_steps``); returns the summary."""
        acc = self.accelerator
        # --- start: continue a resumed run exactly where its checkpoint left it, or record the recipe
        try:
            self._start()
        except BaseException:
            self.writer.close()
            self.folder.release()
            raise
        summary: dict[str, Any] | None = None
        try:
            with self._stop.installed():
                self.callbacks.on_fit_start(self)
                self._run_stages()
            summary = self._summary()
            if self.is_main:
                atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        finally:
            try:
                self.callbacks.on_fit_end(self, summary)
            finally:
                self.writer.close()
                self.folder.release()
        acc.wait_for_everyone()
        return summary

    def _start(self) -> None:
        """Continue a resumed run exactly where its checkpoint left it (repairing what a kill left), or record the recipe."""
        acc = self.accelerator
        notes = list(self.folder.notes)
        state = self._resume_state
        if state is None and self.is_main:  # before anything else: a folder with it is a run that can go on
            atomic_write_text(self.run_dir / "recipe.toml", dump_toml(self.folder.recipe_dict))
        self.writer = MetricsWriter(self.run_dir / "metrics.jsonl" if self.is_main else None)
        if state is not None:
            self.load_state_dict(state)
            note = self.writer.resume(int(state.get("metrics_offset", 0)), state.get("metrics_log"),
                                      str(self.resumed_from.name if self.resumed_from else ""))
            notes += [note] if note else []
            if self.is_main:
                self.folder.set_aside_skipped()
        elif self.is_main:
            self.writer.truncate(0)  # a run started again: what its first attempt logged goes
        if self.is_main:
            for note in notes:
                console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        acc.wait_for_everyone()
        if state is not None:
            self._repair_best()

    def _repair_best(self) -> None:
        """A kill between a best epoch's step checkpoint and its best/ leaves best/ behind: write it now.

        Right after that epoch's end the resumed state is the one best/ was to hold. From
        elsewhere it cannot be rebuilt; best/ is then rewritten at the next best epoch.
        """
        pos, best_epoch = self.position, self.history.best_epoch
        stale = self.folder.best_is_stale(best_epoch) if self.is_main else None
        if self.accelerator.num_processes > 1:
            stale = broadcast_object_list([stale], from_process=0)[0]
        if stale is None:
            return
        if pos.epoch == best_epoch and pos.batch == 0:
            if self.is_main:
                console.print(f"[yellow]note:[/] {escape(stale)}; rewritten from the checkpoint of that epoch",
                              highlight=False)
            self.save_checkpoint("best")
        elif self.is_main:
            console.print(f"[yellow]note:[/] {escape(stale)}; it cannot be rebuilt from this checkpoint and is rewritten at"
                          " the next best epoch", highlight=False)

    def _data_line(self) -> str:
        """What the run prints at start: the pipeline and why, the global batch, the split choosing best."""
        d, world = self.recipe.data, self.accelerator.num_processes
        line = (f"data: {self.data.kind} pipeline ({self.data.reason}); global batch {d.batch_size * world}"
                f" = data.batch_size {d.batch_size} x {world} process{'es' if world > 1 else ''}")
        if self.data.kind == "stream":
            c, h, w = self.data.input.input_size if self.data.input else (0, 0, 0)
            line += f"; {d.num_workers} worker(s) per process; input {c}x{h}x{w}"
        line += f"; best epoch chosen on the {'validation' if self.val_loader is not None else 'test'} split"
        if self._lr_note:
            line += f"; linear lr scaling: {self._lr_note}"
        return line

    def _run_stages(self) -> None:
        pos, run, loader = self.position, self.recipe.run, self.train_loader
        world = self.accelerator.num_processes
        if self.is_main:
            console.print(escape(self._data_line()), highlight=False)
        rank, mixup = self.accelerator.process_index, self.data.mixup
        for si, stage in enumerate(self.stages):
            if si < pos.stage:
                continue
            while pos.stage_epoch < self.stage_epochs[si]:
                # --- epoch start: the data order of this epoch, from the saved batch on resume
                loader.set_epoch(pos.epoch)
                loader.start_batch = pos.batch
                self.clock = EpochClock()
                self.callbacks.on_epoch_start(self, stage, pos.epoch)
                # --- batches
                batches = iter(loader)
                while True:
                    t_wait = time.perf_counter()
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        break
                    self.clock.data_wait += time.perf_counter() - t_wait
                    if mixup is not None:  # mixup / cutmix / label smoothing: soft targets [B, K]
                        x, y = mixup(x, y, epoch=pos.epoch, batch=pos.batch, rank=rank)
                    self.callbacks.on_batch_start(self, x, y)
                    result = self.train_step(x, y)
                    pos.batch += 1
                    pos.global_step += 1
                    self.clock.images += x.shape[0] * world
                    self.callbacks.on_batch_end(self, result)  # step log, progress, mid-epoch checkpoints
                    if result.stop_signal is not None:
                        # Every process saw the request in the same batch (step.py reduces it).
                        if self._last_saved_step != pos.global_step:
                            self.save_checkpoint("step")
                        raise RunInterrupted(result.stop_signal, self.run_dir)
                    if run.max_steps is not None and pos.global_step >= run.max_steps:
                        break
                # --- epoch end: evaluation, the epoch record, its checkpoints
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the epoch's time includes its queued GPU work
                record = self._end_epoch(stage)
                self.callbacks.on_epoch_end(self, record)  # metrics.jsonl, console, checkpoints
                if run.max_steps is not None and pos.global_step >= run.max_steps:
                    return
            pos.stage += 1
            pos.stage_epoch = 0

    def _end_epoch(self, stage: Stage) -> dict[str, Any]:
        pos, clock = self.position, self.clock
        train_time = clock.elapsed()
        record: dict[str, Any] = {
            "kind": "epoch",
            "stage": stage.name,
            "epoch": pos.epoch + 1,
            "global_step": pos.global_step,
            "loss": {k: float(v) / max(self._epoch_count, 1) for k, v in self._epoch_sums.items()},
            "lr": self.learning_rates(),
            "images_per_s": clock.images / max(train_time, 1e-9),
            "train_seconds": train_time,
            "data_wait_share": clock.data_wait / max(train_time, 1e-9),
        }
        skipped = getattr(self.train_loader, "skipped", None)
        if self.recipe.data.skip_corrupt and skipped is not None:  # unreadable images left out, all processes
            n = torch.tensor([float(skipped)], device=self.device)
            if self.accelerator.num_processes > 1:
                n = self.accelerator.reduce(n, reduction="sum")
            record["skipped_images"] = int(n.item())
            self.train_loader.skipped = 0
        if stage.evaluate:
            record["top1"] = self.evaluate()
            record["top5"] = self.last_eval["top5"]
            self.history.add(pos.epoch + 1, record["top1"], self.peer_names)
            if self.val_history is not None:
                val = self.evaluate_split(self.val_loader)
                record["val_top1"], record["val_top5"] = val["top1"], val["top5"]
                self.last_eval.update(val_top1=val["top1"], val_top5=val["top5"])
                self.val_history.add(pos.epoch + 1, val["top1"], self.peer_names)
                # the validation split chooses the best epoch (best/ and the summary follow it)
                self.history.best_score = self.val_history.best_score
                self.history.best_epoch = self.val_history.best_epoch
        self._epoch_sums, self._epoch_count = {}, 0
        pos.epoch += 1
        pos.stage_epoch += 1
        pos.batch = 0
        return record

    # ------------------------------------------------------------------ one batch
    @property
    def current_stage(self) -> Stage:
        return self.stages[min(self.position.stage, len(self.stages) - 1)]

    def train_step(self, inputs: Tensor, labels: Tensor) -> StepResult:
        """One batch of the current stage: every step's loss terms, backward, optimizer steps.

        Adds the terms to the epoch's sums; the position in training is advanced by
        :meth:`fit`, not here.
        """
        plan = self._plans[min(self.position.stage, len(self._plans) - 1)]
        if plan is not self._mode_plan:
            self._set_train_mode(plan)
        result = self._batch.run(plan, inputs, labels, epoch=self.position.epoch, global_step=self.position.global_step,
                                 stop=self._stop.signum or 0)
        for terms in result.terms.values():
            for key, v in terms.items():
                self._epoch_sums[key] = self._epoch_sums.get(key, 0.0) + v.float()
        self._epoch_count += 1
        self.last_forward_passes = result.forward_passes
        return result

    def _set_train_mode(self, plan: StagePlan) -> None:
        # A module is in training mode only in the stages that update it: a frozen
        # teacher, or an autoencoder after its stage, keeps its BatchNorm statistics.
        for slot in self._slots.values():
            slot.wrapped.train(slot.unit is not None and slot.unit in plan.updated_units)
        self._mode_plan = plan

    def learning_rates(self) -> dict[str, float]:
        return {u.name: u.optimizer.param_groups[0]["lr"] for u in self.units.values()}  # type: ignore[union-attr]

    # ------------------------------------------------------------------ modules
    @property
    def module_names(self) -> list[str]:
        """Peers (recipe order), then the strategy's modules (registration order)."""
        return list(self._slots)

    @property
    def frozen_modules(self) -> list[str]:
        """Modules no optimizer updates (e.g. a loaded teacher)."""
        return [name for name, s in self._slots.items() if s.unit is None]

    def unwrapped(self, name: str) -> nn.Module:
        """A peer (its :class:`mutualkd.peers.PeerModule`) or strategy module, without the engine's wrappers."""
        return self._slots[name].inner

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Top-1 (%) of each peer and of the ensemble on the whole test split (top-5 in :attr:`last_eval`)."""
        self.last_eval = self.evaluate_split(self.test_loader)
        return self.last_eval["top1"]

    def evaluate_split(self, loader: Any) -> dict[str, dict[str, float]]:
        """``{"top1": ..., "top5": ...}`` (%) of each peer, the ensemble and :attr:`eval_models` on ``loader``."""
        peers = {name: self._slots[name].inner for name in self.peer_names}
        acc = evaluate_topk(peers, loader, self.accelerator, self.precision)
        if self.eval_models:  # evaluated apart, so that the ensemble stays the peers'
            extra = evaluate_topk(self.eval_models, loader, self.accelerator, self.precision)
            for k in acc:
                acc[k].update({name: v for name, v in extra[k].items() if name in self.eval_models})
        return {f"top{k}": v for k, v in acc.items()}

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Collective with several processes (it gathers RNG states)."""
        modules = {name: self._slots[name].inner.model.state_dict() for name in self.peer_names}  # type: ignore[union-attr]
        modules.update({k: s.inner.state_dict() for k, s in self._slots.items() if k not in self.peer_names})
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        rngs = gather_object([rng]) if self.accelerator.num_processes > 1 else [rng]
        return {
            "modules": modules,
            "optimizers": {u.name: u.optimizer.state_dict() for u in self.units.values()},  # type: ignore[union-attr]
            "schedulers": {u.name: u.scheduler.state_dict() for u in self.units.values()},
            "scaler": self.precision.state_dict(),
            "strategy": self.strategy.state_dict(),
            "position": vars(self.position).copy(),
            "history": vars(self.history).copy(),
            "val_history": vars(self.val_history).copy() if self.val_history is not None else None,
            "data": self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else {},
            "epoch_acc": {k: float(v) for k, v in self._epoch_sums.items()},
            "epoch_count": self._epoch_count,
            "versions": [self._batch.versions[n] for n in self.peer_names],
            "rng": rngs,
            "metrics_offset": self.writer.offset() if self.is_main else 0,
            "metrics_log": self.writer.snapshot(),  # metrics.jsonl up to here, compressed (main process)
            "last_eval": self.last_eval,  # summary.json's top-5 after a resume with no evaluation left
            "callbacks": {key: cb.state_dict() for key, cb in self._stateful_callbacks().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            for name in self.peer_names:
                self._slots[name].inner.model.load_state_dict(state["modules"][name])  # type: ignore[union-attr]
            for k, s in self._slots.items():
                if k not in self.peer_names:
                    s.inner.load_state_dict(state["modules"][k])
            for u in self.units.values():
                u.optimizer.load_state_dict(state["optimizers"][u.name])  # type: ignore[union-attr]
                u.scheduler.load_state_dict(state["schedulers"][u.name])
            saved = state.get("callbacks", {})
            for key, cb in self._stateful_callbacks().items():
                if key in saved:  # a callback added on resume (e.g. a tracker) starts afresh
                    cb.load_state_dict(saved[key])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint does not match the recipe's models: {e}", where=str(self.resumed_from),
                                  hint="resume with the recipe the run was started with") from None
        self.precision.load_state_dict(state.get("scaler"))
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.position = Position(**state["position"])
        self.history = History(**state["history"])
        if self.val_history is not None and state.get("val_history"):
            self.val_history = History(**state["val_history"])
        if hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state.get("data") or {})
        self._epoch_sums = dict(state.get("epoch_acc", {}))
        self._epoch_count = int(state.get("epoch_count", 0))
        self.last_eval = dict(state.get("last_eval", {}))
        for name, v in zip(self.peer_names, state.get("versions", [])):
            self._batch.versions[name] = int(v)
        rngs = state["rng"]
        i = self.accelerator.process_index
        rng = rngs[i] if i < len(rngs) else rngs[0]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _stateful_callbacks(self) -> dict[str, Any]:
        """Callbacks whose state is saved in checkpoints: those with ``state_dict`` and ``load_state_dict``,
        under their ``state_key`` (default: the class name)."""
        out: dict[str, Any] = {}
        for cb in self.callbacks.callbacks:
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None)):
                key = str(getattr(cb, "state_key", type(cb).__name__))
                if key in out:
                    raise UserError(f"two callbacks save their state under '{key}'",
                                    hint="give one of them another state_key")
                out[key] = cb
        return out

    def save_checkpoint(self, kind: str) -> Path:
        """Write a ``"step"`` checkpoint (pruning old ones) or ``best/``; every process must call it."""
        dest = self.folder.step_checkpoint(self.position.global_step) if kind == "step" else self.folder.best_checkpoint()
        problem: tuple[str, str | None, str | None] | None = None
        state = self.state_dict()  # collective (RNG states of every process): all call it
        if self.is_main:
            try:
                self.writer.sync()  # what the checkpoint's metrics offset points at is on disk first
                ckpt.save_checkpoint(dest, state, self._meta(kind))
                if kind == "step":
                    ckpt.prune_checkpoints(self.folder.checkpoints, self.recipe.run.keep_checkpoints,
                                           upto=self.position.global_step)
            except UserError as e:  # a full disk: every process stops with the same message
                problem = (e.message, e.where, e.hint)
        if self.accelerator.num_processes > 1:  # also the barrier after the write
            problem = broadcast_object_list([problem], from_process=0)[0]
        if problem is not None:
            raise CheckpointError(problem[0], where=problem[1], hint=problem[2])
        if kind == "step":
            self._last_saved_step = self.position.global_step
        self.callbacks.on_checkpoint(self, dest, kind)
        return dest

    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "global_step": self.position.global_step,
            "epoch": self.position.epoch,
            "stage": self.current_stage.name,
            "recipe_hash": self.folder.recipe_hash,
            "versions": ckpt.versions(),
            # a peer's own input normalisation (mean, std) when its weights expect another than the data set's
            "peers": {name: {"model": pc.model, "kwargs": pc.kwargs, **self._slots[name].inner.norm_meta()}  # type: ignore[operator]
                      for name, pc in zip(self.peer_names, self.recipe.peers)},
            # what `mutualkd export` writes into a timm config.json: the input size and normalisation
            "dataset": {"name": self.info.name, "num_classes": self.info.num_classes, "in_chans": self.info.in_chans,
                        "image_size": list(self.info.image_size), "mean": list(self.info.mean),
                        "std": list(self.info.std)},
            "strategy": self.recipe.strategy.name,
            "num_processes": self.accelerator.num_processes,
        }

    def _summary(self) -> dict[str, Any]:
        top1 = {}
        for name, values in self.history.top1.items():
            best = max(values)
            top1[name] = {"final": values[-1], "best": best, "best_epoch": values.index(best) + 1}
        return {
            "name": self.recipe.run.name,
            "strategy": self.recipe.strategy.name,
            "peers": {n: pc.model for n, pc in zip(self.peer_names, self.recipe.peers)},
            "epochs": self.position.epoch,
            "global_steps": self.position.global_step,
            "top1": top1,
            # the epoch whose state checkpoints/best holds (best mean top-1 of the peers)
            "best_epoch": self.history.best_epoch if self.history.best_epoch > 0 else None,
            **self._selection_summary(),
        }

    def _selection_summary(self) -> dict[str, Any]:
        """Which split chose the best epoch, the final top-5, and with a validation split its top-1 and
        the test top-1 at the chosen epoch (the number to report)."""
        out: dict[str, Any] = {"best_chosen_by": "validation" if self.val_history is not None else "test"}
        if "top5" in self.last_eval:
            out["top5"] = {name: {"final": v} for name, v in self.last_eval["top5"].items()}
        if self.val_history is not None and self.val_history.top1:
            out["val_top1"] = {name: {"final": v[-1], "best": max(v)} for name, v in self.val_history.top1.items()}
            i = self.history.best_epoch - 1
            epochs = self.history.top1
            out["top1_at_best_epoch"] = {name: v[i] for name, v in epochs.items() if 0 <= i < len(v)}
        return out

    # ------------------------------------------------------------------ process set-up
    def _configure_determinism(self) -> None:
        run = self.recipe.run
        if run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        else:
            torch.backends.cudnn.benchmark = True
        set_seed(run.seed)
