"""The method study's plan and statistics (scripts/fashion_mnist_study.py, scripts/study_stats.py)."""

from __future__ import annotations

import math
from pathlib import Path
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fashion_mnist_study as study  # noqa: E402
from study_stats import Interval, mean_interval, paired_test, verdict  # noqa: E402


def test_mean_interval_is_the_t_interval() -> None:
    v = [90.1, 90.7, 90.4]
    iv = mean_interval(v)
    sd = float(np.std(v, ddof=1))
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2)
    assert (iv.mean, iv.sd, iv.n) == (pytest.approx(90.4), pytest.approx(sd), 3)
    assert (iv.low, iv.high) == (pytest.approx(90.4 - half), pytest.approx(90.4 + half))
    one = mean_interval([1.0])
    assert one.low == -math.inf and one.high == math.inf


def test_paired_test_matches_scipy() -> None:
    a = {0: 91.0, 1: 90.6, 2: 91.3, 3: 90.9}
    b = {0: 90.5, 1: 90.4, 2: 90.6, 3: 90.8, 9: 50.0}  # seed 9 has no pair: ignored
    res = paired_test("a beats b", "a", "b", {"a": a, "b": b})
    ref = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    assert res.seeds == (0, 1, 2, 3)
    assert res.t == pytest.approx(ref.statistic) and res.p == pytest.approx(ref.pvalue)
    assert res.interval.mean == pytest.approx(np.mean([0.5, 0.2, 0.7, 0.1]))


@pytest.mark.parametrize("low,high,expected", [(0.1, 0.9, "reproduced"), (-0.5, 0.2, "not reproduced"),
                                                (-0.9, -0.1, "not reproduced"), (-0.2, 0.6, "inconclusive")])
def test_verdict(low: float, high: float, expected: str) -> None:
    iv = Interval(mean=(low + high) / 2, low=low, high=high, n=3, sd=1.0)
    assert verdict(iv, 0.25) == expected
    # lower is better (CKA): the mirror image
    mirrored = Interval(mean=-iv.mean, low=-high, high=-low, n=3, sd=1.0)
    assert verdict(mirrored, 0.25, higher_is_better=False) == expected


def test_paired_test_without_pairs_is_inconclusive() -> None:
    assert paired_test("x", "a", "b", {"a": {0: 1.0}}).verdict == "inconclusive"


@pytest.mark.parametrize("scale", ["cpu", "tiny", "paper"])
def test_every_arm_is_a_valid_recipe_and_teachers_come_first(scale: str, tmp_path: Path) -> None:
    from mutualkd.config import parse_recipe

    sc = study.make_scale(scale, tmp_path)  # no CIFAR under tmp_path: paper scale falls back to Fashion-MNIST
    seed = 2 if scale == "paper" else 0  # the cpu and tiny scales' one teacher is an arm of seed 0
    plan = study.arms(sc, tmp_path, seed=seed)
    names = [arm for arm, _ in plan]
    assert names.index("teacher") < names.index("hinton_kd") < names.index("ie_kd")
    assert ("student" in names) == (scale == "paper")
    for arm, recipe in plan + [study.convergence_arm(sc, tmp_path, seed)]:
        rec = parse_recipe(recipe, file=f"<{arm}>")
        assert rec.run.seed == seed and rec.run.name.endswith(f"-s{seed}")
    by = dict(plan)
    assert by["ie_kd"]["strategy"]["teacher"] == str(tmp_path / f"teacher-s{seed}")
    assert by["teacher"]["peers"][0]["model"] == "cifar_wrn_40_2" and by["ie_kd"]["peers"][0]["model"] == "cifar_wrn_16_1"
    if scale == "cpu":
        d = by["independent"]["data"]
        assert (d["train_subset"], d["subset_seed"]) == (5000, 0) and "test_subset" not in by["ie_kd"]["data"]
        assert by["independent"]["run"]["epochs"] == by["ie_kd"]["run"]["epochs"] == 40
        assert by["ie_kd"]["data"]["subset_seed"] == by["teacher"]["data"]["subset_seed"] == 0
        # the teacher's own regularisation stays the teacher's: the students train without dropout
        assert by["teacher"]["peers"][0]["kwargs"] == {"drop_rate": 0.3}
        assert all("kwargs" not in by[a]["peers"][0] for a in ("independent", "hinton_kd", "ie_kd"))
        assert by["teacher"]["optimizer"] == by["ie_kd"]["optimizer"]


def test_cpu_scale_shares_one_teacher_and_runs_it_first(tmp_path: Path) -> None:
    sc = study.make_scale("cpu", tmp_path)
    other = dict(study.arms(sc, tmp_path, seed=2))
    assert "teacher" not in other and other["hinton_kd"]["strategy"]["teacher"] == str(tmp_path / "teacher-s0")
    todo = study.chains(sc, tmp_path, [0, 1, 2], convergence=True)
    order = [r["run"]["name"] for chain in todo for r in chain]
    assert order[0] == "teacher-s0" and len(todo[0]) == 1 and order.count("teacher-s0") == 1
    expected = {f"{a}-s{s}" for a in ("independent", "kl_dml", "ie_dml", "hinton_kd", "ie_kd") for s in (0, 1, 2)}
    assert set(order) == expected | {"teacher-s0", "convergence-x2-s0"} and len(order) == len(set(order))
    # the first student comes after enough other runs that a second worker is not left waiting long
    assert order.index("hinton_kd-s0") > order.index("ie_dml-s0")
    # per-seed teachers (paper scale): each seed's students follow their own teacher in one chain
    paper = study.chains(study.make_scale("paper", tmp_path), tmp_path, [0, 1, 2], convergence=False)
    for seed, chain in zip((0, 1, 2), paper):
        assert [r["run"]["name"] for r in chain][0] == f"teacher-s{seed}"


def test_arms_select_the_runs_and_a_kd_arm_brings_its_teacher(tmp_path: Path) -> None:
    assert [study.arm_of(n) for n in ("ie_kd-s2", "kl_dml-s0", "convergence-x2-s0", "teacher-s0")] == \
        ["ie_kd", "kl_dml", "convergence", "teacher"]
    todo = study.chains(study.make_scale("cpu", tmp_path), tmp_path, [0, 1, 2], convergence=True)
    kept = study.select_arms(todo, ["independent", "hinton_kd"])
    order = [r["run"]["name"] for chain in kept for r in chain]
    assert order[0] == "teacher-s0" and all(chain for chain in kept)
    assert set(order) == {"teacher-s0"} | {f"{a}-s{s}" for a in ("independent", "hinton_kd") for s in (0, 1, 2)}
    assert [r["run"]["name"] for chain in study.select_arms(todo, ["kl_dml"]) for r in chain] == \
        ["kl_dml-s0", "kl_dml-s1", "kl_dml-s2"]


def test_teacher_check_needs_a_margin_larger_than_the_seed_spread() -> None:
    per_seed = {"student": {0: 88.23, 1: 87.89, 2: 87.83}, "teacher": {0: 88.9}}
    arms_iv = {k: mean_interval(list(v.values())).as_dict() for k, v in per_seed.items()}
    mean, high = arms_iv["student"]["mean"], arms_iv["student"]["high"]
    # the full-split figure (from analyze) wins over the teacher's own 2 000-image evaluation
    weak = study.teacher_check(per_seed, arms_iv, {"hinton_kd": {0: {"teacher_top1": 87.65}}})
    assert weak["teacher_top1"] == 87.65 and weak["on"] == "full test split" and not weak["passed"]
    assert weak["spread"] == pytest.approx(0.40) and not weak["above_interval"]
    strong = study.teacher_check(per_seed, arms_iv, {})
    assert strong["on"] == "its own evaluation" and strong["passed"] and strong["margin"] == pytest.approx(88.9 - mean)
    assert strong["above_interval"] == (88.9 > high)
    # a margin just above the spread passes even inside the (wider) t interval; just below fails
    just_above = study.teacher_check(per_seed, arms_iv, {"ie_kd": {1: {"teacher_top1": mean + 0.41}}})
    assert just_above["passed"] and not just_above["above_interval"]
    just_below = study.teacher_check(per_seed, arms_iv, {"ie_kd": {1: {"teacher_top1": mean + 0.39}}})
    assert not just_below["passed"]
    assert study.teacher_check({}, {}, {}) == {}


def test_paper_scale_uses_cifar_when_present(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert study.make_scale("paper", tmp_path).data["dataset"] == "cifar10"
    (tmp_path / "cifar-100-python").mkdir()
    sc = study.make_scale("paper", tmp_path)
    assert sc.data["dataset"] == "cifar100" and sc.mutual_epochs == 200 and sc.kd_epochs == 160 and sc.ae_epochs == 30


def test_the_report_says_which_claims_were_not_run_and_prints_no_infinite_interval() -> None:
    per_seed = {"student": {0: 88.2, 1: 87.9, 2: 87.8}, "hinton_kd": {0: 88.5, 1: 88.2, 2: 88.7}, "teacher": {0: 88.4}}
    arms_iv = {a: mean_interval(list(v.values())).as_dict() | {"per_seed": v} for a, v in per_seed.items()}
    claims = [paired_test(c, b, w, per_seed).as_dict() | {"source": src} for c, b, w, src in study.CLAIMS]
    res = {"scale": "cpu", "arms": arms_iv, "student_is_independent": False, "claims": claims,
           "feature_similarity": {"per_run": {}, "claims": []}, "convergence": {}, "min_effect_top1": 0.25,
           "teacher_check": study.teacher_check(per_seed, arms_iv, {})}
    text = study.markdown(res, {"command": "x", "machine": "y", "wall_min": 1.0})
    rows = {line.split(" (")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "not run" in rows["mutual learning beats independent training"]
    assert "not run" not in rows["Hinton KD improves the student"]
    assert "inf" not in text and "| teacher | 1 | 88.40 | [—, —] |" in text
    assert "## Teacher check" in text and ": passed." in text
