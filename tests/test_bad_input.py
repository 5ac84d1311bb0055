"""Bad input: every broken recipe, data set, path or command line is refused with exit code 2
and one message (where, what, ``fix:``), never a traceback, and nothing is written.

The table at the bottom holds the cases. Each case runs the CLI in this process (typer's
CliRunner: one import of torch and timm for the whole table instead of one per case, which
would cost ten seconds each on 2 cores); ``test_real_process_*`` checks that a real
``python -m mutualkd`` process behaves the same. Every recipe of the table points at an
existing run folder, and the whole test folder (that run, a teacher run, the case's own
files) is compared before and after: no file may appear, change or go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import copy
from dataclasses import dataclass, field as dc_field
import json
from pathlib import Path
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mutualkd.checkpoint import MARKER, latest_checkpoint, list_checkpoints
from mutualkd.cli import app
from mutualkd.data import write_idx
from mutualkd.runlog import dump_toml

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
#: The folder_snapshot fixture: every file under a folder, (size, mtime, contents) by path.
Snapshot = Callable[[Path], dict[str, Any]]


@dataclass
class World:
    """What every case may point at: a finished run, a teacher run, a valid recipe; and
    ``sets``, the ``set_options`` fixture (``--set`` options for the CLI)."""

    base: Path
    good: dict[str, Any]
    sets: Callable[..., list[str]]

    @property
    def runs(self) -> Path:
        return self.base / "runs"

    @property
    def existing(self) -> Path:
        return self.runs / "existing"

    @property
    def teacher(self) -> Path:
        return self.runs / "teacher"

    def recipe(self, folder: Path, edit: Callable[[dict[str, Any]], Any] | None = None, name: str = "recipe.toml") -> Path:
        """The valid recipe with ``edit`` applied, written to ``folder/name``."""
        d = copy.deepcopy(self.good)
        if edit is not None:
            edit(d)
        path = folder / name
        path.write_text(dump_toml(d), encoding="utf-8")
        return path

    def text(self, folder: Path, text: str | bytes, name: str = "recipe.toml") -> Path:
        path = folder / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    def copy_run(self, run: Path, folder: Path) -> Path:
        return Path(shutil.copytree(run, folder / run.name))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, set_options: Callable[..., list[str]]) -> Iterator[World]:
    base = tmp_path_factory.mktemp("bad_input")
    good: dict[str, Any] = {
        "run": {"name": "existing", "out_dir": (base / "runs").as_posix(), "epochs": 1, "max_steps": 2, "device": "cpu",
                "progress": False, "log_every": 1, "checkpoint_every": 1},
        "data": {"dataset": "digits", "batch_size": 8, "eval_batch_size": 64, "train_subset": 32, "test_subset": 32},
        "peers": [{"model": "cifar_resnet20"}, {"model": "cifar_wrn_16_1"}],
        "optimizer": {"name": "sgd", "lr": 0.05},
        "strategy": {"name": "kl_dml", "temperature": 1.0},
    }
    w = World(base, good, set_options)
    with torch_flags_kept():
        result = CliRunner().invoke(app, ["run", str(w.recipe(base, name="good.toml"))], env=ENV)
        assert result.exit_code == 0, result.output

        def teacher(d: dict[str, Any]) -> None:
            d["run"]["name"] = "teacher"
            d["peers"] = [{"model": "cifar_resnet20"}]
            d["strategy"] = {"name": "independent"}

        result = CliRunner().invoke(app, ["run", str(w.recipe(base, teacher, name="teacher.toml"))], env=ENV)
        assert result.exit_code == 0, result.output
    assert latest_checkpoint(w.existing / "checkpoints") is not None
    yield w


@contextlib.contextmanager
def torch_flags_kept() -> Iterator[None]:
    """Runs in this process may switch on deterministic algorithms; switch them back after."""
    det = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)


@dataclass
class Case:
    """A command line and what its error message must name."""

    args: list[str]
    names: list[str] = dc_field(default_factory=list)  # files or folders the message must name
    field: str | None = None  # the TOML path, as "[field]"
    says: list[str] = dc_field(default_factory=list)  # further phrases (what is wrong, suggestions)
    avoid: list[str] = dc_field(default_factory=list)  # phrases a good message does not have


def run_case(w: World, tmp: Path, path: Path, *extra: str, field: str | None = None, says: tuple[str, ...] = (),
             command: str = "run") -> Case:
    return Case([command, str(path), *extra], names=[str(path)], field=field, says=list(says))


# --------------------------------------------------------------------------- the cases
# Each builder gets the world and the case's own folder and returns the Case.

def _toml_syntax(w: World, t: Path) -> Case:
    text = dump_toml(w.good).replace("[data]", "[data", 1)
    return run_case(w, t, w.text(t, text), says=("TOML syntax error", "line"))


def _unknown_top_level_key(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d.__setitem__("runn", {"epochs": 2})), field="runn",
                    says=("unknown key", "'run'"))


def _unknown_section_key(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["run"].__setitem__("epocs", 2)), field="run.epocs",
                    says=("unknown key", "'epochs'"))


def _unknown_peer_key(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][1].__setitem__("modle", "x")), field="peers[1].modle",
                    says=("unknown key", "'model'"))


def _wrong_type(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["run"].__setitem__("epochs", "two")), field="run.epochs",
                    says=("'two'",))


def _lr_zero(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["optimizer"].__setitem__("lr", 0.0)), field="optimizer.lr",
                    says=("greater than 0",))


def _lr_negative_by_set(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t), *w.sets("optimizer.lr=-0.1"), field="optimizer.lr", says=("greater than 0",))


def _batch_size_zero(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["data"].__setitem__("batch_size", 0)), field="data.batch_size",
                    says=("greater than 0",))


def _unknown_model(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][0].__setitem__("model", "cifar_resnet2")),
                    field="peers[0].model", says=("unknown model", "'cifar_resnet20'"))


def _unknown_model_validate(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][1].__setitem__("model", "cifar_wrn_16_l")),
                    field="peers[1].model", says=("unknown model", "'cifar_wrn_16_1'"), command="validate")


def _vit_without_img_size(w: World, t: Path) -> Case:
    # A ViT built for 224 px cannot take the 8 px digits: the feature probe fails at set-up.
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][0].__setitem__("model", "vit_tiny_patch16_224")),
                    field="peers[0]", says=("peer 'peer0'", "vit_tiny_patch16_224", "1x8x8", "(3, 224, 224)", "img_size = 8"))


def _vit_without_img_size_validate(w: World, t: Path) -> Case:
    # validate runs the same probe as a run (it used to say "ok" here).
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][1].__setitem__("model", "vit_tiny_patch16_224")),
                    field="peers[1]", says=("peer 'peer1'", "img_size = 8"), command="validate")


def _convnext_at_8px(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][1].__setitem__("model", "convnext_atto")), command="validate",
                    field="peers[1]", says=("peer 'peer1'", "convnext_atto", "1x8x8", "data.image_size"))


def _unknown_strategy(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d.__setitem__("strategy", {"name": "kl_dm"})), field="strategy.name",
                    says=("'kl_dml'",))


def _unknown_metric(w: World, t: Path) -> Case:
    path = w.recipe(t, lambda d: d.__setitem__("strategy", {"name": "ie_dml", "inh_metric": "l3"}))
    return run_case(w, t, path, field="strategy.inh_metric", says=("l3", "l1", "l2"))


def _one_peer_kl_dml(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"].pop()), field="peers", says=("kl_dml", "at least 2"))


def _one_peer_ie_dml(w: World, t: Path) -> Case:
    def edit(d: dict[str, Any]) -> None:
        d["peers"].pop()
        d["strategy"] = {"name": "ie_dml"}

    return run_case(w, t, w.recipe(t, edit), field="peers", says=("ie_dml", "at least 2"))


def _ie_kd(w: World, t: Path, teacher: str, **params: Any) -> Path:
    def edit(d: dict[str, Any]) -> None:
        d["peers"] = [{"model": "cifar_wrn_16_1"}]
        d["strategy"] = {"name": "ie_kd", "teacher": teacher, "ae_epochs": 1, **params}

    return w.recipe(t, edit)


def _teacher_missing(w: World, t: Path) -> Case:
    missing = t / "no_such_teacher"
    case = run_case(w, t, _ie_kd(w, t, str(missing)), field="strategy.teacher", says=("no complete checkpoint",))
    case.names.append(str(missing))
    return case


def _teacher_of_another_architecture(w: World, t: Path) -> Case:
    path = _ie_kd(w, t, str(w.teacher), teacher_model="cifar_wrn_16_1")
    return run_case(w, t, path, field="strategy.teacher_model", says=("cifar_resnet20", "cifar_wrn_16_1"))


def _teacher_class_count(w: World, t: Path) -> Case:
    teacher = w.copy_run(w.teacher, t)
    for meta in teacher.glob("checkpoints/*/meta.json"):
        d = json.loads(meta.read_text())
        d["dataset"]["num_classes"] = 100
        meta.write_text(json.dumps(d))
    return run_case(w, t, _ie_kd(w, t, str(teacher)), field="strategy.teacher", says=("100 classes", "10 classes"))


def _cifar_files_missing(w: World, t: Path) -> Case:
    root = t / "empty"
    root.mkdir()
    path = w.recipe(t, lambda d: d["data"].update(dataset="cifar10", root=root.as_posix()))
    # The data files are what is wrong, and they are named (the recipe file is not).
    return Case(["run", str(path)], names=[str(root / "cifar-10-batches-py" / "data_batch_1")],
                says=["not found", "data.root"])


def _truncated_idx(w: World, t: Path) -> Case:
    root = t / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    broken = root / "train-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:1000])
    def edit(d: dict[str, Any]) -> None:
        d["data"].update(dataset="fashion_mnist", root=root.as_posix())
        d["data"].pop("train_subset")

    # The broken data file is what is wrong, and it is named.
    return Case(["run", str(w.recipe(t, edit))], names=[str(broken)])


def _unwritable_out_dir(w: World, t: Path) -> Case:
    (t / "afile").write_text("a regular file, so nothing can be created below it\n")
    out = t / "afile" / "sub"
    path = w.recipe(t, lambda d: d["run"].update(out_dir=out.as_posix(), name="new"))
    # The folder that cannot be made is named, and the fix names the field.
    return Case(["run", str(path)], names=[str(out / "new")], says=["cannot write", "run.out_dir"])


def _existing_run_without_resume(w: World, t: Path) -> Case:
    case = run_case(w, t, w.recipe(t), says=("already exists", "--resume"))
    case.names = [str(w.existing)]
    return case


def _resume_with_changed_recipe(w: World, t: Path) -> Case:
    case = run_case(w, t, w.recipe(t), *w.sets("optimizer.lr=0.01"), "--resume", str(w.existing),
                    says=("recipe differs",))
    case.names = [str(w.existing)]
    return case


def _corrupted_checkpoint(w: World, t: Path) -> Case:
    # Every step checkpoint corrupted: with one intact, resume would fall back to it
    # (tests/test_faults.py::test_corrupt_newest_checkpoint_falls_back_to_an_older_one).
    run = w.copy_run(w.existing, t)
    latest = latest_checkpoint(run / "checkpoints")
    assert latest is not None
    for _, folder in list_checkpoints(run / "checkpoints"):
        state = folder / "state.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    return Case(["run", "--resume", str(run)], names=[str(latest)], says=["corrupted"])


def _all_checkpoints_incomplete(w: World, t: Path) -> Case:
    run = w.copy_run(w.existing, t)
    for folder in (run / "checkpoints").iterdir():
        (folder / MARKER).unlink(missing_ok=True)
    return Case(["run", "--resume", str(run)], names=[str(run / "checkpoints")], says=["no complete checkpoint"])


def _resume_folder_missing(w: World, t: Path) -> Case:
    return Case(["run", "--resume", str(t / "nothing_here")], names=[str(t / "nothing_here")],
                says=["does not exist", "run folder"])


def _not_utf8(w: World, t: Path) -> Case:
    return run_case(w, t, w.text(t, dump_toml(w.good).encode() + b'\n# caf\xe9 latin-1\n'), says=("UTF-8",))


def _set_without_equals(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t), "--set", "run.epochs", says=("run.epochs", "key=value"))


def _set_bad_index(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t), *w.sets("peers.9.model=x"), field="peers.9", says=("index",))


def _pretrained(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][0].__setitem__("kwargs", {"pretrained": True})),
                    field="peers[0].kwargs", says=("pretrained",))


def _num_classes_kwarg(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][0].__setitem__("kwargs", {"num_classes": 3})),
                    field="peers[0].kwargs", says=("num_classes",))


def _unknown_model_kwarg(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["peers"][1].__setitem__("kwargs", {"depthh": 3})),
                    field="peers[1].kwargs", says=("depthh",))


def _milestones_not_increasing(w: World, t: Path) -> Case:
    path = w.recipe(t, lambda d: d.__setitem__("scheduler", {"name": "multistep", "milestones": [5, 3]}))
    return run_case(w, t, path, field="scheduler.milestones", says=("increasing",))


def _nesterov_without_momentum(w: World, t: Path) -> Case:
    path = w.recipe(t, lambda d: d["optimizer"].update(momentum=0.0, nesterov=True))
    return run_case(w, t, path, field="optimizer", says=("nesterov", "momentum"))


def _duplicate_peer_names(w: World, t: Path) -> Case:
    def edit(d: dict[str, Any]) -> None:
        for p in d["peers"]:
            p["name"] = "twin"

    case = run_case(w, t, w.recipe(t, edit), field="peers", says=("unique", "twin"))
    case.avoid.append("(got {")  # the whole recipe, echoed back
    return case


def _unknown_schedule_mode(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d.__setitem__("schedule", {"mode": "sequential"})),
                    field="schedule.mode", says=("'alternating'", "'simultaneous'"))


def _unsupported_dataset(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["data"].__setitem__("dataset", "imagenet")), field="data.dataset",
                    says=("'imagenet'", "cifar10"))


def _image_folder_without_size(w: World, t: Path) -> Case:
    path = w.recipe(t, lambda d: d["data"].update(dataset="image_folder", root=t.as_posix()))
    return run_case(w, t, path, field="data.image_size", says=("image_size",))


def _temperature_zero(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["strategy"].__setitem__("temperature", 0)),
                    field="strategy.temperature", says=("greater than or equal to 0.01",))


def _unknown_strategy_param(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t, lambda d: d["strategy"].__setitem__("temprature", 2.0)),
                    field="strategy.temprature", says=("'temperature'",))


def _no_recipe(w: World, t: Path) -> Case:
    return Case(["run"], says=["no recipe given", "mutualkd run"])


def _recipe_is_a_folder(w: World, t: Path) -> Case:
    return Case(["run", str(t)], names=[str(t)], says=["folder"])


def _recipe_missing(w: World, t: Path) -> Case:
    return Case(["validate", str(t / "nope.toml")], names=[str(t / "nope.toml")], says=["not found"])


def _batch_larger_than_data(w: World, t: Path) -> Case:
    return run_case(w, t, w.recipe(t), *w.sets("data.batch_size=64"), field="data.batch_size",
                    says=("would have no step",))





CASES = [
    pytest.param(_toml_syntax, id="toml-syntax-error"),
    pytest.param(_unknown_top_level_key, id="unknown-key-top-level"),
    pytest.param(_unknown_section_key, id="unknown-key-in-section"),
    pytest.param(_unknown_peer_key, id="unknown-key-in-peer"),
    pytest.param(_wrong_type, id="wrong-type"),
    pytest.param(_lr_zero, id="lr-zero"),
    pytest.param(_lr_negative_by_set, id="lr-negative-by-set"),
    pytest.param(_batch_size_zero, id="batch-size-zero"),
    pytest.param(_batch_larger_than_data, id="batch-larger-than-data"),
    pytest.param(_unknown_model, id="unknown-model"),
    pytest.param(_unknown_model_validate, id="unknown-model-validate"),
    pytest.param(_vit_without_img_size, id="vit-without-img_size"),
    pytest.param(_vit_without_img_size_validate, id="vit-without-img_size-validate"),
    pytest.param(_convnext_at_8px, id="convnext-at-8px-validate"),
    pytest.param(_unknown_strategy, id="unknown-strategy"),
    pytest.param(_unknown_strategy_param, id="unknown-strategy-parameter"),
    pytest.param(_unknown_metric, id="unknown-metric"),
    pytest.param(_one_peer_kl_dml, id="one-peer-kl_dml"),
    pytest.param(_one_peer_ie_dml, id="one-peer-ie_dml"),
    pytest.param(_teacher_missing, id="ie_kd-teacher-missing"),
    pytest.param(_teacher_of_another_architecture, id="ie_kd-teacher-architecture"),
    pytest.param(_teacher_class_count, id="ie_kd-teacher-class-count"),
    pytest.param(_cifar_files_missing, id="cifar10-files-missing"),
    pytest.param(_truncated_idx, id="fashion_mnist-truncated-idx"),
    pytest.param(_unwritable_out_dir, id="unwritable-out-dir"),
    pytest.param(_existing_run_without_resume, id="existing-run-without-resume"),
    pytest.param(_resume_with_changed_recipe, id="resume-with-changed-recipe"),
    pytest.param(_corrupted_checkpoint, id="corrupted-checkpoint"),
    pytest.param(_all_checkpoints_incomplete, id="checkpoints-without-marker"),
    pytest.param(_resume_folder_missing, id="resume-folder-missing"),
    pytest.param(_not_utf8, id="recipe-not-utf8"),
    pytest.param(_set_without_equals, id="set-without-equals"),
    pytest.param(_set_bad_index, id="set-bad-index"),
    pytest.param(_pretrained, id="pretrained-kwarg"),
    pytest.param(_num_classes_kwarg, id="num_classes-kwarg"),
    pytest.param(_unknown_model_kwarg, id="unknown-model-kwarg"),
    pytest.param(_milestones_not_increasing, id="milestones-not-increasing"),
    pytest.param(_nesterov_without_momentum, id="nesterov-without-momentum"),
    pytest.param(_duplicate_peer_names, id="duplicate-peer-names"),
    pytest.param(_unknown_schedule_mode, id="unknown-schedule-mode"),
    pytest.param(_unsupported_dataset, id="unsupported-dataset"),
    pytest.param(_image_folder_without_size, id="image_folder-without-image_size"),
    pytest.param(_temperature_zero, id="temperature-zero"),
    pytest.param(_no_recipe, id="no-recipe"),
    pytest.param(_recipe_is_a_folder, id="recipe-is-a-folder"),
    pytest.param(_recipe_missing, id="recipe-missing"),
]


def check_message(case: Case, code: int, stderr: str) -> None:
    assert code == 2, f"exit code {code}, expected 2\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("error: ") and "fix:" in stderr, f"not one 'error: ... fix: ...' message:\n{stderr}"
    for name in case.names:
        assert name in stderr, f"the message does not name {name}:\n{stderr}"
    if case.field is not None:
        assert f"[{case.field}]" in stderr, f"the message does not name the field [{case.field}]:\n{stderr}"
    for phrase in case.says:
        assert phrase in stderr, f"the message does not say {phrase!r}:\n{stderr}"
    for phrase in case.avoid:
        assert phrase not in stderr, f"the message should not have {phrase!r}:\n{stderr}"


@pytest.mark.parametrize("build", CASES)
def test_refused_with_exit_2_one_message_and_nothing_written(world: World, tmp_path: Path, build,
                                                             folder_snapshot: Snapshot) -> None:
    case = build(world, tmp_path)
    before = {"world": folder_snapshot(world.base), "case": folder_snapshot(tmp_path)}
    with torch_flags_kept():
        result = CliRunner().invoke(app, case.args, env=ENV)
    # A SystemExit carries the exit code; any other exception escaped the CLI's handlers.
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    check_message(case, result.exit_code, result.stderr)
    assert result.stdout == "", f"nothing but the error should be printed:\n{result.stdout}"
    after = {"world": folder_snapshot(world.base), "case": folder_snapshot(tmp_path)}
    for where in before:
        changed = sorted(set(before[where]) ^ set(after[where])) + sorted(
            k for k in set(before[where]) & set(after[where]) if before[where][k] != after[where][k]
        )
        assert not changed, f"files written, changed or removed under the {where} folder: {changed}"


def test_real_process_exits_2_with_the_same_message(world: World, tmp_path: Path, folder_snapshot: Snapshot,
                                                    run_cli: Callable[..., Any]) -> None:
    """The same contract through ``python -m mutualkd`` in a fresh interpreter, for the case
    that gets furthest (models built, the run folder found to hold a run)."""
    case = _existing_run_without_resume(world, tmp_path)
    before = folder_snapshot(world.base)
    done = run_cli(case.args, timeout=240)
    check_message(case, done.returncode, done.stderr)
    assert folder_snapshot(world.base) == before
