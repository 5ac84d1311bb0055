"""What the CIFAR ResNet and Wide ResNet share: the classifier head, the weight
initialisation, and the parts of timm's model API that only depend on those."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import checkpoint_seq
from torch import nn

__all__ = ["CifarNet"]


class CifarNet(nn.Module):
    """Base of the CIFAR families: three stages ``layer1..3``, a pooled linear head.

    Subclasses build ``layer1``, ``layer2``, ``layer3``, set ``num_features``,
    ``head_drop_rate`` and ``grad_checkpointing``, then call :meth:`_make_head` and
    :meth:`_init_weights`.
    """

    num_features: int
    head_drop_rate: float
    grad_checkpointing: bool

    def _make_head(self, num_classes: int, global_pool: str, **dd: Any) -> tuple[nn.Module, nn.Module]:
        if not global_pool:
            raise ValueError(f"{type(self).__name__} needs a global pool type (e.g. 'avg'); '' is not supported")
        pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        in_features = self.num_features * pool.feat_mult()
        fc: nn.Module = nn.Linear(in_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if isinstance(fc, nn.Linear):
            nn.init.zeros_(fc.bias)
        return pool, fc

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _stages(self, x: torch.Tensor) -> torch.Tensor:
        """The three stages, with activation checkpointing when it is switched on."""
        stages = [self.layer1, self.layer2, self.layer3]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stages, x, flatten=True)
        for stage in stages:
            x = stage(x)
        return x

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes == 0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes."""
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        dd = get_device_dtype(self)
        self.global_pool, self.fc = self._make_head(num_classes, pool_type, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, flatten, dropout and classify; ``pre_logits`` stops before the classifier."""
        x = self.global_pool(x)
        if self.head_drop_rate:
            x = nn.functional.dropout(x, p=float(self.head_drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
