"""The plugin registry: strategies and metrics found through Python entry points.

Two entry-point groups are read, ``mutualkd.strategies`` and ``mutualkd.metrics``.
mutualkd's own built-ins are declared in its pyproject.toml through the same groups, so
they load exactly like third-party plugins. Loading is lazy and per plugin: a plugin
whose import fails is recorded with its distribution and error, and the others keep
working. A name declared by two distributions is an error that names both.

Setting the environment variable ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the
plugins of the ``mutualkd`` distribution itself; ``MUTUALKD_BLOCK_PLUGINS`` (a comma
separated list of names, or ``kind:name``) blocks individual plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
import inspect
import os
from typing import Any, Literal

from mutualkd.errors import PluginError, unknown_name_hint

__all__ = [
    "GROUPS",
    "PluginInfo",
    "Registry",
    "registry",
    "get_strategy",
    "get_metric",
]

Kind = Literal["strategy", "metric"]
GROUPS: dict[Kind, str] = {"strategy": "mutualkd.strategies", "metric": "mutualkd.metrics"}
CORE_DISTRIBUTION = "mutualkd"
ENV_DISABLE_AUTOLOAD = "MUTUALKD_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "MUTUALKD_BLOCK_PLUGINS"


@dataclass
class PluginInfo:
    """One entry point, loaded or not."""

    kind: Kind
    name: str
    value: str  # "module:attr"
    distribution: str
    version: str
    status: Literal["ok", "error", "blocked", "not loaded"] = "not loaded"
    error: str | None = None
    obj: Any = field(default=None, repr=False)

    @property
    def module(self) -> str:
        return self.value.split(":", 1)[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.value,
            "status": self.status,
            "error": self.error,
        }


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("<unknown>", "?")
    return (dist.metadata["Name"] or "<unknown>", dist.version or "?")


def _blocked_from_env() -> set[str]:
    raw = os.environ.get(ENV_BLOCK, "")
    return {x.strip() for x in raw.split(",") if x.strip()}


class Registry:
    """Discovers, validates and hands out plugins by kind and name."""

    def __init__(self) -> None:
        self._plugins: dict[Kind, dict[str, PluginInfo]] | None = None
        self._duplicates: dict[Kind, dict[str, list[PluginInfo]]] = {"strategy": {}, "metric": {}}
        self._blocked: set[str] = set()

    # ------------------------------------------------------------------ discovery
    def _discover(self) -> dict[Kind, dict[str, PluginInfo]]:
        if self._plugins is not None:
            return self._plugins
        autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() not in ("1", "true", "yes")
        plugins: dict[Kind, dict[str, PluginInfo]] = {"strategy": {}, "metric": {}}
        for kind, group in GROUPS.items():
            seen: dict[str, list[PluginInfo]] = {}
            for ep in metadata.entry_points(group=group):
                dist, version = _dist_of(ep)
                if not autoload and dist != CORE_DISTRIBUTION:
                    continue
                info = PluginInfo(kind, ep.name, ep.value, dist, version)
                same = seen.setdefault(ep.name, [])
                # The same distribution can be visible twice (e.g. an editable install
                # next to a stale egg-info); that is one provider, not a duplicate.
                if any(p.distribution == dist and p.value == ep.value for p in same):
                    continue
                same.append(info)
            for name, infos in seen.items():
                if len(infos) > 1:
                    self._duplicates[kind][name] = infos
                    for info in infos:
                        info.status = "error"
                        info.error = "duplicate name, also provided by " + ", ".join(
                            f"{o.distribution} ({o.value})" for o in infos if o is not info
                        )
                plugins[kind][name] = infos[0]
        self._plugins = plugins
        return plugins

    def reset(self) -> None:
        """Forget everything discovered (tests, and after installing a plugin in-process)."""
        self._plugins = None
        self._duplicates = {"strategy": {}, "metric": {}}

    def block(self, names: Iterable[str]) -> None:
        """Block plugins by ``name`` or ``kind:name`` for the rest of this process."""
        self._blocked.update(names)

    def _is_blocked(self, kind: Kind, name: str) -> bool:
        blocked = self._blocked | _blocked_from_env()
        return name in blocked or f"{kind}:{name}" in blocked

    # ------------------------------------------------------------------ listing
    def names(self, kind: Kind) -> list[str]:
        return sorted(self._discover()[kind])

    def infos(self, load: bool = True) -> list[PluginInfo]:
        """Every plugin of every kind, loaded (so that broken ones show their error)."""
        out: list[PluginInfo] = []
        for kind, table in self._discover().items():
            for name in sorted(table):
                info = table[name]
                if load:
                    self._load(info)
                dupes = self._duplicates[kind].get(name)
                out.extend(dupes if dupes else [info])
        return out

    # ------------------------------------------------------------------ loading
    def _load(self, info: PluginInfo) -> PluginInfo:
        if self._is_blocked(info.kind, info.name):
            info.status, info.error = "blocked", "blocked by configuration"
            return info
        if info.status in ("ok", "error"):
            return info
        try:
            obj = metadata.EntryPoint(info.name, info.value, GROUPS[info.kind]).load()
        except Exception as e:  # a broken plugin must not take the others down
            info.status, info.error = "error", f"import failed: {type(e).__name__}: {e}"
            return info
        problem = _validate(info.kind, obj)
        if problem:
            info.status, info.error = "error", problem
            return info
        info.status, info.obj = "ok", obj
        return info

    def get(self, kind: Kind, name: str, *, where: str | None = None) -> Any:
        """The loaded plugin object, or a PluginError that says why not and what exists."""
        table = self._discover()[kind]
        if name in self._duplicates[kind]:
            infos = self._duplicates[kind][name]
            raise PluginError(
                f"{kind} '{name}' is provided by more than one distribution: "
                + " and ".join(f"{i.distribution} {i.version} ({i.value})" for i in infos),
                where=where,
                hint="uninstall one of them, or block one with MUTUALKD_BLOCK_PLUGINS",
            )
        if name not in table:
            raise PluginError(
                f"unknown {kind} '{name}'",
                where=where,
                hint=unknown_name_hint(kind, name, list(table))
                + "; `mutualkd plugins` lists what is installed",
            )
        info = self._load(table[name])
        if info.status == "blocked":
            raise PluginError(f"{kind} '{name}' is blocked", where=where, hint=f"remove it from {ENV_BLOCK}")
        if info.status != "ok":
            raise PluginError(
                f"{kind} '{name}' from {info.distribution} {info.version} ({info.value}) is broken: {info.error}",
                where=where,
                hint=f"fix or reinstall {info.distribution}; `mutualkd plugins` shows every plugin's status",
            )
        return info.obj


def _validate(kind: Kind, obj: Any) -> str | None:
    """Check a loaded plugin against its contract; return the problem, or None."""
    if kind == "metric":
        if not callable(obj):
            return f"a metric must be a callable distance(a, b) -> Tensor, got {type(obj).__name__}"
        try:
            params = [
                p
                for p in inspect.signature(obj).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
            ]
        except (TypeError, ValueError):
            return None
        if len(params) != 2:
            return f"a metric takes exactly two required arguments (a, b); {obj!r} takes {len(params)}"
        return None
    from mutualkd.strategy import Strategy

    if not (inspect.isclass(obj) and issubclass(obj, Strategy)):
        return f"a strategy must be a subclass of mutualkd.Strategy, got {obj!r}"
    missing = [m for m in ("Params", "steps", "compute") if not hasattr(obj, m)]
    if missing:
        return f"strategy class lacks {', '.join(missing)}"
    return None


registry = Registry()


def get_strategy(name: str, *, where: str | None = None) -> type:
    """The strategy class registered under ``name``."""
    return registry.get("strategy", name, where=where)


def get_metric(name: str, *, where: str | None = None) -> Callable[..., Any]:
    """The distance function registered under ``name``."""
    return registry.get("metric", name, where=where)
