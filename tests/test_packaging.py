"""The wheel: entry points of the built-in plugins, package layout, py.typed, dependencies.

The wheel is built from a copy of the sources in a temporary folder, so the build leaves
nothing (build/, *.egg-info) in the working tree.
"""

from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement


STRATEGIES = {"independent", "kl_dml", "ie_kd", "ie_dml", "one", "cl_ilr", "okddip", "pcl", "kdcl", "ffl", "mcl",
              "switokd"}
METRICS = {"l1", "l2", "l2_per_sample", "cka", "cka_debiased", "orthogonal", "orthogonal_sq"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, repo_root, subprocess_env) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "setup.py"):
        if (repo_root / name).is_file():
            shutil.copy2(repo_root / name, src / name)
    shutil.copytree(repo_root / "mutualkd", src / "mutualkd", ignore=ignore)
    shutil.copytree(repo_root / "plugins" / "mutualkd_builtins", src / "plugins" / "mutualkd_builtins", ignore=ignore)
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
        "mutualkd/engine/__init__.py",
        "mutualkd/report/__init__.py",
        "mutualkd/testing/__init__.py",
        "mutualkd/recipe_doc.py",
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


def test_every_source_module_is_packaged(names, repo_root):
    """No module of mutualkd/ or plugins/mutualkd_builtins/ is left out of the wheel."""
    missing = []
    for base, prefix in ((repo_root / "mutualkd", "mutualkd"),
                         (repo_root / "plugins" / "mutualkd_builtins", "mutualkd_builtins")):
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


def _installed_requires(wheel: Path, names: list[str], tmp_path: Path) -> list[Requirement]:
    """``importlib.metadata.requires("mutualkd")`` as an install of this wheel answers it."""
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path, members=[n for n in names if n.startswith(f"{info}/")])
    dist = metadata.PathDistribution(tmp_path / info)
    assert dist.metadata["Name"] == "mutualkd"
    return [Requirement(r) for r in dist.requires or []]


def test_dependencies_have_floors_and_no_caps(wheel, names, tmp_path):
    """A user with a newer torch can install mutualkd: the tested releases are pinned only
    for development (constraints/dev.txt), never in the package's metadata."""
    reqs = {r.name: r for r in _installed_requires(wheel, names, tmp_path) if r.marker is None}
    for name in ("torch", "torchvision", "timm"):
        spec = reqs[name].specifier
        assert spec, f"{name} has no floor"
        assert all(s.operator == ">=" for s in spec), f"{name}: {spec} caps the release (only >= floors belong here)"
        assert not spec.contains("0.0.1"), f"{name}: {spec} has no floor"
    for future in ("2.15.0", "3.0"):
        assert reqs["torch"].specifier.contains(future), f"torch {future} is refused by {reqs['torch'].specifier}"
    assert reqs["torchvision"].specifier.contains("0.30.0")


def test_timm_floor_has_the_names_the_code_imports(wheel, names, tmp_path, repo_root):
    """timm.layers.get_device_dtype, used by the CIFAR models, first shipped in timm 1.0.29."""
    reqs = {r.name: r for r in _installed_requires(wheel, names, tmp_path)}
    assert not reqs["timm"].specifier.contains("1.0.28") and reqs["timm"].specifier.contains("1.0.29")
    assert "get_device_dtype" in (repo_root / "mutualkd" / "models" / "_common.py").read_text(encoding="utf-8")


def test_python_floor_has_tomllib(wheel, names):
    """mutualkd reads recipes with tomllib, new in Python 3.11."""
    meta = _dist_info_file(wheel, names, "METADATA")
    floor = re.search(r"^Requires-Python: (.+)$", meta, re.M)
    assert floor is not None and floor.group(1).strip() == ">=3.11", meta[:500]


def test_dev_constraints_pin_the_tested_torch(repo_root):
    """constraints/dev.txt pins what development and CI install, on its own (no site-wide pip
    configuration is needed), and the Makefile hands it to pip."""
    pins = {}
    for line in (repo_root / "constraints" / "dev.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            pins[r.name] = str(r.specifier)
    assert pins["torch"] == "==2.14.1" and pins["torchvision"] == "==0.29.1"
    makefile = (repo_root / "Makefile").read_text(encoding="utf-8")
    assert "CONSTRAINTS := constraints/dev.txt" in makefile and "pip install --quiet -c $(CONSTRAINTS)" in makefile


def test_packages_list_every_subpackage(repo_root):
    """Every folder of mutualkd/ and plugins/mutualkd_builtins/ with an __init__.py is in
    [tool.setuptools] packages (a package left out is silently missing from the wheel)."""
    import tomllib

    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = set()
    for base, name in ((repo_root / "mutualkd", "mutualkd"),
                       (repo_root / "plugins" / "mutualkd_builtins", "mutualkd_builtins")):
        for p in base.rglob("__init__.py"):
            if "__pycache__" not in p.parts:
                found.add(".".join((name, *p.parent.relative_to(base).parts)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert {"mutualkd.engine", "mutualkd.testing", "mutualkd.report", "mutualkd.models", "mutualkd.data"} <= listed
