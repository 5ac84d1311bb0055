"""Evaluation: top-1 of every peer and of their ensemble on the whole test split."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from accelerate import Accelerator
import torch
from torch import Tensor, nn

from mutualkd.engine.precision import Precision

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    peers: Mapping[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator, precision: Precision
) -> dict[str, float]:
    """Top-1 (%) of each peer and of the ensemble (mean of softmax), keyed by peer name and ``"ensemble"``.

    ``peers`` are the unwrapped peer modules: evaluation must not run DDP's collective
    buffer broadcasts, since the processes' shares of the test split can differ in size.
    Each process evaluates its own disjoint share; the counts are summed, so every test
    sample is counted exactly once.
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
    correct = torch.zeros(n + 1, dtype=torch.float64, device=acc.device)
    total = torch.zeros(1, dtype=torch.float64, device=acc.device)
    try:
        for x, y in batches:
            with precision.autocast():
                logits = [m(x)[1].float() for m in models]
            for i, z in enumerate(logits):
                correct[i] += (z.argmax(1) == y).sum()
            probs = torch.stack([z.softmax(1) for z in logits]).mean(0)
            correct[n] += (probs.argmax(1) == y).sum()
            total += y.numel()
    finally:
        for m, s in zip(models, states):
            m.train(s)
    if acc.num_processes > 1:
        correct = acc.reduce(correct, reduction="sum")
        total = acc.reduce(total, reduction="sum")
    pct = (100.0 * correct / total.clamp(min=1)).tolist()
    out = {name: pct[i] for i, name in enumerate(peers)}
    if n > 1:
        out["ensemble"] = pct[n]
    return out
