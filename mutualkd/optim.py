"""Optimizers and learning-rate schedules built from recipe sections.

Schedules are expressed in epochs (milestones, warmup, cosine length) but stepped once
per optimizer step, so warmup and cosine are smooth within an epoch while multistep
drops happen exactly at the epoch boundaries the recipe names.
"""

from __future__ import annotations

from collections.abc import Iterable
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mutualkd.config import OptimizerConfig, SchedulerConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def _param_groups(params: Iterable[nn.Parameter], weight_decay: float, skip_1d: bool) -> list[dict]:
    # The papers decay every parameter; skip_1d exempts biases and normalisation
    # parameters (1-D tensors), as many modern recipes do.
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        (no_decay if skip_1d and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = _param_groups(params, cfg.weight_decay, cfg.no_decay_1d)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


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
    """A per-step LambdaLR following ``cfg`` over ``total_epochs`` epochs."""
    base_lr = optimizer.param_groups[0]["lr"]
    spe = max(steps_per_epoch, 1)
    return LambdaLR(optimizer, lambda step: lr_factor(cfg, step / spe, total_epochs, base_lr))
