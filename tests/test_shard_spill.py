"""The shard writer's spill and fetch tasks at scale: where the spill goes,
fetch tasks holding a bounded chunk of their input, and the job refusing a
bad selection before it touches the output."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from schemas import SchemaError
from spark_jobs import write_shards as W
from spark_jobs.write_shards import fetch as F
from spark_jobs.write_shards import spill_policy as SP
from spark_jobs.write_shards.spill import spread_name
from spark_jobs.write_shards.tallies import TASK_ROW, per_target

GiB = 1 << 30


def test_spill_location_rules():
    # Given: always that.
    assert SP.spill_location("hdfs:///tmp/s", "s3://b/out", False, 10 ** 15, None) == "given"
    # Local mode: memory when the spill fits a quarter of what is free, else beside the output.
    assert SP.spill_location(None, "/data/out", True, 2 * GiB, 8 * GiB) == "memory"
    assert SP.spill_location(None, "/data/out", True, 2 * GiB + 1, 8 * GiB) == "output"
    assert SP.spill_location(None, "/data/out", True, None, 8 * GiB) == "output"  # size unknown
    assert SP.spill_location(None, "/data/out", True, 1, None) == "output"  # no tmpfs
    # A cluster never spills to memory (one host's), and never silently puts a large spill on an object store.
    assert SP.spill_location(None, "/shared/out", False, 1, 64 * GiB) == "output"
    assert SP.spill_location(None, "s3://b/out", False, SP.OBJECT_STORE_SPILL_LIMIT, None) == "output"
    assert SP.spill_location(None, "s3://b/out", False, None, None) == "output"  # unknown: said, not refused
    assert SP.spill_location(None, "hdfs:///out", False, 10 ** 15, None) == "output"  # the cluster's own disks
    with pytest.raises(ValueError, match="about 256 GiB.*s3://b/out/_temporary on the object store: give --spill-dir"):
        SP.spill_location(None, "s3://b/out", False, SP.OBJECT_STORE_SPILL_LIMIT + 1, None)
    assert [SP.is_object_store(p) for p in ("s3a://b/x", "gs://b", "GS://b", "hdfs://nn/x", "file:///x", "/x")] == \
        [True, True, True, False, False, False]


def test_spill_names_spread_over_prefixes():
    names = [spread_name(f"spill-{i}-0000.bin") for i in range(2000)]
    prefixes = {n.split("/")[0] for n in names}
    assert all(len(p) == 2 and p == p.lower() and int(p, 16) < 256 for p in prefixes) and len(prefixes) > 200
    assert spread_name("rows-7.arrow") == spread_name("rows-7.arrow")  # deterministic
    assert names[5].endswith("/spill-5-0000.bin")


def _copy_rows(rng, examples: int, files: int = 3) -> pa.Table:
    """Copy rows sorted by (file, row, key, copy), as a fetch task gets them;
    some examples have many copies, some are not in the index (no file)."""
    copies = rng.integers(1, 6, examples)
    copies[rng.choice(examples, 3, replace=False)] = 40
    file_of = rng.integers(0, files, examples)
    file_of[:4] = -1  # not in the index
    rows = []
    for e in range(examples):
        for c in range(int(copies[e])):
            rows.append((None if file_of[e] < 0 else f"f{file_of[e]}", None if file_of[e] < 0 else e,
                         f"k{e:05d}", c))
    rows.sort(key=lambda r: (r[0] is not None, r[0] or "", r[1] or 0, r[2], r[3]))
    file, row, key, copy = zip(*rows)
    return pa.table({"file": pa.array(file, pa.string()), "row": pa.array(row, pa.int64()),
                     "key": pa.array(key), "copy": pa.array(copy, pa.int32())})


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10 ** 6])
def test_example_chunks_never_split_an_example(chunk_rows):
    table = _copy_rows(np.random.default_rng(chunk_rows), 300)
    batches = table.to_batches(max_chunksize=13)
    batches = [b for batch in batches for b in (batch, batch.slice(0, 0))]  # empty batches too
    chunks = list(F.example_chunks(iter(batches), chunk_rows))
    assert pa.concat_tables(chunks).equals(table)  # every row once, in order
    assert all(c.num_rows for c in chunks) and (len(chunks) == 1) == (chunk_rows >= table.num_rows)
    ident = [tuple(r.values()) for r in table.select(["file", "row", "key"]).to_pylist()]
    end = 0
    for c in chunks[:-1]:
        end += c.num_rows
        assert ident[end - 1] != ident[end]  # cut where an example ends
    # A chunk holds at most chunk_rows plus the rows of one batch and one example (the largest has 40 copies).
    assert max(c.num_rows for c in chunks) <= max(chunk_rows, 1) + 13 + 40


def _fetch_rows(index_dir, copy_rows: pa.Table, spill_dir: str, chunk_rows: int) -> tuple[dict, list, list]:
    """Run one fetch task in process; ``({(key, copy): (image bytes, row)},
    bad examples, tally)``."""
    task = F.FetchTask(column="image", bits=4, storage={}, spill_dir=spill_dir, spill_file_bytes=20_000,
                       sort_bytes=30_000, chunk_rows=chunk_rows)
    out = pa.Table.from_batches(list(F.fetch_partition(task)(iter(copy_rows.to_batches(max_chunksize=16)))))
    task_rows = out.filter(pc.equal(out.column("target"), TASK_ROW))
    assert task_rows.num_rows == 1
    result = task_rows.to_pylist()[0]
    got = {}
    for row in pa.ipc.open_file(result["rows_path"]).read_all().to_pylist():
        with open(row["path"], "rb") as fh:
            fh.seek(row["offset"])
            image = fh.read(row["length"])
        got[(row["key"], row["copy"])] = (image, row["labels"], row["ext"], row["copies"], row["h"])
    bad = sorted(zip(result["bad_keys"], result["bad_reasons"], result["bad_copies"]))
    per_bucket = per_target(task.layout, out.filter(pc.not_equal(out.column("target"), TASK_ROW)))[0]
    assert set(result["bad_targets"]) <= {0}
    return got, bad, [(int(b), int(per_bucket[b])) for b in np.flatnonzero(per_bucket)]


def test_fetch_in_small_chunks_gives_the_same_rows(tmp_path):
    from adaptive_transfer.synthetic import encode_image

    rng = np.random.default_rng(3)
    keys, images = [], []
    for i in range(120):
        data = encode_image(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        keys.append(f"k{i:05d}")
        images.append(data[:30] if i % 17 == 5 else data)  # some cut short: bad examples
    paths = []
    for f in range(3):
        part = slice(40 * f, 40 * (f + 1))
        path = str(tmp_path / f"part-{f}.parquet")
        pq.write_table(pa.table({"key": keys[part], "labels": pa.array([[f]] * 40, pa.list_(pa.int32())),
                                 "image": pa.array(images[part], pa.binary())}), path, row_group_size=16)
        paths.append(path)
    rows = []
    for i, key in enumerate(keys + ["missing/1", "missing/2"]):
        known = i < len(keys)
        for c in range(1 + (i % 4) * (i % 7)):
            rows.append((key, c, int(rng.integers(-2 ** 62, 2 ** 62)), 1.0,
                         [i // 40] if known else None, paths[i // 40] if known else None,
                         i % 40 if known else None))
    rows.sort(key=lambda r: (r[5] is not None, r[5] or "", r[6] or 0, r[0], r[1]))
    key, copy, h, weight, labels, file, row = zip(*rows)
    table = pa.table({"key": pa.array(key), "copy": pa.array(copy, pa.int32()), "h": pa.array(h, pa.int64()),
                      "weight": pa.array(weight), "labels": pa.array(labels, pa.list_(pa.int32())),
                      "file": pa.array(file, pa.string()), "row": pa.array(row, pa.int64()),
                      "uri": pa.nulls(len(rows), pa.string())})
    whole = _fetch_rows(tmp_path, table, str(tmp_path / "whole"), 10 ** 6)
    for chunk_rows in (1, 9, 100):
        assert _fetch_rows(tmp_path, table, str(tmp_path / f"c{chunk_rows}"), chunk_rows) == whole
    got, bad, tally = whole
    assert {k for k, _, _ in bad} == {keys[i] for i in range(120) if i % 17 == 5} | {"missing/1", "missing/2"}
    assert sum(n for _, n in tally) == len(got) == sum(1 for r in rows if r[5] is not None
                                                       and int(r[0][1:]) % 17 != 5)
    assert all(image == images[int(k[1:])] for (k, _), (image, *_) in got.items())


@pytest.mark.skipif((SP.memory_free() or 0) < 1 << 30, reason="needs a tmpfs at /dev/shm with 1 GiB free")
def test_memory_spill_is_used_in_local_mode_and_leaves_nothing(spark, resampled, tmp_path):
    import fcntl

    source, sel_dir, _ = resampled
    # A killed run's spill (its lock file free) is removed; a running one's (lock held) is kept.
    stale, held = (os.path.join(SP.MEMORY_SPILL_DIR, f"{SP.MemorySpill.PREFIX}0-{name}") for name in ("stale", "held"))
    for path in (stale, held):
        os.makedirs(os.path.join(path, "ab"), exist_ok=True)
        open(os.path.join(path, "ab", "spill-x.bin"), "wb").write(b"x" * 100)
        open(os.path.join(path, SP.MemorySpill.LOCK), "wb").close()
    lock = os.open(os.path.join(held, SP.MemorySpill.LOCK), os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    ours = f"{SP.MemorySpill.PREFIX}{os.getpid()}-"
    m = W.run(spark, W.ShardJob(selection=sel_dir, index=source.index_path, output=str(tmp_path / "m"),
                                samples_per_shard=300))
    assert m.extra["spill"]["location"] == "memory"
    assert m.extra["spill"]["released_while_writing"] > 0
    assert not os.path.exists(stale) and os.path.exists(os.path.join(held, "ab", "spill-x.bin"))
    os.close(lock)
    assert SP.MemorySpill.remove_stale() == [held]
    assert not [e for e in os.listdir(SP.MEMORY_SPILL_DIR) if e.startswith(ours)]  # this run's, removed
    given = W.run(spark, W.ShardJob(selection=sel_dir, index=source.index_path, output=str(tmp_path / "g"),
                                    samples_per_shard=300, spill_dir=str(tmp_path / "spill")))
    assert given.extra["spill"]["location"] == "given" and os.listdir(tmp_path / "spill") == []
    # Where the spill lies never changes the shards.
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in given.shards]


@pytest.mark.parametrize("rows, error", [
    ({"key": pa.array([], pa.string()), "copies": pa.array([], pa.int32())}, "selection is empty"),
    ({"key": ["a", "b"], "copies": pa.array([2, 0], pa.int32())}, r"copies must be > 0 \(found 0\)"),
])
def test_bad_selection_is_refused_before_the_output_is_touched(spark, source_data, tmp_path, rows, error):
    pq.write_table(pa.table(rows), tmp_path / "sel.parquet")
    out = tmp_path / "out"
    out.mkdir()  # an empty directory: the stage would make it its own
    with pytest.raises(SchemaError, match=error):
        W.run(spark, W.ShardJob(selection=str(tmp_path / "sel.parquet"), index=source_data.index_path,
                                output=str(out)))
    assert os.listdir(out) == []  # not even the stage's marker
    assert sorted(os.listdir(tmp_path)) == ["out", "sel.parquet"]  # no temporary beside it


def test_write_all_survives_short_writes_and_many_buffers(tmp_path, monkeypatch):
    from schemas import io as sio

    real = os.writev
    calls = []

    def short(fd, buffers):  # the kernel may take less than it is given
        calls.append(len(buffers))
        return real(fd, [memoryview(buffers[0])[:max(1, len(buffers[0]) // 2)]])

    parts = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)] + [b"", memoryview(b"tail")]
    monkeypatch.setattr(os, "writev", short)
    with open(tmp_path / "f", "wb", buffering=0) as fh:
        assert sio.write_all(fh.fileno(), parts) == sum(len(p) for p in parts)
    assert open(tmp_path / "f", "rb").read() == b"".join(parts) and max(calls) <= 1024


def test_write_tar_to_a_raw_file_equals_the_buffered_path(tmp_path):
    import hashlib

    from schemas.shard_format import sample_json, sample_key, write_tar

    samples = [(sample_key(f"k/{i}", 0), "jpg", memoryview(os.urandom(100 + 37 * i)),
                sample_json(f"k/{i}", 0, [i], 1.0)) for i in range(300)]
    with open(tmp_path / "raw.tar", "wb", buffering=0) as fh:
        raw = write_tar(fh, samples)
    with open(tmp_path / "buffered.tar", "wb") as fh:
        buffered = write_tar(fh, samples)
    data = open(tmp_path / "raw.tar", "rb").read()
    assert data == open(tmp_path / "buffered.tar", "rb").read()
    assert raw == buffered == (300, len(data), hashlib.sha256(data).hexdigest())
