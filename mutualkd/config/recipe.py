"""The whole recipe: ``[strategy]``, ``[schedule]``, the :class:`Recipe` model, and loading one.

A recipe has the sections ``[run]``, ``[data]``, ``[[peers]]``, ``[optimizer]`` and
``[scheduler]`` (shared defaults a peer may override), ``[strategy]`` and ``[schedule]``.
Unknown keys are refused everywhere. :func:`parse_recipe` and :func:`load_recipe` are the
one way in: they validate the tables, then resolve what the recipe names against what is
installed (:mod:`mutualkd.config.resolve`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from mutualkd.config._fields import _Strict
from mutualkd.config.data import DataConfig
from mutualkd.config.overrides import apply_overrides
from mutualkd.config.peers import EmaConfig, OptimizerConfig, PeerConfig, SchedulerConfig
from mutualkd.config.reading import check_nesting, read_toml
from mutualkd.config.resolve import resolve_recipe
from mutualkd.config.run import RunConfig
from mutualkd.errors import RecipeError, unknown_name_hint
from mutualkd.names import look_alikes
from mutualkd.recipe_errors import format_validation_error

__all__ = ["StrategyConfig", "ScheduleConfig", "Recipe", "peer_names_of", "parse_recipe", "load_recipe"]


class StrategyConfig(BaseModel):
    """``[strategy]``: the strategy's name; every other key belongs to the strategy.

    The other keys are checked against the strategy's own ``Params`` model when the recipe
    is loaded (:func:`mutualkd.config.resolve.resolve_params`), which keeps the result in
    :attr:`resolved`; the engine, ``validate --explain`` and ``analyze`` read it from there.
    """

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        "kl_dml", description="the strategy plugin (`mutualkd plugins` lists them); its parameters sit next to name"
    )
    # (strategy class, the raw parameters it validated, its Params) once resolved; None for a recipe
    # not loaded through parse_recipe. Not a field: it is no part of the recipe's value.
    _resolved: tuple[Any, dict[str, Any], BaseModel] | None = PrivateAttr(default=None)

    @property
    def params(self) -> dict[str, Any]:
        """The raw parameters, as the recipe gives them (see :attr:`resolved` for the validated ones)."""
        return dict(self.model_extra or {})

    @property
    def resolved(self) -> tuple[Any, BaseModel] | None:
        """``(strategy class, validated Params)`` as the recipe's load resolved them, else None.

        None as well when the raw parameters changed since (an assignment after loading).
        """
        if self._resolved is None or self._resolved[1] != self.params:
            return None
        return self._resolved[0], self._resolved[2]

    def remember(self, cls: Any, params: BaseModel) -> None:
        """Keep ``params``, validated by ``cls.Params`` from the current raw parameters (see :attr:`resolved`)."""
        self._resolved = (cls, self.params, params)

    def __eq__(self, other: object) -> bool:
        # Two tables are equal when they say the same; whether one was resolved already does not count.
        if not isinstance(other, StrategyConfig):
            return NotImplemented
        return self.name == other.name and self.params == other.params


class ScheduleConfig(_Strict):
    """``[schedule]``: faithful sequential updates or one shared forward for all peers."""

    mode: Literal["alternating", "simultaneous"] = Field(
        "alternating",
        description="alternating: the peers are updated one after another, each seeing the others' latest state;"
        " simultaneous: every peer from one shared forward pass",
    )


class Recipe(_Strict):
    """A whole recipe."""

    run: RunConfig = Field(
        default_factory=RunConfig, description="what the run is called, where it writes, how it runs and logs"
    )
    data: DataConfig = Field(default_factory=DataConfig, description="the data set and its batches")
    peers: list[PeerConfig] = Field(min_length=1, description="the networks, one [[peers]] table each (at least one)")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="the optimizer of every peer without its own [peers.optimizer]"
    )
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig,
        description="the learning-rate schedule of every peer without its own [peers.scheduler]",
    )
    strategy: StrategyConfig = Field(
        default_factory=StrategyConfig, description="the method: a strategy plugin's name and its parameters"
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="the order of the peers' updates in a batch"
    )
    ema: EmaConfig | None = Field(
        None, description="an EMA copy of every peer without its own [peers.ema]; unset: no EMA copies"
    )

    def peer_optimizer(self, i: int) -> OptimizerConfig:
        return self.peers[i].optimizer or self.optimizer

    def peer_scheduler(self, i: int) -> SchedulerConfig:
        return self.peers[i].scheduler or self.scheduler

    def network_names(self) -> list[str]:
        """One name per ``[[peers]]`` table: its ``name``, else ``peer<i>`` (a unit and a checkpoint module each)."""
        return peer_names_of(p.name for p in self.peers)

    def peer_names(self) -> list[str]:
        """Every peer, in table order: a whole network is one peer, a branched one a peer per branch."""
        return [n for base, pc in zip(self.network_names(), self.peers) for n in pc.branch_names(base)]

    def peer_tables(self) -> list[tuple[str, int, int | None]]:
        """``(peer name, table index, branch index or None)`` for each peer, in :meth:`peer_names` order."""
        out: list[tuple[str, int, int | None]] = []
        for i, (base, pc) in enumerate(zip(self.network_names(), self.peers)):
            names = pc.branch_names(base)
            out += [(n, i, None if pc.branches is None else k) for k, n in enumerate(names)]
        return out

    def table_of(self, peer: str) -> int:
        """The index of the ``[[peers]]`` table that makes ``peer``."""
        return next(i for n, i, _ in self.peer_tables() if n == peer)

    def peer_ema(self, i: int) -> EmaConfig | None:
        return self.peers[i].ema or self.ema

    @field_validator("peers")
    @classmethod
    def _unique_peer_names(cls, peers: list[PeerConfig]) -> list[PeerConfig]:
        bases = peer_names_of(p.name for p in peers)
        names = bases + [n for base, pc in zip(bases, peers) if pc.branches for n in pc.branch_names(base)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"peer names must be unique; {', '.join(dupes)} appears more than once")
        similar = look_alikes(names)
        if similar:
            a, b = similar[0]
            raise ValueError(f"peer names must be unique; {a!r} and {b!r} look alike (the same folder on a"
                             " case-insensitive disk, the same to a reader); rename one of them")
        return peers

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(exclude_none=True))


def peer_names_of(own_names: Iterable[str | None]) -> list[str]:
    """The peers' names in ``[[peers]]`` order: a peer's own ``name``, else ``peer<i>``.

    ``own_names`` is each peer's ``name`` field, None (or empty) where it has none; the
    engine, the checkpoints, ``metrics.jsonl`` and the report all name peers this way.
    """
    return [name or f"peer{i}" for i, name in enumerate(own_names)]


# --------------------------------------------------------------------------- loading


def parse_recipe(data: Mapping[str, Any], file: str = "<recipe>",
                 overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Recipe:
    """Validate a recipe given as a dict (the structure of the TOML file), after ``overrides``.

    ``overrides`` are applied as :func:`apply_overrides` does. Errors are
    :class:`~mutualkd.errors.RecipeError` naming ``file`` (``"<dict>"`` for a recipe built
    in Python), the field and, for a misspelt key, the close matches.

    Everything that needs no model is settled here (:func:`~mutualkd.config.resolve.resolve_recipe`):
    the strategy is looked up in the registry and its parameters validated by its ``Params``,
    and keys the chosen data pipeline would not use are refused.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe is a dict of its tables (run, data, peers, ...), not {type(data).__name__}",
                          file=file, hint="pass a dict, a Recipe, or the path of a .toml recipe")
    check_nesting(data, file)
    if overrides:
        data = apply_overrides(dict(data), overrides, file=file)
        check_nesting(data, file, "with the overrides, ")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _with_key_suggestions(format_validation_error(err, file), err, data) from None
    resolve_recipe(recipe, file)
    return recipe


_SECTION_KEYS: dict[str, type[BaseModel]] = {
    "run": RunConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "schedule": ScheduleConfig,
    "ema": EmaConfig,
}


def _with_key_suggestions(rerr: RecipeError, err: ValidationError, data: dict[str, Any]) -> RecipeError:
    """Add "did you mean" hints to unknown-key errors."""
    hints = []
    for e in err.errors():
        if e["type"] != "extra_forbidden":
            continue
        loc = e["loc"]
        key = str(loc[-1])
        if len(loc) == 1:
            known = list(Recipe.model_fields)
        elif loc[0] == "peers":
            known = list(PeerConfig.model_fields)
            if len(loc) >= 4 and loc[2] in ("optimizer", "scheduler", "ema"):
                known = list({"optimizer": OptimizerConfig, "scheduler": SchedulerConfig, "ema": EmaConfig}[str(loc[2])].model_fields)
        elif loc[0] in _SECTION_KEYS:
            known = list(_SECTION_KEYS[str(loc[0])].model_fields)
        else:
            continue
        hints.append(f"'{key}': " + unknown_name_hint("key", key, known, label="known keys", max_shown=100,
                                                         list_matched=False))
    if hints:
        rerr.hint = "; ".join(hints)
    return rerr


def load_recipe(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Recipe:
    """Read, override (as :func:`apply_overrides` does) and validate a recipe file."""
    return parse_recipe(read_toml(path), file=str(path), overrides=overrides)
