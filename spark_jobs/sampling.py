"""The sampling mathematics of DESIGN.md §4 as pure numpy functions.

Nothing here knows about Spark: the job (``spark_jobs.resample``) is a thin
layer that hashes keys into buckets, calls :func:`example_weights` on Arrow
batches, aggregates the per-bucket integers these functions define, and calls
the ``draw_*`` functions once per bucket.

Exactness
    Label weights are quantised to integers ``q`` with ``WEIGHT_BITS`` bits
    relative to the largest label weight (:func:`quantize_label_weights`), so
    every sum that decides a draw is an integer sum: the same whatever order
    Spark adds it in. Bucket allotments are computed on the driver with Python
    integers and ``Fraction``; inside a bucket, positions are int64 *ticks*
    (``2**K`` ticks per expected copy), so totals are exact: the sample has
    exactly N copies, split as the driver decided.

Determinism
    Everything random is drawn from ``numpy.random.default_rng([seed, tag,
    bucket])`` over the bucket's records sorted by (order hash, key): a pure
    function of the index content, the weights, N and the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

__all__ = [
    "WEIGHT_BITS",
    "MAX_LABELS_FOR_SUM",
    "LabelWeights",
    "quantize_label_weights",
    "example_weights",
    "ElasticPlan",
    "water_fill",
    "tick_bits",
    "split_multinomial",
    "BucketTicks",
    "systematic_bucket_ticks",
    "draw_multinomial",
    "draw_systematic",
    "sort_bucket",
    "scheme_label_weights",
    "SamplingPlan",
    "make_plan",
    "draw_bucket",
    "elastic_bucket_saturation",
    "sample_in_memory",
]

#: Resolution of the integer weights: ``q(y) = round(w(y) / max w * 2**52)``.
WEIGHT_BITS = 52
#: With ``aggregate=sum`` an example may carry at most this many labels, so
#: that ``q(x)`` stays below 2**62.
MAX_LABELS_FOR_SUM = 1 << 10
#: Tags that separate the random streams drawn from one seed.
_TAG_BUCKETS, _TAG_WITHIN, _TAG_PHASE = 0xB0C, 0x1A7, 0x5E7


@dataclass(frozen=True)
class LabelWeights:
    """Dense per-label weights, indexed by label id.

    ``weight`` is float64 (the table's value), ``q`` the int64 fixed-point
    weight, ``present`` whether the id is in the weights table at all (an
    index label outside the table is an error, not a zero).
    """

    weight: np.ndarray
    q: np.ndarray
    present: np.ndarray
    scale: float  # q = round(weight * scale)


def quantize_label_weights(label_ids: np.ndarray, weights: np.ndarray) -> LabelWeights:
    """Build dense float and integer label weights from a weights table.

    ``label_ids`` must be non-negative and unique; ``weights`` finite and
    >= 0, not all zero. The largest weight maps to ``2**WEIGHT_BITS``; a
    weight below ``2**-WEIGHT_BITS`` of it becomes 0.
    """
    label_ids = np.asarray(label_ids, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if label_ids.size == 0:
        raise ValueError("the weights table is empty")
    if (label_ids < 0).any():
        raise ValueError(f"label ids must be >= 0, got {int(label_ids.min())}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(weights) | (weights < 0))[0])
        raise ValueError(f"weight of label {int(label_ids[bad])} is {float(weights[bad])!r}; "
                         "weights must be finite and >= 0")
    top = float(weights.max())
    if top <= 0:
        raise ValueError("every label weight is 0: nothing can be sampled")
    size = int(label_ids.max()) + 1
    dense_w = np.zeros(size, np.float64)
    dense_q = np.zeros(size, np.int64)
    present = np.zeros(size, bool)
    scale = float(2 ** WEIGHT_BITS) / top
    dense_w[label_ids] = weights
    dense_q[label_ids] = np.rint(weights * scale).astype(np.int64)
    present[label_ids] = True
    return LabelWeights(weight=dense_w, q=dense_q, present=present, scale=scale)


def example_weights(offsets: np.ndarray, values: np.ndarray, lw: LabelWeights,
                    aggregate: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example weights from label lists in Arrow layout.

    ``offsets`` (n+1) and ``values`` are a list array's offsets and flat
    label ids. Returns ``(w, q, bad)``: float weights (mean/max/sum of the
    label weights), their integer form, and a mask of the examples that have
    an empty list or a label outside the table (their weight is 0).
    Units: ``w`` as in the weights table; ``q`` in ``1/scale`` of it.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    n = offsets.size - 1
    lengths = np.diff(offsets)
    inside = (values >= 0) & (values < lw.present.size)
    ok_value = np.zeros(values.size, bool)
    ok_value[inside] = lw.present[values[inside]]
    bad_rows = lengths == 0
    if not ok_value.all():
        owner = np.repeat(np.arange(n), lengths)
        bad_rows[owner[~ok_value]] = True
    safe = np.where(ok_value, values, 0)
    lw_vals = np.where(ok_value, lw.weight[safe], 0.0)
    lq_vals = np.where(ok_value, lw.q[safe], 0)
    w = np.zeros(n, np.float64)
    q = np.zeros(n, np.int64)
    nonempty = lengths > 0
    starts = offsets[:-1][nonempty]
    if values.size:
        if aggregate == "max":
            w[nonempty] = np.maximum.reduceat(lw_vals, starts)
            q[nonempty] = np.maximum.reduceat(lq_vals, starts)
        elif aggregate in ("mean", "sum"):
            if aggregate == "sum" and lengths.max(initial=0) > MAX_LABELS_FOR_SUM:
                row = int(np.argmax(lengths))
                raise ValueError(f"example {row} has {int(lengths[row])} labels; aggregate=sum "
                                 f"supports at most {MAX_LABELS_FOR_SUM}")
            w_sum = np.add.reduceat(lw_vals, starts)
            q_sum = np.add.reduceat(lq_vals, starts)
            if aggregate == "mean":
                k = lengths[nonempty]
                w[nonempty] = w_sum / k
                q[nonempty] = (q_sum + k // 2) // k  # round half up, in integers
            else:
                w[nonempty] = w_sum
                q[nonempty] = q_sum
        else:
            raise ValueError(f"aggregate must be mean, max or sum, got {aggregate!r}")
    w[bad_rows] = 0.0
    q[bad_rows] = 0
    return w, q, bad_rows


@dataclass(frozen=True)
class ElasticPlan:
    """Result of water-filling: ``π(x) = min(1, c·q(x))`` with ``Σπ = N``.

    ``threshold`` is the smallest saturated integer weight (``q >= threshold``
    means π = 1), ``None`` when nothing saturates; ``c`` is exact.
    ``saturated`` counts saturated examples; ``unsaturated_q`` is the exact
    sum of q over the others.
    """

    threshold: int | None
    c: Fraction | None
    saturated: int
    unsaturated_q: int
    size: int

    def is_saturated(self, q: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            return np.zeros(np.shape(q), bool)
        return np.asarray(q) >= self.threshold


def water_fill(values: Sequence[int], counts: Sequence[int], size: int) -> ElasticPlan:
    """Find ``c`` with ``Σ min(1, c·q) = size`` from the histogram of distinct q.

    ``values`` are distinct positive integer weights, ``counts`` how many
    examples have each. Classes are saturated (taken whole) from the highest
    weight down while ``c·q >= 1``: for single-label data this is exactly the
    paper's recursion (§4.3). Raises ``ValueError`` when ``size`` exceeds
    the number of examples with non-zero weight.
    """
    pairs = sorted(((int(v), int(k)) for v, k in zip(values, counts) if int(v) > 0 and int(k) > 0),
                   reverse=True)
    total = sum(k for _, k in pairs)
    if size > total:
        raise ValueError(f"size {size} is larger than the {total} examples with non-zero weight; "
                         "the elastic matcher samples without replacement")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    saturated = 0
    remaining_q = sum(v * k for v, k in pairs)
    for j, (v, k) in enumerate(pairs):
        c = Fraction(size - saturated, remaining_q)
        if c * v < 1:
            threshold = pairs[j - 1][0] if j > 0 else None
            return ElasticPlan(threshold, c, saturated, remaining_q, size)
        saturated += k
        remaining_q -= v * k
    # size == total: every example with non-zero weight is taken.
    return ElasticPlan(pairs[-1][0], None, saturated, 0, size)


def tick_bits(size: int) -> int:
    """Ticks per expected copy are ``2**K``; K keeps ``size * 2**K < 2**62``."""
    return max(1, min(32, 62 - int(size).bit_length()))


def split_multinomial(size: int, bucket_q: Sequence[int], seed: int) -> np.ndarray:
    """Split ``size`` draws across buckets, multinomially by exact bucket totals."""
    totals = [int(x) for x in bucket_q]
    grand = sum(totals)
    if grand <= 0:
        raise ValueError("no example has a non-zero weight")
    p = np.array([float(Fraction(t, grand)) for t in totals], dtype=np.float64)
    rng = np.random.default_rng([seed, _TAG_BUCKETS])
    return _multinomial(rng, size, p)


def _multinomial(rng: np.random.Generator, n: int, p: np.ndarray) -> np.ndarray:
    """``rng.multinomial`` that tolerates float rounding in ``p`` (sums to 1 ± 1e-12)."""
    p = np.asarray(p, np.float64)
    if p.size == 0:
        return np.zeros(0, np.int64)
    p = p / p.sum()
    # numpy requires sum(p[:-1]) <= 1; move the rounding excess onto the last entry.
    head = math.fsum(p[:-1].tolist())
    if head > 1.0:
        p = p * (1.0 / head) * (1 - 1e-15)
    return rng.multinomial(int(n), p).astype(np.int64)


@dataclass(frozen=True)
class BucketTicks:
    """A bucket's share of a systematic sample: ``ticks`` (its exact number of
    ticks, ``2**bits`` per expected copy), ``start`` (the phase, in ticks, at
    its first record) and ``count`` (copies it must produce)."""

    ticks: int
    start: int
    count: int


def systematic_bucket_ticks(bucket_expected: Sequence[Fraction], size: int, bits: int,
                            seed: int) -> list[BucketTicks]:
    """Lay buckets end to end on one systematic line of ``size`` units.

    ``bucket_expected`` are the exact expected copies per bucket (summing to
    ``size``). The line starts at a seeded uniform phase; a bucket's count is
    the number of unit marks in its stretch, so the counts sum to ``size``.
    """
    total = sum(bucket_expected, Fraction(0))
    if total != size:
        raise ValueError(f"bucket expectations sum to {float(total)}, not {size}")
    one = 1 << bits
    rng = np.random.default_rng([seed, _TAG_PHASE])
    phase = int(rng.integers(0, one))
    out, cum, prev_ticks = [], Fraction(0), 0
    for e in bucket_expected:
        cum += e
        ticks_end = math.floor(cum * one)
        start = prev_ticks + phase
        end = ticks_end + phase
        out.append(BucketTicks(ticks=ticks_end - prev_ticks, start=start % one,
                               count=(end >> bits) - (start >> bits)))
        prev_ticks = ticks_end
    return out


def draw_multinomial(q: np.ndarray, count: int, seed: int, bucket: int) -> np.ndarray:
    """i.i.d. draws of ``count`` copies over one bucket, ``P(x) = q(x)/Σq``.

    ``q`` must be in the bucket's canonical order (:func:`sort_bucket`).
    """
    q = np.asarray(q, np.int64)
    if count == 0:
        return np.zeros(q.size, np.int64)
    total = int(q.sum(dtype=object)) if q.size else 0
    if total <= 0:
        raise ValueError(f"bucket {bucket} must produce {count} copies but has no weight")
    rng = np.random.default_rng([seed, _TAG_WITHIN, bucket])
    return _multinomial(rng, count, q.astype(np.float64) / float(total))


def draw_systematic(expected_ticks: np.ndarray, plan: BucketTicks, bits: int,
                    fixed: np.ndarray | None = None, capped: np.ndarray | None = None) -> np.ndarray:
    """Systematic sampling inside one bucket, exactly ``plan.count`` copies.

    ``expected_ticks`` (float64) are each record's expected copies times
    ``2**bits``, in canonical order. They are rounded to integers and the
    rounding residual is spread one tick at a time over the first eligible
    records, so the bucket holds exactly ``plan.ticks`` ticks: never below 0,
    never on a ``fixed`` record (an exact tick count, e.g. an elastic
    saturated example), never past ``2**bits`` on a ``capped`` one. Each
    record then gets ``⌊m/2**bits⌋`` or ``⌈m/2**bits⌉`` copies of its ticks m.
    """
    one = 1 << bits
    m = np.rint(np.asarray(expected_ticks, np.float64)).astype(np.int64)
    if capped is not None:
        m = np.where(capped, np.minimum(m, one), m)
    residual = plan.ticks - int(m.sum(dtype=object))
    if residual:
        if residual > 0:
            room = np.full(m.size, np.iinfo(np.int64).max // 4, np.int64)
            if capped is not None:
                room = np.where(capped, one - m, room)
        else:
            room = m.copy()
        if fixed is not None:
            room = np.where(fixed, 0, room)
        _spread(m, residual, room)
    t = plan.start + np.cumsum(m)
    copies = np.diff(t >> bits, prepend=plan.start >> bits)
    if int(copies.sum()) != plan.count:
        raise ValueError(f"internal error: bucket produced {int(copies.sum())} copies, "
                         f"expected {plan.count}")
    return copies


def _spread(m: np.ndarray, residual: int, room: np.ndarray) -> None:
    """Add (or remove) ``|residual|`` ticks, one per record in order, within ``room``."""
    sign = 1 if residual > 0 else -1
    left = abs(residual)
    while left:
        eligible = np.flatnonzero(room > 0)
        if eligible.size == 0:
            raise ValueError(f"cannot place {left} rounding ticks in this bucket")
        take = eligible[:left]
        m[take] += sign
        room[take] -= 1
        left -= take.size


def sort_bucket(order: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """Canonical order of a bucket's records: by order hash, ties by key.

    Returns the permutation. Raises ``ValueError`` on a duplicate key (equal
    keys hash equally, so they meet here).
    """
    order = np.asarray(order, np.int64)
    perm = np.argsort(order, kind="stable")
    so = order[perm]
    if np.any(so[1:] == so[:-1]):
        # Resolve equal hashes by key (rare: a 64-bit collision or a duplicate).
        perm = perm.copy()
        for g in np.split(np.arange(so.size), np.flatnonzero(so[1:] != so[:-1]) + 1):
            if g.size > 1:
                members = sorted(perm[g].tolist(), key=lambda i: keys[i])
                for a, b in zip(members, members[1:]):
                    if keys[a] == keys[b]:
                        raise ValueError(f"duplicate key {keys[a]!r} in the source index")
                perm[g] = members
    return perm


def scheme_label_weights(scheme: str, label_ids: np.ndarray, weights: np.ndarray | None,
                         counts: np.ndarray | None = None, subset_ids: np.ndarray | None = None,
                         top_k: int | None = None) -> np.ndarray:
    """Label weights for the paper's baselines (Tables 1, 3 and 6).

    * ``adaptive``: the importance weights (only the top-K labels if ``top_k``).
    * ``entire``: 1 for every label (uniform over examples, single-label).
    * ``subset``: 1 for ``subset_ids`` (descendants of the named labels), else 0.
    * ``topk-uniform``: a uniform *label* distribution over the top-K labels by
      importance weight: ``w(y) = 1 / count(y)`` there, 0 elsewhere (Table 6's
      "uniform distribution on all selected labels").
    * ``reversed``: among the top-K labels, the label ranked i by weight gets
      the weight of the label ranked K-1-i (Table 6), 0 elsewhere.
    Ties in weight are ranked by label id.
    """
    label_ids = np.asarray(label_ids)
    n = label_ids.size
    if scheme == "entire":
        return np.ones(n, np.float64)
    if scheme == "subset":
        if subset_ids is None or len(subset_ids) == 0:
            raise ValueError("scheme 'subset' needs the ids of the subset labels")
        return np.isin(label_ids, subset_ids).astype(np.float64)
    if weights is None:
        raise ValueError(f"scheme {scheme!r} needs the importance weights table")
    weights = np.asarray(weights, np.float64)
    ranked = np.lexsort((label_ids, -weights))  # by weight desc, then id
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        positive = int((weights > 0).sum())
        if top_k > positive:
            raise ValueError(f"top_k {top_k} exceeds the {positive} labels with non-zero weight")
    if scheme == "adaptive":
        if top_k is None:
            return weights.copy()
        out = np.zeros(n, np.float64)
        out[ranked[:top_k]] = weights[ranked[:top_k]]
        return out
    if top_k is None:
        raise ValueError(f"scheme {scheme!r} needs top_k")
    top = ranked[:top_k]
    out = np.zeros(n, np.float64)
    if scheme == "topk-uniform":
        if counts is None:
            raise ValueError("scheme 'topk-uniform' needs the label counts")
        c = np.asarray(counts, np.float64)[top]
        out[top] = np.where(c > 0, 1.0 / np.maximum(c, 1), 0.0)
        return out
    if scheme == "reversed":
        out[top] = weights[top[::-1]]
        return out
    raise ValueError(f"unknown scheme {scheme!r}")


@dataclass(frozen=True)
class SamplingPlan:
    """What the driver decides before any record is drawn (one per run).

    ``counts[b]`` (multinomial) or ``ticks[b]`` (systematic and elastic) per
    bucket id; ``rate`` converts an integer weight q into expected ticks
    (``N·2**bits/Σq`` for same, ``c·2**bits`` for elastic); ``threshold`` is
    the elastic saturation threshold on q.
    """

    matcher: str
    draw: str
    size: int
    seed: int
    bits: int
    counts: dict
    ticks: dict
    rate: float
    threshold: int | None
    c: Fraction | None = None
    saturated: int = 0


def make_plan(matcher: str, draw: str, size: int, seed: int, bucket_q: dict[int, int],
              elastic: ElasticPlan | None = None,
              bucket_saturated: dict[int, tuple[int, int]] | None = None) -> SamplingPlan:
    """Driver side of DESIGN.md §4, from exact per-bucket integer totals.

    ``bucket_q`` maps bucket id -> Σq over its records (exact). For the
    elastic matcher, ``elastic`` is the water-filling result and
    ``bucket_saturated`` maps bucket id -> (number of saturated records,
    Σq of its unsaturated records).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    buckets = sorted(b for b, v in bucket_q.items() if v > 0)
    total_q = sum(bucket_q[b] for b in buckets)
    if total_q <= 0:
        raise ValueError("no example has a non-zero weight")
    bits = tick_bits(size)
    if matcher == "same" and draw == "multinomial":
        split = split_multinomial(size, [bucket_q[b] for b in buckets], seed)
        return SamplingPlan(matcher, draw, size, seed, bits, dict(zip(buckets, split.tolist())), {},
                            0.0, None)
    if matcher == "same" and draw == "systematic":
        expected = [Fraction(size * bucket_q[b], total_q) for b in buckets]
        ticks = systematic_bucket_ticks(expected, size, bits, seed)
        rate = float(Fraction(size << bits, total_q))
        return SamplingPlan(matcher, draw, size, seed, bits, {}, dict(zip(buckets, ticks)), rate, None)
    if matcher == "elastic":
        if elastic is None or bucket_saturated is None:
            raise ValueError("the elastic matcher needs its water-filling plan and per-bucket saturation")
        c = elastic.c if elastic.c is not None else Fraction(0)
        sat = {b: bucket_saturated.get(b, (0, 0)) for b in buckets}
        expected = [sat[b][0] + c * sat[b][1] for b in buckets]
        ticks = systematic_bucket_ticks(expected, size, bits, seed)
        return SamplingPlan(matcher, "systematic", size, seed, bits, {}, dict(zip(buckets, ticks)),
                            float(c * (1 << bits)), elastic.threshold, elastic.c, elastic.saturated)
    raise ValueError(f"unknown matcher/draw {matcher!r}/{draw!r}")


def draw_bucket(plan: SamplingPlan, bucket: int, q: np.ndarray) -> np.ndarray:
    """Copies for one bucket's records (``q`` in canonical order, all > 0)."""
    q = np.asarray(q, np.int64)
    if plan.draw == "multinomial":
        return draw_multinomial(q, plan.counts.get(bucket, 0), plan.seed, bucket)
    bt = plan.ticks.get(bucket)
    if bt is None:
        return np.zeros(q.size, np.int64)
    if plan.matcher == "elastic":
        sat = q >= plan.threshold if plan.threshold is not None else np.zeros(q.size, bool)
        expected = np.where(sat, float(1 << plan.bits), q.astype(np.float64) * plan.rate)
        copies = draw_systematic(expected, bt, plan.bits, fixed=sat, capped=~sat)
        if copies.max(initial=0) > 1:
            raise ValueError("internal error: elastic matcher selected an example twice")
        return copies
    return draw_systematic(q.astype(np.float64) * plan.rate, bt, plan.bits)


def elastic_bucket_saturation(bucket: np.ndarray, q: np.ndarray, threshold: int | None
                              ) -> dict[int, tuple[int, int]]:
    """Per bucket: (saturated records, exact Σq of the others). Reference helper."""
    out: dict[int, tuple[int, int]] = {}
    sat = q >= threshold if threshold is not None else np.zeros(q.size, bool)
    for b in np.unique(bucket):
        sel = bucket == b
        out[int(b)] = (int(sat[sel].sum()), int(q[sel & ~sat].astype(object).sum()))
    return out


def sample_in_memory(keys: Sequence[str], bucket: np.ndarray, order: np.ndarray, q: np.ndarray,
                     size: int, matcher: str = "same", draw: str = "multinomial", seed: int = 0
                     ) -> tuple[np.ndarray, SamplingPlan]:
    """Single-process reference of the whole sampler: copies per input record.

    Same results as the Spark job for the same (bucket, order, q) arrays; used
    by the tests as an oracle and by the benchmarks as the numpy baseline.
    """
    bucket = np.asarray(bucket, np.int64)
    order = np.asarray(order, np.int64)
    q = np.asarray(q, np.int64)
    keys = list(keys)
    positive = q > 0
    idx_pos = np.flatnonzero(positive)
    bucket_q = {}
    ub, inv = np.unique(bucket[idx_pos], return_inverse=True)
    for i, b in enumerate(ub):
        bucket_q[int(b)] = int(q[idx_pos][inv == i].astype(object).sum())
    elastic = sat = None
    if matcher == "elastic":
        values, counts = np.unique(q[idx_pos], return_counts=True)
        elastic = water_fill(values.tolist(), counts.tolist(), size)
        sat = elastic_bucket_saturation(bucket[idx_pos], q[idx_pos], elastic.threshold)
    plan = make_plan(matcher, draw, size, seed, bucket_q, elastic, sat)
    copies = np.zeros(len(keys), np.int64)
    for b in ub:
        members = idx_pos[bucket[idx_pos] == b]
        perm = sort_bucket(order[members], [keys[i] for i in members])
        ordered = members[perm]
        copies[ordered] = draw_bucket(plan, int(b), q[ordered])
    return copies, plan
