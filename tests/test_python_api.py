"""mutualkd from Python: ``mutualkd.fit``, recipes as dicts, their errors, signal handlers,
the ``mutualkd`` logger, the report's figures without pyplot, and docs/python.md run as written."""

from __future__ import annotations

import json
from pathlib import Path
import re
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import mutualkd
from mutualkd.config import apply_overrides
from mutualkd.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "python.md"
MARK = "=== block {} ==="

#: Runs the code blocks given as a JSON list in one namespace, a marker line before each.
DRIVER = textwrap.dedent(
    """
    import json, sys
    blocks = json.load(open(sys.argv[1], encoding="utf-8"))
    ns = {"__name__": "__main__"}
    for i, code in enumerate(blocks):
        print(%r.format(i), flush=True)
        exec(compile(code, f"docs/python.md, python block {i}", "exec"), ns)
        sys.stdout.flush()
    """
    % MARK
)


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory: pytest.TempPathFactory, subprocess_env: Any) -> tuple[list[str], Path]:
    """docs/python.md's python blocks run in order in a fresh interpreter (cwd a tmp dir): each block's output."""
    work = tmp_path_factory.mktemp("python-doc")
    blocks = _fenced(DOC.read_text(encoding="utf-8"), "python")
    (work / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    (work / "driver.py").write_text(DRIVER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(work / "driver.py"), str(work / "blocks.json")], cwd=work,
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = re.split(r"^=== block \d+ ===\n", proc.stdout, flags=re.M)[1:]
    assert len(outputs) == len(blocks) == 8, proc.stdout
    return outputs, work


# --------------------------------------------------------------------------- docs/python.md


def test_doc_recipe_error_is_the_one_shown(doc_run: tuple[list[str], Path]) -> None:
    outputs, _ = doc_run
    shown = _fenced(DOC.read_text(encoding="utf-8"), "text")[0]
    assert outputs[1] == shown, outputs[1]


def test_doc_fit_with_overrides_and_summary(doc_run: tuple[list[str], Path]) -> None:
    outputs, work = doc_run
    assert "data: " in outputs[0] + outputs[2]  # the run's start line, printed by default (first fit)
    assert outputs[2].splitlines()[-2] == "2 8", outputs[2]  # run.epochs=2, run.max_steps=8 took effect
    finals = eval(outputs[2].splitlines()[-1])  # noqa: S307 - the dict the block printed
    assert set(finals) == {"peer0", "peer1", "ensemble"} and all(0 <= v <= 100 for v in finals.values())
    summary = json.loads((work / "runs" / "dml" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["global_steps"] == 8
    assert "summary.json" in outputs[4] and "metrics.jsonl" in outputs[4] and "best epoch:" in outputs[4]


def test_doc_callback_collected_every_epoch(doc_run: tuple[list[str], Path]) -> None:
    outputs, _ = doc_run
    rows = [eval(line) for line in outputs[3].splitlines() if line.startswith("{'epoch'")]  # noqa: S307
    assert [r["epoch"] for r in rows] == [1, 2, 3], outputs[3]
    assert all({"peer0", "peer1", "ensemble"} <= set(r) for r in rows)


def test_doc_figures(doc_run: tuple[list[str], Path]) -> None:
    outputs, work = doc_run
    assert outputs[5].strip().splitlines()[-1] == "['losses', 'losses_steps', 'top1']", outputs[5]
    png = work / "dml-collect-top1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_doc_quiet_and_redirected_log(doc_run: tuple[list[str], Path]) -> None:
    outputs, work = doc_run
    assert outputs[6] == "", f"the quiet run printed:\n{outputs[6]}"
    assert (work / "runs" / "dml-quiet" / "summary.json").is_file()
    # With a handler of the user's, the console shows nothing of the run: only what the block printed.
    last = outputs[7].strip().splitlines()
    assert len(last) == 1 and last[0].startswith("['train epoch 1"), outputs[-1]
    log = (work / "mutualkd.log").read_text()
    assert "data: " in log and "run dml-logged: test top-1" in log and "ensemble" in log


# --------------------------------------------------------------------------- recipes from Python


def test_misspelt_key_in_a_dict_recipe(recipe_dict: Any, tmp_path: Path) -> None:
    raw = recipe_dict(tmp_path)
    raw["peers"][1]["frozn"] = True
    with pytest.raises(RecipeError) as info:
        mutualkd.fit(raw)
    text = str(info.value)
    assert text.startswith("<dict> [peers[1].frozn]: unknown key") and "did you mean 'frozen'" in text, text
    assert info.value.file == "<dict>" and info.value.field == "peers[1].frozn"
    assert "pydantic" not in text and "validation error" not in text
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_misspelt_override_and_bad_value(recipe_dict: Any, tmp_path: Path) -> None:
    raw = recipe_dict(tmp_path)
    with pytest.raises(RecipeError, match=r"<dict> \[data\.batchsize\].*\n.*did you mean 'batch_size'"):
        mutualkd.fit(raw, overrides={"data.batchsize": 4})
    with pytest.raises(RecipeError, match=r"<dict> \[run\.epochs\]: Input should be greater than 0 \(got 0\)"):
        mutualkd.fit(raw, overrides={"run.epochs": 0})
    with pytest.raises(RecipeError, match=r"<dict> \[peers\.5\]: '5' is not an index of a list of length 2"):
        mutualkd.fit(raw, overrides={"peers.5.model": "cifar_resnet20"})
    with pytest.raises(RecipeError, match="overrides is a dict of dotted keys"):
        mutualkd.fit(raw, overrides=["run.epochs=2"])  # type: ignore[arg-type]


def test_recipe_object_with_overrides_and_a_toml_path(recipe_dict: Any, make_recipe: Any, tmp_path: Path) -> None:
    from mutualkd.api import resolve_recipe
    from mutualkd.runlog import dump_toml

    rec, file = resolve_recipe(make_recipe(tmp_path), {"run.epochs": 3, "peers.1.model": "cifar_resnet20"})
    assert file == "<Recipe>" and rec.run.epochs == 3 and rec.peers[1].model == "cifar_resnet20"
    path = tmp_path / "r.toml"
    path.write_text(dump_toml(recipe_dict(tmp_path)))
    rec, file = resolve_recipe(path, {"run.epochs": 3})
    assert file == str(path) and rec.run.epochs == 3
    with pytest.raises(RecipeError, match=r"r\.toml \[run\.epocs\].*\n.*did you mean 'epochs'"):
        resolve_recipe(str(path), {"run.epocs": 3})


def test_override_mapping_applies_as_set_does(recipe_dict: Any, tmp_path: Path) -> None:
    raw = recipe_dict(tmp_path)
    by_set = apply_overrides(raw, ["run.epochs=3", "peers.1.model=cifar_resnet32", "optimizer.lr=0.1", "data.new=x"])
    by_map = apply_overrides(raw, {"run.epochs": 3, "peers.1.model": "cifar_resnet32", "optimizer.lr": 0.1,
                                   "data.new": "x"})
    assert by_map == by_set and by_map != raw and raw["run"]["epochs"] == 1  # the input is left as it was
    value = [1, 2]
    out = apply_overrides(raw, {"scheduler.milestones": value})
    value.append(3)
    assert out["scheduler"]["milestones"] == [1, 2]  # values are copied


def test_import_stays_light_and_exports_the_api(subprocess_env: Any) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, mutualkd\n"
         "names = [mutualkd.fit, mutualkd.parse_recipe, mutualkd.load_recipe, mutualkd.Recipe]\n"
         "print(sorted(m for m in ('torch', 'timm', 'accelerate') if m in sys.modules))\n"
         "print(mutualkd.Trainer.__name__, mutualkd.Callback.__module__)"],
        capture_output=True, text=True, timeout=240, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "Trainer mutualkd.engine.hooks"], proc.stdout


# --------------------------------------------------------------------------- signals and logging


class _Recorder(mutualkd.Callback):
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.during: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        self.during = signal.getsignal(signal.SIGTERM)

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        if self.fail:
            raise RuntimeError("a callback that fails")


def _mine(signum: int, frame: Any) -> None:  # a handler of the caller's
    pass


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_signal_handlers_only_while_fit_runs(fail: bool, recipe_dict: Any, tmp_path: Path) -> None:
    before = {s: signal.signal(s, _mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rec = _Recorder(fail)
        if fail:
            with pytest.raises(RuntimeError, match="a callback that fails"):
                mutualkd.fit(recipe_dict(tmp_path), callbacks=[rec])
        else:
            summary = mutualkd.fit(recipe_dict(tmp_path), callbacks=[rec])
            assert summary["global_steps"] == 2
        assert rec.during is not None and rec.during is not _mine  # fit's own handler while it ran
        assert signal.getsignal(signal.SIGINT) is _mine and signal.getsignal(signal.SIGTERM) is _mine
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_run_lines_are_records_of_the_mutualkd_logger(recipe_dict: Any, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="mutualkd")
    mutualkd.fit(recipe_dict(tmp_path), overrides={"run.progress": True})
    names = {r.name for r in caplog.records}
    assert {"mutualkd.engine.trainer", "mutualkd.engine.hooks"} <= names, names
    text = caplog.text
    assert "data: " in text and "train epoch 1" in text and "run t: test top-1" in text
    caplog.clear()
    logging.getLogger("mutualkd").setLevel(logging.WARNING)
    try:
        mutualkd.fit(recipe_dict(tmp_path, name="q"), overrides={"run.progress": True})
    finally:
        logging.getLogger("mutualkd").setLevel(logging.INFO)
    assert not [r for r in caplog.records if r.name.startswith("mutualkd")], caplog.text


def test_console_handler_steps_aside_for_another_handler(subprocess_env: Any) -> None:
    """Nothing configured: the console prints the line, styled; a handler of the user's: it alone gets it."""
    code = ("import logging\n"
            "from mutualkd._logging import get_logger\n"
            "log = get_logger('mutualkd.x')\n"
            "log.info('note: first')\n"
            "logging.getLogger('mutualkd').addHandler(logging.StreamHandler(open('/dev/null', 'w')))\n"
            "log.info('note: second')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "note: first\n", proc.stdout


# --------------------------------------------------------------------------- the report's figures


def test_report_figures_leave_the_backend_alone(tiny_run: Path, subprocess_env: Any) -> None:
    code = (f"import matplotlib, sys\nimport mutualkd.report\n"
            f"figs = mutualkd.report.run_figures({str(tiny_run)!r})\n"
            "import matplotlib.figure\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules,"
            " all(isinstance(f, matplotlib.figure.Figure) for f in figs.values()), sorted(figs))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=subprocess_env(MPLBACKEND="svg"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "svg False True ['losses', 'losses_steps', 'top1']", proc.stdout
