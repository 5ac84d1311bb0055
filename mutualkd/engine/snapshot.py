"""The trainer's state in and out: what a checkpoint holds, its metadata, the run's summary.

:func:`capture` and :func:`restore` are the two halves of an exact resume: modules,
optimizers, schedulers, the loss scaler, the strategy, the position and histories, the
data order, the epoch's running sums, the forward cache's versions, every process's RNG
streams, the offset into metrics.jsonl, and the state of stateful callbacks (EMA, trackers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import random
from typing import TYPE_CHECKING, Any

from accelerate.utils import broadcast_object_list, gather_object
import numpy as np
import torch

from mutualkd import checkpoint as ckpt
from mutualkd.engine.hooks import Callback
from mutualkd.engine.state import History, Position
from mutualkd.errors import CheckpointError, UserError
from mutualkd.peers import PeerModule
from mutualkd._logging import get_logger

if TYPE_CHECKING:
    from mutualkd.engine.trainer import Trainer

__all__ = ["capture", "restore", "repair_best", "stateful_callbacks", "checkpoint_meta", "run_summary"]

log = get_logger(__name__)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def stateful_callbacks(callbacks: Iterable[Callback]) -> dict[str, Any]:
    """Callbacks whose state is saved in checkpoints (those with ``state_dict`` and
    ``load_state_dict``), under their ``state_key`` (default: the class name)."""
    out: dict[str, Any] = {}
    for cb in callbacks:
        if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None)):
            key = str(getattr(cb, "state_key", type(cb).__name__))
            if key in out:
                raise UserError(f"two callbacks save their state under '{key}'", hint="give one of them another state_key")
            out[key] = cb
    return out


def _bare(module: torch.nn.Module) -> torch.nn.Module:
    """What a checkpoint saves of a peer network: a whole peer's timm model without its PeerModule
    wrapper (input norm, feature hook); a branched network as it is."""
    return module.model if isinstance(module, PeerModule) else module


def capture(tr: Trainer) -> dict[str, Any]:
    """Everything a resume needs. Collective with several processes (it gathers RNG states)."""
    slots, nets = tr._slots, tr._batch.nets.peers
    modules = {k: (_bare(s.inner) if k in nets else s.inner).state_dict() for k, s in slots.items()}
    rng = _rng_state()
    units = tr.units.values()
    return {
        "modules": modules,
        "optimizers": {u.name: u.optimizer.state_dict() for u in units},  # type: ignore[union-attr]
        "schedulers": {u.name: u.scheduler.state_dict() for u in units},
        "scaler": tr.precision.state_dict(),
        "strategy": tr.strategy.state_dict(),
        "position": vars(tr.position).copy(),
        "history": vars(tr.history).copy(),
        "val_history": vars(tr.val_history).copy() if tr.val_history is not None else None,
        "data": tr.train_loader.state_dict() if hasattr(tr.train_loader, "state_dict") else {},
        "epoch_acc": {k: float(v) for k, v in tr._epoch_sums.items()},
        "epoch_count": tr._epoch_count,
        "epoch_scalars": {k: [float(v), int(n)] for k, (v, n) in tr._scalar_sums.items()},
        "versions": dict(tr._batch.versions),
        "mean_updates": dict(tr._batch.mean_updates),
        "rng": gather_object([rng]) if tr.accelerator.num_processes > 1 else [rng],
        "metrics_offset": tr.writer.offset() if tr.is_main else 0,
        "metrics_log": tr.writer.snapshot(),  # metrics.jsonl up to here, compressed (main process)
        "last_eval": tr.last_eval,  # summary.json's top-5 after a resume with no evaluation left
        "callbacks": {key: cb.state_dict() for key, cb in stateful_callbacks(tr.callbacks.callbacks).items()},
    }


def restore(tr: Trainer, state: Mapping[str, Any]) -> None:
    """Put ``state`` (from :func:`capture`) back into ``tr``; a state of other models is a :class:`CheckpointError`."""
    slots, nets = tr._slots, tr._batch.nets.peers
    try:
        for k, s in slots.items():
            (_bare(s.inner) if k in nets else s.inner).load_state_dict(state["modules"][k])
        for u in tr.units.values():
            u.optimizer.load_state_dict(state["optimizers"][u.name])  # type: ignore[union-attr]
            u.scheduler.load_state_dict(state["schedulers"][u.name])
        saved = state.get("callbacks", {})
        for key, cb in stateful_callbacks(tr.callbacks.callbacks).items():
            if key in saved:  # a callback added on resume (e.g. a tracker) starts afresh
                cb.load_state_dict(saved[key])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint does not match the recipe's models: {e}", where=str(tr.resumed_from),
                              hint="resume with the recipe the run was started with") from None
    tr.precision.load_state_dict(state.get("scaler"))
    tr.strategy.load_state_dict(state.get("strategy", {}))
    tr.position = Position(**state["position"])
    tr.history = History(**state["history"])
    if tr.val_history is not None and state.get("val_history"):
        tr.val_history = History(**state["val_history"])
    if hasattr(tr.train_loader, "load_state_dict"):
        tr.train_loader.load_state_dict(state.get("data") or {})
    tr._epoch_sums = dict(state.get("epoch_acc", {}))
    tr._epoch_count = int(state.get("epoch_count", 0))
    tr._scalar_sums = {k: [float(v), int(n)] for k, (v, n) in state.get("epoch_scalars", {}).items()}
    tr.last_eval = dict(state.get("last_eval", {}))
    versions = state.get("versions", {})
    if isinstance(versions, list):  # checkpoints of earlier releases: one per peer, in recipe order
        versions = dict(zip(tr.peer_names, versions))
    for name, v in versions.items():
        if name in tr._batch.versions:
            tr._batch.versions[name] = int(v)
    for name, v in state.get("mean_updates", {}).items():
        tr._batch.mean_updates[name] = int(v)
    rngs, i = state["rng"], tr.accelerator.process_index
    _set_rng_state(rngs[i] if i < len(rngs) else rngs[0])


def repair_best(tr: Trainer) -> None:
    """After a resume: a kill between a best epoch's step checkpoint and its best/ left best/ behind; write it now.

    Right after that epoch's end the resumed state is the one best/ was to hold. From
    elsewhere it cannot be rebuilt; best/ is then rewritten at the next best epoch.
    """
    pos, best_epoch = tr.position, tr.history.best_epoch
    stale = tr.folder.best_is_stale(best_epoch) if tr.is_main else None
    if tr.accelerator.num_processes > 1:
        stale = broadcast_object_list([stale], from_process=0)[0]
    if stale is None:
        return
    if pos.epoch == best_epoch and pos.batch == 0:
        if tr.is_main:
            log.info("note: %s; rewritten from the checkpoint of that epoch", stale)
        tr.save_checkpoint("best")
    elif tr.is_main:
        log.info("note: %s; it cannot be rebuilt from this checkpoint and is rewritten at the next best epoch", stale)


def checkpoint_meta(tr: Trainer, kind: str) -> dict[str, Any]:
    """meta.json of a checkpoint: where in training it is, what made it, what the peers expect as input."""
    info = tr.info
    return {
        "kind": kind,
        "global_step": tr.position.global_step,
        "epoch": tr.position.epoch,
        "stage": tr.current_stage.name,
        "recipe_hash": tr.folder.recipe_hash,
        "versions": ckpt.versions(),
        # a peer's own input normalisation (mean, std) when its weights expect another than the data set's
        "peers": _peer_meta(tr),
        # what `mutualkd export` writes into a timm config.json: the input size and normalisation
        "dataset": {"name": info.name, "num_classes": info.num_classes, "in_chans": info.in_chans,
                    "image_size": list(info.image_size), "mean": list(info.mean), "std": list(info.std)},
        "strategy": tr.recipe.strategy.name,
        "num_processes": tr.accelerator.num_processes,
    }


def _outputs(tr: Trainer) -> dict[str, list[str]]:
    """What was evaluated, by kind: the peers, the strategy's temporal means and declared outputs, EMA peers."""
    nets = tr._batch.nets
    return {
        "peers": list(tr.peer_names),
        "temporal_means": [p for m in nets.means for p in nets.peers[m]],
        "declared": list(tr.strategy.outputs()),
        "ema": list(tr.eval_models),
    }


def _peer_meta(tr: Trainer) -> dict[str, Any]:
    """meta.json's peers: architecture and kwargs, where a branch's weights are (``network``, ``branch``),
    the module holding its temporal mean (``mean_module``), its own input normalisation."""
    out: dict[str, Any] = {}
    recipe, means = tr.recipe, tr._batch.nets.source
    names = recipe.network_names()
    for peer, i, k in recipe.peer_tables():
        pc, net = recipe.peers[i], names[i]
        spec: dict[str, Any] = {"model": pc.model, "kwargs": pc.kwargs, **tr.unwrapped(net).norm_meta()}  # type: ignore[operator]
        if k is not None:
            spec.update(network=net, branch=k)
        mean = next((m for m, src in means.items() if src == net), None)
        if mean is not None:
            spec["mean_module"] = mean
        out[peer] = spec
    return out


def run_summary(tr: Trainer) -> dict[str, Any]:
    """summary.json: final and best top-1 per network, the best epoch and the split that chose it."""
    # Every epoch number here is global, as metrics.jsonl, the console and the report number it.
    top1 = {}
    for name, values in tr.history.top1.items():
        best = max(values)
        top1[name] = {"final": values[-1], "best": best, "best_epoch": tr.history.epochs_of(name)[values.index(best)]}
    out: dict[str, Any] = {
        "name": tr.recipe.run.name,
        "strategy": tr.recipe.strategy.name,
        "peers": {n: tr.recipe.peers[i].model for n, i, _ in tr.recipe.peer_tables()},
        "epochs": tr.position.epoch,
        "global_steps": tr.position.global_step,
        "top1": top1,
        # the epoch whose state checkpoints/best holds (best mean top-1 of best_output)
        "best_epoch": tr.history.best_epoch if tr.history.best_epoch > 0 else None,
        "best_chosen_by": "validation" if tr.val_history is not None else "test",
        "best_output": tr.best_keys[0] if len(tr.best_keys) == 1 else "peers",
        "outputs": _outputs(tr),
        "num_processes": tr.accelerator.num_processes,
        "mixed_precision": tr.precision_choice.mode,
        "threads": tr.threads.count,  # per process; results depend on it (engine/threads.py)
    }
    if len(tr.stages) > 1:  # where each stage's epochs lie on the global count
        out["stages"], first = [], 1
        for stage, n in zip(tr.stages, tr.stage_epochs):
            out["stages"].append({"name": stage.name, "first_epoch": first, "last_epoch": first + n - 1,
                                  "evaluated": bool(stage.evaluate)})
            first += n
    if "top5" in tr.last_eval:
        out["top5"] = {name: {"final": v} for name, v in tr.last_eval["top5"].items()}
    # The test top-1 at the chosen epoch: with a validation split, the number to report.
    if tr.history.best_epoch > 0:
        out["top1_at_best_epoch"] = tr.history.at_epoch(tr.history.best_epoch)
    if tr.val_history is not None and tr.val_history.top1:
        out["val_top1"] = {name: {"final": v[-1], "best": max(v)} for name, v in tr.val_history.top1.items()}
    return out
