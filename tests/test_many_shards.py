"""Shards of several targets in one fetch pass (spark_jobs.write_shards.many):
each target's shards byte-identical to its single-target run (also with task
retries and another number of fetch tasks), each image read once, each
target's output protocol on its own, and the tallies summed exactly."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import io as sio
from spark_jobs import write_shards as W
from spark_jobs.write_shards import many as M
from spark_jobs.write_shards import tallies as T
from spark_jobs.write_shards.fetch import fetched_arrow_schema
from tests.helpers import run_module

SAMPLES = 300


def _tars(out: str) -> dict:
    return {f: sio.file_sha256(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.endswith(".tar")}


@pytest.fixture(scope="module")
def targets(resampled, tmp_path_factory):
    """Two selections over one index: ``a`` the resampler's, ``b`` a bare
    one sharing every third of ``a``'s keys and adding keys ``a`` lacks."""
    source, sel_dir, _ = resampled
    a = pq.read_table(os.path.join(sel_dir, "selection"), columns=["key", "copies"])
    keys = pq.read_table(source.index_path, columns=["key"]).column("key").to_pylist()
    chosen = set(a.column("key").to_pylist())
    shared = a.column("key").to_pylist()[::3]
    extra = [k for k in keys if k not in chosen][:300]
    b_keys = shared + extra
    root = tmp_path_factory.mktemp("many")
    b = str(root / "b-selection")
    os.makedirs(b)
    pq.write_table(pa.table({"key": b_keys, "copies": pa.array([1 + i % 3 for i in range(len(b_keys))], pa.int32()),
                             "weight": np.ones(len(b_keys))}), os.path.join(b, "part-0.parquet"))
    return source, {"a": sel_dir, "b": b}, (chosen, set(b_keys))


@pytest.fixture(scope="module")
def singles(spark, targets, tmp_path_factory):
    """Each target's single-target run: its tars' digests and manifest."""
    source, selections, _ = targets
    root = tmp_path_factory.mktemp("singles")
    done = {}
    for name, sel in selections.items():
        m = W.run(spark, W.ShardJob(selection=sel, index=source.index_path, output=str(root / name),
                                    samples_per_shard=SAMPLES))
        done[name] = (_tars(str(root / name)), m)
    return done


def test_targets_byte_identical_to_single_runs_one_read_rerun_rebuilds_what_is_missing(
        spark, targets, singles, tmp_path, monkeypatch, capsys):
    source, selections, (a_keys, b_keys) = targets
    monkeypatch.setattr(T, "DRIVER_TALLY_ENTRIES", 0)  # the tallies summed in Spark
    out = str(tmp_path / "out")
    job = M.ManyShardJob(targets=list(selections.items()), index=source.index_path, output=out,
                         samples_per_shard=SAMPLES, fetch_tasks=1)  # another number of fetch tasks
    manifests = M.run(spark, job)
    for name in selections:
        assert _tars(os.path.join(out, name)) == singles[name][0] and len(singles[name][0]) > 1
        assert manifests[name].total_samples == singles[name][1].total_samples
    # Each image read from the index once, however many targets selected it.
    read = manifests["a"].extra["index_read"]
    assert read == manifests["b"].extra["index_read"]
    assert read["images"] == len(a_keys | b_keys)
    assert singles["a"][1].extra["index_read"]["images"] + singles["b"][1].extra["index_read"]["images"] \
        == len(a_keys) + len(b_keys) > read["images"]
    capsys.readouterr()
    # A rerun reuses both; a single-target run reuses the many-target result (same fingerprint).
    assert M.run(spark, job) == manifests
    W.run(spark, W.ShardJob(selection=selections["a"], index=source.index_path, output=os.path.join(out, "a"),
                            samples_per_shard=SAMPLES))
    assert capsys.readouterr().err.count("nothing to do") == 3
    # b gone, and two more targets that fail (its selection's keys are not in the
    # index; a selection that does not exist): a is reused, b rebuilt and
    # committed, the failures named once the others are done.
    shutil.rmtree(os.path.join(out, "b"))
    missing = str(tmp_path / "c-selection")
    os.makedirs(missing)
    pq.write_table(pa.table({"key": ["nowhere/1", "nowhere/2"], "copies": pa.array([1, 2], pa.int32())}),
                   os.path.join(missing, "part-0.parquet"))
    more = M.ManyShardJob(targets=[*selections.items(), ("c", missing), ("d", str(tmp_path / "none"))],
                          index=source.index_path, output=out, samples_per_shard=SAMPLES)
    with pytest.raises(ValueError, match=r"2 of 4 targets failed \(finished: a, b\): c: .*max-bad-fraction.*; d: "):
        M.run(spark, more)
    assert capsys.readouterr().err.count("nothing to do") == 1  # a only
    assert _tars(os.path.join(out, "b")) == singles["b"][0]
    assert sio.exists(os.path.join(out, "b", "_SUCCESS")) and not os.path.exists(os.path.join(out, "c"))
    assert sorted(os.listdir(out)) == ["a", "b"]  # nothing left of c or d


def test_tally_rows_sum_to_the_tasks_counts(spark):
    layout = T.TallyLayout((3, 13))  # 8 buckets; 8,192 buckets: two blocks
    rng = np.random.default_rng(0)
    tasks = [np.where(rng.random(layout.size) < 0.3, rng.integers(1, 50, layout.size), 0) for _ in range(5)]
    tasks[2][8:8 + T.TALLY_BLOCK] = 0  # a block of zeros is left out
    schema = fetched_arrow_schema()
    rows = pa.Table.from_batches([T.tally_batch(layout, t, schema) for t in tasks])
    assert rows.num_rows == 5 * layout.blocks() - 1
    expected = np.sum(tasks, axis=0)
    on_driver = T.per_target(layout, rows)
    assert np.array_equal(np.concatenate(on_driver), expected)
    task_row = pa.RecordBatch.from_pylist([{"target": T.TASK_ROW, "block": 0, "rows_path": "x"}], schema=schema)
    frame = spark.createDataFrame(pa.concat_tables([rows, pa.Table.from_batches([task_row])]))
    summed = T.combine_in_spark(frame, schema, W.FETCHED_SCHEMA).toArrow()
    tallies = summed.filter(pa.compute.not_equal(summed.column("target"), T.TASK_ROW))
    assert tallies.num_rows == layout.blocks()  # one row per target and block reaches the driver
    assert summed.num_rows == layout.blocks() + 1  # the task row as it was
    assert np.array_equal(np.concatenate(T.per_target(layout, tallies)), expected)
    assert [len(x) for x in on_driver] == [8, 8192]


@pytest.mark.slow
def test_many_cli_with_task_retries_matches_single_runs(targets, singles, tmp_path):
    source, selections, _ = targets
    out = str(tmp_path / "out")
    proc = run_module("spark_jobs.write_shards.many", "--target", "a", "--selection", selections["a"],
                      "--target", "b", "--selection", selections["b"], "--index", source.index_path,
                      "--output", out, "--samples-per-shard", str(SAMPLES), "--master", "local[2,4]",
                      "--driver-memory", "1g", "--run-bytes", "100K",
                      env={"ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT": "spill,write"})
    for stage in ("spill", "write"):
        assert f"injected failure in stage '{stage}'" in proc.stderr
    assert "a: " in proc.stdout and "b: " in proc.stdout
    for name in selections:
        assert _tars(os.path.join(out, name)) == singles[name][0]
