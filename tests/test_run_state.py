"""Run state has one owner: the contracts the trainer and its checkpoints are typed against.

The two loaders satisfy one :class:`~mutualkd.data.protocol.Loader`; stateful callbacks are
:class:`~mutualkd.engine.hooks.StatefulCallback` objects, found by the protocol and saved under
their ``state_key``; :func:`~mutualkd.engine.process.on_main` is the one "main process does the
work, every process gets its error"; the trainer's state is put back by the trainer itself.
Exact resume is tested end to end in test_resume.py and test_faults.py.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from mutualkd.config import DataConfig
from mutualkd.data import BatchLoader, load_dataset
from mutualkd.data.protocol import Loader
from mutualkd.data.sources import SplitSource
from mutualkd.data.stream import StreamDataset, StreamLoader
from mutualkd.engine.ema import EmaPeers
from mutualkd.engine.hooks import Callback, StatefulCallback
from mutualkd.engine.process import on_main
from mutualkd.engine.snapshot import callback_state, load_callback_state, stateful_callbacks
from mutualkd.engine.state import EpochTotals
from mutualkd.engine.tracking import TrackerLog
from mutualkd.errors import CheckpointError, UserError

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- loaders
def test_both_loaders_satisfy_the_loader_protocol() -> None:
    from torchvision.transforms import ToTensor

    train, _, info = load_dataset(DataConfig(dataset="digits"))
    device = BatchLoader(train, info, batch_size=8, device="cpu", train=True, augment=False, seed=0)
    stream = StreamLoader(StreamDataset(SplitSource(train, 10, "digits train"), np.arange(32), ToTensor(), seed=0,
                                       train=False), batch_size=8, device="cpu", train=False, seed=0, num_workers=0)
    for loader in (device, stream):
        assert isinstance(loader, Loader)
        loader.load_state_dict(loader.state_dict())  # what a checkpoint does with it
    assert device.skipped is None and device.state_dict() == {}  # the device loader never leaves an image out
    assert stream.skipped == 0 and stream.state_dict() == {"skipped": 0}


# --------------------------------------------------------------------------- stateful callbacks
class _Counter(Callback):
    state_key = "counter"

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n = int(state["n"])


class _Defaulted(Callback):
    """No state_key of its own: the base's, the class name."""

    def __init__(self) -> None:
        self.n = 0

    state_dict = _Counter.state_dict
    load_state_dict = _Counter.load_state_dict


def test_stateful_callbacks_are_found_by_the_protocol_under_their_state_key() -> None:
    plain, counter = Callback(), _Counter()
    assert not isinstance(plain, StatefulCallback) and isinstance(counter, StatefulCallback)
    assert isinstance(TrackerLog([]), StatefulCallback)  # the engine's own go through the same door
    assert EmaPeers.state_key == "ema" and TrackerLog.state_key == "tracking"
    assert stateful_callbacks([plain, counter, _Defaulted()]).keys() == {"counter", "_Defaulted"}

    counter.n = 7
    saved = callback_state([plain, counter])
    assert saved == {"counter": {"n": 7}}
    fresh, added = _Counter(), _Defaulted()
    load_callback_state([fresh, added], saved, where="run")
    assert fresh.n == 7 and added.n == 0  # one the checkpoint has no state for starts afresh


def test_two_callbacks_with_one_state_key_are_refused() -> None:
    with pytest.raises(UserError, match="two callbacks save their state under 'counter'"):
        stateful_callbacks([_Counter(), _Counter()])


def test_a_callback_state_that_does_not_fit_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="does not match") as e:
        load_callback_state([_Counter()], {"counter": {}}, where="runs/x/checkpoints/step-4")
    assert e.value.where == "runs/x/checkpoints/step-4"


# --------------------------------------------------------------------------- main-process work
def _one_process() -> Any:
    return SimpleNamespace(is_main_process=True, num_processes=1)


def test_on_main_returns_the_work_and_raises_its_error_as_asked() -> None:
    assert on_main(_one_process(), lambda: ["a note"]) == ["a note"]
    cleaned: list[str] = []

    def fail() -> None:
        raise UserError("disk full", where="runs/x", hint="free space")

    with pytest.raises(CheckpointError) as e:
        on_main(_one_process(), fail, error=CheckpointError, if_failed=lambda: cleaned.append("released"))
    assert (e.value.message, e.value.where, e.value.hint) == ("disk full", "runs/x", "free space")
    assert cleaned == ["released"]


def test_on_main_does_no_work_on_other_processes() -> None:
    other = SimpleNamespace(is_main_process=False, num_processes=1)
    assert on_main(other, lambda: pytest.fail("ran off the main process")) is None


# --------------------------------------------------------------------------- the trainer owns its state
def test_epoch_totals_round_trip_through_a_checkpoint_state() -> None:
    totals = EpochTotals()
    totals.add({"train": {"peer0/ce": torch.tensor(2.0), "peer1/ce": torch.tensor(1.0)}}, {"tau": torch.tensor(4.0)})
    totals.add({"train": {"peer0/ce": torch.tensor(1.0), "peer1/ce": torch.tensor(3.0)}}, None)
    again = EpochTotals()
    again.load_state_dict(totals.state_dict())
    for t in (totals, again):
        assert t.loss() == {"peer0/ce": 1.5, "peer1/ce": 2.0} and t.scalar_means() == {"tau": 4.0}
    again.reset()
    assert again.loss() == {} and again.count == 0


def test_snapshot_assigns_no_trainer_attribute() -> None:
    """The trainer's state is put back by the trainer (``Trainer.load_state_dict``), not from outside."""
    tree = ast.parse((ROOT / "mutualkd/engine/snapshot.py").read_text(encoding="utf-8"))
    written = [
        f"line {node.lineno}: {ast.unparse(target)}"
        for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for sub in ast.walk(target)
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in ("tr", "trainer")
    ]
    assert not written, f"snapshot.py assigns the trainer's attributes: {written}"
    private = [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and isinstance(n.value, ast.Name)
               and n.value.id in ("tr", "trainer")]
    assert not private, f"snapshot.py reads the trainer's private attributes: {private}"


# --------------------------------------------------------------------------- bottom modules
def _mutualkd_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "mutualkd" or n.startswith("mutualkd.")}


def test_the_unpickling_policy_is_a_bottom_module() -> None:
    assert _mutualkd_imports(ROOT / "mutualkd/trust.py") == {"mutualkd.errors"}


def test_runlog_does_not_import_checkpoint() -> None:
    assert "mutualkd.checkpoint" not in _mutualkd_imports(ROOT / "mutualkd/runlog.py")


def test_no_module_imports_timm_private_modules() -> None:
    """timm's private modules (``timm.models._hub``) change without notice; its public API is used instead."""
    found = []
    for path in sorted((ROOT / "mutualkd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names
                      if n.split(".")[0] == "timm" and any(part.startswith("_") for part in n.split("."))]
    assert not found, found
