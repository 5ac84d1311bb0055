"""Resolving a validated recipe against what it names: the strategy and the data pipeline.

A recipe's tables validate on their own (:mod:`mutualkd.config.recipe`); what they mean
depends on what is installed and chosen. :func:`resolve_recipe` settles that once, when the
recipe is loaded, so that ``mutualkd validate`` and ``mutualkd run`` refuse a bad recipe
(exit 2) before anything is built, written or locked:

* the strategy is looked up in the registry (its entry point, or a block naming it) and its
  parameters are validated by the strategy's own ``Params`` model. The result is kept on
  ``recipe.strategy`` (:attr:`~mutualkd.config.StrategyConfig.resolved`): the engine,
  ``validate --explain`` and ``analyze`` use it, none validates again. Whether the peers and
  the schedule fit the class (:func:`check_strategy_fit`) is checked by the engine's first
  build step and by ``mutualkd run`` before anything is built;
* a ``[data]`` key the chosen pipeline would not use is refused (the stream pipeline's
  transforms and workers when the pipeline resolves to ``device``), naming the key, why and
  the fix, instead of being ignored.

What needs the models (their feature maps, a strategy's ``setup``) is checked later, by the
engine's build steps (:mod:`mutualkd.engine.build`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mutualkd.config.data import AUGMENT_FIELDS, PIPELINE_CHOICE_FIELDS, STREAM_ONLY_FIELDS, DataConfig
from mutualkd.errors import RecipeError, unknown_name_hint
from mutualkd.recipe_errors import format_validation_error

if TYPE_CHECKING:
    from mutualkd.config.recipe import Recipe
    from mutualkd.strategy import Strategy

__all__ = ["resolve_recipe", "resolve_params", "check_strategy_fit", "check_pipeline_keys"]


def resolve_recipe(recipe: Recipe, file: str = "<recipe>") -> None:
    """What ``recipe`` names, settled when it loads: its strategy's parameters, its pipeline's keys.

    A RecipeError (or, for a strategy that is not installed or is blocked, a PluginError)
    otherwise: exit 2 from the command line.
    """
    resolve_params(recipe, file)
    check_pipeline_keys(recipe.data, file)


# --------------------------------------------------------------------------- the strategy


def resolve_params(recipe: Recipe, file: str = "<recipe>") -> tuple[type[Strategy[Any]], Any]:
    """The recipe's strategy class and its validated parameters, or a RecipeError.

    The class is looked up through the registry each time (a block applies; a class
    registered in-process again is seen); the parameters are validated only once per
    recipe and class, and kept on ``recipe.strategy``.
    """
    from mutualkd.registry import get_strategy

    name = recipe.strategy.name
    cls = get_strategy(name, where=f"{file} [strategy.name]", blocked=recipe.run.block_plugins or ())
    resolved = recipe.strategy.resolved
    if resolved is not None and resolved[0] is cls:
        return cls, resolved[1]
    try:
        params = cls.Params.model_validate(recipe.strategy.params)
    except ValidationError as e:
        err = format_validation_error(e, file, prefix="strategy")
        unknown = [str(x["loc"][-1]) for x in e.errors() if x["type"] == "extra_forbidden"]
        if unknown:
            known = list(cls.Params.model_fields)
            err.hint = "; ".join(
                f"'{k}': " + unknown_name_hint("parameter", k, known, label=f"parameters of '{name}'", max_shown=100)
                for k in unknown
            )
        raise err from None
    recipe.strategy.remember(cls, params)
    return cls, params


def check_strategy_fit(recipe: Recipe, file: str, cls: type[Strategy[Any]]) -> None:
    """The recipe's peers and schedule fit the strategy: peer count, mode, frozen peers, branches.

    Recipe-only checks, made by the engine's first build step (:func:`mutualkd.engine.resolve_strategy`)
    and by ``mutualkd run`` before anything is built; a recipe that parses need not fit a strategy yet
    (a sweep or a test may set the peers later).
    """
    _check_peer_count(recipe, file, cls)
    if recipe.schedule.mode not in cls.modes:
        raise RecipeError(
            f"strategy '{recipe.strategy.name}' does not support mode '{recipe.schedule.mode}'",
            file=file, field="schedule.mode", hint=f"use one of: {', '.join(cls.modes)}",
        )
    _check_frozen(recipe, file, cls)
    _check_topology(recipe, file, cls)


def _check_peer_count(recipe: Recipe, file: str, cls: type[Strategy[Any]]) -> None:
    n = len(recipe.peer_names())
    if n >= cls.min_peers and (cls.max_peers is None or n <= cls.max_peers):
        return
    if cls.max_peers is None:
        want = f"at least {cls.min_peers}"
    elif cls.min_peers == cls.max_peers:
        want = f"exactly {cls.min_peers}"
    else:
        want = f"{cls.min_peers} to {cls.max_peers}"
    raise RecipeError(
        f"strategy '{recipe.strategy.name}' needs {want} peer(s), the recipe has {n}",
        file=file, field="peers", hint="add or remove [[peers]] tables",
    )


def _check_topology(recipe: Recipe, file: str, cls: type[Strategy[Any]]) -> None:
    """Branched networks only for strategies that accept them."""
    branched = [i for i, pc in enumerate(recipe.peers) if pc.branches is not None]
    if branched and "branched" not in cls.topologies:
        raise RecipeError(
            f"strategy '{recipe.strategy.name}' trains whole networks and takes no branched peers",
            file=file, field=f"peers[{branched[0]}].branches",
            hint="remove branches and split_after, or use a strategy made for branches (e.g. one, cl_ilr, okddip, pcl)",
        )
    if len(branched) < len(recipe.peers) and "independent" not in cls.topologies:
        i = next(i for i, pc in enumerate(recipe.peers) if pc.branches is None)
        raise RecipeError(
            f"strategy '{recipe.strategy.name}' trains the branches of a network split into a shared trunk and"
            " branches", file=file, field=f"peers[{i}]",
            hint="set branches (e.g. 3) and split_after (e.g. \"layer2\") in the [[peers]] table",
        )


def _check_frozen(recipe: Recipe, file: str, cls: type[Strategy[Any]]) -> None:
    """Frozen peers only for strategies that take them, and at least one peer that trains."""
    frozen = [i for i, pc in enumerate(recipe.peers) if pc.frozen]
    if not frozen:
        return
    names = recipe.network_names()
    i = frozen[0]
    if not cls.accepts_frozen:
        raise RecipeError(
            f"strategy '{recipe.strategy.name}' trains every peer and takes no frozen peer (peer '{names[i]}' has"
            " frozen = true)", file=file, field=f"peers[{i}].frozen",
            hint="remove frozen, or use a strategy made for a frozen teacher: kl_dml (classic KD: the other peers"
            " learn from the frozen one) or ie_kd (strategy.teacher = the same weights source)",
        )
    if len(frozen) == len(recipe.peers):
        raise RecipeError("every peer is frozen: nothing would train", file=file, field=f"peers[{i}].frozen",
                          hint="leave at least one peer unfrozen (the student)")


# --------------------------------------------------------------------------- the data pipeline


def check_pipeline_keys(cfg: DataConfig, file: str = "<recipe>") -> None:
    """A RecipeError for a ``[data]`` key the user set that the chosen pipeline would ignore.

    Only keys the recipe (or an override) sets (``model_fields_set``) to a value other than
    their default count: a recipe written out in full (a run folder's ``recipe.toml``) holds
    every default, and ignoring a default changes nothing. The pipeline is chosen only when
    such a key is set, since ``auto`` may count the images of a folder.
    """
    given = {k for k in cfg.model_fields_set if getattr(cfg, k) != DataConfig.model_fields[k].get_default()}
    if cfg.pipeline != "auto":
        unused = [k for k in PIPELINE_CHOICE_FIELDS if k in given]
        if unused:
            raise RecipeError(
                f"data.{unused[0]} is used only to choose the pipeline when data.pipeline = \"auto\"; this recipe sets"
                f" data.pipeline = \"{cfg.pipeline}\"", file=file, field=f"data.{unused[0]}",
                hint=f"remove data.{unused[0]}, or set data.pipeline = \"auto\"",
            )
    if not cfg.augment:
        unused = [k for k in AUGMENT_FIELDS if k in given]
        if unused:
            keys = ", ".join(f"data.{k}" for k in unused)
            raise RecipeError(
                f"{keys} {'is' if len(unused) == 1 else 'are'} training augmentation, and this recipe sets"
                " data.augment = false", file=file, field=f"data.{unused[0]}",
                hint=f"remove {keys}, or set data.augment = true",
            )
    stream_keys = [k for k in STREAM_ONLY_FIELDS if k in given]
    if not stream_keys:
        return
    from mutualkd.data.pipeline import choose_pipeline

    kind, reason = choose_pipeline(cfg)
    if kind != "device":
        return
    keys = ", ".join(f"data.{k}" for k in stream_keys)
    one = len(stream_keys) == 1
    raise RecipeError(
        f"{keys} {'is' if one else 'are'} used only by the stream pipeline; data.pipeline resolved to 'device'"
        f" because {reason}, so {'it' if one else 'they'} would be ignored",
        file=file, field=f"data.{stream_keys[0]}",
        hint=f"remove {keys}, or set data.pipeline = \"stream\" (timm's transforms in worker processes)",
    )
