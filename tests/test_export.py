"""``mutualkd export``: a run's peers in timm's Hugging Face layout, loaded back by plain timm.

The end-to-end case trains the quickstart recipe for a few steps, exports its peers and,
in a fresh interpreter that imports only timm, mutualkd (for the CIFAR families and the
digits split) and torch, reproduces the run's recorded test top-1 exactly.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
from typing import Any

import pytest
from safetensors.torch import load_file
import timm
import torch
from typer.testing import CliRunner

from mutualkd import checkpoint as ckpt
from mutualkd.cli import app
from mutualkd.export import export_run

import mutualkd.models  # noqa: F401  (the CIFAR families in timm)

#: The factory fixtures of tests/fixtures/ used here (recipe_dict).
Factory = Callable[..., Any]

#: Run in a fresh interpreter: load exports with plain timm and count the digits test images each gets right.
FRESH = """
import json, sys
import mutualkd, timm, torch   # importing mutualkd registers the CIFAR families in timm
from mutualkd.config import DataConfig
from mutualkd.data import load_dataset

_, test, _ = load_dataset(DataConfig(dataset="digits"))
out = {}
for folder in sys.argv[1:]:
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    assert tuple(test.images.shape[1:]) == tuple(cfg["input_size"])
    with torch.no_grad():
        pred = model((test.images.float() / 255 - mean) / std).argmax(1)
    out[folder] = {"correct": int((pred == test.labels).sum()), "n": len(test)}
print(json.dumps(out))
"""


def _latest(run: Path) -> Path:
    found = ckpt.latest_checkpoint(run / "checkpoints")
    assert found is not None
    return found


# --------------------------------------------------------------------------- layout and config.json
def test_export_writes_timm_layout_with_what_feeding_the_model_needs(tiny_run: Path, tmp_path: Path) -> None:
    done = export_run(tiny_run, tmp_path / "out", peer="peer1")
    assert [d.folder for d in done] == [tmp_path / "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == "cifar_wrn_16_1" and cfg["num_classes"] == 10
    assert cfg["label_names"] == [str(i) for i in range(10)]
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [1, 8, 8] and len(pre["mean"]) == 1 and len(pre["std"]) == 1
    meta = ckpt.read_meta(_latest(tiny_run))
    assert pre["mean"] == pytest.approx(meta["dataset"]["mean"]) and pre["std"] == pytest.approx(meta["dataset"]["std"])
    assert cfg["mutualkd"]["peer"] == "peer1" and cfg["mutualkd"]["global_step"] == 2
    saved = ckpt.load_checkpoint(_latest(tiny_run))["modules"]["peer1"]
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(weights) == set(saved) and all(torch.equal(weights[k], saved[k]) for k in saved)


def test_every_peer_without_peer_and_the_file_path_for_timm(tiny_run: Path, tmp_path: Path) -> None:
    done = export_run(tiny_run, tmp_path / "all")
    assert [d.peer for d in done] == ["peer0", "peer1"]
    path = tmp_path / "all" / "peer0" / "model.safetensors"
    # the other way in: an architecture built by hand, the file as timm's pretrained source
    model = timm.create_model("cifar_resnet20", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                              num_classes=10, in_chans=1)
    saved = ckpt.load_checkpoint(_latest(tiny_run))["modules"]["peer0"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_an_export_is_a_weights_source(tiny_run: Path, tmp_path: Path) -> None:
    from mutualkd.weights import load_network

    export_run(tiny_run, tmp_path / "e", peer="peer0")
    net = load_network(str(tmp_path / "e"), model="cifar_resnet20", num_classes=10, in_chans=1, file="r.toml",
                       field="peers[0].weights")
    saved = ckpt.load_checkpoint(_latest(tiny_run))["modules"]["peer0"]
    assert all(torch.equal(v, saved[k]) for k, v in net.model.state_dict().items())


def test_export_refusals(tiny_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--out", str(tmp_path / "full"), "--peer", "peer0"], "not empty"),
        (["--out", str(tmp_path / "a"), "--peer", "peer7"], "no peer 'peer7'"),
        (["--out", str(tmp_path / "b"), "--checkpoint", "first"], "neither best nor last"),
        (["--out", str(tmp_path / "c"), "--ema"], "no EMA copy"),
    ]
    for extra, says in cases:
        result = runner.invoke(app, ["export", str(tiny_run), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert says in " ".join(result.stderr.split()), (extra, result.stderr)
    assert not (tmp_path / "a").exists() and list((tmp_path / "full").iterdir()) == [tmp_path / "full" / "x"]


def test_best_and_last_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for which in ("best", "last"):
        result = runner.invoke(app, ["export", str(tiny_run), "--peer", "peer0", "--checkpoint", which,
                                     "--out", str(tmp_path / which)])
        assert result.exit_code == 0, result.output
        cfg = json.loads((tmp_path / which / "config.json").read_text())
        want = tiny_run / "checkpoints" / "best" if which == "best" else _latest(tiny_run)
        assert cfg["mutualkd"]["checkpoint"] == str(want)
    copy = tmp_path / "nobest"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "checkpoints" / "best")
    result = runner.invoke(app, ["export", str(copy), "--checkpoint", "best", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no complete best/ checkpoint" in result.stderr


def test_a_peer_with_its_own_normalisation_exports_it(tmp_path: Path, recipe_dict: Factory) -> None:
    """A peer started from weights normalised otherwise keeps that normalisation in its export."""
    from timm.models import save_for_hf

    from mutualkd.config import parse_recipe
    from mutualkd.engine import Trainer
    save_for_hf(timm.create_model("cifar_resnet20", num_classes=10, in_chans=1), str(tmp_path / "init"),
                safe_serialization=True, data_config={"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.25,)})
    d = recipe_dict(tmp_path, name="own", max_steps=1)
    d["peers"][0]["weights"] = str(tmp_path / "init")
    Trainer(parse_recipe(d), recipe_file="<test>").fit()
    export_run(tmp_path / "own", tmp_path / "e", peer="peer0")
    pre = json.loads((tmp_path / "e" / "config.json").read_text())["pretrained_cfg"]
    assert pre["mean"] == [0.5] and pre["std"] == [0.25]


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_export_and_plain_timm_reproduce_the_run_top1(tmp_path: Path, quickstart_recipe: Path) -> None:
    """A quickstart run (2 epochs), exported; plain timm in a fresh process gets the recorded top-1 exactly."""
    from mutualkd.config import load_recipe
    from mutualkd.engine import Trainer

    recipe = load_recipe(quickstart_recipe,
                         [f"run.out_dir={json.dumps(str(tmp_path))}", "run.epochs=2", "run.progress=false"])
    summary = Trainer(recipe, recipe_file=str(quickstart_recipe)).fit()
    run = tmp_path / "quickstart"
    wanted: dict[str, float] = {}
    for which, key in (("last", "final"), ("best", "best")):
        result = CliRunner().invoke(app, ["export", str(run), "--checkpoint", which, "--out", str(tmp_path / which)])
        assert result.exit_code == 0, result.output
        for peer in ("peer0", "peer1"):
            wanted[str(tmp_path / which / peer)] = summary["top1"][peer][key]
    fresh = subprocess.run([sys.executable, "-c", FRESH, *wanted], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert fresh.returncode == 0, fresh.stderr
    got = json.loads(fresh.stdout)
    for folder, recorded in wanted.items():
        assert got[folder]["correct"] == round(recorded * got[folder]["n"] / 100), (folder, got[folder], recorded)
        assert recorded > 50  # a trained peer, not chance
