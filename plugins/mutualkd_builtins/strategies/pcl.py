"""``pcl``: Peer Collaborative Learning (Wu and Gong, *Peer Collaborative Learning for Online
Knowledge Distillation*, AAAI 2021).

Reference re-implementation: github.com/shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-
Distillation @6afb473. One network split into a shared trunk and K branches, each branch fed its
own view of the images. A linear head on the branches' concatenated features forms the peer
ensemble teacher; a temporal mean (EMA) of the whole branched network supplies the peer mean
teachers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

from pydantic import Field
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.strategy import (
    EMA_SUFFIX, LossTerms, PeerOutput, SetupContext, Step, StepContext, Strategy, TemporalMean,
)
from mutualkd_builtins.losses import kd_div
from mutualkd_builtins.strategies._ramped import RampedKDParams
from mutualkd_builtins.strategies.one import one_network


class PeerEnsembleHead(nn.Module):
    """PCL's peer-ensemble teacher: ``z_en = Linear(K * d, classes)(concat_i f_i)``.

    ``features``: K pooled branch features ``[B, d]``, concatenated in branch order; returns
    ``z_en`` ``[B, classes]``.
    """

    def __init__(self, dim: int, branches: int, num_classes: int) -> None:
        super().__init__()
        self.branches = branches
        self.fc = nn.Linear(branches * dim, num_classes)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != self.branches:
            raise ValueError(f"PeerEnsembleHead: built for {self.branches} branches, got {len(features)} features")
        return self.fc(torch.cat(list(features), dim=1))


def pcl_decay(step: int, cap: float = 0.999) -> float:
    """The temporal mean's decay after optimizer step ``t``: ``a_t = min(1 - 1/(t + 1), cap)``.

    The mean is updated as ``theta~ <- a_t theta~ + (1 - a_t) theta`` after every step; ``a_0 = 0``
    (the mean starts as a copy), ``a_1 = 0.5``, ..., up to ``cap`` (0.999, reached at t = 999).
    """
    if step < 0:
        raise ValueError(f"pcl_decay: the step count must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), cap)


def pcl_terms(
    branch_logits: Sequence[Tensor], ensemble_logits: Tensor, mean_logits: Sequence[Tensor], labels: Tensor, *,
    temperature: float = 3.0, weight: float,
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """PCL's loss terms.

    ``L = CE(z_en) + sum_i [CE(z_i) + w KD_T(z_i, sg z_en) + w mean_{j != i} KD_T(z_i, sg z~_j)]``.

    ``branch_logits``: K >= 2 tensors ``[B, classes]``; ``ensemble_logits``: ``z_en`` ``[B, classes]``
    (:class:`PeerEnsembleHead`); ``mean_logits``: the temporal-mean network's K branch logits
    ``z~_j``, in the same order; ``labels``: ``[B]`` class indices (or ``[B, classes]``
    probabilities); ``weight``: the caller's ramp value ``w = ramp(e; L)`` (paper: L = 80); T = 3.

    Returns ``(branches, ensemble)``: per branch ``{"ce": CE(z_i), "kd_ensemble": w KD_T(z_i, sg z_en),
    "kd_mean": w mean_{j != i} KD_T(z_i, sg z~_j)}`` and ``{"ce": CE(z_en)}``. ``z_en`` and every
    ``z~_j`` are detached inside the distillation terms; ``CE(z_en)`` trains the head and, through
    the features, the branches and the trunk.
    """
    if len(branch_logits) < 2 or len(mean_logits) != len(branch_logits):
        raise ValueError(
            f"pcl_terms needs K >= 2 branches and one temporal-mean logit per branch, got {len(branch_logits)}"
            f" branches and {len(mean_logits)} temporal-mean logits"
        )
    target = ensemble_logits.detach()
    branches = []
    for i, z in enumerate(branch_logits):
        kd_mean = torch.stack([kd_div(z, m.detach(), temperature) for j, m in enumerate(mean_logits) if j != i]).mean()
        branches.append({
            "ce": F.cross_entropy(z.float(), labels),
            "kd_ensemble": weight * kd_div(z, target, temperature),
            "kd_mean": weight * kd_mean,
        })
    return branches, {"ce": F.cross_entropy(ensemble_logits.float(), labels)}


# --------------------------------------------------------------------------- the strategy


class PCLParams(RampedKDParams):
    ema_cap: float = Field(
        0.999, gt=0.0, lt=1.0, description="the temporal mean's decay a_t = min(1 - 1/(t+1), ema_cap) (0.999)"
    )
    views: Literal["per_branch", "shared"] = Field(
        "per_branch", description="per_branch: each branch sees its own augmentation of the batch (the paper);"
        " shared: all see one"
    )


class PCL(Strategy[PCLParams]):
    """PCL: peer ensemble teacher and temporal-mean peers (Wu & Gong, AAAI 2021).

    One ``[[peers]]`` table with ``branches`` (paper: 3), each branch on its own view of the
    batch. A linear head over the concatenated pooled branch features gives the peer-ensemble
    teacher ``z_en``; an EMA (temporal mean) of the whole network, ``a_t = min(1 - 1/(t+1),
    0.999)``, gives the peer mean teachers ``z~_j``. ``L = CE(z_en) + sum_i [CE(z_i) +
    w KD_3(z_i, sg z_en) + w mean_{j != i} KD_3(z_i, sg z~_j)]``, ``w = ramp(e; L)``. The
    temporal-mean branches are evaluated as ``<branch>_ema``, the ensemble head as
    ``peer_ensemble``; the paper reports the temporal mean of branch 1, which chooses ``best/``.
    """

    min_peers = 2
    topologies = ("branched",)

    def setup(self, ctx: SetupContext) -> None:
        self.net = one_network(self, ctx)
        dim = ctx.peers[0].feature_shape[0]
        head = PeerEnsembleHead(dim, len(self.peers), ctx.dataset.num_classes)
        ctx.add_module("ensemble_head", head, unit=self.net)

    def steps(self) -> Sequence[Step]:
        return [Step("all", (self.net,))]

    def temporal_means(self) -> Sequence[TemporalMean]:
        cap = self.params.ema_cap
        return [TemporalMean(self.peers[0], decay=partial(pcl_decay, cap=cap))]

    def views(self) -> Mapping[str, int]:
        return {name: k for k, name in enumerate(self.peers)} if self.params.views == "per_branch" else {}

    def _ensemble(self, ctx: StepContext, outs: Sequence[PeerOutput]) -> Tensor:
        return ctx.module("ensemble_head")([o.features.mean(dim=(2, 3)) for o in outs])

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        outs = [ctx.output(name) for name in self.peers]
        means = [ctx.output(name + EMA_SUFFIX).logits for name in self.peers]  # the temporal mean: no graph
        branches, ensemble = pcl_terms([o.logits for o in outs], self._ensemble(ctx, outs), means, ctx.labels,
                                       temperature=p.temperature, weight=p.kd_weight(ctx.epoch))
        return {**dict(zip(self.peers, branches)), "peer_ensemble": ensemble}

    def outputs(self) -> Sequence[str]:
        return ("peer_ensemble",)

    def compute_outputs(self, ctx: StepContext) -> Mapping[str, Tensor]:
        return {"peer_ensemble": self._ensemble(ctx, [ctx.output(name) for name in self.peers])}

    def reported_output(self) -> str | None:
        return self.peers[0] + EMA_SUFFIX
