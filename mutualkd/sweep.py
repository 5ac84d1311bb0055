"""``mutualkd sweep``: a grid of recipe values times seeds, one normal run folder each.

``mutualkd sweep RECIPE --grid strategy.weight=0.5,1 --seeds 0,1`` makes the runs of
every combination of the grid's values and the seeds, named
``<run.name>-<key><value>...-s<seed>`` in ``<run.out_dir>/<run.name>-sweep/`` (or
``--out-dir``). The grid may also sit in the recipe as a ``[sweep]`` table, which the sweep
removes before the runs see the recipe::

    [sweep]
    seeds = [0, 1, 2]
    grid = { "strategy.weight" = [0.5, 1.0] }

The runs are made one after another, each as ``mutualkd run RECIPE --set ...`` in its own
process: a finished run (its folder holds ``summary.json``) is skipped, an interrupted one
(a complete checkpoint) is resumed, so running the same sweep again continues it. With
``--print`` the commands are printed instead, for a cluster's job scheduler. At the end,
``mutualkd report`` over the sweep's runs writes ``<sweep folder>/report``, one group per
grid point, labelled by its values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
import itertools
from pathlib import Path
import re
import shlex
import subprocess
import sys
from typing import Any

from mutualkd.errors import RecipeError
from mutualkd.names import inside

__all__ = ["SweepRun", "Sweep", "parse_grid", "plan_sweep", "run_state", "run_sweep"]


@dataclass
class SweepRun:
    """One run of a sweep: its grid values, seed, name and the ``--set`` overrides that make it."""

    values: dict[str, Any]
    seed: int
    name: str
    folder: Path
    overrides: list[str]

    def command(self, recipe: Path) -> list[str]:
        """``mutualkd run`` of this run; resumable by construction (``run.resume=auto``)."""
        sets = [a for o in self.overrides for a in ("--set", o)]
        return ["mutualkd", "run", str(recipe), *sets]


@dataclass
class Sweep:
    """The planned runs of a sweep and the recipe they run (a copy without ``[sweep]`` when it had one)."""

    recipe: Path
    folder: Path
    runs: list[SweepRun] = field(default_factory=list)


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else str(v)


def parse_grid(items: Sequence[str], *, file: str = "<recipe>") -> dict[str, list[str]]:
    """``key=v1,v2,...`` items as {key: [value text, ...]} (values are read as --set reads them)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise RecipeError(f"--grid {item!r} is not of the form key=value1,value2,...", file=file,
                              hint="write e.g. --grid strategy.weight=0.5,1,2")
        if key in ("run.seed", "run.name", "run.out_dir"):
            raise RecipeError(f"--grid cannot sweep {key}", file=file,
                              hint="seeds are given with --seeds; names and the folder are chosen by the sweep")
        grid[key] = vals
    return grid


def _slug(key: str, value: str) -> str:
    text = f"{key.rsplit('.', 1)[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)


def plan_sweep(recipe: str | Path, grid_items: Sequence[str] = (), seeds: Sequence[int] | None = None,
               overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> Sweep:
    """Every run of the sweep, each recipe validated (a RecipeError before any run starts)."""
    from mutualkd.config import apply_overrides, parse_recipe, read_toml
    from mutualkd.engine.build import check_recipe
    from mutualkd.runlog import dump_toml

    path = Path(recipe)
    raw = read_toml(path)
    table = raw.pop("sweep", None) or {}
    if not isinstance(table, Mapping) or set(table) - {"grid", "seeds"}:
        raise RecipeError("[sweep] holds `grid` (a table of key = [values]) and `seeds` (a list) only", file=str(path),
                          field="sweep", hint='e.g. [sweep] seeds = [0, 1] and grid = { "strategy.weight" = [0.5, 1.0] }')
    if not isinstance(table.get("grid", {}), Mapping):
        raise RecipeError("[sweep] grid must be a table of key = [values]", file=str(path), field="sweep.grid",
                          hint='e.g. grid = { "strategy.weight" = [0.5, 1.0] }')
    grid: dict[str, list[str]] = {}
    for key, vals in dict(table.get("grid", {})).items():
        if not isinstance(vals, list) or not vals:
            raise RecipeError(f"[sweep.grid] {key} must be a non-empty list of values", file=str(path), field=f"sweep.grid.{key}")
        grid[str(key)] = [dump_toml({"v": v}).splitlines()[0].removeprefix("v = ") for v in vals]
    grid.update(parse_grid(grid_items, file=str(path)))
    if seeds:
        seed_list = check_seeds(list(seeds), file=str(path), field="--seeds")
    else:
        seed_list = check_seeds(table.get("seeds", []), file=str(path), field="sweep.seeds")
    base = parse_recipe(apply_overrides(raw, list(overrides), file=str(path)), file=str(path))
    if not grid and not seed_list:
        raise RecipeError("nothing to sweep: no --grid, no --seeds and no [sweep] table", file=str(path),
                          hint="e.g. mutualkd sweep RECIPE --grid strategy.weight=0.5,1 --seeds 0,1")
    seed_list = seed_list or [base.run.seed]
    folder = Path(out_dir) if out_dir is not None else Path(base.run.out_dir) / f"{base.run.name}-sweep"

    run_recipe = path
    if table:
        # The runs read a copy without [sweep], which no run recipe may hold.
        folder.mkdir(parents=True, exist_ok=True)
        run_recipe = folder / "sweep-recipe.toml"
        text = dump_toml(raw)
        if not run_recipe.exists() or run_recipe.read_text(encoding="utf-8") != text:
            run_recipe.write_text(text, encoding="utf-8")

    sweep = Sweep(run_recipe, folder)
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        for seed in seed_list:
            parts = [base.run.name] + [_slug(k, v) for k, v in zip(keys, combo)] + [f"s{seed}"]
            name = "-".join(parts)
            sets = [*overrides, *(f"{k}={v}" for k, v in zip(keys, combo)),
                    f"run.seed={seed}", f"run.name={name}", f"run.out_dir={folder}", "run.resume=auto"]
            rec = parse_recipe(apply_overrides(raw, sets, file=str(path)), file=str(path))
            check_recipe(rec, recipe_file=str(path), data=False)  # every run checked before any starts
            values = {k: _lookup(rec.to_dict(), k) for k in keys}
            inside(folder, folder / name, what="the sweep's run folder", hint="give run.name a plain folder name")
            sweep.runs.append(SweepRun(values, seed, name, folder / name, sets))
    return sweep


def check_seeds(seeds: Any, *, file: str, field: str) -> list[int]:
    """``seeds`` as a list of distinct run seeds (0 .. 2**32 - 1), or a RecipeError naming ``field``."""
    from mutualkd.config import MAX_SEED

    where = {"file": file, "field": field} if field != "--seeds" else {"file": file}
    hint = "write the seeds as a list of distinct integers, e.g. seeds = [0, 1, 2] (or --seeds 0,1,2)"
    if not isinstance(seeds, list):
        raise RecipeError(f"{field} must be a list of integers, not a {type(seeds).__name__}", hint=hint, **where)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            shown = repr(s)[:40] if not isinstance(s, int) or abs(s) < 10**30 else "a number of over 30 digits"
            raise RecipeError(f"{field} holds {shown}, not a seed (an integer from 0 to {MAX_SEED})", hint=hint,
                              **where)
    dupes = sorted({s for s in seeds if seeds.count(s) > 1})
    if dupes:
        raise RecipeError(f"{field} names seed {', '.join(map(str, dupes))} more than once; the runs would be the same"
                          " run folder", hint=hint, **where)
    return list(seeds)


def _lookup(d: Any, key: str) -> Any:
    for part in key.split("."):
        d = d[int(part)] if isinstance(d, list) else d.get(part) if isinstance(d, Mapping) else None
    return d


def run_state(folder: Path) -> str:
    """``"done"`` (summary.json), ``"interrupted"`` (a complete checkpoint), ``"stale"`` (a run folder
    without either) or ``"new"``."""
    from mutualkd import checkpoint as ckpt

    if (folder / "summary.json").is_file():
        return "done"
    if ckpt.latest_checkpoint(folder / "checkpoints") is not None:
        return "interrupted"
    if folder.exists() and any(folder.iterdir()):
        return "stale"
    return "new"


def run_sweep(sweep: Sweep, *, console: Any, python: str = sys.executable) -> dict[str, list[SweepRun]]:
    """Run the sweep's runs one after another; returns them by outcome (done, skipped, resumed, failed)."""
    out: dict[str, list[SweepRun]] = {"skipped": [], "done": [], "resumed": [], "failed": []}
    n = len(sweep.runs)
    for i, r in enumerate(sweep.runs, start=1):
        state = run_state(r.folder)
        values = ", ".join(f"{k}={_value_text(v)}" for k, v in r.values.items())
        head = f"[{i}/{n}] {r.name} ({values + ', ' if values else ''}seed {r.seed})"
        if state == "done":
            console.print(f"{head}: finished earlier, skipped", markup=False)
            out["skipped"].append(r)
            continue
        # A run stopped before its first checkpoint ("stale") is started again: its command has
        # run.resume=auto, which restarts such a folder when it holds this very recipe (and refuses
        # any other folder, which then counts as failed).
        doing = {"interrupted": "resuming", "stale": "starting again (stopped before its first checkpoint)"}
        console.print(f"{head}: {doing.get(state, 'running')}", markup=False)
        cmd = [python, "-m", "mutualkd", *r.command(sweep.recipe)[1:]]
        rc = subprocess.run(cmd, check=False).returncode
        if rc in (130, 143) or rc < 0:
            raise KeyboardInterrupt  # the user stopped the run: stop the sweep too, it resumes next time
        if rc != 0:
            console.print(f"{head}: failed (exit code {rc}); the sweep goes on", markup=False)
            out["failed"].append(r)
        else:
            out["resumed" if state in ("interrupted", "stale") else "done"].append(r)
    return out


def print_commands(sweep: Sweep) -> str:
    """One shell line per run, for a cluster's scheduler."""
    return "\n".join(shlex.join(r.command(sweep.recipe)) for r in sweep.runs)


