"""Run folders as the report reads them, and the groups of runs that differ only in their seed.

A run folder is one written by ``mutualkd run``: ``metrics.jsonl`` (``kind: "step"`` and
``kind: "epoch"`` records), ``recipe.toml`` and, once the run finished, ``summary.json``.
A run still in progress, or killed, is read as far as it got; a line it left half
written is counted, not fatal.

Runs whose ``recipe.toml`` agree once ``run.seed``, ``run.name`` and the logging-only
fields (:data:`mutualkd.config.LOGGING_ONLY_FIELDS`) are left out form a :class:`Group`,
summarised as mean and sample standard deviation over its runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import copy
from dataclasses import dataclass, field
import json
import math
from pathlib import Path
import re
import statistics
from typing import Any

from mutualkd.config import LOGGING_ONLY_FIELDS, peer_names_of
from mutualkd.errors import UserError

__all__ = ["ENSEMBLE", "IGNORED_RUN_FIELDS", "RunData", "Group", "Stat", "load_run", "group_key", "group_runs", "assign_labels",
           "group_values", "varying_keys", "describe"]

#: ``[run]`` fields left out when grouping: the seed and the name are what tells the runs of
#: a group apart, the logging-only fields do not change what a run computes.
IGNORED_RUN_FIELDS = ("seed", "name", *LOGGING_ONLY_FIELDS)
#: The key of the ensemble's top-1 next to the peers' in an epoch record.
ENSEMBLE = "ensemble"


def num(v: Any) -> float:
    """A logged value as a float; NaN for anything that is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- one run


@dataclass
class RunData:
    """What the report reads from one run folder."""

    path: Path
    name: str
    recipe: dict[str, Any] | None
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    summary: dict[str, Any] | None
    bad_lines: int = 0
    label: str = ""  # unique folder name under the report's out dir

    @property
    def complete(self) -> bool:
        return self.summary is not None

    @property
    def seed(self) -> int | None:
        if self.recipe is None:
            return None
        return self.recipe.get("run", {}).get("seed")

    @property
    def strategy(self) -> str:
        if self.recipe is not None:
            return str(self.recipe.get("strategy", {}).get("name", "?"))
        return str((self.summary or {}).get("strategy", "?"))

    @property
    def peers(self) -> list[str]:
        """Peer names in recipe order (as the engine names them)."""
        if self.recipe is not None:
            return list(self._peer_models())
        if self.summary is not None:
            return list(self.summary.get("peers", {}))
        names: list[str] = []
        for r in self.evaluated:
            names += [k for k in r["top1"] if k != ENSEMBLE and k not in names]
        return names

    @property
    def models(self) -> dict[str, str]:
        """Peer name -> model name."""
        if self.recipe is not None:
            return self._peer_models()
        return dict((self.summary or {}).get("peers", {}))

    def _peer_models(self) -> dict[str, str]:
        """Peer name -> model name from the recipe; a branched network is a peer per branch."""
        tables = [p for p in self.recipe.get("peers", []) if isinstance(p, Mapping)] if self.recipe else []
        out: dict[str, str] = {}
        for base, p in zip(peer_names_of(p.get("name") for p in tables), tables):
            k = p.get("branches")
            for name in [f"{base}_b{i}" for i in range(k)] if isinstance(k, int) and k > 0 else [base]:
                out[name] = str(p.get("model", "?"))
        return out

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """Epoch records that carry a test evaluation."""
        return [r for r in self.epochs if isinstance(r.get("top1"), Mapping) and r["top1"]]

    def top1(self) -> dict[str, dict[str, float]]:
        """Per model (peers, then the ensemble): final and best test top-1 (%)."""
        out: dict[str, dict[str, float]] = {}
        ev = self.evaluated
        if ev:
            names = [n for n in self.peers if any(n in r["top1"] for r in ev)]
            names += [k for r in ev for k in r["top1"] if k not in names and k != ENSEMBLE]
            if any(ENSEMBLE in r["top1"] for r in ev):
                names.append(ENSEMBLE)
            for n in dict.fromkeys(names):
                values = [num(r["top1"][n]) for r in ev if n in r["top1"]]
                finite = [v for v in values if math.isfinite(v)]
                if finite:
                    out[n] = {"final": values[-1], "best": max(finite)}
        elif self.summary is not None:
            for n, row in self.summary.get("top1", {}).items():
                out[n] = {"final": num(row.get("final")), "best": num(row.get("best"))}
        return out

    def best_epoch(self) -> int | None:
        """The epoch ``best/`` holds (summary.json's, chosen on the validation split when there is
        one), else the evaluated epoch with the best peers' mean; global, as metrics.jsonl numbers it."""
        chosen = (self.summary or {}).get("best_epoch")
        if isinstance(chosen, int) and not isinstance(chosen, bool):
            return chosen
        peers, best, epoch = set(self.peers), -math.inf, None
        for r in self.evaluated:
            vals = [num(v) for k, v in r["top1"].items() if k in peers]
            score = sum(vals) / len(vals) if vals else -math.inf
            if score > best and isinstance(r.get("epoch"), int):
                best, epoch = score, r["epoch"]
        return epoch

    def top1_at(self, epoch: int) -> dict[str, float]:
        """Each model's test top-1 at global ``epoch``, from metrics.jsonl."""
        for r in self.evaluated:
            if r.get("epoch") == epoch:
                return {k: num(v) for k, v in r["top1"].items()}
        return {}

    def peer_mean(self, which: str) -> float | None:
        """Mean over the peers (not the ensemble, nor other evaluated models such as EMA copies)
        of their final or best top-1."""
        t = self.top1()
        peers = set(self.peers)
        vals = [row[which] for n, row in t.items() if n in peers]
        return sum(vals) / len(vals) if vals else None


def _not_a_run(path: Path) -> UserError:
    inner = sorted(p.parent.name for p in path.glob("*/metrics.jsonl"))
    if inner:
        shown = ", ".join(inner[:5]) + (", ..." if len(inner) > 5 else "")
        hint = f"this folder holds {len(inner)} run(s) ({shown}); pass them, e.g. `mutualkd report {path}/*/`"
    else:
        hint = "name a folder written by `mutualkd run` (runs/<run.name>/ holds metrics.jsonl, recipe.toml, summary.json)"
    return UserError("not a run folder: it has no metrics.jsonl", where=str(path), hint=hint)


def _read_metrics(metrics: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(epoch records, step records, unreadable lines) of a ``metrics.jsonl``."""
    epochs: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    bad = 0
    try:
        text = metrics.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read metrics.jsonl: {e.strerror}", where=str(metrics)) from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a run killed while writing it
            continue
        except ValueError as e:  # valid JSON that Python will not read: an integer of over 4300 digits
            raise _bad_record(metrics, n, f"holds a value that cannot be read ({str(e).split(';')[0]})") from None
        if not isinstance(rec, dict):
            bad += 1
            continue
        problem = _record_problem(rec)
        if problem:
            raise _bad_record(metrics, n, problem)
        if rec.get("kind") == "epoch":
            epochs.append(rec)
        elif rec.get("kind") == "step":
            steps.append(rec)
    return epochs, steps, bad


#: The fields of a record the report reads, and what each must be: a number, or a table of
#: numbers (``"nan"`` / ``"inf"`` are how metrics.jsonl writes non-finite ones), one or two deep.
_RECORD_FIELDS = {"epoch": 0, "global_step": 0, "top1": 1, "top5": 1, "loss": 1, "lr": 1, "steps": 2}


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or v is None or v in ("nan", "inf", "-inf")


def _record_problem(rec: dict[str, Any]) -> str | None:
    """What is wrong with a record's fields the report reads (None: nothing)."""
    if not isinstance(rec.get("stage", ""), str) or not isinstance(rec.get("kind", ""), str):
        return "'stage' and 'kind' must be strings"
    for key, depth in _RECORD_FIELDS.items():
        if key not in rec:
            continue
        todo: list[tuple[str, Any, int]] = [(key, rec[key], depth)]
        while todo:
            where, v, d = todo.pop()
            if d == 0 and not _is_number(v):
                return f"{where!r} is {type(v).__name__} {str(v)[:40]!r}, expected a number"
            if d > 0:
                if not isinstance(v, dict):
                    return f"{where!r} is {type(v).__name__}, expected a table of {'numbers' if d == 1 else 'tables'}"
                todo += [(f"{where}.{k}", x, d - 1) for k, x in v.items()]
    return None


def _bad_record(metrics: Path, line: int, problem: str) -> UserError:
    return UserError(f"line {line}: {problem}", where=str(metrics),
                     hint="the file was changed after the run wrote it; restore it (`mutualkd run --resume RUN_DIR`"
                     " rewrites it from the newest checkpoint's copy) or leave this run out of the report")


def load_run(path: str | Path) -> RunData:
    """Read a run folder; a UserError when it is not one."""
    from mutualkd.config import read_toml

    p = Path(path)
    if not p.exists():
        raise UserError("no such folder", where=str(p), hint="name a run folder written by `mutualkd run`")
    if not p.is_dir():
        hint = "name the run folder, not a file in it" if p.name in ("metrics.jsonl", "summary.json", "recipe.toml") else None
        raise UserError("not a folder", where=str(p), hint=hint or "name a run folder written by `mutualkd run`")
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise _not_a_run(p)
    epochs, steps, bad = _read_metrics(metrics)
    recipe = read_toml(p / "recipe.toml") if (p / "recipe.toml").is_file() else None
    summary = None
    if (p / "summary.json").is_file():
        try:
            summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: bad JSON, or an integer of over 4300 digits
            summary = None
    name = str((recipe or {}).get("run", {}).get("name") or p.name)
    return RunData(path=p, name=name, recipe=recipe, epochs=epochs, steps=steps, summary=summary, bad_lines=bad)


def assign_labels(runs: Sequence[RunData]) -> None:
    """A unique, file-system safe folder name per run for its plots."""
    used: set[str] = set()
    for r in runs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", r.path.name).strip(".") or "run"  # never "." or ".."
        label = base
        if label in used:
            label = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{r.path.parent.name}-{base}")
        i = 2
        while label in used:
            label = f"{base}-{i}"
            i += 1
        used.add(label)
        r.label = label


# --------------------------------------------------------------------------- groups of runs

#: A statistic over the runs of a group: (mean, sample standard deviation or None for one
#: value, number of values).
Stat = tuple[float, float | None, int]


@dataclass
class Group:
    """Runs whose recipes differ only in the seed (and the name and logging fields)."""

    key: str
    runs: list[RunData] = field(default_factory=list)
    label: str = ""

    @property
    def strategy(self) -> str:
        return self.runs[0].strategy

    @property
    def models(self) -> str:
        m = self.runs[0].models
        if not m:
            return "?"
        if len(m) > 1 and len(set(m.values())) == 1:
            return f"{len(m)} x {next(iter(m.values()))}"
        return ", ".join(f"{n}: {v}" for n, v in m.items())

    @property
    def seeds(self) -> list[Any]:
        """The group's distinct seeds, in order; one seed run twice counts once."""
        return list(dict.fromkeys(r.seed if r.seed is not None else "?" for r in self.runs))

    def runs_of_seed(self) -> dict[Any, list[RunData]]:
        out: dict[Any, list[RunData]] = {}
        for r in self.runs:
            out.setdefault(r.seed if r.seed is not None else "?", []).append(r)
        return out

    def stat(self, values: Sequence[float | None]) -> Stat | None:
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if not vals:
            return None
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) >= 2 else None
        return mean, std, len(vals)

    def _per_seed(self, value: Callable[[RunData], float | None]) -> list[float | None]:
        # Runs of one recipe with the same seed repeat one experiment: they are averaged
        # into one value, so that the spread is over seeds, never over repeats.
        out: list[float | None] = []
        for runs in self.runs_of_seed().values():
            vals = [v for v in (value(r) for r in runs) if v is not None and math.isfinite(v)]
            out.append(statistics.fmean(vals) if vals else None)
        return out

    def peer_mean(self, which: str) -> Stat | None:
        return self.stat(self._per_seed(lambda r: r.peer_mean(which)))

    def every_network(self, which: str) -> Stat | None:
        vals: list[float | None] = []
        for runs in self.runs_of_seed().values():
            for n in runs[0].peers:
                vals.append(self._mean([r.top1()[n][which] for r in runs if n in r.top1()]))
        return self.stat(vals)

    def ensemble(self, which: str) -> Stat | None:
        return self.stat(self._per_seed(lambda r: r.top1()[ENSEMBLE][which] if ENSEMBLE in r.top1() else None))

    @staticmethod
    def _mean(vals: Sequence[float]) -> float | None:
        finite = [v for v in vals if math.isfinite(v)]
        return statistics.fmean(finite) if finite else None


def group_key(run: RunData) -> str:
    """The run's recipe without :data:`IGNORED_RUN_FIELDS`: equal for the runs of one group."""
    if run.recipe is None:
        return f"<no recipe.toml: {run.path}>"
    rec = copy.deepcopy(run.recipe)
    for k in IGNORED_RUN_FIELDS:
        rec.get("run", {}).pop(k, None)
    return json.dumps(rec, sort_keys=True, default=str)


def _without_seed(name: str, seed: Any) -> str:
    """``name`` without a suffix that names its seed (``-s0``, ``_seed1``, ``.2``); other trailing
    digits (``kl-resnet18``) are part of the name."""
    if not isinstance(seed, int):
        return name
    m = re.search(rf"[-_.](?:seed|s)?[-_]?0*{abs(seed)}$", name, re.IGNORECASE)
    if m is None or (seed < 0 and not name[: m.start()].endswith("-")):
        return name
    return name[: m.start()] or name


def _group_label(names: Sequence[str], seeds: Sequence[Any] | None = None) -> str:
    seeds = list(seeds) if seeds is not None else [None] * len(names)
    stripped = {_without_seed(n, s) for n, s in zip(names, seeds)}
    if len(stripped) == 1:
        return stripped.pop()
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    # cut at a separator, never inside a word or a number ("x18", "x19" share "x1", not a name)
    if any(len(n) > len(prefix) and n[len(prefix)] not in "-_. " for n in names):
        prefix = prefix[: max(prefix.rfind(c) for c in "-_. ") + 1]
    prefix = prefix.rstrip("-_. ")
    return prefix or f"{names[0]} (+{len(names) - 1})"


def group_runs(runs: Iterable[RunData]) -> list[Group]:
    """Group runs by recipe (seed, name and logging fields left out), in order of first appearance."""
    groups: dict[str, Group] = {}
    for r in runs:
        groups.setdefault(group_key(r), Group(group_key(r))).runs.append(r)
    out = list(groups.values())
    seen: dict[str, int] = {}
    for g in out:
        label = _group_label([r.name for r in g.runs], [r.seed for r in g.runs])
        seen[label] = seen.get(label, 0) + 1
        g.label = label if seen[label] == 1 else f"{label} #{seen[label]}"
    return out


# --------------------------------------------------------------------------- what tells groups apart


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and all(isinstance(x, Mapping) for x in d):
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}.{i}"))
    else:
        out[prefix] = d
    return out


def group_values(group: Group) -> dict[str, Any]:
    """The group's recipe (without the seed, the name and the logging fields) as ``key.path: value``."""
    if group.runs[0].recipe is None:
        return {}
    return _flat(json.loads(group.key))


def varying_keys(groups: Sequence[Group]) -> list[str]:
    """Recipe keys whose value differs between the groups (the swept ones in a sweep), in recipe order."""
    flats = [group_values(g) for g in groups if g.runs[0].recipe is not None]
    if len(flats) < 2:
        return []
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if len({json.dumps(f.get(k, "<unset>"), sort_keys=True, default=str) for f in flats}) > 1]


def value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if v is None:
        return "unset"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def describe(group: Group, keys: Sequence[str]) -> str:
    """``key=value, ...`` of ``keys`` for this group (``unset`` where its recipe has no such key)."""
    f = group_values(group)
    return ", ".join(f"{k}={value_text(f.get(k))}" for k in keys)

