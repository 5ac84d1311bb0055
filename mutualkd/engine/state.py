"""Run state: the run folder, the resume checks, the position in training and checkpoint contents.

A run folder holds ``recipe.toml``, ``metrics.jsonl``, ``summary.json`` and
``checkpoints/`` (``step-<global step>/`` folders and ``best/``, each written atomically
by :mod:`mutualkd.checkpoint`). An existing run is never touched unless it is resumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mutualkd import checkpoint as ckpt
from mutualkd.config import Recipe
from mutualkd.errors import CheckpointError, UserError

__all__ = ["Position", "History", "RunFolder", "resume_folder"]


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

    def add(self, epoch: int, top1: Mapping[str, float], peer_names: list[str]) -> None:
        for k, v in top1.items():
            self.top1.setdefault(k, []).append(v)
        score = sum(top1[n] for n in peer_names) / len(peer_names)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch


def resume_folder(path: str | Path) -> Path:
    """The folder of a run to resume, or a UserError when there is none."""
    rd = Path(path)
    if not rd.is_dir():
        raise UserError("run folder to resume does not exist", where=str(rd), hint="name the folder of an earlier run")
    return rd


class RunFolder:
    """The run's folder: chosen, checked against an existing run, and created (main process only).

    ``resume`` names a run folder to continue from its latest complete checkpoint; with
    ``run.resume = "auto"`` an existing run of the same name is resumed. Otherwise a
    folder that already holds a run is refused, untouched.
    """

    def __init__(self, recipe: Recipe, accelerator: Accelerator, resume: str | Path | None = None) -> None:
        self.accelerator = accelerator
        self.recipe = recipe
        self.path = Path(recipe.run.out_dir) / recipe.run.name
        self.resume_from: Path | None = None
        self.recipe_dict = recipe.to_dict()
        self.recipe_hash = ckpt.recipe_hash(self.recipe_dict)
        if resume is not None:
            self.path = resume_folder(resume)
            latest = ckpt.latest_checkpoint(self.checkpoints)
            if latest is None:
                raise CheckpointError(
                    "no complete checkpoint to resume from (folders without the COMPLETE marker are ignored)",
                    where=str(self.checkpoints), hint="start the run again under a new run.name",
                )
            self.resume_from = latest
        elif self.path.exists() and any(self.path.iterdir()):
            latest = ckpt.latest_checkpoint(self.checkpoints)
            if recipe.run.resume != "auto" or latest is None:
                raise UserError(
                    "run folder already exists and holds a run; it is left untouched",
                    where=str(self.path),
                    hint=f"resume it with `mutualkd run --resume {self.path}`, or choose another name with --set run.name=...",
                )
            self.resume_from = latest
        else:
            self._create()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def _create(self) -> None:
        acc = self.accelerator
        # Every process has looked at the folder above; only now may the main one create
        # it (otherwise a slower process would find it "already there").
        acc.wait_for_everyone()
        problem = None
        if acc.is_main_process:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                problem = e.strerror or str(e)
        if acc.num_processes > 1:
            problem = broadcast_object_list([problem], from_process=0)[0]
        if problem is not None:
            raise UserError(f"cannot write the run folder: {problem}", where=str(self.path),
                            hint="set run.out_dir to a folder you can write to")

    def load_resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, after checking it can continue this run exactly."""
        if self.resume_from is None:
            return None
        state = ckpt.load_checkpoint(self.resume_from)
        meta = ckpt.read_meta(self.resume_from)
        saved_world, world = meta.get("num_processes", 1), self.accelerator.num_processes
        if saved_world != world:
            raise CheckpointError(
                f"the checkpoint was written by {saved_world} process(es), this run has {world};"
                " the position in the data order is per process, so it cannot continue exactly",
                where=str(self.resume_from), hint=f"resume with the same number of processes ({saved_world})",
            )
        if meta.get("recipe_hash") != self.recipe_hash:
            raise CheckpointError(
                "the recipe differs from the one this run was started with (recipe hash"
                f" {meta.get('recipe_hash')} in the checkpoint, {self.recipe_hash} now)",
                where=str(self.resume_from),
                hint="resume with the run's own recipe (leave RECIPE out: mutualkd run --resume RUN_DIR), or start a new run",
            )
        return state

    def step_checkpoint(self, global_step: int) -> Path:
        return self.checkpoints / f"step-{global_step:08d}"

    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best"
