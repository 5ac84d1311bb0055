"""The plugin registry: strategies, metrics and data sets found through Python entry points.

Three entry-point groups are read, ``mutualkd.strategies``, ``mutualkd.metrics`` and
``mutualkd.datasets`` (the contract of a data set: :mod:`mutualkd.data.plugin`).
mutualkd's own built-ins are declared in its pyproject.toml through the same groups, so
they load exactly like third-party plugins. The registry is data plus small functions:
one name table per kind (a name and its providers; more than one provider is an error
that names them all) and one set of blocks. Loading is lazy and per plugin: a plugin whose
import or validation fails is recorded with its distribution and reason, and the others
keep working.

Setting ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the plugins of the ``mutualkd``
distribution itself: third-party entry points are listed with status ``disabled`` and never
imported (the variable is read when plugins are first discovered, once per process, or
again after :func:`reset`).

Plugins are blocked by ``name`` or ``kind:name``, and a blocked plugin is not imported:

* process-wide, by :func:`block` (the command-line option ``--block-plugin``) and by the
  environment variable ``MUTUALKD_BLOCK_PLUGINS`` (comma separated);
* for one lookup, by the ``blocked=`` argument of :func:`get` (and :func:`get_strategy` ...)
  (a recipe's ``run.block_plugins``), which changes nothing for the next lookup.

Objects can also be registered in-process with :func:`register` (tests, notebooks, and
the conformance kit :mod:`mutualkd.testing`, to run a class that is not installed); the
same validation and duplicate rules apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
import inspect
import os
from typing import TYPE_CHECKING, Any, Literal

from mutualkd.errors import PluginError, unknown_name_hint

if TYPE_CHECKING:
    from torch import Tensor

    from mutualkd.strategy import Strategy

__all__ = [
    "GROUPS", "ENV_DISABLE_AUTOLOAD", "ENV_BLOCK", "RECIPE_BLOCK", "Kind", "PluginInfo",
    "get_strategy", "get_metric", "get_dataset", "get", "names", "infos", "provider", "autoload",
    "block", "blocks", "is_blocked", "register", "unregister", "reset", "validate_plugin",
]

Kind = Literal["strategy", "metric", "dataset"]
Status = Literal["ok", "error", "blocked", "disabled", "not loaded"]
GROUPS: dict[Kind, str] = {
    "strategy": "mutualkd.strategies", "metric": "mutualkd.metrics", "dataset": "mutualkd.datasets",
}
CORE_DISTRIBUTION = "mutualkd"
ENV_DISABLE_AUTOLOAD = "MUTUALKD_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "MUTUALKD_BLOCK_PLUGINS"
#: The source named when the ``blocked=`` argument of a lookup refuses a plugin.
RECIPE_BLOCK = "run.block_plugins (recipe)"
CLI_BLOCK = "--block-plugin"


@dataclass
class PluginInfo:
    """One plugin: an entry point (loaded or not) or an object registered in-process."""

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


# The name tables, one per kind: name -> its providers. Filled on first use by _discover().
_strategies: dict[str, list[PluginInfo]] = {}
_metrics: dict[str, list[PluginInfo]] = {}
_datasets: dict[str, list[PluginInfo]] = {}
_tables: dict[Kind, dict[str, list[PluginInfo]]] = {"strategy": _strategies, "metric": _metrics, "dataset": _datasets}
_discovered = False
# Third-party entry points switched off by ENV_DISABLE_AUTOLOAD: listed, never imported.
_disabled: list[PluginInfo] = []
# Objects added with register(); kept over reset(), put back into the tables on discovery.
_registered: dict[Kind, dict[str, PluginInfo]] = {"strategy": {}, "metric": {}, "dataset": {}}
# Process-wide blocks: (source, "name" or "kind:name"). ENV_BLOCK is read at each lookup.
_blocked: set[tuple[str, str]] = set()


# ---------------------------------------------------------------------------- discovery


def autoload() -> bool:
    """False when ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD`` is set to 1/true/yes."""
    return os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes")


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("<unknown>", "?")
    return (dist.metadata["Name"] or "<unknown>", dist.version or "?")


def _same_provider(a: PluginInfo, b: PluginInfo) -> bool:
    return a.distribution == b.distribution and a.value == b.value


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    on = autoload()
    for kind, group in GROUPS.items():
        table = _tables[kind]
        for ep in metadata.entry_points(group=group):
            dist, version = _dist_of(ep)
            info = PluginInfo(kind, ep.name, ep.value, dist, version)
            if not on and dist != CORE_DISTRIBUTION:
                # Listed, so that `mutualkd plugins` shows what is switched off, but never
                # imported and never in the way of a built-in of the same name.
                info.status, info.error = "disabled", f"third-party autoload disabled by {ENV_DISABLE_AUTOLOAD}"
                if not any(_same_provider(p, info) for p in _disabled):
                    _disabled.append(info)
                continue
            providers = table.setdefault(ep.name, [])
            # The same distribution can be visible twice (an editable install next to a
            # stale egg-info); that is one provider, not a duplicate.
            if not any(_same_provider(p, info) for p in providers):
                providers.append(info)
        for name, info in _registered[kind].items():
            info.status, info.error = "ok", None  # validated by register()
            table.setdefault(name, []).append(info)
        for providers in table.values():
            if len(providers) > 1:
                for info in providers:
                    info.status = "error"
                    info.error = "duplicate name, also provided by " + ", ".join(
                        f"{o.distribution} ({o.value})" for o in providers if o is not info
                    )
    _discovered = True


def _table(kind: Kind) -> dict[str, list[PluginInfo]]:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}", hint=f"use one of {', '.join(GROUPS)}")
    _discover()
    return _tables[kind]


def reset() -> None:
    """Forget everything discovered (tests, and after installing a plugin in-process).

    Objects added with :func:`register` and blocks set with :func:`block` are kept.
    """
    global _discovered
    _strategies.clear()
    _metrics.clear()
    _datasets.clear()
    _disabled.clear()
    _discovered = False


# ---------------------------------------------------------------------------- in-process registration


def register(kind: Kind, name: str, obj: Any, *, distribution: str = "<in-process>", version: str = "") -> PluginInfo:
    """Register ``obj`` under ``name`` without an entry point (tests, notebooks, the kit).

    ``obj`` is validated like a loaded plugin. A name that is already taken is an error
    naming its provider; nothing is ever overwritten. Undo with :func:`unregister` (or use
    :func:`mutualkd.testing.registered`, which does both).
    """
    table = _table(kind)
    value = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    problem = validate_plugin(kind, obj)
    if problem:
        raise PluginError(f"cannot register {kind} '{name}' ({value}): {problem}")
    if name in table:
        other = table[name][0]
        raise PluginError(
            f"cannot register {kind} '{name}' ({value}): the name is already provided by"
            f" {other.distribution} {other.version} ({other.value})".rstrip(),
            hint="choose another name, or unregister the other one first",
        )
    info = PluginInfo(kind, name, value, distribution, version, status="ok", obj=obj)
    _registered[kind][name] = info
    table[name] = [info]
    return info


def unregister(kind: Kind, name: str) -> None:
    """Remove an object added with :func:`register` (entry points cannot be removed)."""
    info = _registered[kind].pop(name, None) if kind in _registered else None
    if info is None:
        raise PluginError(f"{kind} '{name}' was not registered in-process, so it cannot be unregistered")
    providers = _tables[kind].get(name, [])
    if any(p is info for p in providers):
        if len(providers) > 1:
            reset()  # it was a duplicate: the remaining providers are discovered afresh
        else:
            del _tables[kind][name]


# ---------------------------------------------------------------------------- blocking


def _names(raw: Iterable[str] | None) -> set[str]:
    return {n.strip() for n in raw or () if n and n.strip()}


def block(names: Iterable[str], *, source: str = CLI_BLOCK) -> None:
    """Block plugins process-wide by ``name`` or ``kind:name``.

    Only the command line (``--block-plugin``, the default ``source``) and the environment
    block process-wide; a run blocks for its own lookups with the ``blocked=`` argument of
    :func:`get_strategy` / :func:`get_metric`. ``source`` is named in error messages. Each
    call *replaces* what that source blocked before; ``block([], source=...)`` lifts it.
    """
    global _blocked
    _blocked = {b for b in _blocked if b[0] != source} | {(source, n) for n in _names(names)}


def blocks() -> dict[str, set[str]]:
    """Every process-wide block: source -> names (``MUTUALKD_BLOCK_PLUGINS`` included)."""
    out: dict[str, set[str]] = {}
    for source, name in sorted(_blocked):
        out.setdefault(source, set()).add(name)
    env = _names(os.environ.get(ENV_BLOCK, "").split(","))
    if env:
        out[ENV_BLOCK] = env
    return out


def _block_source(kind: Kind, name: str, blocked: Iterable[str] | None = ()) -> str | None:
    """Who blocks this plugin (a process-wide source, or the lookup's ``blocked``), or None."""
    sources = blocks()
    if blocked:
        sources[RECIPE_BLOCK] = sources.get(RECIPE_BLOCK, set()) | _names(blocked)
    for source, names in sources.items():
        if name in names or f"{kind}:{name}" in names:
            return source
    return None


def is_blocked(kind: Kind, name: str, *, blocked: Iterable[str] | None = ()) -> bool:
    """Whether ``kind`` plugin ``name`` is blocked process-wide or by ``blocked``."""
    return _block_source(kind, name, blocked) is not None


# ---------------------------------------------------------------------------- listing


def names(kind: Kind) -> list[str]:
    """Every name of this kind that is discovered or registered (switched-off ones excluded)."""
    return sorted(_table(kind))


def provider(kind: Kind, name: str, *, disabled: bool = False) -> PluginInfo | None:
    """The one provider of ``name`` (the first of a duplicate), not loaded; None if there is none.

    ``disabled``: also look among the third-party plugins switched off by ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD``.
    """
    providers = _table(kind).get(name)
    if providers:
        return providers[0]
    if disabled:
        return next((i for i in _disabled if i.kind == kind and i.name == name), None)
    return None


def infos(load: bool = True) -> list[PluginInfo]:
    """Every plugin of every kind, loaded when ``load`` (so that broken ones show their error).

    Both providers of a duplicate name are listed, each naming the other. Third-party
    plugins switched off by ``MUTUALKD_DISABLE_PLUGIN_AUTOLOAD`` come last, as ``disabled``.
    """
    out: list[PluginInfo] = []
    for kind in GROUPS:
        table = _table(kind)
        for name in sorted(table):
            providers = table[name]
            if load and len(providers) == 1:
                _load(providers[0])
            out.extend(providers)
    out.extend(sorted(_disabled, key=lambda i: (list(GROUPS).index(i.kind), i.name)))
    return out


# ---------------------------------------------------------------------------- validation and loading


def validate_plugin(kind: Kind, obj: Any) -> str | None:
    """Check an object against the contract of its kind; return the problem, or None."""
    if kind == "metric":
        if not callable(obj):
            return f"a metric must be a callable distance(a, b) -> Tensor, got {type(obj).__name__}"
        try:
            params = [
                p
                for p in inspect.signature(obj).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
            ]
        except (TypeError, ValueError):  # no signature to read (some builtins): accept
            return None
        if len(params) != 2:
            return f"a metric takes exactly two required arguments (a, b); {obj!r} takes {len(params)}"
        return None
    if kind == "dataset":
        from mutualkd.data.plugin import is_dataset_plugin  # imports torch: only once a data set is checked

        return is_dataset_plugin(obj)
    if kind != "strategy":
        return f"unknown plugin kind {kind!r}; use one of {', '.join(GROUPS)}"
    from mutualkd.strategy import Strategy  # imports torch: only once a strategy is checked

    if not (inspect.isclass(obj) and issubclass(obj, Strategy)):
        return f"a strategy must be a subclass of mutualkd.Strategy, got {obj!r}"
    missing = [m for m in ("Params", "steps", "compute") if not hasattr(obj, m)]
    if missing:
        return f"strategy class lacks {', '.join(missing)}"
    return None


def _load(info: PluginInfo) -> PluginInfo:
    """Import and validate an entry point once; record a process-wide block as its status."""
    source = _block_source(info.kind, info.name)
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
    problem = validate_plugin(info.kind, obj)
    if problem:
        info.status, info.error = "error", problem
        return info
    info.status, info.obj = "ok", obj
    return info


def get(kind: Kind, name: str, *, where: str | None = None, blocked: Iterable[str] | None = ()) -> Any:
    """The loaded plugin object, or a PluginError that says why not and what exists.

    ``blocked`` holds names (``name`` or ``kind:name``) refused for this lookup only, as a
    recipe's ``run.block_plugins`` does; the error names that source.
    """
    table = _table(kind)
    providers = table.get(name)
    if providers is None:
        off = [i for i in _disabled if i.kind == kind and i.name == name]
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
            hint=unknown_name_hint(kind, name, list(table)) + "; `mutualkd plugins` lists what is installed",
        )
    if len(providers) > 1:
        raise PluginError(
            f"{kind} '{name}' is provided by more than one distribution: "
            + " and ".join(f"{i.distribution} {i.version} ({i.value})" for i in providers),
            where=where,
            hint="uninstall one of them (pip uninstall DISTRIBUTION); a name can only have one provider",
        )
    source = _block_source(kind, name, blocked)
    if source is not None:
        raise PluginError(
            f"{kind} '{name}' from {providers[0].distribution} is blocked by {source}",
            where=where,
            hint=f"remove '{name}' from {source}, or choose another plugin",
        )
    info = _load(providers[0])
    if info.status != "ok":
        raise PluginError(
            f"{kind} '{name}' from {info.distribution} {info.version} ({info.value}) is broken: {info.error}",
            where=where,
            hint=f"fix or reinstall {info.distribution}; `mutualkd plugins` shows every plugin's status",
        )
    return info.obj


def get_strategy(name: str, *, where: str | None = None, blocked: Iterable[str] | None = ()) -> type[Strategy]:
    """The strategy class registered under ``name`` (``blocked``: names refused for this lookup)."""
    return get("strategy", name, where=where, blocked=blocked)  # type: ignore[no-any-return]


def get_metric(
    name: str, *, where: str | None = None, blocked: Iterable[str] | None = ()
) -> Callable[[Tensor, Tensor], Tensor]:
    """The distance function registered under ``name`` (``blocked``: names refused for this lookup)."""
    return get("metric", name, where=where, blocked=blocked)  # type: ignore[no-any-return]


def get_dataset(name: str, *, where: str | None = None, blocked: Iterable[str] | None = ()) -> Any:
    """The data set plugin registered under ``name`` (see :mod:`mutualkd.data.plugin`; the data
    package's :func:`~mutualkd.data.dataset_plugin` adds the recipe-field error for an unknown name)."""
    return get("dataset", name, where=where, blocked=blocked)
