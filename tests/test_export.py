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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == "cifar_wrn_16_1" and cfg["num_classes"] == 10
    assert cfg["label_names"] == [str(i) for i in range(10)]
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [1, 8, 8] and len(pre["mean"]) == 1 and len(pre["std"]) == 1
    meta = ckpt.read_meta(_latest(tiny_run))
    assert pre["mean"] == pytest.approx(meta["dataset"]["mean"]) and pre["std"] == pytest.approx(meta["dataset"]["std"])
    assert cfg["mutualkd"]["peer"] == "peer1" and cfg["mutualkd"]["global_step"] == 2 and cfg["mutualkd"]["run"] == "tiny"
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
        (["--out", str(tmp_path / "d"), "--license", "MIT License"], "not a license id"),
        (["--out", str(tmp_path / "e"), "--peer", "peer0", "--repo-id", "tiny"], "names no organisation"),
    ]
    for extra, says in cases:
        result = runner.invoke(app, ["export", str(tiny_run), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert says in " ".join(result.stderr.split()), (extra, result.stderr)
    assert not any((tmp_path / n).exists() for n in "ade") and list((tmp_path / "full").iterdir()) == [tmp_path / "full" / "x"]


def test_best_and_last_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for which in ("best", "last"):
        result = runner.invoke(app, ["export", str(tiny_run), "--peer", "peer0", "--checkpoint", which,
                                     "--out", str(tmp_path / which)])
        assert result.exit_code == 0, result.output
        cfg = json.loads((tmp_path / which / "config.json").read_text())
        want = tiny_run / "checkpoints" / "best" if which == "best" else _latest(tiny_run)
        assert cfg["mutualkd"]["checkpoint"] == want.relative_to(tiny_run).as_posix()  # no path of this machine
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


# --------------------------------------------------------------------------- the model card and local paths
def _toml_block(card: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(card.split("```toml\n", 1)[1].split("```", 1)[0])


def test_model_card_front_matter_and_facts_from_the_run(tiny_run: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from mutualkd.config import read_toml
    from mutualkd.model_card import LOCAL_PATH

    runner = CliRunner()
    for which in ("last", "best"):
        result = runner.invoke(app, ["export", str(tiny_run), "--peer", "peer1", "--checkpoint", which, "--license",
                                     "apache-2.0", "--repo-id", "someone/tiny-wrn", "--out", str(tmp_path / which)])
        assert result.exit_code == 0, result.output
    summary = json.loads((tiny_run / "summary.json").read_text())
    for which in ("last", "best"):
        card = ModelCard.load(tmp_path / which / "README.md")
        assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
        assert {"image-classification", "kl_dml"} <= set(card.data.tags) and card.data.datasets is None  # digits: none
        text = card.text
        pre = json.loads((tmp_path / which / "config.json").read_text())["pretrained_cfg"]
        assert "`cifar_wrn_16_1` (timm)" in text and "| input size (channels, height, width) | `1 x 8 x 8` |" in text
        for key in ("mean", "std", "interpolation", "crop_pct"):
            assert f"| {key} | `{json.dumps(pre[key])}` |" in text, key
        assert "Data set: `digits`" in text and "| temperature | `1.0` |" in text and "| reduction | `\"mean\"` |" in text
        top1 = summary["top1"]["peer1"]
        assert f"| end of training | {top1['final']:.2f} | {summary['epochs']} |" in text
        assert f"| best epoch of this network | {top1['best']:.2f} | {top1['best_epoch']} |" in text
        assert 'timm.create_model("hf-hub:someone/tiny-wrn", pretrained=True)' in text and '"local-dir:' in text
        assert "mutualkd run recipe.toml" in text
        recipe = read_toml(tiny_run / "recipe.toml")
        recipe["run"]["out_dir"] = LOCAL_PATH  # the run's out_dir is absolute (a pytest temporary folder)
        assert _toml_block(text) == recipe
    last, best = ((tmp_path / w / "README.md").read_text() for w in ("last", "best"))
    assert f"mutualkd export {LOCAL_PATH}/tiny --peer peer1 --out peer1" in last
    assert "these weights (the last checkpoint)" in last
    assert f"mutualkd export {LOCAL_PATH}/tiny --checkpoint best --peer peer1" in best
    assert f"| {summary['top1_at_best_epoch']['peer1']:.2f} | {summary['best_epoch']} |" in best.split("these weights")[1]


def test_portable_replaces_absolute_paths_only() -> None:
    from mutualkd.model_card import LOCAL_PATH, portable

    data = {"run": {"out_dir": "/srv/runs", "name": "r"}, "peers": [{"weights": "local-dir:/x/e"}, {"weights": "e/p0"}],
            "data": {"root": "~/data", "mean": [0.5]}, "t": "C:\\runs", "labels": ["T-shirt/top", "hf-hub:a/b"]}
    out, keys = portable(data)
    assert keys == ["run.out_dir", "peers[0].weights", "data.root", "t"]
    assert out["run"] == {"out_dir": LOCAL_PATH, "name": "r"} and out["peers"][1]["weights"] == "e/p0"
    assert out["labels"] == ["T-shirt/top", "hf-hub:a/b"] and out["data"]["mean"] == [0.5]


def test_no_exported_file_names_a_path_of_this_machine(tiny_run: Path, tmp_path: Path) -> None:
    """Every exported file is scanned for the run's folder, the test's folders, home and the temporary folder."""
    import tempfile

    from mutualkd.config import read_toml
    from mutualkd.runlog import dump_toml

    run = tmp_path / "home" / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    recipe = read_toml(run / "recipe.toml")  # local paths where recipes hold them: data, a peer's weights
    recipe["data"]["root"] = str(tmp_path / "data")
    recipe["peers"][0]["weights"] = f"local-dir:{tmp_path / 'init'}"
    (run / "recipe.toml").write_text(dump_toml(recipe))
    local = {str(run), str(tiny_run), str(tmp_path), str(Path.home()), tempfile.gettempdir(), str(Path.cwd())}
    assert all(p in (run / "recipe.toml").read_text() for p in (str(tiny_run.parent), str(tmp_path)))
    export_run(run, tmp_path / "all")
    export_run(run / "checkpoints" / "best", tmp_path / "best", peer="peer0")
    files = [f for f in (tmp_path / "all").rglob("*") if f.is_file()] + list((tmp_path / "best").iterdir())
    assert sorted({f.name for f in files}) == ["README.md", "config.json", "model.safetensors"] and len(files) == 9
    for f in files:
        data = f.read_bytes()
        if f.suffix == ".safetensors":  # its header (names, shapes, metadata); the rest is tensor bytes
            data = data[8:8 + int.from_bytes(data[:8], "little")]
        found = [p for p in local if p.encode() in data]
        assert not found, (f, found)
    card = (tmp_path / "all" / "peer0" / "README.md").read_text()
    assert "set `run.out_dir`, `data.root`, `peers[0].weights` to one of yours" in card


# --------------------------------------------------------------------------- from a Hugging Face cache, offline
#: Run in a fresh interpreter with HF_HUB_CACHE and HF_HUB_OFFLINE=1: load hf-hub:REPO with timm and as a teacher.
FROM_HUB = """
import json, socket, sys

def no_network(*a, **k):
    raise AssertionError("a network connection was attempted")

socket.create_connection = socket.socket.connect = no_network
import mutualkd, timm, torch
from safetensors.torch import load_file
from mutualkd.config import DataConfig
from mutualkd.data import load_dataset
from mutualkd.errors import UserError
from mutualkd.weights import load_network

repo, folder = sys.argv[1:]
_, test, _ = load_dataset(DataConfig(dataset="digits"))
model = timm.create_model("hf-hub:" + repo, pretrained=True).eval()
cfg = model.pretrained_cfg
x = (test.images.float() / 255 - torch.tensor(cfg["mean"]).view(1, -1, 1, 1)) / torch.tensor(cfg["std"]).view(1, -1, 1, 1)
local = timm.create_model("local-dir:" + folder, pretrained=True).eval()
teacher = load_network("hf-hub:" + repo, model="cifar_wrn_16_1", num_classes=10, in_chans=1, file="r.toml",
                       field="strategy.teacher")
with torch.no_grad():
    logits, want, taught = model(x), local(x), teacher.model.eval()(x)
saved = load_file(folder + "/model.safetensors")
try:
    load_network("hf-hub:someone/absent", model=None, num_classes=10, in_chans=1, file="r.toml", field="f")
    absent = "loaded"
except UserError as e:
    absent = str(e)
print(json.dumps({"equal": torch.equal(logits, want), "teacher_equal": torch.equal(taught, want),
                  "teacher_weights": all(torch.equal(v, saved[k]) for k, v in teacher.model.state_dict().items()),
                  "teacher_source": teacher.source.kind, "teacher_mean": teacher.mean,
                  "correct": int((logits.argmax(1) == test.labels).sum()), "n": len(test), "absent": absent}))
"""


def test_hf_hub_round_trip_from_a_local_cache_offline(tiny_run: Path, tmp_path: Path, write_hub_entry: Factory,
                                                      subprocess_env: Factory) -> None:
    """The export, placed in a Hugging Face cache by hand, loads as hf-hub:ORG/NAME in timm and as a teacher."""
    export_run(tiny_run, tmp_path / "e", peer="peer1", repo_id="someone/tiny-wrn")
    cache = tmp_path / "hf_home" / "hub"
    write_hub_entry(cache, "someone/tiny-wrn", {
        name: (lambda dst, name=name: shutil.copyfile(tmp_path / "e" / name, dst))
        for name in ("config.json", "model.safetensors", "README.md")})
    env = subprocess_env(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
                         MUTUALKD_ALLOW_DOWNLOAD="1")  # allowed, but offline: nothing may be downloaded
    proc = subprocess.run([sys.executable, "-c", FROM_HUB, "someone/tiny-wrn", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["equal"] and got["teacher_equal"] and got["teacher_weights"] and got["teacher_source"] == "hf_hub"
    pre = json.loads((tmp_path / "e" / "config.json").read_text())["pretrained_cfg"]
    assert got["teacher_mean"] == pre["mean"]  # the teacher is fed the normalisation its weights expect
    recorded = json.loads((tiny_run / "summary.json").read_text())["top1"]["peer1"]["final"]
    assert got["correct"] == round(recorded * got["n"] / 100), (got, recorded)
    absent = " ".join(got["absent"].split())
    assert "'hf-hub:someone/absent'" in absent and "HF_HUB_OFFLINE is set" in absent
    assert str(cache / "models--someone--absent") in absent


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
