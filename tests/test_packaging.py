"""The wheel: entry points of the built-in plugins, package layout, py.typed, dependencies.

The wheel is built from a copy of the sources in a temporary folder, so the build leaves
nothing (build/, *.egg-info) in the working tree.
"""

from __future__ import annotations

import ast
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
from packaging.utils import canonicalize_name
from packaging.version import Version


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
    """save_for_hf(data_config=), used by mutualkd export, first shipped in timm 1.0.31."""
    reqs = {r.name: r for r in _installed_requires(wheel, names, tmp_path)}
    assert not reqs["timm"].specifier.contains("1.0.30") and reqs["timm"].specifier.contains("1.0.31")
    assert "data_config=data_config" in (repo_root / "mutualkd" / "export.py").read_text(encoding="utf-8")


#: Each dependency's floor and the reason it may not drop (pyproject.toml gives the same reasons).
FLOORS = {
    "torch": "2.5",  # torch.serialization.safe_globals: every checkpoint load (mutualkd/trust.py)
    "torchvision": "0.20",  # built for torch 2.5
    "timm": "1.0.31",  # save_for_hf(data_config=)
    "accelerate": "0.34",
    "pydantic": "2.0.1",  # 2.0 refuses Field twice on an Annotated field
    "rich": "12",  # MofNCompleteColumn
    "typer": "0.16",  # older releases crash on --help with click 8.2
    "scikit-learn": "1.4.2",  # the first built for NumPy 2
    "numpy": "1.23.2",
    "huggingface-hub": "0.21",
    "pillow": "9.2",  # Image.Resampling
    "safetensors": "0.4.3",
    "tomli-w": "1.0",
}


def _by_extra(reqs: list[Requirement]) -> dict[str | None, dict[str, Requirement]]:
    """{extra or None for the core: {canonical name: requirement}}."""
    out: dict[str | None, dict[str, Requirement]] = {}
    for r in reqs:
        extra = None
        if r.marker is not None:
            m = re.search(r'extra == "([^"]+)"', str(r.marker))
            extra = canonicalize_name(m.group(1)) if m else None  # metadata normalises extras (PEP 685)
        out.setdefault(extra, {})[canonicalize_name(r.name)] = r
    return out


def _floor(req: Requirement) -> str | None:
    found = [s.version for s in req.specifier if s.operator == ">="]
    return found[0] if len(found) == 1 else None


def test_floors_hold(wheel, names, tmp_path):
    """The floors in the installed metadata are the ones the code needs: none drops below the
    release that brought an API mutualkd uses, and no requirement caps a release."""
    reqs = _installed_requires(wheel, names, tmp_path)
    core = _by_extra(reqs)[None]
    for name, floor in FLOORS.items():
        assert name in core, f"{name} is not a dependency"
        assert _floor(core[name]) is not None and Version(_floor(core[name])) == Version(floor), \
            f"{name}: {core[name].specifier}, expected >={floor}"
    assert not core["torch"].specifier.contains("2.4.1") and not core["typer"].specifier.contains("0.15.4")
    assert not core["scikit-learn"].specifier.contains("1.3.2") and not core["timm"].specifier.contains("1.0.29")
    for r in reqs:
        assert all(s.operator in (">=", "!=") for s in r.specifier), f"{r} caps a release"


def test_trackers_extras_bring_the_accelerate_that_ships_them(wheel, names, tmp_path):
    """swanlab and trackio came after the accelerate floor: their extras require the release with them."""
    from mutualkd.engine.tracking import TRACKER_EXTRAS, TRACKER_MIN_ACCELERATE

    extras = _by_extra(_installed_requires(wheel, names, tmp_path))
    for tracker, (extra, _) in TRACKER_EXTRAS.items():
        assert canonicalize_name(extra) in extras, f"no extra '{extra}' for the {tracker} tracker"
    for tracker, need in TRACKER_MIN_ACCELERATE.items():
        acc = extras[canonicalize_name(TRACKER_EXTRAS[tracker][0])].get("accelerate")
        assert acc is not None and Version(_floor(acc) or "0") >= Version(need), f"{tracker}: accelerate>={need}"
    assert Version(_floor(extras[None]["accelerate"]) or "0") < min(Version(v) for v in TRACKER_MIN_ACCELERATE.values())
    aim = extras["aim"]["aim"]
    assert aim.marker is not None and not aim.marker.evaluate({"python_version": "3.13", "extra": "aim"}), \
        "aim has no release for Python 3.13: its extra must not ask for one there"


def _lowest_pins(repo_root: Path) -> dict[str, str]:
    pins = {}
    for line in (repo_root / "constraints" / "lowest.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(r.name)] = spec.version
    return pins


def test_lowest_constraints_pin_the_floors(repo_root):
    """constraints/lowest.txt (what .ci/lowest installs) pins every core dependency but torch and
    torchvision, and the dev and report extras, at the floor pyproject.toml declares."""
    import tomllib

    project = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _lowest_pins(repo_root)
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in ("dev", "report"):
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for r in wanted:
        name = canonicalize_name(r.name)
        if name in ("torch", "torchvision"):
            assert name not in pins, f"{name} stays at the tested release (constraints/dev.txt)"
            continue
        assert name in pins, f"constraints/lowest.txt does not pin {name}"
        assert Version(pins[name]) >= Version(_floor(r) or "0") and r.specifier.contains(pins[name]), (r, pins[name])
        if not name == "setuptools":
            assert Version(pins[name]).release[:len(Version(_floor(r)).release)] == Version(_floor(r)).release, \
                f"constraints/lowest.txt pins {name}=={pins[name]}, not the floor {r.specifier}"


#: Import names whose distribution is named otherwise.
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "tomli_w": "tomli-w",
    "huggingface_hub": "huggingface-hub",
    "pydantic_core": "pydantic",  # pydantic pins its own core release exactly
    "mlflow": "mlflow-skinny",
}


def _third_party_imports(files: list[Path], local: set[str]) -> dict[str, list[str]]:
    """{top-level module: [file:line, ...]} of the absolute imports in ``files`` that are neither the
    standard library nor ``local``."""
    found: dict[str, list[str]] = {}
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, []).append(f"{f.name}:{node.lineno}")
    return found


def test_every_third_party_import_is_declared(repo_root):
    """Each library that mutualkd/, the built-in plugins or the study scripts import is a dependency
    or in an extra (an optional one is imported inside the function that needs it)."""
    import tomllib

    project = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    extras = {extra: {canonicalize_name(Requirement(r).name) for r in reqs}
              for extra, reqs in project["optional-dependencies"].items()}
    optional = set().union(*extras.values())

    package = sorted((repo_root / "mutualkd").rglob("*.py")) + sorted((repo_root / "plugins" / "mutualkd_builtins").rglob("*.py"))
    scripts = sorted((repo_root / "scripts").glob("*.py"))
    local = {"mutualkd", "mutualkd_builtins"}
    missing = []
    for files, allowed, where in ((package, core | optional, "dependencies or an extra"),
                                  (scripts, core | optional, "an extra (e.g. study)")):
        for top, at in sorted(_third_party_imports(files, local | {f.stem for f in scripts}).items()):
            dist = canonicalize_name(DISTRIBUTION_OF.get(top, top))
            if dist not in allowed:
                missing.append(f"{top} (distribution {dist}, imported at {', '.join(at[:3])}): add it to {where}")
    assert not missing, "\n".join(missing)
    # What the core imports at module level must be a core dependency, not only an extra.
    for top in ("torch", "timm", "accelerate", "numpy", "pydantic", "rich", "typer", "tomli_w", "PIL", "sklearn",
                "huggingface_hub"):
        assert canonicalize_name(DISTRIBUTION_OF.get(top, top)) in core, top
    assert "scipy" in extras.get("study", set()), "scripts/study_stats.py imports scipy: the study extra brings it"


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
