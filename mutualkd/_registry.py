"""The plugin registry: strategies and metrics found through Python entry points.

Two entry-point groups are read, ``mutualkd.strategies`` and ``mutualkd.metrics``.
mutualkd's own built-ins are declared in its pyproject.toml through the same groups, so
they load exactly like third-party plugins. Loading is lazy and per plugin: a plugin
whose import fails is recorded with its distribution and error, and the others keep
working. A name declared by two distributions is an error that names both.

Setting the environment variable ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the
plugins of the ``mutualkd`` distribution itself: third-party entry points are listed with
status ``disabled`` and never imported (it is read when the registry first discovers
plugins, i.e. once per process, or again after :meth:`Registry.reset`). Individual plugins
are blocked by name (or ``kind:name``) from three sources: the environment variable
``MUTUALKD_BLOCK_PLUGINS`` (comma separated), a recipe's ``run.block_plugins`` and the
command-line option ``--block-plugin``. A blocked plugin is not imported.

Objects can also be registered in-process with :meth:`Registry.register` (the
conformance kit :mod:`mutualkd.testing` does, through ``registered()``, to run a strategy
class that is not installed); the same validation and duplicate rules apply.
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
Status = Literal["ok", "error", "blocked", "disabled", "not loaded"]


@dataclass
class PluginInfo:
    """One entry point, loaded or not."""

    kind: Kind
    name: str
    value: str  # "module:attr"
    distribution: str
    version: str
    status: Status = "not loaded"
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
        self._disabled: list[PluginInfo] = []
        self._registered: dict[Kind, dict[str, PluginInfo]] = {"strategy": {}, "metric": {}}
        self._blocked: dict[str, set[str]] = {}  # source -> names it blocks

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def autoload() -> bool:
        """False when ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD`` is set to 1/true/yes."""
        return os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes")

    def _discover(self) -> dict[Kind, dict[str, PluginInfo]]:
        if self._plugins is not None:
            return self._plugins
        autoload = self.autoload()
        plugins: dict[Kind, dict[str, PluginInfo]] = {"strategy": {}, "metric": {}}
        self._disabled = []
        for kind, group in GROUPS.items():
            seen: dict[str, list[PluginInfo]] = {}
            for ep in metadata.entry_points(group=group):
                dist, version = _dist_of(ep)
                info = PluginInfo(kind, ep.name, ep.value, dist, version)
                if not autoload and dist != CORE_DISTRIBUTION:
                    # Listed, so that `mutualkd plugins` shows what is switched off, but
                    # never imported and never in the way of a built-in of the same name.
                    info.status, info.error = "disabled", f"third-party autoload disabled by {ENV_DISABLE_AUTOLOAD}"
                    if not any(p.distribution == dist and p.value == ep.value for p in self._disabled):
                        self._disabled.append(info)
                    continue
                same = seen.setdefault(ep.name, [])
                # The same distribution can be visible twice (e.g. an editable install
                # next to a stale egg-info); that is one provider, not a duplicate.
                if any(p.distribution == dist and p.value == ep.value for p in same):
                    continue
                same.append(info)
            for name, info in self._registered[kind].items():
                seen.setdefault(name, []).append(info)
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
        """Forget everything discovered (tests, and after installing a plugin in-process).

        Objects added with :meth:`register` and blocks set with :meth:`block` are kept.
        """
        self._plugins = None
        self._duplicates = {"strategy": {}, "metric": {}}
        self._disabled = []

    # ------------------------------------------------------------------ in-process registration
    def register(self, kind: Kind, name: str, obj: Any, *, distribution: str = "<in-process>", version: str = "") -> PluginInfo:
        """Register ``obj`` under ``name`` without an entry point (tests and the conformance kit).

        ``obj`` is validated like a loaded plugin. A name that is already taken is an
        error naming the provider; nothing is ever overwritten. Undo with :meth:`unregister`
        (or use :func:`mutualkd.testing.registered`, which does both).
        """
        if kind not in GROUPS:
            raise ValueError(f"kind must be one of {', '.join(GROUPS)}, got {kind!r}")
        value = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"
        problem = _validate(kind, obj)
        if problem:
            raise PluginError(f"cannot register {kind} '{name}' ({value}): {problem}")
        table = self._discover()[kind]
        if name in table:
            other = table[name]
            raise PluginError(
                f"cannot register {kind} '{name}' ({value}): the name is already provided by"
                f" {other.distribution} {other.version} ({other.value})".rstrip(),
                hint="choose another name, or unregister the other one first",
            )
        info = PluginInfo(kind, name, value, distribution, version, status="ok", obj=obj)
        self._registered[kind][name] = info
        table[name] = info
        return info

    def unregister(self, kind: Kind, name: str) -> None:
        """Remove an object added with :meth:`register` (entry points cannot be removed)."""
        info = self._registered[kind].pop(name, None)
        if info is None:
            raise PluginError(f"{kind} '{name}' was not registered in-process, so it cannot be unregistered")
        if self._plugins is not None and self._plugins[kind].get(name) is info:
            del self._plugins[kind][name]
        if name in self._duplicates[kind]:
            self.reset()  # the remaining providers are re-discovered from scratch

    # ------------------------------------------------------------------ blocking
    def block(self, names: Iterable[str], *, source: str = "--block-plugin") -> None:
        """Block plugins by ``name`` or ``kind:name``.

        ``source`` says who asked, and is named in error messages: the default is the
        command-line option ``--block-plugin`` (the commands call this with it); the
        engine passes the recipe's ``run.block_plugins``. Each call *replaces* what that
        source blocked before, so a second recipe in the same process does not inherit
        the first one's blocks; ``block([], source=...)`` lifts them.
        """
        names = {n.strip() for n in names if n and n.strip()}
        if names:
            self._blocked[source] = names
        else:
            self._blocked.pop(source, None)

    def blocked(self) -> dict[str, set[str]]:
        """Every active block: source -> names (``MUTUALKD_BLOCK_PLUGINS`` included)."""
        out = {src: set(names) for src, names in self._blocked.items()}
        env = _blocked_from_env()
        if env:
            out[ENV_BLOCK] = env
        return out

    def _blocked_by(self, kind: Kind, name: str) -> str | None:
        """The source that blocks this plugin, or None."""
        for source, names in self.blocked().items():
            if name in names or f"{kind}:{name}" in names:
                return source
        return None

    # ------------------------------------------------------------------ listing
    def names(self, kind: Kind) -> list[str]:
        return sorted(self._discover()[kind])

    def infos(self, load: bool = True) -> list[PluginInfo]:
        """Every plugin of every kind, loaded (so that broken ones show their error).

        Third-party plugins switched off by ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD`` come
        last, with status ``disabled``.
        """
        out: list[PluginInfo] = []
        for kind, table in self._discover().items():
            for name in sorted(table):
                info = table[name]
                if load:
                    self._load(info)
                dupes = self._duplicates[kind].get(name)
                out.extend(dupes if dupes else [info])
        out.extend(sorted(self._disabled, key=lambda i: (list(GROUPS).index(i.kind), i.name)))
        return out

    # ------------------------------------------------------------------ loading
    def _load(self, info: PluginInfo) -> PluginInfo:
        if info.status == "disabled":
            return info
        source = self._blocked_by(info.kind, info.name)
        if source is not None:
            info.status, info.error = "blocked", f"blocked by {source}"
            return info
        if info.status == "blocked":  # unblocked since: back to what it was
            info.status, info.error = ("ok", None) if info.obj is not None else ("not loaded", None)
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
                hint="uninstall one of them (pip uninstall DISTRIBUTION); a name can only have one provider",
            )
        if name not in table:
            off = [i for i in self._disabled if i.kind == kind and i.name == name]
            if off:
                raise PluginError(
                    f"{kind} '{name}' (from {off[0].distribution} {off[0].version}) is not loaded because"
                    f" {ENV_DISABLE_AUTOLOAD} is set",
                    where=where,
                    hint=f"unset {ENV_DISABLE_AUTOLOAD} to use third-party plugins",
                )
            raise PluginError(
                f"unknown {kind} '{name}'",
                where=where,
                hint=unknown_name_hint(kind, name, list(table))
                + "; `mutualkd plugins` lists what is installed",
            )
        info = self._load(table[name])
        if info.status == "blocked":
            raise PluginError(
                f"{kind} '{name}' from {info.distribution} is {info.error}",
                where=where,
                hint=f"remove '{name}' from {info.error.removeprefix('blocked by ') if info.error else 'the block list'},"
                " or choose another plugin",
            )
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
