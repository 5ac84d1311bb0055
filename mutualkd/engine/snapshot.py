"""The trainer's state in and out: the pieces a checkpoint holds, its metadata, the run's summary.

:meth:`Trainer.state_dict <mutualkd.engine.trainer.Trainer.state_dict>` and ``load_state_dict``
are the two halves of an exact resume; the trainer owns its state and assembles it from the
pieces here: the modules, optimizers and schedulers (:func:`module_state`), every process's
RNG streams (:func:`rng_states`), and the state of the callbacks that satisfy
:class:`~mutualkd.engine.hooks.StatefulCallback` (EMA, trackers; :func:`callback_state`).
Nothing here assigns the trainer's attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import random
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from accelerate.utils import gather_object
import numpy as np
import torch

from mutualkd import checkpoint as ckpt
from mutualkd.engine.hooks import StatefulCallback
from mutualkd.engine.process import on_main
from mutualkd.errors import CheckpointError, UserError
from mutualkd.peers import PeerModule
from mutualkd._logging import get_logger

if TYPE_CHECKING:
    from mutualkd.engine.build import Unit
    from mutualkd.engine.trainer import Trainer

__all__ = ["module_state", "load_module_state", "rng_states", "set_rng_states", "stateful_callbacks",
           "callback_state", "load_callback_state", "repair_best", "checkpoint_meta", "run_summary"]

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


def rng_states(acc: Accelerator) -> list[dict[str, Any]]:
    """Every process's RNG streams, by process index. Collective with several processes (a gather)."""
    rng = _rng_state()
    return gather_object([rng]) if acc.num_processes > 1 else [rng]


def set_rng_states(rngs: list[Mapping[str, Any]], process_index: int) -> None:
    """This process's RNG streams from :func:`rng_states` (process 0's when it was saved with fewer processes)."""
    _set_rng_state(rngs[process_index] if process_index < len(rngs) else rngs[0])


def stateful_callbacks(callbacks: Iterable[object]) -> dict[str, StatefulCallback]:
    """The callbacks whose state is saved in checkpoints (each a :class:`StatefulCallback`), by ``state_key``."""
    out: dict[str, StatefulCallback] = {}
    for cb in callbacks:
        if isinstance(cb, StatefulCallback):
            key = str(cb.state_key)
            if key in out:
                raise UserError(f"two callbacks save their state under '{key}'", hint="give one of them another state_key")
            out[key] = cb
    return out


def callback_state(callbacks: Iterable[object]) -> dict[str, Any]:
    """``state_key`` -> ``state_dict()`` of each stateful callback."""
    return {key: cb.state_dict() for key, cb in stateful_callbacks(callbacks).items()}


def load_callback_state(callbacks: Iterable[object], saved: Mapping[str, Any], *, where: str) -> None:
    """Give each stateful callback its saved state; one the checkpoint has none for (added on resume) starts afresh."""
    try:
        for key, cb in stateful_callbacks(callbacks).items():
            if key in saved:
                cb.load_state_dict(saved[key])
    except (KeyError, RuntimeError) as e:
        raise _mismatch(e, where) from None


def _bare(module: torch.nn.Module) -> torch.nn.Module:
    """What a checkpoint saves of a peer network: a whole peer's timm model without its PeerModule
    wrapper (input norm, feature hook); a branched network as it is."""
    return module.model if isinstance(module, PeerModule) else module


def _saved_modules(slots: Mapping[str, Any], networks: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    return {k: _bare(s.inner) if k in networks else s.inner for k, s in slots.items()}


def module_state(slots: Mapping[str, Any], networks: Mapping[str, Any], units: Iterable[Unit]) -> dict[str, Any]:
    """The weights of every slot (``networks``: the peer networks, saved without their wrappers), and
    each unit's optimizer and learning-rate schedule."""
    units = list(units)
    return {
        "modules": {k: m.state_dict() for k, m in _saved_modules(slots, networks).items()},
        "optimizers": {u.name: u.optimizer.state_dict() for u in units},  # type: ignore[union-attr]
        "schedulers": {u.name: u.scheduler.state_dict() for u in units},
    }


def load_module_state(slots: Mapping[str, Any], networks: Mapping[str, Any], units: Iterable[Unit],
                      state: Mapping[str, Any], *, where: str) -> None:
    """Put :func:`module_state`'s output back; a state of other models is a :class:`CheckpointError` at ``where``."""
    try:
        for k, m in _saved_modules(slots, networks).items():
            m.load_state_dict(state["modules"][k])
        for u in units:
            u.optimizer.load_state_dict(state["optimizers"][u.name])  # type: ignore[union-attr]
            u.scheduler.load_state_dict(state["schedulers"][u.name])
    except (KeyError, RuntimeError) as e:
        raise _mismatch(e, where) from None


def _mismatch(e: Exception, where: str) -> CheckpointError:
    return CheckpointError(f"checkpoint does not match the recipe's models: {e}", where=where,
                           hint="resume with the recipe the run was started with")


def repair_best(tr: Trainer) -> None:
    """After a resume: a kill between a best epoch's step checkpoint and its best/ left best/ behind; write it now.

    Right after that epoch's end the resumed state is the one best/ was to hold. From
    elsewhere it cannot be rebuilt; best/ is then rewritten at the next best epoch.
    """
    pos, best_epoch = tr.position, tr.history.best_epoch
    stale = on_main(tr.accelerator, lambda: tr.folder.best_is_stale(best_epoch))
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
    return {
        "peers": list(tr.peer_names),
        "temporal_means": [p for m in tr.temporal_means for p in tr.network_peers[m]],
        "declared": list(tr.strategy.outputs()),
        "ema": list(tr.eval_models),
    }


def _peer_meta(tr: Trainer) -> dict[str, Any]:
    """meta.json's peers: architecture and kwargs, where a branch's weights are (``network``, ``branch``),
    the module holding its temporal mean (``mean_module``), its own input normalisation."""
    out: dict[str, Any] = {}
    recipe, means = tr.recipe, {m: src for m, (src, _) in tr.temporal_means.items()}
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
