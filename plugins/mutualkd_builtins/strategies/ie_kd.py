"""``ie_kd``: inheritance and exploration knowledge distillation, one teacher -> one student.

Huang et al., CVPR 2021. Stage 1 trains the factor autoencoder on the frozen teacher's
features; stage 2 trains the student backbone with its inheritance and exploration
encoders jointly, against the teacher's factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field
import torch
from torch import Tensor

from mutualkd.strategy import LossTerms, OptimizerConfig, SetupContext, Stage, Step, StepContext, Strategy
from mutualkd_builtins.strategies._ie import (
    CONSTANT,
    IEParams,
    ie_terms,
    make_encoders,
    make_paraphraser,
    match_grid,
    reconstruction_term,
    resolve_metrics,
    teacher_factor,
    warn_cka_range,
)


class IEKDParams(IEParams):
    teacher: str = Field(
        description="the frozen teacher's weights (docs/weights.md): a mutualkd run or checkpoint folder, a weights"
        " file (.safetensors, .pth, ...), a timm model folder, a timm pretrained tag (resnet34.a1_in1k) or"
        " hf-hub:ORG/NAME"
    )
    teacher_peer: str | int = Field(0, description="which peer of a teacher run is the teacher (name or index)")
    teacher_model: str | None = Field(
        None, description="the teacher's timm architecture: required for a bare weights file, checked otherwise"
    )
    teacher_reset_head: bool = Field(
        False,
        description="give the teacher a new classifier: IE-KD uses its features only, so its weights may come from"
        " another data set's classes (e.g. ImageNet's 1000)",
    )
    ae_epochs: int = Field(30, ge=1, description="stage 1: epochs of autoencoder training (authors: 30)")
    ae_optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        description="stage 1 optimizer (authors: SGD with Nesterov momentum 0.9, constant lr 0.1, weight decay 5e-4)",
    )


class IEKD(Strategy[IEKDParams]):
    """IE-KD: a frozen teacher's factors guide one student by inheritance and exploration."""

    min_peers = 1
    max_peers = 1
    modes = ("alternating", "simultaneous")  # one student: both modes are the same schedule
    needs_feature_maps = True
    TEACHER = "teacher"
    TEACHER_AE = "teacher.ae"
    ENCODERS = "student.ie"

    def setup(self, ctx: SetupContext) -> None:
        p = self.params
        self.d_inh, self.d_exp = resolve_metrics(p, ctx)
        # Any weights source; the architecture is checked against teacher_model (or named by it, for a bare file).
        loaded = ctx.load_peer(p.teacher, p.teacher_peer, model=p.teacher_model, reset_head=p.teacher_reset_head,
                               field="strategy.teacher")
        teacher, t_shape = ctx.as_peer(loaded)  # (feature map, logits) per call, like a peer
        ctx.add_module(self.TEACHER, teacher, unit=self.TEACHER, trainable=False)
        ae = make_paraphraser(p, t_shape[0])
        ctx.add_module(self.TEACHER_AE, ae, unit=self.TEACHER_AE, optimizer=p.ae_optimizer, scheduler=CONSTANT)
        student = ctx.peers[0]
        ctx.add_module(self.ENCODERS, make_encoders(p, student.feature_shape[0], ae.factor_channels), unit=student.name)
        warn_cka_range(p, ctx, [ae.factor_channels * t_shape[1] * t_shape[2]])

    def steps(self) -> Sequence[Step]:
        return [Step(self.peers[0], (self.peers[0],))]

    def stages(self) -> Sequence[Stage]:
        return [
            Stage("teacher_ae", (Step(self.TEACHER_AE, (self.TEACHER_AE,)),), epochs=self.params.ae_epochs, evaluate=False),
            Stage("student", tuple(self.steps())),
        ]

    def _teacher_features(self, ctx: StepContext) -> Tensor:
        # The teacher is frozen: one pass per batch, without a graph, shared by every step.
        if "teacher_f" not in ctx.cache:
            with torch.no_grad():
                ctx.cache["teacher_f"] = ctx.module(self.TEACHER)(ctx.inputs)[0]
        return ctx.cache["teacher_f"]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        f_t = self._teacher_features(ctx)
        if step.updates == (self.TEACHER_AE,):
            return {"teacher": {"rec": reconstruction_term(ctx.module(self.TEACHER_AE), f_t)}}
        student, p = self.peers[0], self.params
        out = ctx.output(student)
        ft = teacher_factor(ctx.module(self.TEACHER_AE), f_t)
        f_inh, f_exp = ctx.module(self.ENCODERS)(match_grid(out.features, ft))
        return {student: ie_terms(out.logits, ctx.labels, f_inh, f_exp, ft, d_inh=self.d_inh, d_exp=self.d_exp,
                                  lambda_inh=p.lambda_inh, lambda_exp=p.lambda_exp)}

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": str(self.params.teacher), "teacher_peer": self.params.teacher_peer}
