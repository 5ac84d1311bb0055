"""Hostile files and values: every data file is read without running code, every name that
becomes a path stays one folder under its root, and every value torch or the OS cannot take
is refused with exit 2, one message (file, field, fix) and nothing written.

Runs alone and fast: ``.venv/bin/python -m pytest tests/test_hostile_inputs.py -q``. The
command line is run in this process (typer's CliRunner) except where only a fresh
interpreter can show the exit code or the absence of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mutualkd.cli import app
from mutualkd.errors import DataError
from mutualkd.runlog import dump_toml
from mutualkd.trust import UnsafeFileError, load_data_pickle

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
#: The factory fixtures of tests/fixtures/ and conftest.py used here.
Factory = Callable[..., Any]


class Payload:
    """Unpickling this calls ``open(target, "w")``: it creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.target, "w"))


def invoke(args: list[str]) -> tuple[int, str, Any]:
    """``mutualkd ARGS`` in this process: exit code, stderr on one line, the result."""
    det = torch.are_deterministic_algorithms_enabled()
    try:
        result = CliRunner().invoke(app, args, env=ENV)
    finally:
        torch.use_deterministic_algorithms(det)
    assert isinstance(result.exception, SystemExit) or result.exception is None, (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}")
    return result.exit_code, " ".join(result.stderr.split()), result


def refused(args: list[str], *names: str, field: str | None = None, says: tuple[str, ...] = ()) -> str:
    """Run ``args``, check exit 2, one ``error: ... fix: ...`` message naming ``names`` and ``[field]``."""
    code, err, result = invoke(args)
    assert code == 2, f"exit code {code}\n{result.output}"
    assert err.startswith("error: ") and "fix:" in err and "Traceback" not in err, err
    for name in names:
        assert name in err, f"the message does not name {name}:\n{err}"
    if field is not None:
        assert f"[{field}]" in err, f"the message does not name [{field}]:\n{err}"
    for phrase in says:
        assert phrase in err, f"the message does not say {phrase!r}:\n{err}"
    return err


def write_recipe(path: Path, d: dict[str, Any]) -> Path:
    path.write_text(dump_toml(d), encoding="utf-8")
    return path


# =========================================================================== item: data pickles


def test_a_data_pickle_of_arrays_lists_and_numbers_loads(tmp_path: Path) -> None:
    """What CIFAR's files hold, pickled by NumPy 1 or 2 with protocol 2 or 5, loads as it was written."""
    entry = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2], b"n": np.int64(3),
             b"names": [b"cat", "dog"], b"f": 0.5, b"o": np.array([1, "a"], dtype=object)}
    for protocol in (2, 5):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(entry, protocol=protocol))
        back = load_data_pickle(path, fix="x")
        assert np.array_equal(back[b"data"], entry[b"data"]) and back[b"labels"] == [1, 2] and back[b"n"] == 3
        assert back[b"names"] == [b"cat", "dog"] and back[b"o"].tolist() == [1, "a"]


@pytest.mark.parametrize("obj", ["payload", "eval", "codec"])
def test_a_data_pickle_that_asks_for_code_is_refused_unrun(tmp_path: Path, obj: str) -> None:
    target = tmp_path / "marker"
    path = tmp_path / "data_batch_1"
    if obj == "payload":
        path.write_bytes(pickle.dumps({b"data": Payload(target)}, protocol=2))
    elif obj == "eval":  # a global written by hand, as an attacker would
        path.write_bytes(b"cbuiltins\neval\n(Vopen(" + repr(str(target)).encode() + b", 'w')\ntR.")
    else:  # the one codec function admitted, with another codec than latin-1
        path.write_bytes(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")
    with pytest.raises(UnsafeFileError if obj != "codec" else DataError) as ei:
        load_data_pickle(path, fix="replace it")
    assert str(path) in str(ei.value) and "fix: replace it" in str(ei.value)
    assert not target.exists()


def _planted_cifar(root: Path, write_fake_cifar: Factory, kind: str, target: Path) -> Path:
    folder = write_fake_cifar(root, kind=kind, n_train=20, n_test=10)
    victim = folder / ("data_batch_3" if kind == "cifar10" else "meta")
    with open(victim, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    entry[b"extra"] = Payload(target)
    victim.write_bytes(pickle.dumps(entry, protocol=2))
    return victim


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_a_planted_cifar_payload_never_runs(tmp_path: Path, kind: str, write_fake_cifar: Factory,
                                            recipe_dict: Factory, set_options: Factory,
                                            folder_snapshot: Factory) -> None:
    """validate, run, and the stream pipeline: exit 2 naming the file, and the marker never appears."""
    target = tmp_path / "marker"
    victim = _planted_cifar(tmp_path / "data", write_fake_cifar, kind, target)
    d = recipe_dict(tmp_path / "runs", max_steps=1, batch_size=2, data={"dataset": kind, "root": str(tmp_path / "data")})
    recipe = write_recipe(tmp_path / "r.toml", d)
    before = folder_snapshot(tmp_path)
    for args in (["validate", str(recipe)], ["run", str(recipe)],
                 ["run", str(recipe), *set_options("data.pipeline=stream", "data.num_workers=0")]):
        refused(args, str(victim), says=("could run code",))
        assert not target.exists()
    assert folder_snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


# =========================================================================== item: names that become paths

BAD_NAMES = {
    "a/b": "path separator", "a\\b": "path separator", "..": "not a folder of its own", ".": "not a folder of its own",
    "": "is empty", "x" * 101: "101 characters", "\U0001f98a" * 70: "280 bytes", "tab\tbed": "control character",
    "zero\u200bwidth": "invisible format character", "rtl\u202eoverride": "invisible format character",
    "two words": "a space", "no\u00a0break": "a space", "nul\x00": "NUL",
}
GOOD_NAMES = ["net", "peer0", "one_b0", "ResNet-20.v2", "fox-\U0001f98a", "élève"]


@pytest.mark.parametrize("value", list(BAD_NAMES), ids=[repr(v)[:20] for v in BAD_NAMES])
def test_a_name_that_is_not_one_plain_folder_name_is_refused(value: str) -> None:
    from mutualkd.config import parse_recipe
    from mutualkd.errors import RecipeError

    peers = [{"model": "cifar_resnet20"}, {"model": "cifar_resnet20", "name": "other"}]
    for field, raw in (("peers[0].name", {"peers": [{**peers[0], "name": value}, peers[1]]}),
                       ("run.name", {"run": {"name": value}, "peers": peers}),
                       ("run.tracker_project", {"run": {"tracker_project": value}, "peers": peers})):
        with pytest.raises(RecipeError) as ei:
            parse_recipe(raw, file="r.toml")
        text = str(ei.value)
        assert f"r.toml [{field}]" in text and BAD_NAMES[value] in text and "plain name" in text, text


def _recipe_with_peer_names(names: list[Any]) -> Any:
    from mutualkd.config import parse_recipe

    raw = {"peers": [{"model": "cifar_resnet20", **({"name": n} if n is not None else {})} for n in names]}
    return parse_recipe(raw, file="r.toml")


def test_plain_names_are_accepted_and_look_alikes_refused() -> None:
    from mutualkd.errors import RecipeError

    rec = _recipe_with_peer_names([*GOOD_NAMES, None])
    assert rec.peer_names() == [*GOOD_NAMES, f"peer{len(GOOD_NAMES)}"]
    for a, b in (("peer0", "\uff50\uff45\uff45\uff52\uff10"), ("Net", "net"), ("ﬁne", "fine")):
        with pytest.raises(RecipeError) as ei:
            _recipe_with_peer_names([a, b])
        assert "[peers]" in str(ei.value) and "look alike" in str(ei.value) and repr(b) in str(ei.value)


def test_a_hostile_peer_name_exits_2_and_writes_nothing(tmp_path: Path, recipe_dict: Factory,
                                                       folder_snapshot: Factory) -> None:
    d = recipe_dict(tmp_path / "runs", max_steps=1)
    d["peers"][1]["name"] = "../../escaped"
    recipe = write_recipe(tmp_path / "r.toml", d)
    before = folder_snapshot(tmp_path)
    refused(["run", str(recipe)], str(recipe), field="peers[1].name", says=("path separator",))
    assert folder_snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_writers_keep_their_paths_under_their_root(tmp_path: Path) -> None:
    from mutualkd.errors import UserError
    from mutualkd.names import inside

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)  # a link inside the root that points out of it
    assert inside(root, root / "sub" / "x", what="t", hint="h") == root / "sub" / "x"
    for escape in (root / ".." / "x", root / "link" / "x", Path("/etc")):
        with pytest.raises(UserError) as ei:
            inside(root, escape, what="the folder", hint="h")
        assert str(escape) in str(ei.value) and "outside" in str(ei.value)


def test_export_refuses_a_peer_name_from_meta_json_that_leaves_the_folder(tiny_run: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from mutualkd import checkpoint as ckpt

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    folder = ckpt.latest_checkpoint(run / "checkpoints")
    meta = json.loads((folder / ckpt.META).read_text())
    meta["peers"] = {"../../evil": meta["peers"]["peer0"], **meta["peers"]}
    (folder / ckpt.META).write_text(json.dumps(meta))
    refused(["export", str(folder), "--out", str(tmp_path / "out" / "x")], str(folder / ckpt.META), says=("path separator",))
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()
