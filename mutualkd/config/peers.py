"""``[[peers]]`` and what a peer trains with: its optimizer, its schedule, its EMA copy."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from mutualkd.config._fields import MAX_LR, PositiveInt, _Strict
from mutualkd.names import check_name

__all__ = ["OptimizerConfig", "SchedulerConfig", "EmaConfig", "PeerConfig"]


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
