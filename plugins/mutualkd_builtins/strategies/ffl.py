"""``ffl``: Feature Fusion Learning (Kim, Hyun, Chung and Kwak, *Feature Fusion for Online Mutual
Knowledge Distillation*, ICPR 2020).

Reference code: github.com/Jangho-Kim/FFL-pytorch @546d478. One network split into a shared trunk
and K branches (two in the paper); a fusion module turns the branches' un-pooled feature maps
into a fused classifier, which teaches the branches and learns from their mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, SetupContext, Step, StepContext, Strategy
from mutualkd_builtins.losses import kd_div
from mutualkd_builtins.strategies._ramped import RampedKDParams
from mutualkd_builtins.strategies.one import one_network

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


# --------------------------------------------------------------------------- the strategy


class FFLParams(RampedKDParams):
    fusion_weight_decay: float = Field(
        1e-5, ge=0.0, description="weight decay of the fusion module's optimizer (authors: 1e-5); its other settings"
        " are the recipe's [optimizer]"
    )


class FFL(Strategy[FFLParams]):
    """FFL: two branches and a fusion of their maps teach each other (Kim et al., ICPR 2020).

    One ``[[peers]]`` table with 2 ``branches`` split after ``layer2``. The fusion module
    (depthwise and pointwise convolutions over the concatenated un-pooled branch maps, then a
    classifier) has its own optimizer (weight decay 1e-5). ``L = CE(z_1) + CE(z_2) + CE(z_f) +
    ramp(e; L) [KD_3^eps(z_1, sg z_f) + KD_3^eps(z_2, sg z_f) + KD_3^eps(z_f, sg mean(z_1, z_2))]``;
    CE(z_f) also trains the branches and the trunk. The fused classifier is evaluated as the
    declared output ``fused``; the authors report branches and fusion alike, and the best epoch
    is chosen on the branches' mean top-1.
    """

    min_peers = 2
    topologies = ("branched",)

    def setup(self, ctx: SetupContext) -> None:
        self.net = one_network(self, ctx)
        channels = ctx.peers[0].feature_shape[0]
        fusion = FusionModule(channels, ctx.dataset.num_classes, branches=len(self.peers))
        optimizer = ctx.recipe.optimizer.model_copy(update={"weight_decay": self.params.fusion_weight_decay})
        ctx.add_module("fusion", fusion, unit="fusion", optimizer=optimizer)

    def steps(self) -> Sequence[Step]:
        return [Step("all", (self.net, "fusion"))]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        outs = [ctx.output(name) for name in self.peers]
        fused = ctx.module("fusion")([o.features for o in outs])
        branches, fused_terms = ffl_terms([o.logits for o in outs], fused, ctx.labels, temperature=p.temperature,
                                          weight=p.kd_weight(ctx.epoch))
        return {**dict(zip(self.peers, branches)), "fused": fused_terms}

    def outputs(self) -> Sequence[str]:
        return ("fused",)

    def compute_outputs(self, ctx: StepContext) -> Mapping[str, Tensor]:
        return {"fused": ctx.module("fusion")([ctx.output(name).features for name in self.peers])}
