"""mutualkd: mutual learning and knowledge distillation for timm models.

Importing the package registers the CIFAR model families into timm's registry
(``timm.create_model("cifar_wrn_16_2")``). Strategies and metrics are plugins found
through the entry-point groups ``mutualkd.strategies`` and ``mutualkd.metrics``.
From Python, ``mutualkd.fit(recipe, overrides={...})`` trains a recipe given as a TOML
path, a dict or a :class:`Recipe` (docs/python.md).

Nothing heavy is imported here: the public names below are loaded on first access
(PEP 562), so ``mutualkd --help`` starts without torch, timm or accelerate. The CIFAR
models are still registered in timm, without importing timm: see :func:`_register_cifar_models`.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time __getattr__ loads them
    from mutualkd import models as models
    from mutualkd import registry as registry
    from mutualkd.registry import get_metric, get_strategy
    from mutualkd.api import fit
    from mutualkd.config import Recipe, load_recipe, parse_recipe
    from mutualkd.engine import Callback, Trainer
    from mutualkd.errors import CheckpointError, DataError, PluginError, RecipeError, UserError
    from mutualkd.strategy import (
        LossTerms,
        PeerInfo,
        PeerOutput,
        SetupContext,
        Stage,
        Step,
        StepContext,
        Strategy,
        StrategyParams,
    )

__all__ = [
    "__version__",
    "fit",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "Trainer",
    "Callback",
    "registry",
    "get_strategy",
    "get_metric",
    "Strategy",
    "StrategyParams",
    "Step",
    "Stage",
    "StepContext",
    "SetupContext",
    "PeerInfo",
    "PeerOutput",
    "LossTerms",
    "UserError",
    "RecipeError",
    "DataError",
    "PluginError",
    "CheckpointError",
]

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "fit": "mutualkd.api",
    "Recipe": "mutualkd.config",
    "load_recipe": "mutualkd.config",
    "parse_recipe": "mutualkd.config",
    "Trainer": "mutualkd.engine.trainer",
    "Callback": "mutualkd.engine.hooks",
    "get_strategy": "mutualkd.registry",
    "get_metric": "mutualkd.registry",
    **dict.fromkeys(("UserError", "RecipeError", "DataError", "PluginError", "CheckpointError"), "mutualkd.errors"),
    **dict.fromkeys(
        ("Strategy", "StrategyParams", "Step", "Stage", "StepContext", "SetupContext", "PeerInfo", "PeerOutput",
         "LossTerms"),
        "mutualkd.strategy",
    ),
}


def _version() -> str:
    """The installed distribution's version (one source of truth: pyproject.toml)."""
    from importlib import metadata

    try:
        return metadata.version("mutualkd")
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in ("models", "registry"):  # submodules: the registry is the module itself
        value = importlib.import_module(f"mutualkd.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'mutualkd' has no attribute {name!r}")
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | {"models"})


# --------------------------------------------------------------------------- CIFAR models in timm


class _RegisterAfterTimm(MetaPathFinder, Loader):
    """Import hook: once ``timm`` has been imported, import :mod:`mutualkd.models`.

    It finds nothing itself: for ``timm`` it asks the finders after it for the real spec
    and wraps that spec's loader, so timm's own module runs unchanged; the hook then
    removes itself and gives the module its own loader back.
    """

    def __init__(self) -> None:
        self._loader: Loader | None = None

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "timm" or self._loader is not None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self._loader, spec.loader = spec.loader, self
                return spec
        return None  # timm is not installed: let the import fail as it would without us

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        loader, self._loader = self._loader, None
        assert loader is not None
        if module.__spec__ is not None:
            module.__spec__.loader = loader
        module.__loader__ = loader
        loader.exec_module(module)  # if timm fails to import, the hook stays for a later try
        _remove_hook()
        importlib.import_module("mutualkd.models")

    def __getattr__(self, name: str) -> Any:  # e.g. get_resource_reader while timm's module runs
        if self._loader is None:
            raise AttributeError(name)
        return getattr(self._loader, name)


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTimm)]


def _register_cifar_models() -> None:
    """Keep the promise of ``import mutualkd``: the CIFAR families are timm models.

    Registering means importing timm (and torch), which costs seconds that commands such
    as ``mutualkd --help`` never need. So the registration waits for timm: at once if
    timm is already imported, otherwise right after the first ``import timm`` (of any
    module: the user's or mutualkd's own), through a one-shot import hook.
    """
    if "timm" in sys.modules:
        importlib.import_module("mutualkd.models")
    elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


_register_cifar_models()
