"""The Trainer: builds a run from its recipe and runs the fit loop (stages -> epochs -> batches).

Reading order: ``Trainer.__init__`` builds everything that can fail on bad input
(:mod:`.build`) and checks the run folder (:mod:`.state`) before anything is written;
:meth:`Trainer.fit` is the loop, its phases labelled; :meth:`Trainer.train_step` is one
batch (:mod:`.step`); lifecycle hooks (:mod:`.hooks`) do the logging, the progress bar and
the checkpoint cadence. The trainer owns its state: :meth:`Trainer.state_dict` and
:meth:`Trainer.load_state_dict` assemble it from :mod:`.snapshot`'s pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
from pathlib import Path
import time
from typing import Any

from accelerate import Accelerator
import torch
from torch import Tensor, nn

from mutualkd import checkpoint as ckpt
from mutualkd.config import Recipe
from mutualkd.engine.build import Unit, build_run, strategy_warning
from mutualkd.engine.ema import EmaPeers
from mutualkd.engine.evaluate import evaluate_split
from mutualkd.engine.hooks import Callback, CallbackList, Checkpointing, ConsoleLog, MetricsLog, progress_callback
from mutualkd.engine import snapshot
from mutualkd.engine.launcher import refuse_unsupported, resolve_compile, resolve_precision, single_process_note
from mutualkd.engine.precision import Precision
from mutualkd.engine.process import (
    broadcast_from_main, configure_determinism, has_gpu, make_accelerator, on_main, reduce_max,
)
from mutualkd.engine.signals import RunInterrupted, StopRequest
from mutualkd.engine.state import EpochClock, EpochTotals, History, Position, RunFolder, resume_folder
from mutualkd.engine.step import BatchStep, StagePlan, StepResult, plan_stage
from mutualkd.engine.threads import resolve_threads, threads_applied
from mutualkd.engine.tracking import TrackerLog, check_trackers
from mutualkd.data.protocol import Loader
from mutualkd.errors import CheckpointError
from mutualkd.runlock import ensure_not_busy
from mutualkd._logging import get_logger, shows_info
from mutualkd.runlog import MetricsWriter, atomic_write_text, dump_toml
from mutualkd.strategy import Stage

__all__ = ["Trainer", "RunInterrupted"]

log = get_logger(__name__)


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
        run = recipe.run
        cpu = run.device == "cpu" or not has_gpu()
        # --- what accelerate launch asked for, decided once: sharded training is refused, the
        # precision is the recipe's or else the launcher's, compilation happens once (launcher.py)
        refuse_unsupported()
        #: The run's mixed precision and where it came from (recipe, accelerate launch, accelerate config, default).
        self.precision_choice = resolve_precision(run.mixed_precision, recipe_file=recipe_file, cpu=cpu)
        self.compile_choice = resolve_compile(run.compile)
        # The recipe records the precision used, so a resume (its recipe.toml) trains the same way.
        recipe = recipe.model_copy(update={"run": run.model_copy(update={"mixed_precision": self.precision_choice.mode})})
        run = recipe.run
        self.recipe = recipe
        self.recipe_file = recipe_file
        # Trackers (run.log_with) are Accelerate's; a missing package exits before anything starts.
        check_trackers(run.log_with, file=recipe_file)
        folder_path = resume_folder(resume) if resume is not None else Path(run.out_dir) / run.name
        self.accelerator = accelerator or make_accelerator(run, folder_path, cpu=cpu)
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
        if self.is_main:
            ensure_not_busy(folder_path)  # a run folder another process writes: refused before building anything
        self.precision = Precision(self.precision_choice.mode, self.device)
        notes = [self.precision_choice.note, single_process_note(acc.num_processes)]
        for note in filter(None, notes if self.is_main else ()):
            log.info("note: %s", note)
        configure_determinism(run)
        #: torch's CPU threads per process and who chose them (recipe, environment, default): set
        #: while the run builds and while it fits, the caller's count back after each (threads.py).
        self.threads = resolve_threads(run.threads)

        # --- everything that can fail on bad input, before anything is written
        with threads_applied(self.threads):
            built = build_run(recipe, acc, recipe_file=recipe_file, compile_with=self.compile_choice)
        self.strategy = built.strategy
        self.info = built.info
        self.train_loader: Loader = built.train_loader
        self.test_loader: Loader = built.test_loader
        #: The validation split held out of train (data.val_fraction), None without one.
        self.val_loader: Loader | None = built.data.val
        self.data = built.data  # the pipeline: its kind, why it was chosen, the batch mixing
        self._lr_note = built.lr_note
        self.peer_names = built.peer_names
        #: Network (one per [[peers]] table, and each temporal mean) -> its peers.
        self.networks: dict[str, list[str]] = built.networks
        #: The outputs whose mean top-1 chooses the best epoch and best/ (run.best_output, or the strategy's).
        self.best_keys: list[str] = built.best_keys
        self.units: dict[str, Unit] = built.units
        self.stages: list[Stage] = built.stages
        self.stage_epochs: list[int] = built.stage_epochs
        self._slots = built.slots
        self._plans: list[StagePlan] = [plan_stage(s, self.units) for s in self.stages]
        self._batch = BatchStep(self.strategy, self._slots, self.units, built.networks, self.precision,
                                reduce_max=reduce_max if acc.num_processes > 1 else None, means=built.means,
                                views=built.views, warn=strategy_warning,
                                on_terms=lambda step, ctx, terms: self.callbacks.on_before_backward(self, step, ctx, terms),
                                broadcast=broadcast_from_main if acc.num_processes > 1 else None)
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
        self._totals = EpochTotals()  # the epoch's loss terms and strategy scalars (ctx.log), summed
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
            # The progress (a bar on a terminal, else plain lines) follows the log: quieting
            # the mutualkd logger hides it too.
            own += [progress_callback(run.progress_every_s), ConsoleLog()] if shows_info() else [ConsoleLog()]
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
            with self._stop.installed(), threads_applied(self.threads):
                self.callbacks.on_fit_start(self)
                self._run_stages()
            summary = snapshot.run_summary(self)
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
                log.info("note: %s", note)
        acc.wait_for_everyone()
        if state is not None:
            snapshot.repair_best(self)

    def _run_line(self) -> str:
        """What the run prints first: its processes, device and CPU threads, its precision and compilation, and who chose them."""
        n, choice = self.accelerator.num_processes, self.precision_choice
        line = f"run: {n} process{'es' if n > 1 else ''} on {self.device.type}"
        line += f"{' (DDP)' if n > 1 else ''}; mixed precision {choice.mode} (from {choice.source})"
        line += f"; compiled (from {self.compile_choice.source})" if self.compile_choice else ""
        return line + f"; {self.threads.describe()}"

    def _data_line(self) -> str:
        """What the run prints at start: the pipeline and why, the global batch, the split choosing best."""
        d = self.recipe.data
        line = f"data: {self.data.describe(d.batch_size, self.accelerator.num_processes, d.num_workers)}"
        line += f"; best epoch chosen on the {'validation' if self.val_loader is not None else 'test'} split"
        return line + (f"; linear lr scaling: {self._lr_note}" if self._lr_note else "")

    def _run_stages(self) -> None:
        pos, run, loader = self.position, self.recipe.run, self.train_loader
        world = self.accelerator.num_processes
        if self.is_main:
            log.info("%s", self._run_line())
            log.info("%s", self._data_line())
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
                    self.clock.images += y.shape[0] * world
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
            "loss": self._totals.loss(),
            "lr": self.learning_rates(),
            "images_per_s": clock.images / max(train_time, 1e-9),
            "train_seconds": train_time,
            "data_wait_share": clock.data_wait / max(train_time, 1e-9),
        }
        if self._totals.scalars:  # what the strategy logged (ctx.log), averaged over the batches that logged it
            record["scalars"] = self._totals.scalar_means()
        skipped = self.train_loader.skipped
        if self.recipe.data.skip_corrupt and skipped is not None:  # unreadable images left out, all processes
            n = torch.tensor([float(skipped)], device=self.device)
            if self.accelerator.num_processes > 1:
                n = self.accelerator.reduce(n, reduction="sum")
            record["skipped_images"] = int(n.item())
            self.train_loader.skipped = 0
        if stage.evaluate:
            record["top1"] = self.evaluate()
            record["top5"] = self.last_eval["top5"]
            self.history.add(pos.epoch + 1, record["top1"], self.best_keys)
            if self.val_history is not None:
                val = self.evaluate_split(self.val_loader)
                record["val_top1"], record["val_top5"] = val["top1"], val["top5"]
                self.last_eval.update(val_top1=val["top1"], val_top5=val["top5"])
                self.val_history.add(pos.epoch + 1, val["top1"], self.best_keys)
                # the validation split chooses the best epoch (best/ and the summary follow it)
                self.history.best_score = self.val_history.best_score
                self.history.best_epoch = self.val_history.best_epoch
        self._totals.reset()
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
        self._totals.add(result.terms, result.scalars)
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
        """Peer networks (recipe order), then the strategy's modules (registration order), then temporal means."""
        return list(self._slots)

    @property
    def temporal_means(self) -> dict[str, tuple[str, Any]]:
        """Each temporal-mean module (``<network>_ema``): the network it averages and the strategy's request."""
        nets = self._batch.nets
        return {name: (nets.source[name], nets.means[name]) for name in nets.means}

    @property
    def network_peers(self) -> dict[str, list[str]]:
        """Every network, temporal means included, -> its peers (``<peer>_ema`` for a temporal mean's)."""
        return {name: list(peers) for name, peers in self._batch.nets.peers.items()}

    @property
    def network_names(self) -> list[str]:
        """One per ``[[peers]]`` table (a whole network, or a branched one), in recipe order."""
        return self.recipe.network_names()

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

    def evaluate_split(self, loader: Loader) -> dict[str, dict[str, float]]:
        """``{"top1": ..., "top5": ...}`` (%) of each peer, the ensemble, the strategy's temporal means and
        declared outputs, and :attr:`eval_models` on ``loader``."""
        extra = self.eval_models

        def forward(x: Tensor) -> tuple[dict[str, Tensor], list[str]]:
            logits, peers = self._batch.eval_outputs(x)
            logits.update({name: m(x)[1] for name, m in extra.items()})
            return logits, peers

        modules = [s.inner for s in self._slots.values()] + list(extra.values())
        return evaluate_split(forward, modules, loader, self.accelerator, self.precision)

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs; :meth:`load_state_dict` puts it back. Collective with several
        processes (it gathers their RNG states): every process calls it."""
        batch = self._batch
        return {
            **snapshot.module_state(self._slots, batch.nets.peers, self.units.values()),
            "scaler": self.precision.state_dict(),
            "strategy": self.strategy.state_dict(),
            "position": vars(self.position).copy(),
            "history": vars(self.history).copy(),
            "val_history": vars(self.val_history).copy() if self.val_history is not None else None,
            "data": self.train_loader.state_dict(),
            **self._totals.state_dict(),  # the epoch's running sums, so a mid-epoch resume logs the same record
            "versions": dict(batch.versions),  # the forward cache's
            "mean_updates": dict(batch.mean_updates),
            "rng": snapshot.rng_states(self.accelerator),
            "metrics_offset": self.writer.offset() if self.is_main else 0,
            "metrics_log": self.writer.snapshot(),  # metrics.jsonl up to here, compressed (main process)
            "last_eval": self.last_eval,  # summary.json's top-5 after a resume with no evaluation left
            "callbacks": snapshot.callback_state(self.callbacks.callbacks),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict`); a state of other models is a :class:`CheckpointError`."""
        batch, where = self._batch, str(self.resumed_from)
        snapshot.load_module_state(self._slots, batch.nets.peers, self.units.values(), state, where=where)
        snapshot.load_callback_state(self.callbacks.callbacks, state.get("callbacks", {}), where=where)
        self.precision.load_state_dict(state.get("scaler"))
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.position = Position(**state["position"])
        self.history = History(**state["history"])
        if self.val_history is not None and state.get("val_history"):
            self.val_history = History(**state["val_history"])
        self.train_loader.load_state_dict(state.get("data") or {})
        self._totals.load_state_dict(state)
        self.last_eval = dict(state.get("last_eval", {}))
        versions = state.get("versions", {})
        if isinstance(versions, list):  # checkpoints of earlier releases: one per peer, in recipe order
            versions = dict(zip(self.peer_names, versions))
        for name, v in versions.items():
            if name in batch.versions:
                batch.versions[name] = int(v)
        for name, v in state.get("mean_updates", {}).items():
            batch.mean_updates[name] = int(v)
        snapshot.set_rng_states(state["rng"], self.accelerator.process_index)

    def save_checkpoint(self, kind: str) -> Path:
        """Write a ``"step"`` checkpoint (pruning old ones) or ``best/``; every process must call it."""
        dest = self.folder.step_checkpoint(self.position.global_step) if kind == "step" else self.folder.best_checkpoint()
        state = self.state_dict()  # collective (RNG states of every process): all call it

        def write() -> None:
            self.writer.sync()  # what the checkpoint's metrics offset points at is on disk first
            ckpt.save_checkpoint(dest, state, snapshot.checkpoint_meta(self, kind))
            if kind == "step":
                ckpt.prune_checkpoints(self.folder.checkpoints, self.recipe.run.keep_checkpoints,
                                       upto=self.position.global_step)

        # A full disk: every process stops with the same message; with several, this is also the
        # barrier after the write.
        on_main(self.accelerator, write, error=CheckpointError)
        if kind == "step":
            self._last_saved_step = self.position.global_step
        self.callbacks.on_checkpoint(self, dest, kind)
        return dest
