"""The metric kit: the properties a distance plugin ``d(a, b)`` must have, as one check.

:func:`check_metric` runs every property on fixed pseudo-random inputs and raises an
:class:`AssertionError` that names the metric, the property and the values that broke it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_metric"]

Metric = Callable[[Tensor, Tensor], Tensor]


def check_metric(fn: Metric, *, name: str | None = None, symmetric: bool = True) -> None:
    """Check that ``fn`` is a usable distance between factor batches.

    Properties, each checked on fixed pseudo-random inputs (the global RNG is untouched):

    1. *scalar*: ``fn(a, b)`` is a 0-d floating tensor, finite, for ``[B, N]`` and
       ``[B, C, H, W]`` inputs, on the inputs' device; the inputs are not modified.
    2. *identity*: ``d(a, a) ~ 0``, also for a copy of ``a``, rescaled ``a`` and an ``a``
       holding an all-zero sample.
    3. *non-negative*: ``d >= 0`` for random, opposite, rescaled, orthogonal and zero pairs.
    4. *separates*: ``d(a, b) > 0`` for two unrelated random batches.
    5. *symmetric*: ``d(a, b) == d(b, a)``. Required: inheritance and exploration use the
       same distance in both roles, and every metric of the methods is symmetric. Pass
       ``symmetric=False`` only for a deliberately asymmetric divergence.
    6. *gradients*: differentiable in both arguments, with finite gradients for random
       inputs, at ``a == b``, with all-zero samples and with all-zero batches.
    7. *dtypes*: float64 inputs agree with float32 ones; bfloat16 inputs are accepted
       (finite value and gradients).
    8. *devices*: CPU, and CUDA when available (same value as on CPU).
    9. *batch size*: ``B = 2`` must work; ``B = 1`` may raise :class:`ValueError` (e.g.
       CKA, which centres over the batch) or must work.
    10. *shape mismatch*: inputs of different shapes (even broadcastable ones) raise
        :class:`ValueError` or :class:`TypeError`.
    """
    label = f"metric '{name or getattr(fn, '__name__', repr(fn))}'"
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    shape4, shape2 = (4, 3, 2, 2), (4, 12)
    a, b = rand(*shape4), rand(*shape4)
    a2, b2 = rand(*shape2), rand(*shape2)

    # 1. scalar output, both layouts; inputs untouched
    before = (a.clone(), b.clone())
    d_ab = _value(fn, a, b, label, "scalar output")
    if not (torch.equal(a, before[0]) and torch.equal(b, before[1])):
        raise AssertionError(f"{label}: inputs: the metric modified its input tensors in place")
    _value(fn, a2, b2, label, "scalar output for [B, N] inputs")
    if d_ab.device != a.device:
        raise AssertionError(f"{label}: device: inputs on {a.device}, result on {d_ab.device}")

    # 2. identity
    with_zero = a.clone()
    with_zero[1] = 0.0
    for what, x, y in [
        ("d(a, a)", a, a),
        ("d(a, copy of a)", a, a.clone()),
        ("d(1000 a, 1000 a)", 1000 * a, 1000 * a.clone()),
        ("d(a, a) for [B, N] inputs", a2, a2.clone()),
        ("d(a, a) where a has an all-zero sample", with_zero, with_zero.clone()),
    ]:
        v = float(_value(fn, x, y, label, "identity"))
        if abs(v) > 1e-4:
            raise AssertionError(f"{label}: identity: {what} = {v:.3g}, expected 0 (tolerance 1e-4)")

    # 3. non-negativity over pairs that stress it
    orth_a, orth_b = torch.zeros(shape2), torch.zeros(shape2)
    orth_a[:, :6], orth_b[:, 6:] = rand(4, 6), rand(4, 6)
    pairs = {
        "random": (a, b),
        "opposite (b = -a)": (a, -a),
        "rescaled (b = 3 a)": (a, 3 * a),
        "orthogonal samples": (orth_a, orth_b),
        "b all zero": (a, torch.zeros_like(a)),
        "one all-zero sample": (with_zero, b),
        "large values (1e4)": (1e4 * a, 1e4 * b),
        "small values (1e-4)": (1e-4 * a, 1e-4 * b),
    }
    for what, (x, y) in pairs.items():
        v = float(_value(fn, x, y, label, "non-negativity"))
        if v < -1e-6:
            raise AssertionError(f"{label}: non-negativity: d = {v:.6g} < 0 for the {what} pair")

    # 4. separates different inputs
    if float(d_ab) <= 1e-6:
        raise AssertionError(
            f"{label}: separates: d(a, b) = {float(d_ab):.3g} for two unrelated random batches; a distance"
            " must be positive for different inputs"
        )

    # 5. symmetry
    if symmetric:
        for what, (x, y) in pairs.items():
            dxy = float(_value(fn, x, y, label, "symmetry"))
            dyx = float(_value(fn, y, x, label, "symmetry"))
            if abs(dxy - dyx) > 1e-5 + 1e-4 * abs(dxy):
                raise AssertionError(
                    f"{label}: symmetry: d(a, b) = {dxy:.6g} but d(b, a) = {dyx:.6g} for the {what} pair"
                    " (pass symmetric=False only for a deliberately asymmetric divergence)"
                )

    # 6. gradients
    zeros = torch.zeros(shape4)
    for what, x, y, must_move in [
        ("random inputs", a, b, True),
        ("a == b", a, a.clone(), False),
        ("a with an all-zero sample", with_zero, b, False),
        ("a == b with an all-zero sample", with_zero, with_zero.clone(), False),
        ("a all zero", zeros, b, False),
        ("a and b all zero", zeros, zeros.clone(), False),
    ]:
        _gradients(fn, x, y, label, what, must_move=must_move)

    # 7. dtypes
    d64 = float(_value(fn, a.double(), b.double(), label, "float64 inputs"))
    if abs(d64 - float(d_ab)) > 1e-4 + 1e-3 * abs(d64):
        raise AssertionError(f"{label}: dtypes: float64 gives {d64:.6g}, float32 gives {float(d_ab):.6g}")
    v = float(_value(fn, a.double(), a.double().clone(), label, "float64 inputs"))
    if abs(v) > 1e-8:
        raise AssertionError(f"{label}: identity: d(a, a) = {v:.3g} for float64 inputs, expected 0 (tolerance 1e-8)")
    _value(fn, a.bfloat16(), b.bfloat16(), label, "bfloat16 inputs")
    _gradients(fn, a.bfloat16(), b.bfloat16(), label, "bfloat16 inputs", must_move=False)

    # 8. devices
    if torch.cuda.is_available():
        dc = _value(fn, a.cuda(), b.cuda(), label, "CUDA inputs")
        if dc.device.type != "cuda":
            raise AssertionError(f"{label}: device: inputs on cuda, result on {dc.device}")
        if abs(float(dc) - float(d_ab)) > 1e-4 + 1e-3 * abs(float(d_ab)):
            raise AssertionError(f"{label}: device: CUDA gives {float(dc):.6g}, CPU gives {float(d_ab):.6g}")
        _gradients(fn, a.cuda(), b.cuda(), label, "CUDA inputs", must_move=True)

    # 9. batch sizes 2 (required) and 1 (may be refused with ValueError)
    _value(fn, a[:2], b[:2], label, "batch size 2")
    _gradients(fn, a[:2], b[:2], label, "batch size 2", must_move=False)
    try:
        out = fn(a[:1], b[:1])
    except ValueError:
        pass
    except Exception as e:
        raise AssertionError(
            f"{label}: batch size 1: raised {type(e).__name__}: {e}; a metric may refuse B = 1 only with ValueError"
        ) from e
    else:
        _check_scalar(out, label, "batch size 1")

    # 10. shape mismatch
    for sa, sb in [((4, 3, 2, 2), (4, 3, 2, 3)), ((4, 12), (3, 12)), ((4, 12), (4, 1)), ((4, 12), (12,))]:
        try:
            out = fn(rand(*sa), rand(*sb))
        except (ValueError, TypeError):
            continue
        except Exception as e:
            raise AssertionError(
                f"{label}: shape mismatch: shapes {sa} and {sb} raised {type(e).__name__}: {e};"
                " expected ValueError or TypeError"
            ) from e
        raise AssertionError(
            f"{label}: shape mismatch: shapes {sa} and {sb} returned {out!r} instead of raising ValueError"
            " (check a.shape == b.shape before any broadcasting)"
        )


def _check_scalar(out: Any, label: str, prop: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise AssertionError(f"{label}: {prop}: returned {type(out).__name__}, expected a 0-d tensor")
    if out.ndim != 0:
        raise AssertionError(f"{label}: {prop}: returned shape {tuple(out.shape)}, expected a scalar (0-d tensor)")
    if not out.dtype.is_floating_point:
        raise AssertionError(f"{label}: {prop}: returned dtype {out.dtype}, expected a floating dtype")
    if not torch.isfinite(out):
        raise AssertionError(f"{label}: {prop}: returned {float(out)}, expected a finite value")
    return out


def _value(fn: Metric, a: Tensor, b: Tensor, label: str, prop: str) -> Tensor:
    """``fn(a, b)`` with no graph, checked to be a finite scalar."""
    try:
        with torch.no_grad():
            out = fn(a, b)
    except Exception as e:
        raise AssertionError(
            f"{label}: {prop}: raised {type(e).__name__}: {e} for inputs of shape {tuple(a.shape)}, dtype {a.dtype}"
        ) from e
    return _check_scalar(out, label, prop)


def _gradients(fn: Metric, a: Tensor, b: Tensor, label: str, what: str, *, must_move: bool) -> None:
    """Backpropagate ``fn(a, b)``: both gradients exist and are finite (and non-zero if ``must_move``)."""
    x = a.detach().clone().requires_grad_(True)
    y = b.detach().clone().requires_grad_(True)
    try:
        out = fn(x, y)
        _check_scalar(out, label, f"gradients ({what})")
        if not out.requires_grad:
            raise AssertionError(f"{label}: gradients ({what}): the result does not require grad (detached inside?)")
        out.backward()
    except AssertionError:
        raise
    except Exception as e:
        raise AssertionError(f"{label}: gradients ({what}): raised {type(e).__name__}: {e}") from e
    for arg, t in (("a", x), ("b", y)):
        if t.grad is None:
            raise AssertionError(f"{label}: gradients ({what}): no gradient reaches {arg}; the metric must be differentiable in both")
        bad = int((~torch.isfinite(t.grad)).sum())
        if bad:
            raise AssertionError(
                f"{label}: gradients ({what}): {bad} non-finite gradient element(s) into {arg},"
                f" e.g. {t.grad[~torch.isfinite(t.grad)][:3].tolist()} (guard sqrt/division by eps)"
            )
        if must_move and not bool((t.grad != 0).any()):
            raise AssertionError(f"{label}: gradients ({what}): the gradient into {arg} is all zero")
