"""The batch step: a stage's steps on one mini-batch, with the forward cache and one backward path.

The forward cache is what makes a sequential schedule faithful without wasted passes.
A peer's output is cached with the peer's *version* (how many times its unit was
updated). It is reused while the version is unchanged and recomputed after an update,
so every step sees the networks as they are now. A forward pass records a graph only
when the peer will still be updated later in this batch: then a later step can
backpropagate through the cached output instead of running it again.

A frozen peer (``frozen = true``) has no unit, so its version never changes and no step
updates it: its output is computed once per batch, without a graph, and every step that
asks for it gets that same output (a teacher's logits are never recomputed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mutualkd.engine.build import Slot, Unit
from mutualkd.engine.precision import Precision
from mutualkd.errors import NonFiniteLossError, UserError
from mutualkd.strategy import PeerOutput, Stage, Step, StepContext, Strategy

__all__ = ["StepResult", "StagePlan", "plan_stage", "BatchStep"]

#: Step name -> ``"<peer>/<term>"`` -> detached value.
Terms = dict[str, dict[str, Tensor]]


@dataclass(frozen=True)
class StepResult:
    """What one batch produced: every loss term (detached), the number of forward passes, and
    ``stop_signal``: the signal that asked the run to stop, on this process or any other (None: none)."""

    terms: Terms
    forward_passes: int
    stop_signal: int | None = None


@dataclass(frozen=True)
class StagePlan:
    """A stage's steps; for each, the peers it or a later step of the batch updates; the units it trains."""

    stage: Stage
    steps: tuple[Step, ...]
    grad_from: tuple[frozenset[str], ...]
    updated_units: frozenset[str]


def plan_stage(stage: Stage, units: Mapping[str, Unit]) -> StagePlan:
    """Which forward passes must keep a graph: those of peers still to be updated in the batch."""
    steps = tuple(stage.steps)
    peer_of = {u.name: u.peer for u in units.values() if u.peer is not None}
    grad_from = tuple(
        frozenset(peer_of[u] for st in steps[k:] for u in st.updates if u in peer_of) for k in range(len(steps))
    )
    return StagePlan(stage, steps, grad_from, frozenset(u for st in steps for u in st.updates))


class _Handle:
    """A module as its strategy built it, whose call goes through the engine's wrapper."""

    __slots__ = ("_call", "_inner")

    def __init__(self, wrapped: nn.Module, inner: nn.Module) -> None:
        self._call = wrapped
        self._inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _BatchContext(StepContext):
    """What a strategy sees during one batch (see :class:`mutualkd.strategy.StepContext`)."""

    def __init__(self, owner: BatchStep, inputs: Tensor, labels: Tensor, stage: str, epoch: int, global_step: int) -> None:
        self._owner = owner
        self.inputs = inputs
        self.labels = labels
        self.stage = stage
        self.epoch = epoch
        self.global_step = global_step
        self.cache = {}
        self.grad_peers: frozenset[str] = frozenset()
        self.forward_passes = 0
        # peer -> (version, recorded a graph, output)
        self._outputs: dict[str, tuple[int, bool, PeerOutput]] = {}

    def output(self, peer: str) -> PeerOutput:
        owner = self._owner
        version = owner.versions[peer]
        need_grad = peer in self.grad_peers
        hit = self._outputs.get(peer)
        if hit is not None and hit[0] == version and (hit[1] or not need_grad):
            return hit[2]
        try:
            call = owner.peer_calls[peer]
        except KeyError:
            raise UserError(f"the strategy asked for peer {peer!r}, which is not a peer of this run",
                            hint=f"peers: {', '.join(owner.peer_calls)}") from None
        with torch.set_grad_enabled(need_grad), owner.precision.autocast():
            feats, logits = call(self.inputs)
        self.forward_passes += 1
        out = PeerOutput(feats, logits)
        self._outputs[peer] = (version, need_grad, out)
        return out

    def module(self, name: str) -> nn.Module:
        try:
            return self._owner.handles[name]  # type: ignore[return-value]
        except KeyError:
            raise UserError(f"the strategy asked for module {name!r}, which it did not register in setup()",
                            hint=f"registered: {', '.join(self._owner.handles) or 'none'}") from None


class BatchStep:
    """Runs the steps of a stage on one batch: strategy terms, one backward, the unit's optimizer steps."""

    def __init__(self, strategy: Strategy[Any], slots: Mapping[str, Slot], units: Mapping[str, Unit],
                 peer_names: Sequence[str], precision: Precision, reduce_max: Callable[[Tensor], Tensor] | None) -> None:
        self.strategy = strategy
        self.units = units
        self.precision = precision
        self.reduce_max = reduce_max  # across processes, for the finiteness check and stop requests; None with one process
        self.peer_calls = {name: slots[name].wrapped for name in peer_names}
        self.handles = {
            name: s.inner if s.wrapped is s.inner else _Handle(s.wrapped, s.inner)
            for name, s in slots.items() if name not in self.peer_calls
        }
        #: How many times each peer's unit was updated (the forward cache's key).
        self.versions = {name: 0 for name in peer_names}

    def run(self, plan: StagePlan, inputs: Tensor, labels: Tensor, *, epoch: int, global_step: int,
            stop: int = 0) -> StepResult:
        """The batch's steps; ``stop`` is this process's pending stop signal (0: none)."""
        ctx = _BatchContext(self, inputs, labels, plan.stage.name, epoch, global_step)
        logged: Terms = {}
        for step, grad_peers in zip(plan.steps, plan.grad_from):
            ctx.grad_peers = grad_peers
            with self.precision.autocast():
                terms = self.strategy.compute(step, ctx)
            flat = {f"{peer}/{name}": v for peer, group in terms.items() for name, v in group.items()}
            if not flat:
                raise UserError(f"strategy step '{step.name}' returned no loss term", hint="this is a bug in the strategy plugin")
            loss = torch.stack([v.float() for v in flat.values()]).sum()
            units = [self.units[u] for u in step.updates]
            self.precision.update(loss, {u.name: u.optimizer for u in units},  # type: ignore[misc]
                                  clip={u.name: u.clip for u in units if u.clip is not None})
            for u in units:
                u.scheduler.step()
                if u.peer is not None:
                    # This peer changed: its cached output is stale for later steps.
                    self.versions[u.peer] += 1
            logged[step.name] = {key: v.detach() for key, v in flat.items()}
        # One host sync per batch: the finiteness check and the stop request, reduced (max)
        # over the processes so that every process stops at the same batch, before anything
        # of this batch is logged or saved. A signal reaches one process, or reaches them
        # at different batches; acting on it alone would leave the others waiting in the
        # next collective.
        agreed = self._check_finite(logged, plan.stage, epoch, global_step, stop)
        self.precision.end_iteration()
        return StepResult(logged, ctx.forward_passes, agreed or None)

    def _check_finite(self, logged: Terms, stage: Stage, epoch: int, global_step: int, stop: int = 0) -> int:
        """Raise if a term of any process is non-finite; else the largest pending stop signal (0: none)."""
        values = torch.stack([v.float().reshape(()) for terms in logged.values() for v in terms.values()])
        flags = torch.stack([(~torch.isfinite(values)).any().float(), values.new_tensor(float(stop))])
        if self.reduce_max is not None:
            flags = self.reduce_max(flags)
        bad, agreed = flags.tolist()
        if bad == 0:
            return int(agreed)
        first = next(
            ((step, key) for step, terms in logged.items() for key, v in terms.items() if not torch.isfinite(v).all()),
            None,
        )
        what = f"loss term {first[1]} became non-finite in step '{first[0]}'" if first else (
            "a loss term became non-finite on another process")
        raise NonFiniteLossError(
            f"{what} of stage '{stage.name}', epoch {epoch + 1}, global step {global_step + 1};"
            " the last complete checkpoint is kept. Lower the learning rate or the loss weights."
        )
