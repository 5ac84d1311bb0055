"""``ie_kd``: inheritance and exploration knowledge distillation, one teacher -> one student.

Huang et al., CVPR 2021. Stage 1 trains the factor autoencoder on the frozen teacher's
features; stage 2 trains the student backbone with its inheritance and exploration
encoders jointly, against the teacher's factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from mutualkd.config import OptimizerConfig
from mutualkd.peers import PeerModule
from mutualkd.strategy import LossTerms, SetupContext, Stage, Step, StepContext, Strategy
from mutualkd_builtins.strategies._ie import (
    CONSTANT,
    IEParams,
    ie_terms,
    make_encoders,
    make_paraphraser,
    match_grid,
    resolve_metrics,
    teacher_factor,
)
from mutualkd_builtins.strategies.ie_dml import ae_loss


class IEKDParams(IEParams):
    teacher: str = Field(description="run folder or checkpoint folder of an earlier mutualkd run")
    teacher_peer: str | int = Field(0, description="which peer of that run is the teacher (name or index)")
    teacher_model: str | None = Field(None, description="expected architecture of the teacher, checked when set")
    ae_epochs: int = Field(30, ge=1, description="stage 1: epochs of autoencoder training (authors: 30)")
    ae_optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4),
        description="stage 1 optimizer (authors: SGD, constant lr 0.1)",
    )


class IEKD(Strategy):
    """IE-KD: a frozen teacher's factors guide one student by inheritance and exploration."""

    Params = IEKDParams
    min_peers = 1
    max_peers = 1
    modes = ("alternating", "simultaneous")  # one student: both modes are the same schedule
    needs_feature_maps = True
    STUDENT_AE = "teacher.ae"

    def __init__(self, params: IEKDParams, *, peers: Sequence[str], mode: Any) -> None:
        super().__init__(params, peers=peers, mode=mode)
        self.p = params

    def setup(self, ctx: SetupContext) -> None:
        p = self.p
        self.d_inh, self.d_exp = resolve_metrics(p, ctx)
        model = ctx.load_peer(p.teacher, p.teacher_peer, field="strategy.teacher")
        name = getattr(model, "mutualkd_model_name", type(model).__name__)
        if p.teacher_model is not None and p.teacher_model != name:
            from mutualkd.errors import CheckpointError

            raise CheckpointError(
                f"the teacher checkpoint holds a '{name}', the recipe expects '{p.teacher_model}'",
                where=f"{ctx.recipe_file} [strategy.teacher_model]",
                hint="point strategy.teacher at the right run, or correct strategy.teacher_model",
            )
        teacher = PeerModule(model, name, feature_map=True).to(ctx.device)
        ctx.add_module("teacher", teacher, unit="teacher", trainable=False)
        from mutualkd.peers import probe_feature_shape

        t_shape = probe_feature_shape(teacher, ctx.dataset.in_chans, ctx.dataset.image_size, ctx.device)
        ae = make_paraphraser(p, t_shape[0])
        ctx.add_module(self.STUDENT_AE, ae, unit=self.STUDENT_AE, optimizer=p.ae_optimizer, scheduler=CONSTANT)
        student = ctx.peers[0]
        ctx.add_module("student.ie", make_encoders(p, student.feature_shape[0], ae.factor_channels), unit=student.name)

    def steps(self) -> Sequence[Step]:
        return [Step(self.peers[0], (self.peers[0],))]

    def stages(self) -> Sequence[Stage]:
        return [
            Stage("teacher_ae", (Step(self.STUDENT_AE, (self.STUDENT_AE,)),), epochs=self.p.ae_epochs, evaluate=False),
            Stage("student", tuple(self.steps())),
        ]

    def _teacher_features(self, ctx: StepContext):
        # The teacher is frozen: one pass per batch, shared by every step.
        if "teacher_f" not in ctx.cache:
            import torch

            with torch.no_grad():
                ctx.cache["teacher_f"] = ctx.module("teacher")(ctx.inputs)[0]
        return ctx.cache["teacher_f"]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        f_t = self._teacher_features(ctx)
        if step.updates == (self.STUDENT_AE,):
            ae = ctx.module(self.STUDENT_AE)
            _, recon = ae(f_t)
            return {"teacher": {"rec": ae_loss(ae, f_t, recon)}}
        out = ctx.output(0)
        ft = teacher_factor(ctx.module(self.STUDENT_AE), f_t)
        f_inh, f_exp = ctx.module("student.ie")(match_grid(out.features, ft))
        p = self.p
        return {
            self.peers[0]: ie_terms(out.logits, ctx.labels, f_inh, f_exp, ft, d_inh=self.d_inh, d_exp=self.d_exp,
                                    lambda_inh=p.lambda_inh, lambda_exp=p.lambda_exp)
        }

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": str(self.p.teacher), "teacher_peer": self.p.teacher_peer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
