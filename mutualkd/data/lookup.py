"""Data sets by name: the ``mutualkd.datasets`` plugins looked up, called, and their faults named.

Above :mod:`._base` (the split and info types) and :mod:`.plugin` (the contract), so that
neither of them needs the registry.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import TYPE_CHECKING, Any

from mutualkd import registry
from mutualkd.data._base import DatasetInfo, Split
from mutualkd.data.plugin import DatasetPlugin, DataSources, InMemoryDataset
from mutualkd.errors import DataError, UserError, unknown_name_hint

if TYPE_CHECKING:
    from mutualkd.config import DataConfig

__all__ = [
    "DatasetFn",
    "dataset_entrypoint",
    "dataset_pipeline",
    "dataset_plugin",
    "dataset_sources",
    "dataset_splits",
    "list_datasets",
    "register_dataset",
]


# --------------------------------------------------------------------------- the data set plugins

#: The old entrypoint form: the recipe's ``[data]`` table in, ``(train, test, info)`` out.
#: :func:`register_dataset` still takes one (as an :class:`~mutualkd.data.plugin.InMemoryDataset`).
DatasetFn = Callable[["DataConfig"], tuple[Split, Split, DatasetInfo]]
_KIND = "dataset"


def register_dataset(plugin: Any, name: str | None = None) -> Any:
    """Register a data set in-process under ``name`` (default: the object's ``__name__``).

    For tests and notebooks: an installed set is an entry point in ``mutualkd.datasets``.
    ``plugin`` is a :class:`~mutualkd.data.plugin.DatasetPlugin` (instance or subclass) or a
    function ``cfg -> (train, test, info)``. A name that is taken by another object is an
    error naming both; the same object (its module reloaded) is left as it is. Returns
    ``plugin``, so it works as a decorator.
    """
    name = name or getattr(plugin, "__name__", "")
    value = f"{getattr(plugin, '__module__', '?')}:{getattr(plugin, '__qualname__', name)}"
    if name in registry.names(_KIND):
        old = registry.provider(_KIND, name)
        if old is not None and old.value != value and old.obj is not plugin:
            raise ValueError(f"data set {name!r} is registered twice: {old.value.replace(':', '.')}"
                             f" and {value.replace(':', '.')}")
        return plugin
    obj = plugin if isinstance(plugin, DatasetPlugin) or isinstance(plugin, type) else InMemoryDataset(plugin)
    registry.register(_KIND, name, obj, distribution=f"<in-process: {value}>")
    return plugin


def list_datasets() -> list[str]:
    """The installed data set names (entry points of ``mutualkd.datasets``, and in-process ones), sorted."""
    return registry.names(_KIND)


def dataset_plugin(name: str) -> DatasetPlugin:
    """The plugin of the data set ``name``: a :class:`DataError` on ``data.dataset`` if none is installed.

    A plugin that cannot be imported, is not a DatasetPlugin, has two providers or is blocked
    is a :class:`~mutualkd.errors.PluginError` naming its distribution and the reason.
    """
    if name not in registry.names(_KIND) and not registry.provider(_KIND, name, disabled=True):
        raise DataError(
            f"unknown data set {name!r}",
            field="data.dataset",
            hint=unknown_name_hint("data set", name, list_datasets()) + "; `mutualkd plugins` lists what is installed",
        )
    obj = registry.get(_KIND, name, where="[data.dataset]")
    return obj() if isinstance(obj, type) else obj  # type: ignore[no-any-return]


def _guarded(cfg: DataConfig, method: str) -> Any:
    """``plugin.<method>(cfg)``; an exception that is not a UserError is reported as the plugin's fault."""
    plugin = dataset_plugin(cfg.dataset)
    try:
        return getattr(plugin, method)(cfg)
    except UserError:
        raise
    except Exception as e:  # a bug in the plugin, not in the recipe: say whose
        info = registry.provider(_KIND, cfg.dataset)
        who = f"{info.distribution} {info.version} ({info.value})".replace("  ", " ") if info else "?"
        raise DataError(
            f"data set plugin '{cfg.dataset}' from {who} failed in {method}(): {type(e).__name__}: {e}",
            field="data.dataset",
            hint=f"this is a fault of the plugin, not of the recipe: report it to the authors of"
            f" {info.distribution if info else 'the plugin'}, or choose another data set",
        ) from e


def dataset_sources(cfg: DataConfig) -> DataSources:
    """The map-style sources of ``cfg.dataset`` (the stream pipeline's view).

    Grey images of unknown statistics get ImageNet's averaged over its channels, as the
    stream pipeline's default (ImageNet's own) has three.
    """
    src: DataSources = _guarded(cfg, "sources")
    if src.in_chans == 1 and (src.mean is None or src.std is None):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        grey = (sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,)
        src = dataclasses.replace(src, mean=grey[0], std=grey[1])
    return src


def dataset_splits(cfg: DataConfig) -> tuple[Split, Split, DatasetInfo]:
    """``(train, test, info)`` of ``cfg.dataset`` decoded in memory (the device pipeline's view)."""
    return _guarded(cfg, "splits")  # type: ignore[no-any-return]


def dataset_pipeline(cfg: DataConfig) -> tuple[str, str]:
    """``(kind, reason)``: the pipeline ``data.pipeline = "auto"`` picks for ``cfg.dataset``."""
    return _guarded(cfg, "pipeline")  # type: ignore[no-any-return]


def dataset_entrypoint(name: str) -> DatasetFn:
    """A function ``cfg -> (train, test, info)`` for ``name``: :func:`dataset_splits` with the name checked first."""
    dataset_plugin(name)
    return dataset_splits
