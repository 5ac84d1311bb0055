"""``[data]``: the data set, its batches, the pipeline and its augmentation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from mutualkd.config._fields import MAX_IMAGE_SIZE, MAX_SEED, PositiveInt, _seed_in_range, _Strict
from mutualkd.errors import unknown_name_hint

__all__ = ["DataConfig", "STREAM_ONLY_FIELDS", "AUGMENT_FIELDS", "PIPELINE_CHOICE_FIELDS"]

#: ``[data]`` keys only the stream pipeline reads (its workers, its reader and timm's
#: transforms); set under a pipeline that resolves to ``device`` they are refused, not ignored
#: (:func:`mutualkd.config.resolve.check_pipeline_keys`). Mixup, cutmix and label smoothing act
#: on the device in both pipelines and are not among them.
STREAM_ONLY_FIELDS: tuple[str, ...] = (
    "num_workers", "prefetch_factor", "skip_corrupt", "config_from", "mean", "std", "scale", "ratio", "hflip",
    "vflip", "color_jitter", "auto_augment", "interpolation", "crop_pct", "reprob", "remode", "recount",
)
#: The stream pipeline's training augmentation keys: unused with ``augment = false``.
AUGMENT_FIELDS: tuple[str, ...] = (
    "scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "reprob", "remode", "recount",
)
#: ``[data]`` keys read only when ``pipeline = "auto"`` chooses the pipeline.
PIPELINE_CHOICE_FIELDS: tuple[str, ...] = ("memory_budget_gb",)


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
