"""spark_jobs.resample: exact small cases, agreement with the numpy oracle,
statistics, schemes, determinism (partitioning, files, retries) and errors."""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import WEIGHTS_SCHEMA, SchemaError, read_metadata, with_metadata
from schemas import io as sio
from spark_jobs import label_sets as LS
from spark_jobs import resample as R
from spark_jobs import sampling as S
from tests.sampling_reference import sample_in_memory
from tests.helpers import reference_weights, run_module, write_weights

LABELS = pa.list_(pa.int32())


def selection_of(output: str) -> dict[str, int]:
    t = sio.read_parquet(os.path.join(output, "selection"))
    keys = t.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key appears in two selection rows"
    return dict(zip(keys, t.column("copies").to_pylist()))


def per_record(weighted_sets, lsid, column):
    """A label-set table's column looked up for each record's label set."""
    by = dict(zip(weighted_sets.column("lsid").to_pylist(), weighted_sets.column(column).to_pylist()))
    return np.array([by[i] for i in lsid.tolist()])


# Spark's xxhash64, written out in plain Python for the oracle: the job ranks a record
# in its class by xxhash64(key, seed) and groups records by xxhash64(labels) (seed 42,
# each value hashed with the running hash as the seed; a string as its UTF-8 bytes,
# a long as 8 and an int as 4 little-endian bytes, each by standard XXH64).
_P1, _P2, _P3, _P4, _P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                           9650029242287828579, 2870177450012600261)
_M64 = (1 << 64) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & _M64


def _xxh_round(acc, lane):
    return _rotl((acc + lane * _P2) & _M64, 31) * _P1 & _M64


def xxh64(data: bytes, seed: int) -> int:
    """Standard XXH64 of ``data`` (unsigned 64-bit seed and result)."""
    n, i, seed = len(data), 0, seed & _M64
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M64, (seed + _P2) & _M64, seed, (seed - _P1) & _M64]
        while i + 32 <= n:
            v = [_xxh_round(a, int.from_bytes(data[i + 8 * j:i + 8 * j + 8], "little")) for j, a in enumerate(v)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M64
        for a in v:
            h = ((h ^ _xxh_round(0, a)) * _P1 + _P4) & _M64
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while i + 8 <= n:
        h = (_rotl(h ^ _xxh_round(0, int.from_bytes(data[i:i + 8], "little")), 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[i:i + 4], "little") * _P1 & _M64), 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h = _rotl(h ^ (data[i] * _P5 & _M64), 11) * _P1 & _M64
        i += 1
    h = (h ^ (h >> 33)) * _P2 & _M64
    h = (h ^ (h >> 29)) * _P3 & _M64
    return h ^ (h >> 32)


def _signed(h: int) -> int:
    return h - (1 << 64) if h >> 63 else h


def spark_order_hash(key: str, seed: int) -> int:
    """Spark's ``xxhash64(key, CAST(seed AS BIGINT))``."""
    return _signed(xxh64(struct.pack("<q", seed), xxh64(key.encode("utf-8"), 42)))


def spark_labels_hash(labels) -> int:
    """Spark's ``xxhash64(labels)`` of an ``array<int>``."""
    h = 42
    for label in labels:
        h = xxh64(struct.pack("<i", label), h)
    return _signed(h)


def write_index(path, keys, labels, nfiles=1):
    os.makedirs(path, exist_ok=True)
    t = pa.table({"key": pa.array(keys, pa.string()), "labels": pa.array(labels, LABELS),
                  "image": pa.array([b"\xff\xd8" + k.encode() for k in keys], pa.binary())})
    bounds = np.linspace(0, t.num_rows, nfiles + 1).astype(int)
    for f in range(nfiles):
        pq.write_table(t.slice(bounds[f], bounds[f + 1] - bounds[f]), os.path.join(path, f"part-{f}.parquet"))
    return path


def write_table_weights(path, ids, weights, counts=None):
    n = len(ids)
    counts = counts if counts is not None else [1] * n
    t = pa.table({"label_id": pa.array(ids, pa.int32()), "count": pa.array(counts, pa.int64()),
                  "p_source": [0.1] * n, "p_target": [0.1] * n,
                  "weight": pa.array(weights, pa.float64())}, schema=WEIGHTS_SCHEMA)
    pq.write_table(t, path)
    return path


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory, source_data):
    """The generated multi-label source plus reference adaptive weights."""
    root = tmp_path_factory.mktemp("resample")
    weights = write_weights(str(root / "weights.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=1))
    return source_data, weights, root


# -- exact small cases -----------------------------------------------------------------

def test_systematic_exact_by_hand(spark, tmp_path):
    # Labels 0 and 1 with weights 1 and 3; 4 examples each. N = 16:
    # e = 16 * w / 16 -> label-0 examples get exactly 1 copy, label-1 exactly 3.
    keys = [f"a/{i}.JPEG" for i in range(4)] + [f"b/{i}.JPEG" for i in range(4)]
    index = write_index(str(tmp_path / "idx"), keys, [[0]] * 4 + [[1]] * 4)
    weights = write_table_weights(str(tmp_path / "w.parquet"), [0, 1], [1.0, 3.0])
    job = R.ResampleJob(index=index, weights=weights, size=16, draw="systematic",
                        output=str(tmp_path / "out"))
    stats = R.run(spark, job)
    sel = selection_of(job.output)
    assert sel == {**{k: 1 for k in keys[:4]}, **{k: 3 for k in keys[4:]}}
    assert stats["total_copies"] == 16 and stats["unique_examples"] == 8
    assert stats["copies_histogram"] == {"1": 4, "3": 4}
    assert stats["total_variation"] == pytest.approx(0.0, abs=1e-12)


def test_elastic_exact_by_hand(spark, tmp_path):
    # Classes with weights 4, 2, 1 and 10 examples each; N = 25 takes both
    # upper classes whole and 5 of the lowest (see test_sampling).
    keys = [f"c{c}/{i}" for c in range(3) for i in range(10)]
    index = write_index(str(tmp_path / "idx"), keys, [[c] for c in range(3) for _ in range(10)])
    weights = write_table_weights(str(tmp_path / "w.parquet"), [0, 1, 2], [4.0, 2.0, 1.0])
    job = R.ResampleJob(index=index, weights=weights, size=25, matcher="elastic",
                        output=str(tmp_path / "out"))
    stats = R.run(spark, job)
    sel = selection_of(job.output)
    assert all(v == 1 for v in sel.values()) and len(sel) == 25
    assert sum(k.startswith("c0/") for k in sel) == 10 and sum(k.startswith("c1/") for k in sel) == 10
    assert stats["elastic"]["saturated_examples"] == 20
    assert stats["elastic"]["saturated_labels"] == 2
    assert stats["elastic"]["c"] == pytest.approx(0.5)
    assert stats["elastic"]["threshold_weight"] == pytest.approx(2.0)


# -- the Spark job equals the numpy oracle --------------------------------------------

@pytest.mark.parametrize("matcher,draw,size", [("same", "multinomial", 3000), ("same", "systematic", 3000),
                                               ("elastic", "systematic", 900)])
def test_spark_equals_numpy_oracle(spark, multi_label, tmp_path, matcher, draw, size):
    source, weights, _ = multi_label
    job = R.ResampleJob(index=source.index_path, weights=weights, size=size, matcher=matcher,
                        draw=draw, seed=3, output=str(tmp_path / "out"), rows_per_partition=300)
    stats = R.run(spark, job)
    assert stats["job"]["partitions"] > 1
    got = selection_of(job.output)
    # The oracle's inputs, computed here from the files without spark_jobs: each record's
    # integer weight (the largest label weight is 2**52, rounded half to even; an example's is
    # the mean of its labels', rounded half up), its class (its label list's hash) and its
    # rank key (its key's hash with the seed).
    index = pq.read_table(source.index_path, columns=["key", "labels"])
    keys = index.column("key").to_pylist()
    labels = index.column("labels").to_pylist()
    table = pq.read_table(weights)
    weight_of = dict(zip(table.column("label_id").to_pylist(), table.column("weight").to_pylist()))
    scale = 2.0 ** 52 / max(weight_of.values())
    q_of = {label: round(w * scale) for label, w in weight_of.items()}
    q = [(sum(q_of[label] for label in ls) + len(ls) // 2) // len(ls) for ls in labels]
    lsid = np.array([spark_labels_hash(ls) for ls in labels], np.int64)
    order = np.array([spark_order_hash(k, 3) for k in keys], np.int64)
    # The single-process sampler on those inputs draws exactly what the job drew.
    copies, _ = sample_in_memory(keys, lsid, order, np.array(q, np.int64), size, matcher, draw, seed=3)
    expected = {k: int(c) for k, c in zip(keys, copies) if c > 0}
    assert got == expected
    assert sum(got.values()) == size
    # docs/design.md, "Sampling", from the weights alone, with no sampler: copies only where q > 0;
    # systematic: e(x) = N*q(x)/sum(q) rounded down or up; elastic: pi(x) = min(1, c*q(x)) with
    # sum(pi) = N, each example at most once, each label set's count rounded down or up.
    assert all(q[i] > 0 for i, k in enumerate(keys) if k in got)
    if matcher == "same" and draw == "systematic":
        total = sum(q)
        for k, qx in zip(keys, q):
            e = Fraction(size * qx, total)
            assert math.floor(e) <= got.get(k, 0) <= math.ceil(e), (k, e, got.get(k, 0))
    if matcher == "elastic":
        assert set(got.values()) == {1}
        records_of_q = Counter(q)
        left, mass = size, sum(q)
        for v in sorted(records_of_q, reverse=True):  # water-filling: saturate from the top
            if v == 0 or Fraction(left, mass) * v < 1:
                break
            left, mass = left - records_of_q[v], mass - v * records_of_q[v]
        c = Fraction(left, mass)
        members: dict[tuple, list] = {}
        for k, ls, qx in zip(keys, labels, q):
            members.setdefault(tuple(ls), []).append((k, qx))
        for group in members.values():
            taken, qx = sum(k in got for k, _ in group), group[0][1]
            if c * qx >= 1:
                assert taken == len(group)
            else:
                share = c * qx * len(group)
                assert math.floor(share) <= taken <= math.ceil(share), (group, share, taken)


@pytest.mark.parametrize("matcher,draw", [("same", "multinomial"), ("elastic", "systematic")])
def test_short_candidate_bounds_are_redrawn_to_the_same_result(spark, multi_label, tmp_path, matcher, draw):
    """Bounds set too low (negative margin) make classes fall short; they are
    redrawn from all their records and the selection is unchanged."""
    source, weights, _ = multi_label
    results = []
    for sigmas in (S.CANDIDATE_SIGMAS, -2.0):
        job = R.ResampleJob(index=source.index_path, weights=weights, size=800, matcher=matcher,
                            draw=draw, seed=2, output=str(tmp_path / f"out{sigmas}"), candidate_sigmas=sigmas)
        stats = R.run(spark, job)
        results.append((stats, selection_of(job.output)))
    (fine, fine_sel), (short, short_sel) = results
    assert fine["job"]["redrawn_label_sets"] == 0 and short["job"]["redrawn_label_sets"] > 0
    assert fine["job"]["expected_candidates"] < fine["source_examples"]
    assert short_sel == fine_sel and sum(short_sel.values()) == 800


# -- statistics on a generated multi-label index ----------------------------------------

def test_same_multinomial_label_distribution_chi_square(spark, multi_label, tmp_path):
    source, weights, _ = multi_label
    size = 20000
    job = R.ResampleJob(index=source.index_path, weights=weights, size=size, seed=5,
                        output=str(tmp_path / "out"))
    R.run(spark, job)
    sel = selection_of(job.output)
    index = sio.read_parquet(source.index_path, columns=["key", "labels"])
    table = pq.read_table(weights)
    lw = S.quantize_label_weights(table.column("label_id").to_numpy(), table.column("weight").to_numpy())
    labels = index.column("labels").to_pylist()
    w = np.array([np.mean([lw.weight[l] for l in ls]) for ls in labels])
    copies = np.array([sel.get(k, 0) for k in index.column("key").to_pylist()])
    # Pool examples by their leaf label; compare realised with expected counts.
    leaf = np.array([ls[0] for ls in labels])
    expected = np.bincount(leaf, weights=size * w / w.sum())
    realised = np.bincount(leaf, weights=copies)
    keep = expected >= 5
    chi2 = float(((realised[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty 0.999 quantile of chi-square with `dof` degrees of freedom.
    quantile = dof * (1 - 2 / (9 * dof) + 3.09 * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < quantile, (chi2, quantile)


def test_systematic_floor_ceil_and_fewer_duplicates(spark, multi_label, tmp_path):
    source, weights, _ = multi_label
    size = 5000
    out = {}
    for draw in ("systematic", "multinomial"):
        job = R.ResampleJob(index=source.index_path, weights=weights, size=size, draw=draw, seed=2,
                            output=str(tmp_path / draw))
        out[draw] = R.run(spark, job)
    sel = selection_of(str(tmp_path / "systematic"))
    index = sio.read_parquet(source.index_path, columns=["key", "labels"])
    table = pq.read_table(weights)
    lw = S.quantize_label_weights(table.column("label_id").to_numpy(), table.column("weight").to_numpy())
    offsets = index.column("labels").combine_chunks().offsets.to_numpy()
    values = index.column("labels").combine_chunks().values.to_numpy()
    _, q, _ = S.example_weights(offsets, values, lw)
    e = size * q.astype(float) / float(q.astype(object).sum())
    copies = np.array([sel.get(k, 0) for k in index.column("key").to_pylist()])
    assert ((copies == np.floor(e)) | (copies == np.ceil(e))).all()
    assert out["systematic"]["unique_examples"] >= out["multinomial"]["unique_examples"]
    assert out["systematic"]["total_variation"] < out["multinomial"]["total_variation"]


def test_elastic_sizes_and_saturation(spark, multi_label, tmp_path):
    source, weights, _ = multi_label
    uniques = []
    for size in (200, 1000, 1900):
        job = R.ResampleJob(index=source.index_path, weights=weights, size=size, matcher="elastic",
                            output=str(tmp_path / f"e{size}"))
        stats = R.run(spark, job)
        assert stats["unique_examples"] == stats["total_copies"] == size
        assert stats["max_copies"] == 1
        uniques.append(stats["elastic"]["saturated_examples"])
    assert uniques == sorted(uniques) and uniques[-1] > 0  # more size, more saturation
    with pytest.raises(ValueError, match="size 2001 is larger than the 2000 examples with non-zero weight"):
        R.run(spark, R.ResampleJob(index=source.index_path, weights=weights, size=2001, matcher="elastic",
                                   output=str(tmp_path / "too_big")))


# -- schemes and exclusions ------------------------------------------------------------

def test_entire_scheme_is_uniform(spark, multi_label, tmp_path):
    source, _, _ = multi_label
    job = R.ResampleJob(index=source.index_path, scheme="entire", size=4000, draw="systematic",
                        output=str(tmp_path / "out"))
    R.run(spark, job)
    sel = selection_of(job.output)
    assert len(sel) == 2000 and set(sel.values()) == {2}


def test_subset_scheme_takes_only_descendants(spark, multi_label, tmp_path):
    source, _, _ = multi_label
    job = R.ResampleJob(index=source.index_path, scheme="subset", labels=source.labels_path,
                        subset_labels=("bird", "dessert"), size=200, matcher="elastic",
                        output=str(tmp_path / "out"))
    R.run(spark, job)
    vocab = pq.read_table(source.labels_path)
    name = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
    index = sio.read_parquet(source.index_path, columns=["key", "labels"])
    labels = dict(zip(index.column("key").to_pylist(), index.column("labels").to_pylist()))
    from schemas import Hierarchy
    allowed = set(Hierarchy(vocab).descendants_of_names(["bird", "dessert"]).tolist())
    sel = selection_of(job.output)
    assert len(sel) == 200
    assert all(set(labels[k]) & allowed for k in sel)
    assert {name[labels[k][0]] for k in sel} <= {"sparrow", "eagle", "owl", "parrot",
                                                  "cake", "ice_cream", "donut", "pie"}


def test_unknown_subset_label(spark, multi_label, tmp_path):
    source, _, _ = multi_label
    job = R.ResampleJob(index=source.index_path, scheme="subset", labels=source.labels_path,
                        subset_labels=("birds",), size=10, output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="label name 'birds' is not in the vocabulary; did you mean 'bird'"):
        R.run(spark, job)


@pytest.mark.parametrize("scheme", ["topk-uniform", "reversed"])
def test_topk_schemes_use_only_top_labels(spark, multi_label, tmp_path, scheme):
    source, weights, _ = multi_label
    table = pq.read_table(weights)
    w = table.column("weight").to_numpy()
    ids = table.column("label_id").to_numpy()
    top = set(ids[np.lexsort((ids, -w))][:5].tolist())
    job = R.ResampleJob(index=source.index_path, weights=weights, scheme=scheme, top_k=5, size=500,
                        output=str(tmp_path / "out"))
    R.run(spark, job)
    index = sio.read_parquet(source.index_path, columns=["key", "labels"])
    labels = dict(zip(index.column("key").to_pylist(), index.column("labels").to_pylist()))
    sel = selection_of(job.output)
    assert sum(sel.values()) == 500
    assert all(set(labels[k]) & top for k in sel)


def test_balanced_scheme_flattens_the_label_distribution(spark, multi_label, tmp_path):
    """The class-balanced control: leaf labels drawn about equally often, unlike the entire source."""
    source, weights, _ = multi_label
    sizes = np.array(list(source.class_sizes.values()))
    job = R.ResampleJob(index=source.index_path, weights=weights, scheme="balanced", size=4000,
                        output=str(tmp_path / "out"))
    R.run(spark, job)
    index = sio.read_parquet(source.index_path, columns=["key", "labels"])
    leaf_of = {k: v[0] for k, v in zip(index.column("key").to_pylist(), index.column("labels").to_pylist())}
    drawn = {}
    for key, copies in selection_of(job.output).items():
        drawn[leaf_of[key]] = drawn.get(leaf_of[key], 0) + copies
    share = np.array([drawn.get(leaf, 0) for leaf in source.class_sizes]) / 4000
    assert sizes.max() / sizes.min() > 10  # the source is far from balanced
    assert share.max() / share.min() < 2.5, share


def test_exclude_keys_are_never_selected(spark, multi_label, tmp_path):
    source, weights, _ = multi_label
    index = sio.read_parquet(source.index_path, columns=["key"])
    excluded = index.column("key").to_pylist()[::3]
    pq.write_table(pa.table({"key": excluded}), tmp_path / "exclude.parquet")
    job = R.ResampleJob(index=source.index_path, weights=weights, size=1300, matcher="elastic",
                        exclude=str(tmp_path / "exclude.parquet"), output=str(tmp_path / "out"))
    stats = R.run(spark, job)
    assert not set(selection_of(job.output)) & set(excluded)
    assert stats["source_examples"] == 2000 - len(excluded)


# -- outputs, reruns and atomicity ------------------------------------------------------

def test_outputs_and_rerun(spark, multi_label, tmp_path):
    source, weights, _ = multi_label
    out = str(tmp_path / "out")
    job = R.ResampleJob(index=source.index_path, weights=weights, size=800, labels=source.labels_path,
                        matcher="elastic", output=out)
    first = R.run(spark, job)
    assert sorted(os.listdir(out)) == ["_STAGE", "_SUCCESS", "label_stats.parquet", "label_stats.png", "selection",
                                       "stats.json"]
    assert "reused" not in first
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp")]
    stats = json.loads(open(os.path.join(out, "stats.json")).read())
    assert stats["config"]["size"] == 800 and stats["config"]["target"] == "test"
    assert set(stats["inputs"]) == {"index", "weights", "labels"}
    ls = pq.read_table(os.path.join(out, "label_stats.parquet"))
    assert ls.schema.names == ["label_id", "desired", "realised"]
    assert ls.column("desired").to_numpy().sum() == pytest.approx(1.0)
    assert open(os.path.join(out, "label_stats.png"), "rb").read(4) == b"\x89PNG"
    again = R.run(spark, job)  # complete: nothing to do, and the job says so
    assert again.pop("reused") is True and again == stats
    # An incomplete output (no _SUCCESS) is redone from scratch.
    os.remove(os.path.join(out, "_SUCCESS"))
    open(os.path.join(out, "selection", "part-stale.parquet"), "wb").write(b"junk")
    R.run(spark, job)
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not os.path.exists(os.path.join(out, "selection", "part-stale.parquet"))


def test_index_in_one_file_or_many_gives_same_selection(spark, multi_label, tmp_path):
    source, weights, _ = multi_label
    table = sio.read_parquet(source.index_path)
    one = tmp_path / "one"
    one.mkdir()
    pq.write_table(table, one / "all.parquet")
    many = tmp_path / "many"
    many.mkdir()
    perm = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(pa.array(perm))
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), 7)):
        pq.write_table(shuffled.slice(int(chunk[0]), len(chunk)), many / f"p{i}.parquet")
    results = []
    for path in (str(one), str(many), source.index_path):
        for matcher in ("same", "elastic"):
            job = R.ResampleJob(index=path, weights=weights, size=700, matcher=matcher, seed=9,
                                output=str(tmp_path / f"out-{os.path.basename(path)}-{matcher}"))
            R.run(spark, job)
            results.append((matcher, selection_of(job.output)))
    same = [r for m, r in results if m == "same"]
    elastic = [r for m, r in results if m == "elastic"]
    assert same[0] == same[1] == same[2] and elastic[0] == elastic[1] == elastic[2]


@pytest.mark.slow
def test_partitioning_and_task_retries_do_not_change_the_result(multi_label, tmp_path):
    """local[1], local[4] and local[2,4] with every first task attempt failing."""
    source, weights, _ = multi_label
    outputs = {}
    runs = [("local[1]", {}), ("local[4]", {}),
            ("local[2,4]", {"ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT": "all"})]
    for master, env in runs:
        out = str(tmp_path / master.replace("[", "_").replace("]", "").replace(",", "_"))
        proc = run_module("spark_jobs.resample", "--index", source.index_path, "--weights", weights,
                          "--size", "1500", "--matcher", "same", "--seed", "4", "--output", out,
                          "--master", master, "--driver-memory", "1g", "--rows-per-partition", "400",
                          "--label-sets", str(tmp_path / "label-sets.parquet"), env=env)
        assert "resample: 1500 samples" in proc.stdout
        if env:  # the retries really happened
            assert "injected failure" in proc.stderr
        outputs[master] = selection_of(out)
        # The first run counts the label sets; the others read them (and still agree).
        stats = json.loads(open(os.path.join(out, "stats.json")).read())
        assert stats["job"]["label_sets_counted"] == (master == "local[1]")
        # One file per drawing task that selected anything; failed attempts' files are gone.
        names = os.listdir(os.path.join(out, "selection"))
        assert names and all(n.startswith("part-draw-") and n.endswith(".parquet") for n in names), names
    first = outputs["local[1]"]
    assert outputs["local[4]"] == first and outputs["local[2,4]"] == first



# -- the label-set table kept between runs (--label-sets) ----------------------------------

def _copy_index(source_path, dest):
    os.makedirs(dest)
    for i, f in enumerate(sio.expand_paths(source_path)):
        pq.write_table(pq.read_table(f), os.path.join(dest, f"part-{i}.parquet"))
    return str(dest)


def test_label_set_table_is_counted_once_then_reused(spark, multi_label, tmp_path):
    source, weights, _ = multi_label
    table = str(tmp_path / "sets.parquet")
    runs = {}
    for name, matcher, sets in [("plain", "same", None), ("first", "same", table), ("again", "same", table),
                                ("plain-elastic", "elastic", None), ("elastic", "elastic", table)]:
        job = R.ResampleJob(index=source.index_path, weights=weights, size=900, seed=3, matcher=matcher,
                            output=str(tmp_path / name), label_sets=sets)
        runs[name] = (R.run(spark, job)["job"]["label_sets_counted"], selection_of(job.output))
    assert [runs[n][0] for n in ("plain", "first", "again", "elastic")] == [True, True, False, False]
    assert runs["first"][1] == runs["plain"][1] == runs["again"][1]
    assert runs["elastic"][1] == runs["plain-elastic"][1]
    stored = pq.read_table(table)
    assert stored.schema.names == ["lsid", "labels", "n"]
    records = sio.read_parquet(source.index_path).num_rows
    assert read_metadata(stored.schema)["records"] == sum(stored.column("n").to_pylist()) == records


def test_label_set_table_of_other_inputs_is_counted_again(spark, multi_label, tmp_path, capsys):
    source, weights, _ = multi_label
    index = _copy_index(source.index_path, tmp_path / "index")
    table = str(tmp_path / "sets.parquet")

    def run(name, **kw):
        job = R.ResampleJob(index=index, weights=weights, size=700, seed=5, output=str(tmp_path / name), **kw)
        return R.run(spark, job)["job"]["label_sets_counted"], selection_of(job.output)

    assert run("a", label_sets=table)[0]
    # The index gains a file: the stored table is for other inputs.
    extra = pq.read_table(sio.expand_paths(index)[0]).slice(0, 50)
    pq.write_table(extra.set_column(0, "key", pa.array([f"extra/{i}" for i in range(50)])),
                   os.path.join(index, "part-extra.parquet"))
    counted, with_table = run("b", label_sets=table)
    assert counted and with_table == run("b-plain")[1]
    assert "counted over other inputs" in capsys.readouterr().err
    assert read_metadata(pq.read_table(table).schema)["records"] == sio.read_parquet(index).num_rows
    # --exclude is part of the inputs too.
    pq.write_table(pa.table({"key": ["extra/1"]}), str(tmp_path / "exclude.parquet"))
    counted, excluded = run("c", label_sets=table, exclude=str(tmp_path / "exclude.parquet"))
    assert counted and "extra/1" not in excluded
    # A file that is not a table this project wrote is refused and left alone.
    open(table, "wb").write(b"not parquet")
    with pytest.raises(ValueError, match="exists and is not a readable label-set table"):
        run("d", label_sets=table)
    assert open(table, "rb").read() == b"not parquet" and not os.path.exists(tmp_path / "d")
    os.remove(table)
    assert run("d", label_sets=table)[0] and not run("e", label_sets=table)[0]


def test_label_set_table_that_disagrees_with_the_records_is_counted_again(spark, multi_label, tmp_path, capsys):
    """Same listing, wrong counts (as if a file were rewritten in place with
    the same size and time): the drawing tasks see classes with more records
    than the table says, and the job counts and draws again."""
    source, weights, _ = multi_label
    index = _copy_index(source.index_path, tmp_path / "index")
    table = str(tmp_path / "sets.parquet")
    job = R.ResampleJob(index=index, weights=weights, size=800, seed=6, output=str(tmp_path / "plain"))
    R.run(spark, job)
    expected = selection_of(job.output)
    true_sets = LS.distinct_label_sets(spark.read.parquet(index))
    halved = true_sets.set_column(2, "n", pa.array((true_sets.column("n").to_numpy() + 1) // 2, pa.int64()))
    LS.write_label_sets(halved, table, {"index": sio.listing_fingerprint(index, versions=True), "exclude": None})
    job = R.ResampleJob(index=index, weights=weights, size=800, seed=6, output=str(tmp_path / "hinted"),
                        label_sets=table)
    stats = R.run(spark, job)
    assert "does not match the records" in capsys.readouterr().err
    assert stats["job"]["label_sets_counted"] and selection_of(job.output) == expected
    assert pq.read_table(table).column("n").to_pylist() == true_sets.column("n").to_pylist()
    # A label list that no record carries (and one real list missing).
    ghost = pa.table({"lsid": [12345], "labels": pa.array([[0, 1, 2]], LABELS),
                      "n": [true_sets.column("n")[0].as_py()]}, schema=true_sets.schema)
    LS.write_label_sets(pa.concat_tables([true_sets.slice(1), ghost]).sort_by("lsid"), table,
                        {"index": sio.listing_fingerprint(index, versions=True), "exclude": None})
    job = R.ResampleJob(index=index, weights=weights, size=800, seed=6, output=str(tmp_path / "ghost"),
                        label_sets=table)
    stats = R.run(spark, job)
    assert "does not match the records" in capsys.readouterr().err
    assert stats["job"]["label_sets_counted"] and selection_of(job.output) == expected


def test_listing_fingerprint_with_versions_sees_a_same_size_rewrite(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    f = d / "part-0.parquet"
    f.write_bytes(b"a" * 100)
    plain, versioned = sio.listing_fingerprint(str(d)), sio.listing_fingerprint(str(d), versions=True)
    f.write_bytes(b"b" * 100)
    os.utime(f, (1_000_000_000, 1_000_000_000))
    assert sio.listing_fingerprint(str(d)) == plain
    assert sio.listing_fingerprint(str(d), versions=True) != versioned


def test_output_and_label_set_table_on_object_storage(spark, multi_label, tmp_path, s3_server):
    """Selection files go from the drawing tasks to the object store through
    fsspec (Spark's own writers are not involved), are committed by the
    driver, and the result equals a local run's."""
    source, weights, _ = multi_label
    local = R.ResampleJob(index=source.index_path, weights=weights, size=600, seed=8, output=str(tmp_path / "local"))
    R.run(spark, local)
    out = "s3://bucket/resample/run1"
    for sets_counted in (True, False):
        job = R.ResampleJob(index=source.index_path, weights=weights, size=600, seed=8, output=out,
                            overwrite=True, label_sets="s3://bucket/label-sets/index.parquet")
        assert R.run(spark, job)["job"]["label_sets_counted"] is sets_counted
    fs = s3_server
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("bucket/resample/run1"))
    assert names == ["_STAGE", "_SUCCESS", "label_stats.parquet", "label_stats.png", "selection", "stats.json"]
    parts = [p.rsplit("/", 1)[-1] for p in fs.ls("bucket/resample/run1/selection")]
    assert parts and all(p.startswith("part-draw-") for p in parts), parts
    remote = sio.read_parquet(out + "/selection")
    assert dict(zip(remote.column("key").to_pylist(), remote.column("copies").to_pylist())) == \
        selection_of(local.output)

# -- bad inputs ---------------------------------------------------------------------------

def test_label_outside_weights_table(spark, tmp_path):
    index = write_index(str(tmp_path / "idx"), ["a/1", "a/2", "b/1"], [[0], [0, 5], [1]], nfiles=1)
    weights = write_table_weights(str(tmp_path / "w.parquet"), [0, 1], [1.0, 2.0])
    job = R.ResampleJob(index=index, weights=weights, size=2, output=str(tmp_path / "out"))
    with pytest.raises(SchemaError) as err:
        R.run(spark, job)
    message = str(err.value)
    assert "part-0.parquet" in message and "key 'a/2'" in message
    assert "labels [0, 5] include a label that is not in" in message and "w.parquet" in message


def test_nan_weights(spark, tmp_path):
    index = write_index(str(tmp_path / "idx"), ["a/1"], [[0]])
    weights = write_table_weights(str(tmp_path / "w.parquet"), [0, 1], [1.0, float("nan")])
    job = R.ResampleJob(index=index, weights=weights, size=1, output=str(tmp_path / "out"))
    with pytest.raises(SchemaError, match=r"w.parquet, row 1: weight of label 1 is NaN \(nan\)"):
        R.run(spark, job)


def test_empty_index(spark, tmp_path):
    index = write_index(str(tmp_path / "idx"), [], [])
    weights = write_table_weights(str(tmp_path / "w.parquet"), [0], [1.0])
    with pytest.raises(SchemaError, match="source index has no examples"):
        R.run(spark, R.ResampleJob(index=index, weights=weights, size=1, output=str(tmp_path / "out")))


def test_duplicate_keys_in_index(spark, tmp_path):
    index = write_index(str(tmp_path / "idx"), ["a/1", "a/2", "a/1"], [[0], [0], [0]])
    weights = write_table_weights(str(tmp_path / "w.parquet"), [0], [1.0])
    with pytest.raises(SchemaError, match=r"key 'a/1': key is not unique: 2 records of the source index have it: "
                                          r".*part-0.parquet \(labels \[0\]\); .*part-0.parquet \(labels \[0\]\)"):
        R.run(spark, R.ResampleJob(index=index, weights=weights, size=2, output=str(tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out")


def _index_with_a_key_twice(root, second_labels):
    """part-0 holds dup/7 with labels [0], part-1 holds it again with ``second_labels``."""
    index = root / "index"
    index.mkdir()
    pq.write_table(pa.table({"key": ["a/1", "a/2", "dup/7"], "labels": pa.array([[0], [1], [0]], LABELS),
                             "image": [b"\xff\xd8a", b"\xff\xd8b", b"\xff\xd8c"]}), str(index / "part-0.parquet"))
    pq.write_table(pa.table({"key": ["b/1", "dup/7"], "labels": pa.array([[1], second_labels], LABELS),
                             "image": [b"\xff\xd8d", b"\xff\xd8e"]}), str(index / "part-1.parquet"))
    return str(index)


def test_a_key_held_twice_with_different_labels_not_both_selected_is_refused(spark, tmp_path, capsys):
    """Issue 25: dup/7 with labels [1] weighs 0, so only its [0] record can be
    selected (the selection alone has it once); the label-set count, the one
    full scan of the index, finds it and names the key and both files."""
    index = _index_with_a_key_twice(tmp_path, [1])
    weights = write_table_weights(str(tmp_path / "w.parquet"), [0, 1], [1.0, 0.0])
    sets = str(tmp_path / "label-sets.parquet")
    for extra in ([], ["--label-sets", sets]):
        out = str(tmp_path / f"out{len(extra)}")
        rc = R.main(["--index", index, "--weights", weights, "--size", "2", "--draw", "systematic",
                     "--output", out, *extra])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert "key 'dup/7'" in err and "key is not unique: 2 records of the source index have it" in err
        assert "part-0.parquet (labels [0])" in err and "part-1.parquet (labels [1])" in err
        assert not os.path.exists(out) and not os.path.exists(sets)  # no table stored for such an index


def test_a_key_a_drawing_task_finds_twice_is_refused_naming_it(spark, tmp_path):
    """With a stored label-set table the count (and its key check) is skipped;
    a drawing task that meets a key twice in one class reports it (a tally
    row, not an exception) and the driver refuses it naming the key and files."""
    index = _index_with_a_key_twice(tmp_path, [0])
    sets = str(tmp_path / "label-sets.parquet")
    LS.write_label_sets(LS.distinct_label_sets(spark.read.parquet(index)), sets,
                        {"index": sio.listing_fingerprint(index, versions=True), "exclude": None})
    stored = open(sets, "rb").read()
    job = R.ResampleJob(index=index, scheme="entire", draw="systematic", size=5, label_sets=sets,
                        output=str(tmp_path / "out"))
    with pytest.raises(SchemaError, match=r"key 'dup/7': key is not unique: 2 records of the source index have "
                                          r"it: .*part-0.parquet \(labels \[0\]\); .*part-1.parquet \(labels \[0\]\)"):
        R.run(spark, job)
    assert not os.path.exists(tmp_path / "out") and open(sets, "rb").read() == stored


def test_a_label_set_table_counted_without_the_key_check_is_counted_again(spark, multi_label, tmp_path, capsys):
    source, weights, _ = multi_label
    sets = str(tmp_path / "label-sets.parquet")
    job = R.ResampleJob(index=source.index_path, weights=weights, size=500, seed=4, label_sets=sets,
                        output=str(tmp_path / "first"))
    assert R.run(spark, job)["job"]["label_sets_counted"]
    stored = pq.read_table(sets)
    meta = read_metadata(stored.schema)
    assert meta[LS.KEYS_CHECKED] is True
    del meta[LS.KEYS_CHECKED]  # as an earlier version wrote it
    pq.write_table(with_metadata(stored, meta), sets)
    again = R.ResampleJob(index=source.index_path, weights=weights, size=500, seed=4, label_sets=sets,
                          output=str(tmp_path / "again"))
    assert R.run(spark, again)["job"]["label_sets_counted"]
    assert "counted without checking the index's keys; counting again" in capsys.readouterr().err
    assert read_metadata(pq.read_table(sets).schema)[LS.KEYS_CHECKED] is True
    assert selection_of(again.output) == selection_of(job.output)


@pytest.mark.parametrize("size,message", [("0", "size must be positive"),
                                          ("eighty", "cannot parse size 'eighty'")])
def test_bad_size_on_the_command_line(size, message, tmp_path):
    proc = run_module("spark_jobs.resample", "--index", str(tmp_path), "--weights", "w.parquet",
                      "--size", size, "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize("aggregate", ["mean", "max", "sum"])
def test_per_example_weights_equal_numpy_example_weights(spark, aggregate):
    """Weights computed once per label set and joined back equal
    sampling.example_weights applied to every example."""
    rng = np.random.default_rng(1)
    lw = S.quantize_label_weights(np.array([0, 1, 2, 4, 7]), rng.random(5) * 100)
    rows = [[int(v) for v in rng.choice([0, 1, 2, 4, 7], rng.integers(1, 4))] for _ in range(300)]
    rows += [[], [3], [0, 9], [-1], None, [1, 1, 1]]
    keys = [f"k{i}" for i in range(len(rows))]
    df = spark.createDataFrame(list(zip(keys, rows)), "key string, labels array<int>")
    keyed = R.keyed(df, 0)
    weighted_sets = R.weigh_label_sets(R.distinct_label_sets(keyed), lw, aggregate)
    got = keyed.orderBy("key").toArrow()
    assert got.num_rows == len(rows)
    by_key = dict(zip(keys, rows))
    ordered = [by_key[k] for k in got.column("key").to_pylist()]
    offsets = np.cumsum([0] + [len(r or []) for r in ordered])
    values = np.array([v for r in ordered for v in (r or [])], np.int64)
    w, q, bad = S.example_weights(offsets, values, lw, aggregate)
    lsid = got.column("lsid").to_numpy()
    assert per_record(weighted_sets, lsid, "q").tolist() == q.tolist()
    np.testing.assert_allclose(per_record(weighted_sets, lsid, "w"), w, rtol=1e-15)
    assert sum(bad) == 5
    bad_sets = weighted_sets.filter(weighted_sets.column("bad"))
    assert int(pa.compute.sum(bad_sets.column("n")).as_py()) == 5


def test_local_cores_from_the_master():
    from spark_jobs.session import local_cores

    assert [local_cores(m) for m in ("local", "local[3]", "local[2,4]", "yarn", "spark://h:7077")] == [
        1, 3, 2, None, None]
    assert local_cores("local[*]") == (os.cpu_count() or 1)


def test_read_parquet_columns_types_from_the_footer(spark, tmp_path):
    """No schema-inference job: the narrowed columns keep the files' types,
    missing ones are left out, and a path with no file gets Spark's own error."""
    from spark_jobs.session import read_parquet_columns

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"key": [f"k{i}"], "labels": pa.array([[i, 7]], pa.list_(pa.int32())),
                                 "n": pa.array([i], pa.int64()), "extra": [b"x"]}), data / f"part-{i}.parquet")
    df = read_parquet_columns(spark, str(data), ["key", "labels", "n", "uri"])
    assert df.columns == ["key", "labels", "n"]
    assert [f.dataType.simpleString() for f in df.schema.fields] == ["string", "array<int>", "bigint"]
    assert sorted((r["key"], list(r["labels"]), r["n"]) for r in df.collect()) == [("k0", [0, 7], 0),
                                                                                  ("k1", [1, 7], 1)]
    from pyspark.errors import AnalysisException

    with pytest.raises(AnalysisException, match="PATH_NOT_FOUND|does not exist"):
        read_parquet_columns(spark, str(tmp_path / "missing"), ["key"])
