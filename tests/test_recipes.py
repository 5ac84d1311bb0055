"""Every recipe in recipes/ is executed for a few steps on CPU, on tiny stand-in data.

CIFAR recipes get a fake CIFAR tree (``write_fake_cifar``), MNIST-like recipes fake IDX
files, image-folder recipes a few PNGs. ``ie_kd`` recipes first get their teacher: the
recipe in recipes/ whose ``run.name`` is the teacher folder's name (or else an
``independent`` run of ``strategy.teacher_model``) is run on the same data, and
``strategy.teacher`` is pointed at it.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import math
from pathlib import Path
import re
import tomllib
from typing import Any

import numpy as np
import pytest

from mutualkd.config import load_recipe
from mutualkd.data import write_idx
from mutualkd.engine import Trainer
from mutualkd.weights import WEIGHT_SUFFIXES

#: The factory fixtures of tests/fixtures/ used here (read_metrics).
Factory = Callable[..., Any]

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # each recipe is a parametrized case (below)
RECIPE_FILES = sorted(RECIPES.glob("**/*.toml"))
#: Folders named after a data set that recipes read through a generic source (image folder, tar shards).
DATA_FOLDERS = {"imagenet": ("image_folder", "image_tar")}
#: Folders that group a family of methods, each holding recipes/<group>/<data set>/ folders.
GROUPS = {"online"}
TINY = [
    "run.max_steps=2",
    "run.epochs=1",
    "run.progress=false",
    "run.log_every=1",
    "data.batch_size=8",
    "data.eval_batch_size=64",
]
# ie_kd: 16 train images in batches of 8 make stage 1 two steps; steps 3-4 train the student.
TINY_KD = ["strategy.ae_epochs=1", "data.train_subset=16", "run.max_steps=4"]


def _raw(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _q(value: str | Path) -> str:
    """A --set value as a TOML string (paths may hold any character)."""
    return json.dumps(str(value))


def _fake_data(kind: str, root: Path, write_fake_cifar: Callable[..., Path]) -> list[str]:
    """Write stand-in data for ``kind`` under ``root`` once; the --set overrides to use it."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / ".written"
    if kind in ("cifar10", "cifar100"):
        if not marker.exists():
            # 256 CIFAR-100 images give every class two or more: a class-balanced recipe can draw its batches.
            write_fake_cifar(root, kind=kind, n_train=64 if kind == "cifar10" else 256, n_test=32)
    elif kind in ("mnist", "fashion_mnist"):
        if not marker.exists():
            rng = np.random.default_rng(0)
            write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (64, 28, 28), dtype=np.uint8))
            write_idx(root / "train-labels-idx1-ubyte", (np.arange(64) % 10).astype(np.uint8))
            write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (32, 28, 28), dtype=np.uint8))
            write_idx(root / "t10k-labels-idx1-ubyte", (np.arange(32) % 10).astype(np.uint8))
    elif kind == "image_folder":
        if not marker.exists():
            from PIL import Image

            rng = np.random.default_rng(0)
            for split, n in (("train", 16), ("test", 4)):
                for c in ("a", "b"):
                    d = root / split / c
                    d.mkdir(parents=True, exist_ok=True)
                    for i in range(n):
                        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    else:
        return []
    marker.touch()
    return [f"data.root={_q(root)}"]


def _teacher_recipe(raw: dict[str, Any]) -> Path | None:
    wanted = Path(str(raw["strategy"]["teacher"])).name
    for p in RECIPE_FILES:
        if _raw(p).get("run", {}).get("name") == wanted:
            return p
    return None


def _run(path: Path, overrides: list[str]) -> Trainer:
    recipe = load_recipe(path, overrides)
    tr = Trainer(recipe, recipe_file=str(path))
    tr.fit()
    return tr


def _check_run(read_metrics: Callable[..., list[dict[str, Any]]], tr: Trainer, max_steps: int
               ) -> list[dict[str, Any]]:
    assert (tr.run_dir / "summary.json").is_file()
    recs = read_metrics(tr.run_dir)
    steps = [r for r in recs if r["kind"] == "step"]
    assert steps and steps[-1]["global_step"] == max_steps
    for r in steps:
        for terms in r["steps"].values():
            assert all(math.isfinite(v) for v in terms.values()), r
    summary = json.loads((tr.run_dir / "summary.json").read_text())
    assert summary["global_steps"] == max_steps
    return recs


#: The recipes that stay at the top of recipes/ (the README and the docs start from them).
TOP_LEVEL = {"quickstart.toml", "ie_dml_wrn.toml"}


def test_recipes_found():
    names = {p.name for p in RECIPE_FILES}
    assert "quickstart.toml" in names
    assert len(RECIPE_FILES) >= 1
    found = {p.relative_to(RECIPES).as_posix() for p in RECIPE_FILES}
    assert {"fashion_mnist/ie_dml.toml", "cifar10/ie_kd_resnet56_resnet20.toml", "cifar10/resnet56_teacher.toml"} <= found


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[str(p.relative_to(RECIPES)) for p in RECIPE_FILES])
def test_recipe_sits_in_the_folder_of_its_data_set(path: Path):
    rel = path.relative_to(RECIPES)
    if len(rel.parts) == 1:
        assert rel.name in TOP_LEVEL, f"move {rel} into recipes/<data set>/ (only {sorted(TOP_LEVEL)} stay on top)"
        return
    dataset = _raw(path).get("data", {}).get("dataset", "digits")
    parts = rel.parts[1:] if rel.parts[0] in GROUPS else rel.parts
    folder_ok = parts[0] == dataset or dataset in DATA_FOLDERS.get(parts[0], ())
    assert len(parts) == 2 and folder_ok, f"{rel} trains on {dataset}: put it in recipes/{dataset}/"


def test_one_recipe_per_set_up():
    """A set-up is a data set with a strategy; two recipes of one set-up are a duplicate to merge."""
    seen: dict[tuple[str, str], Path] = {}
    for path in RECIPE_FILES:
        raw = _raw(path)
        key = (raw.get("data", {}).get("dataset", "digits"), raw.get("strategy", {}).get("name", "kl_dml"))
        assert key not in seen, f"{path.relative_to(RECIPES)} and {seen[key].relative_to(RECIPES)} are both {key}"
        seen[key] = path


def test_recipe_paths_named_in_the_docs_exist():
    """Every recipes/... path the README, CONTRIBUTING, docs/, scripts/ and benchmarks/ name is a file."""
    repo = RECIPES.parent
    files = [repo / "README.md", repo / "CONTRIBUTING.md", repo / "Makefile", *RECIPES.glob("**/*.toml")]
    for folder in ("docs", "scripts", "benchmarks", "plugins"):
        files += [p for p in (repo / folder).glob("**/*") if p.is_file() and p.suffix in (".md", ".sh", ".py", ".toml")]
    missing = []
    for f in files:
        for ref in re.findall(r"recipes/[\w./-]+\.toml", f.read_text(encoding="utf-8", errors="replace")):
            if not (repo / ref).is_file():
                missing.append(f"{f.relative_to(repo)}: {ref}")
    assert not missing, missing


def _expand(pattern: str) -> list[str]:
    """``a/{b,c}.toml`` -> ``a/b.toml``, ``a/c.toml`` (one brace group at a time)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def test_the_readme_recipe_table_lists_every_recipe():
    """Each recipe file is named (or matched by a glob or brace group) in the README's recipe table, and
    every name there is a file: the table cannot drift from the tree."""
    text = (RECIPES.parent / "README.md").read_text(encoding="utf-8")
    table = text.split("| recipe | data | what |", 1)[1].split("\n\n", 1)[0]
    patterns = [p for line in table.splitlines() if line.startswith("|") for p in re.findall(r"`([\w/{},.*-]+\.toml)`", line.split("|")[1])]
    listed: set[str] = set()
    for pattern in patterns:
        matched = {f.relative_to(RECIPES).as_posix() for alt in _expand(pattern) for f in RECIPES.glob(alt)}
        assert matched, f"the README's recipe table names {pattern}, which matches no recipe"
        listed |= matched
    missing = sorted({p.relative_to(RECIPES).as_posix() for p in RECIPE_FILES} - listed)
    assert not missing, f"add these recipes to the README's recipe table: {missing}"


def test_the_readme_states_no_test_count():
    """A count of tests in the README goes stale with the next test; the suite's time is what it gives."""
    text = (RECIPES.parent / "README.md").read_text(encoding="utf-8")
    counts = re.findall(r"\b\d[\d,]* (?:tests|passed|skipped)\b", text)
    assert not counts, f"README.md states test counts {counts}: give the time of `make test` instead"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[str(p.relative_to(RECIPES)) for p in RECIPE_FILES])
def test_recipe_runs(path: Path, tmp_path: Path, write_fake_cifar: Callable[..., Path], read_metrics: Factory):
    raw = _raw(path)
    kind = raw.get("data", {}).get("dataset", "digits")
    data = _fake_data(kind, tmp_path / "data", write_fake_cifar)
    if kind == "image_folder":  # small images; an ImageNet recipe's 224 px at 64 (resnets still end at 2x2)
        data += [f"data.image_size={64 if 'image_size' in raw.get('data', {}) else 12}", "data.num_workers=1"]
    overrides = TINY + data + [f"run.out_dir={_q(tmp_path / 'runs')}"]
    if "images_per_class" in raw.get("data", {}):  # two of each of four classes fill the tiny batch of 8
        overrides.append("data.images_per_class=2")
    strategy = raw.get("strategy", {}).get("name", "kl_dml")
    max_steps = 2
    if strategy == "ie_kd":
        teacher_dir = _make_teacher(raw, data, tmp_path)
        overrides += TINY_KD + [f"strategy.teacher={_q(teacher_dir)}"]
        max_steps = 4
    elif str(raw.get("strategy", {}).get("teacher", "")).endswith(WEIGHT_SUFFIXES):
        # A teacher that is a plain weights file: the test writes one, as any program would.
        overrides.append(f"strategy.teacher={_q(_write_teacher_file(path, raw, overrides, tmp_path))}")
    tr = _run(path, overrides)
    recs = _check_run(read_metrics, tr, max_steps)
    if strategy == "ie_kd":
        stages = [r["stage"] for r in recs if r["kind"] == "step"]
        assert stages == ["teacher_ae", "teacher_ae", "student", "student"]


def _write_teacher_file(path: Path, raw: dict[str, Any], overrides: list[str], tmp_path: Path) -> Path:
    """A timm ``strategy.teacher_model`` for the (fake) data's classes and channels, saved with safetensors."""
    from safetensors.torch import save_file
    import timm

    from mutualkd.data import check_data

    recipe = load_recipe(path, overrides)
    info, _, _ = check_data(recipe.data, seed=recipe.run.seed, peers={})
    model = timm.create_model(raw["strategy"]["teacher_model"], num_classes=info.num_classes, in_chans=info.in_chans)
    out = tmp_path / "teacher" / Path(str(raw["strategy"]["teacher"])).name
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out))
    return out


def _make_teacher(raw: dict[str, Any], data: list[str], tmp_path: Path) -> Path:
    """A teacher run for an ie_kd recipe, on the same (fake) data; returns its run folder."""
    s = raw["strategy"]
    out = tmp_path / "teacher_runs"
    base = TINY + data + [f"run.out_dir={_q(out)}"]
    teacher_recipe = _teacher_recipe(raw)
    if teacher_recipe is not None:
        tr = _run(teacher_recipe, base)
        if s.get("teacher_model"):
            peer = s.get("teacher_peer", 0)
            models = [p.model for p in tr.recipe.peers]
            names = tr.peer_names
            idx = peer if isinstance(peer, int) else names.index(peer)
            assert models[idx] == s["teacher_model"], "the teacher recipe does not train the model the recipe expects"
        return tr.run_dir
    # No teacher recipe: an independent run of the expected teacher architecture.
    model = s.get("teacher_model") or raw["peers"][0]["model"]
    peer = s.get("teacher_peer", 0)
    p = tmp_path / "teacher.toml"
    name_line = f'name = "{peer}"\n' if isinstance(peer, str) and peer != "peer0" else ""
    data_table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in raw.get("data", {}).items())
    p.write_text(
        f'[run]\nname = "teacher"\n\n[data]\n{data_table}\n[[peers]]\nmodel = "{model}"\n{name_line}\n'
        '[strategy]\nname = "independent"\n',
        encoding="utf-8",
    )
    return _run(p, base).run_dir


def test_cifar_recipe_without_data_exits_2(tmp_path, run_cli):
    path = RECIPES / "ie_dml_wrn.toml"
    if not path.exists():
        pytest.skip("recipes/ie_dml_wrn.toml is not written yet")
    raw = _raw(path)
    proc = run_cli(["run", str(path), "--set", "run.progress=false"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    folder = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py"}[raw["data"]["dataset"]]
    assert folder in err and "not found" in err
    files = ("train", "test", "meta") if folder == "cifar-100-python" else ("data_batch_1", "test_batch")
    for f in files:
        assert f"{folder}/{f}" in err
    assert "data.root" in err or "download" in err  # how to fix it
    assert not (tmp_path / "runs").exists()
