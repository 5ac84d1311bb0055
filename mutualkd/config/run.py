"""``[run]``: what a run is called, where it writes, how it runs and logs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from mutualkd.config._fields import MAX_SEED, PositiveInt, _path_problem, _seed_in_range, _Strict
from mutualkd.names import check_name

__all__ = ["RunConfig", "LOGGING_ONLY_FIELDS", "TrackerName"]

#: The trackers ``run.log_with`` may name: those Accelerate ships (``accelerate.utils.LoggerType``).
TrackerName = Literal["tensorboard", "wandb", "mlflow", "aim", "trackio", "comet_ml", "clearml", "dvclive", "swanlab"]


class RunConfig(_Strict):
    """``[run]``: what the run is called, where it writes, and how it is logged."""

    name: str = Field(
        "run", description="name of the run's folder, out_dir/name: one folder name (no / or \\, not . or ..)"
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(
        0, description="seed of weight initialisation, data order, augmentation and train_subset"
    )
    epochs: PositiveInt = Field(
        1, description="epochs of training (a strategy stage may set its own, e.g. ie_kd's ae_epochs)"
    )
    out_dir: Annotated[str, Field(min_length=1)] = Field("runs", description="folder that holds the run folders")
    deterministic: bool = Field(
        False, description="deterministic torch kernels only (slower); off: cuDNN may pick the fastest kernels"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None,
        description="autocast precision of the forward passes: float32 (no), bfloat16, or float16 with"
        " loss scaling (GPU only); unset: what accelerate launch asks for (--mixed_precision, or its"
        " accelerate config file), else no. The run's recipe.toml records the value used",
    )
    device: Literal["auto", "cpu"] = Field(
        "auto", description="auto: the GPU when there is one, else the CPU; cpu: always the CPU"
    )
    log_every: PositiveInt = Field(
        50, description="write a step record to metrics.jsonl every this many steps (and at each epoch's end)"
    )
    checkpoint_every: Annotated[int, Field(ge=0)] = Field(
        0, description="also checkpoint every this many steps inside an epoch; 0: at the end of each epoch only"
    )
    keep_checkpoints: Annotated[int, Field(ge=2)] = Field(
        2, description="step checkpoints kept on disk, the newest ones (best/ is kept besides)"
    )
    max_steps: Annotated[int, Field(gt=0)] | None = Field(
        None, description="stop after this many optimizer steps in all (smoke tests); unset: train every epoch"
    )
    resume: Literal["never", "auto"] = Field(
        "never",
        description="auto: continue a run folder of the same name from its latest checkpoint;"
        " never: refuse a folder that already holds a run",
    )
    channels_last: bool = Field(
        False, description="keep the peers and their batches in the channels-last memory format (faster on GPUs)"
    )
    compile: bool = Field(
        False, description="torch.compile each peer network once; accelerate launch --dynamo_backend also asks for"
        " it, and then gives the backend and mode"
    )
    threads: PositiveInt | None = Field(
        None,
        description="torch's CPU threads inside one operation, per process (torch.set_num_threads); unset:"
        " OMP_NUM_THREADS (or MKL_NUM_THREADS) when set, else 1, which does not slow down many times over when"
        " other jobs share the cores. Results depend on it: one seed gives other accuracies with another count",
    )
    progress: bool = Field(
        True,
        description="show a progress bar and one line per epoch on the console; without a terminal (output to a"
        " file or a pipe), a plain progress line every run.progress_every_s seconds in place of the bar",
    )
    progress_every_s: Annotated[float, Field(ge=0)] = Field(
        30.0,
        description="seconds between plain progress lines (epoch, step, images/s, elapsed and ETA) when the"
        " output is not a terminal; 0: after every step",
    )
    best_output: Annotated[str, Field(min_length=1)] | None = Field(
        None,
        description="the evaluated output whose top-1 chooses the best epoch and best/: a peer, <peer>_ema, a"
        " strategy's declared output (e.g. gated), ensemble, or peers (their mean top-1); unset: the output the"
        " method's authors report (the strategy's default), else peers",
    )
    sync_bn: bool = Field(
        False, description="with several processes, synchronise the peers' BatchNorm statistics across them"
    )
    collective_timeout: Annotated[float, Field(gt=0, le=86400)] = Field(
        300.0,
        description="seconds a process waits for the others in one collective operation before the run stops"
        " with an error (several processes only); a lost process ends the job after this long",
    )
    block_plugins: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="plugins (name or kind:name) this recipe refuses to load, as --block-plugin does"
    )
    log_with: list[TrackerName] | None = Field(
        None,
        description="experiment trackers that also get every scalar of metrics.jsonl and the recipe, through"
        " Accelerate, written under the run folder's tracking/ (see docs/tracking.md); unset: none",
    )
    tracker_project: str | None = Field(
        None,
        description="the trackers' project (W&B), experiment (MLflow) and tracking/ sub-folder (TensorBoard);"
        " unset: mutualkd",
    )

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, v: str) -> str:
        return check_name(v, "run.name", example="dml-resnet20-s0")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, v: Any) -> Any:
        return _seed_in_range(v, "run.seed")

    @field_validator("tracker_project")
    @classmethod
    def _project_folder_name(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, "run.tracker_project", example="mutualkd")

    @field_validator("out_dir")
    @classmethod
    def _usable_path(cls, v: str) -> str:
        problem = _path_problem(v)
        if problem:
            raise ValueError(f"run.out_dir {problem}")
        return v


#: ``[run]`` fields that only say where and how a run logs and saves, never what it trains:
#: a resume may change them (:func:`mutualkd.checkpoint.recipe_hash` leaves them out) and
#: ``mutualkd report`` puts runs that differ only in them (and the seed) in one group.
LOGGING_ONLY_FIELDS: tuple[str, ...] = (
    "out_dir",  # where the run folder lies, not what is in it
    "progress",  # a progress bar on the console
    "progress_every_s",  # how often a progress line is printed without a terminal
    "log_every",  # how often a step record is written to metrics.jsonl
    "checkpoint_every",  # how often a checkpoint is written (saving does not change training)
    "keep_checkpoints",  # how many checkpoints stay on disk
    "resume",  # whether an existing run folder is continued; a resumed run trains as if never stopped
    "collective_timeout",  # how long a process waits for a lost one
    "log_with",  # the experiment trackers that also receive the metrics
    "tracker_project",  # the trackers' project name
)
