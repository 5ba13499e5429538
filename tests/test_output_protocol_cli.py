"""Bad input never costs data: each stage's command line against a finished
result, someone else's files and bad inputs (schemas.stage_output).

The Spark jobs' ``main`` runs in this process on the session fixture (a
session that was already active is left running), so each case costs a job,
not a JVM start.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import WEIGHTS_SCHEMA
from schemas.stage_output import MARKER, SUCCESS
from tests.helpers import reference_weights, write_weights

LABELS = pa.list_(pa.int32())


def tree_digest(path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (what 'intact' means)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def siblings(path) -> list[str]:
    """Entries beside ``path`` that a stage's temporaries would be."""
    name = os.path.basename(str(path))
    return sorted(e for e in os.listdir(os.path.dirname(str(path))) if e.startswith(f".{name}."))


@pytest.fixture(scope="module")
def weights(tmp_path_factory, source_data):
    root = tmp_path_factory.mktemp("protocol")
    return write_weights(str(root / "weights.parquet"),
                         reference_weights(source_data.index_path, source_data.labels_path, seed=3))


@pytest.fixture(scope="module")
def finished_resample(spark, source_data, weights, tmp_path_factory):
    """A finished resample output (the command line, as a user runs it)."""
    from spark_jobs import resample

    out = str(tmp_path_factory.mktemp("resample") / "out")
    assert resample.main(["--index", source_data.index_path, "--weights", weights, "--size", "600",
                          "--labels", source_data.labels_path, "--output", out]) == 0
    return out


def test_resample_rerun_does_no_work_and_says_so(spark, source_data, weights, finished_resample, capsys):
    from spark_jobs import resample

    before = tree_digest(finished_resample)
    capsys.readouterr()
    assert resample.main(["--index", source_data.index_path, "--weights", weights, "--size", "600",
                          "--labels", source_data.labels_path, "--output", finished_resample]) == 0
    err = capsys.readouterr().err
    assert f"resample: {finished_resample} is complete (_SUCCESS); nothing to do (--overwrite to redo)" in err
    assert tree_digest(finished_resample) == before


def test_resample_overwrite_with_negative_weights_keeps_the_finished_result(spark, source_data, finished_resample,
                                                                            tmp_path, capsys):
    from spark_jobs import resample

    table = reference_weights(source_data.index_path, source_data.labels_path, seed=3)
    bad = table.set_column(4, "weight", pa.array(np.where(np.arange(table.num_rows) == 2, -1.0,
                                                          table.column("weight").to_numpy()), pa.float64()))
    bad_path = write_weights(str(tmp_path / "negative.parquet"), bad.cast(WEIGHTS_SCHEMA))
    before = tree_digest(finished_resample)
    rc = resample.main(["--index", source_data.index_path, "--weights", bad_path, "--size", "600",
                        "--output", finished_resample, "--overwrite"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "negative.parquet" in err and "negative" in err.split("error:", 1)[1]
    assert tree_digest(finished_resample) == before and SUCCESS in before
    assert siblings(finished_resample) == []


def test_resample_overwrite_replaces_its_own_result_whole(spark, source_data, weights, finished_resample, capsys):
    from spark_jobs import resample

    before = tree_digest(finished_resample)
    assert resample.main(["--index", source_data.index_path, "--weights", weights, "--size", "700",
                          "--labels", source_data.labels_path, "--output", finished_resample, "--overwrite"]) == 0
    stats = json.loads(open(os.path.join(finished_resample, "stats.json")).read())
    assert stats["total_copies"] == 700
    after = tree_digest(finished_resample)
    assert after != before and MARKER in after and SUCCESS in after
    old_parts = {(p, d) for p, d in before.items() if p.startswith("selection/")}
    new_parts = {(p, d) for p, d in after.items() if p.startswith("selection/")}
    assert old_parts and new_parts and not old_parts & new_parts  # replaced whole: no old part file survives
    assert siblings(finished_resample) == []


def test_resample_refuses_a_label_sets_file_it_did_not_write(spark, source_data, weights, tmp_path, capsys):
    from spark_jobs import resample

    theirs = str(tmp_path / "their-table.parquet")
    pq.write_table(pa.table({"lsid": [1, 2], "labels": pa.array([[0], [1]], LABELS), "n": [5, 6]}), theirs)
    garbage = str(tmp_path / "notes.parquet")
    open(garbage, "wb").write(b"not parquet at all")
    for path in (theirs, garbage):
        before = open(path, "rb").read()
        rc = resample.main(["--index", source_data.index_path, "--weights", weights, "--size", "600",
                            "--label-sets", path, "--output", str(tmp_path / "out")])
        assert rc == 1
        err = capsys.readouterr().err
        assert f"--label-sets {path} exists and is not" in err and "left as it is" in err
        assert open(path, "rb").read() == before
        assert not os.path.exists(tmp_path / "out")


def test_resample_fails_naming_a_key_the_index_holds_twice_with_different_labels(spark, tmp_path, capsys):
    from spark_jobs import resample

    index = tmp_path / "index"
    index.mkdir()
    pq.write_table(pa.table({"key": ["a/1", "a/2", "dup/7"], "labels": pa.array([[0], [1], [0]], LABELS),
                             "image": [b"\xff\xd8a", b"\xff\xd8b", b"\xff\xd8c"]}), str(index / "part-0.parquet"))
    pq.write_table(pa.table({"key": ["b/1", "dup/7"], "labels": pa.array([[1], [1]], LABELS),
                             "image": [b"\xff\xd8d", b"\xff\xd8e"]}), str(index / "part-1.parquet"))
    out = str(tmp_path / "out")
    rc = resample.main(["--index", str(index), "--scheme", "entire", "--draw", "systematic", "--size", "5",
                        "--output", out])
    assert rc == 1
    err = capsys.readouterr().err
    assert "key 'dup/7'" in err and "not unique: 2 records" in err
    assert "part-0.parquet (labels [0])" in err and "part-1.parquet (labels [1])" in err
    assert not os.path.exists(out) and siblings(out) == []


def test_write_shards_refuses_someone_elses_webdataset_folder(spark, source_data, finished_resample, tmp_path,
                                                              capsys):
    from spark_jobs import write_shards

    theirs = tmp_path / "their-shards"
    theirs.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar", "manifest.json", ".shard-000002.tar.tmp-1"):
        (theirs / name).write_bytes(b"their data " + name.encode())
    before = tree_digest(theirs)
    for extra in ([], ["--overwrite"]):
        rc = write_shards.main(["--selection", finished_resample, "--index", source_data.index_path,
                                "--output", str(theirs), *extra])
        assert rc == 1
        err = capsys.readouterr().err
        assert f"{theirs} is not empty" in err and "was not written by write_shards" in err
        assert tree_digest(theirs) == before


def test_write_shards_rerun_does_no_work_and_overwrite_keeps_old_on_bad_input(spark, source_data, finished_resample,
                                                                              tmp_path, capsys):
    from spark_jobs import write_shards

    out = str(tmp_path / "shards")
    args = ["--selection", finished_resample, "--index", source_data.index_path, "--output", out,
            "--samples-per-shard", "200"]
    assert write_shards.main(args) == 0
    before = tree_digest(out)
    assert MARKER in before and SUCCESS in before and "manifest.json" in before
    capsys.readouterr()
    assert write_shards.main(args) == 0
    assert f"write_shards: {out} is complete (_SUCCESS); nothing to do" in capsys.readouterr().err
    # --overwrite from a selection that is not a result: refused, the shards stay.
    unfinished = tmp_path / "unfinished"
    (unfinished / "selection").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["x"], "copies": pa.array([1], pa.int32())}),
                   str(unfinished / "selection" / "part-0.parquet"))
    (unfinished / "stats.json").write_text("{}")
    assert write_shards.main([*args[:1], str(unfinished), *args[2:], "--overwrite"]) == 1
    assert "no _SUCCESS; the resampler did not finish" in capsys.readouterr().err
    assert tree_digest(out) == before and siblings(out) == []


def test_importance_weights_bad_argument_keeps_the_finished_result(source_data, tmp_path, capsys):
    from beam_pipelines import importance_weights

    p_t = np.random.default_rng(0).dirichlet(np.ones(pq.read_table(source_data.labels_path).num_rows))
    hist = str(tmp_path / "pt.parquet")
    pq.write_table(pa.table({"label_id": pa.array(np.arange(p_t.size), pa.int32()), "p_target": p_t}), hist)
    out = str(tmp_path / "w")
    args = ["--index", source_data.index_path, "--labels", source_data.labels_path,
            "--target-histogram", hist, "--output", out]
    assert importance_weights.main(args) == 0
    before = tree_digest(out)
    assert {MARKER, SUCCESS, "weights.parquet", "summary.json"} <= set(before)
    capsys.readouterr()
    assert importance_weights.main(args) == 0  # a rerun: nothing to do
    assert f"importance_weights: {out} is complete (_SUCCESS); nothing to do" in capsys.readouterr().err
    for bad, message in ((["--labels", str(tmp_path / "missing.parquet")], "missing.parquet"),
                         (["--max-bad-fraction", "2"], "--max-bad-fraction must be in [0, 1]"),
                         (["--target-histogram", source_data.labels_path], "p_target")):
        for extra in ([], ["--overwrite"]):
            rc = importance_weights.main([*args, *bad, *extra])
            assert rc == 1, (bad, extra)
            assert message in capsys.readouterr().err
            assert tree_digest(out) == before and siblings(out) == []


def _imagenet(tmp_path):
    from PIL import Image

    train = tmp_path / "train"
    for wnid in ("n01440764", "n01443537"):
        (train / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(train / wnid / f"{wnid}_{i}.JPEG", format="JPEG")
    (tmp_path / "is_a.txt").write_text("n01000001 n01440764\nn01000001 n01443537\n")
    (tmp_path / "words.txt").write_text("n01440764\ttench\nn01443537\tgoldfish\nn01000001\tfish\n")
    return ["--imagenet-train", str(train), "--hierarchy", str(tmp_path / "is_a.txt"),
            "--words", str(tmp_path / "words.txt")]


def test_build_index_refuses_a_directory_of_the_users_files(spark, tmp_path, capsys):
    from spark_jobs import build_index

    inputs = _imagenet(tmp_path)
    mine = tmp_path / "my-data"
    (mine / "index").mkdir(parents=True)
    (mine / "index" / "part-0.parquet").write_bytes(b"my own index")
    (mine / "labels.parquet").write_bytes(b"my own labels")
    before = tree_digest(mine)
    for extra in ([], ["--overwrite"]):
        assert build_index.main([*inputs, "--output", str(mine), *extra]) == 1
        err = capsys.readouterr().err
        assert f"{mine} is not empty (index, labels.parquet)" in err and "was not written by build_index" in err
        assert tree_digest(mine) == before
    out = tmp_path / "new"
    assert build_index.main([*inputs, "--output", str(out), "--files", "1"]) == 0
    assert {MARKER, SUCCESS, "labels.parquet", "summary.json"} <= set(tree_digest(out))
    capsys.readouterr()
    assert build_index.main([*inputs, "--output", str(out), "--files", "1"]) == 0
    assert "build_index: " + str(out) + " is complete (_SUCCESS); nothing to do" in capsys.readouterr().err
