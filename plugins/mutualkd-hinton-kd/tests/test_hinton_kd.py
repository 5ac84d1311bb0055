"""Tests of the example strategy plugin: the pure loss, the conformance kit, a recipe run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mutualkd import get_strategy
from mutualkd.config import parse_recipe
from mutualkd.errors import CheckpointError, RecipeError
from mutualkd.testing import check_strategy, make_teacher
from mutualkd_hinton_kd import HintonKD, hinton_kd_terms


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"))


# ---------------------------------------------------------------------------- the loss


def _logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g), torch.randint(0, 10, (5,), generator=g)


def test_alpha_zero_is_cross_entropy_alpha_one_is_soft_term() -> None:
    s, t, y = _logits()
    ce = F.cross_entropy(s, y)
    terms = hinton_kd_terms(s, t, y, temperature=4.0, alpha=0.0)
    assert terms["ce"].item() == pytest.approx(ce.item()) and terms["kd"].item() == 0.0
    terms = hinton_kd_terms(s, t, y, temperature=4.0, alpha=1.0)
    assert terms["ce"].item() == 0.0 and terms["kd"].item() > 0.0


def test_soft_term_matches_the_formula() -> None:
    s, t, y = _logits()
    T = 3.0
    p_t, p_s = (t / T).softmax(1), (s / T).softmax(1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    terms = hinton_kd_terms(s, t, y, temperature=T, alpha=0.5)
    assert terms["kd"].item() == pytest.approx(0.5 * T * T * kl.item(), rel=1e-5)


def test_soft_term_is_zero_when_student_equals_teacher_and_teacher_gets_no_gradient() -> None:
    s, _, y = _logits()
    t = s.clone().requires_grad_(True)
    terms = hinton_kd_terms(s, t, y, temperature=4.0, alpha=0.9)
    assert math.isclose(terms["kd"].item(), 0.0, abs_tol=1e-6)
    assert not terms["kd"].requires_grad  # the teacher is a constant


# ---------------------------------------------------------------------------- the plugin


def test_conforms_to_the_strategy_contract(teacher: Path, tmp_path: Path) -> None:
    check_strategy(HintonKD, params={"teacher": str(teacher), "temperature": 2.0}, tmp_path=tmp_path)


def test_installed_entry_point_is_this_class() -> None:
    # Needs `pip install -e plugins/mutualkd-hinton-kd` (done by `make install`).
    assert get_strategy("hinton_kd") is HintonKD


def test_recipe_runs_and_refuses_bad_params(teacher: Path, tmp_path: Path) -> None:
    from mutualkd.engine import Trainer

    def recipe(**strategy: object):
        return parse_recipe({
            "run": {"out_dir": str(tmp_path), "max_steps": 2, "progress": False, "device": "cpu"},
            "data": {"dataset": "digits", "batch_size": 16, "train_subset": 32, "test_subset": 32},
            "peers": [{"model": "cifar_wrn_16_1"}],
            "strategy": {"name": "hinton_kd", **strategy},
        })

    summary = Trainer(recipe(teacher=str(teacher), alpha=0.5), recipe_file="kd.toml").fit()
    assert summary["global_steps"] == 2
    with pytest.raises(RecipeError, match=r"strategy\.alpha"):
        Trainer(recipe(teacher=str(teacher), alpha=1.5), recipe_file="kd.toml")
    with pytest.raises(RecipeError, match=r"strategy\.teacher"):
        Trainer(recipe(), recipe_file="kd.toml")
    with pytest.raises(CheckpointError, match="not found|no complete checkpoint"):
        Trainer(recipe(teacher=str(tmp_path / "nowhere")), recipe_file="kd.toml")
