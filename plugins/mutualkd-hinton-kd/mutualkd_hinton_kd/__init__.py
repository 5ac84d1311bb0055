"""mutualkd-hinton-kd: classic knowledge distillation as a third-party strategy plugin.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
Learning Workshop (arXiv 1503.02531). One student peer learns from the softened
predictions of a frozen teacher, loaded from any weights source mutualkd knows (an earlier
mutualkd run, a weights file, a timm model folder, timm's pretrained weights).

It uses only the public contract of :mod:`mutualkd.strategy`; the loss is a pure
function, :func:`hinton_kd_terms`, tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
import torch
from torch import Tensor
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, SetupContext, Step, StepContext, Strategy, StrategyParams

__all__ = ["HintonKD", "HintonKDParams", "hinton_kd_terms"]


def hinton_kd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float, alpha: float
) -> dict[str, Tensor]:
    r"""The two terms of the KD loss, ``{"ce": ..., "kd": ...}``, whose sum is the loss.

    .. math::

        L = (1 - \alpha)\, \mathrm{CE}(y, z_S)
            + \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_T / T) \,\|\, \mathrm{softmax}(z_S / T)\big)

    with the KL averaged over the batch. The ``T^2`` factor keeps the soft term's gradient
    magnitude independent of ``T`` (Hinton et al., section 2). The teacher logits are a
    constant: they are detached here. Computed in float32 whatever the input dtype.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return {
        "ce": (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels),
        "kd": alpha * t * t * kl,
    }


class HintonKDParams(StrategyParams):
    """``[strategy]`` keys of ``hinton_kd`` (unknown keys are refused)."""

    teacher: str = Field(
        description="the teacher's weights: a mutualkd run or checkpoint folder, a weights file (.safetensors,"
        " .pth, ...), a timm model folder, a timm pretrained tag or hf-hub:ORG/NAME (mutualkd's docs/weights.md)"
    )
    teacher_peer: str | int = Field(0, description="which peer of a teacher run is the teacher (name or index)")
    teacher_model: str | None = Field(
        None, description="the teacher's timm architecture: required for a bare weights file, checked otherwise"
    )
    temperature: float = Field(4.0, gt=0.0, description="softmax temperature T")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the soft term; 1 - alpha weighs the CE")


class HintonKD(Strategy[HintonKDParams]):
    """Hinton KD: one student matches a frozen teacher's softened predictions, plus CE.

    The student (the recipe's single ``[[peers]]`` entry) minimises
    ``(1 - alpha) CE + alpha T^2 KL(p_T || p_S)``. The teacher is a module of its own,
    registered frozen: it is never updated, stays in eval mode, and runs once per batch.
    """

    min_peers = 1
    max_peers = 1
    modes = ("alternating", "simultaneous")  # one student: both are the same single step

    def setup(self, ctx: SetupContext) -> None:
        # load_peer checks the teacher's classifier has this recipe's classes (a new head would be
        # untrained: KD needs the teacher's predictions, so reset_head is not offered).
        p = self.params
        teacher = ctx.load_peer(p.teacher, p.teacher_peer, model=p.teacher_model, field="strategy.teacher")
        # as_module(): the teacher behind its own input normalisation when its weights expect another
        ctx.add_module("teacher", teacher.as_module(), unit="teacher", trainable=False)

    def steps(self) -> Sequence[Step]:
        return [Step(self.peers[0], (self.peers[0],))]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        if "teacher_logits" not in ctx.cache:
            # The teacher never changes, so its logits are computed once per batch, without a graph.
            with torch.no_grad():
                ctx.cache["teacher_logits"] = ctx.module("teacher")(ctx.inputs)
        student = ctx.output(self.peers[0]).logits
        return {
            self.peers[0]: hinton_kd_terms(
                student, ctx.cache["teacher_logits"], ctx.labels, temperature=self.params.temperature, alpha=self.params.alpha
            )
        }
