"""``kl_dml``: Deep Mutual Learning (Zhang et al., CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, Step, StepContext, Strategy, StrategyParams
from mutualkd_builtins.losses import kl_to_peers


class KLDMLParams(StrategyParams):
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature T (paper: 1)")
    weight: float = Field(1.0, ge=0.0, description="weight w of the KL term (paper: 1)")
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="average the KL over the N-1 other peers (paper) or sum them (authors' code)"
    )


class KLDML(Strategy):
    """Deep Mutual Learning: CE plus the mean KL towards every other peer's predictions.

    Peer i minimises ``CE(y, z_i) + w * (1/(N-1)) * sum_{j != i} T^2 KL(p_j || p_i)``
    with the other peers' probabilities as constants.

    * ``alternating`` (the paper's and the authors' order): one step per peer; peer k
      sees the predictions of peers 0..k-1 *after* their update on this batch.
    * ``simultaneous``: one step; every peer is updated from the same detached targets.
    """

    Params = KLDMLParams
    min_peers = 2

    def steps(self) -> Sequence[Step]:
        if self.mode == "simultaneous":
            return [Step("all", tuple(self.peers))]
        return [Step(name, (name,)) for name in self.peers]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        assert isinstance(self.params, KLDMLParams)
        p = self.params
        terms: LossTerms = {}
        for name in step.updates:
            i = self.peers.index(name)
            logits = ctx.output(i).logits
            # Other peers are targets: their current logits, detached inside kl_to_peers,
            # so this peer's loss sends no gradient into them.
            others = [ctx.output(j).logits for j in range(len(self.peers)) if j != i]
            terms[name] = {
                "ce": F.cross_entropy(logits.float(), ctx.labels),
                "kl": p.weight * kl_to_peers(logits, others, p.temperature, p.reduction),
            }
        return terms
