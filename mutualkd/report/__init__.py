"""``mutualkd report``: plots of each run and a comparison table across runs.

For every run folder (one that holds ``metrics.jsonl``, written by ``mutualkd run``) it
draws ``<out>/<run>/losses.png``, ``losses_steps.png`` and ``top1.png``; across runs
``<out>/top1_comparison.png`` and ``<out>/report.md`` with a table per group of runs
(runs whose ``recipe.toml`` differ only in ``run.seed``, ``run.name`` and the
logging-only fields :data:`mutualkd.config.LOGGING_ONLY_FIELDS`) and a table per run,
also printed with rich. Runs still in progress are read as far as they got and marked
"incomplete".

- :mod:`mutualkd.report.runs`: reading run folders and grouping runs;
- :mod:`mutualkd.report.tables`: the tables, as markdown and as rich tables;
- :mod:`mutualkd.report.plots`: the matplotlib figures (matplotlib imported only to draw, pyplot
  never: :func:`run_figures` returns a run's figures for a notebook, the backend stays as it was);
- :mod:`mutualkd.report.make`: :func:`make_report`, which does all of it.
"""

from mutualkd.report.make import Report, make_report
from mutualkd.report.plots import comparison_figure, plot_comparison, plot_run, run_figures
from mutualkd.report.runs import Group, RunData, group_runs, load_run

__all__ = ["RunData", "Group", "Report", "load_run", "group_runs", "run_figures", "plot_run", "comparison_figure",
           "plot_comparison", "make_report"]
