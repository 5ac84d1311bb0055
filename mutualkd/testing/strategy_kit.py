"""The strategy kit: a strategy class run end to end on a tiny problem, its contract checked.

:func:`check_strategy` trains a few steps on the digits data, writes a checkpoint, resumes,
and checks every step's loss terms, the gradient flow, the updated and frozen modules and
the strategy state. :func:`make_teacher` trains a throwaway run to use as a teacher.

The kit observes a running Trainer; every access to the engine is one small function in
the first section below (marked ``# engine access``), so that the rest of the kit reads
only what the engine hands out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
from pathlib import Path
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mutualkd import registry
from mutualkd.registry import validate_plugin
from mutualkd.strategy import LossTerms, Stage, Step, StepContext, Strategy
from mutualkd.testing._registered import registered

if TYPE_CHECKING:
    from mutualkd.engine import Trainer

__all__ = ["check_strategy", "make_teacher"]

# ============================================================================ engine access


class _Hooks:
    """The kit's callback (engine hooks, nothing wrapped): each batch's start and end, each step's terms."""

    def __init__(self, on_start: Callable[[], None], on_terms: Callable[[Step, StepContext, LossTerms], None],
                 on_end: Callable[[], None]) -> None:
        self.on_start, self.on_terms, self.on_end = on_start, on_terms, on_end

    def on_batch_start(self, trainer: Trainer, inputs: Tensor, labels: Tensor) -> None:  # engine access
        self.on_start()

    def on_before_backward(self, trainer: Trainer, step: Step, ctx: StepContext, terms: LossTerms) -> None:  # engine access
        self.on_terms(step, ctx, terms)

    def on_batch_end(self, trainer: Trainer, result: Any) -> None:  # engine access
        self.on_end()


def _observe(trainer: Trainer, hooks: _Hooks) -> None:  # engine access
    """Call ``hooks`` from the trainer's callbacks (a Callback with the kit's three hooks)."""
    from mutualkd.engine import Callback

    class KitCallback(Callback):
        on_batch_start = hooks.on_batch_start  # type: ignore[assignment]
        on_before_backward = hooks.on_before_backward  # type: ignore[assignment]
        on_batch_end = hooks.on_batch_end  # type: ignore[assignment]

    trainer.add_callback(KitCallback())


def _temporal_means(trainer: Trainer) -> dict[str, tuple[str, Any]]:  # engine access
    """Each temporal-mean module of the strategy: the network it averages and the request (decay)."""
    return dict(trainer.temporal_means)


def _strategy(trainer: Trainer) -> Strategy[Any]:  # engine access
    """The trainer's strategy instance."""
    return trainer.strategy


def _peer_names(trainer: Trainer) -> list[str]:  # engine access
    """The peers' names, in recipe order."""
    return list(trainer.peer_names)


def _modules(trainer: Trainer) -> dict[str, nn.Module]:  # engine access
    """Every module by checkpoint key, unwrapped: the peer networks (a whole one is its timm model), the
    strategy's modules and temporal means."""
    from mutualkd.peers import PeerModule

    nets = set(trainer.network_names) | set(trainer.temporal_means)
    out = {name: trainer.unwrapped(name) for name in trainer.module_names}
    return {name: m.model if name in nets and isinstance(m, PeerModule) else m for name, m in out.items()}


def _unit_modules(trainer: Trainer) -> dict[str, list[str]]:  # engine access
    """Each unit (what one optimizer updates) and the checkpoint keys of its modules."""
    return {name: list(unit.modules) for name, unit in trainer.units.items()}


def _frozen(trainer: Trainer) -> set[str]:  # engine access
    """The checkpoint keys of the modules registered with ``trainable=False`` (in no unit, not a temporal mean)."""
    trained = {k for unit in trainer.units.values() for k in unit.modules}
    return set(trainer.module_names) - trained - set(trainer.temporal_means)


def _stages(trainer: Trainer) -> list[Stage]:  # engine access
    """The strategy's stages as the trainer runs them."""
    return list(trainer.stages)


# ============================================================================ the checks

#: Digits, 32 training images in batches of 16: two batches per epoch.
_DATA: dict[str, Any] = {
    "dataset": "digits", "batch_size": 16, "eval_batch_size": 64, "train_subset": 32, "test_subset": 32, "augment": False,
}


def make_teacher(folder: str | Path, *, model: str = "cifar_wrn_16_1", steps: int = 2, name: str = "teacher") -> Path:
    """Train a throwaway one-peer run on digits (``independent``) and return its run folder.

    Use it as the teacher of a strategy under test, e.g.
    ``check_strategy(MyKD, prepare=lambda tmp: {"teacher": str(make_teacher(tmp))})``.
    """
    from mutualkd.config import parse_recipe
    from mutualkd.engine import Trainer

    recipe = parse_recipe(
        {
            "run": {"name": name, "out_dir": str(folder), "max_steps": steps, "progress": False, "device": "cpu"},
            "data": _DATA,
            "peers": [{"model": model}],
            "strategy": {"name": "independent"},
        },
        file="<make_teacher>",
    )
    with _one_thread():
        Trainer(recipe, recipe_file="<make_teacher>").fit()
    return Path(folder) / name


def check_strategy(
    cls: type,
    *,
    params: Mapping[str, Any] | None = None,
    peers: int | None = None,
    tmp_path: str | Path | None = None,
    prepare: Callable[[Path], Mapping[str, Any]] | None = None,
    modes: Sequence[str] | None = None,
    model: str = "cifar_wrn_16_1",
    device: str = "cpu",
) -> None:
    """Run strategy class ``cls`` end to end on a tiny digits problem and check its contract.

    ``params`` are the recipe's ``[strategy]`` keys (without ``name``); ``prepare(tmp_path)``
    is called first and may return more of them (e.g. ``{"teacher": run_folder}``, see
    :func:`make_teacher`; ``params`` win on conflicts). ``peers`` defaults to 2, or to what
    the strategy allows. Every mode in ``modes`` (default: all of ``cls.modes``) is run.
    Keep the strategy's own stage lengths small through ``params`` (e.g. ``ae_epochs=1``).

    For each mode, a run of ``model`` peers (2 epochs of 2 batches, stopped after 1 step)
    is started, then resumed to the end with ``Trainer(recipe, resume=run_dir)``; checked:

    * the class passes the registry's validation and runs through the engine, found by
      name in the registry (``cls`` is registered temporarily with :func:`registered`);
    * every loss term of every step is a finite 0-d tensor, grouped by peer, and a step
      sends no gradient into a unit it does not update (targets are detached);
    * every step of every stage runs; every module of every updated unit changes, every
      frozen module stays unchanged;
    * the checkpoint holds every module (peers and auxiliary) equal to the live ones, and
      the strategy state round-trips: ``state_dict()`` of a fresh instance after
      ``load_state_dict(saved)`` equals ``saved``;
    * the resumed Trainer starts from exactly the checkpoint's weights and strategy state;
    * a strategy for branched peers (``topologies`` without ``"independent"``) runs on one
      network of ``peers`` branches split after ``layer2``;
    * temporal means (:meth:`Strategy.temporal_means`): each changes only by its update,
      ``d(0) * initial + (1 - d(0)) * network`` after the first optimizer step;
    * views (:meth:`Strategy.views`): each view asked for exists, has the batch's shape, and
      differs from view 0 (the kit trains with augmentation on then);
    * declared outputs and the reported output are evaluated (in the summary's top-1);
    * a unit a step skips on a batch (``ctx.skip_update``) is unchanged by that batch;
      scalars from ``ctx.log`` are finite.
    """
    problem = validate_plugin("strategy", cls)
    label = f"strategy {getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s}"
    if problem:
        raise AssertionError(f"{label}: contract: {problem}")
    n = peers if peers is not None else max(cls.min_peers, 2 if cls.max_peers is None else min(2, cls.max_peers))
    with contextlib.ExitStack() as stack:
        root = Path(tmp_path) if tmp_path is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="mutualkd-check-"))
        )
        root.mkdir(parents=True, exist_ok=True)
        merged: dict[str, Any] = dict(prepare(root)) if prepare is not None else {}
        merged.update(params or {})
        name = _free_name(cls)
        stack.enter_context(registered("strategy", name, cls))
        stack.enter_context(_one_thread())
        for mode in modes or cls.modes:
            _check_run(cls, name, merged, n, mode, root / f"check-{cls.__name__}-{mode}", model, device,
                       f"{label} (mode {mode!r})")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread: the batches are tiny, and on a shared or busy machine
    several threads spend more time waiting for each other than computing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _free_name(cls: type) -> str:
    taken = set(registry.names("strategy"))
    base = f"check.{cls.__name__}"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}.{k}"
    return name


def _check_run(
    cls: type, name: str, params: Mapping[str, Any], n: int, mode: str, folder: Path, model: str, device: str, label: str
) -> None:
    from mutualkd import checkpoint as ckpt
    from mutualkd.config import parse_recipe
    from mutualkd.engine import Trainer

    branched = "independent" not in getattr(cls, "topologies", ("independent",))
    views = _num_views(cls, params, n, branched, mode)
    raw: dict[str, Any] = {
        "run": {"name": "run", "out_dir": str(folder), "epochs": 2, "max_steps": 1, "progress": False,
                "device": device, "log_every": 1, "seed": 0},
        "data": {**_DATA, "augment": views > 1},
        "peers": ([{"model": model, "name": "net", "branches": n, "split_after": "layer2"}] if branched
                  else [{"model": model} for _ in range(n)]),
        "optimizer": {"name": "sgd", "lr": 0.01},
        "strategy": {"name": name, **params},
        "schedule": {"mode": mode},
    }
    file = f"<check_strategy {cls.__name__}>"

    # --- part 1: one step, then the run stops and writes its checkpoint
    with _failures(label, "first run (1 step)"):
        t1 = Trainer(parse_recipe(raw, file=file), recipe_file=file)
        initial = {k: _clone_state(m) for k, m in _modules(t1).items()}
        rec1 = _Recorder(t1, label, views=views)
        t1.fit()
    _check_means(t1, initial, label)
    run_dir = folder / "run"
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise AssertionError(f"{label}: checkpoint: the run wrote no complete checkpoint under {run_dir / 'checkpoints'}")
    state = ckpt.load_checkpoint(latest)
    live = _modules(t1)
    missing = sorted(set(live) - set(state.get("modules", {})))
    if missing:
        raise AssertionError(f"{label}: checkpoint: modules {missing} are not in the checkpoint {latest}")
    for k, m in live.items():
        diff = _state_diff(m.state_dict(), state["modules"][k])
        if diff:
            raise AssertionError(f"{label}: checkpoint: module '{k}' differs from the live one ({diff})")
    saved = state.get("strategy")
    if not isinstance(saved, Mapping):
        raise AssertionError(f"{label}: state: the checkpoint's strategy state is {type(saved).__name__}, expected a dict")
    if not _equal(saved, _strategy(t1).state_dict()):
        raise AssertionError(f"{label}: state: the saved strategy state differs from state_dict() of the running strategy")
    with _failures(label, "state round trip"):
        nets = _strategy(t1).networks  # handed over only for branched networks, as the engine does
        extra = {"networks": nets} if any(ps != [n] for n, ps in nets.items()) else {}
        fresh = cls(_strategy(t1).params, peers=_peer_names(t1), mode=mode, **extra)
        fresh.load_state_dict(saved)
        again = fresh.state_dict()
    if not _equal(again, saved):
        raise AssertionError(
            f"{label}: state: load_state_dict(saved) then state_dict() on a fresh instance gives {again!r},"
            f" saved was {saved!r}"
        )

    # --- part 2: resume from that checkpoint and run to the end
    resumed_raw = {**raw, "run": {k: v for k, v in raw["run"].items() if k != "max_steps"}}
    with _failures(label, "resumed run"):
        t2 = Trainer(parse_recipe(resumed_raw, file=file), recipe_file=file, resume=run_dir)

        def starts_from_checkpoint() -> None:
            # Called before the first loss of the resumed run: no optimizer step yet, so
            # parameters must equal the checkpoint's (buffers may have moved: BN in train mode).
            for k, m in _modules(t2).items():
                for pname, p in m.named_parameters():
                    if not torch.equal(p.detach().cpu(), state["modules"][k][pname].cpu()):
                        raise AssertionError(f"{label}: resume: parameter {k}.{pname} was not restored from the checkpoint")
            if not _equal(_strategy(t2).state_dict(), saved):
                raise AssertionError(f"{label}: resume: the strategy state was not restored from the checkpoint")

        rec2 = _Recorder(t2, label, on_first=starts_from_checkpoint, views=views)
        summary = t2.fit()
    evaluated = set(summary.get("top1", {}))
    strategy = _strategy(t2)
    wanted = [*strategy.outputs(), *(p for p in [strategy.reported_output()] if p is not None)]
    if _temporal_means(t2):
        wanted += list(summary.get("outputs", {}).get("temporal_means", [])) or ["<the temporal means' peers>"]
    missing_out = sorted(set(wanted) - evaluated)
    if missing_out:
        raise AssertionError(f"{label}: outputs: {missing_out} are declared or reported but not evaluated"
                             f" (evaluated: {sorted(evaluated)})")
    if rec2.calls == 0:
        raise AssertionError(f"{label}: resume: the resumed run did no step (the schedule ended after 1 step?)")
    if summary["global_steps"] <= int(state["position"]["global_step"]):
        raise AssertionError(f"{label}: resume: the resumed run did not go past the checkpoint's step")

    # --- every declared step ran; updated modules changed, frozen ones did not
    declared = [(stage.name, st) for stage in _stages(t2) for st in stage.steps]
    never = [f"{s}/{st.name}" for s, st in declared if (s, st.name) not in rec1.seen | rec2.seen]
    if never:
        raise AssertionError(f"{label}: steps: {never} never ran (a stage with 0 epochs?)")
    final = _modules(t2)
    units = _unit_modules(t2)
    for unit in sorted({u for _, st in declared for u in st.updates}):
        for k in units[unit]:
            params0 = dict(final[k].named_parameters())
            if params0 and not any(not torch.equal(p.detach().cpu(), initial[k][pn]) for pn, p in params0.items()):
                steps = [st.name for _, st in declared if unit in st.updates]
                raise AssertionError(
                    f"{label}: updates: module '{k}' of unit '{unit}' never changed although steps {steps} update"
                    " that unit; no loss term reaches it (detached by mistake, or the step names the wrong unit)"
                )
    for k in sorted(set(_temporal_means(t2))):
        if _state_diff(final[k].state_dict(), initial[k]) is None:
            raise AssertionError(f"{label}: temporal mean: '{k}' never changed although its network trained")
    for k in sorted(_frozen(t2)):
        diff = _state_diff(final[k].state_dict(), initial[k])
        if diff:
            raise AssertionError(f"{label}: frozen: module '{k}' was registered trainable=False but changed ({diff})")


@contextlib.contextmanager
def _failures(label: str, phase: str) -> Iterator[None]:
    """Turn an exception of a run into an AssertionError that names the strategy and phase."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as e:
        raise AssertionError(f"{label}: {phase} failed: {type(e).__name__}: {e}") from e


class _Recorder:
    """Observes a Trainer through its hooks: checks every step's terms and gradient flow, the views,
    the units a step skips, the scalars the strategy logs."""

    def __init__(self, trainer: Trainer, label: str, on_first: Callable[[], None] | None = None, views: int = 1) -> None:
        self.trainer, self.label, self.on_first, self.views = trainer, label, on_first, views
        self.seen: set[tuple[str, str]] = set()
        self.calls = 0
        self._skipped: set[str] = set()
        self._updated: set[str] = set()
        self._before: dict[str, dict[str, Tensor]] = {}
        _observe(trainer, _Hooks(self.batch_start, self.terms, self.batch_end))

    def batch_start(self) -> None:
        if self.calls == 0 and self.on_first is not None:
            self.on_first()
        self._skipped, self._updated = set(), set()
        modules = _modules(self.trainer)
        self._before = {unit: {f"{k}.{n}": p.detach().clone() for k in keys for n, p in modules[k].named_parameters()}
                        for unit, keys in _unit_modules(self.trainer).items()}

    def terms(self, step: Step, ctx: StepContext, terms: LossTerms) -> None:
        self.calls += 1
        skipped = set(getattr(ctx, "skipped", ()))
        self._skipped |= skipped
        self._updated |= set(step.updates) - skipped
        for v in range(1, self.views):
            view = ctx.view(v)
            if view.shape != ctx.inputs.shape:
                raise AssertionError(f"{self.label}: views: view {v} has shape {tuple(view.shape)}, the batch"
                                     f" {tuple(ctx.inputs.shape)}")
            if torch.equal(view, ctx.inputs):
                raise AssertionError(f"{self.label}: views: view {v} equals view 0 (augmentation is on)")
        for name, value in getattr(ctx, "scalars", {}).items():
            if not torch.isfinite(torch.as_tensor(value)).all():
                raise AssertionError(f"{self.label}: ctx.log('{name}') recorded a non-finite value")
        self.after(step, ctx, terms)

    def batch_end(self) -> None:
        modules = _modules(self.trainer)
        for unit in sorted(self._skipped - self._updated):
            keys = _unit_modules(self.trainer)[unit]
            now = {f"{k}.{n}": p for k in keys for n, p in modules[k].named_parameters()}
            changed = [n for n, p in now.items() if not torch.equal(p.detach(), self._before[unit][n])]
            if changed:
                raise AssertionError(f"{self.label}: skip_update: unit '{unit}' was skipped on this batch but its"
                                     f" parameters changed ({changed[:3]})")

    def after(self, step: Step, ctx: StepContext, terms: LossTerms) -> None:
        if not step.updates or set(step.updates) <= set(getattr(ctx, "skipped", ())):
            return  # a step that updates nothing on this batch (SwitOKD's expert mode for the teacher)
        where = f"{self.label}: terms of step '{step.name}' (stage '{ctx.stage}')"
        if not isinstance(terms, Mapping) or not terms:
            raise AssertionError(f"{where}: compute returned {terms!r}, expected {{peer: {{term: tensor}}}}")
        flat: list[Tensor] = []
        for group, named in terms.items():
            if not isinstance(group, str) or not isinstance(named, Mapping) or not named:
                raise AssertionError(f"{where}: group {group!r} is {named!r}, expected a non-empty dict of named terms")
            for term, v in named.items():
                if not isinstance(v, Tensor) or v.ndim != 0 or not v.dtype.is_floating_point:
                    raise AssertionError(f"{where}: {group}/{term} is {v!r}, expected a 0-d floating tensor")
                if not torch.isfinite(v):
                    raise AssertionError(f"{where}: {group}/{term} = {float(v)} is not finite")
                flat.append(v)
        grads = [v for v in flat if v.requires_grad]
        if not grads:
            raise AssertionError(f"{where}: no term requires grad, so the step cannot update {list(step.updates)}")
        self._check_no_leak(step, torch.stack([v.float() for v in grads]).sum(), where)
        self.seen.add((ctx.stage, step.name))

    def _check_no_leak(self, step: Step, loss: Tensor, where: str) -> None:
        modules = _modules(self.trainer)
        others = [
            (unit, p)
            for unit, keys in _unit_modules(self.trainer).items()
            if unit not in step.updates
            for k in keys
            for p in modules[k].parameters()
            if p.requires_grad
        ]
        if not others:
            return
        grads = torch.autograd.grad(loss, [p for _, p in others], retain_graph=True, allow_unused=True)
        leaked = sorted({u for (u, _), g in zip(others, grads) if g is not None})
        if leaked:
            raise AssertionError(
                f"{where}: the loss sends gradient into unit(s) {leaked}, which the step does not update"
                f" (it updates {list(step.updates)}); detach targets taken from other peers or modules"
            )


def _num_views(cls: type, params: Mapping[str, Any], n: int, branched: bool, mode: str) -> int:
    """How many views the strategy asks for in the kit's run (from a throwaway instance)."""
    try:
        names = [f"net_b{k}" for k in range(n)] if branched else [f"peer{k}" for k in range(n)]
        networks = {"net": names} if branched else None
        inst = cls(cls.Params.model_validate(dict(params)), peers=names, mode=mode,
                   **({"networks": networks} if networks else {}))
        return max(dict(inst.views()).values(), default=0) + 1
    except Exception:  # the run itself reports what is wrong
        return 1


def _check_means(trainer: Trainer, initial: Mapping[str, Mapping[str, Tensor]], label: str) -> None:
    """After exactly one optimizer step, each temporal mean is ``d(0) * initial + (1 - d(0)) * network``."""
    modules = _modules(trainer)
    for name, (src, request) in _temporal_means(trainer).items():
        d = float(request.decay(0))
        net = dict(modules[src].named_parameters())
        for pname, p in modules[name].named_parameters():
            expected = d * initial[name][pname].float() + (1 - d) * net[pname].detach().cpu().float()
            if not torch.allclose(p.detach().cpu().float(), expected, rtol=1e-5, atol=1e-6):
                raise AssertionError(f"{label}: temporal mean: '{name}.{pname}' is not d(0) * initial + (1 - d(0)) *"
                                     f" network after the first update (d(0) = {d})")


def _clone_state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def _state_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> str | None:
    if set(a) != set(b):
        return f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    changed = [k for k in a if not torch.equal(a[k].detach().cpu(), b[k].detach().cpu())]
    return f"entries differ: {changed[:5]}" if changed else None


def _equal(a: Any, b: Any) -> bool:
    """Deep equality of state dicts holding tensors, containers and plain values."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)
