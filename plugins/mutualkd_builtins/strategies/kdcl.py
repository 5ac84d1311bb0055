"""``kdcl``: Knowledge Distillation via Collaborative Learning (Guo, Wang, Wu, Yu, Liang, Hu and Luo,
*Online Knowledge Distillation via Collaborative Learning*, CVPR 2020).

No official code; the reference re-implementation is github.com/shaoeric/Online-Knowledge-
Distillation-via-Collaborative-Learning @1ba5461 (it builds only the ``mean`` teacher). N independent
networks, each fed its own view of the images, distil from one soft teacher built from all their
logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field
import torch
from torch import Tensor
import torch.nn.functional as F

from mutualkd.strategy import LossTerms, Step, StepContext, Strategy, StrategyParams
from mutualkd_builtins.losses import kd_div

TeacherVariant = Literal["mean", "min_logit", "best"]
TEACHER_VARIANTS: tuple[TeacherVariant, ...] = ("mean", "min_logit", "best")


def _is_soft(labels: Tensor) -> bool:
    """``[B, classes]`` probabilities (mixup, label smoothing) rather than ``[B]`` class indices."""
    return labels.dim() == 2 and labels.is_floating_point()


def _per_sample_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` cross-entropies; ``-sum_c q_c log p_c`` for soft labels ``q``."""
    if _is_soft(labels):
        return -(labels.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return F.cross_entropy(logits.float(), labels, reduction="none")


def kdcl_teacher(logits: Sequence[Tensor], labels: Tensor, variant: TeacherVariant) -> Tensor:
    """KDCL's soft teacher from the N networks' logits ``z_i`` ``[B, classes]``; returned detached, float32.

    * ``mean``: ``z_t = (1/N) sum_i z_i`` (the re-implementation's teacher);
    * ``min_logit`` (KDCL-MinLogit): ``zbar_i = z_i - z_{i,y}`` (each sample's true-class logit
      subtracted), ``z_t[c] = min_i zbar_i[c]``; then ``z_t[y] = 0`` and ``CE(z_t) <= min_i CE(z_i)``
      for every sample;
    * ``best`` (the paper's naive ensemble): per sample, the logits of the network with the lowest
      cross-entropy (the first one on ties).

    ``labels``: ``[B]`` class indices, or ``[B, classes]`` probabilities (mixup, label smoothing).
    Soft labels work with ``mean`` (labels unused) and ``best`` (ranked by the soft cross-entropy
    ``-sum_c q_c log p_c``); ``min_logit`` raises ``ValueError`` for them, because its construction
    needs one true class per sample and an argmax would silently lose its guarantee.
    """
    if variant not in TEACHER_VARIANTS:
        raise ValueError(f"kdcl_teacher: unknown variant {variant!r}; choose one of {', '.join(TEACHER_VARIANTS)}")
    if not logits:
        raise ValueError("kdcl_teacher needs the logits of at least one network")
    with torch.no_grad():
        stacked = torch.stack([z.detach().float() for z in logits])  # [N, B, classes]
        if variant == "mean":
            return stacked.mean(dim=0)
        if variant == "min_logit":
            if _is_soft(labels):
                raise ValueError(
                    "kdcl_teacher: the 'min_logit' teacher needs class-index labels [B], got soft labels of shape"
                    f" {tuple(labels.shape)}; turn off mixup/cutmix and label smoothing, or use the 'mean' or"
                    " 'best' teacher"
                )
            index = labels.view(1, -1, 1).expand(stacked.shape[0], -1, 1)
            return (stacked - stacked.gather(2, index)).min(dim=0).values
        ce = torch.stack([_per_sample_ce(z, labels) for z in stacked])  # [N, B]
        best = ce.argmin(dim=0)
        return stacked[best, torch.arange(stacked.shape[1], device=stacked.device)]


def kdcl_terms(
    logits: Sequence[Tensor], labels: Tensor, *, variant: TeacherVariant = "mean", temperature: float = 4.0,
    alpha: float = 0.5,
) -> list[dict[str, Tensor]]:
    """KDCL's per-network terms ``L_i = (1 - a) CE(z_i) + a KD_T(z_i, z_t)``, ``z_t`` from :func:`kdcl_teacher`.

    ``logits``: N tensors ``[B, classes]``; ``labels``: ``[B]`` class indices or ``[B, classes]``
    probabilities (see :func:`kdcl_teacher` for the variants that accept them). Paper: T = 4,
    a = 0.5. The teacher is detached.

    Returns, per network, ``{"ce": (1 - a) CE(z_i), "kd": a * KD_T(z_i, z_t)}``.
    """
    teacher = kdcl_teacher(logits, labels, variant)
    return [
        {
            "ce": (1.0 - alpha) * _per_sample_ce(z, labels).mean(),
            "kd": alpha * kd_div(z, teacher, temperature),
        }
        for z in logits
    ]


# --------------------------------------------------------------------------- the strategy


class KDCLParams(StrategyParams):
    variant: TeacherVariant = Field(
        "mean", description="the teacher built from the peers' logits: mean (the public re-implementation),"
        " min_logit (KDCL-MinLogit) or best (per sample, the peer with the lowest cross-entropy)"
    )
    temperature: float = Field(4.0, ge=0.05, le=100.0, description="softmax temperature T of the distillation (4)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation term; CE gets 1 - alpha (0.5)")
    views: Literal["per_peer", "shared"] = Field(
        "per_peer", description="per_peer: each network sees its own augmentation of the batch (the paper);"
        " shared: all see one"
    )


class KDCL(Strategy[KDCLParams]):
    """KDCL: networks on their own views distil a teacher built from all their logits (Guo et al., CVPR 2020).

    N whole (possibly different) networks, each on its own augmentation of the batch; the
    detached teacher ``z_t`` is the mean of their logits, their min-logit combination, or per
    sample the logits of the best peer; each network minimises ``(1 - a) CE(z_i) + a KD_4(z_i,
    z_t)``. Every network is evaluated; the best epoch is chosen on their mean top-1 (the paper
    reports each network).
    """

    min_peers = 2

    def steps(self) -> Sequence[Step]:
        return [Step("all", tuple(self.networks))]

    def views(self) -> Mapping[str, int]:
        return {name: k for k, name in enumerate(self.peers)} if self.params.views == "per_peer" else {}

    def compute(self, step: Step, ctx: StepContext) -> LossTerms:
        p = self.params
        terms = kdcl_terms([ctx.output(name).logits for name in self.peers], ctx.labels, variant=p.variant,
                           temperature=p.temperature, alpha=p.alpha)
        return dict(zip(self.peers, terms))
