"""The experiment's statistics: pure functions over per-seed numbers.

Intervals are Student-t 95 % intervals over seeds (``n - 1`` degrees of
freedom); paired differences are taken seed by seed, so the variation that two
arms share (the seed's fine-tuning order, its head initialisation) cancels.

The pre-registered tests (:func:`paired_t_test`, :func:`holm`) are two-sided
paired t-tests of a mean difference against a null value (0, or a margin
such as -1 point for "competitive"), adjusted by Holm's step-down procedure
over a family; a rejected null is given a direction by the sign of
``mean - null`` (:func:`directional_decisions`).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["t975", "summarize", "paired_difference", "binomial_sd", "entropy_bits", "paired_t_test", "holm",
           "directional_decisions"]

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


def paired_t_test(differences: Sequence[float], null: float = 0.0) -> dict:
    """Two-sided one-sample t-test of ``mean(differences) == null`` (the
    paired t-test when ``differences`` are per-seed differences), ``n - 1``
    degrees of freedom: ``{"n", "mean", "null", "t", "df", "p"}``.

    With no spread (every difference equal) the statistic is infinite and
    ``p`` is 0, unless the mean equals ``null`` (``t`` 0, ``p`` 1). Raises
    ``ValueError`` for fewer than 2 differences (no test without spread)."""
    from scipy import stats as sps

    x = np.asarray(list(differences), np.float64)
    if x.size < 2:
        raise ValueError(f"a paired t-test needs at least 2 differences, got {x.size}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd == 0.0:
        t = 0.0 if mean == null else math.copysign(math.inf, mean - null)
        p = 1.0 if mean == null else 0.0
    else:
        t = (mean - null) / (sd / math.sqrt(x.size))
        p = float(min(1.0, 2.0 * sps.t.sf(abs(t), x.size - 1)))
    return {"n": int(x.size), "mean": mean, "null": float(null), "t": float(t), "df": int(x.size - 1), "p": p}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: sorted
    ascending, the i-th (from 0) of m is ``(m - i) * p``, made monotone by a
    running maximum and capped at 1. Reject where adjusted < alpha: this
    controls the family-wise error rate at alpha."""
    p = np.asarray(list(p_values), np.float64)
    if p.size == 0:
        return []
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    m = p.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def directional_decisions(tests: Sequence[dict], alpha: float = 0.05) -> list[dict]:
    """Holm over ``tests`` (each a :func:`paired_t_test` result): each test
    with ``p_holm`` and ``decision``: ``"above"`` (mean above its null,
    rejected), ``"below"`` (mean below it, rejected) or ``"none"``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    adjusted = holm([t["p"] for t in tests])
    out = []
    for t, q in zip(tests, adjusted):
        decision = "none" if q >= alpha else ("above" if t["mean"] > t["null"] else "below")
        out.append({**t, "p_holm": q, "decision": decision})
    return out
