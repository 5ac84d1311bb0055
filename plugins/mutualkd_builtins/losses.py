"""Pure loss functions of the built-in strategies, tested on their own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
import torch.nn.functional as F

__all__ = ["kl_to_peers", "soft_kl"]


def soft_kl(student_logits: Tensor, target_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(softmax(target/T) || softmax(student/T)), averaged over the batch.

    The target is used as given: detach it before calling when it must act as a constant.
    Computed in float32 whatever the input dtype.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_target = F.log_softmax(target_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_target, reduction="batchmean", log_target=True)
    return kl * (t * t)


def kl_to_peers(
    student_logits: Tensor,
    peer_logits: Sequence[Tensor],
    temperature: float = 1.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """The Deep Mutual Learning distillation term of one peer (Zhang et al., CVPR 2018).

    ``sum_j T^2 KL(p_j || p_i)`` over the other peers' logits ``peer_logits``, divided by
    their number when ``reduction="mean"`` (the paper's formula) or not (``"sum"``, as in
    the authors' TensorFlow code). The peers' logits are detached here: they are targets.
    """
    if not peer_logits:
        raise ValueError("kl_to_peers needs at least one other peer")
    total = torch.stack([soft_kl(student_logits, z.detach(), temperature) for z in peer_logits]).sum()
    return total / len(peer_logits) if reduction == "mean" else total
