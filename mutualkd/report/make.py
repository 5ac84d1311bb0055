"""``make_report``: read the runs, draw their figures, write ``report.md`` and print its tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from mutualkd.errors import UserError
from mutualkd.report.plots import plot_comparison, plot_run, require_matplotlib
from mutualkd.report.runs import Group, RunData, assign_labels, group_runs, load_run
from mutualkd.report.tables import group_table, markdown_table, rich_table, run_rows, swept_rows

__all__ = ["Report", "make_report"]


@dataclass
class Report:
    """What :func:`make_report` read and wrote."""

    out: Path
    runs: list[RunData]
    groups: list[Group]
    files: list[Path]
    markdown: str


def _load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Every run folder once, in the order given (a folder named twice is read once)."""
    runs: list[RunData] = []
    seen: set[Path] = set()
    for p in paths:
        run = load_run(p)
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)
    return runs


def _make_out_dir(out_dir: Path, runs: Sequence[RunData]) -> None:
    """Create the report folder, refusing one that would overwrite a run or a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("the report's output path exists and is not a folder", where=str(out_dir),
                        hint="choose another --out")
    if any(out_dir.resolve() == r.path.resolve() for r in runs):
        raise UserError("--out is one of the run folders", where=str(out_dir), hint="choose another --out, e.g. --out report")
    require_matplotlib()  # fail early, before writing anything, when matplotlib is missing
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder: {e.strerror}", where=str(out_dir), hint="choose another --out") from None


def make_report(paths: Sequence[str | Path], out: str | Path = "report", console: Console | None = None) -> Report:
    """Read the runs, write the plots and ``report.md`` under ``out``, print the tables."""
    if not paths:
        raise UserError("no run folder given", hint="mutualkd report RUN_DIR [RUN_DIR ...] [--out DIR]")
    runs = _load_runs(paths)
    out_dir = Path(out)
    _make_out_dir(out_dir, runs)
    assign_labels(runs)
    groups = group_runs(runs)

    files: list[Path] = []
    for r in runs:
        files += plot_run(r, out_dir / r.label)
    comp = plot_comparison(groups, out_dir / "top1_comparison.png")
    if comp is not None:
        files.append(comp)

    g_head, g_rows = group_table(groups)
    s_head, s_rows = swept_rows(groups)
    r_head, r_rows = run_rows(groups)
    md = _markdown(runs, groups, (g_head, g_rows), (s_head, s_rows), (r_head, r_rows), comp is not None)
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    files.append(out_dir / "report.md")

    if console is not None:
        width = console.width
        console.print(rich_table("test top-1 (%) per group of runs (mean ± std over seeds)", g_head, g_rows, width))
        if s_rows:
            console.print(rich_table("test top-1 (%) per swept value", s_head, s_rows, width))
        console.print(rich_table("test top-1 (%) per run", r_head, r_rows, width))
        for r in runs:
            if r.bad_lines:
                console.print(f"note: {r.path / 'metrics.jsonl'}: {r.bad_lines} unreadable line(s) skipped", markup=False)
        console.print(f"report written to {out_dir / 'report.md'} ({len(files) - 1} figures)", markup=False)
    return Report(out_dir, runs, groups, files, md)


Table = tuple[list[str], list[list[str]]]


def _markdown(runs: Sequence[RunData], groups: Sequence[Group], group_tab: Table, swept_tab: Table, run_tab: Table,
              comparison: bool) -> str:
    (g_head, g_rows), (s_head, s_rows), (r_head, r_rows) = group_tab, swept_tab, run_tab
    parts = ["# mutualkd report", ""]
    parts.append(
        f"{len(runs)} run(s) in {len(groups)} group(s). A group holds the runs whose recipes differ only in"
        " `run.seed` (and `run.name` and the logging fields). Test top-1 in %; \"final\" is the last evaluated"
        " epoch, \"best\" the highest over all evaluated epochs (chosen on the test set, so optimistic)."
        " Mean ± sample standard deviation over the runs of a group; \"peers' mean\" averages a run's peers"
        " first (one value per run), \"every network\" pools every peer of every run (n networks). Runs of a group"
        " with the same seed repeat one experiment: they are averaged into one value before the spread is taken."
    )
    parts += ["", "## Per group", "", markdown_table(g_head, g_rows), ""]
    parts += ["## Per run", "", markdown_table(r_head, r_rows), ""]
    if s_rows:
        parts += [
            "## Per swept value", "",
            "Each recipe key whose value differs between the groups (a sweep's grid), and for each of its values"
            " the runs that have it, whatever the other keys: mean ± std of the peers' mean top-1 over those runs"
            " (runs of one seed at one grid point averaged first).", "",
            markdown_table(s_head, s_rows), "",
        ]
    parts += ["## Plots", ""]
    if comparison:
        parts += ["![top-1 per group](top1_comparison.png)", ""]
    for r in runs:
        parts.append(
            f"- `{r.name}` ({r.path}): [test top-1]({r.label}/top1.png), [loss terms per epoch]({r.label}/losses.png),"
            f" [loss terms per step]({r.label}/losses_steps.png)"
        )
    parts.append("")
    return "\n".join(parts)
