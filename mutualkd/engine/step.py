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
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from mutualkd.branching import BranchedNet
from mutualkd.engine.networks import Slot, Unit
from mutualkd.engine.precision import Precision
from mutualkd.errors import NonFiniteLossError, UserError
from mutualkd.strategy import EMA_SUFFIX, PeerOutput, Stage, Step, StepContext, Strategy, TemporalMean

__all__ = ["StepResult", "StagePlan", "plan_stage", "BatchStep", "Networks"]

#: Step name -> ``"<peer>/<term>"`` -> detached value.
Terms = dict[str, dict[str, Tensor]]


@dataclass(frozen=True)
class StepResult:
    """What one batch produced: every loss term (detached), the number of forward passes, and
    ``stop_signal``: the signal that asked the run to stop, on this process or any other (None: none).
    ``scalars`` are the values the strategy logged with ``ctx.log`` (detached)."""

    terms: Terms
    forward_passes: int
    stop_signal: int | None = None
    scalars: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class StagePlan:
    """A stage's steps; for each, the networks it or a later step of the batch updates; the units it trains."""

    stage: Stage
    steps: tuple[Step, ...]
    grad_from: tuple[frozenset[str], ...]
    updated_units: frozenset[str]


def plan_stage(stage: Stage, units: Mapping[str, Unit]) -> StagePlan:
    """Which forward passes must keep a graph: those of networks still to be updated in the batch."""
    steps = tuple(stage.steps)
    net_of = {u.name: u.network for u in units.values() if u.network is not None}
    grad_from = tuple(
        frozenset(net_of[u] for st in steps[k:] for u in st.updates if u in net_of) for k in range(len(steps))
    )
    return StagePlan(stage, steps, grad_from, frozenset(u for st in steps for u in st.updates))


class Networks:
    """The run's peer networks as the step and the evaluation call them.

    ``networks`` maps each network (a slot) to its peers; ``means`` each temporal-mean slot
    (``<network>_ema``) to what the strategy asked for; ``views`` each peer to its view.
    """

    def __init__(self, slots: Mapping[str, Slot], networks: Mapping[str, Sequence[str]],
                 means: Mapping[str, TemporalMean], views: Mapping[str, int]) -> None:
        self.slots = slots
        self.peers: dict[str, list[str]] = {n: list(ps) for n, ps in networks.items()}
        self.source: dict[str, str] = {}  # temporal-mean network -> the network it averages
        for name in means:
            src = name.removesuffix(EMA_SUFFIX)
            self.peers[name] = [p + EMA_SUFFIX for p in networks[src]]
            self.source[name] = src
        self.means = dict(means)
        self.net_of = {p: n for n, ps in self.peers.items() for p in ps}
        self.view_of = {p: int(views.get(p, 0)) for ps in networks.values() for p in ps}
        for name, src in self.source.items():
            for p, q in zip(self.peers[name], self.peers[src]):
                self.view_of[p] = self.view_of[q]

    def forward(self, net: str, views: Sequence[Tensor], *, wrapped: bool = True) -> dict[str, PeerOutput]:
        """Every peer of ``net`` on its view: one call (a branched network runs its trunk once per view)."""
        slot = self.slots[net]
        call = slot.wrapped if wrapped else slot.inner
        peers = self.peers[net]
        if isinstance(slot.inner, BranchedNet):
            # One view (evaluation, or a strategy that asks for none): every branch on it.
            assign = [self.view_of[p] if len(views) > 1 else 0 for p in peers]
            xs = views[0] if max(assign) == 0 else tuple(views)
            trunks, feats, logits = call(xs, None if max(assign) == 0 else assign)
            return {p: PeerOutput(f, z, t) for p, t, f, z in zip(peers, trunks, feats, logits)}
        feats, logits = call(views[self.view_of[peers[0]] if len(views) > 1 else 0])
        return {peers[0]: PeerOutput(feats, logits)}

    @torch.no_grad()
    def update_mean(self, name: str, n: int, broadcast: Callable[[list[Tensor]], None] | None = None) -> None:
        """The ``n``-th update (0-based) of temporal mean ``name`` from its network's current weights.

        With several processes the parameters are the same everywhere (DDP), but each process's
        BatchNorm statistics moved on its own share of the batch: ``broadcast`` then makes every
        process's averaged buffers the main process's (the ones a checkpoint saves), so that a
        resumed run goes on exactly as an uninterrupted one.
        """
        d = float(self.means[name].decay(n))
        if not 0.0 <= d <= 1.0:
            raise UserError(f"temporal mean '{name}': decay({n}) = {d} is not in [0, 1]",
                            hint="this is a bug in the strategy plugin")
        dst, src = self.slots[name].inner, self.slots[self.source[name]].inner
        ema_p, net_p = list(dst.parameters()), list(src.parameters())
        torch._foreach_lerp_(ema_p, net_p, 1.0 - d)  # ema = d * ema + (1 - d) * net
        for b_ema, b_net in zip(dst.buffers(), src.buffers()):
            if b_ema.is_floating_point():
                b_ema.lerp_(b_net, 1.0 - d)
            else:  # counters (num_batches_tracked): the network's own
                b_ema.copy_(b_net)
        if broadcast is not None:
            broadcast([b for b in dst.buffers() if b.is_floating_point()])


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


def _unknown_peer(peer: str, known: Sequence[str]) -> UserError:
    return UserError(f"the strategy asked for peer {peer!r}, which is not a peer of this run",
                     hint=f"peers: {', '.join(known)}")


class _BatchContext(StepContext):
    """What a strategy sees during one batch (see :class:`mutualkd.strategy.StepContext`)."""

    def __init__(self, owner: BatchStep, inputs: Tensor, labels: Tensor, stage: str, epoch: int, global_step: int) -> None:
        self._owner = owner
        # A batch with several views arrives as [V, B, C, H, W]; ``inputs`` is view 0.
        self._views: list[Tensor] = list(inputs) if inputs.ndim == 5 else [inputs]
        self.inputs = self._views[0]
        self.labels = labels
        self.stage = stage
        self.epoch = epoch
        self.global_step = global_step
        self.cache = {}
        self.grad_nets: frozenset[str] = frozenset()
        self.forward_passes = 0
        self.skipped: set[str] = set()
        self.scalars: dict[str, Tensor] = {}
        # network -> (version, recorded a graph, its peers' outputs)
        self._outputs: dict[str, tuple[int, bool, dict[str, PeerOutput]]] = {}

    def output(self, peer: str) -> PeerOutput:
        nets = self._owner.nets
        net = nets.net_of.get(peer)
        if net is None:
            raise _unknown_peer(peer, list(nets.net_of))
        version = self._owner.versions[net]
        need_grad = net in self.grad_nets
        hit = self._outputs.get(net)
        if hit is not None and hit[0] == version and (hit[1] or not need_grad):
            return hit[2][peer]
        with torch.set_grad_enabled(need_grad), self._owner.precision.autocast():
            outs = nets.forward(net, self._views)
        self.forward_passes += 1
        self._outputs[net] = (version, need_grad, outs)
        return outs[peer]

    def module(self, name: str) -> nn.Module:
        try:
            return self._owner.handles[name]  # type: ignore[return-value]
        except KeyError:
            raise UserError(f"the strategy asked for module {name!r}, which it did not register in setup()",
                            hint=f"registered: {', '.join(self._owner.handles) or 'none'}") from None

    def view(self, k: int) -> Tensor:
        if not 0 <= k < len(self._views):
            raise IndexError(f"this batch has {len(self._views)} view(s); Strategy.views() decides how many")
        return self._views[k]

    def skip_update(self, *units: str) -> None:
        self.skipped.update(units)

    def log(self, name: str, value: float | Tensor) -> None:
        self.scalars[name] = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))

    def warn(self, message: str) -> None:
        self._owner.warn(message)


class _EvalContext(StepContext):
    """An evaluation batch: outputs without a graph from the unwrapped modules (in eval mode)."""

    def __init__(self, owner: BatchStep, inputs: Tensor) -> None:
        self._owner = owner
        self.inputs = inputs
        self.labels = torch.empty(0, dtype=torch.long)
        self.stage, self.epoch, self.global_step = "evaluate", -1, -1
        self.cache = {}
        self._outputs: dict[str, dict[str, PeerOutput]] = {}

    def output(self, peer: str) -> PeerOutput:
        nets = self._owner.nets
        net = nets.net_of.get(peer)
        if net is None:
            raise _unknown_peer(peer, list(nets.net_of))
        if net not in self._outputs:
            self._outputs[net] = nets.forward(net, [self.inputs], wrapped=False)
        return self._outputs[net][peer]

    def module(self, name: str) -> nn.Module:
        try:
            return self._owner.slots[name].inner
        except KeyError:
            raise UserError(f"the strategy asked for module {name!r}, which it did not register in setup()",
                            hint="this is a bug in the strategy plugin") from None

    def warn(self, message: str) -> None:
        self._owner.warn(message)


class BatchStep:
    """Runs the steps of a stage on one batch: strategy terms, one backward, the unit's optimizer steps."""

    def __init__(self, strategy: Strategy[Any], slots: Mapping[str, Slot], units: Mapping[str, Unit],
                 networks: Mapping[str, Sequence[str]], precision: Precision,
                 reduce_max: Callable[[Tensor], Tensor] | None, *, means: Mapping[str, TemporalMean] | None = None,
                 views: Mapping[str, int] | None = None, warn: Callable[[str], None] | None = None,
                 on_terms: Callable[[Step, StepContext, Any], None] | None = None,
                 broadcast: Callable[[list[Tensor]], None] | None = None) -> None:
        self.strategy = strategy
        self.slots = slots
        self.units = units
        self.precision = precision
        self.reduce_max = reduce_max  # across processes, for the finiteness check and stop requests; None with one process
        self.nets = Networks(slots, networks, means or {}, views or {})
        self.handles = {
            name: s.inner if s.wrapped is s.inner else _Handle(s.wrapped, s.inner)
            for name, s in slots.items() if name not in self.nets.peers
        }
        #: How many times each network was updated (the forward cache's key).
        self.versions = {name: 0 for name in self.nets.peers}
        #: Updates so far of each temporal mean (its decay's argument).
        self.mean_updates = {name: 0 for name in self.nets.means}
        self._means_of = {src: [m for m, s in self.nets.source.items() if s == src] for src in self.nets.source.values()}
        self._warn = warn
        self._warned: set[str] = set()
        self.on_terms = on_terms  # the callbacks' on_before_backward
        self.broadcast = broadcast  # from the main process, several processes only (temporal means' buffers)

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            if self._warn is not None:
                self._warn(message)

    def run(self, plan: StagePlan, inputs: Tensor, labels: Tensor, *, epoch: int, global_step: int,
            stop: int = 0) -> StepResult:
        """The batch's steps; ``stop`` is this process's pending stop signal (0: none)."""
        ctx = _BatchContext(self, inputs, labels, plan.stage.name, epoch, global_step)
        logged: Terms = {}
        for step, grad_nets in zip(plan.steps, plan.grad_from):
            ctx.grad_nets = grad_nets
            ctx.skipped = set()
            with self.precision.autocast():
                terms = self.strategy.compute(step, ctx)
            if self.on_terms is not None:
                self.on_terms(step, ctx, terms)
            flat = {f"{peer}/{name}": v for peer, group in terms.items() for name, v in group.items()}
            if not flat:
                raise UserError(f"strategy step '{step.name}' returned no loss term", hint="this is a bug in the strategy plugin")
            loss = torch.stack([v.float() for v in flat.values()]).sum()
            stray = ctx.skipped - set(step.updates)
            if stray:
                raise UserError(f"strategy step '{step.name}' skips unit(s) {sorted(stray)} it does not update",
                                hint="this is a bug in the strategy plugin: skip_update names units of step.updates")
            units = [self.units[u] for u in step.updates if u not in ctx.skipped]
            held = [self.units[u] for u in step.updates if u in ctx.skipped]
            if held:
                # A held network's forward pass may have recorded a graph that no term uses;
                # a zero-weighted sum of its outputs lets DistributedDataParallel finish its
                # reduction. Its gradients are then discarded: its optimizer does not step.
                for u in held:
                    hit = ctx._outputs.get(u.network or "")
                    if hit is not None and hit[1]:
                        loss = loss + sum(o.logits.float().sum() * 0.0 for o in hit[2].values())
            self.precision.update(loss, {u.name: u.optimizer for u in units},  # type: ignore[misc]
                                  clip={u.name: u.clip for u in units if u.clip is not None})
            for u in held:
                u.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                with warnings.catch_warnings():  # torch's "scheduler before optimizer" note: on purpose here
                    warnings.simplefilter("ignore", UserWarning)
                    u.scheduler.step()  # the schedule follows the batches, whether or not the unit stepped
            for u in units:
                u.scheduler.step()
                if u.network is not None:
                    # This network changed: its cached outputs are stale for later steps.
                    self.versions[u.network] += 1
                    for mean in self._means_of.get(u.network, ()):
                        self.nets.update_mean(mean, self.mean_updates[mean], self.broadcast)
                        self.mean_updates[mean] += 1
                        self.versions[mean] += 1
            logged[step.name] = {key: v.detach() for key, v in flat.items()}
        # One host sync per batch: the finiteness check and the stop request, reduced (max)
        # over the processes so that every process stops at the same batch, before anything
        # of this batch is logged or saved. A signal reaches one process, or reaches them
        # at different batches; acting on it alone would leave the others waiting in the
        # next collective.
        agreed = self._check_finite(logged, plan.stage, epoch, global_step, stop)
        self.precision.end_iteration()
        return StepResult(logged, ctx.forward_passes, agreed or None, ctx.scalars or None)

    def eval_outputs(self, inputs: Tensor) -> tuple[dict[str, Tensor], list[str]]:
        """Logits of every peer, temporal-mean peer and declared output on an evaluation batch; the peers' names."""
        ctx = _EvalContext(self, inputs)
        logits: dict[str, Tensor] = {}
        for net, peers in self.nets.peers.items():
            for p in peers:
                logits[p] = ctx.output(p).logits
        declared = dict(self.strategy.compute_outputs(ctx))
        logits.update(declared)
        return logits, [p for n, ps in self.nets.peers.items() if n not in self.nets.means for p in ps]

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
