"""``kl_dml``: Deep Mutual Learning (Zhang et al., CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from torch import Tensor
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, RecipeError, SetupContext, Step, StepContext, Strategy, StrategyParams
from mutualkd_builtins.losses import kl_to_peers


def kl_dml_terms(
    logits: Tensor, others: Sequence[Tensor], labels: Tensor, *, temperature: float, weight: float,
    reduction: Literal["mean", "sum"],
) -> dict[str, Tensor]:
    """One peer's DML terms: ``ce`` and ``kl`` = w * T^2 KL towards the other peers (detached inside)."""
    return {
        "ce": F.cross_entropy(logits.float(), labels),
        "kl": weight * kl_to_peers(logits, others, temperature, reduction),
    }


class KLDMLParams(StrategyParams):
    temperature: float = Field(1.0, ge=1e-2, le=1e3, allow_inf_nan=False,
                               description="softmax temperature T (paper: 1)")
    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="weight w of the KL term (paper: 1)")
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="average the KL over the N-1 other peers (paper) or sum them (authors' code)"
    )


class KLDML(Strategy[KLDMLParams]):
    """Deep Mutual Learning: CE plus the mean KL towards every other peer's predictions.

    Peer i minimises ``CE(y, z_i) + w * (1/(N-1)) * sum_{j != i} T^2 KL(p_j || p_i)``
    with the other peers' probabilities as constants.

    * ``alternating`` (the paper's and the authors' order): one step per peer; peer k
      sees the predictions of peers 0..k-1 *after* their update on this batch.
    * ``simultaneous``: one step; every peer is updated from the same detached targets.

    The branches of a network split into a shared trunk and K branches are peers too; they
    share one optimizer, so in ``alternating`` mode they are updated together, in the step of
    their network (with K branches and no other network, both modes are the same).

    Frozen peers (``frozen = true``, with weights from any source) are targets only: they
    get no step and their logits are computed once per batch. Two peers, one of them a
    frozen pretrained teacher, is classic teacher -> student knowledge distillation
    (Hinton et al., 2015) with ``temperature`` T and the KL weighted by ``weight``.
    """

    min_peers = 2
    accepts_frozen = True
    topologies = ("independent", "branched")

    def setup(self, ctx: SetupContext) -> None:
        for peer in ctx.peers:
            if peer.frozen and peer.head_reset:
                raise RecipeError(
                    f"peer '{peer.name}' is frozen with a new, untrained classifier (reset_head): its predictions,"
                    " the other peers' targets, would be random", file=ctx.recipe_file, field=f"peers[{peer.index}]",
                    hint="use weights trained on this data set's classes for a frozen kl_dml peer, or unfreeze it",
                )

    def steps(self) -> Sequence[Step]:
        units = [n for n, peers in self.networks.items() if any(p in self.trainable for p in peers)]
        if self.mode == "simultaneous":
            return [Step("all", tuple(units))]
        return [Step(name, (name,)) for name in units]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        # Other peers are targets: their current logits, detached inside kl_to_peers, so
        # this peer's loss sends no gradient into them.
        return {
            name: kl_dml_terms(ctx.output(name).logits, [ctx.output(o).logits for o in self.peers if o != name],
                               ctx.labels, temperature=p.temperature, weight=p.weight, reduction=p.reduction)
            for unit in step.updates for name in self.networks[unit]
        }
