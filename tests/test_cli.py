"""Tests of the ``mutualkd`` command, each in a fresh interpreter (``python -m mutualkd``)."""

from __future__ import annotations

import json
from pathlib import Path
import textwrap

import pytest

from _helpers import QUICKSTART, TINY_SET, run_cli, sets, subprocess_env


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def _typo_recipe(tmp_path: Path) -> Path:
    text = QUICKSTART.read_text(encoding="utf-8").replace("epochs = 15", "epocs = 15")
    assert "epocs" in text
    p = tmp_path / "typo.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_help():
    proc = run_cli(["--help"])
    assert proc.returncode == 0, proc.stderr
    for cmd in ("run", "validate", "plugins"):
        assert cmd in proc.stdout


def test_plugins_json_lists_builtins_and_reports_broken(tmp_path):
    # A third-party distribution on the path with a broken and a working plugin.
    site = tmp_path / "site"
    info = site / "acme_kd-1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-kd\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """
            [mutualkd.strategies]
            acme_broken = acme_missing_module:Strategy

            [mutualkd.metrics]
            acme_l1 = mutualkd_builtins.metrics:l1_distance
            """
        )
    )
    env = subprocess_env(PYTHONPATH=str(site))
    proc = run_cli(["plugins", "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by = {(r["kind"], r["name"]): r for r in rows}
    for name in ("independent", "kl_dml", "ie_kd", "ie_dml"):
        r = by[("strategy", name)]
        assert r["distribution"] == "mutualkd" and r["status"] == "ok", r
    for name in ("l1", "l2", "cka", "orthogonal"):
        assert by[("metric", name)]["distribution"] == "mutualkd"
    bad = by[("strategy", "acme_broken")]
    assert bad["status"] == "error" and bad["distribution"] == "acme-kd" and bad["version"] == "1.2"
    assert "ModuleNotFoundError" in bad["error"]
    assert by[("metric", "acme_l1")]["status"] == "ok"


def test_plugins_table():
    proc = run_cli(["plugins"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "independent" in out and "kl_dml" in out and "mutualkd" in out and "ok" in out


def test_validate_ok():
    proc = run_cli(["validate", str(QUICKSTART)])
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "kl_dml" in proc.stdout


def test_validate_typo_exit_2(tmp_path):
    p = _typo_recipe(tmp_path)
    proc = run_cli(["validate", str(p)])
    assert proc.returncode == 2
    _no_traceback(proc)
    err = " ".join(proc.stderr.split())  # undo line wrapping
    assert str(p) in err and "[run.epocs]" in err
    assert "fix:" in err and "did you mean 'epochs'" in err


def test_run_typo_exit_2_and_writes_nothing(tmp_path):
    p = _typo_recipe(tmp_path)
    proc = run_cli(["run", str(p), *sets(f"run.out_dir={tmp_path / 'runs'}")], cwd=tmp_path)
    assert proc.returncode == 2
    _no_traceback(proc)
    assert "did you mean 'epochs'" in " ".join(proc.stderr.split())
    assert not (tmp_path / "runs").exists()


def test_run_quickstart_tiny(tmp_path):
    out = tmp_path / "runs"
    proc = run_cli(["run", str(QUICKSTART), *sets(*TINY_SET, f"run.out_dir={out}", "run.name=q")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "q" / "summary.json").read_text())
    assert summary["global_steps"] == 2 and set(summary["top1"]) == {"peer0", "peer1", "ensemble"}
