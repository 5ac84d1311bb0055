"""Hostile files and values: every data file is read without running code, every name that
becomes a path stays one folder under its root, and every value torch or the OS cannot take
is refused with exit 2, one message (file, field, fix) and nothing written.

Runs alone and fast: ``.venv/bin/python -m pytest tests/test_hostile_inputs.py -q``. The
command line is run in this process (typer's CliRunner) except where only a fresh
interpreter can show the exit code or the absence of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import os
from pathlib import Path
import pickle
import subprocess
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
    d = recipe_dict(tmp_path / "runs", max_steps=1, batch_size=2,
                    data={"dataset": kind, "root": str(tmp_path / "data")})
    recipe = write_recipe(tmp_path / "r.toml", d)
    before = folder_snapshot(tmp_path)
    for args in (["validate", str(recipe)], ["run", str(recipe)],
                 ["run", str(recipe), *set_options("data.pipeline=stream", "data.num_workers=0")]):
        refused(args, str(victim), says=("could run code",))
        assert not target.exists()
    assert folder_snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_a_real_process_refuses_the_planted_payload_without_a_traceback(tmp_path: Path, write_fake_cifar: Factory,
                                                                       recipe_dict: Factory, run_cli: Factory) -> None:
    """The same through ``python -m mutualkd`` in a fresh interpreter: exit 2, one message, no marker."""
    target = tmp_path / "marker"
    victim = _planted_cifar(tmp_path / "data", write_fake_cifar, "cifar10", target)
    d = recipe_dict(tmp_path / "runs", max_steps=1, batch_size=2,
                    data={"dataset": "cifar10", "root": str(tmp_path / "data")})
    done = run_cli(["run", str(write_recipe(tmp_path / "r.toml", d))], timeout=240)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert str(victim) in " ".join(done.stderr.split()) and not target.exists() and not (tmp_path / "runs").exists()


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
    refused(["export", str(folder), "--out", str(tmp_path / "out" / "x")], str(folder / ckpt.META),
            says=("path separator",))
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


# =========================================================================== item: values torch or the OS cannot take


def _recipe_case(edit: Callable[[dict[str, Any]], Any], field: str, says: str) -> Any:
    def build(t: Path, tools: Any) -> tuple[list[str], str | None, tuple[str, ...]]:
        d = tools.recipe_dict(t / "runs", max_steps=1)
        edit(d)
        path = write_recipe(t / "r.toml", d)
        return ["run", str(path)], field, (str(path), says)

    return build


def _text_case(text: str, says: str) -> Any:
    def build(t: Path, tools: Any) -> tuple[list[str], str | None, tuple[str, ...]]:
        d = dump_toml(tools.recipe_dict(t / "runs", max_steps=1)).replace("seed = 0", text)
        path = t / "r.toml"
        path.write_text(d)
        return ["validate", str(path)], None, (str(path), says)

    return build


def _sweep_seeds(value: str, says: str) -> Any:
    def build(t: Path, tools: Any) -> tuple[list[str], str | None, tuple[str, ...]]:
        path = t / "r.toml"
        path.write_text(dump_toml(tools.recipe_dict(t / "runs", max_steps=1)) + f"\n[sweep]\nseeds = {value}\n")
        return ["sweep", str(path), "--print"], "sweep.seeds", (str(path), says)

    return build


def _sweep_cli_seeds(value: str, says: str) -> Any:
    def build(t: Path, tools: Any) -> tuple[list[str], str | None, tuple[str, ...]]:
        path = write_recipe(t / "r.toml", tools.recipe_dict(t / "runs", max_steps=1))
        return ["sweep", str(path), "--print", "--seeds", value], None, (str(path), "--seeds", says)

    return build


SEED_RANGE = "integer from 0 to 4294967295"
VALUES = [
    pytest.param(_recipe_case(lambda d: d["run"].update(seed=-1), "run.seed", SEED_RANGE), id="seed--1"),
    pytest.param(_recipe_case(lambda d: d["run"].update(seed=2**32), "run.seed", SEED_RANGE), id="seed-2**32"),
    pytest.param(_recipe_case(lambda d: d["run"].update(seed=1e20), "run.seed", SEED_RANGE), id="seed-1e20"),
    pytest.param(_text_case("seed = " + "9" * 5000, "4300 digits"), id="seed-5000-digits"),
    pytest.param(_recipe_case(lambda d: d["optimizer"].update(lr=float("inf")), "optimizer.lr", "finite"), id="lr-inf"),
    pytest.param(_recipe_case(lambda d: d["optimizer"].update(lr=1e308), "optimizer.lr",
                              "less than or equal to 1000000000000"),
                 id="lr-1e308"),
    pytest.param(_recipe_case(lambda d: d["data"].update(cutmix=1.0, cutmix_minmax=[2, -1]), "data.cutmix_minmax",
                              "0 < min < max <= 1"), id="cutmix_minmax-2,-1"),
    pytest.param(_recipe_case(lambda d: d["data"].update(subset_seed=-1e20), "data.subset_seed", SEED_RANGE),
                 id="subset_seed--1e20"),
    pytest.param(_recipe_case(lambda d: d["optimizer"].update(name="lamb", args={"nope": 1}), "optimizer.args",
                              "unexpected keyword argument 'nope'"), id="timm-optimizer-args"),
    pytest.param(_recipe_case(lambda d: d["peers"][0].update(weights="hf-hub:"), "peers[0].weights",
                              "does not name a Hugging Face repository"), id="hf-hub-empty"),
    pytest.param(_recipe_case(lambda d: d["peers"][0].update(weights="hf-hub:../../etc"), "peers[0].weights",
                              "does not name a Hugging Face repository"), id="hf-hub-dotdot"),
    pytest.param(_recipe_case(lambda d: d["strategy"].update(temperature=1e-300), "strategy.temperature",
                              "greater than or equal to 0.01"), id="temperature-1e-300"),
    pytest.param(_recipe_case(lambda d: d["strategy"].update(weight=float("nan")), "strategy.weight", "finite"),
                 id="strategy-weight-nan"),
    pytest.param(_sweep_seeds('["a"]', "holds 'a', not a seed"), id="sweep-seeds-strings"),
    pytest.param(_sweep_seeds("5", "must be a list of integers, not a int"), id="sweep-seeds-5"),
    pytest.param(_sweep_seeds("[1, 1]", "names seed 1 more than once"), id="sweep-seeds-duplicate"),
    pytest.param(_sweep_cli_seeds("0,0", "names seed 0 more than once"), id="sweep--seeds-0,0"),
    pytest.param(_sweep_cli_seeds("-3", "holds -3, not a seed"), id="sweep--seeds-negative"),
]


class _Tools:
    def __init__(self, recipe_dict: Factory) -> None:
        self.recipe_dict = recipe_dict


@pytest.mark.parametrize("build", VALUES)
def test_a_value_out_of_bounds_exits_2_naming_file_and_field(build: Any, tmp_path: Path, recipe_dict: Factory,
                                                             folder_snapshot: Factory) -> None:
    args, field, says = build(tmp_path, _Tools(recipe_dict))
    before = folder_snapshot(tmp_path)
    refused(args, field=field, says=says)
    assert folder_snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """peer0 of the tiny run, exported as a timm model folder (config.json + model.safetensors)."""
    from mutualkd.export import export_run

    out = tmp_path_factory.mktemp("exported") / "peer0"
    export_run(tiny_run, out, peer="peer0")
    return out


@pytest.mark.parametrize("key, value", [("num_classes", '"ten"'), ("num_classes", "null"), ("num_classes", "-3"),
                                        ("num_classes", "1e400"), ("mean", "null"), ("input_size", '[1, "8", 8]')])
def test_a_model_folder_whose_config_is_of_the_wrong_kind_exits_2(key: str, value: str, exported: Path,
                                                                  tmp_path: Path, recipe_dict: Factory,
                                                                  folder_snapshot: Factory) -> None:
    import json
    import re
    import shutil

    folder = Path(shutil.copytree(exported, tmp_path / "model"))
    text = json.dumps(json.loads((folder / "config.json").read_text()))
    text, n = re.subn(rf'"{key}": (\[[^\]]*\]|[0-9.]+)', f'"{key}": {value}', text)
    assert n >= 1
    (folder / "config.json").write_text(text)
    d = recipe_dict(tmp_path / "runs", max_steps=1)
    d["peers"][0]["weights"] = str(folder)
    recipe = write_recipe(tmp_path / "r.toml", d)
    before = folder_snapshot(tmp_path)
    refused(["run", str(recipe)], str(folder / "config.json"), field="peers[0].weights", says=(f"'{key}' is",))
    assert folder_snapshot(tmp_path) == before


def test_weights_holding_nan_exit_2_naming_the_file(exported: Path, tmp_path: Path, recipe_dict: Factory) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(exported / "model.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, path)
    d = recipe_dict(tmp_path / "runs", max_steps=1)
    d["peers"][0]["weights"] = str(path)
    refused(["run", str(write_recipe(tmp_path / "r.toml", d))], str(path), field="peers[0].weights",
            says=("non-finite", key))
    assert not (tmp_path / "runs").exists()


@contextlib.contextmanager
def read_only_folder(where: Path) -> Iterator[Path]:
    """``where`` as a folder nobody may write to: chmod for a normal user; for root, a read-only tmpfs."""
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        where.chmod(0o555)
        try:
            yield where
        finally:
            where.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"root may not mount a read-only file system here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_export_out_that_is_a_file_or_read_only_exits_2(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for extra in ([], ["--peer", "peer0"]):
        refused(["export", str(tiny_run), "--out", str(tmp_path / "afile"), *extra], str(tmp_path / "afile"),
                says=("names a file",))
    assert (tmp_path / "afile").read_text() == "x"
    with read_only_folder(tmp_path / "ro") as ro:
        for extra in ([], ["--peer", "peer0"]):
            refused(["export", str(tiny_run), "--out", str(ro / "out"), *extra], str(ro / "out"),
                    says=("cannot write the export",))
        assert list(ro.iterdir()) == []


def test_export_of_every_peer_is_whole_or_absent(tiny_run: Path, tmp_path: Path) -> None:
    """OUT/peer1 not empty: nothing is written, not even OUT/peer0; a free OUT gets every peer at once."""
    out = tmp_path / "out"
    (out / "peer1").mkdir(parents=True)
    (out / "peer1" / "keep").write_text("k")
    (out / "other").mkdir()
    refused(["export", str(tiny_run), "--out", str(out)], str(out / "peer1"), says=("not empty",))
    assert sorted(p.name for p in out.iterdir()) == ["other", "peer1"] and not list(tmp_path.glob(".tmp-*"))
    (out / "peer1" / "keep").unlink()
    code, err, _ = invoke(["export", str(tiny_run), "--out", str(out)])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["other", "peer0", "peer1"]
    assert all((out / n / "model.safetensors").is_file() for n in ("peer0", "peer1"))
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("line, says", [
    ('{"kind": "epoch", "stage": "train", "epoch": 1, "top1": {"peer0": [1, 2]}}', "'top1.peer0' is list"),
    ('{"kind": "epoch", "stage": "train", "epoch": "one", "top1": {"peer0": 5}}', "'epoch' is str"),
    ('{"kind": "step", "stage": "train", "epoch": 1, "steps": {"peer0": 3}}', "'steps.peer0' is int"),
    ('{"kind": "epoch", "stage": 7}', "'stage' and 'kind' must be strings"),
    ('{"kind": "epoch", "stage": "train", "epoch": ' + "9" * 5000 + "}", "4300 digits"),
])
def test_report_on_records_of_the_wrong_kind_exits_2(line: str, says: str, tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines[:1], line, *lines[1:]]) + "\n")
    refused(["report", str(run), "--out", str(tmp_path / "report")], str(metrics), says=("line 2", says))
    assert not (tmp_path / "report").exists()


# =========================================================================== item: damaged tar shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, write_image_folder: Factory) -> Path:
    """Digits as JPEG tar shards, two per split (read-only: tests copy it)."""
    from mutualkd.data.export import write_tar_shards

    base = tmp_path_factory.mktemp("shards")
    folder = write_image_folder(base / "folder", n_train=64, n_test=16, size=16)
    return write_tar_shards(folder, base / "shards", shards=2)


def _tar_recipe(t: Path, recipe_dict: Factory, root: Path, name: str = "t", **data: Any) -> Path:
    d = recipe_dict(t / "runs", max_steps=None, batch_size=8, epochs=2, name=name)
    d["data"] = {"dataset": "image_tar", "root": str(root), "pipeline": "stream", "image_size": 16, "batch_size": 8,
                 "eval_batch_size": 16, "num_workers": 0, **data}
    return write_recipe(t / "r.toml", d)


def test_a_shard_with_3kb_of_ff_in_its_middle_is_never_silent(shards: Path, tmp_path: Path, recipe_dict: Factory,
                                                             read_metrics: Factory, folder_snapshot: Factory) -> None:
    import shutil
    import tarfile

    root = Path(shutil.copytree(shards, tmp_path / "shards"))
    shard = root / "train" / "shard-0000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        names = [m.name for m in tf.getmembers()]
    middle = len(data) // 2
    data[middle:middle + 3072] = b"\xff" * 3072
    shard.write_bytes(bytes(data))
    with tarfile.open(shard) as tf:  # what tar alone makes of it: fewer members, and no error
        listed = len(tf.getmembers())
    with tarfile.open(shard, ignore_zeros=True) as tf:  # the members beyond the damage
        beyond = len(tf.getmembers()) - listed
    assert listed < len(names) and beyond >= 1
    recipe = _tar_recipe(tmp_path, recipe_dict, root)
    before = folder_snapshot(tmp_path)
    for command in ("validate", "run"):
        err = refused([command, str(recipe)], str(shard), f"{recipe} [data.skip_corrupt]",
                      says=("damaged after member", "out of reach", "skip_corrupt = true"))
        assert any(f"member {n} " in err for n in names), err
    assert folder_snapshot(tmp_path) == before
    # skip_corrupt: the run goes on, and every epoch record counts what the damage left out
    recipe = _tar_recipe(tmp_path, recipe_dict, root, skip_corrupt=True)
    code, err, result = invoke(["run", str(recipe)])
    assert code == 0, result.output
    # said at the start (the console may wrap the long path at a '/': joined without a space)
    assert str(shard) in result.stdout.replace("\n", "")
    epochs = [r for r in read_metrics(tmp_path / "runs" / "t") if r["kind"] == "epoch"]
    assert [r["skipped_images"] for r in epochs] == [beyond, beyond], epochs
    assert f"{2 * beyond} unreadable image(s) were skipped over the run" in " ".join(result.stdout.split())


def test_a_damaged_member_is_named_with_its_shard(shards: Path, tmp_path: Path, recipe_dict: Factory,
                                                  read_metrics: Factory) -> None:
    import shutil
    import tarfile

    root = Path(shutil.copytree(shards, tmp_path / "shards"))
    shard = root / "train" / "shard-0001.tar"
    with tarfile.open(shard) as tf:
        member = tf.getmembers()[3]
    data = bytearray(shard.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = b"\xff" * member.size  # the header stays whole
    shard.write_bytes(bytes(data))
    recipe = _tar_recipe(tmp_path, recipe_dict, root)
    refused(["run", str(recipe)], f"{shard} (member {member.name})", f"{recipe} [data.skip_corrupt]",
            says=("cannot be read as an image",))
    # found while training (the run folder holds what was trained before it); with skip_corrupt, counted
    code, err, result = invoke(["run", str(_tar_recipe(tmp_path, recipe_dict, root, "skip", skip_corrupt=True))])
    assert code == 0, result.output
    epochs = [r for r in read_metrics(tmp_path / "runs" / "skip") if r["kind"] == "epoch"]
    assert [r["skipped_images"] for r in epochs] == [1, 1]


# =========================================================================== item: faults that end with exit 2


def test_a_full_disk_under_metrics_jsonl_is_the_error_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               make_trainer: Factory) -> None:
    """Every append to metrics.jsonl fails with ENOSPC (/dev/full): the run stops with that error, and closing
    the file (which fails the same way) does not raise over it."""
    from mutualkd.errors import UserError
    from mutualkd.runlog import MetricsWriter

    w = MetricsWriter(Path("/dev/full"))
    with pytest.raises(UserError) as ei:
        w.write({"kind": "step"})
    assert "No space left on device (ENOSPC)" in str(ei.value) and "free space" in str(ei.value)
    w.close()  # the same bytes fail again: not raised
    tr = make_trainer(tmp_path, max_steps=2)
    real_open = MetricsWriter._open

    def full(self: MetricsWriter) -> Any:  # the file is there, and every byte appended to it fails
        self.path.touch()
        return open("/dev/full", "a", encoding="utf-8")

    monkeypatch.setattr(MetricsWriter, "_open", full)
    with pytest.raises(UserError) as ei:
        tr.fit()
    monkeypatch.setattr(MetricsWriter, "_open", real_open)
    assert "cannot write metrics.jsonl: No space left on device (ENOSPC)" in str(ei.value)
    assert str(tmp_path / "t" / "metrics.jsonl") in str(ei.value)


def test_metrics_jsonl_replaced_by_a_folder_says_so(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    err = refused(["run", "--resume", str(run), "--set", "run.max_steps=3"], str(run / "metrics.jsonl"),
                  says=("Is a directory", "must be a file"))
    assert "free space" not in err


def test_a_tracker_folder_that_becomes_unwritable_ends_the_run_with_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe_dict: Factory, read_metrics: Factory) -> None:
    """TensorBoard's writes fail (EROFS) from the third on: exit 2 naming the folder and run.log_with; the
    checkpoints and metrics.jsonl written before are kept, and closing the tracker does not raise over it."""
    pytest.importorskip("tensorboard")
    import errno

    from accelerate.tracking import TensorBoardTracker

    calls = {"n": 0}
    real = TensorBoardTracker.log

    def log(self: Any, values: dict[str, Any], step: int | None = None, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.EROFS, "Read-only file system")
        real(self, values, step=step, **kw)

    monkeypatch.setattr(TensorBoardTracker, "log", log)
    d = recipe_dict(tmp_path / "runs", max_steps=6, run={"log_with": ["tensorboard"], "checkpoint_every": 1})
    recipe = write_recipe(tmp_path / "r.toml", d)
    refused(["run", str(recipe)], str(tmp_path / "runs" / "t" / "tracking"), f"{recipe} [run.log_with]",
            says=("Read-only file system (EROFS)", "--resume"))
    from mutualkd import checkpoint as ckpt

    assert ckpt.latest_checkpoint(tmp_path / "runs" / "t" / "checkpoints") is not None
    assert [r["global_step"] for r in read_metrics(tmp_path / "runs" / "t") if r["kind"] == "step"][:2] == [1, 2]


def test_a_sweep_run_killed_before_its_first_checkpoint_is_run_again(tmp_path: Path, recipe_dict: Factory,
                                                                     make_recipe: Factory) -> None:
    from rich.console import Console

    from mutualkd.config import apply_overrides, parse_recipe, read_toml
    from mutualkd.sweep import plan_sweep, run_sweep

    recipe = write_recipe(tmp_path / "r.toml", recipe_dict(tmp_path / "runs", max_steps=1,
                                                           data={"train_subset": 32, "test_subset": 20}))
    plan = plan_sweep(recipe, seeds=[0], out_dir=tmp_path / "sweep")
    (run,) = plan.runs
    # what a run killed before its first checkpoint leaves: its own recipe.toml and a line of metrics.jsonl
    raw = apply_overrides(read_toml(recipe), run.overrides)
    raw["run"]["mixed_precision"] = "no"  # the engine records the precision it resolved
    rec = parse_recipe(raw, file=str(recipe))
    run.folder.mkdir(parents=True)
    (run.folder / "recipe.toml").write_text(dump_toml(rec.to_dict()))
    (run.folder / "metrics.jsonl").write_text('{"kind": "step", "global_step": 1}\n')
    outcome = run_sweep(plan, console=Console(file=open(os.devnull, "w")))
    assert outcome["failed"] == [] and [r.name for r in outcome["resumed"]] == [run.name]
    assert (run.folder / "summary.json").is_file()


# =========================================================================== item: smaller ones


def test_a_subset_larger_than_the_data_is_said(tmp_path: Path, recipe_dict: Factory) -> None:
    d = recipe_dict(tmp_path / "runs", max_steps=1, data={"train_subset": 100000, "test_subset": 20})
    code, err, result = invoke(["run", str(write_recipe(tmp_path / "r.toml", d))])
    out = " ".join(result.stdout.split())
    assert code == 0, result.output
    assert "data.train_subset = 100000 is more than the 1347 images of the train split" in out, out
    assert "test_subset" not in out
    from mutualkd.config import DataConfig
    from mutualkd.data import build_pipeline

    cfg = DataConfig(dataset="digits", pipeline="stream", num_workers=0, batch_size=8, test_subset=10**6)
    reason = build_pipeline(cfg, seed=0, device="cpu").reason
    assert "data.test_subset = 1000000 is more than the 450 images of the test split" in reason, reason


def test_run_tracker_and_sweep_folders_that_are_links_out_of_their_root_are_refused(
        tiny_run: Path, tmp_path: Path, recipe_dict: Factory, make_trainer: Factory) -> None:
    """A plain name cannot leave its root, but a symbolic link in its place could: each writer refuses it."""
    import json
    import shutil

    from mutualkd.config import parse_recipe
    from mutualkd.engine import Trainer
    from mutualkd.errors import UserError
    from mutualkd.sweep import plan_sweep

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "t").symlink_to(elsewhere)
    with pytest.raises(UserError) as ei:
        make_trainer(tmp_path / "runs", max_steps=1)
    assert "the run folder" in str(ei.value) and "outside" in str(ei.value) and "[run.name]" not in str(ei.value)
    # the trackers' folder of a resumed run
    run = Path(shutil.copytree(tiny_run, tmp_path / "copy" / "tiny"))
    (run / "tracking").mkdir()
    (run / "tracking" / "mutualkd").symlink_to(elsewhere)
    d = json.loads(json.dumps(recipe_dict(tmp_path / "copy", name="tiny", max_steps=3)))
    d["run"]["log_with"] = ["tensorboard"]
    with pytest.raises(UserError) as ei:
        Trainer(parse_recipe(d), recipe_file="<test>", resume=run).fit()
    assert "the trackers' folder" in str(ei.value) and "outside" in str(ei.value)
    # a sweep's run folder
    recipe = write_recipe(tmp_path / "r.toml", recipe_dict(tmp_path / "runs", max_steps=1))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "t-s0").symlink_to(elsewhere)
    with pytest.raises(UserError) as ei:
        plan_sweep(recipe, seeds=[0], out_dir=tmp_path / "sweep")
    assert "the sweep's run folder" in str(ei.value) and "outside" in str(ei.value)
    assert list(elsewhere.iterdir()) == []
