"""Tests of ``mutualkd report``: figures, the comparison table, grouping by seed, bad input.

Three tiny digits runs (two epochs of 4 steps, 64 test images) are trained once per
module: two seeds of one KL-DML recipe and one run of another recipe (independent).
The grouping and peer-naming tests at the end work on recipe dicts and train nothing.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
import functools
import json
from pathlib import Path
import shutil
import statistics
import subprocess
import sys
from typing import Any

import pytest

from mutualkd.checkpoint import RESUME_MAY_CHANGE, recipe_hash
from mutualkd.config import LOGGING_ONLY_FIELDS, RunConfig, parse_recipe, read_toml
from mutualkd.errors import UserError
from mutualkd.report import RunData, group_runs, load_run, make_report
from mutualkd.report.runs import group_key
from mutualkd.runlog import dump_toml

#: The factory fixtures of tests/fixtures/ used here (recipe_dict, run_cli).
Factory = Callable[..., Any]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("losses.png", "losses_steps.png", "top1.png")


def _train(make_trainer: Callable[..., Any], out: Path, name: str, seed: int, strategy: str) -> Path:
    t = make_trainer(
        out, name=name, strategy=strategy, max_steps=None, epochs=2, log_every=2,
        run={"seed": seed}, data={"train_subset": 32, "test_subset": 64, "eval_batch_size": 64},
    )
    t.fit()
    return out / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, make_trainer: Callable[..., Any]) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    return {
        "dml-s0": _train(make_trainer, out, "dml-s0", 0, "kl_dml"),
        "dml-s1": _train(make_trainer, out, "dml-s1", 1, "kl_dml"),
        "indep": _train(make_trainer, out, "indep", 0, "independent"),
    }


@pytest.fixture(scope="module")
def cli_report(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, run_cli: Factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    proc = run_cli(["report", *(str(p) for p in runs.values()), "--out", str(out)], timeout=120)
    return proc, out


def _peer_mean_final(run_dir: Path) -> float:
    top1 = json.loads((run_dir / "summary.json").read_text())["top1"]
    vals = [row["final"] for name, row in top1.items() if name != "ensemble"]
    return sum(vals) / len(vals)


def _is_png(p: Path) -> bool:
    data = p.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def test_report_writes_valid_pngs(cli_report):
    proc, out = cli_report
    assert proc.returncode == 0, proc.stderr
    for run in ("dml-s0", "dml-s1", "indep"):
        for fig in FIGURES:
            assert _is_png(out / run / fig), f"{run}/{fig}"
    assert _is_png(out / "top1_comparison.png")


def test_report_md_has_one_row_per_group_with_mean_std(cli_report, runs):
    proc, out = cli_report
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text(encoding="utf-8")
    group_section = md.split("## Per group", 1)[1].split("## Per run", 1)[0]
    rows = [line for line in group_section.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    rows = [r for r in rows if not set(r) <= set("|-: ")]
    assert len(rows) == 2, group_section
    dml = next(r for r in rows if r.startswith("| dml |"))
    indep = next(r for r in rows if r.startswith("| indep |"))
    # two seeds: mean ± sample standard deviation of the runs' peer means
    vals = [_peer_mean_final(runs["dml-s0"]), _peer_mean_final(runs["dml-s1"])]
    assert f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}" in dml
    assert "| 0, 1 |" in dml and "kl_dml" in dml
    # one run: a plain value, no spread
    cells = [c.strip() for c in indep.strip("|").split("|")]
    assert cells[5] == f"{_peer_mean_final(runs['indep']):.2f}"
    assert "±" not in cells[5]
    # the per-run table and links to every figure
    for run in ("dml-s0", "dml-s1", "indep"):
        assert f"| {run} |" in md
        assert f"({run}/top1.png)" in md


def test_rich_tables_are_printed(cli_report):
    proc, _ = cli_report
    assert proc.returncode == 0, proc.stderr
    assert "test top-1 (%) per group of runs" in proc.stdout
    assert "test top-1 (%) per run" in proc.stdout
    assert "dml-s1" in proc.stdout and "report written to" in proc.stdout


def test_not_a_run_folder_exits_2_without_traceback(tmp_path: Path, runs, run_cli: Factory):
    plain = tmp_path / "plain"
    plain.mkdir()
    proc = run_cli(["report", str(plain), "--out", str(tmp_path / "rep")], timeout=60)
    assert proc.returncode == 2
    assert "not a run folder" in proc.stderr and "metrics.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "rep").exists()
    # the parent of runs: the hint names them
    with pytest.raises(UserError) as ei:
        load_run(runs["indep"].parent)
    assert "dml-s0" in str(ei.value) and "/*/" in str(ei.value)
    with pytest.raises(UserError):
        load_run(tmp_path / "missing")


def test_grouping_ignores_seed_name_and_logging(runs):
    groups = group_runs([load_run(p) for p in runs.values()])
    assert [g.label for g in groups] == ["dml", "indep"]
    assert [len(g.runs) for g in groups] == [2, 1]


def test_incomplete_run_with_truncated_line(runs, tmp_path: Path):
    run = tmp_path / "partial"
    shutil.copytree(runs["indep"], run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last_epoch = max(i for i, line in enumerate(lines) if '"kind": "epoch"' in line)
    # drop the last epoch record and leave half a line, as a run killed while writing
    (run / "metrics.jsonl").write_text("\n".join(lines[:last_epoch]) + "\n" + lines[last_epoch][:40])
    rep = make_report([run], tmp_path / "rep")
    r = rep.runs[0]
    assert not r.complete and r.bad_lines == 1 and len(r.evaluated) == 1
    assert "incomplete, 1 unreadable line(s)" in rep.markdown
    assert _is_png(tmp_path / "rep" / "partial" / "top1.png")


def test_grouping_ignores_changed_logging_fields_in_recipe_toml(runs, tmp_path: Path):
    """A copy of a run whose recipe.toml differs in every logging-only field joins its group."""
    copied = tmp_path / "dml-s2"
    shutil.copytree(runs["dml-s1"], copied, ignore=shutil.ignore_patterns("checkpoints"))
    recipe = read_toml(copied / "recipe.toml")
    recipe["run"].update({field: OTHER_VALUE[field] for field in LOGGING_ONLY_FIELDS}, seed=2, name="dml-s2")
    (copied / "recipe.toml").write_text(dump_toml(recipe), encoding="utf-8")
    parse_recipe(read_toml(copied / "recipe.toml"), file=str(copied / "recipe.toml"))  # still a valid recipe
    groups = group_runs([load_run(p) for p in (*runs.values(), copied)])
    assert [(g.label, [r.name for r in g.runs]) for g in groups] == [("dml", ["dml-s0", "dml-s1", "dml-s2"]), ("indep", ["indep"])]


# --------------------------------------------------------------------------- one list of logging-only fields

#: A valid value for every ``[run]`` field other than the one the test recipes have
#: (``recipe_dict``). A new field must be added here, which makes its author decide whether
#: it is logging-only.
OTHER_VALUE: dict[str, Any] = {
    "name": "other",
    "seed": 7,
    "epochs": 3,
    "out_dir": "elsewhere",
    "deterministic": True,
    "mixed_precision": "bf16",
    "device": "auto",
    "log_every": 7,
    "checkpoint_every": 3,
    "keep_checkpoints": 5,
    "max_steps": 11,
    "resume": "auto",
    "channels_last": True,
    "compile": True,
    "progress": True,
    "progress_every_s": 5.0,
    "threads": 2,
    "block_plugins": ["strategy:ie_dml"],
    "log_with": ["tensorboard"],
    "tracker_project": "other",
    "collective_timeout": 60.0,
    "sync_bn": True,
    "best_output": "ensemble",
}


def test_every_run_field_has_another_value_to_try():
    assert set(OTHER_VALUE) == set(RunConfig.model_fields)
    assert set(LOGGING_ONLY_FIELDS) <= set(RunConfig.model_fields)
    assert len(set(LOGGING_ONLY_FIELDS)) == len(LOGGING_ONLY_FIELDS) > 0


@pytest.mark.parametrize("field", sorted(RunConfig.model_fields))
def test_resume_and_report_agree_on_logging_only_fields(field: str, tmp_path: Path, recipe_dict: Factory):
    """Changing a logging-only field keeps the recipe hash (a resume is accepted) and the
    report's group; changing any other field changes both, except that ``max_steps`` and
    ``threads`` may change on resume and the seed and the name tell the runs of a group apart."""
    base = recipe_dict(tmp_path)
    changed = copy.deepcopy(base)
    changed["run"][field] = OTHER_VALUE[field]
    a, b = (parse_recipe(d, file="<test>").to_dict() for d in (base, changed))
    assert a["run"].get(field) != b["run"][field]

    same_hash = recipe_hash(a) == recipe_hash(b)
    same_group = group_key(_run_of(a, tmp_path / "a")) == group_key(_run_of(b, tmp_path / "b"))
    logging_only = field in LOGGING_ONLY_FIELDS
    assert same_hash == (logging_only or field in ("max_steps", "threads")), f"recipe_hash and run.{field}"
    assert same_group == (logging_only or field in ("seed", "name")), f"report grouping and run.{field}"
    assert (field in RESUME_MAY_CHANGE) == same_hash


def _run_of(recipe: dict[str, Any], path: Path) -> RunData:
    return RunData(path=path, name=path.name, recipe=recipe, epochs=[], steps=[], summary=None)


# --------------------------------------------------------------------------- peer names


def test_report_names_peers_as_the_recipe_does(tmp_path: Path, recipe_dict: Factory):
    d = recipe_dict(tmp_path, peers=3)
    d["peers"][1]["name"] = "teacher"
    recipe = parse_recipe(d, file="<test>")
    assert recipe.peer_names() == ["peer0", "teacher", "peer2"]
    run = _run_of(recipe.to_dict(), tmp_path / "run")
    assert run.peers == recipe.peer_names()
    assert run.models == {"peer0": "cifar_resnet20", "teacher": "cifar_wrn_16_1", "peer2": "cifar_resnet20"}


def test_importing_the_report_draws_in_no_matplotlib(subprocess_env):
    code = (
        "import sys; import mutualkd.cli; import mutualkd.report;"
        " assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- labels, seeds, width, panel order


def _fake_run(recipe_dict: Callable[..., dict[str, Any]], tmp_path: Path, name: str, seed: int,
              finals: dict[str, float], **recipe_changes: Any) -> RunData:
    recipe = parse_recipe(recipe_dict(tmp_path, name=name, run={"seed": seed}), file="<test>").to_dict()
    for k, v in recipe_changes.items():
        section, _, key = k.partition("__")
        recipe[section][key] = v
    epochs = [{"kind": "epoch", "epoch": 1, "stage": "train", "global_step": 4, "loss": {}, "top1": finals}]
    return RunData(path=tmp_path / name, name=name, recipe=recipe, epochs=epochs, steps=[], summary={"top1": {}})


@pytest.fixture
def fake_run(recipe_dict: Callable[..., dict[str, Any]]) -> Callable[..., RunData]:
    """``fake_run(tmp_path, name, seed, finals, **recipe_changes) -> RunData``: a run as the report
    reads it, trained on nothing: one epoch whose top-1 values are ``finals``; ``recipe_changes``
    (``section__key=value``) edit the tiny digits recipe."""
    return functools.partial(_fake_run, recipe_dict)


def test_group_labels_keep_digits_that_are_not_the_seed(tmp_path: Path, fake_run: Callable[..., RunData]):
    groups = group_runs([fake_run(tmp_path, "kl-resnet18", 0, {"peer0": 50.0, "peer1": 60.0}),
                         fake_run(tmp_path, "dml-s3", 3, {"peer0": 50.0, "peer1": 60.0}, strategy__name="independent")])
    assert [g.label for g in groups] == ["kl-resnet18", "dml"]


def test_runs_with_the_same_seed_are_one_experiment(tmp_path: Path, fake_run: Callable[..., RunData]):
    from mutualkd.report.tables import group_rows

    a = fake_run(tmp_path, "dml", 0, {"peer0": 50.0, "peer1": 60.0})
    b = fake_run(tmp_path, "dml-again", 0, {"peer0": 52.0, "peer1": 62.0})
    (g,) = group_runs([a, b])
    assert g.seeds == [0]
    assert g.peer_mean("final") == (56.0, None, 1)  # averaged, no spread over repeats of one seed
    row = group_rows([g])[0]
    assert row[3] == "0 (2 runs, averaged)" and "±" not in row[5]
    c = fake_run(tmp_path, "dml-s1", 1, {"peer0": 40.0, "peer1": 50.0})
    (g,) = group_runs([a, b, c])
    assert g.peer_mean("final") == (50.5, pytest.approx(statistics.stdev([56.0, 45.0])), 2)


def test_ema_copies_are_not_in_the_peers_mean(tmp_path: Path, fake_run: Callable[..., RunData]):
    r = fake_run(tmp_path, "e", 0, {"peer0": 50.0, "peer1": 60.0, "ensemble": 61.0, "peer0_ema": 90.0})
    assert r.peer_mean("final") == 55.0
    (g,) = group_runs([r])
    assert g.every_network("final") == (55.0, pytest.approx(statistics.stdev([50.0, 60.0])), 2)


def test_terminal_tables_are_readable_at_80_columns(tmp_path: Path, fake_run: Callable[..., RunData]):
    from rich.console import Console

    from mutualkd.report.tables import group_table, rich_table, run_rows

    runs = [fake_run(tmp_path, f"dml-s{s}", s, {"peer0": 50.0 + s, "peer1": 60.25 + s, "ensemble": 61.5,
                                                  "peer0_ema": 55.125, "peer1_ema": 58.0}) for s in range(3)]
    runs.append(fake_run(tmp_path, "kl-T4-s0", 0, {"peer0": 51.0, "peer1": 61.0}, strategy__temperature=4.0))
    groups = group_runs(runs)
    console = Console(width=80, record=True, color_system=None)
    head, rows = group_table(groups)
    console.print(rich_table("per group", head, rows, 80))
    r_head, r_rows = run_rows(groups)
    console.print(rich_table("per run", r_head, r_rows, 80))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    # every number whole on one line, never folded
    for cell in [c for row in rows + r_rows for c in row if any(ch.isdigit() for ch in c) and len(c) < 30]:
        assert cell in text, cell
    assert "strategy.temperature=4.0" in text and "strategy.temperature=unset" in text


def test_loss_panels_follow_the_peers_order():
    from mutualkd.report.plots import _owners

    keys = ["peer0/ce", "peer2/ce", "peer3/ce", "peer1/ce", "peer1/kl", "ae/rec"]
    assert list(_owners(keys, ["peer0", "peer1", "peer2", "peer3"])) == ["peer0", "peer1", "peer2", "peer3", "ae"]



def _epochs(run: RunData, *values: float) -> RunData:
    """``run`` with one evaluated epoch per value, both peers at that top-1."""
    run.epochs = [{"kind": "epoch", "epoch": i + 1, "stage": "train", "global_step": 4 * (i + 1), "loss": {},
                   "top1": {"peer0": v, "peer1": v}} for i, v in enumerate(values)]
    return run


def test_comparison_axis_shows_a_fifth_of_a_point(tmp_path: Path, fake_run: Callable[..., RunData]):
    from mutualkd.report.plots import comparison_figure

    # a sweep's two values: early epochs near 37 %, final values 0.2 point apart
    runs = [_epochs(fake_run(tmp_path, "w0.5", 0, {}, strategy__weight=0.5), 37.0, 80.0, 88.0),
            _epochs(fake_run(tmp_path, "w1", 0, {}, strategy__weight=1.0), 37.5, 80.5, 88.2)]
    fig = comparison_figure(group_runs(runs))
    low, high = fig.axes[1].get_ylim()
    assert 86.0 <= low < 88.0 and 88.2 < high <= 90.0, (low, high)
    # the min..max interval of each final value is drawn (an error bar per group)
    assert len(fig.axes[1].containers) == 2
    # flat curves: the per-epoch panel is scaled to the data too
    flat = [_epochs(fake_run(tmp_path, "f0.5", 0, {}, strategy__weight=0.5), 88.0, 88.0),
            _epochs(fake_run(tmp_path, "f1", 0, {}, strategy__weight=1.0), 88.2, 88.2)]
    for ax in comparison_figure(group_runs(flat)).axes:
        low, high = ax.get_ylim()
        assert 86.0 <= low < 88.0 and 88.2 < high <= 90.0, (low, high)


def test_comparison_legend_names_the_swept_value(tmp_path: Path, fake_run: Callable[..., RunData]):
    from mutualkd.report.plots import comparison_figure

    runs = [fake_run(tmp_path, "run-a", 0, {"peer0": 88.0, "peer1": 88.0}, strategy__weight=0.5),
            fake_run(tmp_path, "run-b", 0, {"peer0": 88.2, "peer1": 88.2}, strategy__weight=1.0)]
    fig = comparison_figure(group_runs(runs))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("strategy.weight=0.5 ") and labels[1].startswith("strategy.weight=1.0 "), labels


def test_loss_figures_say_the_terms_are_weighted(tmp_path: Path, fake_run: Callable[..., RunData]):
    from mutualkd.report import run_figures

    run = fake_run(tmp_path, "dml", 0, {"peer0": 50.0, "peer1": 60.0})
    run.epochs[0]["loss"] = {"peer0/ce": 1.0, "peer0/kl": 0.5, "peer1/ce": 1.1, "peer1/kl": 0.4}
    figures = run_figures(run)
    for name in ("losses", "losses_steps"):
        # Figure.get_suptitle() is matplotlib >= 3.8; the suptitle is one of the figure's texts
        # in every release the report supports (the floor is 3.7).
        titles = [text.get_text() for text in figures[name].texts]
        assert any("already weighted by the strategy's coefficients" in t for t in titles), titles
