"""Evaluation: top-1 and top-5 of every peer and of their ensemble on a whole evaluation split."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from accelerate import Accelerator
import torch
from torch import Tensor, nn

from mutualkd.engine.precision import Precision

__all__ = ["TOPK", "evaluate", "evaluate_outputs", "evaluate_topk", "evaluate_split"]

#: The accuracies reported: top-1 and top-5 (top-k with k capped at the number of classes).
TOPK = (1, 5)


@torch.no_grad()
def evaluate_outputs(
    forward: Callable[[Tensor], tuple[Mapping[str, Tensor], Sequence[str]]], modules: Sequence[nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator, precision: Precision,
    ks: tuple[int, ...] = TOPK,
) -> dict[int, dict[str, float]]:
    """Top-k (%) for each ``k`` of ``ks`` of every output ``forward`` returns: ``{k: {name: accuracy}}``.

    ``forward(x)`` gives the logits of each named output on a batch and the names of the
    peers, whose mean softmax is the ``"ensemble"`` (with more than one peer). ``modules``
    are every module those outputs use, unwrapped (evaluation must not run DDP's
    collective buffer broadcasts, since the processes' shares of the split can differ in
    size); they are put in eval mode for the pass and back after. Each process evaluates
    its own disjoint share; the counts are summed, so every sample is counted exactly once.
    A sample is top-k correct when its label is among the k highest scores (k capped at the
    number of classes).
    """
    acc = accelerator
    if acc.num_processes > 1:
        # Each process updated its own BatchNorm running statistics since DDP's last
        # buffer broadcast; evaluate everywhere with the main process's (the saved ones).
        for m in modules:
            for buf in m.buffers():
                torch.distributed.broadcast(buf, src=0)
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    names: list[str] = []
    correct: Tensor | None = None
    total = torch.zeros(1, dtype=torch.float64, device=acc.device)
    try:
        for x, y in batches:
            with precision.autocast():
                outs, peers = forward(x)
                logits = {k: v.float() for k, v in outs.items()}
            if len(peers) > 1:
                logits["ensemble"] = torch.stack([logits[p].softmax(1) for p in peers]).mean(0)
            if correct is None:  # the peers, their ensemble, then every other output
                names = [*peers, *(["ensemble"] if len(peers) > 1 else []), *(n for n in logits if n not in peers
                                                                              and n != "ensemble")]
                correct = torch.zeros(len(ks), len(names), dtype=torch.float64, device=acc.device)
            kmax = min(max(ks), next(iter(logits.values())).shape[1])
            for i, name in enumerate(names):
                hit = logits[name].topk(kmax, dim=1).indices == y[:, None]  # [B, kmax]: where the label ranks
                for j, k in enumerate(ks):
                    correct[j, i] += hit[:, : min(k, kmax)].any(1).sum()
            total += y.numel()
    finally:
        for m, s in zip(modules, states):
            m.train(s)
    if correct is None:
        raise ValueError("the evaluation split has no batch")
    if acc.num_processes > 1:
        correct = acc.reduce(correct, reduction="sum")
        total = acc.reduce(total, reduction="sum")
    pct = (100.0 * correct / total.clamp(min=1)).tolist()
    return {k: {name: pct[j][i] for i, name in enumerate(names)} for j, k in enumerate(ks)}


@torch.no_grad()
def evaluate_topk(
    peers: Mapping[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator,
    precision: Precision, ks: tuple[int, ...] = TOPK,
) -> dict[int, dict[str, float]]:
    """Top-k (%) of each peer module (``(features, logits)`` per call) and of their ensemble (mean softmax)."""
    names = list(peers)

    def forward(x: Tensor) -> tuple[dict[str, Tensor], list[str]]:
        return {n: m(x)[1] for n, m in peers.items()}, names

    return evaluate_outputs(forward, list(peers.values()), batches, accelerator, precision, ks)


def evaluate(
    peers: Mapping[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator, precision: Precision
) -> dict[str, float]:
    """Top-1 (%) of each peer and of the ensemble, keyed by peer name and ``"ensemble"`` (see :func:`evaluate_topk`)."""
    return evaluate_topk(peers, batches, accelerator, precision, ks=(1,))[1]


def evaluate_split(
    forward: Callable[[Tensor], tuple[Mapping[str, Tensor], Sequence[str]]], modules: Sequence[nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator, precision: Precision,
) -> dict[str, dict[str, float]]:
    """``{"top1": ..., "top5": ...}`` (%) of every output of ``forward`` and of the peers' ensemble."""
    acc = evaluate_outputs(forward, modules, batches, accelerator, precision)
    return {f"top{k}": v for k, v in acc.items()}
