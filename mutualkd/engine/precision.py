"""Numeric precision of training, in one place: autocast, loss scaling, backward, step.

mutualkd owns these parts plainly instead of going through Accelerate's per-module and
per-optimizer wrappers. Two reasons, both measured on this engine's schedules:

* a batch of a mutual-learning schedule steps several optimizers, some of them twice
  (IE-DML with more than two peers). One ``GradScaler`` is shared by all of them and its
  scale is updated once per iteration, after every optimizer stepped (PyTorch's recipe
  for several optimizers); Accelerate's optimizer wrapper updates it after each
  optimizer step instead;
* the wrappers' per-step bookkeeping (a package lookup per step, a signature inspection
  per ``zero_grad``, a division of the loss by one, an output cast back to fp32 for every
  module) cost 1-2 ms per IE-DML batch on small models.

The Accelerator is still what sets up processes, devices and DistributedDataParallel. Which
precision a run uses (the recipe's, else ``accelerate launch``'s) is decided in :mod:`.launcher`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["Precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _clip(optimizer: torch.optim.Optimizer, value: float, mode: str) -> None:
    from timm.utils import dispatch_clip_grad

    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    dispatch_clip_grad(params, value, mode=mode)


class Precision:
    """Autocast for forward passes and losses; backward and optimizer steps with fp16 scaling.

    ``mode`` is ``"no"``, ``"bf16"`` or ``"fp16"`` (fp16 scales the loss with one
    ``GradScaler``; bf16 needs no scaling).
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device = device
        self.dtype = _DTYPES.get(mode)
        self.scaler: torch.amp.GradScaler | None = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        # Optimizers stepped through the scaler since its last update (see update()).
        self._stepped: set[str] = set()

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The context every forward pass and loss of the engine runs in."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def update(self, loss: Tensor, optimizers: Mapping[str, torch.optim.Optimizer],
               clip: Mapping[str, tuple[float, str]] | None = None) -> None:
        """One update of the named optimizers from ``loss``: zero_grad, backward, clip, step.

        ``clip`` maps an optimizer's name to ``(value, mode)``: its gradients are clipped
        (timm's ``dispatch_clip_grad``: ``norm``, ``value`` or ``agc``) after they are
        unscaled and before the step.
        """
        clip = clip or {}
        if self.scaler is not None and not self._stepped.isdisjoint(optimizers):
            # GradScaler allows one step per optimizer between its updates; a schedule that
            # steps an optimizer twice in a batch gets an update in between (before the
            # backward pass, which scales with the current scale).
            self.scaler.update()
            self._stepped.clear()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            for name, opt in optimizers.items():
                if name in clip:
                    _clip(opt, *clip[name])
                opt.step()
            return
        self.scaler.scale(loss).backward()
        for name, opt in optimizers.items():
            if name in clip:
                self.scaler.unscale_(opt)  # clip the true gradients; step() then does not unscale again
                _clip(opt, *clip[name])
            self.scaler.step(opt)  # unscales; skips the step when a gradient is inf/NaN
            self._stepped.add(name)

    def end_iteration(self) -> None:
        """Called once after the last update of a batch: the once-per-iteration scale update."""
        if self.scaler is not None:
            self.scaler.update()
            self._stepped.clear()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is not None and self.scaler is not None:
            self.scaler.load_state_dict(dict(state))
