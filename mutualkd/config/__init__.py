"""Recipes: TOML files validated by pydantic models, resolved once when they are loaded.

A recipe has the sections ``[run]``, ``[data]``, ``[[peers]]``, ``[optimizer]`` and
``[scheduler]`` (shared defaults a peer may override), ``[strategy]`` and ``[schedule]``.
Unknown keys are refused everywhere. The strategy's own parameters live in
``[strategy]`` next to its ``name`` and are validated, when the recipe is loaded, by the
pydantic model the strategy plugin provides (see :mod:`mutualkd.strategy`).

One module per job:

* :mod:`.run`, :mod:`.data`, :mod:`.peers`, :mod:`.recipe`: the schema, table by table;
* :mod:`.reading`: reading a recipe file, bounded in size and nesting;
* :mod:`.overrides`: ``--set`` and ``overrides=``;
* :mod:`.resolve`: the strategy and the data pipeline the recipe names, settled at load;
* :mod:`mutualkd.recipe_errors`: pydantic's errors as one :class:`~mutualkd.errors.RecipeError`.
"""

from __future__ import annotations

from mutualkd.config._fields import MAX_IMAGE_SIZE, MAX_LR, MAX_NAME_BYTES, MAX_NESTING, MAX_RECIPE_BYTES, MAX_SEED
from mutualkd.config.data import AUGMENT_FIELDS, PIPELINE_CHOICE_FIELDS, STREAM_ONLY_FIELDS, DataConfig
from mutualkd.config.overrides import apply_overrides
from mutualkd.config.peers import EmaConfig, OptimizerConfig, PeerConfig, SchedulerConfig
from mutualkd.config.reading import check_nesting, read_toml
from mutualkd.config.recipe import Recipe, ScheduleConfig, StrategyConfig, load_recipe, parse_recipe, peer_names_of
from mutualkd.config.resolve import check_pipeline_keys, check_strategy_fit, resolve_params, resolve_recipe
from mutualkd.config.run import LOGGING_ONLY_FIELDS, RunConfig, TrackerName
from mutualkd.recipe_errors import format_validation_error

__all__ = [
    "Recipe",
    "RunConfig",
    "LOGGING_ONLY_FIELDS",
    "peer_names_of",
    "DataConfig",
    "STREAM_ONLY_FIELDS",
    "AUGMENT_FIELDS",
    "PIPELINE_CHOICE_FIELDS",
    "PeerConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "EmaConfig",
    "StrategyConfig",
    "ScheduleConfig",
    "TrackerName",
    "load_recipe",
    "parse_recipe",
    "read_toml",
    "check_nesting",
    "apply_overrides",
    "resolve_recipe",
    "resolve_params",
    "check_strategy_fit",
    "check_pipeline_keys",
    "format_validation_error",
    "MAX_IMAGE_SIZE",
    "MAX_LR",
    "MAX_NAME_BYTES",
    "MAX_NESTING",
    "MAX_RECIPE_BYTES",
    "MAX_SEED",
]
