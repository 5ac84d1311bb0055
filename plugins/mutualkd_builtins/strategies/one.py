"""``one``: On-the-fly Native Ensemble (Lan, Zhu and Gong, *Knowledge Distillation by On-the-Fly
Native Ensemble*, NeurIPS 2018).

Reference code: github.com/Lan1991Xu/ONE_NeurIPS2018 @54afde3. One network split into a shared
trunk and m branches; a gate on the trunk's output weights the branches' logits into an ensemble,
which is trained with cross-entropy and distilled back into every branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, RecipeError, SetupContext, Step, StepContext, Strategy
from mutualkd_builtins.losses import kd_div
from mutualkd_builtins.strategies._ramped import RampedKDParams

KD_EPS = 1e-7  # added to the target probabilities, not renormalised (the authors' KLLoss)


class OneGate(nn.Module):
    """ONE's gate: branch weights ``g`` from the trunk's feature map.

    ``[B, C, H, W] -> global average pool -> Linear(C, K) -> BatchNorm1d(K) -> ReLU -> softmax``,
    giving ``g`` ``[B, K]`` (rows sum to 1), returned in float32.
    """

    def __init__(self, channels: int, branches: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, trunk_map: Tensor) -> Tensor:
        pooled = trunk_map.mean(dim=(2, 3))
        return F.softmax(F.relu(self.bn(self.fc(pooled))).float(), dim=1)


def gated_ensemble(branch_logits: Sequence[Tensor], gate: Tensor) -> Tensor:
    """The gated ensemble ``z_e = sum_i g_i * z_i``.

    ``branch_logits``: K tensors ``[B, classes]``; ``gate``: ``[B, K]``. Returns ``[B, classes]``
    in float32. Nothing is detached: gradients reach the gate and every branch.
    """
    if gate.shape[1] != len(branch_logits):
        raise ValueError(f"gated_ensemble: the gate has {gate.shape[1]} weights for {len(branch_logits)} branches")
    return torch.einsum("bk,kbc->bc", gate.float(), torch.stack([z.float() for z in branch_logits]))


def one_terms(
    branch_logits: Sequence[Tensor], gate: Tensor, labels: Tensor, *, temperature: float = 3.0, weight: float,
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """ONE's loss terms ``L = sum_i CE(z_i) + CE(z_e) + w * sum_i KD_T^eps(z_i, sg(z_e))``.

    ``branch_logits``: K tensors ``[B, classes]``; ``gate``: ``[B, K]`` (:class:`OneGate`);
    ``labels``: ``[B]`` class indices (or ``[B, classes]`` probabilities); ``weight``: the caller's
    ramp value ``w = ramp(e; L)`` (paper: L = 80); ``temperature``: T = 3 in the paper.

    Returns ``(branches, ensemble)``: per branch ``{"ce": CE(z_i), "kd": w * KD_T^eps(z_i, sg(z_e))}``
    and ``{"ce": CE(z_e)}`` for the ensemble. ``z_e`` is detached inside the ``kd`` terms only, so
    the gate learns through ``CE(z_e)`` alone, and each branch also receives ``CE(z_e)``'s gradient
    scaled by its ``g_i``.
    """
    ensemble = gated_ensemble(branch_logits, gate)
    target = ensemble.detach()
    branches = [
        {
            "ce": F.cross_entropy(z.float(), labels),
            "kd": weight * kd_div(z, target, temperature, eps=KD_EPS),
        }
        for z in branch_logits
    ]
    return branches, {"ce": F.cross_entropy(ensemble, labels)}


# --------------------------------------------------------------------------- the strategy


class ONEParams(RampedKDParams):
    """ONE has no parameters of its own: the temperature and the ramp."""


class ONE(Strategy[ONEParams]):
    """ONE: branches of one network distil a gated ensemble of themselves (Lan et al., NeurIPS 2018).

    One ``[[peers]]`` table with ``branches`` (authors: 3) and ``split_after`` (authors:
    ``layer2``). A gate on the trunk's map weights the branches' logits into ``z_e``;
    ``L = sum_i CE(z_i) + CE(z_e) + ramp(e; L) * sum_i KD_3^eps(z_i, sg(z_e))``, one optimizer
    for the network and the gate. The gated ensemble is evaluated as the declared output
    ``gated``; the authors report branch 1 (the first branch), which chooses ``best/``.
    """

    min_peers = 2
    topologies = ("branched",)

    def setup(self, ctx: SetupContext) -> None:
        self.net = one_network(self, ctx)
        first = ctx.peers[0]
        assert first.trunk_shape is not None
        ctx.add_module("gate", OneGate(first.trunk_shape[0], len(self.networks[self.net])), unit=self.net)

    def steps(self) -> Sequence[Step]:
        return [Step("all", (self.net,))]  # the gate trains with the network (one optimizer, as the authors)

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        outs = [ctx.output(name) for name in self.peers]
        gate = ctx.module("gate")(outs[0].trunk)
        weight = p.kd_weight(ctx.epoch)
        branches, ensemble = one_terms([o.logits for o in outs], gate, ctx.labels, temperature=p.temperature,
                                       weight=weight)
        return {**dict(zip(self.peers, branches)), "gated": ensemble}

    def outputs(self) -> Sequence[str]:
        return ("gated",)

    def compute_outputs(self, ctx: StepContext) -> Mapping[str, Tensor]:
        outs = [ctx.output(name) for name in self.peers]
        return {"gated": gated_ensemble([o.logits for o in outs], ctx.module("gate")(outs[0].trunk))}

    def reported_output(self) -> str | None:
        return self.peers[0]


def one_network(strategy: Strategy[Any], ctx: SetupContext) -> str:
    """The run's single branched network, or a RecipeError saying what the method needs."""
    name = type(strategy).__name__
    if len(strategy.networks) != 1 or ctx.peers[0].branch is None:
        raise RecipeError(
            f"{name} trains the branches of one network; this recipe has {len(strategy.networks)} [[peers]] tables",
            file=ctx.recipe_file, field="peers",
            hint="use one [[peers]] table with branches (e.g. 3) and split_after (e.g. \"layer2\")",
        )
    return next(iter(strategy.networks))
