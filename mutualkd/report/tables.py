"""The report's two tables, as rows of strings, rendered as markdown or as rich tables.

- per group of runs that differ only in their seed: final and best test top-1 as mean ±
  sample standard deviation over the runs of the group (:func:`group_rows`);
- per run: final and best test top-1 of every model (:func:`run_rows`).

"Final" is the last evaluated epoch, "best" the highest of any evaluated epoch (an
optimistic number: it selects on the test set).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

from rich import box
from rich.table import Table

from mutualkd.report.runs import ENSEMBLE, Group, RunData, Stat, describe, varying_keys

__all__ = ["DASH", "GROUP_COLUMNS", "SWEPT", "fmt_stat", "group_rows", "group_table", "swept_rows", "run_rows",
           "markdown_table", "rich_table"]

#: The cell of a number that does not exist (no evaluated epoch, no ensemble).
DASH = "—"

GROUP_COLUMNS = (
    "group", "strategy", "models", "seeds", "epochs",
    "final top-1, peers' mean", "best top-1, peers' mean", "final top-1, every network (n)",
    "ensemble final", "ensemble best",
)


def fmt_stat(s: Stat | None) -> str:
    """``mean ± std``, or the mean alone for a single value."""
    if s is None:
        return DASH
    mean, std, _ = s
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _fmt(v: float | None) -> str:
    return DASH if v is None or not math.isfinite(v) else f"{v:.2f}"


#: The last column of the group table when groups differ in recipe values (a sweep's grid).
SWEPT = "swept values"


def _seeds_text(g: Group) -> str:
    parts = []
    for seed, runs in g.runs_of_seed().items():
        parts.append(f"{seed} ({len(runs)} runs, averaged)" if len(runs) > 1 else str(seed))
    return ", ".join(parts)


def group_rows(groups: Sequence[Group]) -> list[list[str]]:
    """One row per group, in the order of :data:`GROUP_COLUMNS`; the statistics are over distinct
    seeds (runs of one seed are averaged first)."""
    rows = []
    for g in groups:
        every = g.every_network("final")
        epochs = sorted({len(r.evaluated) for r in g.runs})
        rows.append([
            g.label,
            g.strategy,
            g.models,
            _seeds_text(g),
            "/".join(str(e) for e in epochs),
            fmt_stat(g.peer_mean("final")),
            fmt_stat(g.peer_mean("best")),
            f"{fmt_stat(every)} ({every[2]})" if every else DASH,
            fmt_stat(g.ensemble("final")),
            fmt_stat(g.ensemble("best")),
        ])
    return rows


def group_table(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the group table: :data:`GROUP_COLUMNS`, and :data:`SWEPT` (``key=value`` of
    every recipe key whose value differs between the groups) when there is such a key."""
    head, rows = list(GROUP_COLUMNS), group_rows(groups)
    keys = varying_keys(groups)
    if keys:
        head.append(SWEPT)
        rows = [row + [describe(g, keys)] for row, g in zip(rows, groups)]
    return head, rows


def swept_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): for each swept key and each of its values, the final top-1 (peers' mean)
    over every run with that value, mean ± std over the distinct (grid point, seed) runs."""
    keys = varying_keys(groups)
    head = ["swept key", "value", "groups", "runs", "final top-1, peers' mean", "best top-1, peers' mean"]
    rows: list[list[str]] = []
    for k in keys:
        by_value: dict[str, list[Group]] = {}
        for g in groups:
            by_value.setdefault(describe(g, [k]).partition("=")[2], []).append(g)
        for value, gs in by_value.items():
            pooled = Group(key=f"{k}={value}", runs=[r for g in gs for r in g.runs])
            # each (group, seed) is one experiment: averaged within, spread across
            finals = [v for g in gs for v in g._per_seed(lambda r: r.peer_mean("final"))]
            bests = [v for g in gs for v in g._per_seed(lambda r: r.peer_mean("best"))]
            rows.append([k, value, ", ".join(g.label for g in gs), str(len(pooled.runs)),
                         fmt_stat(pooled.stat(finals)), fmt_stat(pooled.stat(bests))])
    return head, rows


def _model_columns(runs: Sequence[RunData]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [n for n in r.top1() if n != ENSEMBLE and n not in names]
    if any(ENSEMBLE in r.top1() for r in runs):
        names.append(ENSEMBLE)
    return names


def run_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per run, one column per model any run has."""
    runs = [r for g in groups for r in g.runs]
    models = _model_columns(runs)
    head = ["run", "group", "seed", "epochs", "status", "best/ chosen by", "best epoch", "peers at best epoch"]
    head += [f"{m} final / best" for m in models]
    rows = []
    for g in groups:
        for r in g.runs:
            t = r.top1()
            status = "complete" if r.complete else "incomplete"
            if r.bad_lines:
                status += f", {r.bad_lines} unreadable line(s)"
            best = r.best_epoch()
            at = r.top1_at(best) if best is not None else {}
            at_peers = [v for k, v in at.items() if k in set(r.peers)]
            rows.append(
                [r.name, g.label, str(r.seed if r.seed is not None else "?"), str(len(r.evaluated)), status,
                 _chosen_by(r.summary),
                 str(best) if best is not None else DASH, _fmt(sum(at_peers) / len(at_peers)) if at_peers else DASH]
                + [f"{_fmt(t[m]['final'])} / {_fmt(t[m]['best'])}" if m in t else DASH for m in models]
            )
    return head, rows


def _chosen_by(summary: dict[str, Any] | None) -> str:
    """Which output chose ``best/`` and on which split (summary.json's ``best_output``, ``best_chosen_by``)."""
    if not summary or "best_output" not in summary:
        return DASH
    return f"{summary['best_output']} ({summary.get('best_chosen_by', 'test')})"


def _numeric(header: str) -> bool:
    """Whether a column holds numbers (right-aligned)."""
    return header in ("seeds", "epochs", "seed", "best epoch") or "top-1" in header or "final" in header or "best" in header


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |"]
    lines.append("| " + " | ".join("---:" if _numeric(h) else "---" for h in head) + " |")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


#: Shorter headers for the terminal, where every column costs width.
_SHORT = {
    "final top-1, peers' mean": "final", "best top-1, peers' mean": "best",
    "final top-1, every network (n)": "every net (n)", "ensemble final": "ens. final", "ensemble best": "ens. best",
}


def _width(head: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
    cols = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    return sum(cols) + 3 * len(cols) + 1


def rich_table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None) -> Table:
    """The table for a terminal ``width`` columns wide: as it is when it fits; otherwise one line per
    (row, column) under the row's first cell, so that no number is folded into pieces."""
    head = [_SHORT.get(h, h) for h in head]
    if width is None or _width(head, rows) <= width:
        t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
        for h in head:
            t.add_column(h, justify="right" if _numeric(h) else "left", overflow="fold")
        for row in rows:
            t.add_row(*row)
        return t
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column(head[0], overflow="fold", max_width=max(12, width // 3))
    t.add_column("", style="dim", no_wrap=True)
    t.add_column("value", overflow="fold")
    for row in rows:
        for i, (h, cell) in enumerate(zip(head[1:], row[1:])):
            t.add_row(row[0] if i == 0 else "", h, cell, end_section=i == len(head) - 2)
    return t
