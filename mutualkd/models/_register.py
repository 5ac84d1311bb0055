"""Put mutualkd's CIFAR models into timm's own model registry, without clobbering timm.

timm's :func:`timm.models.register_model` overwrites a name that is already registered,
with nothing but a warning. :func:`register_cifar_model` refuses to do that unless the
existing entry comes from the very same module, which is what happens when that module
is imported again (``importlib.reload``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
import warnings

from timm.models import (
    DefaultCfg,
    build_model_with_cfg,
    generate_default_cfgs,
    is_model,
    model_entrypoint,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

from mutualkd.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from mutualkd.errors import UserError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "NoPretrainedWeightsError",
    "build_cifar_model",
    "cifar_default_cfgs",
    "register_cifar_model",
]

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=nn.Module)


class NoPretrainedWeightsError(UserError, RuntimeError):
    """``pretrained=True`` was asked of a model that has no published weights."""


def cifar_default_cfgs(
    names: tuple[str, ...], *, paper_name: str, paper_ids: str
) -> dict[str, DefaultCfg]:
    """timm default cfgs for each name: tag ``cifar10`` (the default, 10 classes) and ``cifar100``.

    No cfg names a weight source: these models have no published weights.
    """
    common: dict[str, Any] = {
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_name": paper_name,
        "paper_ids": paper_ids,
    }
    cfgs: dict[str, dict[str, Any]] = {}
    for name in names:
        cfgs[f"{name}.cifar10"] = {**common, "num_classes": 10, "mean": CIFAR10_MEAN, "std": CIFAR10_STD}
        cfgs[f"{name}.cifar100"] = {**common, "num_classes": 100, "mean": CIFAR100_MEAN, "std": CIFAR100_STD}
    return dict(generate_default_cfgs(cfgs))


def _owner(name: str) -> str:
    """The module that registered the timm model ``name`` (its entrypoint's module)."""
    fn = model_entrypoint(name)
    return getattr(fn, "__module__", None) or "<unknown module>"


def register_cifar_model(fn: F) -> F:
    """Register ``fn`` in timm's registry under ``fn.__name__``; never overwrite timm's own names.

    Re-registering a name that the same module registered before (a re-import) is
    allowed and replaces the stale entry quietly.

    Raises:
        RuntimeError: ``fn.__name__`` is already registered by another module.
        ValueError: the name contains a ``.`` (timm reserves it for pretrained tags).
    """
    name = fn.__name__
    if "." in name:
        raise ValueError(f"model name {name!r} must not contain '.': timm reads it as a pretrained tag")
    if is_model(name):
        owner = _owner(name)
        if owner != fn.__module__:
            raise RuntimeError(
                f"cannot register model {name!r} from {fn.__module__}: "
                f"timm already has a model of that name, registered by {owner}"
            )
        with warnings.catch_warnings():
            # timm warns on every overwrite; a re-import of our own module is not news.
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
            return register_model(fn)
    return register_model(fn)


def build_cifar_model(model_cls: Callable[..., M], variant: str, pretrained: bool = False, **kwargs: Any) -> M:
    """Build ``variant`` through timm's :func:`build_model_with_cfg`.

    ``kwargs`` are what :func:`timm.create_model` hands to an entrypoint (``pretrained_cfg``,
    ``pretrained_cfg_overlay``, ``cache_dir``, ... are consumed by timm; the rest reach
    ``model_cls``). No weights are published for these models, so ``pretrained=True`` only
    works when the caller names a weight source itself (e.g.
    ``pretrained_cfg_overlay=dict(file="model.pth")``); otherwise it raises
    :class:`NoPretrainedWeightsError`.
    """
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        if not (cfg.has_weights or cfg.state_dict is not None):
            raise NoPretrainedWeightsError(
                f"no pretrained weights are published for {variant}; "
                "train it with mutualkd or load a checkpoint"
            )
    kwargs.setdefault("feature_cfg", {"out_indices": (0, 1, 2, 3)})
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
