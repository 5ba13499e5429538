"""The sampling mathematics (docs/design.md, "Sampling") as pure numpy functions.

Nothing here knows about Spark: the job (``spark_jobs.resample``) is a thin
layer that groups records into *classes* of equal weight (one per distinct
label list), asks :func:`make_class_plan` how many copies each class must
produce, and spreads them over a class's records with :func:`rank_copies`.

Exactness
    Label weights are quantised to integers ``q`` with ``WEIGHT_BITS`` bits
    relative to the largest label weight (:func:`quantize_label_weights`), so
    every sum that decides a draw is an integer sum: the same whatever order
    Spark adds it in. Class allotments are computed on the driver with Python
    integers and ``Fraction`` (systematic positions are exact rationals), so
    the sample has exactly N copies, split as the driver decided.

Determinism
    Everything random is drawn from ``numpy.random.default_rng([seed, tag,
    ...])``; inside a class, records are ranked by (order hash, key) where the
    order hash is ``xxhash64(key, seed)``: a uniformly random permutation that
    is a pure function of the index content and the seed.

Why classes
    All records of a class have the same weight, so which of them get copies
    depends only on their rank. The records ranked first are the ones with the
    smallest order hashes: the job keeps only the records under a per-class
    bound (:func:`candidate_bound`), about as many as the class can select,
    and never moves the others, so the cost of drawing scales with N rather
    than with the size of the index.
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
    "split_multinomial",
    "uniform_below",
    "systematic_split",
    "ClassPlan",
    "make_class_plan",
    "rank_copies",
    "rank_copies_many",
    "CANDIDATE_SIGMAS",
    "ORDER_MAX",
    "ranks_needed",
    "candidate_bound",
    "canonical_order",
    "sort_class",
    "Allotment",
    "assign_copies",
    "scheme_label_weights",
]

#: Resolution of the integer weights: ``q(y) = round(w(y) / max w * 2**52)``.
WEIGHT_BITS = 52
#: With ``aggregate=sum`` an example may carry at most this many labels, so
#: that ``q(x)`` stays below 2**62.
MAX_LABELS_FOR_SUM = 1 << 10
#: Tags that separate the random streams drawn from one seed.
_TAG_CLASSES, _TAG_WITHIN, _TAG_PHASE = 0xC1A, 0x1A7, 0x5E7
_MASK64 = (1 << 64) - 1


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


def split_multinomial(size: int, class_q: Sequence[int], seed: int) -> np.ndarray:
    """Split ``size`` i.i.d. draws across classes, multinomially by exact class totals."""
    totals = [int(x) for x in class_q]
    grand = sum(totals)
    if grand <= 0:
        raise ValueError("no example has a non-zero weight")
    p = np.array([float(Fraction(t, grand)) for t in totals], dtype=np.float64)
    rng = np.random.default_rng([seed, _TAG_CLASSES])
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


def uniform_below(rng: np.random.Generator, bound: int) -> int:
    """An exactly uniform integer in ``[0, bound)`` for any positive Python int."""
    bits = int(bound).bit_length()
    nbytes = (bits + 7) // 8
    while True:
        x = int.from_bytes(rng.bytes(nbytes), "little") >> (8 * nbytes - bits)
        if x < bound:
            return x


def systematic_split(lengths: Sequence[int], unit: int, seed: int) -> np.ndarray:
    """Systematic sampling over stretches laid end to end on one line.

    Stretch k is ``lengths[k] / unit`` copies long (exact integers, summing to
    a whole number of copies); the line starts at a uniform phase in
    ``[0, unit)`` drawn from ``seed``. Returns the number of unit marks in
    each stretch: ``⌊ℓ⌋`` or ``⌈ℓ⌉`` of its length ℓ, exactly ℓ when ℓ is
    whole, and in total exactly ``Σ lengths / unit``.
    """
    lengths = np.array([int(x) for x in lengths], dtype=object)
    total = int(lengths.sum()) if lengths.size else 0
    if unit <= 0 or total % unit:
        raise ValueError(f"stretches sum to {total}/{unit} copies, not a whole number")
    if lengths.size == 0:
        return np.zeros(0, np.int64)
    phase = uniform_below(np.random.default_rng([seed, _TAG_PHASE]), unit)
    ends = (np.cumsum(lengths) + phase) // unit
    return np.diff(ends, prepend=phase // unit).astype(np.int64)


@dataclass(frozen=True)
class ClassPlan:
    """What the driver decides before any record is drawn (one per run).

    A *class* is a set of records of equal integer weight ``q`` (in the job:
    one distinct label list). ``class_ids`` are sorted; ``records[k]`` is the
    class's size m, ``counts[k]`` the copies it must produce (exactly,
    ``Σ counts = size``). How a class spreads its copies over its records is
    :func:`rank_copies`, by the records' rank in the canonical order
    (:func:`sort_class`). For the elastic matcher ``threshold`` is the
    saturation threshold on q, ``c`` the exact rate, ``saturated`` the
    number of examples taken whole.
    """

    matcher: str
    draw: str
    size: int
    seed: int
    class_ids: np.ndarray
    records: np.ndarray
    q: np.ndarray
    counts: np.ndarray
    threshold: int | None = None
    c: Fraction | None = None
    saturated: int = 0

    def index_of(self, class_ids: np.ndarray) -> np.ndarray:
        """Positions of ``class_ids`` in the plan (each must be in it)."""
        pos = np.searchsorted(self.class_ids, class_ids)
        pos = np.minimum(pos, max(self.class_ids.size - 1, 0))
        if self.class_ids.size == 0 or not np.array_equal(self.class_ids[pos], np.asarray(class_ids)):
            raise ValueError("internal error: a record's class is not in the plan")
        return pos


def make_class_plan(matcher: str, draw: str, size: int, seed: int, class_ids: Sequence[int],
                    records: Sequence[int], q: Sequence[int]) -> ClassPlan:
    """Driver side of the sampling (docs/design.md, "Sampling"), from the exact class table.

    Classes of weight 0 or no records draw nothing. ``same/multinomial``:
    class counts ~ Multinomial(N, m·q/Σm·q). ``same/systematic``: systematic
    over class stretches of ``N·m·q/Σm·q`` copies. ``elastic``: water-filling
    on the histogram of distinct q; saturated classes give every record,
    the others systematic over stretches of ``c·m·q``.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    ids = np.asarray(class_ids, np.int64)
    m = np.asarray(records, np.int64)
    qa = np.asarray(q, np.int64)
    keep = (m > 0) & (qa > 0)
    ids, m, qa = ids[keep], m[keep], qa[keep]
    order = np.argsort(ids, kind="stable")
    ids, m, qa = ids[order], m[order], qa[order]
    if ids.size and np.any(ids[1:] == ids[:-1]):
        raise ValueError("internal error: a class appears twice in the class table")
    mass = [int(a) * int(b) for a, b in zip(m.tolist(), qa.tolist())]
    total_q = sum(mass)
    if total_q <= 0:
        raise ValueError("no example has a non-zero weight")
    if matcher == "same" and draw == "multinomial":
        counts = split_multinomial(size, mass, seed)
        return ClassPlan(matcher, draw, size, seed, ids, m, qa, counts)
    if matcher == "same" and draw == "systematic":
        counts = systematic_split([size * x for x in mass], total_q, seed)
        return ClassPlan(matcher, draw, size, seed, ids, m, qa, counts)
    if matcher == "elastic":
        hist: dict[int, int] = {}
        for v, k in zip(qa.tolist(), m.tolist()):
            hist[v] = hist.get(v, 0) + k
        ep = water_fill(list(hist), list(hist.values()), size)
        sat = ep.is_saturated(qa)
        counts = np.where(sat, m, 0).astype(np.int64)
        if ep.c is not None and (~sat).any():
            num, den = ep.c.numerator, ep.c.denominator
            lengths = [x * num for x, s in zip(mass, sat.tolist()) if not s]
            counts[~sat] = systematic_split(lengths, den, seed)
        return ClassPlan(matcher, "systematic", size, seed, ids, m, qa, counts,
                         ep.threshold, ep.c, ep.saturated)
    raise ValueError(f"unknown matcher/draw {matcher!r}/{draw!r}")


def rank_copies(draw: str, count: int, records: int, seed: int, class_id: int) -> np.ndarray:
    """Copies of a class's records by rank, for the ranks that get any.

    The class has ``records`` records of equal weight and must produce
    ``count`` copies. ``systematic`` (and elastic): every record gets
    ``⌊count/m⌋``, the first ``count mod m`` ranks one more. ``multinomial``:
    the occupancy profile of ``count`` uniform i.i.d. draws over m records
    (seeded by (seed, class)), sorted in decreasing order; assigning it to
    the records in hash order (a uniformly random permutation) gives exactly
    the multinomial distribution. The result is non-increasing, all > 0,
    and at most ``min(count, records)`` long. (One class of
    :func:`rank_copies_many`.)
    """
    if int(count) <= 0:
        return np.zeros(0, np.int64)
    return rank_copies_many(draw, [count], [records], seed, [class_id])[1]


def rank_copies_many(draw: str, counts: Sequence[int] | np.ndarray, records: Sequence[int] | np.ndarray,
                     seed: int, class_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rank_copies` for many classes at once: ``(lengths, copies)``.

    ``copies`` is the concatenation of ``rank_copies(draw, counts[k],
    records[k], seed, class_ids[k])`` over k, and ``lengths[k]`` the size of
    class k's part (0 where ``counts[k] <= 0``). ``systematic`` is computed
    in one vectorised pass, whatever the number of classes; ``multinomial``
    draws each class from its own random stream.
    """
    counts = np.asarray(counts, np.int64).reshape(-1)
    records = np.asarray(records, np.int64).reshape(-1)
    class_ids = np.asarray(class_ids, np.int64).reshape(-1)
    live = counts > 0
    empty = live & (records <= 0)
    if empty.any():
        k = int(np.flatnonzero(empty)[0])
        raise ValueError(f"class {int(class_ids[k])} must produce {int(counts[k])} copies but has no records")
    if draw == "systematic":
        base, extra = np.divmod(np.where(live, counts, 0), np.maximum(records, 1))
        lengths = np.where(base > 0, records, extra)
        rank = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return lengths, np.repeat(base, lengths) + (rank < np.repeat(extra, lengths))
    if draw != "multinomial" and live.any():
        raise ValueError(f"unknown draw {draw!r}")
    parts = [_occupancy(c, m, seed, k) for c, m, k in
             zip(counts[live].tolist(), records[live].tolist(), class_ids[live].tolist())]
    lengths = np.zeros(counts.size, np.int64)
    lengths[live] = [p.size for p in parts]
    return lengths, np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _occupancy(count: int, records: int, seed: int, class_id: int) -> np.ndarray:
    """Multinomial :func:`rank_copies` of one class (``count``, ``records`` > 0)."""
    rng = np.random.default_rng([seed, _TAG_WITHIN, int(class_id) & _MASK64])
    if count < records:
        _, occupancy = np.unique(rng.integers(0, records, size=count), return_counts=True)
    else:
        occupancy = rng.multinomial(count, np.full(records, 1.0 / records))
        occupancy = occupancy[occupancy > 0]
    return np.sort(occupancy)[::-1].astype(np.int64)


#: ``candidate_bound``'s default margin, in standard deviations of the count
#: of records under the bound: a shortfall (then redone in full) is below
#: ~1e-11 per class even for the smallest allotments.
CANDIDATE_SIGMAS = 8.0
ORDER_MAX = (1 << 63) - 1


def ranks_needed(draw: str, counts: np.ndarray, records: np.ndarray,
                 sigmas: float = CANDIDATE_SIGMAS) -> np.ndarray:
    """Per class: how many of its first ranks :func:`rank_copies` can give
    copies to (an upper bound with a margin of ``sigmas`` standard deviations).

    ``systematic`` (and elastic) needs exactly ``min(count, records)``.
    ``multinomial`` gives copies to the D distinct records that ``count``
    uniform draws hit, ``E[D] = m·(1 - p)`` with ``p = (1 - 1/m)^count``; the
    number of empty records has variance at most ``m·p·(1 - p)`` (its
    indicators are negatively associated). A class needing more than this is
    drawn again in full by the job, so the margin is about cost, not
    correctness.
    """
    counts = np.asarray(counts, np.int64)
    records = np.asarray(records, np.int64)
    exact = np.minimum(counts, records)
    if draw != "multinomial":
        return exact
    m = np.maximum(records, 1).astype(np.float64)
    p = np.exp(counts * np.log1p(-1.0 / np.where(m > 1, m, 2.0)))
    p = np.where(m > 1, p, 0.0)
    mean = m * (1.0 - p)
    spread = np.sqrt(m * p * (1.0 - p))
    bound = np.ceil(mean + sigmas * (spread + 1.0)).astype(np.int64)
    return np.minimum(exact, np.maximum(bound, 0))


def candidate_bound(needed: int, records: int, sigmas: float = CANDIDATE_SIGMAS) -> int:
    """Inclusive upper bound on a record's order hash that keeps about
    ``needed`` of a class's ``records`` (plus a margin).

    Order hashes are uniform over int64, so the records at or under the bound
    are a uniform random subset and, ranked by hash, a prefix of the class's
    canonical order: if it holds at least ``needed`` records, the class can be
    drawn from it alone. Returns ``ORDER_MAX`` (every record) when the margin
    covers the whole class.
    """
    needed, records = int(needed), int(records)
    if needed <= 0:
        return -(1 << 63)  # the least bound (classes that draw nothing are not read at all)
    want = needed + sigmas * (math.sqrt(needed) + 3)
    if want >= records:
        return ORDER_MAX
    span = max(1, -(-(int(math.ceil(want)) << 64) // records))  # ceil(want / records * 2**64)
    return min(ORDER_MAX, -(1 << 63) + span - 1)


def canonical_order(class_ids: np.ndarray, order: np.ndarray, keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Canonical order of records of many classes: by class id, then order
    hash, ties by key (:func:`rank_copies` gives copies by rank in it).

    Returns ``(perm, duplicates)``: the permutation, and the keys (sorted,
    distinct) that two records of one class share (equal keys with equal
    label lists hash equally, so they meet here as ties). ``keys[i]`` is the
    key of record i; it is read only at ties (rare), so a lazy sequence over
    an Arrow column serves.
    """
    class_ids = np.asarray(class_ids, np.int64)
    order = np.asarray(order, np.int64)
    perm = np.lexsort((order, class_ids))
    sc, so = class_ids[perm], order[perm]
    tie = np.concatenate([[0], ((sc[1:] == sc[:-1]) & (so[1:] == so[:-1])).astype(np.int8), [0]])
    duplicates: set[str] = set()
    # Equal (class, order hash): a 64-bit collision or a duplicate key; resolved by key.
    for a, b in zip(np.flatnonzero(np.diff(tie) == 1), np.flatnonzero(np.diff(tie) == -1) + 1):
        members = sorted(perm[a:b].tolist(), key=lambda i: keys[i])
        duplicates.update(keys[i] for i, j in zip(members, members[1:]) if keys[i] == keys[j])
        perm[a:b] = members
    return perm, sorted(duplicates)


def sort_class(order: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """Canonical order of one class's records: by order hash, ties by key.

    Returns the permutation. Raises ``ValueError`` on a duplicate key (equal
    keys with equal labels hash equally, so they meet here).
    """
    order = np.asarray(order, np.int64)
    perm, duplicates = canonical_order(np.zeros(order.size, np.int64), order, keys)
    if duplicates:
        raise ValueError(f"duplicate key {duplicates[0]!r} in the source index")
    return perm


@dataclass(frozen=True)
class Allotment:
    """Copies of a batch of whole classes' candidate records, in canonical
    order (:func:`canonical_order`), from :func:`assign_copies`.

    ``copies`` per record (0: not selected). Per class of the batch, in
    class id order: ``plan_index`` (its position in the plan), ``starts``
    (its first record), ``have`` (its candidates), ``disagree`` (its records
    disagree with the plan's count: more than counted, or a class sent whole
    with another number) and ``short`` (it drew nothing: it disagrees, or
    gives copies to more ranks than it has candidates).
    """

    copies: np.ndarray
    plan_index: np.ndarray
    starts: np.ndarray
    have: np.ndarray
    disagree: np.ndarray
    short: np.ndarray

    def class_copies(self) -> np.ndarray:
        """Copies drawn per class of the batch."""
        if self.starts.size == 0:
            return np.zeros(0, np.int64)
        return np.add.reduceat(self.copies, self.starts)

    def record_plan_index(self) -> np.ndarray:
        """Each record's class, as a position in the plan."""
        return np.repeat(self.plan_index, self.have)


def assign_copies(plan: ClassPlan, class_ids: np.ndarray, whole: np.ndarray) -> Allotment:
    """Give a batch of whole classes' records their copies by rank
    (:func:`rank_copies_many`, all classes at once).

    ``class_ids``: each record's class, in canonical order (so sorted); every
    one must be in ``plan``. ``whole[k]``: plan class k sent every record, so
    its candidates must be exactly its count. A class whose records disagree
    with the plan's count, or with fewer candidates than ranks that get copies
    (its candidate bound fell short), draws nothing (``short``).
    """
    class_ids = np.asarray(class_ids, np.int64)
    n = class_ids.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Allotment(empty, empty, empty, empty, np.zeros(0, bool), np.zeros(0, bool))
    starts = np.concatenate([[0], np.flatnonzero(np.diff(class_ids)) + 1])
    have = np.diff(np.append(starts, n))
    cls = plan.index_of(class_ids[starts])
    m = plan.records[cls]
    disagree = (have > m) | (np.asarray(whole)[cls] & (have != m))
    short = disagree.copy()
    live = np.flatnonzero(~short)
    lengths, by_rank = rank_copies_many(plan.draw, plan.counts[cls[live]], m[live], plan.seed,
                                        plan.class_ids[cls[live]])
    fits = lengths <= have[live]
    short[live[~fits]] = True
    rank = np.arange(by_rank.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = np.repeat(fits, lengths)
    copies = np.zeros(n, np.int64)
    copies[(np.repeat(starts[live], lengths) + rank)[keep]] = by_rank[keep]
    return Allotment(copies, cls, starts, have, disagree, short)


def _inverse_counts(counts) -> np.ndarray:
    """``1 / count(y)`` where a label has examples, else 0: a uniform label distribution."""
    c = np.asarray(counts, np.float64)
    return np.where(c > 0, 1.0 / np.maximum(c, 1), 0.0)


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
    * ``balanced``: a uniform *label* distribution over every label with
      examples, ``w(y) = 1 / count(y)`` (a class-balanced control: rebalanced
      like adaptive transfer, but towards no target). Needs ``counts`` only.
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
    if scheme == "balanced":
        if counts is None:
            raise ValueError("scheme 'balanced' needs the label counts")
        return _inverse_counts(counts)
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
        out[top] = _inverse_counts(np.asarray(counts)[top])
        return out
    if scheme == "reversed":
        out[top] = weights[top[::-1]]
        return out
    raise ValueError(f"unknown scheme {scheme!r}")
