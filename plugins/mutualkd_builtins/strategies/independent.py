"""``independent``: every peer trained alone with cross-entropy (the baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, Step, StepContext, Strategy, StrategyParams


class IndependentParams(StrategyParams):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the cross-entropy (0: none)")


class Independent(Strategy[IndependentParams]):
    """Independent training: each peer minimises its own cross-entropy, no distillation."""

    min_peers = 1
    topologies = ("independent", "branched")

    def steps(self) -> Sequence[Step]:
        # The peers do not interact, so one step updating all of them is exact in both modes.
        return [Step("all", tuple(self.networks))]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        return {
            name: {"ce": F.cross_entropy(ctx.output(name).logits.float(), ctx.labels, label_smoothing=self.params.label_smoothing)}
            for name in self.peers
        }
