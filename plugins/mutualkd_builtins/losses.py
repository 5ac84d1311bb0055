"""Pure loss functions of the built-in strategies, tested on their own.

Notation used across the strategies: ``p_T(z) = softmax(z / T)``;
``KD_T(z_s, z_t) = T^2 * batchmean KL(p_T(z_t) || p_T(z_s))`` (:func:`kd_div`);
``ramp(e; L) = exp(-5 (1 - min(e, L) / L)^2)`` (:func:`sigmoid_rampup`).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Literal

import torch
from torch import Tensor
import torch.nn.functional as F

__all__ = ["kd_div", "kl_to_peers", "sigmoid_rampup", "soft_kl"]


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


def kd_div(student_logits: Tensor, target_logits: Tensor, temperature: float, *, eps: float = 0.0) -> Tensor:
    """The distillation divergence ``KD_T`` (``eps = 0``) or its smoothed form ``KD_T^eps``.

    Shapes: ``student_logits`` and ``target_logits`` ``[B, C]``; returns a 0-d tensor.

    * ``eps = 0``: ``KD_T(z_s, z_t) = T^2 * (1/B) sum_b KL(p_T(z_t)_b || p_T(z_s)_b)``, the same
      value as :func:`soft_kl`.
    * ``eps > 0``: the form of the ONE, FFL and OKDDip code, with the target probabilities shifted
      by ``eps`` and *not* renormalised: ``T^2 * (1/B) sum_b sum_c q_bc (log q_bc - log p_T(z_s)_bc)``
      with ``q = p_T(z_t) + eps`` (those methods use ``eps = 1e-7``).

    Nothing is detached here: the target is used as given, so the caller detaches it when it must
    act as a constant (OKDDip deliberately does not). Computed in float32 whatever the input dtype.
    """
    if eps == 0.0:
        return soft_kl(student_logits, target_logits, temperature)
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    q = F.softmax(target_logits.float() / t, dim=1) + eps
    kl = (q * (q.log() - log_p_student)).sum(dim=1).mean()
    return kl * (t * t)


def sigmoid_rampup(epoch: int, length: int) -> float:
    """The sigmoid-shaped ramp ``ramp(e; L) = exp(-5 (1 - min(e, L) / L)^2)`` of a distillation weight.

    ``epoch`` is 0-based and evaluated once per epoch: ``ramp(0; L) = exp(-5) = 0.0067``, and the ramp
    is 1 from ``e = L`` on. ``length = 0`` means no ramp (1.0). ONE, OKDDip, PCL and FFL use L = 80.
    """
    if length < 0:
        raise ValueError(f"sigmoid_rampup: the ramp length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), length) / length
    return math.exp(-5.0 * phase * phase)
