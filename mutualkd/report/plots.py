"""The report's figures: loss terms and test top-1 of each run, top-1 across groups of runs.

- ``<run>/scalars.png``: the scalars a strategy logged (``ctx.log``), mean per epoch, when there are any;
- ``<run>/losses.png``: the per-epoch mean of every loss term, one panel per peer (or other
  owner of terms, e.g. the IE-KD teacher's autoencoder), one line per term;
- ``<run>/losses_steps.png``: the same terms at every logged step;
- ``<run>/top1.png``: test top-1 of each peer and of the ensemble per epoch;
- ``top1_comparison.png``: the peers' mean top-1 per epoch, one line per group of runs named by
  its swept recipe values, the band is the spread over seeds; beside it the final values with
  their min..max, on an axis scaled to them.

matplotlib is an optional dependency (``mutualkd[report]``): it is imported by the
functions that draw, never when this module is imported, so that the rest of the command
line works without it. The figures are :class:`matplotlib.figure.Figure` objects on an Agg
canvas, made without pyplot: drawing them changes no backend and registers no figure, so a
notebook's own matplotlib set-up stays as it was (:func:`run_figures` returns them for display).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
import statistics
from typing import Any

from mutualkd.errors import UserError
from mutualkd.report.runs import ENSEMBLE, Group, RunData, describe, load_run, num, varying_keys

__all__ = ["require_matplotlib", "run_figures", "plot_run", "comparison_figure", "plot_comparison"]


def require_matplotlib() -> Any:
    """The matplotlib module; a UserError when it is not installed. Its backend is left as it is."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "mutualkd report needs matplotlib, which is not installed",
            hint="pip install 'mutualkd[report]' (or pip install matplotlib)",
        ) from None
    return matplotlib


def _figure(figsize: tuple[float, float]) -> Any:
    """A figure of its own, drawn and saved by Agg, unknown to pyplot (no backend switch, no figure manager)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- loss terms


def _owners(keys: Iterable[str], order: Sequence[str] = ()) -> dict[str, list[str]]:
    """``peer/term`` keys grouped by their owner (the part before the first '/'): the owners named in
    ``order`` (the peers, in recipe order) first, then the others as they appear."""
    out: dict[str, list[str]] = {o: [] for o in order}
    for k in keys:
        owner, _, term = k.partition("/")
        out.setdefault(owner if term else "loss", []).append(k)
    return {o: ks for o, ks in out.items() if ks}


def _stage_bounds(records: Sequence[Mapping[str, Any]], x: str) -> list[tuple[float, str]]:
    """(x where a stage starts, stage name) for every stage after the first."""
    out = []
    prev = None
    for r in records:
        st = r.get("stage")
        if prev is not None and st != prev:
            out.append((float(r.get(x, 0)), str(st)))
        prev = st
    return out


#: What a loss panel shows: the engine sums a step's terms as they are (no coefficient of its
#: own), so each term was logged with the strategy's weight already applied (e.g. kl_dml's
#: ``weight * KL``).
WEIGHTED = "as logged: each term already weighted by the strategy's coefficients; the loss is their plain sum"


def _loss_figure(flat: Sequence[Mapping[str, float]], xs: Sequence[float],
                 xlabel: str, title: str, bounds: Sequence[tuple[float, str]], thin: bool,
                 order: Sequence[str] = ()) -> Any:
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    owners = _owners(keys, order)
    # one colour per term name (ce, kl, rec, ...) in every panel
    terms = list(dict.fromkeys(k.partition("/")[2] or k for k in keys))
    palette = require_matplotlib().rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    color = {t: palette[i % len(palette)] for i, t in enumerate(terms)}
    n = max(len(owners), 1)
    fig = _figure((7.5, 2.4 * n + 0.9))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)
    for ax, (owner, ks) in zip(axes[:, 0], owners.items()):
        for k in ks:
            pts = [(x, f[k]) for x, f in zip(xs, flat) if k in f]
            if not pts:
                continue
            px, py = zip(*pts)
            term = k.partition("/")[2] or k
            style: dict[str, Any] = dict(lw=0.9 if thin else 1.6, color=color[term])
            if len(pts) <= 12:
                style["marker"] = "o"
                style["ms"] = 3
            ax.plot(px, py, label=term, **style)
        for bx, _name in bounds:
            ax.axvline(bx - (0.5 if not thin else 0), color="grey", ls=":", lw=1)
        ax.axhline(0, color="black", lw=0.5, alpha=0.4)
        ax.set_ylabel(owner)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", ncol=min(len(ks), 4))
    if not thin:
        axes[-1, 0].xaxis.set_major_locator(_integer_locator())
    if not owners:
        axes[0, 0].text(0.5, 0.5, "no loss records", ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _step_terms(run: RunData) -> list[dict[str, float]]:
    """Every logged step's loss terms, merged over the updates of that step."""
    flat = []
    for r in run.steps:
        f: dict[str, float] = {}
        for terms in (r.get("steps") or {}).values():
            if isinstance(terms, Mapping):
                f.update({k: num(v) for k, v in terms.items()})
        flat.append(f)
    return flat


# --------------------------------------------------------------------------- one run


def _top1_figure(run: RunData) -> Any:
    ev = run.evaluated
    fig = _figure((7.5, 4.2))
    ax = fig.subplots()
    for n in run.top1():
        pts = [(float(r["epoch"]), num(r["top1"][n])) for r in ev if n in r["top1"]]
        if not pts:
            continue
        px, py = zip(*pts)
        if n == ENSEMBLE:
            ax.plot(px, py, "k--", marker="s", ms=4, lw=1.6, label=f"{n} (final {py[-1]:.2f})")
        else:
            model = run.models.get(n, "")
            ax.plot(px, py, marker="o", ms=4, lw=1.6, label=f"{n} {model} (final {py[-1]:.2f})")
    if not ev:
        ax.text(0.5, 0.5, "no evaluated epoch yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8, loc="lower right")
        ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{run.name}: test top-1 ({run.strategy})" + ("" if run.complete else " [incomplete]"), fontsize=11)
    fig.tight_layout()
    return fig


def run_figures(run: RunData | str | Path) -> dict[str, Any]:
    """The figures of one run (a :class:`RunData` or its folder), by name: ``losses``,
    ``losses_steps``, ``top1`` and, when the strategy logged scalars, ``scalars``.

    Each is a :class:`matplotlib.figure.Figure`; a notebook shows it as the cell's value
    (or with ``display(fig)``), ``fig.savefig(path)`` writes it.
    """
    require_matplotlib()
    if not isinstance(run, RunData):
        run = load_run(run)
    stages = sorted({str(r.get("stage")) for r in run.epochs}, key=[str(r.get("stage")) for r in run.epochs].index)
    stage_note = f"  (stages: {' -> '.join(stages)})" if len(stages) > 1 else ""

    flat = [{k: num(v) for k, v in (r.get("loss") or {}).items()} for r in run.epochs]
    xs = [float(r.get("epoch", i + 1)) for i, r in enumerate(run.epochs)]
    sxs = [float(r.get("global_step", i + 1)) for i, r in enumerate(run.steps)]
    figures = {
        "losses": _loss_figure(flat, xs, "epoch", f"{run.name}: loss terms, mean per epoch{stage_note}\n{WEIGHTED}",
                               _stage_bounds(run.epochs, "epoch"), thin=False, order=run.peers),
        "losses_steps": _loss_figure(_step_terms(run), sxs, "global step",
                                     f"{run.name}: loss terms at each logged step{stage_note}\n{WEIGHTED}",
                                     _stage_bounds(run.steps, "global_step"), thin=True, order=run.peers),
        "top1": _top1_figure(run),
    }
    if any(r.get("scalars") for r in run.epochs):
        figures["scalars"] = _scalars_figure(run)
    return figures


def plot_run(run: RunData, out_dir: Path) -> list[Path]:
    """Write the figures of one run (:func:`run_figures`) as ``<name>.png``; returns the files written."""
    figures = run_figures(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out_dir / f"{name}.png") for name, fig in figures.items()]


def _scalars_figure(run: RunData) -> Any:
    """What the strategy logged with ``ctx.log``, its mean per epoch (e.g. SwitOKD's share of expert batches)."""
    fig = _figure((7.5, 3.6))
    ax = fig.subplots()
    names = sorted({k for r in run.epochs for k in (r.get("scalars") or {})})
    for n in names:
        pts = [(float(r["epoch"]), num(r["scalars"][n])) for r in run.epochs if n in (r.get("scalars") or {})]
        px, py = zip(*pts)
        ax.plot(px, py, marker="o", ms=4, lw=1.6, label=f"{n} (last {py[-1]:.3f})")
    ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over the epoch's batches")
    ax.grid(alpha=0.3)
    ax.set_title(f"{run.name}: what {run.strategy} logged per batch, mean per epoch", fontsize=11)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- across runs


def _peer_mean_curves(group: Group) -> list[list[float]]:
    """Per run of the group, its peers' mean top-1 at each evaluated epoch."""
    curves = []
    for r in group.runs:
        ev = r.evaluated
        peers = [n for n in r.peers if ev and n in ev[0]["top1"]]
        if not peers:
            continue
        curves.append([statistics.fmean(num(e["top1"][n]) for n in peers if n in e["top1"]) for e in ev])
    return curves


def _band(curves: Sequence[Sequence[float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs 1..n and, at each, the mean, min and max over the curves that reach it."""
    xs, mean, lo, hi = [], [], [], []
    for i in range(max(len(c) for c in curves)):
        vals = [c[i] for c in curves if i < len(c)]
        xs.append(i + 1)
        mean.append(statistics.fmean(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi


def _final_limits(lo: Sequence[float], hi: Sequence[float]) -> tuple[float, float]:
    """The final panel's y range: the final values and their intervals, a quarter of their span
    (at least 0.1 point) as margin, within 0..100."""
    a, b = min(lo), max(hi)
    margin = max(0.25 * (b - a), 0.1)
    return max(a - margin, 0.0), min(b + margin, 100.0)


def comparison_figure(groups: Sequence[Group]) -> Any:
    """Peers' mean top-1 of each group: per evaluated epoch (left), and at the last one (right),
    the right panel's axis scaled to the final values so that a few tenths of a point show.
    A group is named by the recipe values that differ between the groups (a sweep's key=value),
    else by its label. None when no group has an evaluated epoch."""
    require_matplotlib()
    series = [(g, curves) for g in groups if (curves := _peer_mean_curves(g))]
    if not series:
        return None
    keys = varying_keys([g for g, _ in series])
    fig = _figure((10.5, 4.4))
    ax, fin = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    finals_lo, finals_hi = [], []
    for i, (g, curves) in enumerate(series):
        xs, mean, lo, hi = _band(curves)
        name = describe(g, keys) if keys else g.label
        (line,) = ax.plot(xs, mean, marker="o", ms=4, lw=1.6, label=f"{name} (n={len(curves)}, final {mean[-1]:.2f})")
        if len(curves) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        # the final panel: every run's last evaluated epoch (runs of a group may stop at different ones)
        last = [c[-1] for c in curves]
        m = statistics.fmean(last)
        fin.errorbar([i], [m], yerr=[[m - min(last)], [max(last) - m]], fmt="o", ms=6, capsize=5,
                     color=line.get_color())
        fin.annotate(f"{m:.2f}", (i, m), textcoords="offset points", xytext=(8, 0), va="center", fontsize=8)
        finals_lo.append(min(last))
        finals_hi.append(max(last))
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("evaluated epoch (training epochs of the stage that is tested)")
    ax.set_ylabel("test top-1 (%), mean over a run's peers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("per epoch (line: mean over seeds, band: min..max)", fontsize=10)
    fin.set_xlim(-0.6, len(series) - 0.4)
    fin.set_xticks(range(len(series)))
    fin.set_xticklabels([str(i + 1) for i in range(len(series))])
    fin.set_xlabel("group, in the legend's order")
    fin.set_ylim(*_final_limits(finals_lo, finals_hi))
    fin.grid(alpha=0.3, axis="y")
    fin.set_title("final (mean, min..max)", fontsize=10)
    fig.suptitle("test top-1 per group of runs", fontsize=11)
    fig.tight_layout()
    return fig


def plot_comparison(groups: Sequence[Group], path: Path) -> Path | None:
    """Write :func:`comparison_figure` to ``path``; None (nothing written) when no group has an evaluated epoch."""
    fig = comparison_figure(groups)
    return None if fig is None else _save(fig, path)
