"""``mutualkd report``: plots of each run and a comparison table across runs.

For every run folder (one that holds ``metrics.jsonl``, written by ``mutualkd run``):

- ``<out>/<run>/losses.png``: the per-epoch mean of every loss term, one panel per peer
  (or other owner of terms, e.g. the IE-KD teacher's autoencoder), one line per term;
- ``<out>/<run>/losses_steps.png``: the same terms at every logged step;
- ``<out>/<run>/top1.png``: test top-1 of each peer and of the ensemble per epoch.

Across runs: ``<out>/top1_comparison.png`` (the peers' mean top-1 per epoch, one line
per group of runs, the band is the spread over seeds) and ``<out>/report.md`` with two
tables, also printed with rich:

- per group of runs that differ only in their seed (their ``recipe.toml`` is compared
  with ``run.seed``, ``run.name`` and the fields that only say where and how a run logs,
  ``run.out_dir``, ``run.progress``, ``run.log_every``, ``run.checkpoint_every``,
  ``run.keep_checkpoints``, ``run.resume``, left out): final and best test top-1 as
  mean +- sample standard deviation over the runs of the group;
- per run: final and best test top-1 of every model.

"Final" is the last evaluated epoch, "best" the highest of any evaluated epoch (an
optimistic number: it selects on the test set). Runs still in progress are read as far
as they got and marked "incomplete".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import copy
from dataclasses import dataclass, field
import json
import math
from pathlib import Path
import re
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from mutualkd.errors import UserError

__all__ = ["RunData", "Group", "load_run", "group_runs", "make_report"]

#: ``[run]`` fields that do not change what a run computes; left out when grouping.
IGNORED_RUN_FIELDS = ("seed", "name", "out_dir", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "resume")
ENSEMBLE = "ensemble"
DASH = "—"


# --------------------------------------------------------------------------- reading


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
            return [p.get("name") or f"peer{i}" for i, p in enumerate(self.recipe.get("peers", []))]
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
            return {n: p.get("model", "?") for n, p in zip(self.peers, self.recipe.get("peers", []))}
        return dict((self.summary or {}).get("peers", {}))

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
                values = [_num(r["top1"][n]) for r in ev if n in r["top1"]]
                finite = [v for v in values if math.isfinite(v)]
                if finite:
                    out[n] = {"final": values[-1], "best": max(finite)}
        elif self.summary is not None:
            for n, row in self.summary.get("top1", {}).items():
                out[n] = {"final": _num(row.get("final")), "best": _num(row.get("best"))}
        return out

    def peer_mean(self, which: str) -> float | None:
        """Mean over the peers (not the ensemble) of their final or best top-1."""
        t = self.top1()
        vals = [row[which] for n, row in t.items() if n != ENSEMBLE]
        return sum(vals) / len(vals) if vals else None


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _not_a_run(path: Path) -> UserError:
    inner = sorted(p.parent.name for p in path.glob("*/metrics.jsonl"))
    if inner:
        shown = ", ".join(inner[:5]) + (", ..." if len(inner) > 5 else "")
        hint = f"this folder holds {len(inner)} run(s) ({shown}); pass them, e.g. `mutualkd report {path}/*/`"
    else:
        hint = "name a folder written by `mutualkd run` (runs/<run.name>/ holds metrics.jsonl, recipe.toml, summary.json)"
    return UserError("not a run folder: it has no metrics.jsonl", where=str(path), hint=hint)


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
    epochs: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    bad = 0
    try:
        text = metrics.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read metrics.jsonl: {e.strerror}", where=str(metrics)) from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a run killed while writing it
            continue
        if not isinstance(rec, dict):
            bad += 1
        elif rec.get("kind") == "epoch":
            epochs.append(rec)
        elif rec.get("kind") == "step":
            steps.append(rec)
    recipe = read_toml(p / "recipe.toml") if (p / "recipe.toml").is_file() else None
    summary = None
    if (p / "summary.json").is_file():
        try:
            summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = None
    name = str((recipe or {}).get("run", {}).get("name") or p.name)
    return RunData(path=p, name=name, recipe=recipe, epochs=epochs, steps=steps, summary=summary, bad_lines=bad)


# --------------------------------------------------------------------------- grouping


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
        return [r.seed if r.seed is not None else "?" for r in self.runs]

    def stat(self, values: Sequence[float | None]) -> tuple[float, float | None, int] | None:
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if not vals:
            return None
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) >= 2 else None
        return mean, std, len(vals)

    def peer_mean(self, which: str) -> tuple[float, float | None, int] | None:
        return self.stat([r.peer_mean(which) for r in self.runs])

    def every_network(self, which: str) -> tuple[float, float | None, int] | None:
        return self.stat([row[which] for r in self.runs for n, row in r.top1().items() if n != ENSEMBLE])

    def ensemble(self, which: str) -> tuple[float, float | None, int] | None:
        return self.stat([r.top1()[ENSEMBLE][which] for r in self.runs if ENSEMBLE in r.top1()])


def group_key(run: RunData) -> str:
    if run.recipe is None:
        return f"<no recipe.toml: {run.path}>"
    rec = copy.deepcopy(run.recipe)
    for k in IGNORED_RUN_FIELDS:
        rec.get("run", {}).pop(k, None)
    return json.dumps(rec, sort_keys=True, default=str)


_SEED_SUFFIX = re.compile(r"[-_.]?(?:seed|s)?[-_]?\d+$", re.IGNORECASE)


def _group_label(names: Sequence[str]) -> str:
    stripped = {_SEED_SUFFIX.sub("", n) or n for n in names}
    if len(stripped) == 1:
        return stripped.pop()
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip("-_. ")
    return prefix or names[0]


def group_runs(runs: Iterable[RunData]) -> list[Group]:
    """Group runs by recipe (seed, name and logging fields left out), in order of first appearance."""
    groups: dict[str, Group] = {}
    for r in runs:
        groups.setdefault(group_key(r), Group(group_key(r))).runs.append(r)
    out = list(groups.values())
    seen: dict[str, int] = {}
    for g in out:
        label = _group_label([r.name for r in g.runs])
        seen[label] = seen.get(label, 0) + 1
        g.label = label if seen[label] == 1 else f"{label} #{seen[label]}"
    return out


def _assign_labels(runs: Sequence[RunData]) -> None:
    """A unique, file-system safe folder name per run for its plots."""
    used: set[str] = set()
    for r in runs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", r.path.name) or "run"
        label = base
        if label in used:
            label = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{r.path.parent.name}-{base}")
        i = 2
        while label in used:
            label = f"{base}-{i}"
            i += 1
        used.add(label)
        r.label = label


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "mutualkd report needs matplotlib, which is not installed",
            hint="pip install 'mutualkd[report]' (or pip install matplotlib)",
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _owners(keys: Iterable[str]) -> dict[str, list[str]]:
    """``peer/term`` keys grouped by their owner (the part before the first '/')."""
    out: dict[str, list[str]] = {}
    for k in keys:
        owner, _, term = k.partition("/")
        out.setdefault(owner if term else "loss", []).append(k)
    return out


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


def _loss_figure(plt: Any, flat: Sequence[Mapping[str, float]], xs: Sequence[float],
                 xlabel: str, title: str, bounds: Sequence[tuple[float, str]], thin: bool) -> Any:
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    owners = _owners(keys)
    # one colour per term name (ce, kl, rec, ...) in every panel
    terms = list(dict.fromkeys(k.partition("/")[2] or k for k in keys))
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    color = {t: palette[i % len(palette)] for i, t in enumerate(terms)}
    n = max(len(owners), 1)
    fig, axes = plt.subplots(n, 1, figsize=(7.5, 2.4 * n + 0.6), sharex=True, squeeze=False)
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


def plot_run(run: RunData, out_dir: Path) -> list[Path]:
    """Write the loss and top-1 figures of one run; returns the files written."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    stages = sorted({str(r.get("stage")) for r in run.epochs}, key=[str(r.get("stage")) for r in run.epochs].index)
    stage_note = f"  (stages: {' -> '.join(stages)})" if len(stages) > 1 else ""

    # per-epoch loss terms
    flat = [{k: _num(v) for k, v in (r.get("loss") or {}).items()} for r in run.epochs]
    xs = [float(r.get("epoch", i + 1)) for i, r in enumerate(run.epochs)]
    fig = _loss_figure(plt, flat, xs, "epoch", f"{run.name}: loss terms, mean per epoch{stage_note}",
                       _stage_bounds(run.epochs, "epoch"), thin=False)
    written.append(_save(fig, out_dir / "losses.png", plt))

    # per-step loss terms
    sflat = []
    for r in run.steps:
        f: dict[str, float] = {}
        for terms in (r.get("steps") or {}).values():
            if isinstance(terms, Mapping):
                f.update({k: _num(v) for k, v in terms.items()})
        sflat.append(f)
    sxs = [float(r.get("global_step", i + 1)) for i, r in enumerate(run.steps)]
    fig = _loss_figure(plt, sflat, sxs, "global step", f"{run.name}: loss terms at each logged step{stage_note}",
                       _stage_bounds(run.steps, "global_step"), thin=True)
    written.append(_save(fig, out_dir / "losses_steps.png", plt))

    # test top-1
    ev = run.evaluated
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names = list(run.top1())
    for i, n in enumerate(names):
        pts = [(float(r["epoch"]), _num(r["top1"][n])) for r in ev if n in r["top1"]]
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
    written.append(_save(fig, out_dir / "top1.png", plt))
    return written


def plot_comparison(groups: Sequence[Group], path: Path) -> Path | None:
    """Peers' mean top-1 per evaluated epoch, one line per group (band: min..max over its runs)."""
    plt = _pyplot()
    series = []
    for g in groups:
        curves = []
        for r in g.runs:
            ev = r.evaluated
            peers = [n for n in r.peers if ev and n in ev[0]["top1"]]
            if not peers:
                continue
            curves.append([statistics.fmean(_num(e["top1"][n]) for n in peers if n in e["top1"]) for e in ev])
        if curves:
            series.append((g, curves))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for g, curves in series:
        length = max(len(c) for c in curves)
        xs, mean, lo, hi = [], [], [], []
        for i in range(length):
            vals = [c[i] for c in curves if i < len(c)]
            xs.append(i + 1)
            mean.append(statistics.fmean(vals))
            lo.append(min(vals))
            hi.append(max(vals))
        (line,) = ax.plot(xs, mean, marker="o", ms=4, lw=1.6, label=f"{g.label} (n={len(curves)}, final {mean[-1]:.2f})")
        if len(curves) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("evaluated epoch (training epochs of the stage that is tested)")
    ax.set_ylabel("test top-1 (%), mean over a run's peers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("test top-1 per group of runs (line: mean over seeds, band: min..max)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path, plt)


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- tables


def fmt_stat(s: tuple[float, float | None, int] | None) -> str:
    if s is None:
        return DASH
    mean, std, _ = s
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _fmt(v: float | None) -> str:
    return DASH if v is None or not math.isfinite(v) else f"{v:.2f}"


GROUP_COLUMNS = (
    "group", "strategy", "models", "seeds", "epochs",
    "final top-1, peers' mean", "best top-1, peers' mean", "final top-1, every network (n)",
    "ensemble final", "ensemble best",
)


def group_rows(groups: Sequence[Group]) -> list[list[str]]:
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


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    numeric = [i for i, h in enumerate(head) if h in ("seeds", "epochs", "seed") or "top-1" in h or "final" in h or "best" in h]
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |"]
    lines.append("| " + " | ".join("---:" if i in numeric else "---" for i in range(len(head))) + " |")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


def rich_table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    t = Table(title=title)
    for i, h in enumerate(head):
        numeric = h in ("seeds", "epochs", "seed") or "top-1" in h or "final" in h or "best" in h
        t.add_column(h, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    out: Path
    runs: list[RunData]
    groups: list[Group]
    files: list[Path]
    markdown: str


def make_report(paths: Sequence[str | Path], out: str | Path = "report", console: Console | None = None) -> Report:
    """Read the runs, write the plots and ``report.md`` under ``out``, print the tables."""
    if not paths:
        raise UserError("no run folder given", hint="mutualkd report RUN_DIR [RUN_DIR ...] [--out DIR]")
    runs: list[RunData] = []
    seen: set[Path] = set()
    for p in paths:
        run = load_run(p)
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("the report's output path exists and is not a folder", where=str(out_dir),
                        hint="choose another --out")
    if any(out_dir.resolve() == r.path.resolve() for r in runs):
        raise UserError("--out is one of the run folders", where=str(out_dir), hint="choose another --out, e.g. --out report")
    _pyplot()  # fail early, before writing anything, when matplotlib is missing
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder: {e.strerror}", where=str(out_dir), hint="choose another --out") from None
    _assign_labels(runs)
    groups = group_runs(runs)

    files: list[Path] = []
    for r in runs:
        files += plot_run(r, out_dir / r.label)
    comp = plot_comparison(groups, out_dir / "top1_comparison.png")
    if comp is not None:
        files.append(comp)

    g_rows = group_rows(groups)
    r_head, r_rows = run_rows(groups)
    md = _markdown(runs, groups, g_rows, r_head, r_rows, comp is not None)
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    files.append(out_dir / "report.md")

    if console is not None:
        console.print(rich_table("test top-1 (%) per group of runs (mean ± std over seeds)", GROUP_COLUMNS, g_rows))
        console.print(rich_table("test top-1 (%) per run", r_head, r_rows))
        for r in runs:
            if r.bad_lines:
                console.print(f"note: {r.path / 'metrics.jsonl'}: {r.bad_lines} unreadable line(s) skipped", markup=False)
        console.print(f"report written to {out_dir / 'report.md'} ({len(files) - 1} figures)", markup=False)
    return Report(out_dir, runs, groups, files, md)


def _markdown(runs: Sequence[RunData], groups: Sequence[Group], g_rows: list[list[str]], r_head: list[str],
              r_rows: list[list[str]], comparison: bool) -> str:
    parts = ["# mutualkd report", ""]
    parts.append(
        f"{len(runs)} run(s) in {len(groups)} group(s). A group holds the runs whose recipes differ only in"
        " `run.seed` (and `run.name` and the logging fields). Test top-1 in %; \"final\" is the last evaluated"
        " epoch, \"best\" the highest over all evaluated epochs (chosen on the test set, so optimistic)."
        " Mean ± sample standard deviation over the runs of a group; \"peers' mean\" averages a run's peers"
        " first (one value per run), \"every network\" pools every peer of every run (n networks)."
    )
    parts += ["", "## Per group", "", markdown_table(GROUP_COLUMNS, g_rows), ""]
    parts += ["## Per run", "", markdown_table(r_head, r_rows), ""]
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
