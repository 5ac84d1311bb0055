"""The input spec of both pipelines, the stream pipeline's image transforms, and the batch mixing of both.

:func:`resolve_input` settles the input size, normalisation, interpolation and ``crop_pct``
once per run, the way ``timm.data.resolve_data_config`` does (the recipe's keys first,
then the pretrained config of ``[data] config_from``, then the data set's own); the
device pipeline resizes its splits to that size (:func:`mutualkd.data.pipeline.plan_device`),
and :func:`build_transform` hands it with the recipe's augmentation keys
to ``timm.data.create_transform``: RandomResizedCrop (``scale``, ``ratio``), flips, colour
jitter, RandAugment / AutoAugment / AugMix strings, random erasing for training; resize to
``size / crop_pct`` and a centre crop for evaluation.

:class:`BatchMixup` is timm's ``Mixup`` (mixup, cutmix, label smoothing) applied to a
training batch on the device, in either pipeline. Its random draws are seeded from
``(seed, epoch, batch, rank)``, so a resumed run mixes the batches it has left exactly as
the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
from dataclasses import dataclass
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mutualkd.errors import DataError

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = ["InputConfig", "BatchMixup", "build_mixup", "build_transform", "resolve_input", "seeded"]

#: Bundled sets whose images must not be flipped (a flipped digit is another digit, or none).
NO_FLIP = frozenset({"digits", "mnist", "fashion_mnist"})
_FOLDER_CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT
_MIX_TAG = 0x6D6978  # keeps the mixing seed stream apart from the augmentation's


@dataclass(frozen=True)
class InputConfig:
    """What a peer is fed: ``(C, H, W)``, normalisation, interpolation, evaluation ``crop_pct``."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str = "center"
    source: str = "the data set"  # where the size and statistics came from, for the console line


@contextlib.contextmanager
def seeded(words: Sequence[int]) -> Iterator[None]:
    """Seed ``random``, numpy's and torch's global generators from ``words``, restoring them after.

    timm's transforms and ``Mixup`` draw from these global generators; seeding them per
    sample (or per batch) makes the draws a pure function of ``words``, whichever worker
    process runs them and whatever ran before.
    """
    state = np.random.SeedSequence([int(w) % 2**63 for w in words]).generate_state(2, dtype=np.uint64)
    gen = torch.default_generator  # the CPU generator only: torch.manual_seed also seeds (and inits) CUDA's
    saved = random.getstate(), np.random.get_state(), gen.get_state()
    random.seed(int(state[0]))
    np.random.seed(int(state[1]) % 2**32)
    gen.manual_seed(int(state[1]) >> 1)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        gen.set_state(saved[2])


def _pretrained_cfg(name: str, peers: Mapping[str, str]) -> dict[str, Any]:
    """The pretrained config of a peer (by its recipe name) or of a timm model name (with its tag)."""
    import timm

    import mutualkd.models  # noqa: F401  (registers the CIFAR families into timm)

    model_name = peers.get(name, name)
    cfg = timm.models.get_pretrained_cfg(model_name) if timm.is_model(model_name) else None
    if cfg is None:
        known = ", ".join(peers) or "none"
        raise DataError(
            f"config_from = {name!r} is neither a peer of this recipe nor a timm model with a pretrained config",
            field="data.config_from",
            hint=f"name a peer ({known}) or a timm model such as resnet34.a1_in1k; or leave it unset",
        )
    return cfg.to_dict()


def resolve_input(
    cfg: DataConfig, *, dataset: str, in_chans: int, native_size: tuple[int, int] | None,
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None, peers: Mapping[str, str],
) -> InputConfig:
    """A run's input spec (both pipelines); ``native_size``/``mean``/``std`` are the data set's (None: none).

    Order for each value: the recipe's key, ``config_from``'s pretrained config, the data
    set's own value, timm's default (224 px, ImageNet statistics, bilinear, crop_pct 0.875
    for folders and 1.0 for the bundled sets, which are already at their size).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

    pre = _pretrained_cfg(cfg.config_from, peers) if cfg.config_from is not None else {}
    args: dict[str, Any] = {"in_chans": in_chans}
    if cfg.image_size is not None:
        args["input_size"] = (in_chans, cfg.image_size, cfg.image_size)
    elif not pre and native_size is not None:
        args["input_size"] = (in_chans, *native_size)
    for key in ("interpolation", "crop_pct"):
        if getattr(cfg, key) is not None:
            args[key] = getattr(cfg, key)
    resolved = resolve_data_config(args, pretrained_cfg=pre or {"input_size": args.get("input_size", (in_chans, 224, 224))})
    c, h, w = resolved["input_size"]
    size = (in_chans, int(h), int(w))
    default_mean, default_std = (mean, std) if mean is not None and std is not None else (
        IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    m = cfg.mean or (tuple(pre["mean"]) if pre.get("mean") else tuple(default_mean))
    s = cfg.std or (tuple(pre["std"]) if pre.get("std") else tuple(default_std))
    if len(m) != in_chans or len(s) != in_chans:
        field = "data.mean" if cfg.mean and len(cfg.mean) != in_chans else "data.std" if cfg.std else "data.config_from"
        raise DataError(
            f"{dataset} images have {in_chans} channel(s) but mean has {len(m)} and std {len(s)} entries",
            field=field, hint=f"give mean and std {in_chans} value(s) each",
        )
    if cfg.crop_pct is not None:
        crop = cfg.crop_pct
    elif pre.get("crop_pct") is not None:
        crop = float(pre["crop_pct"])
    else:
        crop = 1.0 if native_size is not None else _FOLDER_CROP_PCT
    interp = cfg.interpolation or str(pre.get("interpolation") or "bilinear")
    where = f"config_from = {cfg.config_from!r}" if pre else "the data set"
    return InputConfig(size, tuple(map(float, m)), tuple(map(float, s)), interp, float(crop),
                       str(pre.get("crop_mode") or "center"), where)


def _black_when_no_bits(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, with 0 bits kept giving the black image older Pillow gave (Pillow 13 refuses 0)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(transform: Any) -> Any:
    """Point the posterize ops of timm's RandAugment / AutoAugment / AugMix in ``transform`` at the safe one.

    RandAugment's ``inc1`` posterize keeps 4 - 4 * magnitude / 10 bits: 0 at magnitude 10,
    which ``mstd`` reaches; Pillow 13's ``ImageOps.posterize`` raises for 0 bits.
    """
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", []):
        ops = list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:
            ops += list(sub)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _black_when_no_bits
    return transform


def build_transform(cfg: DataConfig, inp: InputConfig, *, dataset: str, train: bool) -> Any:
    """timm's ``create_transform`` for training (augmented) or evaluation (resize + centre crop)."""
    from timm.data import create_transform

    common: dict[str, Any] = dict(input_size=inp.input_size, interpolation=inp.interpolation, mean=inp.mean,
                                  std=inp.std, crop_pct=inp.crop_pct, crop_mode=inp.crop_mode)
    if not train:
        return create_transform(is_training=False, **common)
    if not cfg.augment:
        return create_transform(is_training=False, **{**common, "crop_pct": 1.0})
    hflip = cfg.hflip if cfg.hflip is not None else (0.0 if dataset in NO_FLIP else 0.5)
    try:
        return _pillow_safe(create_transform(
            is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=hflip, vflip=cfg.vflip,
            color_jitter=cfg.color_jitter if cfg.color_jitter is not None else 0.0,
            auto_augment=cfg.auto_augment,
            re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, **common,
        ))
    except (AssertionError, ValueError, KeyError) as e:
        raise DataError(f"the stream transforms cannot be built ({type(e).__name__}: {e})", field="data.auto_augment",
                        hint="use a timm augmentation string such as rand-m9-mstd0.5-inc1, original or augmix-m5-w4-d2"
                        ) from None


class BatchMixup:
    """timm's ``Mixup`` on a training batch: ``(x, y int64 [B])`` in, ``(x mixed, y soft float [B, K])`` out.

    The draws of batch ``b`` of epoch ``e`` on process ``rank`` are seeded from
    ``(seed, e, b, rank)``. An odd batch (possible when ``skip_corrupt`` dropped an image)
    loses its last sample, since timm mixes each sample with its mirror in the batch.
    """

    def __init__(self, mixup: Any, *, seed: int) -> None:
        self.mixup = mixup
        self.seed = int(seed)

    def __call__(self, x: Tensor, y: Tensor, *, epoch: int, batch: int, rank: int) -> tuple[Tensor, Tensor]:
        if x.shape[0] % 2:
            x, y = x[:-1], y[:-1]
        with seeded([self.seed, epoch, batch, rank, _MIX_TAG]):
            return self.mixup(x, y)


def build_mixup(cfg: DataConfig, num_classes: int, *, seed: int) -> BatchMixup | None:
    """The recipe's mixing (mixup, cutmix, label smoothing), or None when all are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0 and cfg.cutmix_minmax is None and cfg.label_smoothing <= 0:
        return None
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                label_smoothing=cfg.label_smoothing, num_classes=num_classes)
    if cfg.mixup <= 0 and cfg.cutmix <= 0 and cfg.cutmix_minmax is None:
        mix.mixup_enabled = False  # label smoothing alone: soft targets, unmixed images
    return BatchMixup(mix, seed=seed)
