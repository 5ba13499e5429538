"""The experiment's statistics: pure functions over per-seed numbers.

Intervals are Student-t 95 % intervals over seeds (``n - 1`` degrees of
freedom); paired differences are taken seed by seed, so the variation that two
arms share (the seed's fine-tuning order, its head initialisation) cancels.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["t975", "summarize", "paired_difference", "binomial_sd", "entropy_bits"]

#: Two-sided 95 % Student-t quantiles (0.975) by degrees of freedom 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.96 past 30)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def summarize(values: Sequence[float]) -> dict:
    """``n``, mean, sample std and the 95 % t interval of ``values`` (the
    interval is ``None`` for a single value: one seed shows no spread)."""
    x = np.asarray(list(values), np.float64)
    if x.size == 0:
        raise ValueError("no values to summarize")
    mean = float(x.mean())
    if x.size == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = float(x.std(ddof=1))
    half = t975(x.size - 1) * std / math.sqrt(x.size)
    return {"n": int(x.size), "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """:func:`summarize` of ``a[seed] - b[seed]`` over the seeds both have,
    plus the seeds used and how many of them favour ``a``."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two arms share no seed")
    diffs = [a[s] - b[s] for s in seeds]
    return {**summarize(diffs), "seeds": seeds, "wins": int(sum(d > 0 for d in diffs)),
            "differences": diffs}


def binomial_sd(accuracy: float, n: int) -> float:
    """Standard deviation of an accuracy measured on ``n`` independent test
    images (the noise of the test set alone), in the units of ``accuracy``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def entropy_bits(p: Sequence[float]) -> float:
    """Shannon entropy of a distribution (normalised first), in bits."""
    q = np.asarray(list(p), np.float64)
    if q.size == 0 or np.any(q < 0) or q.sum() <= 0:
        raise ValueError("entropy needs non-negative probabilities with a positive sum")
    q = q / q.sum()
    q = q[q > 0]
    return float(-(q * np.log2(q)).sum())
