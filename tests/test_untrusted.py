"""Loading that cannot run code: planted pickles are refused, named, and never executed.

Each payload is a pickle that, when unpickled, creates a file (``open(path, "w")``). It is
planted as a resume checkpoint (``state.pt`` with its COMPLETE hash recomputed, so the
integrity check passes), as the checkpoint of a teacher run, and as a ``.pth`` teacher
file. Every one is refused with exit 2 and a message naming the file, and the file the
payload would create never appears. A checkpoint holding objects an older writer might
have put there (a path, an ``argparse.Namespace``) is refused the same way, and
``mutualkd convert-checkpoint`` rewrites it once its owner confirms they trust it.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
import hashlib
import io
import json
from pathlib import Path, PurePosixPath
import shutil
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mutualkd import checkpoint as ckpt
from mutualkd.cli import app
from mutualkd.config import parse_recipe
from mutualkd.engine import Trainer
from mutualkd.trust import UnsafeFileError, safe_load
from mutualkd.weights import load_network

import mutualkd.models  # noqa: F401

#: The factory fixtures of tests/fixtures/ used here (recipe_dict).
Factory = Callable[..., Any]


class Payload:
    """Unpickling this calls ``open(target, "w")``: it creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.target, "w"))


def _plant(folder: Path, extra: dict[str, Any]) -> Path:
    """Add ``extra`` to the checkpoint's state.pt and recompute its COMPLETE hash (a careful forgery)."""
    state_file = folder / ckpt.STATE
    state = safe_load(state_file.read_bytes(), file=state_file)
    state.update(extra)
    buf = io.BytesIO()
    torch.save(state, buf)
    state_file.write_bytes(buf.getvalue())
    (folder / ckpt.MARKER).write_text(hashlib.sha256(buf.getvalue()).hexdigest() + "\n")
    assert ckpt.verify_checkpoint(folder) is None  # the integrity check passes
    return state_file


def _planted_run(tiny_run: Path, tmp_path: Path, extra: dict[str, Any]) -> tuple[Path, list[Path]]:
    run = tmp_path / "planted"
    shutil.copytree(tiny_run, run)
    files = [_plant(p, extra) for _, p in ckpt.list_checkpoints(run / "checkpoints")]
    files.append(_plant(run / "checkpoints" / "best", extra))
    return run, files


def _cli(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, input: str | None = None) -> Any:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, input=input)
    return result, " ".join(result.stderr.split())


def test_planted_resume_checkpoint_is_refused(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pwned-resume"
    run, files = _planted_run(tiny_run, tmp_path, {"x": Payload(target)})
    result, err = _cli(["run", "--resume", str(run), "--set", "run.max_steps=4"], tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert str(files[-2]) in err  # the newest step checkpoint's state.pt, by its full path
    assert "io.open" in err and "could run code" in err and "convert-checkpoint" in err
    assert "Traceback" not in result.output
    assert not target.exists()


def test_planted_teacher_run_is_refused(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        recipe_dict: Factory) -> None:
    target = tmp_path / "pwned-teacher"
    run, files = _planted_run(tiny_run, tmp_path, {"x": Payload(target)})
    d = recipe_dict(tmp_path / "runs", peers=["cifar_resnet20"],
                    strategy={"name": "ie_kd", "teacher": str(run), "ae_epochs": 1})
    from mutualkd.runlog import dump_toml

    (tmp_path / "kd.toml").write_text(dump_toml(d))
    result, err = _cli(["run", str(tmp_path / "kd.toml")], tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert str(files[-2]) in err and "[strategy.teacher]" in err
    assert not target.exists() and not (tmp_path / "runs" / "t").exists()


def test_planted_pth_teacher_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe_dict: Factory) -> None:
    target = tmp_path / "pwned-pth"
    sd = __import__("timm").create_model("cifar_resnet20", num_classes=10, in_chans=1).state_dict()
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": sd, "x": Payload(target)}, path)
    d = recipe_dict(tmp_path / "runs", peers=["cifar_resnet20"],
                    strategy={"name": "ie_kd", "teacher": str(path), "teacher_model": "cifar_resnet20", "ae_epochs": 1})
    from mutualkd.runlog import dump_toml

    (tmp_path / "kd.toml").write_text(dump_toml(d))
    result, err = _cli(["run", str(tmp_path / "kd.toml")], tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    assert str(path) in err and "pickled objects other than tensors" in err and "[strategy.teacher]" in err
    assert not target.exists()
    # the same file as a peer's weights, and a planted run exported: refused too
    with pytest.raises(UnsafeFileError):
        load_network(str(path), model="cifar_resnet20", num_classes=10, in_chans=1, file="r.toml", field="peers[0].weights")
    assert not target.exists()


def test_planted_run_is_not_exported(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pwned-export"
    run, files = _planted_run(tiny_run, tmp_path, {"x": Payload(target)})
    result, err = _cli(["export", str(run), "--out", str(tmp_path / "out")], tmp_path, monkeypatch)
    assert result.exit_code == 2 and str(files[-2]) in err
    assert not target.exists() and not (tmp_path / "out").exists()


def test_objects_of_an_older_writer_are_refused_then_converted_when_trusted(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe_dict: Factory) -> None:
    extra = {"strategy": {"where": PurePosixPath("/data/runs"), "args": Namespace(lr=0.1)}}
    run, files = _planted_run(tiny_run, tmp_path, extra)
    result, err = _cli(["run", "--resume", str(run), "--set", "run.max_steps=3"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and str(files[-2]) in err
    assert "pathlib" in err and f"mutualkd convert-checkpoint {files[-2].parent}" in err
    # no confirmation: nothing changes
    before = files[0].read_bytes()
    result, _ = _cli(["convert-checkpoint", str(run)], tmp_path, monkeypatch, input="no\n")
    assert result.exit_code == 2 and files[0].read_bytes() == before
    result, _ = _cli(["convert-checkpoint", str(run)], tmp_path, monkeypatch, input="yes\n")
    assert result.exit_code == 0, result.output
    for f in files:
        state = safe_load(f.read_bytes(), file=f)  # loads safely now, values kept as plain ones
        assert state["strategy"] == {"where": "/data/runs", "args": {"lr": 0.1}}
        assert ckpt.verify_checkpoint(f.parent) is None and ckpt.read_meta(f.parent)["global_step"] >= 1
    result, _ = _cli(["convert-checkpoint", str(run), "--trust"], tmp_path, monkeypatch)
    assert result.exit_code == 0 and "already loads safely" in result.output
    # and the converted run resumes
    recipe = parse_recipe(json.loads(json.dumps(recipe_dict(tiny_run.parent, name="tiny", max_steps=3))))
    tr = Trainer(recipe, recipe_file="<test>", resume=run)
    assert tr.resumed_from == files[-2].parent
    assert tr.fit()["global_steps"] == 2  # the run had finished: nothing left to train


def test_what_mutualkd_writes_loads_with_weights_only(tiny_run: Path) -> None:
    """The allow-list is exactly what a checkpoint holds besides torch's own types (NumPy's RNG state)."""
    data = (_latest := ckpt.latest_checkpoint(tiny_run / "checkpoints")) and (_latest / ckpt.STATE).read_bytes()
    assert data
    names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    assert set(names) <= {"numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                          "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"}
    state = safe_load(data, file=Path("state.pt"))
    assert set(state) >= {"modules", "optimizers", "rng", "position"}
