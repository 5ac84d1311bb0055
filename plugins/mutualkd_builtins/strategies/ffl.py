"""``ffl``: Feature Fusion Learning (Kim, Hyun, Chung and Kwak, *Feature Fusion for Online Mutual
Knowledge Distillation*, ICPR 2020).

Reference code: github.com/Jangho-Kim/FFL-pytorch @546d478. One network split into a shared trunk
and K branches (two in the paper); a fusion module turns the branches' un-pooled feature maps
into a fused classifier, which teaches the branches and learns from their mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd_builtins.losses import kd_div

KD_EPS = 1e-7  # added to the target probabilities, not renormalised (the authors' KLLoss)


class FusionModule(nn.Module):
    """FFL's fusion module on the branches' feature maps (``[B, C, H, W]`` each, the same shape).

    ``concat (K*C) -> depthwise 3x3 conv (groups K*C, padding 1, no bias) -> BN -> ReLU -> 1x1 conv
    (K*C -> C, no bias) -> BN -> ReLU -> global average pool -> Linear(C, classes)``: the fused
    logits ``z_f`` ``[B, classes]``. The convolutions are initialised as in the authors' code,
    ``normal(0, sqrt(2 / (k * k * out_channels)))``, the BN layers to weight 1, bias 0.
    """

    def __init__(self, channels: int, num_classes: int, branches: int = 2) -> None:
        super().__init__()
        width = branches * channels
        self.branches = branches
        self.depthwise = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.pointwise = nn.Conv2d(width, channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for conv in (self.depthwise, self.pointwise):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        if len(maps) != self.branches:
            raise ValueError(f"FusionModule: built for {self.branches} branches, got {len(maps)} feature maps")
        x = torch.cat(list(maps), dim=1)
        x = F.relu(self.bn1(self.depthwise(x)))
        x = F.relu(self.bn2(self.pointwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


def ffl_terms(
    branch_logits: Sequence[Tensor], fused_logits: Tensor, labels: Tensor, *, temperature: float = 3.0,
    weight: float,
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """FFL's loss terms.

    ``L = sum_i CE(z_i) + CE(z_f) + w [sum_i KD_T^eps(z_i, sg z_f) + KD_T^eps(z_f, sg(mean_i z_i))]``.

    ``branch_logits``: K tensors ``[B, classes]``; ``fused_logits``: ``z_f`` ``[B, classes]``
    (:class:`FusionModule`); ``labels``: ``[B]`` class indices (or ``[B, classes]`` probabilities);
    ``weight``: the caller's ramp value ``w = ramp(e; L)`` (paper: L = 80); T = 3.

    Returns ``(branches, fused)``: per branch ``{"ce": CE(z_i), "kd": w KD_T^eps(z_i, sg z_f)}`` and
    ``{"ce": CE(z_f), "kd": w KD_T^eps(z_f, sg(mean_i z_i))}``. Both targets are detached inside;
    ``CE(z_f)`` is not, so it also trains the branches and the trunk through the fusion module.
    """
    fused_target = fused_logits.detach()
    mean_target = torch.stack([z.float() for z in branch_logits]).mean(dim=0).detach()
    branches = [
        {
            "ce": F.cross_entropy(z.float(), labels),
            "kd": weight * kd_div(z, fused_target, temperature, eps=KD_EPS),
        }
        for z in branch_logits
    ]
    fused = {
        "ce": F.cross_entropy(fused_logits.float(), labels),
        "kd": weight * kd_div(fused_logits, mean_target, temperature, eps=KD_EPS),
    }
    return branches, fused
