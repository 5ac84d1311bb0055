"""The all-methods online study (scripts/online_study.py): its plan, recipes and analysis."""

from __future__ import annotations

import json
import math
from pathlib import Path
import sys
import time

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import online_study as study  # noqa: E402

ARMS = {"independent", "independent_balanced", "kl_dml", "ie_dml", "one", "cl_ilr", "okddip", "pcl", "ffl",
        "kdcl", "mcl", "switokd"}


def test_the_plan_has_every_arm_and_seed(tmp_path: Path) -> None:
    sc = study.make_scale("cpu")
    todo = study.plan(sc, tmp_path, [0, 1, 2])
    assert {(a, s) for a, s, _ in todo} == {(a, s) for a in ARMS for s in (0, 1, 2)}
    names = [r["run"]["name"] for _, _, r in todo]
    assert len(names) == len(set(names)) == 36 and all(r["run"]["seed"] == s for _, s, r in todo)
    assert sc.seeds == (0, 1, 2) and study.make_scale("tiny").seeds == (0, 1)


@pytest.mark.parametrize("scale", ["cpu", "tiny", "paper"])
def test_every_recipe_validates(scale: str, tmp_path: Path) -> None:
    from mutualkd.config import parse_recipe
    from mutualkd.engine import check_recipe

    for arm, _, rec in study.plan(study.make_scale(scale, tmp_path), tmp_path, [0]):
        parsed = parse_recipe(rec, file=f"<{arm}>")
        check_recipe(parsed, recipe_file=f"<{arm}>", data=False)


def test_one_protocol_across_arms(tmp_path: Path) -> None:
    sc = study.make_scale("cpu")
    by = {a: r for a, _, r in study.plan(sc, tmp_path, [1])}
    for arm, r in by.items():
        assert r["optimizer"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
        assert r["scheduler"] == {"name": "cosine"} and r["run"]["epochs"] == 40
        assert {p["model"] for p in r["peers"]} == {"cifar_wrn_16_1"}
        d = dict(r["data"])
        balanced = arm in ("mcl", "independent_balanced")
        assert (d.pop("batch_size"), d.pop("images_per_class", None)) == ((120, 12) if balanced else (128, None)), arm
        # the data table of the method study's cpu scale: one 5 000-image subset, the full test split
        assert d == {"dataset": "fashion_mnist", "image_size": 16, "train_subset": 5000, "subset_seed": 0,
                     "eval_batch_size": 1000, "augment": True}
    branches = {a: (r["peers"][0].get("branches"), r["peers"][0].get("split_after")) for a, r in by.items()}
    assert {a: b for a, (b, _) in branches.items() if b} == {"one": 3, "cl_ilr": 4, "okddip": 4, "pcl": 3, "ffl": 2}
    assert all(s == "layer2" for b, s in branches.values() if b) and by["cl_ilr"]["peers"][0]["ilr"] is True
    assert all(len(by[a]["peers"]) == 2 for a in ("independent", "kl_dml", "ie_dml", "kdcl", "mcl", "switokd"))
    assert by["switokd"]["peers"][1]["optimizer"]["lr"] == 0.01 and "optimizer" not in by["switokd"]["peers"][0]
    for arm in ("one", "okddip", "pcl", "ffl"):
        assert by[arm]["strategy"]["rampup_epochs"] == 10
    paper = {a: r for a, _, r in study.plan(study.make_scale("paper", tmp_path), tmp_path, [0])}
    assert paper["mcl"]["data"]["images_per_class"] == 2 and paper["one"]["strategy"]["rampup_epochs"] == 80
    assert {r["run"]["epochs"] for r in paper.values()} == {300}


def _fake_run(out: Path, arm: str, seed: int, acc: float, *, peers: list[str], best_output: str = "peers",
              extra: dict[str, float] | None = None) -> None:
    """A finished run folder: 3 epochs whose accuracy rises to ``acc``, best epoch 2 for the reported output."""
    folder = out / f"{arm}-s{seed}"
    folder.mkdir(parents=True)
    records = []
    for ep, delta in ((1, -5.0), (2, 0.5), (3, 0.0)):
        top1 = {p: acc + delta + 0.1 * i for i, p in enumerate(peers)}
        top1 |= {k: v + delta for k, v in (extra or {}).items()}
        records.append({"kind": "epoch", "stage": "train", "epoch": ep, "train_seconds": 2.0 + seed, "top1": top1,
                        **({"scalars": {"expert": 0.25}} if arm == "switokd" else {})})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    (folder / "summary.json").write_text(json.dumps({"best_output": best_output, "best_epoch": 2,
                                                      "outputs": {"peers": peers}, "top1": {}}), encoding="utf-8")
    (out / "costs").mkdir(exist_ok=True)
    (out / "costs" / f"{folder.name}.json").write_text(json.dumps([{"wall_s": 60.0, "max_rss_mib": 500.0 + seed,
                                                                             "user_s": 50.0 + seed, "sys_s": 4.0}]))


def test_analysis_of_fake_runs(tmp_path: Path) -> None:
    sc = study.make_scale("tiny")
    gains = {"independent": 0.0, "kl_dml": 0.6, "one": 1.5, "switokd": 0.05}
    for seed in (0, 1, 2):
        noise = (0.0, 0.1, -0.1)[seed]
        for arm, gain in gains.items():
            if arm == "one":
                _fake_run(tmp_path, arm, seed, 88 + gain + noise, peers=["net_b0", "net_b1", "net_b2"],
                          best_output="net_b0", extra={"gated": 90 + noise})
            else:
                spread = 2 if arm == "switokd" else 1
                _fake_run(tmp_path, arm, seed, 88 + gain + noise * spread, peers=["peer0", "peer1"])
    res = study.collect(tmp_path, sc, [0, 1, 2])
    one = res["arms"]["one"]
    assert one["reported_output"] == ["net_b0"]
    assert one["reported_last"]["mean"] == pytest.approx(89.5) and one["reported_best"]["mean"] == pytest.approx(90.0)
    assert one["peers_last"]["mean"] == pytest.approx(89.6) and one["peers_best"]["mean"] == pytest.approx(90.1)
    assert one["reported_last"]["n"] == 3 and one["reported_last"]["low"] < 89.5 < one["reported_last"]["high"]
    assert res["arms"]["independent"]["peers_last"]["mean"] == pytest.approx(88.05)
    tests = {(t["better"], t["worse"]): t for t in res["tests"]["reported_last"]}
    assert tests[("one", "kl_dml")]["verdict"] == "reproduced"
    assert tests[("one", "independent")]["interval"]["mean"] == pytest.approx(89.5 - 88.05)
    assert tests[("kl_dml", "independent")]["verdict"] == "reproduced"
    assert tests[("switokd", "kl_dml")]["verdict"] == "not reproduced"
    assert set(tests) == {("kl_dml", "independent"), ("one", "kl_dml"), ("one", "independent"), ("switokd", "kl_dml"),
                          ("switokd", "independent")}  # the baselines are not compared with the methods
    cost = res["arms"]["switokd"]["cost"]
    assert cost == {"train_s_per_epoch": pytest.approx(3.0), "wall_min": pytest.approx(1.0),
                    "cpu_min": pytest.approx(55.0 / 60), "max_rss_mib": 502.0}
    assert res["arms"]["switokd"]["scalars"] == {"expert": pytest.approx(0.25)}
    text = study.markdown(res, {"command": "x", "machine": "m", "wall_min": 0.0})
    assert "| ONE | 3 branches | net_b0 | 89.50 [" in text and "73.79 / 78.40" in text
    assert one["other_outputs_last"] == {"gated": pytest.approx(90.0)} and "ONE: gated 90.00" in text
    assert "| SwitOKD | KL-DML |" in text and "not reproduced" in text and "| 0.9 | 502 | expert 0.250 |" in text
    assert not any(math.isnan(v) for v in (one["reported_last"]["sd"], cost["max_rss_mib"]))


def test_mcl_is_compared_with_the_balanced_baseline() -> None:
    assert study.baselines("mcl") == ("kl_dml", "independent_balanced")
    assert study.baselines("one") == ("kl_dml", "independent")
    assert study.baselines("independent_balanced") == study.baselines("kl_dml") == ("independent",)
    assert study.baselines("independent") == ()


@pytest.mark.slow
def test_tiny_scale_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two arms x two seeds through the real CLI: runs, costs, analysis, report; a rerun skips them."""
    monkeypatch.setattr(study, "METHODS", {a: study.METHODS[a] for a in ("kl_dml", "one")})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    t0 = time.time()
    assert study.main(["--scale", "tiny", "--out", str(tmp_path), "--jobs", "1"]) == 0
    res = json.loads((tmp_path / "online_study.json").read_text())
    assert set(res["arms"]) == {"kl_dml", "one"} and res["arms"]["one"]["reported_output"] == ["net_b0"]
    assert res["arms"]["one"]["cost"]["max_rss_mib"] > 50 and res["arms"]["kl_dml"]["reported_last"]["n"] == 2
    assert (tmp_path / "online_study.md").read_text().count("| ONE |") >= 2
    assert time.time() - t0 < 120
    assert study.main(["--scale", "tiny", "--out", str(tmp_path), "--jobs", "1"]) == 0
    assert "skip one-s1" in (tmp_path / "online_study.log").read_text()
    assert len(json.loads((tmp_path / "costs" / "one-s1.json").read_text())) == 1
