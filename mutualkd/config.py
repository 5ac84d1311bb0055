"""Recipes: TOML files validated by pydantic models.

A recipe has the sections ``[run]``, ``[data]``, ``[[peers]]``, ``[optimizer]`` and
``[scheduler]`` (shared defaults a peer may override), ``[strategy]`` and ``[schedule]``.
Unknown keys are refused everywhere. The strategy's own parameters live in
``[strategy]`` next to its ``name`` and are validated by the pydantic model the
strategy plugin provides (see :mod:`mutualkd.strategy`).
"""

from __future__ import annotations

from collections.abc import Iterable
import copy
import json
from pathlib import Path
import tomllib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mutualkd.errors import RecipeError

__all__ = [
    "Recipe",
    "RunConfig",
    "LOGGING_ONLY_FIELDS",
    "peer_names_of",
    "DataConfig",
    "PeerConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "StrategyConfig",
    "ScheduleConfig",
    "load_recipe",
    "parse_recipe",
    "apply_overrides",
    "format_validation_error",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveInt = Annotated[int, Field(gt=0)]


class RunConfig(_Strict):
    """``[run]``: what the run is called, where it writes, and how it is logged."""

    name: str = Field("run", description="name of the run's folder, out_dir/name")
    seed: int = Field(0, description="seed of weight initialisation, data order, augmentation and train_subset")
    epochs: PositiveInt = Field(
        1, description="epochs of training (a strategy stage may set its own, e.g. ie_kd's ae_epochs)"
    )
    out_dir: str = Field("runs", description="folder that holds the run folders")
    deterministic: bool = Field(
        False, description="deterministic torch kernels only (slower); off: cuDNN may pick the fastest kernels"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="autocast precision of the forward passes: float32 (no), bfloat16, or float16 with"
        " loss scaling (GPU only)",
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
    compile: bool = Field(False, description="torch.compile each peer")
    progress: bool = Field(True, description="show a progress bar and one line per epoch on the console")
    block_plugins: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="plugins (name or kind:name) this recipe refuses to load, as --block-plugin does"
    )


#: ``[run]`` fields that only say where and how a run logs and saves, never what it trains:
#: a resume may change them (:func:`mutualkd.checkpoint.recipe_hash` leaves them out) and
#: ``mutualkd report`` puts runs that differ only in them (and the seed) in one group.
LOGGING_ONLY_FIELDS: tuple[str, ...] = (
    "out_dir",  # where the run folder lies, not what is in it
    "progress",  # a progress bar on the console
    "log_every",  # how often a step record is written to metrics.jsonl
    "checkpoint_every",  # how often a checkpoint is written (saving does not change training)
    "keep_checkpoints",  # how many checkpoints stay on disk
    "resume",  # whether an existing run folder is continued; a resumed run trains as if never stopped
)


class DataConfig(_Strict):
    """``[data]``: which data set, where it lies, and how batches are drawn."""

    dataset: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder"] = Field(
        "digits", description="the data set; digits is bundled with scikit-learn, the others are read from root"
    )
    root: str | None = Field(
        None, description="folder of the data set's files; unset: ./data (Fashion-MNIST also /usr/share/datasets)"
    )
    download: bool = Field(False, description="download a missing data set into root through torchvision")
    batch_size: PositiveInt = Field(64, description="training images per batch, per process")
    eval_batch_size: PositiveInt = Field(512, description="test images per batch at evaluation, per process")
    augment: bool = Field(
        True, description="the data set's training augmentation (random crop with padding, and flip where it fits)"
    )
    train_subset: PositiveInt | None = Field(
        None, description="train on a class-stratified subset of this many images, chosen with run.seed; unset: all"
    )
    test_subset: PositiveInt | None = Field(
        None, description="evaluate on a class-stratified subset of this many images (fixed seed 0); unset: all"
    )
    image_size: PositiveInt | None = Field(
        None,
        description="resize both splits to image_size x image_size (required for image_folder); unset: the"
        " native size",
    )
    drop_last: bool = Field(True, description="drop the last, incomplete training batch of each epoch")


class OptimizerConfig(_Strict):
    """An optimizer: SGD (momentum, Nesterov) or AdamW."""

    name: Literal["sgd", "adamw"] = Field("sgd", description="SGD with momentum, or AdamW")
    lr: Annotated[float, Field(gt=0)] = Field(0.1, description="base learning rate, before the schedule's factor")
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="SGD momentum (sgd only)")
    nesterov: bool = Field(True, description="Nesterov momentum (sgd only; needs momentum > 0)")
    weight_decay: Annotated[float, Field(ge=0)] = Field(5e-4, description="L2 weight decay (decoupled for adamw)")
    no_decay_1d: bool = Field(
        False, description="exempt biases and normalisation parameters (1-D tensors) from weight decay"
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's moment decay rates (adamw only)")

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

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("milestones must be strictly increasing epochs, e.g. [60, 120, 160]")
        return v


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
    optimizer: OptimizerConfig | None = Field(
        None, description="this peer's own optimizer; unset: the shared [optimizer]"
    )
    scheduler: SchedulerConfig | None = Field(
        None, description="this peer's own schedule; unset: the shared [scheduler]"
    )

    @field_validator("kwargs")
    @classmethod
    def _no_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("num_classes", "in_chans"):
            if key in v:
                raise ValueError(f"'{key}' is taken from the data set; remove it from kwargs")
        if v.get("pretrained"):
            raise ValueError(
                "pretrained weights are downloaded from a hub at run time, which mutualkd does not do;"
                " load weights through a checkpoint instead"
            )
        return v


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

    def peer_optimizer(self, i: int) -> OptimizerConfig:
        return self.peers[i].optimizer or self.optimizer

    def peer_scheduler(self, i: int) -> SchedulerConfig:
        return self.peers[i].scheduler or self.scheduler

    def peer_names(self) -> list[str]:
        return peer_names_of(p.name for p in self.peers)

    @field_validator("peers")
    @classmethod
    def _unique_peer_names(cls, peers: list[PeerConfig]) -> list[PeerConfig]:
        names = peer_names_of(p.name for p in peers)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"peer names must be unique; {', '.join(dupes)} appears more than once")
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
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"[{field}] {msg}")
    head = lines[0].split("] ", 1)[1] if len(lines) == 1 else f"{len(lines)} fields are invalid:\n  " + "\n  ".join(lines)
    return RecipeError(
        head,
        file=file,
        field=first_field if len(lines) == 1 else None,
        hint="edit the recipe (or the --set override) so each field above has a value of the expected kind",
    )


def parse_recipe(data: dict[str, Any], file: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict (already overridden)."""
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
            if len(loc) >= 4 and loc[2] in ("optimizer", "scheduler"):
                known = list((OptimizerConfig if loc[2] == "optimizer" else SchedulerConfig).model_fields)
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
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], file: str = "<recipe>") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (``peers.0.model=...`` indexes lists) to a raw recipe dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                f"--set {item!r} is not of the form key=value",
                file=file,
                hint="write e.g. --set run.epochs=5 or --set peers.0.model=cifar_resnet32",
            )
        path, _, raw = item.partition("=")
        keys = path.strip().split(".")
        if not all(keys):
            raise RecipeError(f"--set {item!r} has an empty key", file=file, hint="write e.g. --set run.epochs=5")
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = _list_item(node, key, ".".join(keys[: depth + 1]), file)
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(
                        f"--set {item!r}: {'.'.join(keys[: depth + 1])} is a value, not a table",
                        file=file,
                        field=".".join(keys[: depth + 1]),
                    )
        last = keys[-1]
        value = _coerce_value(raw.strip())
        if isinstance(node, list):
            idx = _index(last, path, file, len(node))
            node[idx] = value
        else:
            node[last] = value
    return data


def _index(key: str, path: str, file: str, length: int) -> int:
    if not key.isdigit() or int(key) >= length:
        raise RecipeError(
            f"--set: '{key}' is not an index of a list of length {length}",
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
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
            file=str(p),
            hint="save the recipe as UTF-8 text",
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"TOML syntax error: {e}", file=str(p), hint="fix the TOML syntax at the line and column named") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    data = read_toml(path)
    data = apply_overrides(data, overrides or [], file=str(path))
    return parse_recipe(data, file=str(path))
