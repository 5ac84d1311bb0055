"""``okddip``: Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng and Chen, AAAI
2020).

Reference code: github.com/DefangChen/OKDDip @c6a05de. One network split into a shared trunk and
K auxiliary peers plus a group leader. Each peer distils from its own attention-weighted mix of
the peers' logits; the leader distils from the peers' mean.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, RecipeError, SetupContext, Step, StepContext, Strategy
from mutualkd_builtins.losses import kd_div
from mutualkd_builtins.strategies._ramped import RampedKDParams
from mutualkd_builtins.strategies.one import one_network

KD_EPS = 1e-7  # added to the target probabilities, not renormalised (the authors' KL loss)


class PeerAttention(nn.Module):
    """OKDDip's attention among peers, from their pooled features.

    ``W_Q``, ``W_K`` = ``Linear(d, d // reduction, bias=False)``, shared by all peers. For K features
    ``f_i`` ``[B, d]``: ``A[b, i, j] = softmax_j(Q_i . K_j)`` with ``Q_i = W_Q f_i``, ``K_j = W_K f_j``;
    no ``1/sqrt(d)`` scaling and ``j`` includes ``i`` (the authors' form). Returns ``A`` ``[B, K, K]``
    in float32, each row summing to 1.
    """

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        if dim // reduction < 1:
            raise ValueError(f"PeerAttention: dim // reduction must be >= 1, got {dim} // {reduction}")
        self.query = nn.Linear(dim, dim // reduction, bias=False)
        self.key = nn.Linear(dim, dim // reduction, bias=False)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        f = torch.stack(list(features), dim=1)  # [B, K, d]
        energy = self.query(f) @ self.key(f).transpose(1, 2)  # [B, K, K]: Q_i . K_j
        return F.softmax(energy.float(), dim=-1)


def okddip_terms(
    peer_logits: Sequence[Tensor], leader_logits: Tensor, attention: Tensor, labels: Tensor, *,
    temperature: float = 3.0, weight: float, detach_targets: bool = False,
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """OKDDip's loss terms.

    ``L = sum_i CE(z_i) + CE(z_L) + w * [sum_i KD_T^eps(z_i, t_i) + KD_T^eps(z_L, mean_i z_i)]`` with
    the peer targets ``t_i = sum_j A_ij z_j``.

    ``peer_logits``: K tensors ``[B, classes]``; ``leader_logits``: ``[B, classes]``; ``attention``:
    ``[B, K, K]`` (:class:`PeerAttention`); ``labels``: ``[B]`` class indices (or ``[B, classes]``
    probabilities); ``weight``: the caller's ramp value ``w = ramp(e; L)`` (paper: L = 80); T = 3.

    Returns ``(peers, leader)``: per peer ``{"ce": CE(z_i), "kd": w * KD_T^eps(z_i, t_i)}`` and
    ``{"ce": CE(z_L), "kd": w * KD_T^eps(z_L, mean_i z_i)}`` for the leader.

    The targets are *not* detached by default, as in the authors' code: peer i's ``kd`` sends
    gradient into the other peers' logits and into ``W_Q``/``W_K``, which learn only this way; the
    leader's ``kd`` sends gradient into the peers. ``detach_targets=True`` detaches both targets;
    the attention then receives no gradient at all and stays at its initialisation.
    """
    if attention.shape[1:] != (len(peer_logits), len(peer_logits)):
        raise ValueError(f"okddip_terms: attention of shape {tuple(attention.shape)} for {len(peer_logits)} peers")
    stacked = torch.stack([z.float() for z in peer_logits], dim=1)  # [B, K, classes]
    targets = attention.float() @ stacked  # [B, K, classes]: t_i = sum_j A_ij z_j
    leader_target = stacked.mean(dim=1)
    if detach_targets:
        targets, leader_target = targets.detach(), leader_target.detach()
    peers = [
        {
            "ce": F.cross_entropy(z.float(), labels),
            "kd": weight * kd_div(z, targets[:, i], temperature, eps=KD_EPS),
        }
        for i, z in enumerate(peer_logits)
    ]
    leader = {
        "ce": F.cross_entropy(leader_logits.float(), labels),
        "kd": weight * kd_div(leader_logits, leader_target, temperature, eps=KD_EPS),
    }
    return peers, leader


# --------------------------------------------------------------------------- the strategy


class OKDDipParams(RampedKDParams):
    detach_targets: bool = Field(
        False,
        description="detach the peers' attention-weighted targets and the leader's target; off (the authors' code):"
        " gradients flow through the targets, and the attention learns only through them (on: it never learns)",
    )
    reduction: int = Field(8, ge=1, description="the attention's projection size is the feature size / reduction (8)")


class OKDDip(Strategy[OKDDipParams]):
    """OKDDip: peers distil attention-weighted mixes of each other, a leader distils their mean (AAAI 2020).

    One ``[[peers]]`` table with K >= 3 ``branches`` (authors: 4): the first K - 1 are the
    auxiliary peers, the last is the group leader. ``L = sum_i CE(z_i) + CE(z_L) + ramp(e; L) *
    [sum_i KD_3^eps(z_i, sum_j A_ij z_j) + KD_3^eps(z_L, mean_i z_i)]`` with the attention ``A``
    over the peers' pooled features. The leader is what the authors report; it chooses ``best/``.
    """

    min_peers = 3
    topologies = ("branched",)

    def setup(self, ctx: SetupContext) -> None:
        self.net = one_network(self, ctx)
        dim = ctx.peers[0].feature_shape[0]
        if dim // self.params.reduction < 1:
            raise RecipeError(f"reduction = {self.params.reduction} leaves no attention dimension for features of"
                              f" size {dim}", file=ctx.recipe_file, field="strategy.reduction",
                              hint=f"use a reduction of at most {dim}")
        ctx.add_module("attention", PeerAttention(dim, self.params.reduction), unit=self.net)

    def steps(self) -> Sequence[Step]:
        return [Step("all", (self.net,))]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        outs = [ctx.output(name) for name in self.peers]
        peers, leader = outs[:-1], outs[-1]
        attention = ctx.module("attention")([o.features.mean(dim=(2, 3)) for o in peers])
        peer_terms, leader_terms = okddip_terms(
            [o.logits for o in peers], leader.logits, attention, ctx.labels, temperature=p.temperature,
            weight=p.kd_weight(ctx.epoch), detach_targets=p.detach_targets,
        )
        return {**dict(zip(self.peers[:-1], peer_terms)), self.peers[-1]: leader_terms}

    def reported_output(self) -> str | None:
        return self.peers[-1]  # the group leader
