"""EMA peers: timm's ModelEmaV3 of each peer, evaluated, saved, restored exactly, exported."""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from mutualkd import checkpoint as ckpt
from mutualkd.engine import Callback
from mutualkd.runlog import dump_toml

#: The factory fixtures of tests/fixtures/ used here (make_trainer, recipe_dict, read_metrics, run_cli, ...).
Factory = Callable[..., Any]


class _PeerWeights(Callback):
    """A copy of one tensor of peer0 after every batch (runs after the engine's callbacks)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.seen: list[torch.Tensor] = []

    def on_batch_end(self, trainer: Any, result: Any) -> None:
        self.seen.append(trainer.unwrapped("peer0").model.state_dict()[self.key].detach().clone())


def test_ema_follows_timms_average_after_every_update(tmp_path: Path, make_trainer: Factory):
    t = make_trainer(tmp_path, name="e", max_steps=5, ema={"decay": 0.7})
    key = "conv1.weight" if "conv1.weight" in t.unwrapped("peer0").model.state_dict() else next(
        iter(t.unwrapped("peer0").model.state_dict()))
    rec = _PeerWeights(key)
    t.add_callback(rec)
    t.fit()
    # timm: the first update copies the peer, then ema = 0.7 * ema + 0.3 * peer
    want = rec.seen[0]
    for w in rec.seen[1:]:
        want = 0.7 * want + 0.3 * w
    got = t.ema.model("peer0").state_dict()[key]
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, rec.seen[-1])  # an average, not the peer
    assert t.ema.updates == {"peer0": 5, "peer1": 5}


def test_ema_peers_are_evaluated_next_to_the_raw_ones(tmp_path: Path, make_trainer: Factory, recipe_dict: Factory,
                                                      read_metrics: Factory):
    plain = make_trainer(tmp_path, name="plain", max_steps=3)
    plain.fit()
    from mutualkd.config import parse_recipe
    from mutualkd.engine import Trainer

    d = recipe_dict(tmp_path, name="ema", max_steps=3, ema={"decay": 0.5})
    d["peers"][1]["ema"] = {"decay": 0.9, "warmup": True}  # a peer's own table over the shared one
    t = Trainer(parse_recipe(d, file="<test>"), recipe_file="<test>")
    summary = t.fit()
    top1 = read_metrics(tmp_path / "ema")[-1]["top1"]
    assert set(top1) == {"peer0", "peer1", "ensemble", "peer0_ema", "peer1_ema"}
    assert set(summary["top1"]) == set(top1)
    # EMA copies change nothing of the training, and the ensemble stays the raw peers'
    base = read_metrics(tmp_path / "plain")[-1]["top1"]
    assert {k: top1[k] for k in base} == base
    assert t.ema.emas["peer0"].decay == 0.5 and t.ema.emas["peer1"].use_warmup
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ema" / "checkpoints"))
    assert state["callbacks"]["ema"]["peer1"]["updates"] == 3


def test_no_ema_table_no_copies(tmp_path: Path, make_trainer: Factory):
    t = make_trainer(tmp_path, name="n", max_steps=1)
    assert not t.ema and t.eval_models == {}
    t.fit()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "n" / "checkpoints"))
    assert "ema" not in state["callbacks"]


def test_export_writes_the_ema_copy_as_a_timm_checkpoint(tmp_path: Path, make_trainer: Factory, run_cli: Factory):
    import timm
    from safetensors.torch import load_file

    import mutualkd.models  # noqa: F401  (registers cifar_resnet20 with timm)

    t = make_trainer(tmp_path, name="x", max_steps=3, ema={"decay": 0.5})
    t.fit()
    out = tmp_path / "exported"
    proc = run_cli(["export", str(tmp_path / "x"), "--peer", "peer0", "--ema", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = timm.create_model(f"local-dir:{out}", pretrained=True)  # timm's own loader, the export's layout
    for k, v in t.ema.model("peer0").state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # the raw peer is another export; a run without EMA has no EMA copy to export
    raw = run_cli(["export", str(tmp_path / "x"), "--out", str(tmp_path / "raw")], timeout=120)
    assert raw.returncode == 0, raw.stderr
    assert not torch.equal(load_file(str(tmp_path / "raw" / "peer0" / "model.safetensors"))["conv1.weight"],
                           model.state_dict()["conv1.weight"])
    make_trainer(tmp_path, name="noema", max_steps=1).fit()
    bad = run_cli(["export", str(tmp_path / "noema"), "--ema", "--out", str(tmp_path / "bad")], timeout=120)
    assert bad.returncode == 2 and "no EMA copy" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- SIGKILL and resume


def _recipe_file(recipe_dict: Factory, tmp_path: Path, name: str) -> Path:
    d = recipe_dict(tmp_path, name=name, max_steps=None, epochs=2, batch_size=16, log_every=4,
                    run={"checkpoint_every": 4, "deterministic": True}, data={"train_subset": 256, "test_subset": 32},
                    ema={"decay": 0.9, "warmup": True})
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_toml(d), encoding="utf-8")
    return path


def _final_state(run_dir: Path) -> dict[str, Any]:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"))


@pytest.mark.slow
def test_ema_resumes_bit_identical_after_sigkill(tmp_path: Path, recipe_dict: Factory, run_cli: Factory,
                                                 subprocess_env: Factory, read_metrics: Factory):
    ref = run_cli(["run", str(_recipe_file(recipe_dict, tmp_path, "ref"))], timeout=300)
    assert ref.returncode == 0, ref.stderr

    recipe = _recipe_file(recipe_dict, tmp_path, "killed")
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mutualkd", "run", str(recipe)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    # SIGKILL once the first mid-epoch checkpoint (step 8) is complete, while the run goes on
    while not (run_dir / "checkpoints" / "step-00000008" / ckpt.MARKER).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "summary.json").exists(), "killed before the end"

    again = run_cli(["run", "--resume", str(run_dir)], timeout=300)
    assert again.returncode == 0, again.stderr
    a, b = _final_state(tmp_path / "ref"), _final_state(run_dir)
    assert a["position"] == b["position"]
    ema_a, ema_b = a["callbacks"]["ema"], b["callbacks"]["ema"]
    assert set(ema_a) == set(ema_b) == {"peer0", "peer1"}
    for peer in ema_a:
        assert ema_a[peer]["updates"] == ema_b[peer]["updates"] == a["position"]["global_step"]
        for k, v in ema_a[peer]["module"].items():
            assert torch.equal(v, ema_b[peer]["module"][k]), f"{peer} EMA {k}"
        for k, v in a["modules"][peer].items():
            assert torch.equal(v, b["modules"][peer][k]), f"{peer} {k}"
    assert read_metrics(tmp_path / "ref")[-1]["top1"] == read_metrics(run_dir)[-1]["top1"]
