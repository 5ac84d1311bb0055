"""Statistics of the method study (scripts/fashion_mnist_study.py): intervals, paired tests, verdicts.

Pure functions over per-seed numbers, so they are tested on their own (tests/test_study.py).

* An arm's accuracy per seed is the mean over its networks (both peers of a two-peer run, the
  student of a KD run); the arm's figure is the mean over seeds with a 95 % Student-t interval.
* A claim "arm A beats arm B" is tested on the per-seed differences ``A_s - B_s`` (the same
  seed means the same training subset, data order and initialisation of peer 0), with a
  two-sided paired t-test; the mean difference gets a 95 % t interval.
* Verdict: ``reproduced`` when the interval lies above 0; ``not reproduced`` when it lies below
  ``min_effect`` (the data rule out a gain of that size, or show a loss); ``inconclusive``
  otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
import math
from typing import Any

from scipy import stats

__all__ = ["Interval", "PairedTest", "mean_interval", "paired_test", "verdict"]

#: Smallest gain (percentage points of top-1) the study treats as worth reproducing.
MIN_EFFECT = 0.25


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided ``level`` Student-t interval (``low``, ``high``)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    level: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean and its t interval; with one value the interval is unbounded (nan sd)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, math.nan, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, level)


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of two arms over the seeds both have."""

    claim: str
    better: str
    worse: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    interval: Interval
    t: float
    p: float
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = self.interval.as_dict()
        return d


def verdict(interval: Interval, min_effect: float = MIN_EFFECT, *, higher_is_better: bool = True) -> str:
    """``reproduced`` / ``not reproduced`` / ``inconclusive`` from the difference's interval."""
    low, high = (interval.low, interval.high) if higher_is_better else (-interval.high, -interval.low)
    if low > 0:
        return "reproduced"
    if high < min_effect:
        return "not reproduced"
    return "inconclusive"


def paired_test(
    claim: str,
    better: str,
    worse: str,
    per_seed: Mapping[str, Mapping[int, float]],
    *,
    min_effect: float = MIN_EFFECT,
    higher_is_better: bool = True,
) -> PairedTest:
    """Test the claim that arm ``better`` is above ``worse`` (below, if not ``higher_is_better``).

    ``per_seed[arm][seed]`` is the arm's figure for that seed. Only seeds both arms have count.
    """
    seeds = tuple(sorted(set(per_seed.get(better, {})) & set(per_seed.get(worse, {}))))
    diffs = tuple(per_seed[better][s] - per_seed[worse][s] for s in seeds)
    if not diffs:
        nan = Interval(math.nan, math.nan, math.nan, 0, math.nan)
        return PairedTest(claim, better, worse, seeds, diffs, nan, math.nan, math.nan, "inconclusive")
    iv = mean_interval(diffs)
    if len(diffs) > 1 and iv.sd > 0:
        t = iv.mean / (iv.sd / math.sqrt(len(diffs)))
        p = float(2 * stats.t.sf(abs(t), len(diffs) - 1))
    else:
        t, p = math.nan, math.nan
    return PairedTest(claim, better, worse, seeds, diffs, iv, t, p,
                      verdict(iv, min_effect, higher_is_better=higher_is_better) if len(diffs) > 1 else "inconclusive")
