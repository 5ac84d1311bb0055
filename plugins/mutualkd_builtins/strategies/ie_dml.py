"""``ie_dml``: inheritance and exploration as mutual learning (IE-DML).

Huang et al., CVPR 2021, section on mutual learning. Every peer is trained from scratch
and plays both roles: as a teacher through its factor autoencoder ``<peer>.ae`` (its own
unit and optimizer), as a student through its inheritance/exploration encoders
(trained jointly with its backbone, one optimizer per peer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field
import torch
from torch import Tensor

from mutualkd.strategy import LossTerms, SetupContext, Step, StepContext, Strategy
from mutualkd_builtins.strategies._ie import (
    IEParams,
    ae_optimizer,
    ie_terms,
    make_encoders,
    make_paraphraser,
    match_grid,
    reconstruction_term,
    resolve_metrics,
    teacher_factor,
    warn_cka_range,
)


def mean_over_teachers(per_teacher: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A student's IE terms averaged over its teachers (the CE does not depend on the teacher)."""
    return {
        "ce": per_teacher[0]["ce"],
        "inh": torch.stack([t["inh"] for t in per_teacher]).mean(),
        "exp": torch.stack([t["exp"] for t in per_teacher]).mean(),
    }


class IEDMLParams(IEParams):
    ae_lr: float | None = Field(
        None, gt=0.0, description="learning rate of the autoencoders (default: their peer's optimizer and schedule)"
    )


class IEDML(Strategy[IEDMLParams]):
    """IE-DML: every peer learns from every other peer's factor by inheritance and exploration.

    Schedule (``alternating``), per mini-batch, for two peers exactly the four steps of
    the method: (1) update peer 1's autoencoder on its current features, (2) update
    peer 2 (backbone and encoders) with peer 1 as teacher, (3) update peer 2's
    autoencoder on its just-updated features, (4) update peer 1 with peer 2 as teacher.
    With N > 2 peers the students come in the order 2, 3, ..., N, 1; before each
    student's update the autoencoders of all its teachers (the other peers) are
    refreshed on their current features, and the student's IE loss is averaged over its
    N-1 teachers. ``simultaneous``: all autoencoders, then all peers, from one forward
    pass per peer.
    """

    min_peers = 2
    needs_feature_maps = True

    # Module names: "<peer>.ae" (its own unit) and "<student>.ie.<teacher>" (the student's unit).
    @staticmethod
    def ae(peer: str) -> str:
        return f"{peer}.ae"

    @staticmethod
    def encoders(student: str, teacher: str) -> str:
        return f"{student}.ie.{teacher}"

    def setup(self, ctx: SetupContext) -> None:
        p = self.params
        self.d_inh, self.d_exp = resolve_metrics(p, ctx)
        factor_c: dict[str, int] = {}
        for peer in ctx.peers:
            ae = make_paraphraser(p, peer.feature_shape[0])
            factor_c[peer.name] = ae.factor_channels
            ctx.add_module(
                self.ae(peer.name), ae, unit=self.ae(peer.name),
                optimizer=ae_optimizer(p.ae_lr, ctx.recipe.peer_optimizer(peer.index)),
                scheduler=ctx.recipe.peer_scheduler(peer.index),
            )
        for s in ctx.peers:
            for t in ctx.peers:
                if s.name != t.name:
                    ctx.add_module(self.encoders(s.name, t.name),
                                   make_encoders(p, s.feature_shape[0], factor_c[t.name]), unit=s.name)
        warn_cka_range(p, ctx, [factor_c[t.name] * t.feature_shape[1] * t.feature_shape[2] for t in ctx.peers])

    def student_order(self) -> list[str]:
        """Peers in the order they are updated as students: 2, 3, ..., N, then 1."""
        return self.peers[1:] + self.peers[:1]

    def steps(self) -> Sequence[Step]:
        if self.mode == "simultaneous":
            return [Step("autoencoders", tuple(self.ae(n) for n in self.peers)), Step("peers", tuple(self.peers))]
        steps: list[Step] = []
        for student in self.student_order():
            teachers = [n for n in self.peers if n != student]
            steps.append(Step("ae:" + ",".join(teachers), tuple(self.ae(n) for n in teachers)))
            steps.append(Step(student, (student,)))
        return steps

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        terms: LossTerms = {}
        for unit in step.updates:
            if unit.endswith(".ae"):
                # The autoencoder learns to reconstruct the peer's *current* features.
                peer = unit[: -len(".ae")]
                terms.setdefault(peer, {})["rec"] = reconstruction_term(ctx.module(unit), ctx.output(peer).features)
            else:
                terms[unit] = self._student_terms(unit, ctx)
        return terms

    def _student_terms(self, student: str, ctx: StepContext) -> dict[str, Tensor]:
        p, out = self.params, ctx.output(student)
        per_teacher = []
        for teacher in (n for n in self.peers if n != student):
            ft = teacher_factor(ctx.module(self.ae(teacher)), ctx.output(teacher).features)
            f_inh, f_exp = ctx.module(self.encoders(student, teacher))(match_grid(out.features, ft))
            per_teacher.append(ie_terms(out.logits, ctx.labels, f_inh, f_exp, ft, d_inh=self.d_inh, d_exp=self.d_exp,
                                        lambda_inh=p.lambda_inh, lambda_exp=p.lambda_exp))
        return mean_over_teachers(per_teacher)

    def state_dict(self) -> dict[str, Any]:
        # Split indices live in the encoders' buffers (saved with the modules); the
        # order of students is a function of the peer list.
        return {"order": self.student_order()}
