"""mutualkd-cosine: the cosine distance as a third-party ``mutualkd.metrics`` plugin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_distance"]


def cosine_distance(a: Tensor, b: Tensor, *, eps: float = 1e-12) -> Tensor:
    r"""Batch mean of one minus the cosine between corresponding samples.

    Each sample of ``a, b`` (identical shape ``[B, ...]``) is flattened and scaled to
    ``\hat a_i = a_i / \max(\lVert a_i \rVert_2, \epsilon)``; then
    ``d = (1/B) \sum_i \tfrac12 \lVert \hat a_i - \hat b_i \rVert^2 = (1/B) \sum_i (1 - \cos(a_i, b_i))``.
    Range [0, 2], symmetric, exactly 0 at ``a == b``; an all-zero sample is 1/2 from any
    non-zero one. Computed in float32 at least. Huang et al., "Revisiting Knowledge
    Distillation: An Inheritance and Exploration Framework", CVPR 2021, name cosine
    distance as an option for the inheritance and exploration losses.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"cosine_distance: needs two [B, ...] batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    x = F.normalize(a.reshape(a.shape[0], -1).to(dtype), dim=1, eps=eps)
    y = F.normalize(b.reshape(b.shape[0], -1).to(dtype), dim=1, eps=eps)
    return 0.5 * (x - y).pow(2).sum(dim=1).mean()
