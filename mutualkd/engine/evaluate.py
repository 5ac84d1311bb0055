"""Evaluation: top-1 and top-5 of every peer and of their ensemble on a whole evaluation split."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from accelerate import Accelerator
import torch
from torch import Tensor, nn

from mutualkd.engine.precision import Precision

__all__ = ["TOPK", "evaluate", "evaluate_topk", "evaluate_split"]

#: The accuracies reported: top-1 and top-5 (top-k with k capped at the number of classes).
TOPK = (1, 5)


@torch.no_grad()
def evaluate_topk(
    peers: Mapping[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator,
    precision: Precision, ks: tuple[int, ...] = TOPK,
) -> dict[int, dict[str, float]]:
    """Top-k (%) for each ``k`` of ``ks``: ``{k: {peer name or "ensemble": accuracy}}``.

    The ensemble is the mean of the peers' softmax. ``peers`` are the unwrapped peer
    modules: evaluation must not run DDP's collective buffer broadcasts, since the
    processes' shares of the split can differ in size. Each process evaluates its own
    disjoint share; the counts are summed, so every sample is counted exactly once.
    A sample is top-k correct when its label is among the k highest scores (k capped at
    the number of classes).
    """
    acc = accelerator
    models = list(peers.values())
    if acc.num_processes > 1:
        # Each process updated its own BatchNorm running statistics since DDP's last
        # buffer broadcast; evaluate everywhere with the main process's (the saved ones).
        for m in models:
            for buf in m.buffers():
                torch.distributed.broadcast(buf, src=0)
    states = [m.training for m in models]
    for m in models:
        m.eval()
    n = len(models)
    correct = torch.zeros(len(ks), n + 1, dtype=torch.float64, device=acc.device)
    total = torch.zeros(1, dtype=torch.float64, device=acc.device)
    try:
        for x, y in batches:
            with precision.autocast():
                logits = [m(x)[1].float() for m in models]
            probs = torch.stack([z.softmax(1) for z in logits]).mean(0)
            kmax = min(max(ks), probs.shape[1])
            for i, z in enumerate([*logits, probs]):
                hit = z.topk(kmax, dim=1).indices == y[:, None]  # [B, kmax]: where the label ranks
                for j, k in enumerate(ks):
                    correct[j, i] += hit[:, : min(k, kmax)].any(1).sum()
            total += y.numel()
    finally:
        for m, s in zip(models, states):
            m.train(s)
    if acc.num_processes > 1:
        correct = acc.reduce(correct, reduction="sum")
        total = acc.reduce(total, reduction="sum")
    pct = (100.0 * correct / total.clamp(min=1)).tolist()
    out: dict[int, dict[str, float]] = {}
    for j, k in enumerate(ks):
        out[k] = {name: pct[j][i] for i, name in enumerate(peers)}
        if n > 1:
            out[k]["ensemble"] = pct[j][n]
    return out


def evaluate(
    peers: Mapping[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator, precision: Precision
) -> dict[str, float]:
    """Top-1 (%) of each peer and of the ensemble, keyed by peer name and ``"ensemble"`` (see :func:`evaluate_topk`)."""
    return evaluate_topk(peers, batches, accelerator, precision, ks=(1,))[1]


def evaluate_split(
    peers: Mapping[str, nn.Module], others: Mapping[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]],
    accelerator: Accelerator, precision: Precision,
) -> dict[str, dict[str, float]]:
    """``{"top1": ..., "top5": ...}`` (%) of each peer, their ensemble and each of ``others`` (e.g. EMA copies).

    ``others`` are evaluated apart, in a second pass, so that the ensemble stays the peers'.
    """
    acc = evaluate_topk(peers, batches, accelerator, precision)
    if others:
        extra = evaluate_topk(others, batches, accelerator, precision)
        for k in acc:
            acc[k].update({name: v for name, v in extra[k].items() if name in others})
    return {f"top{k}": v for k, v in acc.items()}
