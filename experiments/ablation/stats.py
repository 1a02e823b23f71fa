"""Statistics of an ablation over seeds: means with t-intervals, the paired comparison against the baseline arm, and
the smallest difference the design could detect.

Seeds are few (3-8), so every interval is Student-t with n - 1 degrees of freedom, and arms are compared per seed
(the same seed gives every arm the same prompts, sampling seed and held-out set, so a seed effect common to all arms
cancels in the difference).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import optimize, stats


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t confidence interval (``sd`` and ``half_width`` are NaN for one value)."""

    n: int
    mean: float
    sd: float
    half_width: float
    confidence: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided ``confidence`` t-interval: ``mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)`` (sd with n - 1)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci() needs at least one value.")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, confidence)
    sd = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, sd, half, confidence)


@dataclass(frozen=True)
class PairedDifference:
    """``treatment - control`` over the keys (seeds) both have: the per-key differences, their t-interval, the
    paired t statistic and its two-sided p-value (NaN when undefined: fewer than two pairs, or no spread and no
    difference)."""

    keys: tuple[Any, ...]
    differences: tuple[float, ...]
    interval: Interval
    t: float
    p_value: float


def paired_difference(
    treatment: Mapping[Any, float], control: Mapping[Any, float], confidence: float = 0.95
) -> PairedDifference:
    """Paired comparison of two arms run with the same seeds: differences per shared seed, then :func:`mean_ci`."""
    keys = tuple(sorted(set(treatment) & set(control)))
    if not keys:
        raise ValueError("paired_difference() needs at least one key (seed) present in both arms.")
    diffs = tuple(float(treatment[k]) - float(control[k]) for k in keys)
    interval = mean_ci(diffs, confidence)
    t = p = math.nan
    if interval.n >= 2:
        se = interval.sd / math.sqrt(interval.n)
        if se > 0:
            t = interval.mean / se
            p = float(2.0 * stats.t.sf(abs(t), interval.n - 1))
        elif interval.mean != 0:  # identical differences: certain, which scipy reports as NaN
            t, p = math.copysign(math.inf, interval.mean), 0.0
    return PairedDifference(keys, diffs, interval, t, p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values from tests run together (here: each arm against the baseline), in the
    input order; NaNs are neither adjusted nor counted.

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) · p_(j))``; rejecting where the adjusted
    value is below alpha keeps the chance of any false rejection among the m tests at most alpha, which the raw
    p-values of several comparisons do not.
    """
    order = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    adjusted = [float(p) for p in p_values]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test on ``n`` pairs detects with probability ``power``.

    With per-pair differences of standard deviation ``sd``, the test statistic follows a noncentral t distribution
    (``n - 1`` dof, noncentrality ``delta · sqrt(n) / sd``); the returned ``delta`` is where its probability of
    falling outside ``±t_{1-alpha/2}`` reaches ``power``. NaN when undefined (fewer than two pairs, no spread).
    """
    if n < 2 or not sd > 0:
        return math.nan
    dof = n - 1
    critical = float(stats.t.ppf(1.0 - alpha / 2.0, dof))

    def shortfall(delta: float) -> float:
        nc = delta * math.sqrt(n) / sd
        # the lower tail P(T < -c) as P(T > c) at -nc: scipy's nct.cdf returns NaN for some tails near 1e-16
        rejects = stats.nct.sf(critical, dof, nc) + stats.nct.sf(critical, dof, -nc)
        return float(rejects) - power

    high = sd
    while shortfall(high) < 0:
        high *= 2.0
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-9))
