"""The loops the engine is compared with: hand-written with the fewest passes, and naive.

* ``hand_*``: a loop written for the case with the minimal passes (KL-DML alternating:
  2N-1 forwards, simultaneous: N, IE-DML N=2: 3).
* ``naive_*``: the style of the published DML code: every update re-forwards every peer
  with gradients and nothing is detached, so each backward runs through all peers
  (KL-DML alternating: N^2 forwards, IE-DML N=2: 8).

Both train deep copies of the engine's modules (:func:`clone_modules`, taken before the
engine's first step) with fresh optimizers of the recipe's settings, and take the same
autocast and loss scaling as the engine (:func:`loop_precision`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from cases import IE_LAMBDA, Case
from mutualkd.engine import Trainer
from mutualkd.optim import build_optimizer
from mutualkd_builtins.factor import InheritExploreEncoders, Paraphraser
from mutualkd_builtins.losses import kl_to_peers, soft_kl
from mutualkd_builtins.metrics import l1_distance

__all__ = [
    "AmpFactory",
    "LoopFn",
    "Peers",
    "clone_modules",
    "no_amp",
    "loop_precision",
    "hand_kl_alternating",
    "hand_kl_simultaneous",
    "hand_ie_dml_pair",
    "naive_kl_loss",
    "naive_kl_alternating",
    "naive_kl_simultaneous",
    "naive_ie_dml_pair",
    "loop_for",
]

AmpFactory = Callable[[], contextlib.AbstractContextManager[Any]]
LoopFn = Callable[..., None]


@dataclass
class Peers:
    """The modules and optimizers a hand-written or naive loop trains.

    ``peers[i]`` is what the loop calls for peer i: a :class:`mutualkd.peers.PeerModule`
    (returns ``(features, logits)``), or its ``torch.compile`` wrapper; ``modules[i]`` is
    the PeerModule itself. IE-DML adds ``aes[i]`` (peer i's factor autoencoder) and
    ``encs[(s, t)]`` (student s's inheritance/exploration encoders towards teacher t).
    ``opts[i]`` updates peer i and its encoders, ``ae_opts[i]`` peer i's autoencoder, as
    in the engine's units.
    """

    peers: list[nn.Module]
    modules: list[nn.Module]
    opts: list[torch.optim.Optimizer]
    aes: list[Paraphraser] = field(default_factory=list)
    encs: dict[tuple[int, int], InheritExploreEncoders] = field(default_factory=dict)
    ae_opts: list[torch.optim.Optimizer] = field(default_factory=list)

    def all_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.opts + self.ae_opts

    def train(self) -> None:
        for m in [*self.modules, *self.aes, *self.encs.values()]:
            m.train()


def clone_modules(trainer: Trainer, *, compile: bool = False) -> Peers:
    """Deep copies of the trainer's peers (and IE-DML modules) with fresh optimizers.

    Copies are taken before any training step, so a loop starts from the engine's
    initial weights. Optimizers use the recipe's settings for the same parameter groups
    as the engine's units (peer backbone + its encoders; each autoencoder alone).
    """
    recipe, names = trainer.recipe, trainer.peer_names
    modules = [copy.deepcopy(trainer.unwrapped(name)) for name in names]
    aes: list[Paraphraser] = []
    encs: dict[tuple[int, int], InheritExploreEncoders] = {}
    for i, name in enumerate(names):
        if f"{name}.ae" in trainer.module_names:
            aes.append(copy.deepcopy(trainer.unwrapped(f"{name}.ae")))  # type: ignore[arg-type]
        for j, other in enumerate(names):
            key = f"{name}.ie.{other}"
            if key in trainer.module_names:
                encs[(i, j)] = copy.deepcopy(trainer.unwrapped(key))  # type: ignore[assignment]
    opts = []
    for i, module in enumerate(modules):
        params = list(module.parameters()) + [p for (s, _), e in encs.items() if s == i for p in e.parameters()]
        opts.append(build_optimizer(params, recipe.peer_optimizer(i)))
    ae_opts = [build_optimizer(ae.parameters(), recipe.peer_optimizer(i)) for i, ae in enumerate(aes)]
    peers: list[nn.Module] = [torch.compile(m) for m in modules] if compile else list(modules)  # type: ignore[misc]
    out = Peers(peers, modules, opts, aes, encs, ae_opts)
    out.train()
    return out


def no_amp() -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


def loop_precision(trainer: Trainer) -> tuple[AmpFactory, bool, str]:
    """The loops' autocast, whether they scale the loss (fp16), and the precision's name: as the engine's."""
    dtype, device = trainer.precision.dtype, trainer.device.type
    if dtype is None:
        return no_amp, False, "fp32"

    def amp() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device, dtype=dtype)

    return amp, trainer.precision.scaler is not None, trainer.precision.mode


# ============================================================================ shared pieces


def _update(loss: Tensor, optimizers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None,
            zero: Sequence[torch.optim.Optimizer] | None = None) -> None:
    """zero_grad (of ``zero``, default ``optimizers``), backward, step ``optimizers``."""
    for o in (optimizers if zero is None else zero):
        o.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        for o in optimizers:
            scaler.step(o)
    else:
        loss.backward()
        for o in optimizers:
            o.step()


def _kl_dml_loss(logits: Tensor, others: Sequence[Tensor], y: Tensor) -> Tensor:
    # kl_to_peers detaches the targets (w = 1, T = 1, mean over the others: the recipe's defaults)
    return F.cross_entropy(logits.float(), y) + kl_to_peers(logits, others, 1.0, "mean")


def _ie_student_loss(logits: Tensor, f_student: Tensor, enc: InheritExploreEncoders, factor: Tensor,
                     y: Tensor) -> Tensor:
    if f_student.shape[-2:] != factor.shape[-2:]:
        f_student = F.adaptive_avg_pool2d(f_student, factor.shape[-2:])
    f_inh, f_exp = enc(f_student)
    target = factor.float()
    return (F.cross_entropy(logits.float(), y) + IE_LAMBDA * l1_distance(f_inh.float(), target)
            - IE_LAMBDA * l1_distance(f_exp.float(), target))


def naive_kl_loss(logits: Sequence[Tensor], k: int, y: Tensor) -> Tensor:
    """Peer k's KL-DML loss with the other peers' logits NOT detached: its backward runs through every peer."""
    others = [soft_kl(logits[k], logits[j]) for j in range(len(logits)) if j != k]
    return F.cross_entropy(logits[k].float(), y) + torch.stack(others).mean()


# ============================================================================ hand-written


def hand_kl_alternating(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = no_amp,
                        scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML, alternating, minimal passes: 2N - 1 forwards, N backwards through one peer each.

    All peers are run once with gradients. For k in order, peer k's loss takes the other
    peers' current logits as detached targets; after peer k stepped, it is re-run without
    gradients so that later peers see its updated predictions (the last peer is not).
    """
    n = len(m.peers)
    with amp():
        logits = [p(x)[1] for p in m.peers]
    for k in range(n):
        with amp():
            loss = _kl_dml_loss(logits[k], [logits[j] for j in range(n) if j != k], y)
        _update(loss, [m.opts[k]], scaler)
        if k < n - 1:
            with torch.no_grad(), amp():
                logits[k] = m.peers[k](x)[1]
    if scaler is not None:
        scaler.update()


def hand_kl_simultaneous(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = no_amp,
                         scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML, simultaneous: N forwards, one backward of the summed losses, every peer steps."""
    n = len(m.peers)
    with amp():
        logits = [p(x)[1] for p in m.peers]
        loss = torch.stack([_kl_dml_loss(logits[k], [logits[j] for j in range(n) if j != k], y)
                            for k in range(n)]).sum()
    _update(loss, m.opts, scaler)
    if scaler is not None:
        scaler.update()


def hand_ie_dml_pair(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = no_amp,
                     scaler: torch.amp.GradScaler | None = None) -> None:
    """IE-DML, two peers, the four steps with 3 forward passes.

    1. autoencoder 1 on net 1's features (net 1 run with gradients: its graph is reused in 4);
    2. net 2 (run with gradients) + its encoders against Enc_1(f_1) (no gradient);
    3. net 2 re-run without gradients (it changed), autoencoder 2 on its features;
    4. net 1 + its encoders against Enc_2(f_2), through the graph kept from step 1.
    Teacher factors use the encoder only (the decoder output is not needed).
    """
    p0, p1 = m.peers
    with amp():
        f0, z0 = p0(x)
        fd = f0.detach()
        _, rec = m.aes[0](fd)
        loss = m.aes[0].reconstruction_loss(fd, rec)
    _update(loss, [m.ae_opts[0]], scaler)
    with amp():
        f1, z1 = p1(x)
        with torch.no_grad():
            t0 = m.aes[0].encode(fd)
        loss = _ie_student_loss(z1, f1, m.encs[(1, 0)], t0, y)
    _update(loss, [m.opts[1]], scaler)
    with amp():
        with torch.no_grad():
            f1n, _ = p1(x)
        _, rec = m.aes[1](f1n)
        loss = m.aes[1].reconstruction_loss(f1n, rec)
    _update(loss, [m.ae_opts[1]], scaler)
    with amp():
        with torch.no_grad():
            t1 = m.aes[1].encode(f1n)
        loss = _ie_student_loss(z0, f0, m.encs[(0, 1)], t1, y)
    _update(loss, [m.opts[0]], scaler)
    if scaler is not None:
        scaler.update()


# ============================================================================ naive


def naive_kl_alternating(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = no_amp,
                         scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML alternating as in the published DML code: N^2 forwards, N backwards through all peers.

    For every peer's update all peers are re-run with gradients, the targets are not
    detached, every optimizer is zeroed and only peer k's optimizer steps.
    """
    n = len(m.peers)
    for k in range(n):
        with amp():
            logits = [p(x)[1] for p in m.peers]
            loss = naive_kl_loss(logits, k, y)
        _update(loss, [m.opts[k]], scaler, zero=m.opts)
    if scaler is not None:
        scaler.update()


def naive_kl_simultaneous(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = no_amp,
                          scaler: torch.amp.GradScaler | None = None) -> None:
    """KL-DML simultaneous, naive: N forwards, then one backward per peer loss through all peers.

    Targets are not detached, so each loss is backpropagated on its own (keeping the
    graph) and only peer k's gradients of loss k are kept; all peers step at the end.
    """
    n = len(m.peers)
    with amp():
        logits = [p(x)[1] for p in m.peers]
    kept: list[list[Tensor | None]] = []
    for k in range(n):
        with amp():
            loss = naive_kl_loss(logits, k, y)
        for o in m.opts:
            o.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward(retain_graph=k < n - 1)
        kept.append([None if p.grad is None else p.grad.clone() for g in m.opts[k].param_groups for p in g["params"]])
    for k, o in enumerate(m.opts):
        params = [p for g in o.param_groups for p in g["params"]]
        for p, gr in zip(params, kept[k]):
            p.grad = gr
        if scaler is not None:
            scaler.step(o)
        else:
            o.step()
    if scaler is not None:
        scaler.update()


def naive_ie_dml_pair(m: Peers, x: Tensor, y: Tensor, *, amp: AmpFactory = no_amp,
                      scaler: torch.amp.GradScaler | None = None) -> None:
    """IE-DML N=2 in the naive style: each of the four steps re-runs both peers with gradients.

    Nothing is detached (features into the autoencoders, teacher factors), every optimizer
    is zeroed before each backward, only the step's unit steps: 8 forwards per batch.
    """
    everyone = m.all_optimizers()
    plan = [("ae", 0), ("student", 1), ("ae", 1), ("student", 0)]
    for kind, i in plan:
        with amp():
            outs = [p(x) for p in m.peers]
            if kind == "ae":
                f = outs[i][0]
                _, rec = m.aes[i](f)
                loss = m.aes[i].reconstruction_loss(f, rec)
                unit = m.ae_opts[i]
            else:
                t = 1 - i
                factor = m.aes[t].encode(outs[t][0])
                loss = _ie_student_loss(outs[i][1], outs[i][0], m.encs[(i, t)], factor, y)
                unit = m.opts[i]
        _update(loss, [unit], scaler, zero=everyone)
    if scaler is not None:
        scaler.update()


def loop_for(case: Case, impl: str) -> LoopFn:
    """The hand-written or naive loop of ``case``."""
    if case.strategy == "ie_dml":
        if case.n != 2:
            raise ValueError("the hand-written IE-DML loops cover N = 2 (the four-step schedule)")
        return hand_ie_dml_pair if impl == "hand" else naive_ie_dml_pair
    if case.mode == "alternating":
        return hand_kl_alternating if impl == "hand" else naive_kl_alternating
    return hand_kl_simultaneous if impl == "hand" else naive_kl_simultaneous
