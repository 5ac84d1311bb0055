"""``cl_ilr``: Collaborative Learning with Intermediate-Level Representation sharing (Song and Chai,
*Collaborative Learning for Deep Neural Networks*, NeurIPS 2018).

No official code; the reference re-implementation is github.com/winycg/MCL-OKD @5de042a. K heads
share the lower layers; each head learns from the labels and from the mean of the other heads'
logits, and the gradient into a shared layer is divided by the number of heads that share it
(backpropagation rescaling, ILR).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
import torch
from torch import Tensor
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, SetupContext, Step, StepContext, Strategy, StrategyParams
from mutualkd_builtins.losses import kd_div


def cl_terms(
    logits: Sequence[Tensor], labels: Tensor, *, temperature: float = 2.0, alpha: float = 0.5,
) -> list[dict[str, Tensor]]:
    """CL's per-head terms ``L_i = (1 - a) CE(z_i) + a * KD_T(z_i, sg(mean_{j != i} z_j))``.

    ``logits``: K >= 2 tensors ``[B, classes]``; ``labels``: ``[B]`` class indices (or ``[B, classes]``
    probabilities). Paper: T = 2, a = 0.5, no ramp. The target of head i, the mean of the *other*
    heads' logits (not of their probabilities), is detached inside.

    Returns, per head, ``{"ce": (1 - a) CE(z_i), "kd": a * KD_T(z_i, sg(mean_{j != i} z_j))}``.
    """
    if len(logits) < 2:
        raise ValueError(f"cl_terms needs at least two heads, got {len(logits)}")
    terms = []
    for i, z in enumerate(logits):
        target = torch.stack([o.float() for j, o in enumerate(logits) if j != i]).mean(dim=0).detach()
        terms.append({
            "ce": (1.0 - alpha) * F.cross_entropy(z.float(), labels),
            "kd": alpha * kd_div(z, target, temperature),
        })
    return terms


# --------------------------------------------------------------------------- the strategy


class CLParams(StrategyParams):
    temperature: float = Field(2.0, ge=0.05, le=100.0, description="softmax temperature T of the soft targets (2)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation term; CE gets 1 - alpha (0.5)")


class CollaborativeLearning(Strategy[CLParams]):
    """CL-ILR: heads over shared layers learn from the mean of the other heads (Song & Chai, NeurIPS 2018).

    Each head minimises ``(1 - a) CE(z_i) + a KD_T(z_i, sg(mean_{j != i} z_j))`` (a = 0.5, T = 2).
    The heads are the branches of a network split after a stage; ``ilr = true`` in its
    ``[[peers]]`` table divides the gradient into the trunk by the number of heads (the
    paper's backpropagation rescaling). Whole networks are accepted too (collaborative
    learning without shared layers). Every head is evaluated; the best epoch is chosen on
    their mean top-1 (the paper reports the best head).
    """

    min_peers = 2
    topologies = ("branched", "independent")

    def setup(self, ctx: SetupContext) -> None:
        for table, pc in enumerate(ctx.recipe.peers):
            if pc.branches is not None and not pc.ilr:
                ctx.warn(f"cl_ilr: peers[{table}] has ilr = false, so the gradient into its trunk is the sum over"
                         " its heads, not rescaled as in CL-ILR; set ilr = true for the paper's form")

    def steps(self) -> Sequence[Step]:
        return [Step("all", tuple(self.networks))]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        terms = cl_terms([ctx.output(name).logits for name in self.peers], ctx.labels, temperature=p.temperature,
                         alpha=p.alpha)
        return dict(zip(self.peers, terms))
