"""Experiment trackers through Accelerate (run.log_with), read back with each tracker's own reader.

TensorBoard's event files are read with TensorBoard's ``EventAccumulator``, MLflow's file
store with ``MlflowClient``; every scalar of metrics.jsonl must be there, at its global step.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from pathlib import Path
import shutil
from typing import Any

import pytest

from mutualkd.engine.tracking import recipe_config, scalars

#: The factory fixtures of tests/fixtures/ used here (make_trainer, read_metrics, run_cli, set_options, ...).
Factory = Callable[..., Any]

REPO = Path(__file__).resolve().parents[1]



def _need_tensorboard_and_mlflow() -> None:
    """Skip a test that runs the trackers when they are not installed (the lowest-releases check has none)."""
    pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("mlflow.tracking")


@pytest.fixture(autouse=True)
def _mlflow_file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow 3 opens a file store only when asked to (the run opts in for its own store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _tb_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run's TensorBoard events: tag -> {step: value} (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing import event_accumulator as tb

    folder = run_dir / "tracking" / "mutualkd"
    acc = tb.EventAccumulator(str(folder), size_guidance={tb.SCALARS: 0})  # 0: keep every event
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _mlflow_run(run_dir: Path) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "tracking" / "mlruns").resolve().as_uri())
    exps = [e for e in client.search_experiments() if e.name == "mutualkd"]
    assert len(exps) == 1
    runs = client.search_runs([exps[0].experiment_id])
    assert len(runs) == 1, "a resumed run continues the same MLflow run"
    return client, runs[0]


def _mlflow_scalars(client: Any, run: Any, tags: set[str]) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = {}
    for tag in tags:
        hist = sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: (m.step, m.timestamp))
        for m in hist:
            out.setdefault(tag, {}).setdefault(m.step, []).append(m.value)
    return out


def _expected(read_metrics: Callable[..., list[dict[str, Any]]], run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl's records as tracker scalars: tag -> {global step: value}."""
    out: dict[str, dict[int, float]] = {}
    for rec in read_metrics(run_dir):
        for tag, v in scalars(rec).items():
            out.setdefault(tag, {})[int(rec["global_step"])] = v
    return out


def _close(a: float, b: float) -> bool:
    # TensorBoard stores float32
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


# --------------------------------------------------------------------------- what is logged


def test_scalars_are_every_number_of_a_record():
    step = {"kind": "step", "stage": "train", "epoch": 1, "global_step": 8, "batch": 8,
            "steps": {"peer0": {"peer0/ce": 2.5, "peer0/kl": 0.25}, "peer1": {"peer1/ce": 2.25}},
            "lr": {"peer0": 0.05}, "images_per_s": 900.0, "forward_passes": 3}
    assert scalars(step) == {"step/epoch": 1.0, "step/batch": 8.0, "step/loss/peer0/ce": 2.5, "step/loss/peer0/kl": 0.25,
                             "step/loss/peer1/ce": 2.25, "step/lr/peer0": 0.05, "step/images_per_s": 900.0,
                             "step/forward_passes": 3.0}
    epoch = {"kind": "epoch", "stage": "train", "epoch": 2, "global_step": 16, "loss": {"peer0/ce": 2.0},
             "top1": {"peer0": 37.5, "ensemble": 40.0, "peer0_ema": 41.0}}
    assert scalars(epoch) == {"epoch/epoch": 2.0, "epoch/loss/peer0/ce": 2.0, "epoch/top1/peer0": 37.5,
                              "epoch/top1/ensemble": 40.0, "epoch/top1/peer0_ema": 41.0}


def test_recipe_config_is_flat():
    cfg = recipe_config({"run": {"seed": 1, "block_plugins": ["a"]}, "peers": [{"model": "m", "kwargs": {"x": 2}}]})
    assert cfg == {"run.seed": 1, "run.block_plugins": '["a"]', "peers.0.model": "m", "peers.0.kwargs.x": 2}


def test_a_tracker_that_is_not_installed_exits_2_naming_the_extra(tmp_path: Path, run_cli: Factory,
                                                                  set_options: Factory):
    proc = run_cli(["validate", str(REPO / "recipes" / "quickstart.toml"), "--no-data",
                    *set_options('run.log_with=["comet_ml"]')], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'mutualkd[comet_ml]'" in proc.stderr and "run.log_with[0]" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["swanlab", "trackio"])
def test_a_tracker_newer_than_the_installed_accelerate_names_the_release_it_needs(name: str,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    """On an Accelerate older than the tracker (swanlab 1.8, trackio 1.9) the recipe error names the
    release and the extra that brings it, instead of an AttributeError from accelerate.utils."""
    import accelerate.utils as au

    from mutualkd.engine.tracking import TRACKER_EXTRAS, TRACKER_MIN_ACCELERATE, check_trackers
    from mutualkd.errors import RecipeError

    monkeypatch.delattr(au, TRACKER_EXTRAS[name][1], raising=False)
    with pytest.raises(RecipeError) as e:
        check_trackers([name], file="r.toml")
    text = str(e.value)
    assert "run.log_with[0]" in text and f"accelerate {TRACKER_MIN_ACCELERATE[name]}" in text, text
    assert f"pip install 'mutualkd[{name}]'" in text and "Traceback" not in text, text


def test_an_unknown_tracker_name_is_refused(tmp_path: Path, recipe_dict: Factory):
    from mutualkd.config import parse_recipe
    from mutualkd.errors import RecipeError
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict(tmp_path, run={"log_with": ["tensorbord"]}), file="<test>")
    assert "run.log_with[0]" in str(e.value) and "'tensorboard'" in str(e.value)


# --------------------------------------------------------------------------- a quickstart run, read back


@pytest.mark.slow
def test_quickstart_scalars_in_tensorboard_and_mlflow_equal_metrics_jsonl(tmp_path: Path, read_metrics: Factory,
                                                                          run_cli: Factory, set_options: Factory):
    _need_tensorboard_and_mlflow()
    proc = run_cli(["run", str(REPO / "recipes" / "quickstart.toml"),
                    *set_options('run.log_with=["tensorboard","mlflow"]', f"run.out_dir={tmp_path}", "run.epochs=2",
                          "data.train_subset=256", "run.log_every=3", "run.progress=false")], timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "quickstart"
    expected = _expected(read_metrics, run_dir)
    assert "epoch/top1/peer0" in expected and "step/loss/peer1/kl" in expected and "step/lr/peer0" in expected

    got = _tb_scalars(run_dir)
    assert set(got) == set(expected)
    for tag, by_step in expected.items():
        assert set(got[tag]) == set(by_step), tag
        assert all(_close(got[tag][s], v) for s, v in by_step.items()), tag

    client, run = _mlflow_run(run_dir)
    assert run.info.run_name == "quickstart"
    ml = _mlflow_scalars(client, run, set(expected))
    for tag, by_step in expected.items():
        assert {s: vs[-1] for s, vs in ml[tag].items()} == by_step, tag  # float64: exactly
    params = run.data.params
    assert params["strategy.name"] == "kl_dml" and params["peers.1.model"] == "cifar_wrn_16_1"
    assert params["optimizer.lr"] == "0.05" and params["run.seed"] == "0"


@pytest.mark.slow
def test_resume_continues_the_same_tracker_runs(tmp_path: Path, make_recipe: Factory, make_trainer: Factory,
                                                read_metrics: Factory):
    """Resumed from an earlier checkpoint, the run logs steps 5..6 again: TensorBoard's reader keeps
    the resumed values only (purge_step); MLflow continues its run and keeps both (documented)."""
    _need_tensorboard_and_mlflow()
    kw: dict[str, Any] = dict(name="r", max_steps=6, epochs=1, log_every=1,
                              run={"log_with": ["tensorboard", "mlflow"], "checkpoint_every": 2, "keep_checkpoints": 2})
    make_trainer(tmp_path, **kw).fit()
    run_dir = tmp_path / "r"
    _, first = _mlflow_run(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")  # the run resumes from step 4
    from mutualkd.engine import Trainer
    t = Trainer(make_recipe(tmp_path, **kw), recipe_file="<test>", resume=run_dir)
    assert t.resumed_from is not None and t.resumed_from.name == "step-00000004"
    t.fit()
    client, again = _mlflow_run(run_dir)
    assert again.info.run_id == first.info.run_id
    expected = _expected(read_metrics, run_dir)
    got = _tb_scalars(run_dir)  # asserts no step twice
    for tag, by_step in expected.items():
        if tag.endswith(("images_per_s", "train_seconds", "data_wait_share")):
            continue  # timings differ between the two runs of steps 5..6; the reader has the resumed ones
        assert all(_close(got[tag][s], v) for s, v in by_step.items()), tag
    ml = _mlflow_scalars(client, again, {"step/loss/peer0/ce"})["step/loss/peer0/ce"]
    assert [len(ml[s]) for s in sorted(ml)] == [1, 1, 1, 1, 2, 2]
    assert {s: vs[-1] for s, vs in ml.items()} == expected["step/loss/peer0/ce"]


def test_trackers_log_from_the_main_process_only(tmp_path: Path, make_trainer: Factory):
    """A non-main process starts no tracker (Accelerate's trackers are never created there)."""
    _need_tensorboard_and_mlflow()
    t = make_trainer(tmp_path, name="m", max_steps=1, run={"log_with": ["tensorboard"]})
    t.is_main = False
    t.fit()
    assert not (tmp_path / "m" / "tracking").exists()
    assert t.accelerator.trackers == []
