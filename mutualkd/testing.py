"""The conformance kit: the properties every plugin must have, as checks for a plugin's own tests.

A plugin author calls these from pytest (they need nothing else)::

    from mutualkd.testing import check_metric, check_strategy

    def test_my_distance_conforms():
        check_metric(my_distance)

    def test_my_strategy_conforms(tmp_path):
        check_strategy(MyStrategy, params={"weight": 0.5}, tmp_path=tmp_path)

Each check raises :class:`AssertionError` naming the plugin, the property that failed and
the values that broke it. Every built-in strategy and metric passes them (see
``tests/test_plugin_kit.py``).

* :func:`check_metric`: a distance ``d(a, b)`` between factor batches ``[B, ...]``.
* :func:`check_strategy`: a tiny end-to-end training run of a strategy class on the
  digits data, with a checkpoint, a resume, and checks on every step's loss terms.
* :func:`registered`: register an object in the plugin registry for the duration of a
  ``with`` block, so the engine (which only asks the registry by name) can run a class
  that is not installed through an entry point.
* :func:`make_teacher`: a throwaway trained run to use as a teacher checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
from pathlib import Path
import tempfile
from typing import Any

import torch
from torch import Tensor, nn

from mutualkd._registry import Kind, _validate, registry

__all__ = ["check_metric", "check_strategy", "registered", "make_teacher"]

Metric = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def registered(kind: Kind, name: str, obj: Any) -> Iterator[Any]:
    """Register ``obj`` as the ``kind`` plugin ``name`` inside a ``with`` block.

    The object is validated like an installed plugin, a name that is already taken is an
    error (nothing is overwritten), and the registration is removed on exit. Its
    distribution is listed as ``<test>``.
    """
    registry.register(kind, name, obj, distribution="<test>")
    try:
        yield obj
    finally:
        registry.unregister(kind, name)


# ============================================================================ metrics


def check_metric(fn: Metric, *, name: str | None = None, symmetric: bool = True) -> None:
    """Check that ``fn`` is a usable distance between factor batches.

    Properties, each checked on fixed pseudo-random inputs (the global RNG is untouched):

    1. *scalar*: ``fn(a, b)`` is a 0-d floating tensor, finite, for ``[B, N]`` and
       ``[B, C, H, W]`` inputs, on the inputs' device; the inputs are not modified.
    2. *identity*: ``d(a, a) ~ 0``, also for a copy of ``a``, rescaled ``a`` and an ``a``
       holding an all-zero sample.
    3. *non-negative*: ``d >= 0`` for random, opposite, rescaled, orthogonal and zero pairs.
    4. *separates*: ``d(a, b) > 0`` for two unrelated random batches.
    5. *symmetric*: ``d(a, b) == d(b, a)``. Required: inheritance and exploration use the
       same distance in both roles, and every metric of the methods is symmetric. Pass
       ``symmetric=False`` only for a deliberately asymmetric divergence.
    6. *gradients*: differentiable in both arguments, with finite gradients for random
       inputs, at ``a == b``, with all-zero samples and with all-zero batches.
    7. *dtypes*: float64 inputs agree with float32 ones; bfloat16 inputs are accepted
       (finite value and gradients).
    8. *devices*: CPU, and CUDA when available (same value as on CPU).
    9. *batch size*: ``B = 2`` must work; ``B = 1`` may raise :class:`ValueError` (e.g.
       CKA, which centres over the batch) or must work.
    10. *shape mismatch*: inputs of different shapes (even broadcastable ones) raise
        :class:`ValueError` or :class:`TypeError`.
    """
    label = f"metric '{name or getattr(fn, '__name__', repr(fn))}'"
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    shape4, shape2 = (4, 3, 2, 2), (4, 12)
    a, b = rand(*shape4), rand(*shape4)
    a2, b2 = rand(*shape2), rand(*shape2)

    # 1. scalar output, both layouts; inputs untouched
    before = (a.clone(), b.clone())
    d_ab = _value(fn, a, b, label, "scalar output")
    if not (torch.equal(a, before[0]) and torch.equal(b, before[1])):
        raise AssertionError(f"{label}: inputs: the metric modified its input tensors in place")
    _value(fn, a2, b2, label, "scalar output for [B, N] inputs")
    if d_ab.device != a.device:
        raise AssertionError(f"{label}: device: inputs on {a.device}, result on {d_ab.device}")

    # 2. identity
    with_zero = a.clone()
    with_zero[1] = 0.0
    for what, x, y in [
        ("d(a, a)", a, a),
        ("d(a, copy of a)", a, a.clone()),
        ("d(1000 a, 1000 a)", 1000 * a, 1000 * a.clone()),
        ("d(a, a) for [B, N] inputs", a2, a2.clone()),
        ("d(a, a) where a has an all-zero sample", with_zero, with_zero.clone()),
    ]:
        v = float(_value(fn, x, y, label, "identity"))
        if abs(v) > 1e-4:
            raise AssertionError(f"{label}: identity: {what} = {v:.3g}, expected 0 (tolerance 1e-4)")

    # 3. non-negativity over pairs that stress it
    orth_a, orth_b = torch.zeros(shape2), torch.zeros(shape2)
    orth_a[:, :6], orth_b[:, 6:] = rand(4, 6), rand(4, 6)
    pairs = {
        "random": (a, b),
        "opposite (b = -a)": (a, -a),
        "rescaled (b = 3 a)": (a, 3 * a),
        "orthogonal samples": (orth_a, orth_b),
        "b all zero": (a, torch.zeros_like(a)),
        "one all-zero sample": (with_zero, b),
        "large values (1e4)": (1e4 * a, 1e4 * b),
        "small values (1e-4)": (1e-4 * a, 1e-4 * b),
    }
    for what, (x, y) in pairs.items():
        v = float(_value(fn, x, y, label, "non-negativity"))
        if v < -1e-6:
            raise AssertionError(f"{label}: non-negativity: d = {v:.6g} < 0 for the {what} pair")

    # 4. separates different inputs
    if float(d_ab) <= 1e-6:
        raise AssertionError(
            f"{label}: separates: d(a, b) = {float(d_ab):.3g} for two unrelated random batches; a distance"
            " must be positive for different inputs"
        )

    # 5. symmetry
    if symmetric:
        for what, (x, y) in pairs.items():
            dxy = float(_value(fn, x, y, label, "symmetry"))
            dyx = float(_value(fn, y, x, label, "symmetry"))
            if abs(dxy - dyx) > 1e-5 + 1e-4 * abs(dxy):
                raise AssertionError(
                    f"{label}: symmetry: d(a, b) = {dxy:.6g} but d(b, a) = {dyx:.6g} for the {what} pair"
                    " (pass symmetric=False only for a deliberately asymmetric divergence)"
                )

    # 6. gradients
    zeros = torch.zeros(shape4)
    for what, x, y, must_move in [
        ("random inputs", a, b, True),
        ("a == b", a, a.clone(), False),
        ("a with an all-zero sample", with_zero, b, False),
        ("a == b with an all-zero sample", with_zero, with_zero.clone(), False),
        ("a all zero", zeros, b, False),
        ("a and b all zero", zeros, zeros.clone(), False),
    ]:
        _gradients(fn, x, y, label, what, must_move=must_move)

    # 7. dtypes
    d64 = float(_value(fn, a.double(), b.double(), label, "float64 inputs"))
    if abs(d64 - float(d_ab)) > 1e-4 + 1e-3 * abs(d64):
        raise AssertionError(f"{label}: dtypes: float64 gives {d64:.6g}, float32 gives {float(d_ab):.6g}")
    v = float(_value(fn, a.double(), a.double().clone(), label, "float64 inputs"))
    if abs(v) > 1e-8:
        raise AssertionError(f"{label}: identity: d(a, a) = {v:.3g} for float64 inputs, expected 0 (tolerance 1e-8)")
    _value(fn, a.bfloat16(), b.bfloat16(), label, "bfloat16 inputs")
    _gradients(fn, a.bfloat16(), b.bfloat16(), label, "bfloat16 inputs", must_move=False)

    # 8. devices
    if torch.cuda.is_available():
        dc = _value(fn, a.cuda(), b.cuda(), label, "CUDA inputs")
        if dc.device.type != "cuda":
            raise AssertionError(f"{label}: device: inputs on cuda, result on {dc.device}")
        if abs(float(dc) - float(d_ab)) > 1e-4 + 1e-3 * abs(float(d_ab)):
            raise AssertionError(f"{label}: device: CUDA gives {float(dc):.6g}, CPU gives {float(d_ab):.6g}")
        _gradients(fn, a.cuda(), b.cuda(), label, "CUDA inputs", must_move=True)

    # 9. batch sizes 2 (required) and 1 (may be refused with ValueError)
    _value(fn, a[:2], b[:2], label, "batch size 2")
    _gradients(fn, a[:2], b[:2], label, "batch size 2", must_move=False)
    try:
        out = fn(a[:1], b[:1])
    except ValueError:
        pass
    except Exception as e:
        raise AssertionError(
            f"{label}: batch size 1: raised {type(e).__name__}: {e}; a metric may refuse B = 1 only with ValueError"
        ) from e
    else:
        _check_scalar(out, label, "batch size 1")

    # 10. shape mismatch
    for sa, sb in [((4, 3, 2, 2), (4, 3, 2, 3)), ((4, 12), (3, 12)), ((4, 12), (4, 1)), ((4, 12), (12,))]:
        try:
            out = fn(rand(*sa), rand(*sb))
        except (ValueError, TypeError):
            continue
        except Exception as e:
            raise AssertionError(
                f"{label}: shape mismatch: shapes {sa} and {sb} raised {type(e).__name__}: {e};"
                " expected ValueError or TypeError"
            ) from e
        raise AssertionError(
            f"{label}: shape mismatch: shapes {sa} and {sb} returned {out!r} instead of raising ValueError"
            " (check a.shape == b.shape before any broadcasting)"
        )


def _check_scalar(out: Any, label: str, prop: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise AssertionError(f"{label}: {prop}: returned {type(out).__name__}, expected a 0-d tensor")
    if out.ndim != 0:
        raise AssertionError(f"{label}: {prop}: returned shape {tuple(out.shape)}, expected a scalar (0-d tensor)")
    if not out.dtype.is_floating_point:
        raise AssertionError(f"{label}: {prop}: returned dtype {out.dtype}, expected a floating dtype")
    if not torch.isfinite(out):
        raise AssertionError(f"{label}: {prop}: returned {float(out)}, expected a finite value")
    return out


def _value(fn: Metric, a: Tensor, b: Tensor, label: str, prop: str) -> Tensor:
    """``fn(a, b)`` with no graph, checked to be a finite scalar."""
    try:
        with torch.no_grad():
            out = fn(a, b)
    except Exception as e:
        raise AssertionError(
            f"{label}: {prop}: raised {type(e).__name__}: {e} for inputs of shape {tuple(a.shape)}, dtype {a.dtype}"
        ) from e
    return _check_scalar(out, label, prop)


def _gradients(fn: Metric, a: Tensor, b: Tensor, label: str, what: str, *, must_move: bool) -> None:
    """Backpropagate ``fn(a, b)``: both gradients exist and are finite (and non-zero if ``must_move``)."""
    x = a.detach().clone().requires_grad_(True)
    y = b.detach().clone().requires_grad_(True)
    try:
        out = fn(x, y)
        _check_scalar(out, label, f"gradients ({what})")
        if not out.requires_grad:
            raise AssertionError(f"{label}: gradients ({what}): the result does not require grad (detached inside?)")
        out.backward()
    except AssertionError:
        raise
    except Exception as e:
        raise AssertionError(f"{label}: gradients ({what}): raised {type(e).__name__}: {e}") from e
    for arg, t in (("a", x), ("b", y)):
        if t.grad is None:
            raise AssertionError(f"{label}: gradients ({what}): no gradient reaches {arg}; the metric must be differentiable in both")
        bad = int((~torch.isfinite(t.grad)).sum())
        if bad:
            raise AssertionError(
                f"{label}: gradients ({what}): {bad} non-finite gradient element(s) into {arg},"
                f" e.g. {t.grad[~torch.isfinite(t.grad)][:3].tolist()} (guard sqrt/division by eps)"
            )
        if must_move and not bool((t.grad != 0).any()):
            raise AssertionError(f"{label}: gradients ({what}): the gradient into {arg} is all zero")


# ============================================================================ strategies


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


#: Digits, 32 training images in batches of 16: two batches per epoch.
_DATA: dict[str, Any] = {
    "dataset": "digits", "batch_size": 16, "eval_batch_size": 64, "train_subset": 32, "test_subset": 32, "augment": False,
}


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
    * the resumed Trainer starts from exactly the checkpoint's weights and strategy state.
    """
    problem = _validate("strategy", cls)
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

    raw: dict[str, Any] = {
        "run": {"name": "run", "out_dir": str(folder), "epochs": 2, "max_steps": 1, "progress": False,
                "device": device, "log_every": 1, "seed": 0},
        "data": _DATA,
        "peers": [{"model": model} for _ in range(n)],
        "optimizer": {"name": "sgd", "lr": 0.01},
        "strategy": {"name": name, **params},
        "schedule": {"mode": mode},
    }
    file = f"<check_strategy {cls.__name__}>"

    # --- part 1: one step, then the run stops and writes its checkpoint
    with _failures(label, "first run (1 step)"):
        t1 = Trainer(parse_recipe(raw, file=file), recipe_file=file)
        initial = {k: _clone_state(m) for k, m in _modules(t1).items()}
        rec1 = _Recorder(t1, label)
        t1.fit()
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
    if not _equal(saved, t1.strategy.state_dict()):
        raise AssertionError(f"{label}: state: the saved strategy state differs from state_dict() of the running strategy")
    with _failures(label, "state round trip"):
        fresh = cls(t1.strategy.params, peers=t1.peer_names, mode=mode)
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
            if not _equal(t2.strategy.state_dict(), saved):
                raise AssertionError(f"{label}: resume: the strategy state was not restored from the checkpoint")

        rec2 = _Recorder(t2, label, on_first=starts_from_checkpoint)
        summary = t2.fit()
    if rec2.calls == 0:
        raise AssertionError(f"{label}: resume: the resumed run did no step (the schedule ended after 1 step?)")
    if summary["global_steps"] <= int(state["position"]["global_step"]):
        raise AssertionError(f"{label}: resume: the resumed run did not go past the checkpoint's step")

    # --- every declared step ran; updated modules changed, frozen ones did not
    declared = [(stage.name, st) for stage in t2.stages for st in stage.steps]
    never = [f"{s}/{st.name}" for s, st in declared if (s, st.name) not in rec1.seen | rec2.seen]
    if never:
        raise AssertionError(f"{label}: steps: {never} never ran (a stage with 0 epochs?)")
    final = _modules(t2)
    for unit in sorted({u for _, st in declared for u in st.updates}):
        for k in t2.units[unit].modules:
            params0 = dict(final[k].named_parameters())
            if params0 and not any(not torch.equal(p.detach().cpu(), initial[k][pn]) for pn, p in params0.items()):
                steps = [st.name for _, st in declared if unit in st.updates]
                raise AssertionError(
                    f"{label}: updates: module '{k}' of unit '{unit}' never changed although steps {steps} update"
                    " that unit; no loss term reaches it (detached by mistake, or the step names the wrong unit)"
                )
    for k in sorted(t2.frozen):
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
    """Wraps ``trainer.strategy.compute``: checks every step's terms and gradient flow."""

    def __init__(self, trainer: Any, label: str, on_first: Callable[[], None] | None = None) -> None:
        self.trainer, self.label, self.on_first = trainer, label, on_first
        self.inner = trainer.strategy.compute
        self.seen: set[tuple[str, str]] = set()
        self.calls = 0
        trainer.strategy.compute = self  # an instance attribute shadows the method

    def __call__(self, step: Any, ctx: Any) -> Any:
        if self.calls == 0 and self.on_first is not None:
            self.on_first()
        self.calls += 1
        terms = self.inner(step, ctx)
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
        return terms

    def _check_no_leak(self, step: Any, loss: Tensor, where: str) -> None:
        t = self.trainer
        others = [
            (u.name, p)
            for u in t.units.values()
            if u.name not in step.updates
            for m in u.modules
            for p in t._module(m).parameters()
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


def _modules(trainer: Any) -> dict[str, nn.Module]:
    """Every module of a Trainer by checkpoint key: peers' timm models and auxiliary modules."""
    acc = trainer.accelerator
    out = {name: acc.unwrap_model(trainer.peer_modules[i]).model for i, name in enumerate(trainer.peer_names)}
    out.update({k: acc.unwrap_model(m) for k, m in trainer.aux.items()})
    return out


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
