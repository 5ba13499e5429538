"""Importance-weight mathematics (docs/design.md, "Weights"): pure numpy, no Beam.

* :func:`quantize_probabilities` / :func:`mean_from_fixed_point`: exact sums of
  softmax vectors, so P_t does not depend on batching or worker count;
* :func:`importance_weights`: ``w(y) = P_t(y) / P_s(y)``, 0 where no source
  example carries ``y``;
* :func:`entropy`: of P_t, in nats.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pyarrow as pa

from schemas import LABEL_COUNTS_SCHEMA, TARGET_HISTOGRAM_SCHEMA, WEIGHTS_SCHEMA, with_metadata

__all__ = [
    "FIXED_POINT_BITS",
    "softmax",
    "quantize_probabilities",
    "mean_from_fixed_point",
    "importance_weights",
    "entropy",
    "counts_table",
    "histogram_table",
]

#: Each probability is held as hi·2**-50 + lo·2**-100 (two int64 limbs), so
#: a sum over up to 2**13 images per batch fits in int64 and the total over
#: batches, in Python integers, is exact: the order of summation is irrelevant.
FIXED_POINT_BITS = 50
_ONE = float(1 << FIXED_POINT_BITS)


def softmax(logits: np.ndarray, temperature: float = 2.0) -> np.ndarray:
    """``softmax(logits / T)`` along the last axis, in float64."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def quantize_probabilities(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sums of ``p`` (N x V, values in [0, 1]) as exact two-limb integers.

    Returns ``(hi, lo)`` int64 vectors with ``Σ_i p[i] ≈ (hi·2**50 + lo) / 2**100``
    to within N·2**-101 (every p >= 2**-48 is represented exactly).
    """
    p = np.asarray(p, np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected a (batch, classes) array, got shape {p.shape}")
    if p.shape[0] > 1 << 12:
        raise ValueError(f"batch of {p.shape[0]} rows is too large for exact int64 sums (max 4096)")
    scaled = p * _ONE  # exact: scaling by a power of two
    hi = np.floor(scaled)
    lo = np.rint((scaled - hi) * _ONE)  # the remainder is exact; this rounds below 2**-100
    return hi.astype(np.int64).sum(axis=0), lo.astype(np.int64).sum(axis=0)


def mean_from_fixed_point(hi: np.ndarray, lo: np.ndarray, count: int) -> np.ndarray:
    """Mean probability per class from exact limb sums (Python-int object arrays
    or int64), correctly rounded to float64."""
    if count <= 0:
        raise ValueError("no target image was read: cannot compute P_t")
    denom = count << (2 * FIXED_POINT_BITS)
    return np.array([float(Fraction((int(h) << FIXED_POINT_BITS) + int(l), denom))
                     for h, l in zip(hi, lo)], dtype=np.float64)


def importance_weights(label_ids: np.ndarray, counts: np.ndarray, num_examples: int,
                       p_target: np.ndarray) -> tuple[pa.Table, float]:
    """weights table (schemas.WEIGHTS_SCHEMA) and the target mass lost on labels
    with no source example (their weight is 0).

    ``p_source = count / num_examples`` (multi-label: sums to the mean number
    of labels per example); ``weight = p_target / p_source``.
    """
    label_ids = np.asarray(label_ids)
    counts = np.asarray(counts, np.int64)
    p_target = np.asarray(p_target, np.float64)
    if not (label_ids.shape == counts.shape == p_target.shape):
        raise ValueError("label_ids, counts and p_target must have the same length")
    if num_examples <= 0:
        raise ValueError("the source index has no examples")
    p_source = counts / float(num_examples)
    present = counts > 0
    weight = np.zeros_like(p_target)
    weight[present] = p_target[present] / p_source[present]
    lost = math.fsum(p_target[~present].tolist())
    table = pa.table({"label_id": pa.array(label_ids, pa.int32()), "count": pa.array(counts, pa.int64()),
                      "p_source": pa.array(p_source, pa.float64()),
                      "p_target": pa.array(p_target, pa.float64()),
                      "weight": pa.array(weight, pa.float64())}, schema=WEIGHTS_SCHEMA)
    return table, lost


def entropy(p: np.ndarray) -> float:
    """Shannon entropy of a distribution, in nats (0·log 0 = 0)."""
    p = np.asarray(p, np.float64)
    nz = p[p > 0]
    return float(-math.fsum((nz * np.log(nz)).tolist()))


def counts_table(label_ids: np.ndarray, counts: np.ndarray, num_examples: int) -> pa.Table:
    t = pa.table({"label_id": pa.array(label_ids, pa.int32()), "count": pa.array(counts, pa.int64())},
                 schema=LABEL_COUNTS_SCHEMA)
    return with_metadata(t, {"num_examples": int(num_examples)})


def histogram_table(label_ids: np.ndarray, p_target: np.ndarray, num_images: int, temperature: float,
                    model_fingerprint: str | None) -> pa.Table:
    t = pa.table({"label_id": pa.array(label_ids, pa.int32()),
                  "p_target": pa.array(p_target, pa.float64())}, schema=TARGET_HISTOGRAM_SCHEMA)
    return with_metadata(t, {"num_images": int(num_images), "temperature": float(temperature),
                             "model_fingerprint": model_fingerprint})
