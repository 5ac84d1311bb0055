"""Tests of the example metric plugin: the conformance kit, the values, the entry point."""

from __future__ import annotations

import pytest
import torch

from mutualkd import get_metric
from mutualkd.testing import check_metric
from mutualkd_cosine import cosine_distance


def test_conforms_to_the_metric_contract() -> None:
    check_metric(cosine_distance, name="cosine")


def test_values_against_the_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [-3.0, -4.0], [2.0, 2.0]])
    # per sample: orthogonal 1, opposite 2, parallel 0
    assert cosine_distance(a, b).item() == pytest.approx(1.0)
    ref = (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean()
    assert cosine_distance(a, b).item() == pytest.approx(ref.item())


def test_feature_maps_are_flattened_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    assert cosine_distance(a, b).item() == pytest.approx(cosine_distance(a.flatten(1), b.flatten(1)).item())


def test_zero_samples() -> None:
    z = torch.zeros(2, 3)
    assert cosine_distance(z, z).item() == 0.0
    assert cosine_distance(z, torch.ones(2, 3)).item() == pytest.approx(0.5)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        cosine_distance(torch.ones(2, 3), torch.ones(2, 4))


def test_installed_entry_point_is_this_function() -> None:
    # Needs `pip install -e plugins/mutualkd-cosine` (done by `make install`).
    assert get_metric("cosine") is cosine_distance
