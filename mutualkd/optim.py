"""Optimizers and learning-rate schedules built from recipe sections.

Two optimizer names are mutualkd's own and keep their exact meaning: ``sgd`` is torch's
SGD with the recipe's ``momentum`` and ``nesterov``, ``adamw`` torch's AdamW with its
``betas``. Every other name is looked up in ``timm.optim`` and built by
``timm.optim.create_optimizer_v2`` (LAMB, LARS, Lion, ADOPT, ...). Careful: timm's own
``sgd`` is Nesterov SGD; in a recipe it is called ``nesterov`` (or ``momentum`` without
Nesterov), since ``sgd`` means mutualkd's.

Parameter groups are the same for both: with ``no_decay_1d`` biases, normalisation
parameters and every parameter a module lists in its ``no_weight_decay()`` (timm models:
a ViT's position embeddings and class token) get no weight decay; with ``layer_decay``
each layer group of a timm model (its ``group_matcher``) gets the lr times
``layer_decay ** (depth from the head)``.

Schedules are mutualkd's own, not timm's schedulers: a ``LambdaLR`` is a pure function of
the step count, so a resumed run gets exactly the lr it would have had (its state is one
integer), and it is stepped once per update of its unit, which a strategy with stages
needs. Schedules are expressed in epochs (milestones, warmup, cosine length) but stepped
once per optimizer step, so warmup and cosine are smooth within an epoch while multistep
drops happen exactly at the epoch boundaries the recipe names.
"""

from __future__ import annotations

from collections.abc import Iterable
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mutualkd.config import OptimizerConfig, SchedulerConfig
from mutualkd.errors import RecipeError, unknown_name_hint

__all__ = ["OWN_OPTIMIZERS", "known_optimizers", "check_optimizer", "param_groups", "build_optimizer",
           "build_scheduler", "lr_factor"]

#: The names that are mutualkd's own (torch's SGD and AdamW), whatever timm calls so.
OWN_OPTIMIZERS = ("sgd", "adamw")


def known_optimizers() -> list[str]:
    """Every optimizer name a recipe may use: mutualkd's own, then timm's."""
    import timm.optim

    return list(OWN_OPTIMIZERS) + [n for n in timm.optim.list_optimizers() if n not in OWN_OPTIMIZERS]


def _timm_name(name: str) -> str:
    """The name timm looks up (``lookahead_<name>`` wraps ``<name>``)."""
    return name.lower().split("_")[-1]


def check_optimizer(cfg: OptimizerConfig, *, file: str = "<recipe>", field: str = "optimizer") -> None:
    """A RecipeError with the close matches unless ``cfg.name`` is an optimizer mutualkd or timm knows."""
    if cfg.name in OWN_OPTIMIZERS:
        if cfg.args:
            raise RecipeError(
                f"optimizer '{cfg.name}' takes no args (they are for timm optimizers)", file=file, field=f"{field}.args",
                hint="remove args, or name a timm optimizer (e.g. nesterov for timm's SGD)",
            )
        return
    known = known_optimizers()
    if _timm_name(cfg.name) not in known or cfg.name.lower() != cfg.name:
        raise RecipeError(
            f"unknown optimizer '{cfg.name}'", file=file, field=f"{field}.name",
            hint=unknown_name_hint("optimizer", cfg.name, known) + "; sgd and adamw are torch's, the rest timm.optim's",
        )
    # The optimizer is built once on one parameter, so that args it does not take (or values it
    # refuses) are reported here, naming the field, before any run folder is made.
    try:
        build_optimizer(nn.Linear(1, 1), cfg)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        what = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        bad = f"{field}.args" if cfg.args else field
        raise RecipeError(
            f"optimizer '{cfg.name}' refuses these settings: {type(e).__name__}: {what}", file=file, field=bad,
            hint=f"remove or rename what it does not take (args: {sorted(cfg.args or {})}); its keyword arguments"
            f" are those of timm.optim's {cfg.name} class",
        ) from None


# --------------------------------------------------------------------------- parameter groups


def _no_weight_decay(module: nn.Module) -> set[str]:
    """Full names of the parameters that every submodule's ``no_weight_decay()`` exempts."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        fn = getattr(sub, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _timm_model(module: nn.Module) -> nn.Module:
    """The timm model inside a peer (:class:`mutualkd.peers.PeerModule` keeps it as ``.model``)."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "group_matcher") else module


Trainable = nn.Module | Iterable[nn.Module] | Iterable[nn.Parameter]


def param_groups(modules: Trainable, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """The parameter groups of a unit's ``modules``: weight decay and, with ``layer_decay``, lr scales.

    ``modules`` may also be plain parameters; then no module names a ``no_weight_decay()``
    and there are no layers to decay.
    """
    items = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not all(isinstance(m, nn.Module) for m in items):
        if cfg.layer_decay is not None:
            raise ValueError("layer_decay needs the modules, not their parameters")
        return _decay_groups(((str(i), p) for i, p in enumerate(items)), cfg, set())  # type: ignore[misc]
    modules = items  # type: ignore[assignment]
    if cfg.layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        groups: list[dict[str, Any]] = []
        for m in modules:
            model = _timm_model(m)
            if not hasattr(model, "group_matcher"):
                # no layer structure known (e.g. a strategy's auxiliary module): one group at the head's lr
                groups += _decay_groups(m.named_parameters(), cfg, _no_weight_decay(m))
                continue
            groups += param_groups_layer_decay(
                model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                no_weight_decay_list=_no_weight_decay(model) if cfg.no_decay_1d else (),
                weight_decay_exclude_1d=cfg.no_decay_1d,
            )
        for g in groups:
            g["lr"] = cfg.lr * g.get("lr_scale", 1.0)
        return groups
    named = [(f"{i}.{n}", p) for i, m in enumerate(modules) for n, p in m.named_parameters()]
    skip = {f"{i}.{n}" for i, m in enumerate(modules) for n in _no_weight_decay(m)}
    return _decay_groups(named, cfg, skip)


def _decay_groups(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig, skip: set[str]
                  ) -> list[dict[str, Any]]:
    # The papers decay every parameter; no_decay_1d exempts biases and normalisation
    # parameters (1-D tensors) and what the model names in no_weight_decay(), as many
    # modern recipes do. Without it there is one group: the parameters in module order.
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        exempt = cfg.no_decay_1d and (p.ndim <= 1 or name in skip)
        (no_decay if exempt else decay).append(p)
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# --------------------------------------------------------------------------- optimizers


def build_optimizer(modules: Trainable, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The unit's optimizer over the parameters of ``modules`` (call :func:`check_optimizer` first)."""
    groups = param_groups(modules, cfg)
    extra: dict[str, Any] = {"eps": cfg.eps} if cfg.eps is not None else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **extra)
    from timm.optim import create_optimizer_v2

    # Groups are passed as built above (each with its own weight decay), so timm's own
    # grouping by filter_bias_and_bn is not applied a second time.
    return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, betas=cfg.betas, **extra, **(cfg.args or {}))


# --------------------------------------------------------------------------- schedules


def lr_factor(cfg: SchedulerConfig, epoch: float, total_epochs: int, base_lr: float) -> float:
    """Multiplier of the base lr at (fractional) ``epoch`` of ``total_epochs``."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        warm = (epoch + 1e-12) / cfg.warmup_epochs
    else:
        warm = 1.0
    if cfg.name == "constant":
        factor = 1.0
    elif cfg.name == "multistep":
        factor = cfg.gamma ** sum(1 for m in cfg.milestones if math.floor(epoch + 1e-9) >= m)
    else:  # cosine, after warmup
        span = max(total_epochs - cfg.warmup_epochs, 1e-9)
        t = min(max(epoch - cfg.warmup_epochs, 0.0) / span, 1.0)
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return warm * factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, *, total_epochs: int, steps_per_epoch: int
) -> LambdaLR:
    """A LambdaLR following ``cfg`` over ``total_epochs`` epochs, stepped after every optimizer step.

    ``cfg.interval = "step"``: the factor moves at every step (fractional epochs), so
    warmup and cosine are smooth within an epoch. ``"epoch"``: it moves once per epoch,
    at the epoch's start, and warmup rises by ``1 / (warmup_epochs + 1)`` per epoch.
    The factor multiplies every group's own lr (layer-wise scaled ones too); cosine's
    ``min_lr`` is relative to the optimizer's base lr, the recipe's ``lr``.
    """
    base_lr = float(optimizer.defaults.get("lr", optimizer.param_groups[0]["lr"]))
    spe = max(steps_per_epoch, 1)
    if cfg.interval == "epoch":
        def per_epoch(step: int) -> float:
            epoch = step // spe
            warm = min(1.0, (epoch + 1) / (cfg.warmup_epochs + 1)) if cfg.warmup_epochs else 1.0
            after = cfg.model_copy(update={"warmup_epochs": 0}) if cfg.warmup_epochs else cfg
            shifted = max(epoch - cfg.warmup_epochs, 0) if cfg.name == "cosine" else epoch
            return warm * lr_factor(after, float(shifted), max(total_epochs - cfg.warmup_epochs, 1)
                                    if cfg.name == "cosine" else total_epochs, base_lr)

        return LambdaLR(optimizer, per_epoch)
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, step / spe, total_epochs, base_lr))
