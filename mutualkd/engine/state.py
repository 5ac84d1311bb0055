"""Run state: the run folder, the resume checks, the position in training and checkpoint contents.

A run folder holds ``recipe.toml``, ``metrics.jsonl``, ``summary.json`` and
``checkpoints/`` (``step-<global step>/`` folders and ``best/``, each written atomically
by :mod:`mutualkd.checkpoint`). An existing run is never touched unless it is resumed,
and only one process at a time writes a run folder: the main process holds its lock
(:mod:`mutualkd.runlock`) from the moment it is chosen until the run ends.

Resuming takes the newest checkpoint that loads (its hash checked); newer ones that do
not are skipped with a warning naming each, and set aside (``.invalid-*``) once the run
goes on. A checkpoint folder named on the command line is used as it is or refused. A
run killed before its first checkpoint starts again from the beginning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
import time
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from mutualkd import checkpoint as ckpt
from mutualkd.config import Recipe
from mutualkd.engine.process import on_main
from mutualkd.runlock import RunLock, run_folder_of
from mutualkd.errors import CheckpointError, UserError
from mutualkd.names import inside

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Position", "History", "EpochTotals", "EpochClock", "RunFolder", "resume_folder", "resume_checkpoint", "recipe_changes"]


@dataclass
class Position:
    """Where training is: stage, epoch within it, next batch, global epoch and step counters."""

    stage: int = 0
    stage_epoch: int = 0  # epoch within the stage
    batch: int = 0  # next batch of that epoch
    epoch: int = 0  # global epoch counter (data order)
    global_step: int = 0


@dataclass
class History:
    """Test top-1 per model and epoch, and the best epoch so far (mean top-1 of the peers)."""

    top1: dict[str, list[float]] = field(default_factory=dict)
    best_score: float = -1.0
    best_epoch: int = -1
    #: The global epoch (as metrics.jsonl numbers it) of each value in ``top1``: a staged run
    #: evaluates some epochs only, so a list position is not an epoch. Empty in snapshots written
    #: before it existed: those runs evaluated every epoch from the first (:meth:`epochs_of`).
    epochs: dict[str, list[int]] = field(default_factory=dict)

    def add(self, epoch: int, top1: Mapping[str, float], peer_names: list[str]) -> None:
        for k, v in top1.items():
            self.top1.setdefault(k, []).append(v)
            self.epochs.setdefault(k, []).append(epoch)
        score = sum(top1[n] for n in peer_names) / len(peer_names)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch

    def epochs_of(self, name: str) -> list[int]:
        """The global epoch of each of ``name``'s values."""
        known = self.epochs.get(name, [])
        n = len(self.top1.get(name, []))
        return known if len(known) == n else list(range(1, n + 1))

    def at_epoch(self, epoch: int) -> dict[str, float]:
        """Each model's top-1 at global ``epoch`` (the models evaluated then)."""
        out = {}
        for name, values in self.top1.items():
            epochs = self.epochs_of(name)
            if epoch in epochs:
                out[name] = values[epochs.index(epoch)]
        return out



class EpochTotals:
    """The running sums behind an epoch's record: each loss term's sum (kept on the device, read
    once at the epoch's end), the batches counted, and the strategy's logged scalars as [sum, batches].

    Saved in checkpoints (:meth:`state_dict`) so that the record of an epoch resumed mid-way is the
    one the uninterrupted run writes.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new epoch: nothing counted."""
        self.sums: dict[str, Any] = {}
        self.count = 0
        self.scalars: dict[str, list[Any]] = {}

    def add(self, terms: Mapping[str, Mapping[str, Tensor]], scalars: Mapping[str, Tensor] | None) -> None:
        """One batch: its loss terms (step -> term -> value) and the scalars the strategy logged."""
        for step_terms in terms.values():
            for key, v in step_terms.items():
                self.sums[key] = self.sums.get(key, 0.0) + v.float()
        self.count += 1
        for key, v in (scalars or {}).items():
            acc = self.scalars.setdefault(key, [0.0, 0])
            acc[0], acc[1] = acc[0] + v.float(), acc[1] + 1

    def loss(self) -> dict[str, float]:
        """Each term's mean over the epoch's batches."""
        return {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}

    def scalar_means(self) -> dict[str, float]:
        """Each logged scalar's mean over the batches that logged it."""
        return {k: float(v) / max(n, 1) for k, (v, n) in self.scalars.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_acc": {k: float(v) for k, v in self.sums.items()}, "epoch_count": self.count,
                "epoch_scalars": {k: [float(v), int(n)] for k, (v, n) in self.scalars.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = dict(state.get("epoch_acc", {}))
        self.count = int(state.get("epoch_count", 0))
        self.scalars = {k: [float(v), int(n)] for k, (v, n) in state.get("epoch_scalars", {}).items()}


def resume_checkpoint(path: str | Path) -> Path | None:
    """``path`` if it is a checkpoint folder of a run (``RUN_DIR/checkpoints/<name>``), else None."""
    p = Path(path)
    if (p / ckpt.META).exists() or (p / ckpt.STATE).exists() or (p / ckpt.MARKER).exists():
        if p.parent.name != "checkpoints":
            raise UserError("this checkpoint folder is not inside a run folder's checkpoints/", where=str(p),
                            hint="name the run folder, or one of the folders under its checkpoints/")
        return p
    return None


def resume_folder(path: str | Path) -> Path:
    """The folder of a run to resume (given itself or one of its checkpoint folders), or a UserError."""
    folder = run_folder_of(path)
    resume_checkpoint(path)  # a checkpoint folder outside a run's checkpoints/ is refused
    return folder


def _started_without_checkpoint(path: Path) -> bool:
    """A run that wrote its recipe but was stopped before its first checkpoint (and did not finish)."""
    if not (path / "recipe.toml").is_file() or (path / "summary.json").exists():
        return False
    cks = path / "checkpoints"
    return not cks.exists() or all(p.name.startswith(".") for p in cks.iterdir())


def _saved_recipe_hash(path: Path) -> str | None:
    """The recipe hash of a run folder's own recipe.toml (None if it cannot be read)."""
    from mutualkd.config import load_recipe

    try:
        return ckpt.recipe_hash(load_recipe(path / "recipe.toml").to_dict())
    except UserError:
        return None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"strategy.lambda_inh": 50.0, "peers.0.model": ...}`` from a nested recipe dict."""
    if isinstance(d, Mapping):
        items = d.items()
    elif isinstance(d, list) and any(isinstance(v, (Mapping, list)) for v in d):
        items = ((str(i), v) for i, v in enumerate(d))
    else:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recipe_changes(saved: Mapping[str, Any], now: Mapping[str, Any], limit: int = 6) -> list[str]:
    """The keys whose values differ between a run's saved recipe and this one, as ``key: then -> now`` lines.

    Fields a resume may change (logging, ``run.max_steps``) are left out. A key the saved
    recipe lacks (one added to mutualkd after the run started) is shown with today's default.
    """
    may_change = {f"run.{k}" for k in ckpt.RESUME_MAY_CHANGE}
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in may_change or a.get(key, ...) == b.get(key, ...):
            continue
        if key not in a:
            out.append(f"{key}: absent from the run's recipe.toml, {b[key]!r} now (today's default)")
        elif key not in b:
            out.append(f"{key}: {a[key]!r} then, not a key now")
        else:
            out.append(f"{key}: {a[key]!r} then, {b[key]!r} now")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _none_complete(folder: Path) -> CheckpointError:
    bad = ckpt.scan_checkpoints(folder)[1]
    listed = "".join(f"\n  {p}: {why}" for p, why in bad)
    return CheckpointError(
        f"no complete checkpoint to resume from{':' if bad else ''}{listed}", where=str(folder),
        hint="restore the checkpoints from a backup, or start the run again under a new run.name",
    )


class RunFolder:
    """The run's folder: chosen, checked against an existing run, locked and created (main process only).

    ``resume`` names a run folder to continue from its newest loadable checkpoint, or a
    checkpoint folder of it to continue from that one; with ``run.resume = "auto"`` an
    existing run of the same name is resumed. Otherwise a folder that already holds a run
    is refused, untouched. Call :meth:`release` when the run ends (the lock also goes
    with the process).
    """

    def __init__(self, recipe: Recipe, accelerator: Accelerator, resume: str | Path | None = None) -> None:
        self.accelerator = accelerator
        self.recipe = recipe
        self.path = Path(recipe.run.out_dir) / recipe.run.name
        self.resume_from: Path | None = None
        #: The checkpoint named on the command line (``--resume RUN_DIR/checkpoints/step-...``).
        self.requested: Path | None = None
        #: True when the folder holds a run stopped before its first checkpoint: it starts again.
        self.restart = False
        #: Checkpoints that could not be resumed from, with the reason (set aside by :meth:`set_aside_skipped`).
        self.skipped: list[tuple[Path, str]] = []
        #: Lines for the console: repairs and warnings.
        self.notes: list[str] = []
        self.recipe_dict = recipe.to_dict()
        self.recipe_hash = ckpt.recipe_hash(self.recipe_dict)
        #: True when an existing run is continued (or started again), False for a new run folder.
        self.resuming = False
        if resume is not None:
            self.requested = resume_checkpoint(resume)
            self.path = resume_folder(resume)
        else:  # run.name was validated at load; the folder written must still lie under run.out_dir
            inside(Path(recipe.run.out_dir), self.path, what="the run folder",
                   hint="set run.name to a plain folder name, and run.out_dir to the folder that holds the runs")
        self.lock = RunLock(self.path)
        if resume is not None:
            self._open_existing()
        elif self.path.exists() and not self.path.is_dir():
            raise UserError("run.out_dir/run.name is a file, not a folder", where=str(self.path),
                            hint="choose another name with --set run.name=..., or move the file away")
        elif self.path.exists() and any(self.path.iterdir()):
            if recipe.run.resume != "auto" or not (self.checkpoints.is_dir() or _started_without_checkpoint(self.path)):
                raise UserError(
                    "run folder already exists and holds a run; it is left untouched",
                    where=str(self.path),
                    hint=f"resume it with `mutualkd run --resume {self.path}`, or choose another name with --set run.name=...",
                )
            self._open_existing()
        else:
            self._create()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # ------------------------------------------------------------------ locking (main process), together
    def _on_main(self, work: Callable[[], list[str] | None]) -> None:
        """Run ``work()`` on the main process (it returns notes); every process raises the UserError it raised, if any."""
        def guarded() -> list[str]:
            try:
                return work() or []
            except OSError as e:
                raise UserError(f"cannot write the run folder: {e.strerror or e}", where=str(self.path),
                                hint="set run.out_dir to a folder you can write to") from None

        self.notes.extend(on_main(self.accelerator, guarded, if_failed=self.lock.release) or [])

    def _lock(self) -> list[str]:
        self.lock.acquire()
        if self.lock.unsupported:
            return [f"the run folder cannot be locked ({self.lock.unsupported}); make sure no other process writes it"]
        return []

    def _create(self) -> None:
        # Every process has looked at the folder above; only now may the main one create
        # it (otherwise a slower process would find it "already there").
        self.accelerator.wait_for_everyone()

        def create() -> list[str]:
            self.path.mkdir(parents=True, exist_ok=True)
            notes = self._lock()
            if any(self.path.iterdir()):  # another process created and filled it meanwhile
                raise UserError("run folder already exists and holds a run; it is left untouched", where=str(self.path),
                                hint="choose another name with --set run.name=...")
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
            return notes

        self._on_main(create)

    def _open_existing(self) -> None:
        """Lock an existing run folder and put back checkpoints a kill left half-swapped (main process)."""
        def open_() -> list[str]:
            notes = self._lock()
            return notes + ckpt.restore_leftovers(self.checkpoints)

        self.resuming = True
        self._on_main(open_)
        if self.requested is None and ckpt.latest_checkpoint(self.checkpoints) is None:
            if _started_without_checkpoint(self.path):
                if _saved_recipe_hash(self.path) != self.recipe_hash:
                    self.release()
                    raise CheckpointError(
                        "the run was stopped before its first checkpoint, and its recipe.toml differs from this recipe",
                        where=str(self.path), hint="resume with the run's own recipe (mutualkd run --resume RUN_DIR),"
                        " or start a new run under another run.name",
                    )
                self.restart = True
                self.notes.append("the run was stopped before its first checkpoint; it starts again from the beginning")
                return
            self.release()
            raise _none_complete(self.checkpoints)

    def release(self) -> None:
        """Drop the run folder's lock (the run ended, or was refused)."""
        self.lock.release()

    # ------------------------------------------------------------------ the checkpoint to resume from
    def _candidates(self) -> list[Path]:
        if self.requested is not None:
            return [self.requested]
        good, bad = ckpt.scan_checkpoints(self.checkpoints)
        self.skipped.extend(bad)
        return [p for _, p in reversed(good)]

    def load_resume_state(self) -> dict[str, Any] | None:
        """The state of the newest checkpoint that loads, after checking it can continue this run exactly.

        Checkpoints that do not load (a hash that does not match, a damaged meta.json) are
        skipped, newest first, and listed in :attr:`skipped`; a checkpoint named on the
        command line is not skipped but refused. A recipe or process count that does not fit
        is refused: an older checkpoint would not fit either.
        """
        if not self.resuming or self.restart:
            return None
        failed: list[tuple[Path, str]] = []
        for path in self._candidates():
            try:
                state = ckpt.load_checkpoint(path)
                meta = ckpt.read_meta(path)
            except CheckpointError as e:
                if self.requested is not None:
                    raise
                failed.append((path, e.message))
                continue
            self._check_fits(path, meta)
            self.resume_from = path
            self.skipped.extend(failed)
            for p, why in self.skipped:
                self.notes.append(f"skipped checkpoint {p.name}: {why}")
            if self.skipped:
                self.notes.append(f"resuming from {path.name}, the newest checkpoint that loads")
            return state
        if failed:
            listed = "\n  ".join(f"{p}: {why}" for p, why in failed)
            raise CheckpointError(
                f"no checkpoint of the run can be resumed from:\n  {listed}", where=str(self.checkpoints),
                hint="restore the checkpoints from a backup, or start the run again under a new run.name",
            )
        raise _none_complete(self.checkpoints)

    def _check_fits(self, path: Path, meta: Mapping[str, Any]) -> None:
        saved_world, world = meta.get("num_processes", 1), self.accelerator.num_processes
        if saved_world != world:
            raise CheckpointError(
                f"the checkpoint was written by {saved_world} process(es), this run has {world};"
                " the position in the data order is per process, so it cannot continue exactly",
                where=str(path), hint=f"resume with the same number of processes ({saved_world})",
            )
        if meta.get("recipe_hash") != self.recipe_hash:
            changes = self._changes_since_start()
            hint = "resume with the run's own recipe (leave RECIPE out: mutualkd run --resume RUN_DIR), or start a new run"
            absent = [c.split(":")[0] for c in changes if "absent from the run's recipe.toml" in c]
            if changes and len(absent) == len(changes):
                hint = ("a key the run's recipe.toml lacks (one added to mutualkd after the run started) takes today's"
                        " default; to continue the run exactly, give it the value the run used ("
                        + " ".join(f"--set {k}=..." for k in absent) + "), or start a new run")
            listed = "".join(f"\n  {c}" for c in changes)
            raise CheckpointError(
                "the recipe differs from the one this run was started with (recipe hash"
                f" {meta.get('recipe_hash')} in the checkpoint, {self.recipe_hash} now){':' if changes else ''}{listed}",
                where=str(path), hint=hint,
            )

    def _changes_since_start(self) -> list[str]:
        """What differs from the run folder's own recipe.toml (empty when it cannot be read)."""
        from mutualkd.config import read_toml

        try:
            saved = read_toml(self.path / "recipe.toml")
        except UserError:
            return []
        return recipe_changes(saved, self.recipe_dict)

    def set_aside_skipped(self) -> None:
        """Rename the skipped checkpoints out of the way (``.invalid-*``, kept): main process, once the run goes on."""
        for path, _ in self.skipped:
            if path.exists():
                ckpt.set_aside(path)
        self.skipped = []

    def best_is_stale(self, best_epoch: int) -> str | None:
        """Why ``best/`` does not hold epoch ``best_epoch`` (missing, damaged, another epoch), or None."""
        best = self.best_checkpoint()
        if best_epoch <= 0:
            return None
        if not best.exists():
            return "best/ is missing"
        problem = ckpt.verify_checkpoint(best)
        if problem is not None:
            return f"best/ cannot be loaded ({problem})"
        epoch = ckpt.read_meta(best).get("epoch")
        return None if epoch == best_epoch else f"best/ holds epoch {epoch}, the best epoch so far is {best_epoch}"

    def step_checkpoint(self, global_step: int) -> Path:
        return self.checkpoints / f"step-{global_step:08d}"

    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best"


class EpochClock:
    """Wall time, images and time spent waiting for data in the current epoch."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def images_per_s(self) -> float:
        return self.images / max(self.elapsed(), 1e-9)
