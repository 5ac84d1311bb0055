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

from mutualkd.strategy import LossTerms, SetupContext, Step, StepContext, Strategy
from mutualkd_builtins.strategies._ie import (
    IEParams,
    ae_optimizer,
    ie_terms,
    make_encoders,
    make_paraphraser,
    match_grid,
    resolve_metrics,
    teacher_factor,
)


class IEDMLParams(IEParams):
    ae_lr: float | None = Field(
        None, gt=0.0, description="learning rate of the autoencoders (default: their peer's optimizer and schedule)"
    )


class IEDML(Strategy):
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

    Params = IEDMLParams
    min_peers = 2
    needs_feature_maps = True

    def __init__(self, params: IEDMLParams, *, peers: Sequence[str], mode: Any) -> None:
        super().__init__(params, peers=peers, mode=mode)
        self.p = params

    # Module names: "<peer>.ae" (its own unit) and "<student>.ie.<teacher>" (student's unit).
    def _ae(self, i: int) -> str:
        return f"{self.peers[i]}.ae"

    def _enc(self, student: int, teacher: int) -> str:
        return f"{self.peers[student]}.ie.{self.peers[teacher]}"

    def setup(self, ctx: SetupContext) -> None:
        self.d_inh, self.d_exp = resolve_metrics(self.p, ctx)
        factor_c: list[int] = []
        for peer in ctx.peers:
            ae = make_paraphraser(self.p, peer.feature_shape[0])
            factor_c.append(ae.factor_channels)
            base = ctx.recipe.peer_optimizer(peer.index)
            ctx.add_module(
                self._ae(peer.index), ae, unit=self._ae(peer.index),
                optimizer=ae_optimizer(self.p.ae_lr, base), scheduler=ctx.recipe.peer_scheduler(peer.index),
            )
        for s in ctx.peers:
            for t in ctx.peers:
                if s.index != t.index:
                    enc = make_encoders(self.p, s.feature_shape[0], factor_c[t.index])
                    ctx.add_module(self._enc(s.index, t.index), enc, unit=s.name)

    def _order(self) -> list[int]:
        n = len(self.peers)
        return list(range(1, n)) + [0]

    def steps(self) -> Sequence[Step]:
        n = len(self.peers)
        if self.mode == "simultaneous":
            return [
                Step("autoencoders", tuple(self._ae(i) for i in range(n))),
                Step("peers", tuple(self.peers)),
            ]
        steps: list[Step] = []
        for k in self._order():
            teachers = [j for j in range(n) if j != k]
            steps.append(Step("ae:" + ",".join(self.peers[j] for j in teachers), tuple(self._ae(j) for j in teachers)))
            steps.append(Step(self.peers[k], (self.peers[k],)))
        return steps

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        terms: LossTerms = {}
        for unit in step.updates:
            if unit.endswith(".ae"):
                j = self.peers.index(unit[: -len(".ae")])
                # The autoencoder learns to reconstruct the peer's *current* features; the
                # backbone is not trained by this loss, hence detached.
                f = ctx.output(j).features.detach()
                ae = ctx.module(unit)
                _, recon = ae(f)
                terms.setdefault(self.peers[j], {})["rec"] = ae_loss(ae, f, recon)
            else:
                terms[unit] = self._student_terms(self.peers.index(unit), ctx)
        return terms

    def _student_terms(self, k: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.output(k)
        teachers = [j for j in range(len(self.peers)) if j != k]
        per_teacher = []
        for j in teachers:
            ft = teacher_factor(ctx.module(self._ae(j)), ctx.output(j).features)
            f_inh, f_exp = ctx.module(self._enc(k, j))(match_grid(out.features, ft))
            per_teacher.append(
                ie_terms(out.logits, ctx.labels, f_inh, f_exp, ft, d_inh=self.d_inh, d_exp=self.d_exp,
                         lambda_inh=self.p.lambda_inh, lambda_exp=self.p.lambda_exp)
            )
        return {
            "ce": per_teacher[0]["ce"],
            "inh": torch.stack([t["inh"] for t in per_teacher]).mean(),
            "exp": torch.stack([t["exp"] for t in per_teacher]).mean(),
        }

    def state_dict(self) -> dict[str, Any]:
        # Split indices live in the encoders' buffers (saved with the modules); the
        # order of students is a function of the peer list.
        return {"order": [self.peers[k] for k in self._order()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def ae_loss(ae: torch.nn.Module, f: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    inner = getattr(ae, "module", ae)  # unwrap DistributedDataParallel
    return inner.reconstruction_loss(f, recon)
