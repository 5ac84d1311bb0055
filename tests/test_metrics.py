"""Tests of the built-in distance metrics (mutualkd_builtins.metrics).

The float64 references below are written independently of the implementation: numpy, explicit
per-sample loops, and the feature-space form of CKA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mutualkd.testing import check_metric
from mutualkd_builtins.metrics import (
    cka_debiased_distance,
    cka_distance,
    l1_distance,
    l2_distance,
    l2_per_sample_distance,
    orthogonal_distance,
    orthogonal_sq_distance,
)

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

METRICS: dict[str, Metric] = {
    "l1": l1_distance,
    "l2": l2_distance,
    "l2_per_sample": l2_per_sample_distance,
    "cka": cka_distance,
    "cka_debiased": cka_debiased_distance,
    "orthogonal": orthogonal_distance,
    "orthogonal_sq": orthogonal_sq_distance,
}
PER_SAMPLE = ["l1", "l2", "l2_per_sample", "orthogonal", "orthogonal_sq"]

SETTINGS = settings(max_examples=40, deadline=None)
EPS = 1e-12  # the implementation's normalisation floor


# --------------------------------------------------------------------------------------------
# strategies

shapes = st.tuples(
    st.integers(2, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)
)
# Bounded, no subnormals; tiny magnitudes are snapped to exactly 0 so that all-zero samples
# occur and near-zero ones (ill-conditioned normalisation) do not.
elements = st.floats(-100, 100, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                     width=32).map(lambda v: 0.0 if abs(v) < 1e-3 else v)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(shapes)
    a = draw(hnp.arrays(np.float64, shape, elements=elements))
    b = draw(hnp.arrays(np.float64, shape, elements=elements))
    return a, b


@st.composite
def seeded_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-conditioned float32 pairs (Gaussian, from a drawn seed)."""
    shape = draw(shapes)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# independent float64 references


def _unit_rows(x: np.ndarray) -> np.ndarray:
    rows = x.reshape(x.shape[0], -1).astype(np.float64)
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        out[i] = r / max(math.sqrt(float(np.dot(r, r))), EPS)
    return out


def ref_l1(a: np.ndarray, b: np.ndarray) -> float:
    ua, ub = _unit_rows(a), _unit_rows(b)
    total = 0.0
    for i in range(ua.shape[0]):
        for j in range(ua.shape[1]):
            total += abs(ua[i, j] - ub[i, j])
    return total / ua.size


def ref_l2(a: np.ndarray, b: np.ndarray) -> float:
    """The authors' NormLoss(p=2): root mean square over all B * N elements."""
    ua, ub = _unit_rows(a), _unit_rows(b)
    total = 0.0
    for i in range(ua.shape[0]):
        for j in range(ua.shape[1]):
            total += (ua[i, j] - ub[i, j]) ** 2
    return math.sqrt(total / ua.size)


def ref_l2_per_sample(a: np.ndarray, b: np.ndarray) -> float:
    ua, ub = _unit_rows(a), _unit_rows(b)
    return float(np.mean([np.linalg.norm(ua[i] - ub[i]) for i in range(ua.shape[0])]))


def _cosine_terms(a: np.ndarray, b: np.ndarray, term: Callable[[float], float]) -> float:
    ra = a.reshape(a.shape[0], -1)
    rb = b.reshape(b.shape[0], -1)
    terms = []
    for x, y in zip(ra, rb):
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        if nx == 0.0 or ny == 0.0:
            terms.append(0.0)  # documented convention: a pair with a zero sample contributes 0
        else:
            terms.append(term(float(np.dot(x, y)) / (nx * ny)))
    return float(np.mean(terms))


def ref_orthogonal(a: np.ndarray, b: np.ndarray) -> float:
    return _cosine_terms(a, b, lambda cos: 1.0 - abs(cos))


def ref_orthogonal_sq(a: np.ndarray, b: np.ndarray) -> float:
    return _cosine_terms(a, b, lambda cos: 1.0 - cos * cos)


def ref_cka(a: np.ndarray, b: np.ndarray) -> float:
    """1 - linear CKA in the feature-space form ||Y^T X||^2 / (||X^T X|| ||Y^T Y||)."""
    x = a.reshape(a.shape[0], -1).astype(np.float64)
    y = b.reshape(b.shape[0], -1).astype(np.float64)

    def centred(m: np.ndarray) -> tuple[np.ndarray, bool]:
        m = m / max(np.abs(m).max(), 1e-300)
        c = m - m.mean(axis=0, keepdims=True)
        tol = 100 * np.finfo(np.float64).eps
        return c, bool(np.sum(c * c) <= tol * tol * np.sum(m * m))

    xc, dx = centred(x)
    yc, dy = centred(y)
    if dx and dy:
        return 0.0
    if dx or dy:
        return 1.0
    num = np.linalg.norm(yc.T @ xc, "fro") ** 2
    den = np.linalg.norm(xc.T @ xc, "fro") * np.linalg.norm(yc.T @ yc, "fro")
    return 1.0 - num / den


def _song_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """n (n - 3) times the unbiased HSIC of Song et al. 2012, from its formula, with loops."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    trace = sum(kt[i, j] * lt[j, i] for i in range(n) for j in range(n))
    ones_k, ones_l = kt.sum(), lt.sum()
    klone = sum(kt[i, :].sum() * lt[i, :].sum() for i in range(n))  # 1^T K~ L~ 1 (symmetric K~)
    return trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * klone


def ref_cka_debiased(a: np.ndarray, b: np.ndarray) -> float:
    """1 - HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)); biased CKA for B < 4."""
    n = a.shape[0]
    if n < 4:
        return ref_cka(a, b)

    def unit(m: np.ndarray) -> tuple[np.ndarray, bool]:
        m = m.reshape(n, -1).astype(np.float64)
        m = m / max(np.abs(m).max(), 1e-300)
        c = m - m.mean(axis=0, keepdims=True)
        tol = 100 * np.finfo(np.float64).eps
        constant = bool(np.sum(c * c) <= tol * tol * np.sum(m * m))
        return c / (1.0 if constant else math.sqrt(np.sum(c * c))), constant

    def u_centred_sq_norm(k: np.ndarray) -> float:
        """sum of squares of the U-centred matrix (Szekely & Rizzo 2014), entry by entry.

        It equals _song_hsic(k, k) in exact arithmetic; it decides degeneracy because Song's
        formula cancels large terms and is only accurate to about eps * ||K||^2."""
        total = 0.0
        s_all = k.sum() - np.trace(k)
        for i in range(n):
            for j in range(n):
                if i != j:
                    ri = (k[i].sum() - k[i, i]) / (n - 2)
                    rj = (k[:, j].sum() - k[j, j]) / (n - 2)
                    total += (k[i, j] - ri - rj + s_all / ((n - 1) * (n - 2))) ** 2
        return total

    xu, cx = unit(a)
    yu, cy = unit(b)
    k, l = xu @ xu.T, yu @ yu.T
    kk, ll = _song_hsic(k, k), _song_hsic(l, l)
    tol = 100 * np.finfo(np.float64).eps * math.sqrt(n)
    dx, dy = cx or u_centred_sq_norm(k) <= tol * tol, cy or u_centred_sq_norm(l) <= tol * tol
    if dx and dy:
        return 0.0
    if dx or dy:
        return 1.0
    return 1.0 - float(np.clip(_song_hsic(k, l) / math.sqrt(kk * ll), -1.0, 1.0))


REFERENCES = {
    "l1": ref_l1,
    "l2": ref_l2,
    "l2_per_sample": ref_l2_per_sample,
    "cka": ref_cka,
    "cka_debiased": ref_cka_debiased,
    "orthogonal": ref_orthogonal,
    "orthogonal_sq": ref_orthogonal_sq,
}


# --------------------------------------------------------------------------------------------
# basic properties


@pytest.mark.parametrize("name", list(METRICS))
@SETTINGS
@given(pair=pairs())
def test_identity_is_zero(name: str, pair: tuple[np.ndarray, np.ndarray]) -> None:
    a = t64(pair[0]).float()
    d = METRICS[name](a, a.clone())
    assert d.shape == ()
    assert d.dtype == torch.float32
    assert abs(d.item()) <= 1e-6


@pytest.mark.parametrize("name", list(METRICS))
@SETTINGS
@given(pair=pairs())
def test_nonnegative_and_symmetric(name: str, pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = t64(pair[0]).float(), t64(pair[1]).float()
    dab = METRICS[name](a, b)
    dba = METRICS[name](b, a)
    assert torch.isfinite(dab)
    assert dab.item() >= 0.0
    assert dab.item() == pytest.approx(dba.item(), abs=1e-6)


@pytest.mark.parametrize("name", list(METRICS))
@SETTINGS
@given(pair=pairs())
def test_matches_float64_reference(name: str, pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    d = METRICS[name](t64(a), t64(b))
    assert d.dtype == torch.float64
    assert d.item() == pytest.approx(REFERENCES[name](a, b), abs=1e-9)


@pytest.mark.parametrize("name", list(METRICS))
@SETTINGS
@given(pair=seeded_pairs())
def test_float32_matches_float64_reference(
    name: str, pair: tuple[torch.Tensor, torch.Tensor]
) -> None:
    a, b = pair
    d = METRICS[name](a, b)
    assert d.dtype == torch.float32
    ref = REFERENCES[name](a.double().numpy(), b.double().numpy())
    assert d.item() == pytest.approx(ref, abs=2e-5)


@pytest.mark.parametrize("name", PER_SAMPLE)
@SETTINGS
@given(
    pair=seeded_pairs(),
    scales=st.lists(st.floats(1e-2, 1e2), min_size=6, max_size=6),
)
def test_per_sample_positive_scale_invariance(
    name: str, pair: tuple[torch.Tensor, torch.Tensor], scales: list[float]
) -> None:
    a, b = pair
    s = torch.tensor(scales[: a.shape[0]]).view(-1, *([1] * (a.ndim - 1)))
    s2 = torch.flip(s, dims=[0])
    metric = METRICS[name]
    assert metric(a * s, b * s2).item() == pytest.approx(metric(a, b).item(), abs=1e-5)


@SETTINGS
@given(pair=seeded_pairs(), seed=st.integers(0, 2**31 - 1), c=st.floats(1e-2, 1e2))
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(
    pair: tuple[torch.Tensor, torch.Tensor], seed: int, c: float
) -> None:
    a, b = (t.double() for t in pair)
    bsz, p = a.shape[0], a[0].numel()
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    a_rot = (a.reshape(bsz, p) @ q1).reshape(a.shape)
    b_rot = (b.reshape(bsz, p) @ q2).reshape(b.shape)
    base = cka_distance(a, b).item()
    assert cka_distance(a_rot, b_rot).item() == pytest.approx(base, abs=1e-9)
    assert cka_distance(a_rot, b).item() == pytest.approx(base, abs=1e-9)
    assert cka_distance(c * a, b).item() == pytest.approx(base, abs=1e-9)
    assert cka_distance(a, c * b).item() == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("name", ["orthogonal", "orthogonal_sq"])
@SETTINGS
@given(pair=pairs())
def test_orthogonal_in_unit_interval(name: str, pair: tuple[np.ndarray, np.ndarray]) -> None:
    d = METRICS[name](t64(pair[0]).float(), t64(pair[1]).float()).item()
    assert 0.0 <= d <= 1.0


@SETTINGS
@given(pair=pairs())
def test_cka_in_unit_interval(pair: tuple[np.ndarray, np.ndarray]) -> None:
    d = cka_distance(t64(pair[0]).float(), t64(pair[1]).float()).item()
    assert 0.0 <= d <= 1.0


@SETTINGS
@given(pair=pairs())
def test_cka_debiased_in_its_interval(pair: tuple[np.ndarray, np.ndarray]) -> None:
    d = cka_debiased_distance(t64(pair[0]).float(), t64(pair[1]).float()).item()
    assert 0.0 <= d <= 2.0


@SETTINGS
@given(pair=seeded_pairs(), seed=st.integers(0, 2**31 - 1), c=st.floats(1e-2, 1e2))
def test_cka_debiased_invariant_to_orthogonal_transform_and_isotropic_scaling(
    pair: tuple[torch.Tensor, torch.Tensor], seed: int, c: float
) -> None:
    a, b = (t.double() for t in pair)
    bsz, p = a.shape[0], a[0].numel()
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    base = cka_debiased_distance(a, b).item()
    assert cka_debiased_distance((a.reshape(bsz, p) @ q).reshape(a.shape), b).item() == pytest.approx(base, abs=1e-9)
    assert cka_debiased_distance(c * a, b).item() == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("name", list(METRICS))
def test_conformance_kit(name: str) -> None:
    check_metric(METRICS[name], name=name)


def test_l2_is_the_per_sample_form_over_sqrt_n() -> None:
    # Both are functions of the per-sample distances e_i = ||a^_i - b^_i||: the authors' l2 is
    # sqrt(mean e_i^2 / N), l2_per_sample is mean e_i; for equal e_i the ratio is sqrt(N).
    a = torch.randn(6, 32, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ratio = l2_per_sample_distance(a, -a).item() / l2_distance(a, -a).item()
    assert ratio == pytest.approx(math.sqrt(32 * 8 * 8), rel=1e-12)  # x45.25 for a 32x8x8 factor


def test_null_cka_at_small_batches() -> None:
    # Independent Gaussian factors, B = 16, p = 2048: biased CKA is near 1 (about p / (p + B)),
    # the debiased estimate near 0.
    gen = torch.Generator().manual_seed(12)
    biased, debiased = [], []
    for _ in range(4):
        x = torch.randn(16, 32, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randn(16, 32, 8, 8, generator=gen, dtype=torch.float64)
        biased.append(1 - cka_distance(x, y).item())
        debiased.append(1 - cka_debiased_distance(x, y).item())
    assert np.mean(biased) == pytest.approx(2048 / (2048 + 16), abs=0.002)
    assert abs(np.mean(debiased)) < 0.05


# --------------------------------------------------------------------------------------------
# known values


def test_l1_antiparallel_value() -> None:
    # Samples whose elements have equal magnitude normalise to +-1/sqrt(N); b = -a then gives
    # |a_hat - b_hat| = 2/sqrt(N) for every element, the maximum of the L1 distance.
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (4, 3, 2, 2), generator=gen).float() * 2 - 1
    scale = torch.tensor([0.5, 1.0, 3.0, 7.0]).view(4, 1, 1, 1)
    a = signs * scale
    n = 3 * 2 * 2
    assert l1_distance(a, -a).item() == pytest.approx(2 / math.sqrt(n), rel=1e-6)
    # General anti-parallel samples: 2 * mean |a_hat|.
    a = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    expected = 2 * np.mean(np.abs(_unit_rows(a.numpy())))
    assert l1_distance(a, -a).item() == pytest.approx(expected, rel=1e-12)


def test_l2_and_orthogonal_known_values() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 5.0], [0.0, -1.0], [-3.0, -4.0]])
    # rows: orthogonal, anti-parallel, anti-parallel
    assert l2_per_sample_distance(a, b).item() == pytest.approx((math.sqrt(2) + 2 + 2) / 3, rel=1e-6)
    # squared per-sample distances 2, 4, 4 over 3 * 2 elements
    assert l2_distance(a, b).item() == pytest.approx(math.sqrt((2 + 4 + 4) / 6), rel=1e-6)
    for name in ("orthogonal", "orthogonal_sq"):
        metric = METRICS[name]
        assert metric(a, b).item() == pytest.approx(1 / 3, rel=1e-6)
        assert metric(a[:1], b[:1]).item() == pytest.approx(1.0, rel=1e-6)
        assert metric(a[1:], b[1:]).item() == pytest.approx(0.0, abs=1e-7)
    # 45 degrees: |cos| = cos^2 * sqrt(2), so the two forms differ
    c, d = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert orthogonal_distance(c, d).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    assert orthogonal_sq_distance(c, d).item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("name", ["cka", "cka_debiased"])
def test_cka_degenerate_convention(name: str) -> None:
    metric = METRICS[name]
    const = torch.full((4, 3, 2, 2), 2.5)
    zeros = torch.zeros(4, 3, 2, 2)
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    assert metric(const, zeros).item() == 0.0
    assert metric(zeros, zeros).item() == 0.0
    assert metric(const, x).item() == 1.0
    assert metric(x, zeros).item() == 1.0


def test_cka_debiased_small_batches_use_the_biased_estimator() -> None:
    gen = torch.Generator().manual_seed(2)
    for bsz in (2, 3):
        x, y = torch.randn(bsz, 5, generator=gen), torch.randn(bsz, 5, generator=gen)
        assert cka_debiased_distance(x, y).item() == cka_distance(x, y).item()
    x, y = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    assert cka_debiased_distance(x, y).item() != pytest.approx(cka_distance(x, y).item(), abs=1e-3)


@pytest.mark.parametrize("bsz,p", [(8, 3), (3, 8), (5, 5)])
def test_cka_gram_and_feature_forms_agree(bsz: int, p: int) -> None:
    # B > p uses the feature form, B <= p the Gram form; both must match the reference.
    gen = torch.Generator().manual_seed(bsz * 10 + p)
    a = torch.randn(bsz, p, generator=gen, dtype=torch.float64)
    b = a @ torch.randn(p, p, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        bsz, p, generator=gen, dtype=torch.float64
    )
    assert cka_distance(a, b).item() == pytest.approx(ref_cka(a.numpy(), b.numpy()), abs=1e-12)


# --------------------------------------------------------------------------------------------
# gradients and degenerate inputs


def _grads(metric: Metric, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    d = metric(a, b)
    d.backward()
    assert a.grad is not None and b.grad is not None
    return d.detach(), a.grad, b.grad


@pytest.mark.parametrize("name", list(METRICS))
def test_finite_values_and_gradients_on_degenerate_inputs(name: str) -> None:
    metric = METRICS[name]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 2, generator=gen)
    y = torch.randn(4, 3, 2, 2, generator=gen)
    some_zero = x.clone()
    some_zero[1] = 0.0
    some_zero[3] = 0.0
    zeros = torch.zeros_like(x)
    cases = [
        (some_zero, y),
        (y, some_zero),
        (some_zero, some_zero),
        (zeros, y),
        (zeros, zeros),
        (x, x),
        (torch.full_like(x, 3.0), torch.full_like(x, 3.0)),
    ]
    for a, b in cases:
        d, ga, gb = _grads(metric, a, b)
        assert torch.isfinite(d), (name, d)
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all(), name
    # a == b is the minimum: zero value, zero gradient.
    for a in (x, some_zero, zeros):
        d, ga, gb = _grads(metric, a, a)
        assert abs(d.item()) <= 1e-6
        assert ga.abs().max().item() <= 1e-4 and gb.abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("name", list(METRICS))
def test_same_tensor_both_arguments_has_finite_gradient(name: str) -> None:
    a = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    METRICS[name](a, a).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("name", list(METRICS))
def test_gradcheck(name: str) -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(4, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(METRICS[name], (a, b), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------
# validation, dtypes, devices


@pytest.mark.parametrize("name", ["cka", "cka_debiased"])
def test_cka_rejects_batch_of_one(name: str) -> None:
    with pytest.raises(ValueError, match="B >= 2"):
        METRICS[name](torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("name", list(METRICS))
def test_shape_mismatch_raises(name: str) -> None:
    with pytest.raises(ValueError) as err:
        METRICS[name](torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    assert "(2, 3, 4, 4)" in str(err.value) and "(2, 3, 4, 5)" in str(err.value)
    with pytest.raises(ValueError):
        METRICS[name](torch.randn(5), torch.randn(5))


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_returns_float32(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(4, 3, 2, 2, generator=gen).to(dtype)
    b = torch.randn(4, 3, 2, 2, generator=gen).to(dtype)
    d = METRICS[name](a, b)
    assert d.dtype == torch.float32
    assert d.item() == pytest.approx(METRICS[name](a.float(), b.float()).item(), abs=1e-6)
    a_req = a.clone().requires_grad_(True)
    METRICS[name](a_req, b).backward()
    assert a_req.grad is not None and a_req.grad.dtype == dtype
    assert torch.isfinite(a_req.grad.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(METRICS))
def test_cuda_matches_cpu(name: str) -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(4, 3, 2, 2, generator=gen)
    b = torch.randn(4, 3, 2, 2, generator=gen)
    d = METRICS[name](a.cuda(), b.cuda())
    assert d.device.type == "cuda"
    assert d.item() == pytest.approx(METRICS[name](a, b).item(), abs=1e-5)
