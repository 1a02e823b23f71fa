"""Pure sparsity and stability metrics of per-channel magnitudes; no model, no I/O.

Each function takes ``scores``: ``[channels]`` non-negative per-channel magnitudes of one projection (e.g. the mean
``|q|`` of every query channel over real tokens). They quantify the paper's claim that long inputs concentrate
query/key magnitude in a few channels, in three complementary ways:

* ``max_over_median``: how far the largest channel sticks out of a typical one (the outlier view of LLM.int8());
* ``top_share``: the share of total magnitude carried by the channels LongAct would select (the top 30 %);
* ``gini``: a concentration index of the whole distribution (0 = every channel equal, ``(n-1)/n`` = one channel
  holds everything), insensitive to the choice of the 30 % cut-off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from longact_lightning.saliency.masks import jaccard, num_selected


def _check(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D [channels] tensor, got shape {tuple(scores.shape)}.")
    if bool((scores < 0).any()):
        raise ValueError("scores must be non-negative magnitudes (e.g. mean |activation|); got negative values.")
    return scores.double()


def max_over_median(scores: torch.Tensor) -> float:
    """``max / median`` of ``[channels]`` scores; the median of an even count is the mean of the two middle values.

    Returns ``inf`` when the median is 0 and the max is not (half the channels are dead), ``nan`` when all are 0.
    """
    x = _check(scores)
    median = float(torch.quantile(x, 0.5))  # linear interpolation: the conventional median
    peak = float(x.max())
    if median == 0.0:
        return math.nan if peak == 0.0 else math.inf
    return peak / median


def top_share(scores: torch.Tensor, ratio: float = 0.3) -> float:
    """Share of the total magnitude in the ``num_selected(channels, ratio)`` largest channels of ``[channels]``.

    The count is the one LongAct's selection uses, so this is exactly the magnitude share of the selected rows.
    A flat distribution gives about ``ratio``; the paper's outliers push it well above.
    """
    x = _check(scores)
    total = float(x.sum())
    if total == 0.0:
        return math.nan
    k = num_selected(x.numel(), ratio)
    return float(torch.topk(x, k).values.sum()) / total


def gini(scores: torch.Tensor) -> float:
    """Gini coefficient of ``[channels]`` scores: ``sum_i (2i - n - 1) x_(i) / (n sum x)``, ``x_(i)`` ascending.

    0 when all channels are equal; ``(n - 1) / n`` when one channel holds all the magnitude.
    """
    x = torch.sort(_check(scores)).values  # [n] ascending
    n = x.numel()
    total = float(x.sum())
    if total == 0.0:
        return math.nan
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64) - n - 1  # [n]
    return float((weights * x).sum()) / (n * total)


def sparsity_metrics(scores: torch.Tensor, ratio: float = 0.3) -> dict[str, float]:
    """All three metrics of ``[channels]`` scores plus the max and median themselves, as one table row."""
    x = _check(scores)
    return {
        "max": float(x.max()),
        "median": float(torch.quantile(x, 0.5)),
        "max_over_median": max_over_median(x),
        "top_share": top_share(x, ratio),
        "gini": gini(x),
    }


def chance_jaccard(channels: int, selected: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random ``selected``-of-``channels`` masks.

    The overlap ``i`` is hypergeometric, ``P(i) = C(k, i) C(n-k, k-i) / C(n, k)``, and Jaccard is ``i / (2k - i)``;
    measured overlaps mean something only above this floor (about 0.18 for 30 % of the channels).
    """
    n, k = channels, selected
    if not 0 < k <= n:
        raise ValueError(f"selected={selected} must be in [1, channels={channels}].")
    total = math.comb(n, k)
    overlaps = range(max(0, 2 * k - n), k + 1)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) / total * i / (2 * k - i) for i in overlaps)


def mask_jaccards(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-projection Jaccard overlap of two ``{projection key: [channels] bool}`` mask sets with the same keys."""
    if set(a) != set(b):
        raise ValueError(
            f"mask sets cover different projections ({sorted(set(a) ^ set(b))[:4]} ...); compare masks of one model."
        )
    return {key: jaccard(a[key], b[key]) for key in a}
