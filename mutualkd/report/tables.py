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

from rich.table import Table

from mutualkd.report.runs import ENSEMBLE, Group, RunData, Stat

__all__ = ["DASH", "GROUP_COLUMNS", "fmt_stat", "group_rows", "run_rows", "markdown_table", "rich_table"]

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


def group_rows(groups: Sequence[Group]) -> list[list[str]]:
    """One row per group, in the order of :data:`GROUP_COLUMNS`."""
    rows = []
    for g in groups:
        every = g.every_network("final")
        epochs = sorted({len(r.evaluated) for r in g.runs})
        rows.append([
            g.label,
            g.strategy,
            g.models,
            ", ".join(str(s) for s in g.seeds),
            "/".join(str(e) for e in epochs),
            fmt_stat(g.peer_mean("final")),
            fmt_stat(g.peer_mean("best")),
            f"{fmt_stat(every)} ({every[2]})" if every else DASH,
            fmt_stat(g.ensemble("final")),
            fmt_stat(g.ensemble("best")),
        ])
    return rows


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
    head = ["run", "group", "seed", "epochs", "status"] + [f"{m} final / best" for m in models]
    rows = []
    for g in groups:
        for r in g.runs:
            t = r.top1()
            status = "complete" if r.complete else "incomplete"
            if r.bad_lines:
                status += f", {r.bad_lines} unreadable line(s)"
            rows.append(
                [r.name, g.label, str(r.seed if r.seed is not None else "?"), str(len(r.evaluated)), status]
                + [f"{_fmt(t[m]['final'])} / {_fmt(t[m]['best'])}" if m in t else DASH for m in models]
            )
    return head, rows


def _numeric(header: str) -> bool:
    """Whether a column holds numbers (right-aligned)."""
    return header in ("seeds", "epochs", "seed") or "top-1" in header or "final" in header or "best" in header


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |"]
    lines.append("| " + " | ".join("---:" if _numeric(h) else "---" for h in head) + " |")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


def rich_table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    t = Table(title=title)
    for h in head:
        t.add_column(h, justify="right" if _numeric(h) else "left", overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t
