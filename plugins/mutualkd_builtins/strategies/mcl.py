"""``mcl``: Mutual Contrastive Learning (Yang, An, Xu and Xu, *Mutual Contrastive Learning for Visual
Representation Learning*, AAAI 2022).

Reference code: github.com/winycg/MCL @236da2f (``losses/cifar_sup_mcl_loss.py``). m independent
networks, each with a projection head; supervised contrastive losses within each network's
embeddings (VCL) and across networks (ICL), plus the mutual distillation of the resulting
similarity distributions (Soft VCL, Soft ICL).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, SetupContext, Step, StepContext, Strategy, StrategyParams
from mutualkd_builtins.losses import kd_div


class ProjectionHead(nn.Module):
    """MCL's projection head: ``Linear(d, hidden) -> ReLU -> Linear(hidden, out) -> L2 normalise``.

    ``[B, d]`` pooled features to ``[B, out_dim]`` embeddings of unit length (paper: 128, 128).
    """

    def __init__(self, dim: int, out_dim: int = 128, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.fc2(F.relu(self.fc1(features))), dim=1)


def supcon(similarity: Tensor, labels: Tensor, *, exclude_self: bool) -> Tensor:
    """Supervised contrastive loss on a similarity matrix ``S`` ``[B, B]`` (rows: anchors).

    ``l(S) = -(1/B') sum_a (1/|P_a|) sum_b P_ab (S_ab - log sum_{b' in D_a} exp S_ab')`` with positives
    ``P_ab = [y_a = y_b]`` and denominators ``D_a`` = every column. With ``exclude_self`` the pair
    ``(a, a)`` is removed from both: ``P = [y_a = y_b] - I`` and ``D_a = {b' != a}``. MCL excludes it
    in VCL (``S = V_i V_i^T / tau``, where it is the anchor itself) and in ICL (``S = V_i V_j^T / tau``,
    where it is the same image seen by the other network), as the authors' code does.

    Anchors without a positive (a class with a single image in the batch, under ``exclude_self``)
    would divide by zero (NaN in the authors' code); they are left out, and ``B'`` counts the
    anchors that have one. With none at all the loss is 0, still attached to ``similarity``'s
    graph (zero gradient). ``labels``: ``[B]`` class indices (soft labels have no positive sets and
    raise ``ValueError``). Computed in float32.
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"supcon needs class-index labels of shape [B], got {labels.dtype} {tuple(labels.shape)}")
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] != labels.shape[0]:
        raise ValueError(f"supcon needs a [B, B] similarity for B labels, got {tuple(similarity.shape)}")
    s = similarity.float()
    positives = labels[:, None] == labels[None, :]
    denominators = s
    if exclude_self:
        eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        positives = positives & ~eye
        denominators = s.masked_fill(eye, float("-inf"))
    count = positives.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return s.sum() * 0.0
    log_prob = s[has] - torch.logsumexp(denominators[has], dim=1, keepdim=True)
    per_anchor = (log_prob * positives[has]).sum(dim=1) / count[has]
    return -per_anchor.mean()


def mcl_terms(
    embeddings: Sequence[Tensor], logits: Sequence[Tensor], labels: Tensor, *, tau: float = 0.1,
    temperature: float = 3.0, w_vcl: float = 0.1, w_soft_vcl: float = 1.0, w_icl: float = 0.1,
    w_soft_icl: float = 1.0,
) -> list[dict[str, Tensor]]:
    """MCL's loss, split into per-network terms whose total is

    ``L = sum_i CE(z_i) + 0.1 VCL + 1 SoftVCL + 0.1 ICL + 1 SoftICL`` (the paper's weights), with
    ``S_ij = V_i V_j^T / tau`` and :func:`supcon` ``l`` (self pair excluded):
    ``VCL = sum_i l(S_ii)``, ``ICL = sum_{i != j} l(S_ij)``,
    ``SoftVCL = sum_{i != j} KD_T(S_ii, sg S_jj)``, ``SoftICL = sum_{i != j} KD_T(S_ij, sg S_ji)``
    (the last is the paper's ``sum_{i<j} [KD_T(S_ij, sg S_ji) + KD_T(S_ji, sg S_ij)]``). KD_T treats
    each row of a similarity matrix as logits over the B columns, diagonal included (the authors'
    code).

    ``embeddings``: m >= 2 normalised ``[B, D]`` (:class:`ProjectionHead`); ``logits``: m ``[B,
    classes]``; ``labels``: ``[B]`` class indices. Paper: tau = 0.1, T = 3.

    Returns, per network i, ``{"ce": CE(z_i), "vcl": w_vcl l(S_ii),
    "soft_vcl": w_soft_vcl sum_{j != i} KD_T(S_ii, sg S_jj), "icl": w_icl sum_{j != i} l(S_ij),
    "soft_icl": w_soft_icl sum_{j != i} KD_T(S_ij, sg S_ji)}``. Each pairwise term goes to network
    i, the one whose embeddings are the rows (anchors) of its non-detached matrix: ``soft_vcl``
    sends gradient into ``V_i`` only, while ``icl`` and ``soft_icl`` also send gradient into ``V_j``
    (``S_ij`` depends on both; only the KD targets are detached).
    """
    if len(embeddings) < 2 or len(logits) != len(embeddings):
        raise ValueError(
            f"mcl_terms needs m >= 2 networks with one embedding and one logit tensor each, got"
            f" {len(embeddings)} embeddings and {len(logits)} logits"
        )
    v = [e.float() for e in embeddings]
    m = len(v)
    sim = [[v[i] @ v[j].T / tau for j in range(m)] for i in range(m)]
    terms = []
    for i in range(m):
        others = [j for j in range(m) if j != i]
        soft_vcl = torch.stack([kd_div(sim[i][i], sim[j][j].detach(), temperature) for j in others]).sum()
        icl = torch.stack([supcon(sim[i][j], labels, exclude_self=True) for j in others]).sum()
        soft_icl = torch.stack([kd_div(sim[i][j], sim[j][i].detach(), temperature) for j in others]).sum()
        terms.append({
            "ce": F.cross_entropy(logits[i].float(), labels),
            "vcl": w_vcl * supcon(sim[i][i], labels, exclude_self=True),
            "soft_vcl": w_soft_vcl * soft_vcl,
            "icl": w_icl * icl,
            "soft_icl": w_soft_icl * soft_icl,
        })
    return terms


# --------------------------------------------------------------------------- the strategy


class MCLParams(StrategyParams):
    tau: float = Field(0.1, ge=0.01, le=10.0, description="temperature of the embedding similarities (0.1)")
    temperature: float = Field(3.0, ge=0.05, le=100.0, description="softmax temperature T of the soft terms (3)")
    w_vcl: float = Field(0.1, ge=0.0, description="weight of the vanilla contrastive term VCL (0.1)")
    w_soft_vcl: float = Field(1.0, ge=0.0, description="weight of SoftVCL (1)")
    w_icl: float = Field(0.1, ge=0.0, description="weight of the interactive contrastive term ICL (0.1)")
    w_soft_icl: float = Field(1.0, ge=0.0, description="weight of SoftICL (1)")
    embedding_dim: int = Field(128, ge=2, description="size of the projection heads' output (128)")


class MCL(Strategy[MCLParams]):
    """MCL: mutual contrastive learning of the networks' embeddings (Yang et al., AAAI 2022).

    N whole networks (authors: 2), each with a projection head owned by the strategy
    (``Linear -> ReLU -> Linear -> L2 normalise``, trained with its network). ``L = sum_i CE(z_i)
    + 0.1 VCL + SoftVCL + 0.1 ICL + SoftICL`` over the supervised-contrastive similarities of the
    embeddings (tau = 0.1, T = 3). Positives are the other images of a sample's class: set
    ``data.images_per_class`` (authors: 2) so that every batch has them; an anchor without one
    is left out of the mean (and said once). Every network is evaluated; the paper reports the
    best one.
    """

    min_peers = 2

    def setup(self, ctx: SetupContext) -> None:
        if ctx.recipe.data.images_per_class is None:
            ctx.warn("mcl: data.images_per_class is unset, so a batch may hold a single image of a class, which has"
                     " no positive and is left out of the contrastive terms; set it (the authors: 2)")
        for peer in ctx.peers:
            head = ProjectionHead(peer.feature_shape[0], out_dim=self.params.embedding_dim)
            ctx.add_module(f"{peer.name}.proj", head, unit=peer.network)

    def steps(self) -> Sequence[Step]:
        return [Step("all", tuple(self.networks))]

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        outs = [ctx.output(name) for name in self.peers]
        embeddings = [ctx.module(f"{name}.proj")(o.features.mean(dim=(2, 3))) for name, o in zip(self.peers, outs)]
        terms = mcl_terms(embeddings, [o.logits for o in outs], ctx.labels, tau=p.tau, temperature=p.temperature,
                          w_vcl=p.w_vcl, w_soft_vcl=p.w_soft_vcl, w_icl=p.w_icl, w_soft_icl=p.w_soft_icl)
        return dict(zip(self.peers, terms))
