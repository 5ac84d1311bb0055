"""Experiment trackers through Accelerate: TensorBoard, MLflow, W&B, Aim, trackio, ... (``run.log_with``).

The trainer's Accelerator is made with ``log_with`` and the run folder as its
``project_dir``; :class:`TrackerLog` starts the trackers at the start of the fit, with
the resolved recipe as the run's config (hyperparameters), and sends them every scalar
that ``metrics.jsonl`` gets, with the global step: each step record as ``step/...``
(``step/loss/<peer>/<term>``, ``step/lr/<unit>``, ``step/images_per_s``, ...) and each
epoch record as ``epoch/...`` (``epoch/loss/<peer>/<term>``, ``epoch/top1/<model>``,
``epoch/lr/<unit>``, ...), see :func:`scalars`. Only the main process logs.

Where they write, by default inside the run folder's ``tracking/``: TensorBoard event
files in ``tracking/<project>/``, MLflow's file store in ``tracking/mlruns`` (unless
``MLFLOW_TRACKING_URI`` names another store), W&B's files in ``tracking/wandb``
(``WANDB_MODE=offline`` works without a network), Aim's repository in ``tracking/``.

A resumed run continues the same tracker run where the tracker allows it: the MLflow run
id, the W&B run id and the Aim run hash are saved in every checkpoint (this callback's
``state_dict``); TensorBoard gets ``purge_step``, so its readers drop what the
interrupted run logged after the checkpoint. What a tracker cannot take back (MLflow,
W&B, Aim keep the values logged between the checkpoint and the interruption, and get them
again) is listed in docs/tracking.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
import uuid

from mutualkd.engine.hooks import Callback, _is_log_step, step_record
from mutualkd.errors import RecipeError, UserError
from mutualkd.names import inside

if TYPE_CHECKING:
    from mutualkd.engine.step import StepResult
    from mutualkd.engine.trainer import Trainer

__all__ = ["DEFAULT_PROJECT", "TRACKER_EXTRAS", "TRACKER_MIN_ACCELERATE", "check_trackers", "scalars", "recipe_config",
           "TrackerLog"]

#: The project (W&B), experiment (MLflow) and TensorBoard folder when ``run.tracker_project`` is unset.
DEFAULT_PROJECT = "mutualkd"

#: Each tracker name: (the mutualkd extra that installs it, the name of Accelerate's availability check).
TRACKER_EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "mlflow": ("mlflow", "is_mlflow_available"),
    "wandb": ("wandb", "is_wandb_available"),
    "aim": ("aim", "is_aim_available"),
    "trackio": ("trackio", "is_trackio_available"),
    "comet_ml": ("comet_ml", "is_comet_ml_available"),
    "clearml": ("clearml", "is_clearml_available"),
    "dvclive": ("dvclive", "is_dvclive_available"),
    "swanlab": ("swanlab", "is_swanlab_available"),
}


#: The first Accelerate release that ships each tracker added after mutualkd's accelerate floor;
#: the tracker's extra requires it, so ``pip install 'mutualkd[NAME]'`` brings it.
TRACKER_MIN_ACCELERATE: dict[str, str] = {"swanlab": "1.8", "trackio": "1.9"}


def check_trackers(names: Sequence[str] | None, *, file: str = "<recipe>") -> None:
    """A RecipeError naming the extra to install for the first tracker of ``names`` that is not installed,
    or that the installed Accelerate does not ship yet."""
    import accelerate
    import accelerate.utils as au

    for i, name in enumerate(names or ()):
        extra, check = TRACKER_EXTRAS[name]
        available = getattr(au, check, None)
        if available is None:
            need = TRACKER_MIN_ACCELERATE.get(name)
            came = f" (its {name} tracker came in accelerate {need})" if need else ""
            brings = f" (it brings accelerate>={need})" if need else " and upgrade accelerate"
            raise RecipeError(
                f"run.log_with names '{name}', which Accelerate {accelerate.__version__} does not ship{came}",
                file=file, field=f"run.log_with[{i}]",
                hint=f"pip install 'mutualkd[{extra}]'{brings}, or remove '{name}' from run.log_with",
            )
        if not available():
            raise RecipeError(
                f"run.log_with names '{name}', which is not installed", file=file, field=f"run.log_with[{i}]",
                hint=f"pip install 'mutualkd[{extra}]' (or remove '{name}' from run.log_with)",
            )


def project_name(trainer: Trainer) -> str:
    return trainer.recipe.run.tracker_project or DEFAULT_PROJECT


def tracking_dir(run_dir: Path) -> Path:
    """Where the trackers write inside a run folder."""
    return run_dir / "tracking"


# --------------------------------------------------------------------------- what is logged


def _walk(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _walk(f"{prefix}/{k}", v, out)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Every number of a metrics.jsonl record, by path: ``<kind>/<key>/<sub key>``.

    A step record's ``steps`` (loss terms per update of the batch) become
    ``step/loss/<peer>/<term>``, as an epoch record's ``loss`` becomes
    ``epoch/loss/<peer>/<term>``; ``kind``, ``stage`` (text) and ``global_step`` (the
    tracker's step) are not values.
    """
    kind = str(record.get("kind", "record"))
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("kind", "stage", "global_step"):
            continue
        if kind == "step" and k == "steps" and isinstance(v, Mapping):
            for terms in v.values():
                _walk(f"{kind}/loss", terms, out)
        else:
            _walk(f"{kind}/{k}", v, out)
    return out


def recipe_config(recipe: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """The resolved recipe as flat hyperparameters: ``run.seed``, ``peers.0.model``, ``strategy.temperature``, ..."""
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        elif isinstance(v, (str, int, float, bool)):
            out[prefix] = v
        elif v is not None:
            out[prefix] = json.dumps(v)

    walk("", recipe)
    return out


# --------------------------------------------------------------------------- the callback


class TrackerLog(Callback):
    """Starts the recipe's trackers through the trainer's Accelerator and logs every metrics.jsonl scalar to them."""

    state_key = "tracking"

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.ids: dict[str, str] = {}  # tracker -> its run id, saved in checkpoints for a resume
        self._started = False
        self._failed = False  # a write to a tracker failed (and said so)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"ids": dict(self.ids)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ids = dict(state.get("ids", {}))

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        from accelerate.tracking import filter_trackers

        acc, run = trainer.accelerator, trainer.recipe.run
        logdir = tracking_dir(trainer.run_dir)
        inside(trainer.run_dir, logdir / project_name(trainer), what="the trackers' folder",
               hint="set run.tracker_project to a plain folder name")
        logdir.mkdir(parents=True, exist_ok=True)
        acc.project_configuration.logging_dir = str(logdir)
        if not acc.log_with:  # an Accelerator made by the caller, without log_with
            acc.log_with = filter_trackers(self.names, str(logdir))
        resumed = trainer.resumed_from is not None
        kwargs: dict[str, dict[str, Any]] = {}
        if "tensorboard" in self.names and resumed:
            # Readers drop the events an interrupted run wrote after the checkpoint.
            kwargs["tensorboard"] = {"purge_step": trainer.position.global_step + 1}
        if "mlflow" in self.names:
            self._mlflow_store(logdir)
            kwargs["mlflow"] = {"run_name": run.name, "run_id": self.ids.get("mlflow")}
        if "wandb" in self.names:
            kwargs["wandb"] = {"name": run.name, "dir": str(logdir), "resume": "allow",
                               "id": self.ids.get("wandb") or uuid.uuid4().hex[:8]}
        if "aim" in self.names and self.ids.get("aim"):
            kwargs["aim"] = {"run_hash": self.ids["aim"]}
        if "trackio" in self.names:
            kwargs["trackio"] = {"name": run.name, "resume": "allow" if resumed else "never"}
        # The recipe is recorded once, when the run starts; a resume continues that run.
        config = None if resumed else recipe_config(trainer.folder.recipe_dict)
        acc.init_trackers(project_name(trainer), config=config, init_kwargs=kwargs)
        self._started = True
        self._remember_ids(trainer)

    def _mlflow_store(self, logdir: Path) -> None:
        import mlflow

        if os.environ.get("MLFLOW_TRACKING_URI"):
            return  # the user's store (a server, a database) wins
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a run
        # folder is exactly the self-contained, server-free store it is made for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((logdir / "mlruns").resolve().as_uri())

    def _remember_ids(self, trainer: Trainer) -> None:
        for tracker in trainer.accelerator.trackers:
            if tracker.name == "mlflow":
                self.ids["mlflow"] = tracker.tracker.info.run_id
            elif tracker.name == "wandb":
                self.ids["wandb"] = tracker.tracker.id
            elif tracker.name == "aim":
                self.ids["aim"] = tracker.tracker.hash

    def on_batch_end(self, trainer: Trainer, result: StepResult) -> None:
        if self._started and _is_log_step(trainer):
            step = trainer.position.global_step
            record = trainer.last_step_record  # the very record metrics.jsonl got (same timings)
            if record is None or record.get("global_step") != step:
                record = step_record(trainer, result)
            self._log(trainer, scalars(record), step)

    def on_epoch_end(self, trainer: Trainer, record: Mapping[str, Any]) -> None:
        if self._started:
            self._log(trainer, scalars(record), int(record["global_step"]))

    def _log(self, trainer: Trainer, values: dict[str, Any], step: int) -> None:
        try:
            trainer.accelerator.log(values, step=step)
        except OSError as e:  # the tracking/ folder became unwritable or full under the run
            self._failed = True
            raise _tracker_failed(trainer.run_dir, e) from None

    def on_fit_end(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        if not self._started:
            return
        self._started = False
        trackers, problem = list(trainer.accelerator.trackers), None
        trainer.accelerator.trackers.clear()
        for tracker in trackers:
            try:
                tracker.finish()
            except OSError as e:  # after a failed write this fails again; the first error is the one to report
                problem = problem or e
        if problem is not None and not self._failed:
            raise _tracker_failed(trainer.run_dir, problem)


def _tracker_failed(run_dir: Path, e: OSError) -> UserError:
    from mutualkd.errors import os_reason

    return UserError(
        f"the experiment trackers cannot write {tracking_dir(run_dir)}: {os_reason(e)}; the checkpoints and"
        " metrics.jsonl written so far are kept", field="run.log_with",
        hint="make that folder writable again (or free space on its disk), then continue with"
        f" `mutualkd run --resume {run_dir}`; or drop the trackers from run.log_with (metrics.jsonl has every value)",
    )
