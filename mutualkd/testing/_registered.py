"""``registered``: an object in the plugin registry for the duration of a ``with`` block."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from typing import Any

from mutualkd import registry
from mutualkd.registry import Kind

__all__ = ["registered"]


@contextlib.contextmanager
def registered(kind: Kind, name: str, obj: Any) -> Iterator[Any]:
    """Register ``obj`` as the ``kind`` plugin ``name`` inside a ``with`` block.

    The object is validated like an installed plugin, a name that is already taken is an
    error (nothing is overwritten), and the registration is removed on exit. Its
    distribution is listed as ``<test>``. The engine only asks the registry by name, so
    this is how a class or a metric that is not installed runs through a recipe.
    """
    registry.register(kind, name, obj, distribution="<test>")
    try:
        yield obj
    finally:
        registry.unregister(kind, name)
