"""Built-in distance metrics between factor batches (the ``mutualkd.metrics`` plugins).

A metric is a distance ``d(a, b)`` between two factor batches ``a`` and ``b`` of identical shape
``[B, ...]`` (for the factor autoencoders of mutualkd: ``[B, C', H, W]``). It returns a scalar
tensor that is differentiable in both arguments, with ``d >= 0`` and ``d(a, a) = 0``.
Inheritance minimises ``d(F_inh, F_T)``; exploration minimises ``-d(F_exp, F_T)``
(Huang et al., "Revisiting Knowledge Distillation: An Inheritance and Exploration Framework",
CVPR 2021).

Every metric here

* requires ``a.shape == b.shape`` and ``a.ndim >= 2`` (dimension 0 is the batch) and raises
  :class:`ValueError` naming both shapes otherwise;
* computes in at least float32: float16 / bfloat16 (and integer) inputs are upcast and the result
  is float32; float64 inputs are computed and returned in float64; mixed dtypes are promoted;
* works on whatever device the inputs live on (both must be on the same device);
* returns finite values and finite gradients for all-zero samples, all-zero batches and
  ``a == b`` (the gradient of a distance at its minimum ``a == b`` is zero).

Each function's docstring is its specification. The names that the IE-KD paper uses (``l1``,
``l2``, ``orthogonal``) compute the IE-KD authors' formulas (their ``NormLoss`` and ``CosLoss``),
so the paper's weights carry over; the variants mutualkd had before keep other names
(``l2_per_sample``, ``orthogonal_sq``). ``cka`` is the biased linear CKA of Kornblith et al.,
``cka_debiased`` the same with the unbiased HSIC estimator of Song et al.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "l1_distance",
    "l2_distance",
    "l2_per_sample_distance",
    "cka_distance",
    "cka_debiased_distance",
    "orthogonal_distance",
    "orthogonal_sq_distance",
]

#: Default ``eps`` of the per-sample normalisation ``x / max(||x||_2, eps)``.
DEFAULT_EPS = 1e-12


def _prepare(a: Tensor, b: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Validate a factor pair and return both as ``[B, N]`` in a dtype of at least float32."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(
            f"{name}: expected two tensors, got {type(a).__name__} and {type(b).__name__}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: the two factor batches must have identical shapes, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.ndim < 2:
        raise ValueError(
            f"{name}: factor batches must have at least 2 dimensions [B, ...], "
            f"got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name}: inputs are on different devices ({a.device} and {b.device})")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        dtype = torch.float32
    return a.reshape(a.shape[0], -1).to(dtype), b.reshape(b.shape[0], -1).to(dtype)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient at ``x == 0`` is 0 instead of inf/NaN."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def l1_distance(a: Tensor, b: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    r"""Mean absolute difference of per-sample L2-normalised factors (the IE-KD / FT loss).

    Definition, for factor batches ``a, b`` of identical shape ``[B, ...]``; each sample is
    flattened to a vector of ``N = prod(shape[1:])`` elements and L2-normalised:

    .. math::

        \hat a_i = a_i / \max(\lVert a_i \rVert_2, \epsilon), \qquad
        d(a, b) = \frac{1}{B N} \sum_{i=1}^{B} \sum_{j=1}^{N} \lvert \hat a_{ij} - \hat b_{ij} \rvert

    i.e. the mean over *all* ``B * N`` elements. This is the factor-transfer loss of Kim et al.,
    "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018, and
    the inheritance loss of Huang et al., "Revisiting Knowledge Distillation: An Inheritance and
    Exploration Framework", CVPR 2021.

    Range: ``[0, 2 / sqrt(N)]`` (for unit vectors ``||x - y||_1 <= 2 ||x||_1 <= 2 sqrt(N)``);
    the maximum is reached by anti-parallel samples whose elements all have equal magnitude.
    Symmetric; invariant to a positive rescaling of each sample separately.

    Args:
        a, b: factor batches ``[B, ...]`` of identical shape, ``ndim >= 2``.
        eps: normalisation floor (the ``eps`` of :func:`torch.nn.functional.normalize`).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Edge cases: an all-zero sample normalises to the zero vector (finite value; its gradient is
    finite but scaled by ``1/eps``, as for ``F.normalize``); ``d(a, a) = 0`` with zero gradient.

    Raises:
        ValueError: shapes differ or ``ndim < 2``.
    """
    x, y = _prepare(a, b, "l1_distance")
    x = F.normalize(x, p=2.0, dim=1, eps=eps)
    y = F.normalize(y, p=2.0, dim=1, eps=eps)
    return (x - y).abs().mean()


def l2_distance(a: Tensor, b: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    r"""Root mean square, over all elements, of the difference of per-sample L2-normalised factors.

    Definition, for factor batches ``a, b`` of identical shape ``[B, ...]``; each sample is
    flattened to ``N = prod(shape[1:])`` elements and normalised as in :func:`l1_distance`,
    ``\hat a_i = a_i / \max(\lVert a_i \rVert_2, \epsilon)``:

    .. math::

        d(a, b) = \Big( \frac{1}{B N} \sum_{i=1}^{B} \sum_{j=1}^{N}
                  (\hat a_{ij} - \hat b_{ij})^2 \Big)^{1/2}
                = \Big( \frac{1}{B N} \sum_{i=1}^{B} \lVert \hat a_i - \hat b_i \rVert_2^2 \Big)^{1/2}

    This is the IE-KD authors' ``NormLoss(p=2)`` (``diff.norm(2) ** 2 / diff.numel()``, then the
    square root): the ``p = 2`` member of the family whose ``p = 1`` member is :func:`l1_distance`,
    so the paper's ``lambda`` means the same for both (Huang et al., "Revisiting Knowledge
    Distillation: An Inheritance and Exploration Framework", CVPR 2021). It is about
    ``sqrt(N)`` times smaller than :func:`l2_per_sample_distance`, the batch mean of the
    per-sample Euclidean norms.

    Range: ``[0, 2 / sqrt(N)]``; ``2 / sqrt(N)`` for anti-parallel samples, ``sqrt(2 / N)`` for
    orthogonal ones. Symmetric; invariant to a positive rescaling of each sample separately.
    The square root is guarded (zero gradient at ``a == b``, where plain ``sqrt`` gives NaN).

    Args:
        a, b: factor batches ``[B, ...]`` of identical shape, ``ndim >= 2``.
        eps: normalisation floor (the ``eps`` of :func:`torch.nn.functional.normalize`).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or ``ndim < 2``.
    """
    x, y = _prepare(a, b, "l2_distance")
    x = F.normalize(x, p=2.0, dim=1, eps=eps)
    y = F.normalize(y, p=2.0, dim=1, eps=eps)
    return _safe_sqrt((x - y).pow(2).mean())


def l2_per_sample_distance(a: Tensor, b: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    r"""Batch mean of the Euclidean distance between per-sample L2-normalised factors.

    Definition, for factor batches ``a, b`` of identical shape ``[B, ...]`` (samples flattened,
    normalised as in :func:`l1_distance`, ``\hat a_i = a_i / \max(\lVert a_i \rVert_2, \epsilon)``):

    .. math::

        d(a, b) = \frac{1}{B} \sum_{i=1}^{B} \lVert \hat a_i - \hat b_i \rVert_2

    Not the IE-KD authors' L2 (that is :func:`l2_distance`): this one does not divide by the
    number of elements, so it is about ``sqrt(N)`` times larger (x45 for a 32x8x8 factor) and a
    ``lambda`` tuned for ``l2`` does not carry over. It was mutualkd's ``l2`` before; kept
    because its range does not depend on the factor's size.

    Range: ``[0, 2]``; 2 for anti-parallel samples, ``sqrt(2)`` for orthogonal ones. Symmetric;
    invariant to a positive rescaling of each sample separately.

    The square root is evaluated with a guarded ``sqrt`` whose gradient at a zero distance is 0
    (plain ``sqrt`` would give inf/NaN there), so ``d(a, a) = 0`` exactly, with zero gradient.

    Args:
        a, b: factor batches ``[B, ...]`` of identical shape, ``ndim >= 2``.
        eps: normalisation floor (the ``eps`` of :func:`torch.nn.functional.normalize`).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or ``ndim < 2``.
    """
    x, y = _prepare(a, b, "l2_per_sample_distance")
    x = F.normalize(x, p=2.0, dim=1, eps=eps)
    y = F.normalize(y, p=2.0, dim=1, eps=eps)
    return _safe_sqrt((x - y).pow(2).sum(dim=1)).mean()


def _centred_unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column-centre ``x`` [B, p] and scale it to unit Frobenius norm.

    Returns ``(x_unit, degenerate)``; ``degenerate`` (a 0-d bool tensor) is true when the centred
    matrix is zero up to rounding (``||x_c||_F <= 100 * machine_eps * ||x||_F``), i.e. all
    samples are equal (constant or all-zero batch). Then ``x_unit`` is not meaningful but finite.
    """
    # CKA is invariant to isotropic scaling; dividing by a detached constant first keeps all
    # intermediate sums in range for any input magnitude without changing value or gradient.
    scale = x.detach().abs().amax()
    x = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    xc = x - x.mean(dim=0, keepdim=True)
    sq = xc.pow(2).sum()
    tol = 100.0 * torch.finfo(x.dtype).eps
    degenerate = sq <= (tol * tol) * x.detach().pow(2).sum()
    norm = torch.sqrt(torch.where(degenerate, torch.ones_like(sq), sq))
    return xc / norm, degenerate


def cka_distance(a: Tensor, b: Tensor) -> Tensor:
    r"""One minus linear CKA between two factor batches (samples are the rows).

    Each factor batch of shape ``[B, ...]`` is flattened to a matrix ``X`` (resp. ``Y``) of shape
    ``[B, p]`` and its columns are centred over the batch. Linear CKA (Kornblith et al.,
    "Similarity of Neural Network Representations Revisited", ICML 2019) is

    .. math::

        \mathrm{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}
                                  {\lVert X^\top X \rVert_F \, \lVert Y^\top Y \rVert_F}
                           = \frac{\langle K, L \rangle_F}{\lVert K \rVert_F \lVert L \rVert_F},
        \qquad K = X X^\top,\ L = Y Y^\top,

    and ``d(a, b) = 1 - CKA(X, Y)``, clamped to ``[0, 1]``. The ``[B, B]`` Gram-matrix form is used
    when ``B <= p`` (the usual case for factor maps), the ``[p, p]`` feature form otherwise; both
    are the same quantity. Used as an inheritance / exploration distance in the IE-KD framework
    of Huang et al., "Revisiting Knowledge Distillation: An Inheritance and Exploration
    Framework", CVPR 2021.

    Properties: range ``[0, 1]``; symmetric; invariant to orthogonal transforms of the feature
    columns of either argument (``X -> X Q``) and to isotropic scaling (``X -> c X``); *not*
    invariant to per-sample scaling. It compares the geometry of the batch, so the result depends
    on the whole batch, not on a per-sample average.

    Little range at small batches: this (biased) estimator is close to 1 even for independent
    factors when ``B`` is much smaller than ``p`` (about ``p / (p + B)`` for isotropic Gaussian
    factors: 0.99 at ``B = 16``, ``p = 2048``), so ``1 - CKA`` then spans only a sliver of
    ``[0, 1]``. The IE strategies warn at start-up when a recipe uses it so;
    :func:`cka_debiased_distance` (the unbiased HSIC estimator) does not have this bias.

    Degenerate inputs: when all samples of a batch are equal (constant or all-zero batch; the
    column-centred matrix is zero up to rounding) CKA is 0/0. The convention used (the distance
    depends only on the centred Gram matrices): both batches degenerate -> ``d = 0`` (identical,
    empty geometry); exactly one degenerate -> ``d = 1``. The value is finite and the gradient
    is zero in these cases.

    Args:
        a, b: factor batches ``[B, ...]`` of identical shape, ``ndim >= 2``, ``B >= 2``.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Raises:
        ValueError: shapes differ, ``ndim < 2``, or ``B < 2`` (CKA centres over the batch, so a
        single sample carries no information).
    """
    x, y = _prepare(a, b, "cka_distance")
    n, p = x.shape
    if n < 2:
        raise ValueError(
            f"cka_distance: linear CKA compares samples within a batch and needs a batch size "
            f"B >= 2, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    xu, deg_x = _centred_unit(x)
    yu, deg_y = _centred_unit(y)
    if n <= p:
        k = xu @ xu.T
        l = yu @ yu.T
        cross = (k * l).sum()
        kk = k.pow(2).sum()
        ll = l.pow(2).sum()
    else:
        cross = (yu.T @ xu).pow(2).sum()
        kk = (xu.T @ xu).pow(2).sum()
        ll = (yu.T @ yu).pow(2).sum()
    # With unit-Frobenius inputs ||K||_F >= 1/sqrt(min(B, p)), so the denominator only needs a
    # guard in the degenerate branch (which torch.where discards; the guard keeps its gradient
    # finite).
    any_deg = deg_x | deg_y
    denom = torch.sqrt(torch.where(any_deg, torch.ones_like(kk), kk * ll))
    cka = (cross / denom).clamp(0.0, 1.0)
    one = torch.ones_like(cka)
    zero = torch.zeros_like(cka)
    return torch.where(any_deg, torch.where(deg_x & deg_y, zero, one), one - cka)


def _u_centred_gram(xu: Tensor) -> Tensor:
    """The U-centred Gram matrix of ``xu`` [n, p], n >= 4 (Szekely & Rizzo 2014).

    ``K = xu xu^T`` with its diagonal set to 0, then
    ``K~_ij = K_ij - r_i - r_j + t`` off the diagonal and ``K~_ii = 0``, where
    ``r_i = sum_l K_il / (n - 2)`` and ``t = sum_kl K_kl / ((n - 1)(n - 2))``. The sum of the
    entries of ``K~ * L~``, divided by ``n (n - 3)``, is the unbiased HSIC of Song et al. 2012.
    """
    n = xu.shape[0]
    off = 1.0 - torch.eye(n, dtype=xu.dtype, device=xu.device)
    k = (xu @ xu.T) * off
    row = k.sum(dim=0) / (n - 2)
    total = k.sum() / ((n - 1) * (n - 2))
    return (k - row[:, None] - row[None, :] + total) * off


def cka_debiased_distance(a: Tensor, b: Tensor) -> Tensor:
    r"""One minus debiased linear CKA: linear CKA with the unbiased HSIC estimator.

    Each factor batch ``[B, ...]`` is flattened to ``X`` (resp. ``Y``) ``[B, p]``, ``K = X X^T``,
    ``L = Y Y^T``. With the unbiased HSIC estimator of Song et al., "Feature Selection via
    Dependence Maximization", JMLR 2012 (``K~``, ``L~``: the Gram matrices with zero diagonal),

    .. math::

        \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)} \Big[ \mathrm{tr}(\tilde K \tilde L)
            + \frac{\mathbf 1^\top \tilde K \mathbf 1 \; \mathbf 1^\top \tilde L \mathbf 1}{(n-1)(n-2)}
            - \frac{2}{n-2} \mathbf 1^\top \tilde K \tilde L \mathbf 1 \Big],

    debiased CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited",
    ICML 2019, section 3 and their ``cka(..., debiased=True)``) is
    ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))`` and ``d(a, b) = 1 - CKA_debiased``.
    It is computed through the U-centred Gram matrices (same value).

    Why: the biased estimator of :func:`cka_distance` is close to 1 for *independent* factors
    when the batch is much smaller than the factor size (about ``p / (p + B)`` for isotropic
    Gaussian factors: 0.99 at ``B = 16``, ``p = 2048``), so ``1 - CKA`` has almost no range
    there; the debiased estimate is near 0 for independent factors at any batch size.

    Range: the debiased CKA lies in ``[-1, 1]`` (it can be negative), so ``d`` lies in ``[0, 2]``
    (clamped to it against rounding). Symmetric; invariant to orthogonal transforms of the
    feature columns and to isotropic scaling; not to per-sample scaling.

    Small batches: ``HSIC_1`` needs ``B >= 4``; for ``B = 2, 3`` the biased estimator of
    :func:`cka_distance` is returned instead (the IE strategies warn at start-up when a recipe's
    batch size is that small). Degenerate inputs (``HSIC_1(K, K) = 0`` up to rounding, e.g. a
    constant batch) follow :func:`cka_distance`'s convention: both degenerate -> 0, one -> 1,
    with zero gradient.

    Args:
        a, b: factor batches ``[B, ...]`` of identical shape, ``ndim >= 2``, ``B >= 2``.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Raises:
        ValueError: shapes differ, ``ndim < 2``, or ``B < 2``.
    """
    x, y = _prepare(a, b, "cka_debiased_distance")
    n = x.shape[0]
    if n < 2:
        raise ValueError(
            f"cka_debiased_distance: CKA compares samples within a batch and needs a batch size "
            f"B >= 2, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if n < 4:
        return cka_distance(a, b)
    # Centring the columns does not change the U-centred Gram matrix (U-centring removes any
    # row- or column-constant term) but keeps its entries well scaled.
    xu, deg_x = _centred_unit(x)
    yu, deg_y = _centred_unit(y)
    kt, lt = _u_centred_gram(xu), _u_centred_gram(yu)
    cross = (kt * lt).sum()
    kk, ll = kt.pow(2).sum(), lt.pow(2).sum()
    # Unit-Frobenius inputs have ||K||_F <= 1: a U-centred norm below the rounding level means
    # HSIC_1(K, K) = 0 (no usable geometry), treated like a constant batch.
    tol = 100.0 * torch.finfo(x.dtype).eps * math.sqrt(n)
    deg_x = deg_x | (kk <= tol * tol)
    deg_y = deg_y | (ll <= tol * tol)
    any_deg = deg_x | deg_y
    denom = torch.sqrt(torch.where(any_deg, torch.ones_like(kk), kk * ll))
    cka = (cross / denom).clamp(-1.0, 1.0)
    one = torch.ones_like(cka)
    zero = torch.zeros_like(cka)
    return torch.where(any_deg, torch.where(deg_x & deg_y, zero, one), one - cka)


def _unit_rows(a: Tensor, b: Tensor, name: str, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample normalised factors and each pair's ``||a_i|| ||b_i||`` after normalisation.

    The product is 1 for two non-zero samples and 0 when either is all-zero (guarded square
    root: finite gradient there).
    """
    x, y = _prepare(a, b, name)
    x = F.normalize(x, p=2.0, dim=1, eps=eps)
    y = F.normalize(y, p=2.0, dim=1, eps=eps)
    return x, y, _safe_sqrt(x.pow(2).sum(dim=1) * y.pow(2).sum(dim=1))


def orthogonal_distance(a: Tensor, b: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    r"""One minus the batch mean of the absolute cosine between corresponding samples.

    Definition, for factor batches ``a, b`` of identical shape ``[B, ...]`` (each sample flattened
    and normalised, ``\hat a_i = a_i / \max(\lVert a_i \rVert_2, \epsilon)``):

    .. math::

        d(a, b) = \frac{1}{B} \sum_{i=1}^{B}
            \left( \lVert \hat a_i \rVert \lVert \hat b_i \rVert
                   - \lvert \langle \hat a_i, \hat b_i \rangle \rvert \right)
                = 1 - \frac{1}{B} \sum_{i=1}^{B} \lvert \cos(a_i, b_i) \rvert
        \quad \text{(no zero samples)}.

    This is the IE-KD authors' orthogonal exploration loss, ``mean |cos|`` (their ``CosLoss``
    with ``negative=True``), written as a distance: exploration minimises ``-d = mean |cos| - 1``,
    the authors' loss plus a constant, so the gradients and the meaning of ``lambda`` are theirs
    (Huang et al., "Revisiting Knowledge Distillation: An Inheritance and Exploration Framework",
    CVPR 2021). It drives the exploration factor orthogonal to the teacher factor, a bounded
    target, instead of anti-parallel as ``-L1`` / ``-L2`` do. :func:`orthogonal_sq_distance` is
    the smooth variant with ``cos^2``.

    Range ``[0, 1]``: 0 for parallel or anti-parallel samples, 1 when every sample pair is
    orthogonal. Symmetric; invariant to any non-zero rescaling of each sample separately (the
    sign included). ``|cos|`` is not differentiable at ``cos = 0``; the (sub)gradient used there
    is 0, as in the authors' code.

    Zero samples: a sample pair in which either sample is all-zero contributes 0 (the written
    form above, with ``||\hat 0|| = 0``), so ``d(a, a) = 0`` for every ``a`` and exploration cannot
    reach the maximum by collapsing its factor to zero. The authors' form counts such a pair as
    orthogonal (``|cos| = 0``); the two agree for non-zero samples.

    Args:
        a, b: factor batches ``[B, ...]`` of identical shape, ``ndim >= 2``.
        eps: normalisation floor (the ``eps`` of :func:`torch.nn.functional.normalize`).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or ``ndim < 2``.
    """
    x, y, norms = _unit_rows(a, b, "orthogonal_distance", eps)
    term = norms - (x * y).sum(dim=1).abs()
    return term.mean().clamp(0.0, 1.0)


def orthogonal_sq_distance(a: Tensor, b: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    r"""One minus the batch mean of the squared cosine between corresponding samples.

    Definition, for factor batches ``a, b`` of identical shape ``[B, ...]`` (each sample flattened
    and normalised, ``\hat a_i = a_i / \max(\lVert a_i \rVert_2, \epsilon)``):

    .. math::

        d(a, b) = \frac{1}{B} \sum_{i=1}^{B}
            \left( \lVert \hat a_i \rVert^2 \lVert \hat b_i \rVert^2
                   - \langle \hat a_i, \hat b_i \rangle^2 \right)
                = 1 - \frac{1}{B} \sum_{i=1}^{B} \cos^2(a_i, b_i)
        \quad \text{(no zero samples)}.

    A smooth variant of :func:`orthogonal_distance` (the authors' ``mean |cos|``), mutualkd's
    ``orthogonal`` before: same minimum and range, but its gradient vanishes as ``cos -> 0``,
    so it pushes less near orthogonality and more near parallel factors.

    Range ``[0, 1]``: 0 for parallel or anti-parallel samples, 1 when every sample pair is
    orthogonal. Symmetric; invariant to any non-zero rescaling of each sample separately (the
    sign included).

    Zero samples: a sample pair in which either sample is all-zero contributes 0 (the written
    form above, with ``||\hat 0|| = 0``), so ``d(a, a) = 0`` for every ``a``. Values and gradients
    stay finite (the gradient of such a pair's term is zero).

    Args:
        a, b: factor batches ``[B, ...]`` of identical shape, ``ndim >= 2``.
        eps: normalisation floor (the ``eps`` of :func:`torch.nn.functional.normalize`).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or ``ndim < 2``.
    """
    x, y = _prepare(a, b, "orthogonal_sq_distance")
    x = F.normalize(x, p=2.0, dim=1, eps=eps)
    y = F.normalize(y, p=2.0, dim=1, eps=eps)
    term = x.pow(2).sum(dim=1) * y.pow(2).sum(dim=1) - (x * y).sum(dim=1).pow(2)
    return term.mean().clamp(0.0, 1.0)
