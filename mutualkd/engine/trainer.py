"""The Trainer: builds a run from its recipe and runs the fit loop (stages -> epochs -> batches).

Reading order: ``Trainer.__init__`` builds everything that can fail on bad input
(:mod:`.build`) and checks the run folder (:mod:`.state`) before anything is written;
:meth:`Trainer.fit` is the loop, its phases labelled; :meth:`Trainer.train_step` is one
batch (:mod:`.step`); lifecycle hooks (:mod:`.hooks`) do the logging, the progress bar and
the checkpoint cadence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
from pathlib import Path
import random
import time
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
import numpy as np
import torch
from torch import Tensor, nn

from mutualkd import checkpoint as ckpt
from mutualkd.config import Recipe
from mutualkd.engine.build import Unit, build_run
from mutualkd.engine.evaluate import evaluate
from mutualkd.engine.hooks import Callback, CallbackList, Checkpointing, ConsoleLog, MetricsLog, ProgressBar
from mutualkd.engine.precision import Precision, launcher_precision
from mutualkd.engine.signals import RunInterrupted, StopRequest
from mutualkd.engine.state import History, Position, RunFolder
from mutualkd.engine.step import BatchStep, StagePlan, StepResult, plan_stage
from mutualkd.errors import CheckpointError, RecipeError
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
        self.accelerator = accelerator or Accelerator(mixed_precision="no", cpu=cpu, step_scheduler_with_optimizer=False)
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
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
        self.peer_names = built.peer_names
        self.units: dict[str, Unit] = built.units
        self.stages: list[Stage] = built.stages
        self.stage_epochs: list[int] = built.stage_epochs
        self._slots = built.slots
        self._plans: list[StagePlan] = [plan_stage(s, self.units) for s in self.stages]
        self._batch = BatchStep(self.strategy, self._slots, self.units, self.peer_names, self.precision,
                                reduce_sum=(lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None)
        self._mode_plan: StagePlan | None = None

        self.position = Position()
        self.history = History()
        self.clock = EpochClock()
        self.last_forward_passes = 0
        self._epoch_sums: dict[str, Tensor] = {}  # per-term sums over the epoch, kept on the device
        self._epoch_count = 0
        self._stop = StopRequest()

        # --- the run folder: refuse to touch an existing run unless resuming it
        self.folder = RunFolder(recipe, acc, resume)
        self.run_dir = self.folder.path
        self.recipe_hash = self.folder.recipe_hash
        self.resumed_from: Path | None = self.folder.resume_from
        self._resume_state = self.folder.load_resume_state()
        self.writer = MetricsWriter(None)

        own: list[Callback] = [MetricsLog()]
        if self.is_main and run.progress:
            own += [ProgressBar(), ConsoleLog()]
        own.append(Checkpointing())
        self.callbacks = CallbackList([*own, *callbacks])

    def add_callback(self, callback: Callback) -> None:
        """Call ``callback``'s hooks too, after those already registered."""
        self.callbacks.callbacks.append(callback)

    # ------------------------------------------------------------------ the fit loop
    def fit(self) -> dict[str, Any]:
        """Train to the end of the last stage (or ``run.max_steps``); returns the summary."""
        acc, run = self.accelerator, self.recipe.run
        # --- start: continue a resumed run exactly where its checkpoint left it, or record the recipe
        self.writer = MetricsWriter(self.run_dir / "metrics.jsonl" if self.is_main else None)
        if self._resume_state is not None:
            self.load_state_dict(self._resume_state)
            self.writer.truncate(self._resume_state.get("metrics_offset", 0))
            if self.is_main:
                ckpt.remove_leftovers(self.folder.checkpoints)
        elif self.is_main:
            atomic_write_text(self.run_dir / "recipe.toml", dump_toml(self.folder.recipe_dict))
        acc.wait_for_everyone()

        summary: dict[str, Any] | None = None
        try:
            with self._stop.installed():
                self.callbacks.on_fit_start(self)
                self._run_stages()
            summary = self._summary()
            if self.is_main:
                atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        finally:
            self.callbacks.on_fit_end(self, summary)
            self.writer.close()
        acc.wait_for_everyone()
        return summary

    def _run_stages(self) -> None:
        pos, run, loader = self.position, self.recipe.run, self.train_loader
        world = self.accelerator.num_processes
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
                    self.callbacks.on_batch_start(self, x, y)
                    result = self.train_step(x, y)
                    pos.batch += 1
                    pos.global_step += 1
                    self.clock.images += x.shape[0] * world
                    self.callbacks.on_batch_end(self, result)  # step log, progress, mid-epoch checkpoints
                    if self._stop.signum is not None:
                        self.save_checkpoint("step")
                        raise RunInterrupted(self._stop.signum, self.run_dir)
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
        if stage.evaluate:
            record["top1"] = self.evaluate()
            self.history.add(pos.epoch + 1, record["top1"], self.peer_names)
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
        result = self._batch.run(plan, inputs, labels, epoch=self.position.epoch, global_step=self.position.global_step)
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
        """Top-1 (%) of each peer and of the ensemble on the whole test split."""
        peers = {name: self._slots[name].inner for name in self.peer_names}
        return evaluate(peers, self.test_loader, self.accelerator, self.precision)

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
            "epoch_acc": {k: float(v) for k, v in self._epoch_sums.items()},
            "epoch_count": self._epoch_count,
            "versions": [self._batch.versions[n] for n in self.peer_names],
            "rng": rngs,
            "metrics_offset": self.writer.offset() if self.is_main else 0,
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
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint does not match the recipe's models: {e}", where=str(self.resumed_from),
                                  hint="resume with the recipe the run was started with") from None
        self.precision.load_state_dict(state.get("scaler"))
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.position = Position(**state["position"])
        self.history = History(**state["history"])
        self._epoch_sums = dict(state.get("epoch_acc", {}))
        self._epoch_count = int(state.get("epoch_count", 0))
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

    def save_checkpoint(self, kind: str) -> Path:
        """Write a ``"step"`` checkpoint (pruning old ones) or ``best/``; every process must call it."""
        dest = self.folder.step_checkpoint(self.position.global_step) if kind == "step" else self.folder.best_checkpoint()
        state = self.state_dict()  # collective (RNG states of every process): all call it
        if self.is_main:
            ckpt.save_checkpoint(dest, state, self._meta(kind))
            if kind == "step":
                ckpt.prune_checkpoints(self.folder.checkpoints, self.recipe.run.keep_checkpoints)
        self.accelerator.wait_for_everyone()
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
            "peers": {name: {"model": pc.model, "kwargs": pc.kwargs} for name, pc in zip(self.peer_names, self.recipe.peers)},
            "dataset": {"name": self.info.name, "num_classes": self.info.num_classes, "in_chans": self.info.in_chans},
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
        }

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
