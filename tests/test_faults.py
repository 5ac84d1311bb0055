"""Fault injection: nothing a run has written is lost, whatever fails and wherever.

Each test first makes the fault happen, at a named point, then checks what is left and
that a resume ends exactly where an uninterrupted run ends (the reference runs of the
launch_kit fixture, tests/fixtures/launch.py, as in test_resume: digits, 2 epochs of 10
steps, a checkpoint every 3 steps).

* kills inside the renames of a checkpoint swap (``best/`` and step checkpoints), in a
  forked writer (every point, fast) and in real runs (SIGKILL from inside the process at
  that point, then ``mutualkd run --resume``);
* a stop signal to one rank of a two-process run; a lost (stopped) rank;
* two writers on one run folder, and the workers a killed launcher leaves behind;
* a full file system (a tmpfs when this user may mount one; a file-size limit otherwise);
* ``metrics.jsonl`` deleted, cut short or changed before a resume; a checkpoint that does
  not load; a run killed before its first checkpoint;
* hostile input: every case exits 2 with one message naming the file or the field.

Run alone: ``.venv/bin/python -m pytest tests/test_faults.py`` (``-m "not slow"`` for the
in-process cases only, a few seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
from dataclasses import dataclass, field as dc_field
import json
import os
from pathlib import Path
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from typing import Any
import zlib

import pytest
import torch
from typer.testing import CliRunner

from mutualkd import checkpoint as ckpt
from mutualkd.cli import app
from mutualkd.config import load_recipe
from mutualkd.runlock import RunFolderBusy, RunLock
from mutualkd.errors import CheckpointError
from mutualkd.runlog import MetricsWriter, dump_toml

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
LEFTOVER = (ckpt.TMP_PREFIX, ckpt.OLD_PREFIX)
#: The launch_kit fixture (tests/fixtures/launch.py): starts, kills and compares runs.
Kit = Any


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(LEFTOVER))


def assert_best_matches_summary(kit: Kit, run_dir: Path, reference: Path) -> None:
    """best/ loads, holds the epoch summary.json names, and equals the uninterrupted run's best/."""
    summary = json.loads((run_dir / "summary.json").read_text())
    best = run_dir / "checkpoints" / "best"
    assert ckpt.verify_checkpoint(best) is None, ckpt.verify_checkpoint(best)
    assert ckpt.read_meta(best)["epoch"] == summary["best_epoch"] > 0, (ckpt.read_meta(best), summary)
    want = ckpt.load_checkpoint(reference / "checkpoints" / "best")
    kit.assert_equal_tree(ckpt.load_checkpoint(best)["modules"], want["modules"], "best/modules")


# =========================================================================== checkpoint swaps, every kill point

STATE_OLD = {"w": torch.zeros(4), "step": 1}
STATE_NEW = {"w": torch.ones(4), "step": 2}


def _meta(step: int) -> dict[str, Any]:
    return {"kind": "step", "global_step": step, "epoch": 0}


def _kill_inside_save(dest: Path, point: str) -> int:
    """Write STATE_NEW to ``dest`` in a forked child that SIGKILLs itself at ``point``; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            real_replace, real_rmtree, real_fsync = os.replace, shutil.rmtree, os.fsync
            calls = {"replace": 0}

            def die() -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            def replace(src: Any, dst: Any) -> None:
                aside = Path(dst).name.startswith(ckpt.OLD_PREFIX)
                if (point == "before-aside" and aside) or (point == "before-rename" and not aside):
                    die()
                real_replace(src, dst)
                if (point == "between-renames" and aside) or (point == "after-rename" and not aside):
                    die()

            def rmtree(path: Any, *a: Any, **k: Any) -> None:
                if point == "inside-rmtree" and Path(path).name.startswith(ckpt.OLD_PREFIX):
                    os.unlink(Path(path) / ckpt.MARKER)  # half deleted
                    die()
                real_rmtree(path, *a, **k)

            def fsync(fd: int) -> None:
                real_fsync(fd)
                if point == "writing-state" and os.readlink(f"/proc/self/fd/{fd}").endswith(ckpt.STATE):
                    die()

            os.replace, shutil.rmtree, os.fsync = replace, rmtree, fsync
            ckpt.save_checkpoint(dest, STATE_NEW, _meta(2))
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


SWAP_POINTS = ["writing-state", "before-aside", "between-renames", "before-rename", "after-rename", "inside-rmtree"]


@pytest.mark.parametrize("name", ["best", "step-00000002"])
@pytest.mark.parametrize("point", SWAP_POINTS)
def test_kill_at_every_point_of_a_swap_leaves_a_complete_checkpoint(tmp_path: Path, point: str, name: str) -> None:
    """Replacing a checkpoint, killed at each point: after restore_leftovers the destination is
    complete and holds the newest checkpoint that was complete when the kill came."""
    dest = tmp_path / "checkpoints" / name
    ckpt.save_checkpoint(dest, STATE_OLD, _meta(1))
    status = _kill_inside_save(dest, point)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the writer was not killed at {point}"
    notes = ckpt.restore_leftovers(dest.parent)
    assert ckpt.verify_checkpoint(dest) is None, (point, sorted(p.name for p in dest.parent.iterdir()))
    new_was_complete = point not in ("writing-state",)
    want = STATE_NEW if new_was_complete else STATE_OLD
    assert torch.equal(ckpt.load_checkpoint(dest)["w"], want["w"]), point
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(LEFTOVER)], "leftovers were not cleaned"
    # put in place when the newer one had been written to the end but not renamed
    assert bool(notes) == (point in ("before-aside", "between-renames", "before-rename")), notes


@pytest.mark.parametrize("point", ["writing-state", "before-rename", "after-rename"])
def test_kill_during_a_first_write_leaves_nothing_half_written(tmp_path: Path, point: str) -> None:
    dest = tmp_path / "checkpoints" / "best"
    (tmp_path / "checkpoints").mkdir()
    status = _kill_inside_save(dest, point)
    assert os.WIFSIGNALED(status)
    ckpt.restore_leftovers(dest.parent)
    if point == "writing-state":
        assert not dest.exists()
    else:  # the new checkpoint was complete: it is put in place
        assert ckpt.verify_checkpoint(dest) is None and torch.equal(ckpt.load_checkpoint(dest)["w"], STATE_NEW["w"])
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(LEFTOVER)]


def test_a_damaged_destination_is_set_aside_when_a_complete_copy_exists(tmp_path: Path) -> None:
    dest = tmp_path / "checkpoints" / "best"
    ckpt.save_checkpoint(dest, STATE_OLD, _meta(1))
    assert os.WIFSIGNALED(_kill_inside_save(dest, "before-aside"))  # a finished .tmp-best-* beside best/
    (dest / ckpt.MARKER).write_text("")  # and best/ itself damaged
    ckpt.restore_leftovers(dest.parent)
    assert torch.equal(ckpt.load_checkpoint(dest)["w"], STATE_NEW["w"])
    assert [p.name.split("-")[0] for p in dest.parent.iterdir() if p.name.startswith(".invalid-")] == [".invalid"]


def test_pruning_after_a_resume_from_an_older_checkpoint_keeps_the_new_one(tmp_path: Path) -> None:
    """Resumed from an older checkpoint while steps 6 and 9 of the first attempt exist: the step-4 checkpoint
    just written is not pruned for being the oldest; 6 and 9 stay until written again."""
    for step in (3, 6, 9, 4):
        ckpt.save_checkpoint(tmp_path / f"step-{step:08d}", {"w": torch.ones(1)}, _meta(step))
        ckpt.prune_checkpoints(tmp_path, 2, upto=step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6, 9]


# =========================================================================== the marker, meta.json, the disk


def test_a_marker_without_the_hash_makes_the_checkpoint_incomplete(tmp_path: Path) -> None:
    """`touch COMPLETE` on a damaged checkpoint: it is not loaded (it used to load without a word)."""
    dest = ckpt.save_checkpoint(tmp_path / "step-00000001", {"w": torch.ones(3)}, _meta(1))
    data = bytearray((dest / ckpt.STATE).read_bytes())
    data[-40] ^= 0xFF  # a damaged weight
    (dest / ckpt.STATE).write_bytes(bytes(data))
    for marker in ("", "\n", "abc\n", "0" * 63 + "\n"):
        (dest / ckpt.MARKER).write_text(marker)
        assert not ckpt.is_complete(dest) and ckpt.list_checkpoints(tmp_path) == []
        with pytest.raises(CheckpointError, match="incomplete"):
            ckpt.load_checkpoint(dest)


@pytest.mark.parametrize("meta, says", [
    ([1, 2], "not an object"),
    ({"kind": "step"}, "no field 'global_step'"),
    ({"kind": "step", "global_step": "7"}, "'global_step' is str"),
    ({"kind": "step", "global_step": True}, "'global_step' is bool"),
    ({"kind": "step", "global_step": 1, "num_processes": 1.5}, "'num_processes' is float"),
    ({"kind": "step", "global_step": 1, "peers": {"p": "resnet"}}, "'peers' must map"),
])
def test_meta_json_of_the_wrong_shape_is_refused_naming_the_field(tmp_path: Path, meta: Any, says: str) -> None:
    dest = ckpt.save_checkpoint(tmp_path / "step-00000001", {"w": torch.ones(1)}, _meta(1))
    (dest / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as ei:
        ckpt.read_meta(dest)
    assert says in str(ei.value) and "meta.json" in str(ei.value)
    assert ckpt.list_checkpoints(tmp_path) == [] and says in (ckpt.checkpoint_problem(dest) or "")


def test_a_write_that_fails_keeps_the_old_checkpoint_and_leaves_nothing(tmp_path: Path) -> None:
    """A write refused by the kernel (here the file-size limit: EFBIG, the path ENOSPC takes):
    a CheckpointError naming the checkpoint, the old one intact, no .tmp-* left."""
    dest = ckpt.save_checkpoint(tmp_path / "checkpoints" / "best", STATE_OLD, _meta(1))
    big = {"w": torch.ones(1 << 20)}  # 4 MiB
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
            try:
                ckpt.save_checkpoint(dest, big, _meta(2))
                msg = "written"
            except CheckpointError as e:
                msg = str(e)
            os.write(write, msg.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    assert "cannot write checkpoint best" in msg and "File too large" in msg and "kept" in msg, msg
    assert ckpt.verify_checkpoint(dest) is None and torch.equal(ckpt.load_checkpoint(dest)["w"], STATE_OLD["w"])
    assert sorted(p.name for p in dest.parent.iterdir()) == ["best"]


# =========================================================================== metrics.jsonl


def _log(path: Path, n: int) -> tuple[MetricsWriter, int, bytes]:
    w = MetricsWriter(path)
    for i in range(n):
        w.write({"kind": "step", "global_step": i + 1})
    return w, w.offset(), w.snapshot()


@pytest.mark.parametrize("damage", ["none", "deleted", "cut-short", "empty", "changed", "longer"])
def test_metrics_log_is_brought_back_to_the_checkpoint(tmp_path: Path, damage: str) -> None:
    """The file is cut back to the checkpoint's offset, or rewritten from the checkpoint's copy;
    never padded with NUL bytes, never left short."""
    path = tmp_path / "metrics.jsonl"
    w, offset, copy = _log(path, 5)
    w.write({"kind": "step", "global_step": 6})  # logged after the checkpoint
    w.close()
    good = path.read_bytes()[:offset]
    if damage == "deleted":
        path.unlink()
    elif damage == "cut-short":
        path.write_bytes(good[: offset // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "changed":
        path.write_bytes(good.replace(b'"global_step": 2', b'"global_step": 9'))
    w = MetricsWriter(path)
    note = w.resume(offset, copy, "step-00000005")
    w.write({"kind": "step", "global_step": 6})
    w.close()
    text = path.read_bytes()
    assert b"\x00" not in text
    assert text == good + b'{"kind": "step", "global_step": 6}\n'
    assert (note is None) == (damage in ("none", "longer")), note
    if damage == "changed":
        assert (tmp_path / "metrics.jsonl.replaced").exists() and "differed" in note


def test_metrics_log_is_fsynced_before_each_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       make_trainer: Callable[..., Any]) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tr = make_trainer(tmp_path, max_steps=3, run={"checkpoint_every": 1}, data={"test_subset": 20, "train_subset": 64})
    tr.fit()
    states = [i for i, name in enumerate(synced) if name == ckpt.STATE]
    assert len(states) >= 3, synced
    for i in states:
        assert "metrics.jsonl" in synced[:i][-3:], f"no fsync of metrics.jsonl right before a checkpoint: {synced}"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "t" / "checkpoints"))
    assert zlib.decompress(state["metrics_log"]) == (tmp_path / "t" / "metrics.jsonl").read_bytes()[: state["metrics_offset"]]


# =========================================================================== the lock


def test_one_lock_per_run_folder(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunFolderBusy) as ei:
        second.acquire()
    assert str(tmp_path) in str(ei.value) and "fix:" in str(ei.value)
    first.release()
    second.acquire()  # free again once the holder lets go
    second.release()
    assert list(tmp_path.iterdir()) == [], "the lock writes no file"


# =========================================================================== recipes written by the run


def test_a_recipe_with_any_unicode_is_written_as_valid_toml(tmp_path: Path, recipe_dict: Callable[..., dict[str, Any]]
                                                            ) -> None:
    """Non-BMP characters (emoji), control characters and quotes round-trip through recipe.toml.

    Names that become folders hold no control characters or separators (tests/test_hostile_inputs.py);
    a free-text value (a plugin name to block) may hold anything.
    """
    import tomllib

    d = recipe_dict(tmp_path, name="dml-\U0001f98a", max_steps=1, data={"test_subset": 20, "train_subset": 32})
    d["peers"][0]["name"] = "fox-\U0001f98a"
    d["run"]["block_plugins"] = ['fox \U0001f98a "q" \\ \x01']
    path = tmp_path / "in.toml"
    path.write_text(dump_toml(d), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path)], env=ENV)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "dml-\U0001f98a"
    saved = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))
    assert saved["peers"][0]["name"] == d["peers"][0]["name"]
    assert saved["run"]["block_plugins"] == d["run"]["block_plugins"]
    again = load_recipe(run_dir / "recipe.toml")  # what --resume RUN_DIR and mutualkd report read
    meta = ckpt.read_meta(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert ckpt.recipe_hash(again.to_dict()) == meta["recipe_hash"]


# =========================================================================== hostile input: exit 2, one message


@dataclass
class Hostile:
    args: list[str]
    names: list[str] = dc_field(default_factory=list)  # files or folders the message names
    field: str | None = None  # the TOML path, as "[field]"
    says: list[str] = dc_field(default_factory=list)


@dataclass
class Tools:
    """What each builder below gets beside its folder: the ``recipe_dict`` and ``set_options`` fixtures."""

    recipe_dict: Callable[..., dict[str, Any]]
    sets: Callable[..., list[str]]


def _good(t: Path, tools: Tools, **run: Any) -> dict[str, Any]:
    return tools.recipe_dict(t / "runs", max_steps=1, run=run, data={"train_subset": 32, "test_subset": 20})


def _write(t: Path, d: dict[str, Any] | str, name: str = "recipe.toml") -> Path:
    path = t / name
    path.write_text(d if isinstance(d, str) else dump_toml(d), encoding="utf-8")
    return path


def _name_case(value: str, says: str) -> Any:
    def build(t: Path, tools: Tools) -> Hostile:
        path = _write(t, _good(t, tools, name=value))
        return Hostile(["run", str(path)], [str(path)], "run.name", [says])

    return build


def _name_is_a_file(t: Path, tools: Tools) -> Hostile:
    (t / "runs").mkdir()
    (t / "runs" / "taken").write_text("a file where the run folder would go\n")
    path = _write(t, _good(t, tools, name="taken"))
    return Hostile(["run", str(path)], [str(t / "runs" / "taken")], None, ["a file, not a folder"])


def _nested_file(t: Path, tools: Tools) -> Hostile:
    path = _write(t, "[run]\nname = 'x'\n[strategy]\nname = 'kl_dml'\np = " + "[" * 5000 + "]" * 5000 + "\n")
    return Hostile(["validate", "--no-data", str(path)], [str(path)], None, ["nested more than"])


def _nested_within_the_parser(t: Path, tools: Tools) -> Hostile:
    d = _good(t, tools)
    d["strategy"]["p"] = json.loads("[" * 40 + "1" + "]" * 40)
    path = _write(t, d)
    return Hostile(["run", str(path)], [str(path)], None, ["nested more than 32 deep", "[strategy.p[0]"])


def _nested_set(t: Path, tools: Tools) -> Hostile:
    path = _write(t, _good(t, tools))
    return Hostile(["run", str(path), *tools.sets("strategy.p=" + "[" * 5000 + "]" * 5000)], [str(path)], "strategy.p",
                   ["nests arrays or tables"])


def _dev_zero(t: Path, tools: Tools) -> Hostile:
    return Hostile(["run", "/dev/zero"], ["/dev/zero"], None, ["larger than"])


def _meta_wrong_types(t: Path, tools: Tools) -> Hostile:
    run = t / "runs" / "t"
    result = CliRunner().invoke(app, ["run", str(_write(t, _good(t, tools), "first.toml"))], env=ENV)
    assert result.exit_code == 0, result.output
    for meta in run.glob("checkpoints/*/meta.json"):
        d = json.loads(meta.read_text())
        d["num_processes"] = "two"
        meta.write_text(json.dumps(d))
    return Hostile(["run", "--resume", str(run)], [str(run / "checkpoints"), "meta.json"], None,
                   ["'num_processes' is str"])


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 48000)) + chunk(b"IEND", b"")


def _decompression_bomb(t: Path, tools: Tools) -> Hostile:
    from PIL import Image

    root = t / "images"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / cls / "ok.png")
    bomb = root / "train" / "a" / "zbomb.png"
    bomb.write_bytes(_png_header(40000, 40000))  # 1.6 G pixels declared in a small file
    d = _good(t, tools)
    d["data"] = {"dataset": "image_folder", "root": root.as_posix(), "image_size": 8, "batch_size": 2}
    path = _write(t, d)
    return Hostile(["run", str(path)], [str(bomb)], None, ["decompression bomb"])


def _cifar_labels(kind: str) -> Any:
    def build(t: Path, tools: Tools) -> Hostile:
        folder = t / "cifar" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
            labels: list[Any] = list(range(10))
            if i == 2:
                labels = [str(v) for v in labels] if kind == "strings" else [v + 0.5 for v in labels]
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": torch.zeros(10, 3072, dtype=torch.uint8).numpy(), b"labels": labels}, f)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [b"c"] * 10}, f)
        d = _good(t, tools)
        d["data"] = {"dataset": "cifar10", "root": (t / "cifar").as_posix(), "batch_size": 2}
        path = _write(t, d)
        return Hostile(["run", str(path)], [str(folder / "data_batch_3")], None, ["expected integer class indices"])

    return build


def _image_size(t: Path, tools: Tools) -> Hostile:
    path = _write(t, _good(t, tools))
    return Hostile(["run", str(path), *tools.sets("data.image_size=100000")], [str(path)], "data.image_size",
                   ["less than or equal to 4096"])


def _peer_kwarg_type(value: str, says: str) -> Any:
    def build(t: Path, tools: Tools) -> Hostile:
        d = _good(t, tools)
        d["peers"][0] = {"model": "resnet18", "kwargs": json.loads(value)}
        path = _write(t, d)
        return Hostile(["run", str(path)], [str(path)], "peers[0].kwargs", [says])

    return build


HOSTILE = [
    pytest.param(_name_case("a\x00b", "NUL"), id="run.name-NUL"),
    pytest.param(_name_case("a" * 300, "300 bytes long"), id="run.name-300-chars"),
    pytest.param(_name_case("../../x", "path separator"), id="run.name-dotdot"),
    pytest.param(_name_case("/tmp/elsewhere", "path separator"), id="run.name-absolute"),
    pytest.param(_name_case("", "is empty"), id="run.name-empty"),
    pytest.param(_name_case("..", "not a folder of its own"), id="run.name-parent"),
    pytest.param(_name_is_a_file, id="run.name-is-a-file"),
    pytest.param(_nested_file, id="recipe-nested-5000-deep"),
    pytest.param(_nested_within_the_parser, id="recipe-nested-40-deep"),
    pytest.param(_nested_set, id="set-value-nested"),
    pytest.param(_dev_zero, id="recipe-dev-zero"),
    pytest.param(_meta_wrong_types, id="meta.json-wrong-types"),
    pytest.param(_decompression_bomb, id="png-decompression-bomb"),
    pytest.param(_cifar_labels("strings"), id="cifar-labels-strings"),
    pytest.param(_cifar_labels("floats"), id="cifar-labels-floats"),
    pytest.param(_image_size, id="image_size-impossible"),
    pytest.param(_peer_kwarg_type('{"global_pool": 5}', "AttributeError"), id="peer-kwarg-int-for-str"),
    pytest.param(_peer_kwarg_type('{"output_stride": "x"}', "AssertionError"), id="peer-kwarg-str-for-int"),
]


@pytest.mark.parametrize("build", HOSTILE)
def test_hostile_input_exits_2_with_one_message(tmp_path: Path, build: Any, recipe_dict: Callable[..., dict[str, Any]],
                                                set_options: Callable[..., list[str]],
                                                folder_snapshot: Callable[[Path], dict[str, Any]]) -> None:
    case = build(tmp_path, Tools(recipe_dict, set_options))
    before = folder_snapshot(tmp_path)
    det = torch.are_deterministic_algorithms_enabled()
    try:
        result = CliRunner().invoke(app, case.args, env=ENV)
    finally:
        torch.use_deterministic_algorithms(det)
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    err = result.stderr
    assert result.exit_code == 2, f"exit code {result.exit_code}\n{err}"
    assert "Traceback" not in err and err.startswith("error: ") and "fix:" in err, err
    for name in case.names:
        assert name in err, f"the message does not name {name}:\n{err}"
    if case.field is not None:
        assert f"[{case.field}]" in err, f"the message does not name [{case.field}]:\n{err}"
    for phrase in case.says:
        assert phrase in err, f"the message does not say {phrase!r}:\n{err}"
    assert folder_snapshot(tmp_path) == before, "a refused run wrote, changed or removed files"


# =========================================================================== real runs killed inside a swap

#: Runs ``mutualkd`` with a SIGKILL at one point of the checkpoint writes (MKD_FAULT =
#: "<point>:<checkpoint folder name>:<n-th save of it in this process>").
FAULT_SHIM = """\
import os
import signal
import sys
from pathlib import Path

from mutualkd import checkpoint as ckpt

POINT, NAME, NTH = os.environ["MKD_FAULT"].split(":")
_save, _replace = ckpt.save_checkpoint, os.replace
_seen = {"saves": 0, "armed": False}


def _die():
    sys.stderr.write(f"fault: SIGKILL at {POINT} of {NAME}\\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(dest, state, meta):
    if Path(dest).name == NAME:
        _seen["saves"] += 1
        _seen["armed"] = _seen["saves"] == int(NTH)
        if _seen["armed"] and POINT == "start":
            _die()
    try:
        return _save(dest, state, meta)
    finally:
        _seen["armed"] = False


def replace(src, dst):
    if _seen["armed"]:
        aside = Path(dst).name.startswith(ckpt.OLD_PREFIX)
        if (POINT == "before-aside" and aside) or (POINT == "before-rename" and not aside):
            _die()
        _replace(src, dst)
        if (POINT == "between-renames" and aside) or (POINT == "after-rename" and not aside):
            _die()
        return
    _replace(src, dst)


ckpt.save_checkpoint = save_checkpoint
os.replace = replace
from mutualkd.cli import main

sys.argv[0] = "mutualkd"
main()
"""


def start_with_fault(kit: Kit, args: list[str], log: Path, fault: str) -> Any:
    """``mutualkd ARGS`` through FAULT_SHIM, in its own session (a ``launch_kit.Launch``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    shim = log.parent / "fault_shim.py"
    shim.write_text(FAULT_SHIM, encoding="utf-8")
    return kit.popen([sys.executable, str(shim), *args], log, MKD_FAULT=fault)


BEST_KILLS = [
    pytest.param("start:best:2", id="best-2nd-save-start"),
    pytest.param("before-aside:best:2", id="best-2nd-save-before-aside"),
    pytest.param("between-renames:best:2", id="best-2nd-save-between-renames"),
    pytest.param("after-rename:best:2", id="best-2nd-save-after-renames"),
    pytest.param("before-rename:best:1", id="best-1st-save-before-rename"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fault", BEST_KILLS)
def test_kill_inside_the_best_swap_then_resume(tmp_path: Path, launch_kit: Kit, fault: str) -> None:
    """SIGKILL inside the best/ write of epoch 1 or 2, then resume: best/ holds the epoch
    summary.json names (equal to the uninterrupted run's best/), and metrics, weights and
    summary equal the uninterrupted run's."""
    launch_kit.start_reference("kl_dml")
    recipe = launch_kit.write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / launch_kit.RUN_NAME
    killed = start_with_fault(launch_kit, ["run", str(recipe)], tmp_path / "killed", fault).wait()
    assert killed.rc == -signal.SIGKILL, killed.explain()
    assert "fault: SIGKILL" in killed.err and not (run_dir / "summary.json").exists()
    done = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume")
    assert done.rc == 0, done.explain()
    reference = launch_kit.reference_run("kl_dml")
    assert_best_matches_summary(launch_kit, run_dir, reference)
    launch_kit.assert_same_run(run_dir, reference)
    assert leftovers(run_dir) == []


STEP_KILLS = [
    pytest.param("before-aside", id="before-aside"),
    pytest.param("between-renames", id="between-renames"),
    pytest.param("after-rename", id="after-renames"),
]


@pytest.mark.slow
@pytest.mark.parametrize("point", STEP_KILLS)
def test_kill_inside_a_step_checkpoint_swap_then_resume(tmp_path: Path, launch_kit: Kit, point: str) -> None:
    """A step checkpoint is replaced when a run goes on from an older one: a run stopped after
    step 18 is resumed from step 15, killed inside the swap of step 18 it writes again, and
    resumed: it goes on from step 18, and everything ends as in the uninterrupted run."""
    reference = launch_kit.reference_run("kl_dml")
    run_dir = launch_kit.copy_run(reference, tmp_path)
    assert launch_kit.checkpoint_steps(run_dir) == [15, 18, 20]
    shutil.rmtree(launch_kit.step_folder(run_dir, 20))  # as if stopped after step 18
    (run_dir / "summary.json").unlink()
    older = launch_kit.step_folder(run_dir, 15)
    killed = start_with_fault(launch_kit, ["run", "--resume", str(older)], tmp_path / "killed",
                              f"{point}:step-00000018:1").wait()
    assert killed.rc == -signal.SIGKILL, killed.explain()
    assert leftovers(run_dir), "the kill came outside the swap"
    done = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume")
    assert done.rc == 0, done.explain()
    put_back = "step-00000018 put in place" in done.out
    assert put_back == (point != "after-rename"), done.explain()  # the finished copy replaced the name's
    assert_best_matches_summary(launch_kit, run_dir, reference)
    launch_kit.assert_same_run(run_dir, reference)
    assert leftovers(run_dir) == []


# =========================================================================== checkpoints that do not load, restarts


def _damage(folder: Path, how: str) -> None:
    if how in ("corrupted-state", "empty-marker-on-damaged-state"):
        data = bytearray((folder / ckpt.STATE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / ckpt.STATE).write_bytes(bytes(data))
    if how == "empty-marker-on-damaged-state":
        (folder / ckpt.MARKER).write_text("")
    if how == "meta-wrong-types":
        meta = json.loads((folder / ckpt.META).read_text())
        meta["global_step"] = "nine"
        (folder / ckpt.META).write_text(json.dumps(meta))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["corrupted-state", "empty-marker-on-damaged-state", "meta-wrong-types"])
def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(tmp_path: Path, launch_kit: Kit, how: str) -> None:
    """The newest checkpoint does not load: resume names it, goes on from the one before, sets
    the bad one aside (kept), and ends as the uninterrupted run."""
    launch_kit.start_reference("kl_dml")
    run_dir = launch_kit.copy_run(launch_kit.killed_run("kl_dml"), tmp_path)
    steps = launch_kit.checkpoint_steps(run_dir)
    newest = launch_kit.step_folder(run_dir, steps[-1])
    _damage(newest, how)
    done = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume")
    assert done.rc == 0, done.explain()
    older = launch_kit.step_folder(run_dir, steps[-2]).name
    assert f"skipped checkpoint {newest.name}" in done.out and f"resuming from {older}" in done.out, done.explain()
    assert [p.name.rsplit("-", 1)[0] for p in (run_dir / "checkpoints").glob(".invalid-*")] == [f".invalid-{newest.name}"]
    launch_kit.assert_same_run(run_dir, launch_kit.reference_run("kl_dml"))


@pytest.mark.slow
def test_an_older_checkpoint_can_be_named_on_the_command_line(tmp_path: Path, launch_kit: Kit) -> None:
    """The hint of a refused checkpoint can be followed: --resume RUN_DIR/checkpoints/<older>."""
    launch_kit.start_reference("kl_dml")
    run_dir = launch_kit.copy_run(launch_kit.killed_run("kl_dml"), tmp_path)
    steps = launch_kit.checkpoint_steps(run_dir)
    newest = launch_kit.step_folder(run_dir, steps[-1])
    _damage(newest, "corrupted-state")
    refused = CliRunner().invoke(app, ["run", "--resume", str(newest)], env=ENV)
    assert refused.exit_code == 2 and str(newest) in refused.stderr and "older checkpoint" in refused.stderr
    done = launch_kit.run_mutualkd(["run", "--resume", str(launch_kit.step_folder(run_dir, steps[0]))],
                                   tmp_path / "resume")
    assert done.rc == 0, done.explain()
    launch_kit.assert_same_run(run_dir, launch_kit.reference_run("kl_dml"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "cut-short"])
def test_resume_restores_a_damaged_metrics_log(tmp_path: Path, launch_kit: Kit, damage: str) -> None:
    """metrics.jsonl deleted or cut short after the kill: the resumed run's file equals the
    uninterrupted run's, line for line (it used to be padded with NUL bytes)."""
    launch_kit.start_reference("kl_dml")
    run_dir = launch_kit.copy_run(launch_kit.killed_run("kl_dml"), tmp_path)
    log = run_dir / "metrics.jsonl"
    if damage == "deleted":
        log.unlink()
    else:
        log.write_bytes(log.read_bytes()[:200])
    done = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume")
    assert done.rc == 0, done.explain()
    assert "metrics.jsonl" in done.out and "restored" in done.out, done.explain()
    assert b"\x00" not in log.read_bytes()
    launch_kit.assert_same_run(run_dir, launch_kit.reference_run("kl_dml"))


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path: Path, launch_kit: Kit) -> None:
    launch_kit.start_reference("kl_dml")
    recipe = launch_kit.write_recipe(tmp_path, checkpoint_every=0)  # the first checkpoint comes at step 10
    run_dir = tmp_path / "runs" / launch_kit.RUN_NAME
    launch = launch_kit.start(["run", str(recipe)], tmp_path / "killed")
    try:
        launch_kit.wait_for(run_dir / "metrics.jsonl", launch)
        while not (run_dir / "metrics.jsonl").read_bytes():  # killed after its first step
            assert launch.proc.poll() is None, launch.output()
            time.sleep(0.01)
    finally:
        launch.kill()
    assert launch_kit.checkpoint_steps(run_dir) == [] and (run_dir / "recipe.toml").exists()
    fresh = CliRunner().invoke(app, ["run", str(recipe)], env=ENV)  # its name is taken, and says how to go on
    assert fresh.exit_code == 2 and "--resume" in fresh.stderr
    done = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume")
    assert done.rc == 0, done.explain()
    assert "starts again" in done.out, done.explain()
    launch_kit.assert_same_run(run_dir, launch_kit.reference_run("kl_dml"))


# =========================================================================== two writers


@pytest.mark.slow
def test_a_second_writer_on_a_live_run_folder_exits_2_at_once(tmp_path: Path, launch_kit: Kit,
                                                             set_options: Callable[..., list[str]]) -> None:
    """`mutualkd run --resume RUN` and run.resume = "auto" while the run still trains: refused
    with exit code 2 naming the process that writes it; the running run is not disturbed
    (each step and epoch logged once, as an uninterrupted run logs them)."""
    epochs = 8  # long enough to outlive the two refused starts on a busy machine
    recipe = launch_kit.write_recipe(tmp_path, epochs=epochs)
    run_dir = tmp_path / "runs" / launch_kit.RUN_NAME
    first = launch_kit.start(["run", str(recipe)], tmp_path / "first")
    launch_kit.wait_for(launch_kit.step_folder(run_dir, 3) / ckpt.MARKER, first)
    t0 = time.monotonic()
    seconds = [launch_kit.start(args, tmp_path / f"second{i}") for i, args in
               enumerate([["run", "--resume", str(run_dir)], ["run", str(recipe), *set_options('run.resume="auto"')]])]
    for second in seconds:
        refused = second.wait(120)
        took = time.monotonic() - t0
        assert first.proc.poll() is None, "the first run ended before the second writer was refused"
        assert refused.rc == 2, refused.explain()
        assert "Traceback" not in refused.err and f"being written by process {first.proc.pid}" in refused.err, (
            refused.explain())
        assert took < 30, f"the second writer took {took:.0f} s to be refused"
        print(f"second writer {refused.cmd[3:]} refused {took:.1f} s after it started")
    done = first.wait()
    assert done.rc == 0, done.explain()
    records = launch_kit.comparable_metrics(run_dir)
    steps = [r["global_step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(1, 10 * epochs + 1)), steps
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(1, epochs + 1))
    assert leftovers(run_dir) == [] and json.loads((run_dir / "summary.json").read_text())["epochs"] == epochs


def _workers(kit: Kit, launch: Any) -> dict[int, int]:
    """rank -> pid of the mutualkd workers under a torchrun launch."""
    out = {}
    for pid in kit.descendants(launch.proc.pid):
        with contextlib.suppress(OSError):
            env = dict(
                item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
            )
            if "RANK" in env and "LOCAL_RANK" in env:  # set by torchrun for its workers only
                out[int(env["RANK"])] = pid
    return out


@pytest.mark.slow
def test_workers_left_by_a_killed_launcher_block_a_requeued_run(tmp_path: Path, launch_kit: Kit) -> None:
    """torchrun SIGKILLed alone leaves its workers training (a torch behaviour mutualkd cannot
    change); the lock makes the requeued run refuse the folder instead of writing it too."""
    recipe = launch_kit.write_recipe(tmp_path, nproc=2, epochs=20)  # the orphans must still train at the requeue
    run_dir = tmp_path / "runs" / launch_kit.RUN_NAME
    launch = launch_kit.start(["run", str(recipe)], tmp_path / "first", nproc=2,
                              late_rank=launch_kit.fresh_late_rank(2))
    workers: dict[int, int] = {}
    try:
        launch_kit.wait_for(launch_kit.step_folder(run_dir, 3) / ckpt.MARKER, launch)
        workers = _workers(launch_kit, launch)
        assert sorted(workers) == [0, 1], workers
        os.kill(launch.proc.pid, signal.SIGKILL)  # the launcher only
        launch.proc.wait(30)
        before = launch_kit.checkpoint_steps(run_dir)[-1]
        again = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "requeued", nproc=2, timeout=180)
        assert launch_kit.checkpoint_steps(run_dir)[-1] > before, "the orphaned workers did not go on training"
        assert again.rc != 0 and f"being written by process {workers[0]}" in again.err, again.explain()
        assert "]: Traceback" not in again.err, again.explain()  # torchrun's own report has one; a worker's would not
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launch.kill()


# =========================================================================== a signal to one rank, a lost rank


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(tmp_path: Path, launch_kit: Kit, rank: int) -> None:
    """SIGTERM to one worker of two: both stop at the same batch within 60 s, write one
    checkpoint, exit 143; resuming ends as the uninterrupted two-process run."""
    launch_kit.start_reference("kl_dml", 2)
    recipe = launch_kit.write_recipe(tmp_path, nproc=2)
    run_dir = tmp_path / "runs" / launch_kit.RUN_NAME
    launch = launch_kit.start(["run", str(recipe)], tmp_path / "signalled", nproc=2,
                              late_rank=launch_kit.fresh_late_rank(2))
    launch_kit.wait_for(launch_kit.step_folder(run_dir, 3) / ckpt.MARKER, launch)
    workers = _workers(launch_kit, launch)
    t0 = time.monotonic()
    os.kill(workers[rank], signal.SIGTERM)
    done = launch.wait(120)
    took = time.monotonic() - t0
    assert took < 60, f"the run took {took:.0f} s to stop after one rank was signalled\n{done.explain()}"
    print(f"SIGTERM to rank {rank}: torchrun ended {took:.1f} s later")
    assert done.err.count("interrupted (signal 15)") == 2, done.explain()  # both ranks
    assert "exitcode  : 143" in done.err or "exitcode: 143" in done.err, done.explain()
    assert "]: Traceback" not in done.err, done.explain()
    steps = launch_kit.checkpoint_steps(run_dir)
    logged = [r["global_step"] for r in launch_kit.comparable_metrics(run_dir) if r["kind"] == "step"]
    assert steps and logged and steps[-1] == logged[-1], (steps, logged)
    assert ckpt.load_checkpoint(launch_kit.step_folder(run_dir, steps[-1]))["position"]["global_step"] == steps[-1]
    resumed = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume", nproc=2)
    assert resumed.rc == 0, resumed.explain()
    launch_kit.assert_same_run(run_dir, launch_kit.reference_run("kl_dml", 2))


@pytest.mark.slow
def test_a_lost_rank_ends_the_job_after_the_collective_timeout(tmp_path: Path, launch_kit: Kit,
                                                              set_options: Callable[..., list[str]]) -> None:
    """One worker stopped (SIGSTOP: alive, silent, its sockets open): the other gives up after
    run.collective_timeout (10 s here) instead of 30 minutes; the checkpoints stay complete."""
    recipe = launch_kit.write_recipe(tmp_path, nproc=2)
    run_dir = tmp_path / "runs" / launch_kit.RUN_NAME
    launch = launch_kit.start(["run", str(recipe), *set_options("run.collective_timeout=10")], tmp_path / "lost",
                              nproc=2, late_rank=launch_kit.fresh_late_rank(2))
    try:
        launch_kit.wait_for(launch_kit.step_folder(run_dir, 3) / ckpt.MARKER, launch)
        workers = _workers(launch_kit, launch)
        t0 = time.monotonic()
        os.kill(workers[1], signal.SIGSTOP)
        done = launch.wait(240)
        took = time.monotonic() - t0
    finally:
        for pid in launch_kit.descendants(launch.proc.pid) if launch.proc.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        launch.kill()
    assert done.rc != 0 and took < 90, f"{took:.0f} s\n{done.explain()}"
    print(f"SIGSTOP to rank 1 with run.collective_timeout=10: torchrun ended {took:.1f} s later")
    for step in launch_kit.checkpoint_steps(run_dir):
        assert ckpt.verify_checkpoint(launch_kit.step_folder(run_dir, step)) is None


# =========================================================================== a full file system


@contextlib.contextmanager
def small_filesystem(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``where`` (skips the test if this user may not mount)."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_exits_2_keeps_the_checkpoints_and_resumes(tmp_path: Path, launch_kit: Kit) -> None:
    """The run folder's file system fills up mid-run: exit 2 naming the file and ENOSPC, every
    checkpoint already written intact; with space again, resume ends as the uninterrupted run."""
    reference = launch_kit.reference_run("kl_dml")
    one = (launch_kit.step_folder(reference, 20) / ckpt.STATE).stat().st_size
    with small_filesystem(tmp_path / "disk", int(3.5 * one) // 4096 * 4096) as disk:
        recipe = launch_kit.write_recipe(disk)
        run_dir = disk / "runs" / launch_kit.RUN_NAME
        full = launch_kit.run_mutualkd(["run", str(recipe)], tmp_path / "full")
        assert full.rc == 2, full.explain()
        assert "Traceback" not in full.err and "No space left on device (ENOSPC)" in full.err, full.explain()
        assert str(run_dir) in full.err and "fix:" in full.err, full.explain()
        steps = launch_kit.checkpoint_steps(run_dir)
        assert steps, "no checkpoint fitted before the disk was full"
        for step in steps:
            assert ckpt.verify_checkpoint(launch_kit.step_folder(run_dir, step)) is None
        assert leftovers(run_dir) == [], "a failed write left a half-written folder"
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        done = launch_kit.run_mutualkd(["run", "--resume", str(run_dir)], tmp_path / "resume")
        assert done.rc == 0, done.explain()
        launch_kit.assert_same_run(run_dir, reference)
        assert_best_matches_summary(launch_kit, run_dir, reference)
