"""Every validator against the bad input it exists for, with the exact error."""

import numpy as np
import pyarrow as pa
import pytest

from schemas import (SchemaError, check_index_schema, validate_histogram, validate_index_batch, validate_vocabulary,
                     validate_weights)
from adaptive_transfer.synthetic import make_vocabulary

LABELS = pa.list_(pa.int32())


def index(keys, labels, image=None, uri=None):
    cols = {"key": pa.array(keys, pa.string()), "labels": pa.array(labels, LABELS)}
    if image is not None:
        cols["image"] = pa.array(image, pa.binary())
    if uri is not None:
        cols["uri"] = pa.array(uri, pa.string())
    return pa.table(cols)


def error_of(fn, *args, **kwargs) -> str:
    """The message of the error ``fn`` raises: caught as ``ValueError`` (what
    the stages' command lines catch and report), and exactly a ``SchemaError``."""
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    assert type(err.value) is SchemaError, f"{type(err.value).__name__}: {err.value}"
    return str(err.value)


def test_good_index_passes():
    t = index(["a/1.JPEG", "a/2.JPEG"], [[1], [2, 0]], image=[b"x", b"y"])
    validate_index_batch(t, num_labels=3, file="idx.parquet")
    validate_index_batch(t, label_ids=np.array([0, 1, 2]), file="idx.parquet")


def test_index_null_key():
    t = index(["a", None, "c"], [[1], [1], [1]], image=[b"x"] * 3)
    assert error_of(validate_index_batch, t, num_labels=3, file="part-0.parquet", row_offset=100) \
        == "part-0.parquet, row 101: key is null"


def test_error_keeps_where_for_callers_that_count_and_skip():
    t = index(["a", "b", "c/d.JPEG"], [[1], [1], []], image=[b"x"] * 3)
    with pytest.raises(SchemaError) as err:
        validate_index_batch(t, num_labels=3, file="part-7.parquet", row_offset=40)
    assert (err.value.file, err.value.row, err.value.key, err.value.detail) == \
        ("part-7.parquet", 42, "c/d.JPEG", "labels is empty")


def test_index_empty_key():
    t = index(["a", "b", ""], [[1], [1], [1]], image=[b"x"] * 3)
    assert error_of(validate_index_batch, t, num_labels=3, file="f.parquet") \
        == "f.parquet, row 2: key is empty"


def test_index_empty_labels():
    t = index(["a", "b/c.JPEG"], [[1], []], image=[b"x"] * 2)
    assert error_of(validate_index_batch, t, num_labels=3, file="f.parquet") \
        == "f.parquet, row 1, key 'b/c.JPEG': labels is empty"


def test_index_null_labels():
    t = index(["a", "b"], [None, [1]], image=[b"x"] * 2)
    assert error_of(validate_index_batch, t, num_labels=3, file="f.parquet") \
        == "f.parquet, row 0, key 'a': labels is null"


def test_index_label_outside_vocabulary():
    t = index(["a", "b", "c"], [[1], [0, 2], [7, 1]], image=[b"x"] * 3)
    assert error_of(validate_index_batch, t, num_labels=3, file="f.parquet") \
        == "f.parquet, row 2, key 'c': label 7 is not in the label vocabulary"
    assert error_of(validate_index_batch, t, label_ids=np.array([0, 1, 2]), file="f.parquet") \
        == "f.parquet, row 2, key 'c': label 7 is not in the label vocabulary"
    negative = index(["a"], [[-1]], image=[b"x"])
    assert error_of(validate_index_batch, negative, num_labels=3, file="f.parquet") \
        == "f.parquet, row 0, key 'a': label -1 is not in the label vocabulary"


def test_index_without_image_or_uri_column():
    t = index(["a"], [[1]])
    assert error_of(validate_index_batch, t, num_labels=3, file="f.parquet") \
        == "f.parquet: source index has neither an 'image' nor a 'uri' column"


def test_index_row_with_neither_image_nor_uri():
    t = index(["a", "b"], [[1], [1]], image=[b"x", None], uri=["gs://b/a.jpg", None])
    assert error_of(validate_index_batch, t, num_labels=3, file="f.parquet") \
        == "f.parquet, row 1, key 'b': neither image nor uri is set"
    # A row with only a uri is fine when both columns exist.
    ok = index(["a", "b"], [[1], [1]], image=[b"x", None], uri=[None, "gs://b/b.jpg"])
    validate_index_batch(ok, num_labels=3, file="f.parquet")


def test_index_uri_only_empty_uri():
    t = index(["a", "b"], [[1], [1]], uri=["/x.jpg", ""])
    assert error_of(validate_index_batch, t, num_labels=3, file="f.parquet") \
        == "f.parquet, row 1, key 'b': uri is null or empty and there is no image column"


def test_index_schema_missing_key_and_wrong_types():
    assert error_of(check_index_schema, pa.schema([("labels", LABELS), ("image", pa.binary())]), "f") \
        == "f: source index has no 'key' column (columns: ['image', 'labels'])"
    assert error_of(check_index_schema, pa.schema([("key", pa.string()), ("labels", pa.string()),
                                                   ("image", pa.binary())]), "f") \
        == "f: column 'labels' must be list<int32>, got string"
    assert check_index_schema(pa.schema([("key", pa.string()), ("labels", LABELS),
                                         ("uri", pa.string())])) == "uri"


def vocab(ids, names, parents):
    return pa.table({"label_id": pa.array(ids, pa.int32()), "name": pa.array(names, pa.string()),
                     "parent_id": pa.array(parents, pa.int32())})


def test_vocabulary_good():
    validate_vocabulary(make_vocabulary(), "labels.parquet")


def test_vocabulary_duplicate_ids():
    v = vocab([0, 1, 1], ["animal", "bird", "owl"], [None, 0, 1])
    assert error_of(validate_vocabulary, v, "labels.parquet") \
        == "labels.parquet, row 2: duplicate label_id 1 (also at row 1)"


def test_vocabulary_dangling_parent():
    v = vocab([0, 1, 2], ["animal", "bird", "owl"], [None, 0, 9])
    assert error_of(validate_vocabulary, v, "labels.parquet") \
        == "labels.parquet, row 2: label 2 ('owl') has parent_id 9, which is not in the vocabulary"


def test_vocabulary_cycle():
    v = vocab([0, 1, 2, 3], ["animal", "a", "b", "c"], [None, 3, 1, 2])
    assert error_of(validate_vocabulary, v, "labels.parquet") \
        == "labels.parquet, row 1: label hierarchy has a cycle: 1 -> 3 -> 2 -> 1"
    self_loop = vocab([0, 1], ["animal", "a"], [None, 1])
    assert error_of(validate_vocabulary, self_loop, "labels.parquet") \
        == "labels.parquet, row 1: label hierarchy has a cycle: 1 -> 1"


def test_vocabulary_missing_name():
    v = vocab([0, 1], ["animal", ""], [None, 0])
    assert error_of(validate_vocabulary, v, "labels.parquet") == "labels.parquet, row 1: label 1 has no name"


def weights(values):
    n = len(values)
    return pa.table({"label_id": pa.array(range(10, 10 + n), pa.int32()),
                     "count": pa.array([5] * n, pa.int64()),
                     "p_source": pa.array([0.1] * n), "p_target": pa.array([0.1] * n),
                     "weight": pa.array(values, pa.float64())})


@pytest.mark.parametrize("values,message", [
    ([1.0, float("nan"), 2.0], "weights.parquet, row 1: weight of label 11 is NaN (nan)"),
    ([1.0, 2.0, -0.5], "weights.parquet, row 2: weight of label 12 is negative (-0.5)"),
    ([float("inf"), 2.0], "weights.parquet, row 0: weight of label 10 is infinite (inf)"),
    ([1.0, 1e308, 2.0], "weights.parquet, row 1: weight of label 11 is 1e+308, too large to sum (at most 8.78e+304); "
                        "only the weights' ratios matter: divide them all by the largest"),
    ([0.0, 5e-324], "weights.parquet, row 1: the largest weight (label 11) is 5e-324, too small to keep the weights' "
                    "ratios (at least 2e-292); only their ratios matter: divide them all by the largest"),
])
def test_weights_bad_values(values, message):
    assert error_of(validate_weights, weights(values), "weights.parquet") == message


def test_weights_good_and_duplicate_label():
    validate_weights(weights([0.0, 1.5, 3.0]), "weights.parquet")
    t = pa.table({"label_id": pa.array([1, 2, 1], pa.int32()), "weight": [1.0, 1.0, 1.0]})
    assert error_of(validate_weights, t, "weights.parquet") \
        == "weights.parquet, row 2: label 1 appears more than once (rows [0, 2])"


def hist(values):
    return pa.table({"label_id": pa.array(range(len(values)), pa.int32()),
                     "p_target": pa.array(values, pa.float64())})


def test_histogram_negative():
    assert error_of(validate_histogram, hist([0.6, 0.6, -0.2]), "hist.parquet") \
        == "hist.parquet, row 2: p_target of label 2 is negative (-0.2)"


def test_histogram_not_summing_to_one():
    assert error_of(validate_histogram, hist([0.5, 0.3]), "hist.parquet") \
        == "hist.parquet: p_target sums to 0.8, not 1 (tolerance 1e-06)"


def test_histogram_good():
    validate_histogram(hist([0.25, 0.25, 0.5]), "hist.parquet")
    validate_histogram(hist(np.full(1000, 1e-3).tolist()), "hist.parquet")
