"""``mutualkd.fit``: a run from Python (a notebook, a script) as ``mutualkd run`` does it.

::

    import mutualkd

    summary = mutualkd.fit("recipes/quickstart.toml", overrides={"run.epochs": 2})
    summary = mutualkd.fit({"data": {"dataset": "digits"}, "peers": [{"model": "cifar_resnet20"}] * 2})

What the command line prints goes through the ``mutualkd`` logger (:mod:`mutualkd._logging`);
errors a user can fix are :class:`~mutualkd.errors.RecipeError` and the other
:class:`~mutualkd.errors.UserError` kinds, with the same message as the command line's.
See docs/python.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mutualkd.config import Recipe, load_recipe, parse_recipe
from mutualkd.errors import RecipeError, UserError, in_file

if TYPE_CHECKING:
    from mutualkd.engine.hooks import Callback

__all__ = ["fit", "resolve_recipe"]

#: How a recipe given as a dict is named in error messages (a file's path otherwise).
DICT_FILE = "<dict>"
#: How a :class:`Recipe` object is named in error messages.
RECIPE_FILE = "<Recipe>"

RecipeLike = str | os.PathLike[str] | Mapping[str, Any] | Recipe


def resolve_recipe(recipe: RecipeLike, overrides: Mapping[str, Any] | None = None) -> tuple[Recipe, str]:
    """The validated recipe and the name its errors use: a TOML file's path, ``<dict>`` or ``<Recipe>``.

    ``overrides`` maps dotted keys to values (``{"run.epochs": 2, "peers.0.model": "cifar_resnet32"}``),
    applied exactly as ``mutualkd run --set`` applies its items, but with Python values as they are.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise RecipeError(f"overrides is a dict of dotted keys to values, not {type(overrides).__name__}",
                          hint="write e.g. overrides={'run.epochs': 2, 'data.batch_size': 64}")
    if isinstance(recipe, Recipe):
        return (parse_recipe(recipe.to_dict(), RECIPE_FILE, overrides) if overrides else recipe), RECIPE_FILE
    if isinstance(recipe, Mapping):
        return parse_recipe(recipe, DICT_FILE, overrides), DICT_FILE
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe, overrides), os.fspath(recipe)
    raise RecipeError(f"a recipe is a path, a dict or a Recipe, not {type(recipe).__name__}",
                      hint="pass the path of a .toml recipe, a dict of its tables, or mutualkd.Recipe")


def fit(
    recipe: RecipeLike | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    resume: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train the peers of ``recipe`` to the end; returns the run's summary (what ``summary.json`` holds).

    - ``recipe``: the path of a TOML recipe, a dict of the same structure, or a :class:`Recipe`.
      With ``resume`` it may be left out: the run folder's own ``recipe.toml`` is used.
    - ``overrides``: dotted keys to values, ``{"run.epochs": 2, "peers.0.model": "cifar_resnet32"}``,
      applied as ``--set`` is (a number in a key indexes a list).
    - ``callbacks``: :class:`mutualkd.Callback` objects, called after the engine's own.
    - ``resume``: a run folder (or one of its checkpoint folders) to continue, as ``--resume``.

    SIGINT and SIGTERM (a notebook's interrupt) ask the run to stop after the current batch
    only while ``fit`` runs; it then writes a checkpoint and raises
    :class:`mutualkd.engine.RunInterrupted`. The handlers in place before are restored.
    Errors a user can fix raise :class:`~mutualkd.errors.UserError` subclasses (a recipe's:
    :class:`~mutualkd.errors.RecipeError`) naming the recipe (``<dict>`` for a dict) and field.
    """
    if recipe is None:
        if resume is None:
            raise RecipeError("no recipe given", hint="pass a recipe, or resume=RUN_DIR to continue a run")
        from mutualkd.runlock import run_folder_of

        recipe = run_folder_of(resume) / "recipe.toml"
    rec, file = resolve_recipe(recipe, overrides)
    from mutualkd.engine import Trainer  # torch, timm and accelerate: only once there is a run to train

    try:
        return Trainer(rec, recipe_file=file, resume=Path(resume) if resume is not None else None,
                       callbacks=callbacks).fit()
    except UserError as e:  # an error found while building or training names the recipe too
        in_file(e, file)
        raise
