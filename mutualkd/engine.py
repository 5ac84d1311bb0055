"""The engine: runs a strategy's schedule of steps over N peers with one Accelerator.

Reading order: :class:`Trainer.__init__` resolves everything that can fail on bad input
(strategy, data, models, run folder) before anything is written; :meth:`Trainer.fit` is
the training loop, stage by stage, epoch by epoch, batch by batch, step by step;
:class:`_Batch` is the per-batch forward cache that makes schedules faithful without
wasted passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
from dataclasses import dataclass, field
import os
from pathlib import Path
import random
import signal
import time
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
import numpy as np
from pydantic import ValidationError
import torch
from torch import Tensor, nn

from mutualkd import checkpoint as ckpt
from mutualkd._registry import get_strategy, registry
from mutualkd.config import Recipe, format_validation_error
from mutualkd.data import BatchLoader, DatasetInfo, load_dataset
from mutualkd.errors import (
    CheckpointError,
    DataError,
    NonFiniteLossError,
    RecipeError,
    UserError,
    close_matches,
    in_file,
)
from mutualkd.optim import build_optimizer, build_scheduler
from mutualkd.peers import PeerModule, create_peer, probe_feature_shape
from mutualkd.runlog import MetricsWriter, atomic_write_text, console, dump_toml, summary_table
from mutualkd.strategy import PeerInfo, PeerOutput, SetupContext, Stage, Step, StepContext, Strategy

__all__ = ["Trainer", "RunInterrupted", "resolve_strategy"]


class RunInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the current step finished and a checkpoint was written."""

    def __init__(self, signum: int, run_dir: Path | None) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.run_dir = run_dir
        self.exit_code = 128 + signum


@dataclass
class _Unit:
    """Parameters updated together by one optimizer (a peer and what is attached to it)."""

    name: str
    modules: list[str]
    optimizer: Any = None  # as prepared by Accelerate (state dicts, learning rates)
    scheduler: Any = None
    peer: int | None = None  # index of the peer whose backbone is in this unit
    step_optimizer: Any = None  # what the training step calls zero_grad/step on (see Trainer._direct_steps)


@dataclass
class _Position:
    stage: int = 0
    stage_epoch: int = 0  # epoch within the stage
    batch: int = 0  # next batch of that epoch
    epoch: int = 0  # global epoch counter (data order)
    global_step: int = 0


@dataclass
class _History:
    top1: dict[str, list[float]] = field(default_factory=dict)
    best_score: float = -1.0
    best_epoch: int = -1


class _Batch(StepContext):
    """Per-batch context: the forward cache and access to modules.

    A peer's output is cached with the peer's *version* (how many times its backbone
    was updated). It is reused while the version is unchanged, and recomputed after an
    update, so every step sees the networks as they are now. A forward pass records a
    graph only when the peer will still be updated later in this batch: then a later
    step can backpropagate through the cached output instead of running it again.
    """

    def __init__(self, trainer: Trainer, inputs: Tensor, labels: Tensor, stage: str, epoch: int, step: int) -> None:
        self.trainer = trainer
        self.inputs = inputs
        self.labels = labels
        self.stage = stage
        self.epoch = epoch
        self.global_step = step
        self.cache = {}
        self._outputs: dict[int, tuple[int, PeerOutput]] = {}
        self.grad_peers: set[int] = set()
        self.forward_passes = 0

    def output(self, peer: int) -> PeerOutput:
        t = self.trainer
        version = t.versions[peer]
        hit = self._outputs.get(peer)
        need_grad = peer in self.grad_peers
        if hit is not None and hit[0] == version and (hit[1].has_grad or not need_grad):
            return hit[1]
        with torch.set_grad_enabled(need_grad), t.autocast():
            feats, logits = t.peer_modules[peer](self.inputs)
        self.forward_passes += 1
        out = PeerOutput(feats, logits, need_grad)
        self._outputs[peer] = (version, out)
        return out

    def module(self, name: str) -> nn.Module:
        return self.trainer.aux[name]



def resolve_strategy(recipe: Recipe, recipe_file: str = "<recipe>") -> tuple[type[Strategy], Any]:
    """The recipe's strategy class and its validated parameters, or a RecipeError."""
    cls = get_strategy(recipe.strategy.name, where=f"{recipe_file} [strategy.name]")
    try:
        params = cls.Params.model_validate(recipe.strategy.params)
    except ValidationError as e:
        err = format_validation_error(e, recipe_file, prefix="strategy")
        unknown = [str(x["loc"][-1]) for x in e.errors() if x["type"] == "extra_forbidden"]
        if unknown:
            known = sorted(cls.Params.model_fields)
            err.hint = "; ".join(
                f"'{k}': " + (f"did you mean {' or '.join(repr(m) for m in close_matches(k, known))}?"
                              if close_matches(k, known) else "not a parameter of this strategy")
                for k in unknown
            ) + f"; parameters of '{recipe.strategy.name}': {', '.join(known)}"
        raise err from None
    n = len(recipe.peers)
    if n < cls.min_peers or (cls.max_peers is not None and n > cls.max_peers):
        if cls.max_peers is None:
            want = f"at least {cls.min_peers}"
        elif cls.min_peers == cls.max_peers:
            want = f"exactly {cls.min_peers}"
        else:
            want = f"{cls.min_peers} to {cls.max_peers}"
        raise RecipeError(
            f"strategy '{recipe.strategy.name}' needs {want} peer(s), the recipe has {n}",
            file=recipe_file,
            field="peers",
            hint="add or remove [[peers]] tables",
        )
    if recipe.schedule.mode not in cls.modes:
        raise RecipeError(
            f"strategy '{recipe.strategy.name}' does not support mode '{recipe.schedule.mode}'",
            file=recipe_file,
            field="schedule.mode",
            hint=f"use one of: {', '.join(cls.modes)}",
        )
    return cls, params


class Trainer:
    """Trains the peers of a recipe with its strategy. ``fit()`` runs it to the end."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        recipe_file: str = "<recipe>",
        resume: str | Path | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.recipe = recipe
        self.recipe_file = recipe_file
        run = recipe.run
        if run.mixed_precision == "fp16" and (run.device == "cpu" or not _has_gpu()):
            raise RecipeError(
                "mixed_precision = \"fp16\" needs a GPU (on a CPU Accelerate would silently train in fp32)",
                file=recipe_file,
                field="run.mixed_precision",
                hint='use "bf16" (CPU autocast) or "no" on this machine',
            )
        # Without a GPU, Accelerate only sets up gloo for several processes when told to
        # use the CPU; otherwise each process of torchrun would run alone.
        self.accelerator = accelerator or Accelerator(
            mixed_precision=run.mixed_precision,
            cpu=run.device == "cpu" or not _has_gpu(),
            step_scheduler_with_optimizer=False,
        )
        acc = self.accelerator
        self.device = acc.device
        # fp16 loss scaling is done by the engine, not by Accelerate's optimizer wrapper,
        # which would update the scale once per optimizer instead of once per iteration.
        self.scaler: torch.amp.GradScaler | None = None
        if getattr(acc, "scaler", None) is not None:
            self.scaler = torch.amp.GradScaler(self.device.type)
            acc.scaler = None
        self.is_main = acc.is_main_process
        self._configure_determinism()

        # --- strategy: looked up by name in the registry, parameters validated by its model
        registry.block(run.block_plugins or [], source="run.block_plugins (recipe)")
        cls, params = resolve_strategy(recipe, recipe_file)
        n = len(recipe.peers)
        self.peer_names = recipe.peer_names()
        self.strategy: Strategy = cls(params, peers=self.peer_names, mode=recipe.schedule.mode)

        # --- data (held on the training device, batches augmented there)
        try:
            train, test, info = load_dataset(recipe.data, seed=run.seed)
            self.info: DatasetInfo = info
            world, rank = acc.num_processes, acc.process_index
            common = dict(device=self.device, rank=rank, world_size=world, channels_last=run.channels_last)
            self.train_loader = BatchLoader(
                train, info, batch_size=recipe.data.batch_size, train=True, augment=recipe.data.augment,
                seed=run.seed, drop_last=recipe.data.drop_last, **common,
            )
            self.test_loader = BatchLoader(
                test, info, batch_size=recipe.data.eval_batch_size, train=False, augment=False, seed=run.seed, **common
            )
        except DataError as e:
            raise in_file(e, recipe_file) from None

        # --- peers: timm models, identical initialisation on every process
        set_seed(run.seed)
        self.peer_modules: list[nn.Module] = []
        infos: list[PeerInfo] = []
        feature_map = cls.needs_feature_maps
        for i, pc in enumerate(recipe.peers):
            model = create_peer(pc.model, num_classes=info.num_classes, in_chans=info.in_chans, kwargs=pc.kwargs,
                                file=recipe_file, field=f"peers[{i}]")
            module = PeerModule(model, pc.model, feature_map=feature_map).to(self.device)
            if run.channels_last:
                module = module.to(memory_format=torch.channels_last)
            shape = probe_feature_shape(module, info.in_chans, info.image_size, self.device)
            infos.append(PeerInfo(i, self.peer_names[i], pc.model, shape, model))
            self.peer_modules.append(module)

        # --- strategy set-up: auxiliary modules and the units they train with
        setup = SetupContext(peers=infos, recipe=recipe, dataset=info, device=self.device, recipe_file=recipe_file)
        self.strategy.setup(setup)
        self.aux: dict[str, nn.Module] = {}
        self.frozen: set[str] = set()
        self.aux_unit: dict[str, str] = {}
        self.units: dict[str, _Unit] = {name: _Unit(name, [name], peer=i) for i, name in enumerate(self.peer_names)}
        unit_cfg: dict[str, tuple[Any, Any]] = {
            name: (recipe.peer_optimizer(i), recipe.peer_scheduler(i)) for i, name in enumerate(self.peer_names)
        }
        for name, module, unit, opt_cfg, sched_cfg, trainable in setup._added:
            if name in self.aux or name in self.units:
                raise UserError(f"strategy '{recipe.strategy.name}' registers module '{name}' twice")
            module = module.to(self.device)
            self.aux[name] = module
            if not trainable:
                module.eval().requires_grad_(False)
                self.frozen.add(name)
                continue
            if unit not in self.units:
                self.units[unit] = _Unit(unit, [])
                unit_cfg[unit] = (opt_cfg or recipe.optimizer, sched_cfg or recipe.scheduler)
            self.units[unit].modules.append(name)
            self.aux_unit[name] = unit

        self.stages: list[Stage] = list(self.strategy.stages())
        self._check_stages()

        # --- optimizers and per-step schedules, one per unit
        spe = len(self.train_loader)
        for unit in self.units.values():
            params = [p for m in unit.modules for p in self._module(m).parameters()]
            opt_cfg, sched_cfg = unit_cfg[unit.name]
            unit.optimizer = build_optimizer(params, opt_cfg)
            epochs = sum(self._stage_epochs(s) for s in self.stages if any(unit.name in st.updates for st in s.steps))
            unit.scheduler = build_scheduler(unit.optimizer, sched_cfg, total_epochs=max(epochs, 1), steps_per_epoch=spe)

        # --- one Accelerator prepares every module and optimizer. Schedules are stepped
        # by the engine per update of their unit, so they are not handed to Accelerate
        # (which would step them once per process).
        trainable_aux = [k for k in self.aux if k not in self.frozen]
        objs = self.peer_modules + [self.aux[k] for k in trainable_aux] + [u.optimizer for u in self.units.values()]
        prepared = acc.prepare(*objs)
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        n_p, n_a = len(self.peer_modules), len(trainable_aux)
        self.peer_modules = prepared[:n_p]
        for k, m in zip(trainable_aux, prepared[n_p:n_p + n_a]):
            self.aux[k] = m
        # Accelerate's optimizer wrapper and backward() add nothing to a step here (no
        # gradient accumulation, no XLA or DeepSpeed, loss scaling done by the engine), yet
        # cost a package lookup per optimizer step, a signature inspection per zero_grad
        # and a division of the loss by 1: on small models a few percent of the step.
        # The training step then calls the optimizers and backward() directly.
        self._direct_steps = acc.gradient_accumulation_steps == 1 and acc.distributed_type not in (
            DistributedType.XLA, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        # Accelerate's autocast() re-reads its state and the environment on every call.
        self.autocast = acc.autocast if run.mixed_precision != "no" else contextlib.nullcontext
        for unit, opt in zip(self.units.values(), prepared[n_p + n_a:]):
            unit.optimizer = opt
            unit.step_optimizer = getattr(opt, "optimizer", opt) if self._direct_steps else opt
        if run.mixed_precision != "no":
            # The engine already runs every forward pass and loss under autocast; drop the
            # per-module wrapper that would cast every output back to fp32 (in place: any
            # DistributedDataParallel wrapper stays).
            for m in prepared[: n_p + n_a]:
                acc.unwrap_model(m, keep_fp32_wrapper=False)
        if run.compile:
            self.peer_modules = [torch.compile(m) for m in self.peer_modules]

        self.versions = [0] * n
        self.pos = _Position()
        self.history = _History()
        self.epoch_acc: dict[str, Any] = {}  # per-term sums over the epoch, kept on the device
        self.epoch_count = 0
        self.last_forward_passes = 0
        self._stop_signal: int | None = None

        # --- run folder: refuse to touch an existing run unless resuming it
        self.run_dir = Path(run.out_dir) / run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._resume_from: Path | None = None
        self._resolve_run_dir(resume)
        self.recipe_dict = recipe.to_dict()
        self.recipe_hash = ckpt.recipe_hash(self.recipe_dict)
        self._resume_state: dict[str, Any] | None = None
        if self._resume_from is not None:
            self._resume_state = ckpt.load_checkpoint(self._resume_from)
            meta = ckpt.read_meta(self._resume_from)
            saved_world = meta.get("num_processes", 1)
            if saved_world != acc.num_processes:
                raise CheckpointError(
                    f"the checkpoint was written by {saved_world} process(es), this run has {acc.num_processes};"
                    " the position in the data order is per process, so it cannot continue exactly",
                    where=str(self._resume_from),
                    hint=f"resume with the same number of processes ({saved_world})",
                )
            if meta.get("recipe_hash") != self.recipe_hash:
                raise CheckpointError(
                    "the recipe differs from the one this run was started with (recipe hash"
                    f" {meta.get('recipe_hash')} in the checkpoint, {self.recipe_hash} now)",
                    where=str(self._resume_from),
                    hint="resume with the run's own recipe (leave RECIPE out: mutualkd run --resume RUN_DIR), or start a new run",
                )

    # ------------------------------------------------------------------ set-up helpers
    def _module(self, name: str) -> nn.Module:
        if name in self.peer_names:
            return self.peer_modules[self.peer_names.index(name)]
        return self.aux[name]

    def _stage_epochs(self, stage: Stage) -> int:
        return stage.epochs if stage.epochs is not None else self.recipe.run.epochs

    def _check_stages(self) -> None:
        for stage in self.stages:
            for st in stage.steps:
                unknown = [u for u in st.updates if u not in self.units]
                if unknown:
                    raise UserError(
                        f"strategy '{self.recipe.strategy.name}' step '{st.name}' updates unknown units {unknown}",
                        hint="this is a bug in the strategy plugin",
                    )

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

    def _resolve_run_dir(self, resume: str | Path | None) -> None:
        run = self.recipe.run
        if resume is not None:
            rd = Path(resume)
            if not rd.is_dir():
                raise UserError("run folder to resume does not exist", where=str(rd), hint="name an existing run folder")
            self.run_dir, self.ckpt_dir = rd, rd / "checkpoints"
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            if latest is None:
                raise CheckpointError(
                    "no complete checkpoint to resume from (folders without the COMPLETE marker are ignored)",
                    where=str(self.ckpt_dir),
                    hint="start the run again under a new run.name",
                )
            self._resume_from = latest
            return
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            if run.resume == "auto" and latest is not None:
                self._resume_from = latest
                return
            raise UserError(
                "run folder already exists and holds a run; it is left untouched",
                where=str(self.run_dir),
                hint=f"resume it with `mutualkd run --resume {self.run_dir}`, or choose another name with --set run.name=...",
            )
        # Every process has looked at the folder above; only now may the main one create
        # it (otherwise a slower process would find it "already there").
        self.accelerator.wait_for_everyone()
        problem = None
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                problem = e.strerror or str(e)
        if self.accelerator.num_processes > 1:
            problem = broadcast_object_list([problem], from_process=0)[0]
        if problem is not None:
            raise UserError(
                f"cannot write the run folder: {problem}",
                where=str(self.run_dir),
                hint="set run.out_dir to a folder you can write to",
            )

    # ------------------------------------------------------------------ training loop
    def fit(self) -> dict[str, Any]:
        acc, run = self.accelerator, self.recipe.run
        writer = MetricsWriter(self.run_dir / "metrics.jsonl" if self.is_main else None)
        self.writer = writer
        if self._resume_state is not None:
            self._load_state(self._resume_state)
            writer.truncate(self._resume_state.get("metrics_offset", 0))
            if self.is_main:
                ckpt.remove_leftovers(self.ckpt_dir)
            if self.is_main and self.recipe.run.progress:
                console.print(f"[bold]resumed[/] {self.run_dir} at step {self.pos.global_step} (epoch {self.pos.epoch})")
        elif self.is_main:
            atomic_write_text(self.run_dir / "recipe.toml", dump_toml(self.recipe_dict))
        acc.wait_for_everyone()

        old_handlers = self._install_signal_handlers()
        progress = _progress(self.is_main and run.progress)
        try:
            with progress:
                self._loop(progress, writer)
        finally:
            self._restore_signal_handlers(old_handlers)
            writer.close()
        summary = self._summary()
        if self.is_main:
            atomic_write_text(self.run_dir / "summary.json", _json(summary))
            if run.progress:
                console.print(summary_table(summary))
        acc.wait_for_everyone()
        return summary

    def _loop(self, progress: Any, writer: MetricsWriter) -> None:
        run = self.recipe.run
        for si, stage in enumerate(self.stages):
            if si < self.pos.stage:
                continue
            epochs = self._stage_epochs(stage)
            steps, grad_from, updated_units = self._stage_plan(stage)
            while self.pos.stage_epoch < epochs:
                self._set_train_mode(updated_units)
                self.train_loader.set_epoch(self.pos.epoch)
                self.train_loader.start_batch = self.pos.batch
                task = progress.add_task(
                    f"{stage.name} epoch {self.pos.stage_epoch + 1}/{epochs}", total=len(self.train_loader),
                    completed=self.pos.batch, info="",
                )
                t0, images, batch = time.perf_counter(), 0, self.pos.batch
                data_wait = 0.0
                batches = iter(self.train_loader)
                while True:
                    t_wait = time.perf_counter()
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        break
                    data_wait += time.perf_counter() - t_wait
                    terms = self._train_batch(stage, steps, grad_from, x, y)
                    batch += 1
                    self.pos.batch = batch
                    self.pos.global_step += 1
                    images += x.shape[0] * self.accelerator.num_processes
                    if self.pos.global_step % run.log_every == 0 or batch == len(self.train_loader):
                        self._log_step(stage, terms, writer, images / max(time.perf_counter() - t0, 1e-9))
                        progress.update(task, info=_short(terms))
                    progress.update(task, completed=batch)
                    if run.checkpoint_every and self.pos.global_step % run.checkpoint_every == 0 and batch < len(self.train_loader):
                        self._save_step_checkpoint()
                    if self._stop_signal is not None:
                        self._save_step_checkpoint()
                        raise RunInterrupted(self._stop_signal, self.run_dir)
                    if run.max_steps is not None and self.pos.global_step >= run.max_steps:
                        break
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the epoch's time includes its queued GPU work
                train_time = time.perf_counter() - t0
                progress.remove_task(task)
                self._end_epoch(stage, writer, images / max(train_time, 1e-9), train_time, data_wait)
                if run.max_steps is not None and self.pos.global_step >= run.max_steps:
                    return
            self.pos.stage += 1
            self.pos.stage_epoch = 0

    def _stage_plan(self, stage: Stage) -> tuple[list[Step], list[set[int]], set[str]]:
        """A stage's steps; for each step, the peers it or a later step of the same batch
        updates (their forward passes keep a graph so the update can reuse them); and
        every unit the stage updates."""
        steps = list(stage.steps)
        peer_of = {u.name: u.peer for u in self.units.values() if u.peer is not None}
        grad_from = [{peer_of[u] for st in steps[k:] for u in st.updates if u in peer_of} for k in range(len(steps))]
        return steps, grad_from, {u for st in steps for u in st.updates}

    def _set_train_mode(self, updated_units: set[str]) -> None:
        # A module is in training mode only in the stages that update it: a frozen
        # teacher, or an autoencoder after its stage, keeps its BatchNorm statistics.
        for name, m in zip(self.peer_names, self.peer_modules):
            m.train(name in updated_units)
        for name, m in self.aux.items():
            m.train(self.aux_unit.get(name) in updated_units)

    def _train_batch(
        self, stage: Stage, steps: Sequence[Step], grad_from: Sequence[set[int]], x: Tensor, y: Tensor
    ) -> dict[str, dict[str, float | Tensor]]:
        acc = self.accelerator
        ctx = _Batch(self, x, y, stage.name, self.pos.epoch, self.pos.global_step)
        logged: dict[str, dict[str, Tensor]] = {}
        scaled: set[str] = set()  # units stepped through the scaler since its last update
        for k, step in enumerate(steps):
            ctx.grad_peers = grad_from[k]
            with self.autocast():
                terms = self.strategy.compute(step, ctx)
            flat = {f"{peer}/{name}": v for peer, group in terms.items() for name, v in group.items()}
            if not flat:
                raise UserError(f"strategy step '{step.name}' returned no loss term", hint="this is a bug in the strategy plugin")
            loss = torch.stack([v.float() for v in flat.values()]).sum()
            units = [self.units[u] for u in step.updates]
            if self.scaler is not None and scaled & set(step.updates):
                # GradScaler allows one step per optimizer between updates; a schedule that
                # updates a unit twice in a batch (IE-DML, N > 2) gets an update in between.
                self.scaler.update()
                scaled.clear()
            for u in units:
                u.step_optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            elif self._direct_steps:
                loss.backward()
            else:
                acc.backward(loss)
            for u in units:
                if self.scaler is not None:
                    self.scaler.step(u.step_optimizer)  # unscales, skips the step on inf/NaN grads
                    scaled.add(u.name)
                else:
                    u.step_optimizer.step()
                u.scheduler.step()
                if u.peer is not None:
                    # This peer changed: its cached output is stale for later steps.
                    self.versions[u.peer] += 1
            logged[step.name] = {key: v.detach() for key, v in flat.items()}
        # One host sync per batch: the finiteness check (all-reduced so that every process
        # stops at the same batch), before anything of this batch is logged or saved.
        self._check_finite(logged, stage)
        for terms in logged.values():
            for key, v in terms.items():
                self.epoch_acc[key] = self.epoch_acc.get(key, 0.0) + v.float()
        if self.scaler is not None:
            # One scale update per iteration, after every optimizer of the batch stepped
            # (PyTorch's recipe for several optimizers sharing one scaler).
            self.scaler.update()
        self.epoch_count += 1
        self.last_forward_passes = ctx.forward_passes
        return logged

    def _check_finite(self, logged: Mapping[str, Mapping[str, Tensor]], stage: Stage) -> None:
        values = torch.stack([v.float().reshape(()) for terms in logged.values() for v in terms.values()])
        bad = (~torch.isfinite(values)).any().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad) == 0:
            return
        first = next(
            ((step, key) for step, terms in logged.items() for key, v in terms.items() if not torch.isfinite(v).all()),
            None,
        )
        what = f"loss term {first[1]} became non-finite in step '{first[0]}'" if first else (
            "a loss term became non-finite on another process")
        raise NonFiniteLossError(
            f"{what} of stage '{stage.name}', epoch {self.pos.epoch + 1}, global step {self.pos.global_step + 1};"
            " the last complete checkpoint is kept. Lower the learning rate or the loss weights."
        )

    def _log_step(self, stage: Stage, logged: Mapping[str, Mapping[str, Tensor]], writer: MetricsWriter, ips: float) -> None:
        rec = {
            "kind": "step",
            "stage": stage.name,
            "epoch": self.pos.epoch + 1,
            "global_step": self.pos.global_step,
            "batch": self.pos.batch,
            "steps": {name: {k: float(v) for k, v in terms.items()} for name, terms in logged.items()},
            "lr": {u.name: u.optimizer.param_groups[0]["lr"] for u in self.units.values()},
            "images_per_s": ips,
            "forward_passes": self.last_forward_passes,
        }
        writer.write(rec)

    def _end_epoch(self, stage: Stage, writer: MetricsWriter, ips: float, train_time: float, data_wait: float) -> None:
        rec: dict[str, Any] = {
            "kind": "epoch",
            "stage": stage.name,
            "epoch": self.pos.epoch + 1,
            "global_step": self.pos.global_step,
            "loss": {k: float(v) / max(self.epoch_count, 1) for k, v in self.epoch_acc.items()},
            "lr": {u.name: u.optimizer.param_groups[0]["lr"] for u in self.units.values()},
            "images_per_s": ips,
            "train_seconds": train_time,
            "data_wait_share": data_wait / max(train_time, 1e-9),
        }
        if stage.evaluate:
            top1 = self.evaluate()
            rec["top1"] = top1
            for k, v in top1.items():
                self.history.top1.setdefault(k, []).append(v)
            score = sum(top1[n] for n in self.peer_names) / len(self.peer_names)
            is_best = score > self.history.best_score
            if is_best:
                self.history.best_score, self.history.best_epoch = score, self.pos.epoch + 1
        else:
            is_best = False
        writer.write(rec)
        if self.is_main and self.recipe.run.progress:
            acc_text = "  ".join(f"{k} {v:.2f}%" for k, v in rec.get("top1", {}).items())
            loss_text = "  ".join(f"{k} {v:.3f}" for k, v in rec["loss"].items())
            console.print(f"[bold]{stage.name} epoch {self.pos.epoch + 1}[/]  {loss_text}  {acc_text}".rstrip(), highlight=False)
        self.epoch_acc, self.epoch_count = {}, 0
        self.pos.epoch += 1
        self.pos.stage_epoch += 1
        self.pos.batch = 0
        self._save_step_checkpoint()
        if is_best:
            self._save_checkpoint(self.ckpt_dir / "best", kind="best")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 (%) of each peer and of the ensemble (mean of softmax) on the whole test split.

        Each process evaluates its own disjoint share; the counts are summed, so every
        test sample is counted exactly once. Unwrapped models are used: evaluation must
        not run DDP's collective buffer broadcasts, since shares can differ in size.
        """
        acc = self.accelerator
        models = [acc.unwrap_model(m) for m in self.peer_modules]
        if acc.num_processes > 1:
            # Each process updated its own BatchNorm running statistics since DDP's last
            # buffer broadcast; evaluate everywhere with the main process's (the saved ones).
            for m in models:
                for buf in m.buffers():
                    torch.distributed.broadcast(buf, src=0)
        states = [m.training for m in models]
        for m in models:
            m.eval()
        n = len(models)
        correct = torch.zeros(n + 1, dtype=torch.float64, device=self.device)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for x, y in self.test_loader:
            with acc.autocast():
                logits = [m(x)[1].float() for m in models]
            for i, z in enumerate(logits):
                correct[i] += (z.argmax(1) == y).sum()
            probs = torch.stack([z.softmax(1) for z in logits]).mean(0)
            correct[n] += (probs.argmax(1) == y).sum()
            total += y.numel()
        if acc.num_processes > 1:
            correct = acc.reduce(correct, reduction="sum")
            total = acc.reduce(total, reduction="sum")
        for m, s in zip(models, states):
            m.train(s)
        pct = (100.0 * correct / total.clamp(min=1)).tolist()
        out = {name: pct[i] for i, name in enumerate(self.peer_names)}
        if n > 1:
            out["ensemble"] = pct[n]
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        modules = {name: acc.unwrap_model(self.peer_modules[i]).model.state_dict() for i, name in enumerate(self.peer_names)}
        modules.update({k: acc.unwrap_model(m).state_dict() for k, m in self.aux.items()})
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        rngs = gather_object([rng]) if acc.num_processes > 1 else [rng]
        return {
            "modules": modules,
            "optimizers": {u.name: u.optimizer.state_dict() for u in self.units.values()},
            "schedulers": {u.name: u.scheduler.state_dict() for u in self.units.values()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "strategy": self.strategy.state_dict(),
            "position": vars(self.pos).copy(),
            "history": vars(self.history).copy(),
            "epoch_acc": {k: float(v) for k, v in self.epoch_acc.items()},
            "epoch_count": self.epoch_count,
            "versions": list(self.versions),
            "rng": rngs,
            "metrics_offset": self.writer.offset() if self.is_main else 0,
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        acc = self.accelerator
        try:
            for i, name in enumerate(self.peer_names):
                acc.unwrap_model(self.peer_modules[i]).model.load_state_dict(state["modules"][name])
            for k, m in self.aux.items():
                acc.unwrap_model(m).load_state_dict(state["modules"][k])
            for u in self.units.values():
                u.optimizer.load_state_dict(state["optimizers"][u.name])
                u.scheduler.load_state_dict(state["schedulers"][u.name])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint does not match the recipe's models: {e}", where=str(self._resume_from),
                                  hint="resume with the recipe the run was started with") from None
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.pos = _Position(**state["position"])
        self.history = _History(**state["history"])
        self.epoch_acc = dict(state.get("epoch_acc", {}))
        self.epoch_count = int(state.get("epoch_count", 0))
        rngs = state["rng"]
        rng = rngs[acc.process_index] if acc.process_index < len(rngs) else rngs[0]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "global_step": self.pos.global_step,
            "epoch": self.pos.epoch,
            "stage": self.stages[min(self.pos.stage, len(self.stages) - 1)].name,
            "recipe_hash": self.recipe_hash,
            "versions": ckpt.versions(),
            "peers": {name: {"model": pc.model, "kwargs": pc.kwargs} for name, pc in zip(self.peer_names, self.recipe.peers)},
            "dataset": {"name": self.info.name, "num_classes": self.info.num_classes, "in_chans": self.info.in_chans},
            "strategy": self.recipe.strategy.name,
            "num_processes": self.accelerator.num_processes,
        }

    def _save_checkpoint(self, dest: Path, kind: str) -> None:
        state = self.state_dict()  # collective (RNG states of every process): all call it
        if self.is_main:
            ckpt.save_checkpoint(dest, state, self._meta(kind))
        self.accelerator.wait_for_everyone()

    def _save_step_checkpoint(self) -> None:
        self._save_checkpoint(self.ckpt_dir / f"step-{self.pos.global_step:08d}", kind="step")
        if self.is_main:
            ckpt.prune_checkpoints(self.ckpt_dir, self.recipe.run.keep_checkpoints)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        old: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        with contextlib.suppress(ValueError):  # not in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old: Mapping[int, Any]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    def _summary(self) -> dict[str, Any]:
        top1 = {}
        for name, values in self.history.top1.items():
            best = max(values)
            top1[name] = {"final": values[-1], "best": best, "best_epoch": values.index(best) + 1}
        return {
            "name": self.recipe.run.name,
            "strategy": self.recipe.strategy.name,
            "peers": {n: pc.model for n, pc in zip(self.peer_names, self.recipe.peers)},
            "epochs": self.pos.epoch,
            "global_steps": self.pos.global_step,
            "top1": top1,
        }


def _has_gpu() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str) + "\n"


def _short(logged: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for terms in logged.values():
        for k, v in terms.items():
            parts.append(f"{k} {float(v):.3f}")
    return "  ".join(parts[:6])


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=True,
    )
