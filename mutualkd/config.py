"""Recipes: TOML files validated by pydantic models.

A recipe has the sections ``[run]``, ``[data]``, ``[[peers]]``, ``[optimizer]`` and
``[scheduler]`` (shared defaults a peer may override), ``[strategy]`` and ``[schedule]``.
Unknown keys are refused everywhere. The strategy's own parameters live in
``[strategy]`` next to its ``name`` and are validated by the pydantic model the
strategy plugin provides (see :mod:`mutualkd.strategy`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import copy
import json
from pathlib import Path
import re
import tomllib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mutualkd.errors import RecipeError, unknown_name_hint
from mutualkd.names import check_name, look_alikes

__all__ = [
    "Recipe",
    "RunConfig",
    "LOGGING_ONLY_FIELDS",
    "peer_names_of",
    "DataConfig",
    "PeerConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "EmaConfig",
    "StrategyConfig",
    "ScheduleConfig",
    "load_recipe",
    "parse_recipe",
    "apply_overrides",
    "format_validation_error",
]


class _Strict(BaseModel):
    # No float field of a recipe takes inf or NaN: torch and the OS would take them, and fail later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(gt=0)]


#: The trackers ``run.log_with`` may name: those Accelerate ships (``accelerate.utils.LoggerType``).
TrackerName = Literal["tensorboard", "wandb", "mlflow", "aim", "trackio", "comet_ml", "clearml", "dvclive", "swanlab"]


#: Limits on what a recipe may ask for: its file's size, the nesting of its tables and
#: arrays, a run folder's name (bytes: the file-system limit), the side of resized images.
MAX_RECIPE_BYTES = 1 << 20
MAX_NESTING = 32
MAX_NAME_BYTES = 255
MAX_IMAGE_SIZE = 4096
#: Seeds are what torch, NumPy and Python all take: 0 .. 2**32 - 1 (NumPy's legacy seeding is 32-bit).
MAX_SEED = 2**32 - 1
#: The largest base learning rate a recipe may ask for. The optimizers apply it in float32 (largest
#: value 3.4e38): 1e12 leaves room for the linear scaling rule and large gradients, and still lets a
#: run diverge on purpose (the non-finite guard's tests do, with 1e12). Published recipes stay below 30.
MAX_LR = 1e12


def _seed_in_range(v: Any, field: str) -> Any:
    """A seed given as a number outside 0 .. MAX_SEED, refused with a plain message (not pydantic's int parse)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v <= MAX_SEED:
        raise ValueError(f"{field} must be an integer from 0 to {MAX_SEED} (2**32 - 1, what torch and NumPy take)")
    return v


def _path_problem(value: str) -> str | None:
    if "\x00" in value:
        return "holds a NUL character"
    if any(ord(c) < 32 for c in value):
        return "holds a control character"
    return None


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


class DataConfig(_Strict):
    """``[data]``: which data set, where it lies, and how batches are drawn."""

    dataset: str = Field(
        "digits",
        description="the data set, a plugin (`mutualkd plugins` lists them); digits is bundled with scikit-learn,"
        " the others are read from root; image_tar (tar shards, stream pipeline only) reads root/train and"
        " root/val, each a .tar file or a folder of .tar shards",
    )
    root: str | None = Field(
        None, description="folder of the data set's files; unset: ./data (Fashion-MNIST also /usr/share/datasets)"
    )
    download: bool = Field(False, description="download a missing data set into root through torchvision")
    batch_size: PositiveInt = Field(
        64,
        description="training images per batch, per process: the global batch is batch_size x the number of"
        " processes (printed at start)",
    )
    eval_batch_size: PositiveInt = Field(512, description="test images per batch at evaluation, per process")
    augment: bool = Field(
        True, description="the data set's training augmentation (random crop with padding, and flip where it fits)"
    )
    train_subset: PositiveInt | None = Field(
        None, description="train on a class-stratified subset of this many images, chosen with run.seed (or"
        " subset_seed); unset: all"
    )
    subset_seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="seed of the train_subset draw, to keep one subset across run seeds; unset: run.seed"
    )
    test_subset: PositiveInt | None = Field(
        None, description="evaluate on a class-stratified subset of this many images (fixed seed 0); unset: all"
    )
    image_size: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIZE)] | None = Field(
        None,
        description="resize both splits to image_size x image_size (required for image_folder); unset: the"
        " native size",
    )
    drop_last: bool = Field(True, description="drop the last, incomplete training batch of each epoch")
    images_per_class: Annotated[int, Field(ge=2)] | None = Field(
        None,
        description="class-balanced training batches: each holds this many images of each of its batch_size /"
        " images_per_class classes (MCL's sampler, m = 2 there), drawn with run.seed per epoch; unset: shuffled",
    )
    # --- the pipeline (see docs/data.md)
    pipeline: Literal["auto", "device", "stream"] = Field(
        "auto",
        description="device: decode the whole data set once and batch it on the training device (small sets);"
        " stream: a torch DataLoader with worker processes and timm's transforms; auto: device for the bundled"
        " sets and image folders that fit memory_budget_gb, stream otherwise (the choice is printed)",
    )
    memory_budget_gb: Annotated[float, Field(gt=0)] = Field(
        4.0, description="auto: an image folder whose decoded uint8 images exceed this many GiB streams"
    )
    num_workers: Annotated[int, Field(ge=0, le=256)] = Field(
        2, description="stream: data-loading worker processes per training process (0: load in the main process)"
    )
    prefetch_factor: Annotated[int, Field(ge=1)] = Field(
        2, description="stream: batches each worker loads ahead"
    )
    val_fraction: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="hold out this share of the train split (class-stratified, fixed seed 0) as a validation"
        " split that chooses the best epoch; unset: the test split chooses it",
    )
    skip_corrupt: bool = Field(
        False,
        description="stream: skip an unreadable image and count it in metrics.jsonl (skipped_images); off: stop"
        " with exit 2 naming the file",
    )
    # --- stream transforms: timm's create_transform (RandomResizedCrop, flips, colour jitter, RandAugment, ...)
    config_from: str | None = Field(
        None,
        description="stream: a peer's name or a timm model name (e.g. resnet34.a1_in1k) whose pretrained config"
        " gives the input size, mean/std, crop_pct and interpolation the recipe leaves unset",
    )
    mean: tuple[float, ...] | None = Field(
        None, description="stream: per-channel mean for normalisation; unset: the data set's (ImageNet's for folders)"
    )
    std: tuple[float, ...] | None = Field(
        None, description="stream: per-channel std for normalisation; unset: the data set's (ImageNet's for folders)"
    )
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="stream: RandomResizedCrop's range of the crop's area, as a share of the image"
    )
    ratio: tuple[float, float] = Field(
        (0.75, 4.0 / 3.0), description="stream: RandomResizedCrop's range of the crop's aspect ratio"
    )
    hflip: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="stream: probability of a horizontal flip; unset: 0.5, or 0 for digits and (Fashion-)MNIST"
    )
    vflip: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="stream: probability of a vertical flip")
    color_jitter: Annotated[float, Field(ge=0)] | None = Field(
        None, description="stream: colour jitter strength (brightness, contrast, saturation); unset: off"
    )
    auto_augment: str | None = Field(
        None,
        description="stream: a timm RandAugment / AutoAugment / AugMix string, e.g. rand-m9-mstd0.5-inc1,"
        " original, augmix-m5-w4-d2; unset: off",
    )
    interpolation: Literal["bilinear", "bicubic", "nearest", "random"] | None = Field(
        None, description="stream: resize interpolation; unset: from config_from, else bilinear"
    )
    crop_pct: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None,
        description="stream evaluation: resize to image_size / crop_pct, then centre-crop image_size; unset: from"
        " config_from, else 0.875 for folders and 1.0 for the bundled sets",
    )
    reprob: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="stream: random erasing probability")
    remode: Literal["const", "rand", "pixel"] = Field("pixel", description="stream: random erasing fill mode")
    recount: PositiveInt = Field(1, description="stream: random erasing count")
    # --- batch mixing and soft targets: timm's Mixup, on the training device (both pipelines)
    mixup: Annotated[float, Field(ge=0)] = Field(0.0, description="mixup alpha; 0: off")
    cutmix: Annotated[float, Field(ge=0)] = Field(0.0, description="cutmix alpha; 0: off")
    cutmix_minmax: tuple[float, float] | None = Field(
        None, description="cutmix's min/max box ratio (used instead of the alpha when set)"
    )
    mixup_prob: Annotated[float, Field(ge=0, le=1)] = Field(
        1.0, description="probability of mixing a batch (or pair, or element)"
    )
    mixup_switch_prob: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="probability of cutmix instead of mixup when both are on"
    )
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="mix per batch, per pair or per element")
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0,
        description="smooth the training targets by this much; with it or with mixup/cutmix every strategy's"
        " cross-entropy gets soft targets",
    )


    @field_validator("dataset")
    @classmethod
    def _installed_dataset(cls, v: str) -> str:
        from mutualkd import registry

        known = sorted({i.name for i in registry.infos(load=False) if i.kind == "dataset"})
        if v not in known:
            raise ValueError(f"unknown data set {v!r}: " + unknown_name_hint("data set", v, known)
                             + "; `mutualkd plugins` lists the installed ones")
        return v

    @field_validator("subset_seed", mode="before")
    @classmethod
    def _seed_range(cls, v: Any) -> Any:
        return _seed_in_range(v, "data.subset_seed")

    @field_validator("cutmix_minmax")
    @classmethod
    def _box_ratios(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] < v[1] <= 1:
            raise ValueError(f"cutmix_minmax is the (min, max) share of the image side a cutmix box takes:"
                             f" 0 < min < max <= 1, e.g. [0.2, 0.8]; got {list(v)}")
        return v


class OptimizerConfig(_Strict):
    """An optimizer: mutualkd's SGD (momentum, Nesterov) or AdamW, or any optimizer of ``timm.optim``."""

    name: Annotated[str, Field(min_length=1)] = Field(
        "sgd",
        description="sgd: torch SGD with momentum and nesterov as set here; adamw: torch AdamW; any other name"
        " is timm.optim's (lamb, lars, lion, adopt, ..., see timm.optim.list_optimizers(); timm's own sgd is"
        " called nesterov or momentum there)",
    )
    lr: Annotated[float, Field(gt=0, le=MAX_LR)] = Field(
        0.1, description="base learning rate, before the schedule's factor"
    )
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.9, description="momentum (sgd, and timm optimizers that take one)"
    )
    nesterov: bool = Field(True, description="Nesterov momentum (sgd only; needs momentum > 0)")
    weight_decay: Annotated[float, Field(ge=0)] = Field(5e-4, description="L2 weight decay (decoupled for adamw)")
    no_decay_1d: bool = Field(
        False,
        description="exempt biases, normalisation parameters (1-D tensors) and the model's no_weight_decay()"
        " parameters (e.g. a ViT's position embeddings) from weight decay",
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="moment decay rates (adamw, and timm optimizers that take them, e.g. lamb, lion)"
    )
    eps: Annotated[float, Field(gt=0)] | None = Field(
        None, description="the optimizer's epsilon (timm optimizers and adamw); unset: the optimizer's default"
    )
    layer_decay: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None,
        description="layer-wise lr decay (timm optimizers): each layer group's lr times layer_decay^(depth from"
        " the head), from the model's group_matcher; unset: off",
    )
    args: dict[str, Any] | None = Field(
        None, description="further keyword arguments of a timm optimizer, e.g. { trust_coeff = 0.001 } for lars"
    )
    clip_grad: Annotated[float, Field(gt=0)] | None = Field(
        None, description="clip the gradients of this optimizer's parameters at this value (see clip_mode); unset: off"
    )
    clip_mode: Literal["norm", "value", "agc"] = Field(
        "norm", description="norm: total L2 norm; value: each element; agc: adaptive (timm's dispatch_clip_grad)"
    )
    lr_base_batch: PositiveInt | None = Field(
        None,
        description="linear scaling rule: lr is meant for this global batch, the run uses lr x global batch /"
        " lr_base_batch (printed at start); unset: lr as given",
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = true needs momentum > 0; set momentum or nesterov = false")
        return self


class SchedulerConfig(_Strict):
    """A learning-rate schedule in epochs, stepped after every optimizer step, with optional linear warmup."""

    name: Literal["constant", "multistep", "cosine"] = Field(
        "constant",
        description="constant: lr throughout; multistep: times gamma at each milestone; cosine: down to min_lr"
        " at the last epoch",
    )
    milestones: list[PositiveInt] = Field(
        default_factory=list, description="epochs at which multistep multiplies the lr by gamma, increasing"
    )
    gamma: Annotated[float, Field(gt=0)] = Field(0.1, description="multistep's factor at each milestone")
    min_lr: Annotated[float, Field(ge=0)] = Field(0.0, description="cosine's final learning rate")
    warmup_epochs: Annotated[int, Field(ge=0)] = Field(
        0, description="epochs of linear warmup from 0 to lr, before the schedule"
    )
    interval: Literal["step", "epoch"] = Field(
        "step",
        description="step: the lr moves after every optimizer step (smooth warmup and cosine, as ImageNet"
        " recipes need); epoch: it moves once per epoch, at the epoch's start",
    )

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("milestones must be strictly increasing epochs, e.g. [60, 120, 160]")
        return v


class EmaConfig(_Strict):
    """An exponential moving average of a peer's weights (timm's ``ModelEmaV3``), evaluated as ``<peer>_ema``."""

    decay: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.9998, description="weight of the average at each update: ema = decay * ema + (1 - decay) * peer"
    )
    warmup: bool = Field(
        False,
        description="timm's decay warmup: decay = min(decay, 1 - (1 + n)^(-2/3)) at the peer's n-th update, so"
        " the average follows the peer closely at first",
    )


class PeerConfig(_Strict):
    """``[[peers]]``: one network, any timm model name with its keyword arguments."""

    model: str = Field(
        description="timm model name, e.g. cifar_resnet20 or resnet18 (mutualkd registers the cifar_* families)"
    )
    name: str | None = Field(None, description="the peer's name in logs and checkpoints; unset: peer<i>, its index")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of timm.create_model (num_classes and in_chans come from the data set)",
    )
    weights: str | None = Field(
        None,
        description="where the initial weights come from (docs/weights.md): a mutualkd run or checkpoint folder, a"
        " weights file (.safetensors, .pth, .pt, .bin), a timm model folder (e.g. from mutualkd export), a timm"
        " pretrained tag (resnet34.a1_in1k) or hf-hub:ORG/NAME; unset: random initialisation",
    )
    weights_peer: str | int | None = Field(
        None, description="the peer (name or index) of a run named by weights; unset: its first peer"
    )
    pretrained: bool = Field(
        False,
        description="timm's default pretrained weights of model (from the Hugging Face cache; nothing is downloaded"
        " unless MUTUALKD_ALLOW_DOWNLOAD=1); the same as weights = its default tag",
    )
    frozen: bool = Field(
        False,
        description="never trained: eval mode, no optimizer, one forward pass per batch (a teacher; needs weights or"
        " pretrained, and a strategy that takes frozen peers, e.g. kl_dml)",
    )
    reset_head: bool = Field(
        False,
        description="a new, untrained classifier instead of the weights' one (needed when their classes differ"
        " from the data set's; for a features-only teacher, or fine-tuning)",
    )
    feature_stage: int | None = Field(
        None,
        description="the stage (an index of the model's feature_info, negative from the end) whose feature map"
        " the strategy gets, through timm's forward_intermediates; unset: the last stage (forward_features)",
    )
    optimizer: OptimizerConfig | None = Field(
        None, description="this peer's own optimizer; unset: the shared [optimizer]"
    )
    scheduler: SchedulerConfig | None = Field(
        None, description="this peer's own schedule; unset: the shared [scheduler]"
    )
    ema: EmaConfig | None = Field(
        None, description="an EMA copy of this peer, evaluated and saved next to it; unset: the shared [ema]"
    )
    branches: Annotated[int, Field(ge=2, le=64)] | None = Field(
        None,
        description="split this network into a shared trunk and this many branches (with split_after); each branch"
        " is a peer named <name>_b<k> (name: the table's name, else peer<i>); unset: one whole network",
    )
    split_after: str | None = Field(
        None,
        description="the stage after which the branches start (e.g. layer2 of a CIFAR ResNet or WRN, or of a timm"
        " resnet): the stages up to it are the shared trunk, the rest and the classifier are per branch",
    )
    ilr: bool = Field(
        False,
        description="internal layer rescaling (CL-ILR): divide the gradient flowing back into the trunk at the"
        " split by the number of branches that share it",
    )

    @model_validator(mode="after")
    def _branches_fit(self) -> PeerConfig:
        if (self.branches is None) != (self.split_after is None):
            raise ValueError("branches and split_after go together: set both (e.g. branches = 3, split_after ="
                             " \"layer2\") or neither")
        if self.branches is not None:
            if self.frozen:
                raise ValueError("a branched network cannot be frozen: its branches are peers that train")
            if self.feature_stage is not None:
                raise ValueError("feature_stage is not supported for a branched network: each branch's features are"
                                 " its last stage's map")
        elif self.ilr:
            raise ValueError("ilr = true rescales the gradient at a split; set branches and split_after too")
        return self

    def branch_names(self, base: str) -> list[str]:
        """The peers this table makes: ``[base]``, or ``<base>_b<k>`` for each of its branches."""
        return [base] if self.branches is None else [f"{base}_b{k}" for k in range(self.branches)]

    @field_validator("kwargs")
    @classmethod
    def _no_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("num_classes", "in_chans"):
            if key in v:
                raise ValueError(f"'{key}' is taken from the data set; remove it from kwargs")
        if "pretrained" in v:
            raise ValueError(
                "'pretrained' is a key of the [[peers]] table itself: write pretrained = true next to model"
                " (or weights = \"<tag>\"), not in kwargs; see docs/weights.md"
            )
        for key in ("pretrained_cfg_overlay", "pretrained_cfg", "checkpoint_path"):
            if key in v:
                raise ValueError(
                    f"'{key}' is not passed to timm: name the weights with weights = \"<file, folder or tag>\""
                    " in the [[peers]] table; see docs/weights.md"
                )
        return v

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, "the peer's name", example="peer0")

    @model_validator(mode="after")
    def _weights_fit(self) -> PeerConfig:
        if self.pretrained and self.weights is not None:
            raise ValueError("pretrained = true and weights both name the weights; keep one of them")
        has_weights = self.pretrained or self.weights is not None
        if self.frozen and not has_weights:
            raise ValueError("a frozen peer needs weights (weights = ... or pretrained = true): with random weights"
                             " it would never learn anything")
        if self.reset_head and not has_weights:
            raise ValueError("reset_head = true needs weights (weights = ... or pretrained = true): a randomly"
                             " initialised peer has no head to reset")
        if self.weights_peer is not None and self.weights is None:
            raise ValueError("weights_peer names a peer of the run in weights, which is not set")
        return self


class StrategyConfig(BaseModel):
    """``[strategy]``: the strategy's name; every other key belongs to the strategy."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        "kl_dml", description="the strategy plugin (`mutualkd plugins` lists them); its parameters sit next to name"
    )

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScheduleConfig(_Strict):
    """``[schedule]``: faithful sequential updates or one shared forward for all peers."""

    mode: Literal["alternating", "simultaneous"] = Field(
        "alternating",
        description="alternating: the peers are updated one after another, each seeing the others' latest state;"
        " simultaneous: every peer from one shared forward pass",
    )


class Recipe(_Strict):
    """A whole recipe."""

    run: RunConfig = Field(
        default_factory=RunConfig, description="what the run is called, where it writes, how it runs and logs"
    )
    data: DataConfig = Field(default_factory=DataConfig, description="the data set and its batches")
    peers: list[PeerConfig] = Field(min_length=1, description="the networks, one [[peers]] table each (at least one)")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="the optimizer of every peer without its own [peers.optimizer]"
    )
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig,
        description="the learning-rate schedule of every peer without its own [peers.scheduler]",
    )
    strategy: StrategyConfig = Field(
        default_factory=StrategyConfig, description="the method: a strategy plugin's name and its parameters"
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="the order of the peers' updates in a batch"
    )
    ema: EmaConfig | None = Field(
        None, description="an EMA copy of every peer without its own [peers.ema]; unset: no EMA copies"
    )

    def peer_optimizer(self, i: int) -> OptimizerConfig:
        return self.peers[i].optimizer or self.optimizer

    def peer_scheduler(self, i: int) -> SchedulerConfig:
        return self.peers[i].scheduler or self.scheduler

    def network_names(self) -> list[str]:
        """One name per ``[[peers]]`` table: its ``name``, else ``peer<i>`` (a unit and a checkpoint module each)."""
        return peer_names_of(p.name for p in self.peers)

    def peer_names(self) -> list[str]:
        """Every peer, in table order: a whole network is one peer, a branched one a peer per branch."""
        return [n for base, pc in zip(self.network_names(), self.peers) for n in pc.branch_names(base)]

    def peer_tables(self) -> list[tuple[str, int, int | None]]:
        """``(peer name, table index, branch index or None)`` for each peer, in :meth:`peer_names` order."""
        out: list[tuple[str, int, int | None]] = []
        for i, (base, pc) in enumerate(zip(self.network_names(), self.peers)):
            names = pc.branch_names(base)
            out += [(n, i, None if pc.branches is None else k) for k, n in enumerate(names)]
        return out

    def table_of(self, peer: str) -> int:
        """The index of the ``[[peers]]`` table that makes ``peer``."""
        return next(i for n, i, _ in self.peer_tables() if n == peer)

    def peer_ema(self, i: int) -> EmaConfig | None:
        return self.peers[i].ema or self.ema

    @field_validator("peers")
    @classmethod
    def _unique_peer_names(cls, peers: list[PeerConfig]) -> list[PeerConfig]:
        bases = peer_names_of(p.name for p in peers)
        names = bases + [n for base, pc in zip(bases, peers) if pc.branches for n in pc.branch_names(base)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"peer names must be unique; {', '.join(dupes)} appears more than once")
        similar = look_alikes(names)
        if similar:
            a, b = similar[0]
            raise ValueError(f"peer names must be unique; {a!r} and {b!r} look alike (the same folder on a"
                             " case-insensitive disk, the same to a reader); rename one of them")
        return peers

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(exclude_none=True))


def peer_names_of(own_names: Iterable[str | None]) -> list[str]:
    """The peers' names in ``[[peers]]`` order: a peer's own ``name``, else ``peer<i>``.

    ``own_names`` is each peer's ``name`` field, None (or empty) where it has none; the
    engine, the checkpoints, ``metrics.jsonl`` and the report all name peers this way.
    """
    return [name or f"peer{i}" for i, name in enumerate(own_names)]


# --------------------------------------------------------------------------- loading


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(err: ValidationError, file: str, prefix: str = "") -> RecipeError:
    """Turn pydantic's error list into one RecipeError naming the TOML path of each field."""
    lines = []
    first_field = None
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = _loc_to_path(loc)
        if prefix:
            field = f"{prefix}.{field}" if field else prefix
        first_field = first_field or field
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            msg = f"got {e.get('input')!r}, expected one of {expected}"
        elif "input" in e and e["type"] not in ("model_type",) and not isinstance(e["input"], (dict, list)):
            try:
                shown = repr(e["input"])
            except ValueError:  # an int of more digits than Python converts to text
                shown = "a number of over 4300 digits"
            msg = f"{msg} (got {shown[:200]})"
        lines.append(f"[{field}] {msg}")
    head = lines[0].split("] ", 1)[1] if len(lines) == 1 else f"{len(lines)} fields are invalid:\n  " + "\n  ".join(lines)
    return RecipeError(
        head,
        file=file,
        field=first_field if len(lines) == 1 else None,
        hint="edit the recipe (or the override: --set, overrides=) so each field above has a value of the expected kind",
    )


def parse_recipe(data: Mapping[str, Any], file: str = "<recipe>",
                 overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Recipe:
    """Validate a recipe given as a dict (the structure of the TOML file), after ``overrides``.

    ``overrides`` are applied as :func:`apply_overrides` does. Errors are
    :class:`~mutualkd.errors.RecipeError` naming ``file`` (``"<dict>"`` for a recipe built
    in Python), the field and, for a misspelt key, the close matches.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe is a dict of its tables (run, data, peers, ...), not {type(data).__name__}",
                          file=file, hint="pass a dict, a Recipe, or the path of a .toml recipe")
    check_nesting(data, file)
    if overrides:
        data = apply_overrides(dict(data), overrides, file=file)
        check_nesting(data, file, "with the overrides, ")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise _with_key_suggestions(format_validation_error(err, file), err, data) from None


_SECTION_KEYS: dict[str, type[BaseModel]] = {
    "run": RunConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "schedule": ScheduleConfig,
    "ema": EmaConfig,
}


def _with_key_suggestions(rerr: RecipeError, err: ValidationError, data: dict[str, Any]) -> RecipeError:
    """Add "did you mean" hints to unknown-key errors."""
    from mutualkd.errors import close_matches

    hints = []
    for e in err.errors():
        if e["type"] != "extra_forbidden":
            continue
        loc = e["loc"]
        key = str(loc[-1])
        if len(loc) == 1:
            known = list(Recipe.model_fields)
        elif loc[0] == "peers":
            known = list(PeerConfig.model_fields)
            if len(loc) >= 4 and loc[2] in ("optimizer", "scheduler", "ema"):
                known = list({"optimizer": OptimizerConfig, "scheduler": SchedulerConfig, "ema": EmaConfig}[str(loc[2])].model_fields)
        elif loc[0] in _SECTION_KEYS:
            known = list(_SECTION_KEYS[str(loc[0])].model_fields)
        else:
            continue
        m = close_matches(key, known)
        hints.append(f"'{key}': " + (f"did you mean {' or '.join(repr(x) for x in m)}?" if m else f"known keys: {', '.join(known)}"))
    if hints:
        rerr.hint = "; ".join(hints)
    return rerr


def _coerce_value(text: str) -> Any:
    """Read a --set value as TOML (numbers, booleans, strings, lists); bare words are strings."""
    if text.lower().lstrip("+-") in ("nan", "inf"):
        return text  # a bare word here is meant as a name, not a float
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, ValueError):  # ValueError: an integer of over 4300 digits
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any],
                    file: str = "<recipe>") -> dict[str, Any]:
    """Apply overrides to a raw recipe dict; returns a new dict.

    ``overrides`` is either the command line's ``--set`` items, ``"a.b.c=value"`` with the
    value read as TOML (:func:`_coerce_value`), or a mapping of the same dotted keys to
    Python values, taken as they are (``{"run.epochs": 2, "peers.0.model": "cifar_resnet32"}``).
    A number in a key indexes a list (``peers.0``).
    """
    data = copy.deepcopy(data)
    if isinstance(overrides, Mapping):
        for path, value in overrides.items():
            _set_path(data, str(path), copy.deepcopy(value), f"overrides[{str(path)!r}]", file)
        return data
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                f"--set {item!r} is not of the form key=value",
                file=file,
                hint="write e.g. --set run.epochs=5 or --set peers.0.model=cifar_resnet32",
            )
        path, _, raw = item.partition("=")
        _check_path(path.strip(), f"--set {item!r}", file)
        try:
            value = _coerce_value(raw.strip())
        except RecursionError:
            raise RecipeError(f"--set {path}: the value nests arrays or tables more than {MAX_NESTING} deep",
                              file=file, field=path[:200], hint="a recipe's values are flat; remove the nesting") from None
        _set_path(data, path.strip(), value, f"--set {item!r}", file)
    return data


def _check_path(path: str, what: str, file: str) -> list[str]:
    """The keys of a dotted override key; a RecipeError for an empty key or one nested too deep."""
    keys = path.split(".")
    example = "--set run.epochs=5" if what.startswith("--set") else "overrides={'run.epochs': 5}"
    if not all(keys):
        raise RecipeError(f"{what} has an empty key", file=file, hint=f"write e.g. {example}")
    if len(keys) > MAX_NESTING:
        raise RecipeError(f"{what}: more than {MAX_NESTING} keys deep", file=file, field=path[:200],
                          hint=f"write e.g. {example}")
    return keys


def _set_path(data: dict[str, Any], path: str, value: Any, what: str, file: str) -> None:
    """Set the dotted key ``path`` of ``data`` to ``value``, creating tables on the way.

    ``what`` names the override in errors (``--set 'run.x=1'`` or ``overrides['run.x']``).
    """
    keys = _check_path(path, what, file)
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, ".".join(keys[: depth + 1]), file)
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(
                    f"{what}: {'.'.join(keys[: depth + 1])} is a value, not a table",
                    file=file,
                    field=".".join(keys[: depth + 1]),
                )
    if isinstance(node, list):
        node[_index(keys[-1], path, file, len(node))] = value
    else:
        node[keys[-1]] = value


def _index(key: str, path: str, file: str, length: int) -> int:
    if not key.isdigit() or int(key) >= length:
        raise RecipeError(
            f"'{key}' is not an index of a list of length {length}",
            file=file,
            field=path,
            hint=f"use an index from 0 to {length - 1}, e.g. peers.0.model=...",
        )
    return int(key)


def _list_item(node: list[Any], key: str, path: str, file: str) -> Any:
    return node[_index(key, path, file, len(node))]


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning every way it can fail into a RecipeError."""
    p = Path(path)
    if not p.exists():
        raise RecipeError("recipe file not found", file=str(p), hint="check the path; recipes/ holds the shipped recipes")
    if p.is_dir():
        raise RecipeError("this is a folder, not a recipe file", file=str(p), hint="name a .toml file")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # bounded: /dev/zero or a huge file must not fill the memory
    except OSError as e:
        raise RecipeError(f"cannot read the recipe: {e.strerror or e}", file=str(p), hint="check the path") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a short TOML file",
            file=str(p), hint="name the recipe's .toml file (recipes/ holds the shipped ones)",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
            file=str(p),
            hint="save the recipe as UTF-8 text",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        other = _other_format(text, str(e))
        if other:
            raise RecipeError(f"TOML syntax error: {e}; {other[0]}", file=str(p), hint=other[1]) from None
        raise RecipeError(f"TOML syntax error: {e}", file=str(p), hint="fix the TOML syntax at the line and column named") from None
    except RecursionError:
        raise RecipeError(f"arrays or tables nested more than {MAX_NESTING} deep", file=str(p),
                          hint="a recipe's values are flat; remove the nesting") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise RecipeError(f"a value that cannot be read: {str(e).split(';')[0]}", file=str(p),
                          hint="write the number with fewer digits") from None
    check_nesting(data, str(p))
    return data


_YAML_KEY = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*:(\s|$)")
_YAML_ITEM = re.compile(r"^\s*-\s+\S")
_TOML_HOW = "mutualkd recipes are TOML (recipes/quickstart.toml is one): `key = value` lines, strings quoted,"\
    " `[table]` headers, `[a, b]` lists, `[[peers]]` for each peer"


def _other_format(text: str, error: str) -> tuple[str, str] | None:
    """``(what, hint)`` when text that TOML refused is YAML or JSON (a recipe saved in the wrong
    format keeps its ``.toml`` name), else None. YAML is told by the line TOML stopped at, a
    ``key: value`` mapping or a ``- item`` list entry, or by a ``---`` document start."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return "this looks like JSON", f"{_TOML_HOW}; e.g. {{\"run\": {{\"epochs\": 15}}}} is `[run]` then `epochs = 15`"
    lines = text.splitlines()
    at = re.search(r"at line (\d+)", error)
    n = int(at.group(1)) if at else 0
    yaml_like = [i for i, line in enumerate(lines, 1) if _YAML_KEY.match(line) or _YAML_ITEM.match(line)]
    if n not in yaml_like:
        if not (stripped.startswith("---") and yaml_like):
            return None
        n = yaml_like[0]
    line = lines[n - 1]
    key = _YAML_KEY.match(line)
    if key and line.rstrip().endswith(":"):  # a YAML mapping that opens a table
        example = f"write this line as the table header `[{key.group(1)}]` and its keys below it as `name = value`"
    elif key:
        value = line.split(":", 1)[1].strip()
        try:
            tomllib.loads(f"v = {value}")
        except (tomllib.TOMLDecodeError, ValueError):
            value = json.dumps(value.strip("'\""))  # a bare YAML string
        example = f"write this line as `{key.group(1)} = {value}`"
    else:
        example = "write a list as `name = [a, b]`, a list of tables as one `[[name]]` header per entry"
    return f"this looks like YAML (line {n}: {line.strip()[:80]!r})", f"{_TOML_HOW}; {example}"


def check_nesting(data: Any, file: str, what: str = "") -> None:
    """A RecipeError naming the deepest field when tables or arrays nest more than :data:`MAX_NESTING` deep."""
    todo: list[tuple[Any, str, int]] = [(data, "", 0)]
    while todo:
        node, where, depth = todo.pop()
        if depth > MAX_NESTING:
            raise RecipeError(
                f"{what}tables or arrays nested more than {MAX_NESTING} deep", file=file, field=where[:200] or None,
                hint="a recipe's values are flat; remove the nesting",
            )
        if isinstance(node, dict):
            todo.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))


def load_recipe(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Recipe:
    """Read, override (as :func:`apply_overrides` does) and validate a recipe file."""
    return parse_recipe(read_toml(path), file=str(path), overrides=overrides)
