"""``mutualkd analyze``: linear CKA between a run's student and its teacher on the test split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mutualkd.analyze import MAX_MATRIX_ENTRIES, analyze_run, linear_cka
from mutualkd.cli import app
from mutualkd_builtins.metrics import cka_debiased_distance, cka_distance


def ref_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Kornblith et al. 2019 with the centring matrix H, or Song et al.'s unbiased HSIC."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        if not debiased:
            h = np.eye(n) - np.ones((n, n)) / n
            return float(np.trace(a @ h @ b @ h))
        at, bt = a - np.diag(np.diag(a)), b - np.diag(np.diag(b))
        one = np.ones(n)
        return float(np.trace(at @ bt) + (one @ at @ one) * (one @ bt @ one) / ((n - 1) * (n - 2))
                     - 2.0 / (n - 2) * (one @ at @ bt @ one))

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("n,p,q", [(40, 3, 5), (6, 30, 20), (12, 12, 12)])  # feature form, Gram form, equal
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_the_formula(n: int, p: int, q: int, debiased: bool) -> None:
    g = torch.Generator().manual_seed(n + p + q)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) + 3.0  # uncentred on purpose
    y = x @ torch.randn(p, q, generator=g, dtype=torch.float64) + torch.randn(n, q, generator=g, dtype=torch.float64)
    # 1e-10: the reference applies Song's formula to uncentred Gram matrices, which cancels large terms
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(ref_cka(x.numpy(), y.numpy(), debiased), abs=1e-10)


def test_linear_cka_agrees_with_the_metrics() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, 2, 2, generator=g, dtype=torch.float64), torch.randn(16, 8, 2, 2, generator=g, dtype=torch.float64)
    y = y + x
    assert linear_cka(x.flatten(1), y.flatten(1)) == pytest.approx(1 - cka_distance(x, y).item(), abs=1e-12)
    assert linear_cka(x.flatten(1), y.flatten(1), debiased=True) == pytest.approx(
        1 - cka_debiased_distance(x, y).item(), abs=1e-12)


def test_linear_cka_refuses_what_it_cannot_compute() -> None:
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(torch.randn(3, 3), torch.randn(3, 3), debiased=True)
    with pytest.raises(ValueError, match="no variance"):
        linear_cka(torch.ones(5, 3), torch.randn(5, 3))
    n, p = math.isqrt(MAX_MATRIX_ENTRIES), math.isqrt(MAX_MATRIX_ENTRIES // 3) + 1  # both forms too large
    huge = torch.zeros(1, 1).expand(n, p)  # a view: refused before anything is allocated
    with pytest.raises(ValueError, match="max-samples"):
        linear_cka(huge, huge)


# --------------------------------------------------------------------------- finished runs
def _train(tmp: Path, name: str, strategy: dict, model: str, steps: int = 3) -> Path:
    from mutualkd.config import parse_recipe
    from mutualkd.engine import Trainer

    recipe = parse_recipe({
        "run": {"name": name, "out_dir": str(tmp), "max_steps": steps, "progress": False, "device": "cpu"},
        "data": {"dataset": "digits", "batch_size": 16, "test_subset": 100},
        "peers": [{"model": model}],
        "strategy": strategy,
    }, file="<test>")
    tr = Trainer(recipe, recipe_file="<test>")
    tr.fit()
    return tr.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("analyze")
    teacher = _train(tmp, "teacher", {"name": "independent"}, "cifar_resnet20")
    kd = _train(tmp, "ie_kd", {"name": "ie_kd", "teacher": str(teacher), "ae_epochs": 1}, "cifar_wrn_16_1", steps=90)
    return {"teacher": teacher, "ie_kd": kd}


@pytest.mark.slow
def test_analyze_an_ie_kd_run(runs: dict[str, Path]) -> None:
    r = analyze_run(runs["ie_kd"])
    assert r.teacher == str(runs["teacher"]) and r.teacher_model == "cifar_resnet20"
    assert r.student == "peer0" and r.student_model == "cifar_wrn_16_1"
    assert r.samples == 100
    assert r.student_shape == (64, 2, 2) and r.teacher_shape == (64, 2, 2)
    for v in (r.cka_maps, r.cka_pooled):
        assert 0.0 < v < 1.0
    for v in (r.cka_maps_debiased, r.cka_pooled_debiased):
        assert -1.0 <= v < 1.0
    assert 0.0 <= r.student_top1 <= 100.0 and 0.0 <= r.teacher_top1 <= 100.0


@pytest.mark.slow
def test_a_network_against_itself_has_cka_one(runs: dict[str, Path]) -> None:
    r = analyze_run(runs["teacher"], teacher=runs["teacher"], teacher_peer=0)
    assert r.cka_maps == pytest.approx(1.0, abs=1e-9) and r.cka_maps_debiased == pytest.approx(1.0, abs=1e-9)
    assert r.student_top1 == r.teacher_top1


@pytest.mark.slow
def test_cli_analyze(runs: dict[str, Path]) -> None:
    cli = CliRunner()
    res = cli.invoke(app, ["analyze", str(runs["ie_kd"]), "--json", "--max-samples", "50"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert row["samples"] == 50 and row["teacher_model"] == "cifar_resnet20"
    assert row["cka_maps"] == pytest.approx(analyze_run(runs["ie_kd"], max_samples=50).cka_maps, abs=1e-12)
    table = cli.invoke(app, ["analyze", str(runs["ie_kd"])])
    assert table.exit_code == 0 and "teacher-student linear CKA" in table.output
    # an independent run names no teacher: exit 2, one message with the fix
    res = cli.invoke(app, ["analyze", str(runs["teacher"])])
    assert res.exit_code == 2 and "has no teacher" in res.output and "--teacher" in res.output
    res = cli.invoke(app, ["analyze", str(runs["teacher"].parent / "missing")])
    assert res.exit_code == 2 and "no recipe.toml" in res.output
