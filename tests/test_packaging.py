"""The wheel: entry points of the built-in plugins, package layout, py.typed.

The wheel is built from a copy of the sources in a temporary folder, so the build leaves
nothing (build/, *.egg-info) in the working tree.
"""

from __future__ import annotations

import configparser
from pathlib import Path
import shutil
import subprocess
import sys
import zipfile

import pytest

from _helpers import REPO, subprocess_env

STRATEGIES = {"independent", "kl_dml", "ie_kd", "ie_dml"}
METRICS = {"l1", "l2", "cka", "orthogonal"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "setup.py"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "mutualkd", src / "mutualkd", ignore=ignore)
    shutil.copytree(REPO / "plugins" / "mutualkd_builtins", src / "plugins" / "mutualkd_builtins", ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    BUILD["plain"] = proc
    if proc.returncode != 0 and "Unmet dependencies" in proc.stdout + proc.stderr:
        # See test_build_without_isolation_in_dev_venv; build anyway to test the wheel.
        proc = subprocess.run(cmd + ["--skip-dependency-check"], capture_output=True, text=True, timeout=300,
                              env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("mutualkd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


BUILD: dict[str, subprocess.CompletedProcess[str]] = {}


def test_build_without_isolation_in_dev_venv(wheel):
    proc = BUILD["plain"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def _dist_info_file(wheel: Path, names: list[str], file: str) -> str:
    matches = [n for n in names if n.endswith(f".dist-info/{file}")]
    assert len(matches) == 1, matches
    with zipfile.ZipFile(wheel) as z:
        return z.read(matches[0]).decode("utf-8")


def test_wheel_name(wheel):
    import mutualkd

    assert wheel.name.startswith(f"mutualkd-{mutualkd.__version__}-") and wheel.name.endswith("-none-any.whl")


def test_entry_points(wheel, names):
    cp = configparser.ConfigParser()
    cp.optionxform = str  # keep the case of names
    cp.read_string(_dist_info_file(wheel, names, "entry_points.txt"))
    assert set(cp["mutualkd.strategies"]) == STRATEGIES
    assert set(cp["mutualkd.metrics"]) == METRICS
    assert cp["mutualkd.strategies"]["kl_dml"].strip() == "mutualkd_builtins.strategies.kl_dml:KLDML"
    assert cp["mutualkd.strategies"]["ie_dml"].strip() == "mutualkd_builtins.strategies.ie_dml:IEDML"
    assert cp["mutualkd.metrics"]["cka"].strip() == "mutualkd_builtins.metrics:cka_distance"
    for value in list(cp["mutualkd.strategies"].values()) + list(cp["mutualkd.metrics"].values()):
        module = value.split(":")[0].strip()
        assert f"{module.replace('.', '/')}.py" in names, f"entry point {value} points outside the wheel"
    assert cp["console_scripts"]["mutualkd"].strip() == "mutualkd.cli:main"


def test_layout(names):
    tops = {n.split("/")[0] for n in names}
    assert "mutualkd_builtins" in tops and "mutualkd" in tops
    assert "plugins" not in tops, "the built-in plugins must install as mutualkd_builtins, not as 'plugins'"
    assert "tests" not in tops
    assert {t for t in tops if not t.endswith(".dist-info")} == {"mutualkd", "mutualkd_builtins"}
    assert "mutualkd/py.typed" in names
    for module in (
        "mutualkd/__init__.py",
        "mutualkd/cli.py",
        "mutualkd/engine.py",
        "mutualkd/models/__init__.py",
        "mutualkd/data/__init__.py",
        "mutualkd_builtins/__init__.py",
        "mutualkd_builtins/losses.py",
        "mutualkd_builtins/metrics.py",
        "mutualkd_builtins/factor.py",
        "mutualkd_builtins/strategies/kl_dml.py",
        "mutualkd_builtins/strategies/ie_dml.py",
        "mutualkd_builtins/strategies/ie_kd.py",
        "mutualkd_builtins/strategies/independent.py",
    ):
        assert module in names, module
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_every_source_module_is_packaged(names):
    """No module of mutualkd/ or plugins/mutualkd_builtins/ is left out of the wheel."""
    missing = []
    for base, prefix in ((REPO / "mutualkd", "mutualkd"), (REPO / "plugins" / "mutualkd_builtins", "mutualkd_builtins")):
        for p in base.rglob("*.py"):
            if "__pycache__" in p.parts:
                continue
            name = f"{prefix}/{p.relative_to(base).as_posix()}"
            if name not in names:
                missing.append(name)
    assert not missing, missing


def test_metadata(wheel, names):
    meta = _dist_info_file(wheel, names, "METADATA")
    assert "Name: mutualkd" in meta and "Requires-Dist: timm" in meta
