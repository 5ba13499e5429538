"""The sampling mathematics (spark_jobs.sampling) on its own: exact small
cases by hand, properties over grids, and statistical checks."""

from fractions import Fraction

import numpy as np
import pytest

from spark_jobs import sampling as S
from tests.sampling_reference import sample_in_memory


def lw_for(weights):
    ids = np.arange(len(weights))
    return S.quantize_label_weights(ids, np.asarray(weights, float))


def lists(rows):
    offsets = np.cumsum([0] + [len(r) for r in rows])
    values = np.array([v for r in rows for v in r], np.int64)
    return offsets, values


# -- label and example weights -------------------------------------------------

def test_quantize_maps_largest_weight_to_full_scale():
    lw = S.quantize_label_weights(np.array([0, 3, 5]), np.array([1.0, 4.0, 0.0]))
    assert lw.q[3] == 2 ** 52 and lw.q[0] == 2 ** 50 and lw.q[5] == 0
    assert lw.present.tolist() == [True, False, False, True, False, True]


@pytest.mark.parametrize("weights,message", [
    ([1.0, float("nan")], "weight of label 1 is nan"),
    ([1.0, -2.0], "weight of label 1 is -2.0"),
    ([0.0, 0.0], "every label weight is 0"),
])
def test_quantize_rejects_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        S.quantize_label_weights(np.arange(len(weights)), np.array(weights))


@pytest.mark.parametrize("aggregate,expected", [
    # Label weights [1, 0, 4]; examples [0], [0, 2], [2, 1, 2] (a repeated label counts twice):
    # mean = 1, (1+4)/2, (4+0+4)/3; max = 1, 4, 4; sum = 1, 1+4, 4+0+4.
    ("mean", [1.0, 2.5, 8.0 / 3]), ("max", [1.0, 4.0, 4.0]), ("sum", [1.0, 5.0, 8.0]),
])
def test_example_weights_aggregate(aggregate, expected):
    lw = lw_for([1.0, 0.0, 4.0])  # label 1 has weight 0
    offsets, values = lists([[0], [0, 2], [2, 1, 2]])
    w, q, bad = S.example_weights(offsets, values, lw, aggregate)
    assert not bad.any()
    np.testing.assert_allclose(w, expected)
    np.testing.assert_allclose(q / lw.scale, expected, rtol=1e-15)


def test_example_weights_flags_unknown_and_empty():
    lw = S.quantize_label_weights(np.array([0, 2]), np.array([1.0, 2.0]))
    offsets, values = lists([[0], [2, 1], [7]])
    w, q, bad = S.example_weights(offsets, values, lw)
    assert bad.tolist() == [False, True, True]  # label 1 is not in the table (ids 0 and 2 are)
    assert q[1] == 0 and q[2] == 0 and w[0] == 1.0
    offsets, values = lists([[0], []])
    assert S.example_weights(offsets, values, lw)[2].tolist() == [False, True]


# -- water-filling ---------------------------------------------------------------

def test_water_fill_by_hand():
    # Three classes of 10 examples, weights 4, 2, 1.
    plan = S.water_fill([4, 2, 1], [10, 10, 10], 15)
    assert plan.threshold is None and plan.c == Fraction(15, 70) and plan.saturated == 0
    # N = 25: take all of class 4 (desired 14.3 > 10), then of the remaining
    # 15 from classes 2 and 1, class 2 wants 15*20/30 = 10 = all of it, so it
    # saturates too; the last 5 come from class 1 at rate 1/2.
    plan = S.water_fill([4, 2, 1], [10, 10, 10], 25)
    assert plan.threshold == 2 and plan.saturated == 20 and plan.c == Fraction(1, 2)
    plan = S.water_fill([4, 2, 1], [10, 10, 10], 30)
    assert plan.saturated == 30 and plan.c is None


def test_water_fill_rejects_size_above_nonzero_examples():
    with pytest.raises(ValueError, match="size 31 is larger than the 30 examples with non-zero weight"):
        S.water_fill([4, 2, 1], [10, 10, 10], 31)


def paper_recursion(sizes, weights, n):
    """The paper's §4.3 procedure, literally: expected examples per class."""
    classes = sorted(range(len(sizes)), key=lambda i: -weights[i])
    take = {}
    remaining, pool = Fraction(n), list(classes)
    while pool:
        top = pool[0]
        mass = sum(Fraction(weights[i]) * sizes[i] for i in pool)
        want = remaining * Fraction(weights[top]) * sizes[top] / mass
        if want >= sizes[top]:
            take[top] = Fraction(sizes[top])
            remaining -= sizes[top]
            pool.pop(0)
        else:
            for i in pool:
                take[i] = remaining * Fraction(weights[i]) * sizes[i] / mass
            break
    return take


@pytest.mark.parametrize("seed", range(8))
def test_water_fill_equals_paper_recursion_on_single_label_data(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 12))
    sizes = rng.integers(1, 50, k).tolist()
    weights = rng.integers(1, 1000, k).tolist()
    weights = list(dict.fromkeys(weights))  # distinct class weights
    sizes = sizes[:len(weights)]
    n = int(rng.integers(1, sum(sizes) + 1))
    plan = S.water_fill(weights, sizes, n)
    ref = paper_recursion(sizes, weights, n)
    for i, (s, w) in enumerate(zip(sizes, weights)):
        pi = Fraction(1) if plan.threshold is not None and w >= plan.threshold else plan.c * w
        assert pi * s == ref[i]


# -- the plan and the draws -------------------------------------------------------

def synthetic_records(n, seed=0, classes=60, distinct=None):
    """keys, class ids, order hashes and weights (equal within a class)."""
    rng = np.random.default_rng(seed)
    keys = [f"k{i:06d}" for i in range(n)]
    cls = rng.integers(0, classes, n)
    if distinct is None:
        class_q = rng.integers(1, 2 ** 40, classes)
    else:
        class_q = np.asarray(distinct)[np.arange(classes) % len(distinct)]
    return keys, cls, rng.integers(-2 ** 63, 2 ** 63 - 1, n, dtype=np.int64), class_q[cls]


@pytest.mark.parametrize("matcher,draw", [("same", "multinomial"), ("same", "systematic"),
                                          ("elastic", "systematic")])
@pytest.mark.parametrize("size", [1, 17, 500, 2000])
def test_exact_size(matcher, draw, size):
    keys, cls, order, q = synthetic_records(1000, seed=size)
    if matcher == "elastic" and size > 1000:
        with pytest.raises(ValueError, match="size 2000 is larger than the 1000 examples"):
            sample_in_memory(keys, cls, order, q, size, matcher, draw)
        return
    copies, _ = sample_in_memory(keys, cls, order, q, size, matcher, draw)
    assert copies.sum() == size and (copies >= 0).all()
    if matcher == "elastic":
        assert copies.max() == 1


@pytest.mark.parametrize("size", [10, 999, 5000, 12345])
def test_systematic_gives_floor_or_ceil(size):
    keys, cls, order, q = synthetic_records(1000, seed=3)
    copies, _ = sample_in_memory(keys, cls, order, q, size, "same", "systematic", seed=1)
    e = size * q.astype(float) / q.astype(object).sum()
    assert ((copies == np.floor(e)) | (copies == np.ceil(e))).all()
    assert copies.sum() == size


def test_systematic_integer_expectations_are_exact():
    keys, cls, order, _ = synthetic_records(300, seed=4)
    q = np.full(300, 5, np.int64)
    copies, _ = sample_in_memory(keys, cls, order, q, 900, "same", "systematic", seed=2)
    assert (copies == 3).all()


def test_elastic_takes_saturated_classes_whole():
    keys, cls, order, q = synthetic_records(600, seed=5, classes=9, distinct=[400, 200, 1])
    n_top, n_mid = int((q == 400).sum()), int((q == 200).sum())
    size = n_top + n_mid + 10
    copies, plan = sample_in_memory(keys, cls, order, q, size, "elastic")
    assert plan.threshold == 200
    assert copies[q == 400].sum() == n_top and copies[q == 200].sum() == n_mid
    assert copies[q == 1].sum() == 10 and copies.sum() == size


def test_elastic_whole_index_when_size_equals_nonzero_count():
    keys, cls, order, q = synthetic_records(200, seed=6, classes=6, distinct=[3, 2, 1])
    cls[:5], q[:5] = 99, 0
    copies, _ = sample_in_memory(keys, cls, order, q, 195, "elastic")
    assert (copies[5:] == 1).all() and (copies[:5] == 0).all()


@pytest.mark.parametrize("matcher,draw", [("same", "multinomial"), ("same", "systematic"),
                                          ("elastic", "systematic")])
def test_unbiased_over_seeds(matcher, draw):
    """Mean copies over many seeds approach e(x) (OpenCLIP-style rate check).
    The order hash depends on the seed, as in the job."""
    keys, cls, _, q = synthetic_records(50, seed=8, classes=12)
    q = (q % 19 + 1).astype(np.int64)
    size = 30
    runs = 600
    total = np.zeros(50)
    for seed in range(runs):
        order = np.random.default_rng(1000 + seed).integers(-2 ** 63, 2 ** 63 - 1, 50, dtype=np.int64)
        total += sample_in_memory(keys, cls, order, q, size, matcher, draw, seed=seed)[0]
    mean = total / runs
    if matcher == "same":
        expected = size * q / q.sum()
    else:
        plan = S.water_fill(*np.unique(q, return_counts=True), size)
        expected = np.array([1.0 if plan.threshold is not None and v >= plan.threshold
                             else float(plan.c * int(v)) for v in q])
    # Standard error of a mean of `runs` draws with variance <= e(1+e) ...
    se = np.sqrt(np.maximum(expected, 0.05) * (1 + expected) / runs)
    assert np.all(np.abs(mean - expected) < 5 * se), np.max(np.abs(mean - expected) / se)


def test_multinomial_chi_square():
    """Pooled multinomial counts against expected frequencies: chi-square test
    over 40 records in 8 classes of 5 (so the within-class profiles count)."""
    keys = [f"k{i}" for i in range(40)]
    cls = np.repeat(np.arange(8), 5)
    q = (cls + 1).astype(np.int64)
    size = 20000
    rng = np.random.default_rng(3)
    copies = np.zeros(40)
    for seed in range(4):
        order = rng.integers(-2 ** 63, 2 ** 63 - 1, 40, dtype=np.int64)
        copies += sample_in_memory(keys, cls, order, q, size // 4, "same", "multinomial", seed=seed)[0]
    expected = size * q / q.sum()
    chi2 = float(((copies - expected) ** 2 / expected).sum())
    # 39 degrees of freedom: P(chi2 > 72.1) = 0.001.
    assert chi2 < 72.1, chi2


def test_deterministic_and_independent_of_input_order():
    keys, cls, order, q = synthetic_records(800, seed=11)
    perm = np.random.default_rng(0).permutation(800)
    for matcher, draw in (("same", "multinomial"), ("same", "systematic"), ("elastic", "systematic")):
        a, _ = sample_in_memory(keys, cls, order, q, 300, matcher, draw, seed=7)
        b, _ = sample_in_memory([keys[i] for i in perm], cls[perm], order[perm], q[perm], 300,
                                  matcher, draw, seed=7)
        assert (a[perm] == b).all()
        c, _ = sample_in_memory(keys, cls, order, q, 300, matcher, draw, seed=8)
        assert not (a == c).all()


def test_sort_class_breaks_ties_by_key_and_finds_duplicates():
    order = np.array([5, 1, 5, 3])
    perm = S.sort_class(order, ["b", "x", "a", "y"])
    assert perm.tolist() == [1, 3, 2, 0]
    with pytest.raises(ValueError, match="duplicate key 'a' in the source index"):
        S.sort_class(np.array([5, 5]), ["a", "a"])


def test_systematic_split_by_hand_and_exact():
    # Stretches of 0.5, 1, 1.5 copies (unit 2): whole stretches get exactly their length.
    for seed in range(20):
        counts = S.systematic_split([1, 2, 3], 2, seed)
        assert counts.sum() == 3 and counts[1] == 1 and counts[0] in (0, 1) and counts[2] in (1, 2)
    assert S.systematic_split([10 ** 30, 3 * 10 ** 30], 10 ** 30, 0).tolist() == [1, 3]
    with pytest.raises(ValueError, match="not a whole number"):
        S.systematic_split([1, 2], 2, 0)


def test_uniform_below_is_in_range_for_big_bounds():
    rng = np.random.default_rng(0)
    bound = 3 * 2 ** 80 + 7
    draws = [S.uniform_below(rng, bound) for _ in range(2000)]
    assert min(draws) >= 0 and max(draws) < bound and max(draws) > bound // 2


def test_rank_copies():
    assert S.rank_copies("systematic", 7, 3, 0, 1).tolist() == [3, 2, 2]
    assert S.rank_copies("systematic", 2, 5, 0, 1).tolist() == [1, 1]
    assert S.rank_copies("systematic", 0, 5, 0, 1).tolist() == []
    for count, records in [(5, 1000), (1000, 5), (50, 50)]:
        by_rank = S.rank_copies("multinomial", count, records, 4, -17)
        assert by_rank.sum() == count and by_rank.size <= min(count, records)
        assert (np.diff(by_rank) <= 0).all() and (by_rank > 0).all()
        assert by_rank.tolist() == S.rank_copies("multinomial", count, records, 4, -17).tolist()
    with pytest.raises(ValueError, match="has no records"):
        S.rank_copies("systematic", 3, 0, 0, 1)


def test_rank_copies_many_is_rank_copies_per_class():
    lengths, copies = S.rank_copies_many("systematic", [7, 0, 2, 5, -1], [3, 4, 5, 5, 2], 0, [1, 2, 3, 4, 5])
    assert lengths.tolist() == [3, 0, 2, 5, 0] and copies.tolist() == [3, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    rng = np.random.default_rng(5)
    for _ in range(50):
        k = int(rng.integers(0, 30))
        counts, records = rng.integers(-2, 60, k), rng.integers(1, 25, k)
        ids = rng.integers(-(1 << 62), 1 << 62, k)
        for draw in ("systematic", "multinomial"):
            lengths, copies = S.rank_copies_many(draw, counts, records, 9, ids)
            parts = np.split(copies, np.cumsum(lengths)[:-1]) if k else []
            assert len(parts) == k and copies.dtype == np.int64
            for c, m, cid, part in zip(counts.tolist(), records.tolist(), ids.tolist(), parts):
                assert part.tolist() == S.rank_copies(draw, c, m, 9, cid).tolist()
                if draw == "systematic" and c > 0:  # by hand: floor for all, one more for the first ranks
                    base, extra = divmod(c, m)
                    assert part.tolist() == ([base + 1] * extra + [base] * (m - extra) if base else [1] * extra)
    with pytest.raises(ValueError, match="class 8 must produce 3 copies but has no records"):
        S.rank_copies_many("systematic", [1, 3], [1, 0], 0, [7, 8])
    with pytest.raises(ValueError, match="unknown draw"):
        S.rank_copies_many("stratified", [1], [1], 0, [7])


def test_candidate_bound_keeps_enough_records():
    rng = np.random.default_rng(0)
    assert S.candidate_bound(10, 60) == S.ORDER_MAX  # the margin covers the class
    for needed, records in [(100, 100_000), (1000, 20_000), (5, 50_000)]:
        bound = S.candidate_bound(needed, records)
        share = (bound + 2 ** 63 + 1) / 2 ** 64
        assert needed / records < share < 3 * (needed + 200) / records
        order = rng.integers(-2 ** 63, 2 ** 63 - 1, records, dtype=np.int64)
        assert (order <= bound).sum() >= needed



def test_ranks_needed_covers_rank_copies_and_is_tighter_than_count():
    counts = np.array([0, 1, 5, 1000, 3000, 20000, 7, 50])
    records = np.array([10, 1, 1, 4000, 3000, 5000, 7, 100_000])
    sys_needed = S.ranks_needed("systematic", counts, records)
    assert sys_needed.tolist() == np.minimum(counts, records).tolist()
    needed = S.ranks_needed("multinomial", counts, records)
    assert (needed <= np.minimum(counts, records)).all()
    # Draws comparable to the class size hit far fewer distinct records than draws.
    assert needed[4] < 0.75 * counts[4] and needed[5] < records[5]
    for seed in range(20):
        for k, (c, m) in enumerate(zip(counts.tolist(), records.tolist())):
            assert S.rank_copies("multinomial", c, m, seed, k).size <= needed[k]
    assert S.ranks_needed("multinomial", counts, records, sigmas=-2.0)[4] < needed[4]

# -- schemes ------------------------------------------------------------------------

def test_scheme_weights():
    ids = np.array([0, 1, 2, 3, 4])
    w = np.array([0.5, 4.0, 0.0, 2.0, 1.0])
    counts = np.array([10, 20, 0, 40, 50])
    assert S.scheme_label_weights("entire", ids, None).tolist() == [1, 1, 1, 1, 1]
    assert S.scheme_label_weights("subset", ids, None, subset_ids=np.array([1, 4])).tolist() == [0, 1, 0, 0, 1]
    assert S.scheme_label_weights("adaptive", ids, w).tolist() == w.tolist()
    assert S.scheme_label_weights("adaptive", ids, w, top_k=2).tolist() == [0, 4.0, 0, 2.0, 0]
    # top-3 labels by weight: 1 (4.0), 3 (2.0), 4 (1.0)
    assert S.scheme_label_weights("reversed", ids, w, top_k=3).tolist() == [0, 1.0, 0, 2.0, 4.0]
    np.testing.assert_allclose(S.scheme_label_weights("topk-uniform", ids, w, counts, top_k=3),
                               [0, 1 / 20, 0, 1 / 40, 1 / 50])
    # balanced: every label with examples, none preferred (the importance weights play no part)
    np.testing.assert_allclose(S.scheme_label_weights("balanced", ids, None, counts),
                               [1 / 10, 1 / 20, 0, 1 / 40, 1 / 50])
    with pytest.raises(ValueError, match="'balanced' needs the label counts"):
        S.scheme_label_weights("balanced", ids, w)
    with pytest.raises(ValueError, match="top_k 5 exceeds the 4 labels with non-zero weight"):
        S.scheme_label_weights("reversed", ids, w, top_k=5)


# -- the per-partition draw: canonical order and copies by rank --------------------------

class CountingKeys:
    """A sequence of keys that records which of them are read (canonical_order reads only ties)."""

    def __init__(self, keys):
        self.keys, self.read = list(keys), set()

    def __getitem__(self, i):
        self.read.add(i)
        return self.keys[i]


def test_canonical_order_by_hand():
    # Records 0..6: classes 2, 1, 2, 1, 2, 2, 1; order hashes 5, 9, 5, 3, -4, 5, 9.
    cls = np.array([2, 1, 2, 1, 2, 2, 1])
    order = np.array([5, 9, 5, 3, -4, 5, 9])
    keys = CountingKeys(["c", "q", "a", "z", "y", "b", "p"])
    perm, duplicates = S.canonical_order(cls, order, keys)
    # class 1: (3, z), then the tie at 9 by key: p (6), q (1); class 2: -4 (4), then the tie at 5: a, b, c.
    assert perm.tolist() == [3, 6, 1, 4, 2, 5, 0] and duplicates == []
    assert keys.read == {0, 1, 2, 5, 6}  # only the tied records' keys were read
    untied = CountingKeys("abcdefg")
    assert S.canonical_order(np.arange(7), order, untied)[0].tolist() == list(range(7))
    assert untied.read == set()


def test_canonical_order_reports_keys_shared_within_a_class():
    # "k" twice in class 1 and "m" three times in class 2 (equal keys hash equally); "k" once more
    # in class 2 is not a duplicate within a class.
    cls = np.array([1, 2, 1, 2, 2, 2, 1])
    order = np.array([7, 3, 7, 3, 3, 8, 1])
    keys = ["k", "m", "k", "m", "m", "k", "a"]
    perm, duplicates = S.canonical_order(cls, order, keys)
    assert duplicates == ["k", "m"]
    assert sorted(perm.tolist()) == list(range(7))
    assert [keys[i] for i in perm] == ["a", "k", "k", "m", "m", "m", "k"]


@pytest.mark.parametrize("seed", range(6))
def test_canonical_order_within_a_class_is_sort_class(seed):
    keys, cls, _, _ = synthetic_records(400, seed=seed, classes=7)
    order = np.random.default_rng(seed).integers(-5, 5, 400)  # many ties, broken by key
    perm, duplicates = S.canonical_order(cls, order, keys)
    assert duplicates == []
    assert (np.diff(cls[perm]) >= 0).all()
    for c in np.unique(cls):
        members = np.flatnonzero(cls == c)
        expected = members[S.sort_class(order[members], [keys[i] for i in members])]
        assert perm[cls[perm] == c].tolist() == expected.tolist()


def _all_candidates(plan, keys, cls, order):
    """Every record as a candidate, in canonical order: (perm, class ids in that order)."""
    perm, duplicates = S.canonical_order(cls, order, keys)
    assert duplicates == []
    return perm, cls[perm]


@pytest.mark.parametrize("matcher,draw,size", [("same", "multinomial", 700), ("same", "systematic", 700),
                                               ("elastic", "systematic", 300)])
def test_assign_copies_equals_the_reference_sampler(matcher, draw, size):
    keys, cls, order, q = synthetic_records(900, seed=21, classes=40)
    copies, plan = sample_in_memory(keys, cls, order, q, size, matcher, draw, seed=4)
    planned = np.isin(cls, plan.class_ids)
    keys_p, cls_p, order_p = [k for k, p in zip(keys, planned) if p], cls[planned], order[planned]
    perm, sorted_cls = _all_candidates(plan, keys_p, cls_p, order_p)
    whole = np.ones(plan.class_ids.size, bool)
    a = S.assign_copies(plan, sorted_cls, whole)
    assert not a.short.any() and not a.disagree.any()
    got = np.zeros(cls.size, np.int64)
    got[np.flatnonzero(planned)[perm]] = a.copies
    assert got.tolist() == copies.tolist()
    assert a.class_copies().tolist() == plan.counts[a.plan_index].tolist()
    assert plan.class_ids[a.plan_index].tolist() == np.unique(cls_p).tolist()
    assert (plan.class_ids[a.record_plan_index()] == sorted_cls).all()
    assert a.have.tolist() == plan.records[a.plan_index].tolist() and a.copies.sum() == size


def test_assign_copies_flags_short_and_disagreeing_classes():
    # Three classes of 10 records with weights 1, 2, 3: systematic N = 60 gives 10, 20, 30 copies.
    plan = S.make_class_plan("same", "systematic", 60, 0, [11, 22, 33], [10, 10, 10], [1, 2, 3])
    assert plan.counts.tolist() == [10, 20, 30]
    # Class 11 sends 4 of its 10 records (needs all 10 ranks: short); class 22 sends 12 (more
    # than counted: disagrees); class 33 is sent whole but with 9 records (disagrees).
    ids = np.array([11] * 4 + [22] * 12 + [33] * 9)
    a = S.assign_copies(plan, ids, np.array([False, False, True]))
    assert a.have.tolist() == [4, 12, 9] and a.starts.tolist() == [0, 4, 16]
    assert a.disagree.tolist() == [False, True, True] and a.short.tolist() == [True, True, True]
    assert a.copies.sum() == 0 and a.class_copies().tolist() == [0, 0, 0]
    # Enough candidates: class 22 with its 10 records gets 2 copies each; 33 whole with 10: 3 each.
    ids = np.array([22] * 10 + [33] * 10)
    a = S.assign_copies(plan, ids, np.array([False, False, True]))
    assert not a.short.any() and a.copies.tolist() == [2] * 10 + [3] * 10
    assert a.plan_index.tolist() == [1, 2] and a.class_copies().tolist() == [20, 30]
    empty = S.assign_copies(plan, np.zeros(0, np.int64), np.zeros(3, bool))
    assert empty.copies.size == 0 and empty.class_copies().size == 0
    with pytest.raises(ValueError, match="a record's class is not in the plan"):
        S.assign_copies(plan, np.array([44]), np.zeros(3, bool))


def test_assign_copies_of_a_candidate_prefix_equals_all_records():
    """Candidates under a bound are a prefix of each class's canonical order:
    where it is long enough, the copies are those of the whole class."""
    keys, cls, order, q = synthetic_records(2000, seed=22, classes=12)
    plan = S.make_class_plan("same", "multinomial", 150, 3, *np.unique(cls, return_counts=True),
                             q[np.unique(cls, return_index=True)[1]])
    perm, sorted_cls = _all_candidates(plan, keys, cls, order)
    full = S.assign_copies(plan, sorted_cls, np.ones(plan.class_ids.size, bool))
    bounds = np.array([S.candidate_bound(k, m) for k, m in
                       zip(S.ranks_needed("multinomial", plan.counts, plan.records).tolist(), plan.records.tolist())])
    keep = order[perm] <= bounds[plan.index_of(sorted_cls)]
    assert keep.sum() < keep.size  # the bounds cut something
    prefix = S.assign_copies(plan, sorted_cls[keep], np.zeros(plan.class_ids.size, bool))
    assert not prefix.short.any()
    assert prefix.copies.tolist() == full.copies[keep].tolist() and full.copies[~keep].sum() == 0
