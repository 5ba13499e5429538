"""spark_jobs.write_shards and spark_jobs.verify: nothing lost, nothing extra,
WebDataset-readable, deterministic, atomic under failures, object storage."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import math
import tarfile
from collections import Counter
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from schemas import SchemaError
from schemas import io as sio
from schemas import shard_format as SH
from spark_jobs import reencode
from spark_jobs import verify as V
from spark_jobs import write_shards as W
from tests.helpers import run_module

LABELS = pa.list_(pa.int32())


# -- pure parts ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["n01440764/n01440764_10026.JPEG", "a.b.c", "with space/and.dot.png",
                                 "100%_sure", "üñí/çødé.jpg", "_c3", "a_c1", "plain"])
def test_sample_keys_survive_webdataset_grouping(key):
    for copy in (0, 1, 12):
        k = SH.sample_key(key, copy)
        assert "." not in k and "/" not in k and " " not in k
        assert SH.parse_sample_key(k) == (key, copy)


def test_sample_keys_are_unique():
    keys = ["a", "a_c1", "a.1", "a%2E1", "a/1", "a 1", "a_c1_c0"]
    made = [SH.sample_key(k, c) for k in keys for c in range(3)]
    assert len(set(made)) == len(made)


KEYS = ["n01440764/n01440764_10026.JPEG", "a.b.c", "with space/and.dot.png", "100%_sure", "üñí/çødé.jpg",
        'q"uote\\back', "tab\tnl\n\x00\x7f", "emoji 😀", "", "_c3"]


@pytest.mark.parametrize("key", KEYS)
def test_sample_key_and_json_fast_paths_match_their_definitions(key):
    import re
    # sample_key: every character outside [A-Za-z0-9_-] as %XX of its UTF-8 bytes.
    ref = re.sub(r"[^A-Za-z0-9_-]", lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), key)
    assert SH.sample_key(key, 7) == ref + "_c7"
    # sample_json: canonical JSON, byte for byte.
    for labels, weight in (([], 0.0), ([3, 1, 20000], 1.0), ([5], 0.1), ([1], 1e-20), ([2], 3e20),
                           ([9], 12345.678)):
        want = json.dumps({"key": key, "copy": 7, "labels": labels, "weight": weight},
                          sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        assert SH.sample_json(key, 7, labels, weight) == want
    for weight in (float("inf"), float("nan")):  # JSON has no such numbers: never written
        with pytest.raises(ValueError, match="is not a finite number"):
            SH.sample_json(key, 7, [4], weight)


def test_image_extension_from_bytes():
    from adaptive_transfer.synthetic import encode_image
    px = np.zeros((8, 8, 3), np.uint8)
    assert SH.image_extension(encode_image(px, "JPEG")) == "jpg"
    assert SH.image_extension(encode_image(px, "PNG")) == "png"
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="WEBP")
    assert SH.image_extension(buf.getvalue()) == "webp"
    assert SH.image_extension(b"GIF89a....") == "gif"
    assert SH.image_extension(b"not an image") is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_image_structure_whole_and_cut(fmt):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    assert SH.image_problem(data) is None and SH.decode_problem(data) is None
    for cut in (40, len(data) // 2, len(data) - 1):
        assert SH.image_problem(data[:cut]) is not None, cut
    if fmt == "JPEG":
        assert SH.image_problem(data + b"\0" * 100) is None  # padding after EOI is common and harmless
        assert SH.image_problem(memoryview(data)) is None
    assert SH.image_problem(b"not an image") == "unrecognised image format"


def test_write_tar_is_deterministic_and_readable():
    samples = [(SH.sample_key(f"k/{i}.JPEG", 0), "jpg", b"\xff\xd8\xff" + bytes([i]) * 50,
                SH.sample_json(f"k/{i}.JPEG", 0, [i], 0.5)) for i in range(5)]
    a, b = io.BytesIO(), io.BytesIO()
    ra, rb = SH.write_tar(a, samples), SH.write_tar(b, samples)
    assert a.getvalue() == b.getvalue() and ra == rb and ra[0] == 5 and ra[1] == len(a.getvalue())
    with tarfile.open(fileobj=io.BytesIO(a.getvalue())) as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
    got = list(SH.read_tar_samples(io.BytesIO(a.getvalue())))
    assert [k for k, _ in got] == [s[0] for s in samples]


def tarfile_reference(samples) -> bytes:
    """The same members written by the standard library's tarfile (PAX)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, ext, image, meta in samples:
            for name, data in ((f"{key}.{ext}", image), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("n,size", [(0, 0), (1, 0), (3, 511), (7, 512), (40, 2000), (3, 5_000_000)])
def test_write_tar_equals_tarfile_bytes(n, size):
    keys = ["a", "b" * 100, "c" * 250, "d\u00e9j\u00e0", SH.sample_key("n01/x.JPEG", 3)]
    samples = [(keys[i % len(keys)] + str(i), "png", bytes([i % 256]) * (size + i),
                SH.sample_json(f"k/{i}", i, [i], 0.25)) for i in range(n)]
    buf = io.BytesIO()
    count, written, digest = SH.write_tar(buf, samples)
    assert buf.getvalue() == tarfile_reference(samples)
    assert (count, written, digest) == (n, len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest())
    views = [(k, e, memoryview(bytearray(i)), m) for k, e, i, m in samples]
    other = io.BytesIO()
    SH.write_tar(other, views)
    assert other.getvalue() == buf.getvalue()


# -- end to end ---------------------------------------------------------------------------

def read_back(directory):
    """(source key, copy) -> (image bytes, json) read with webdataset, plus per-shard counts."""
    manifest = json.loads(open(os.path.join(directory, "manifest.json")).read())
    urls = [os.path.join(directory, s["name"]) for s in manifest["shards"]]
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        image = [v for k, v in s.items() if k in ("jpg", "png", "webp")]
        assert len(image) == 1
        assert (meta["key"], meta["copy"]) not in samples
        samples[(meta["key"], meta["copy"])] = (image[0], meta, s["__key__"])
    return manifest, samples


def test_shards_hold_every_copy_exactly(spark, resampled, tmp_path):
    source, sel_dir, _ = resampled
    out = str(tmp_path / "shards")
    m = W.run(spark, W.ShardJob(selection=sel_dir, index=source.index_path, output=out, samples_per_shard=300))
    selection = sio.read_parquet(os.path.join(sel_dir, "selection"))
    want = dict(zip(selection.column("key").to_pylist(), selection.column("copies").to_pylist()))
    manifest, samples = read_back(out)
    got = Counter(k for k, _ in samples)
    assert got == Counter(want)
    assert sorted(c for k, c in samples if k == next(iter(want))) == list(range(want[next(iter(want))]))
    # Image bytes unchanged from the index, json complete.
    index = sio.read_parquet(source.index_path)
    image_of = dict(zip(index.column("key").to_pylist(), index.column("image").to_pylist()))
    labels_of = dict(zip(index.column("key").to_pylist(), index.column("labels").to_pylist()))
    weight_of = dict(zip(selection.column("key").to_pylist(), selection.column("weight").to_pylist()))
    for (key, copy), (image, meta, wkey) in samples.items():
        assert image == image_of[key]
        assert meta["labels"] == labels_of[key] and meta["weight"] == weight_of[key]
        assert wkey == SH.sample_key(key, copy)
    # Shard sizes and names.
    sizes = [s["samples"] for s in manifest["shards"]]
    assert sizes[:-1] == [300] * (len(sizes) - 1) and 0 < sizes[-1] <= 300 and sum(sizes) == 2500
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(sizes))]
    assert sorted(os.listdir(out)) == sorted(["_STAGE", "_SUCCESS", "manifest.json"]
                                             + [s["name"] for s in manifest["shards"]])
    assert manifest["total_samples"] == 2500 and manifest["unique_examples"] == len(want)
    assert manifest["config"]["matcher"] == "same" and manifest["config"]["size"] == 2500
    assert set(manifest["inputs"]) >= {"selection", "index", "resample.weights"}
    realised = Counter(l for (k, _), (_, meta, _) in samples.items() for l in meta["labels"])
    assert {int(k): v for k, v in manifest["label_distribution"].items()} == dict(realised)
    assert m.total_samples == 2500
    # Plain tarfile agrees with webdataset.
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as tar:
        names = tar.getnames()
    assert len(names) == 600 and all(n.count(".") == 1 for n in names)
    assert V.verify(out).ok


def test_copies_are_spread_over_shards(spark, resampled, tmp_path):
    source, sel_dir, _ = resampled
    out = str(tmp_path / "shards")
    W.run(spark, W.ShardJob(selection=sel_dir, index=source.index_path, output=out, samples_per_shard=250))
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    shard_of = {}
    for s in manifest["shards"]:
        with tarfile.open(os.path.join(out, s["name"])) as tar:
            for name in tar.getnames():
                if name.endswith(".json"):
                    shard_of[name[:-5]] = s["name"]
    by_key: dict[str, set] = {}
    for k, shard in shard_of.items():
        by_key.setdefault(SH.parse_sample_key(k)[0], set()).add(shard)
    copies = Counter(SH.parse_sample_key(k)[0] for k in shard_of)
    many = [k for k, c in copies.items() if c >= 4]
    assert many, "the selection should repeat some examples"
    # With 10 shards, 4+ copies all landing in one shard has probability < 1e-3 each.
    assert sum(len(by_key[k]) == 1 for k in many) <= max(1, len(many) // 20)


def test_keys_with_dots_spaces_and_bad_images(spark, tmp_path):
    from adaptive_transfer.synthetic import encode_image
    px = np.full((16, 16, 3), 200, np.uint8)
    keys = ["a.b.c.jpg", "dir with space/x.y.JPEG", "plain", "bad/one.JPEG", "png/as.jpg", "also.bad"]
    images = [encode_image(px), encode_image(px), encode_image(px), b"garbage", encode_image(px, "PNG"), None]
    pq.write_table(pa.table({"key": keys, "labels": pa.array([[1]] * 6, LABELS),
                             "image": pa.array(images, pa.binary())}), tmp_path / "index.parquet")
    pq.write_table(pa.table({"key": keys + ["not/in/index"], "copies": pa.array([2, 1, 1, 1, 1, 1, 3], pa.int32()),
                             "weight": [1.0] * 7}), tmp_path / "selection.parquet")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"3 of 7 selected examples have a missing or unrecognisable image"):
        W.run(spark, W.ShardJob(selection=str(tmp_path / "selection.parquet"), index=str(tmp_path / "index.parquet"),
                                output=out, samples_per_shard=2))
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    m = W.run(spark, W.ShardJob(selection=str(tmp_path / "selection.parquet"), index=str(tmp_path / "index.parquet"),
                                output=out, samples_per_shard=2, max_bad_fraction=0.5))
    assert m.total_samples == 5 and m.unique_examples == 4
    assert {b["key"]: b["reason"] for b in m.bad_records} == {
        "not/in/index": "not in the source index", "bad/one.JPEG": "unrecognised image format",
        "also.bad": "no image bytes"}
    _, samples = read_back(out)
    assert Counter(k for k, _ in samples) == {"a.b.c.jpg": 2, "dir with space/x.y.JPEG": 1, "plain": 1,
                                               "png/as.jpg": 1}
    with tarfile.open(os.path.join(out, "shard-000000.tar")) as tar, \
            tarfile.open(os.path.join(out, "shard-000001.tar")) as tar2, \
            tarfile.open(os.path.join(out, "shard-000002.tar")) as tar3:
        names = tar.getnames() + tar2.getnames() + tar3.getnames()
    assert sum(n.endswith(".png") for n in names) == 1  # extension from the bytes, not the key
    assert V.verify(out).ok
    # The bad examples' places are compacted away: the shards equal those of a
    # selection that never had them.
    good = ["a.b.c.jpg", "dir with space/x.y.JPEG", "plain", "png/as.jpg"]
    pq.write_table(pa.table({"key": good, "copies": pa.array([2, 1, 1, 1], pa.int32()), "weight": [1.0] * 4}),
                   tmp_path / "good.parquet")
    clean = str(tmp_path / "clean")
    W.run(spark, W.ShardJob(selection=str(tmp_path / "good.parquet"), index=str(tmp_path / "index.parquet"),
                            output=clean, samples_per_shard=2))
    for name in sorted(f for f in os.listdir(out) if f.endswith(".tar")):
        assert sio.file_sha256(os.path.join(out, name)) == sio.file_sha256(os.path.join(clean, name))
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))


def test_hash_order_is_unsigned_then_key_then_copy():
    h = np.array([5, -1, 5, 2 ** 62, 5, -(2 ** 63)], np.int64)  # -1 and -2**63 are the largest unsigned
    keys = pa.array(["b", "a", "a", "z", "a", "y"])
    copies = np.array([0, 0, 1, 0, 0, 0])
    order = W.hash_order(h, keys, copies)
    assert order.tolist() == [4, 2, 0, 3, 5, 1]
    assert W.bucket_of(h, 1).tolist() == [0, 1, 0, 0, 0, 1]
    assert W.bucket_of(h, 0).tolist() == [0] * 6


def test_bucket_writers_give_each_writer_the_buckets_of_its_positions():
    # 6 buckets of 3, 0, 4, 1, 0, 5 copies: positions 0-2, -, 3-6, 7, -, 8-12.
    starts = W.bucket_starts(np.array([0, 2, 3, 5, 2]), np.array([3, 4, 1, 5, 0]), 3)
    assert starts.tolist() == [0, 3, 3, 7, 8, 8, 13, 13, 13]
    first, last = W.bucket_writers(starts, 4)  # writers of positions 0-3, 4-7, 8-11, 12
    # Written plainly: every (bucket, writer) whose position ranges meet.
    want = sorted((b, w) for b in range(8) for w in range(4)
                  if starts[b] < starts[b + 1] and starts[b] < (w + 1) * 4 and w * 4 < starts[b + 1])
    assert sorted((b, w) for b in range(8) for w in range(first[b], last[b] + 1)) == want
    assert W.writer_span(3, 4, 13) == (12, 13)
    assert W.shards_per_writer(100, 1000.0, 10, 50_000, 4) == 5  # 50 KB per writer: 5 shards of 10 KB
    assert W.shards_per_writer(100, 1000.0, 10, 10 ** 9, 4) == 25  # at least 4 writers


@pytest.mark.parametrize("gap", [0, 5])
def test_coalesced_reads_cover_each_range_once(gap):
    rng = np.random.default_rng(3)
    files = rng.integers(0, 3, 200)
    starts = rng.integers(0, 2000, 200)
    ends = starts + rng.integers(1, 20, 200)
    rf, rs, re_, of = W.coalesce_ranges(files, starts, ends, gap)
    for i in range(200):  # each range lies inside its read, of its file
        assert rf[of[i]] == files[i] and rs[of[i]] <= starts[i] and ends[i] <= re_[of[i]]
    for f in range(3):  # reads of a file are apart by more than the gap, and each holds a range
        mine = np.flatnonzero(rf == f)
        assert np.all(rs[mine][1:] > re_[mine][:-1] + gap)
    assert set(of.tolist()) == set(range(len(rf)))


def test_spill_ranges_read_back_exactly(tmp_path):
    spill = W.SpillWriter(str(tmp_path / "spill"), "t", file_bytes=100)
    images = [bytes([i]) * (10 + i) for i in range(30)]
    where = [spill.append(images[a:a + 4]) for a in range(0, 30, 4)]
    spill.close()
    assert len(spill.paths) > 2 and spill.written == sum(map(len, images))
    paths = sorted(set(p for p, _ in where))
    files = np.concatenate([[paths.index(p)] * len(o) for p, o in where])
    offsets = np.concatenate([o for _, o in where])
    lengths = np.array([len(x) for x in images])
    pick = np.array([29, 3, 4, 5, 0, 17])
    views, reads, nbytes = W.read_ranges(paths, files[pick], offsets[pick], lengths[pick])
    assert [bytes(v) for v in views] == [images[i] for i in pick]
    assert reads == 4 and nbytes == lengths[pick].sum()  # 3, 4, 5 touch: one read


def test_reads_are_retried_when_transient_only():
    calls, waits = [], []

    def flaky(errors):
        def read():
            calls.append(1)
            if errors:
                raise errors.pop(0)
            return "ok"
        return read

    assert W.with_retries(flaky([ConnectionResetError("reset"), TimeoutError("slow")]), sleep=waits.append) == "ok"
    assert len(calls) == 3 and len(waits) == 2 and waits[1] > waits[0] > 0
    with pytest.raises(FileNotFoundError):
        W.with_retries(flaky([FileNotFoundError("gone")]), sleep=waits.append)
    with pytest.raises(OSError, match="still down"):
        W.with_retries(flaky([OSError("down")] * 3 + [OSError("still down")]), sleep=waits.append)
    assert len(waits) == 5  # 2, then none, then 3 (4 attempts in all)


def test_bucket_bits():
    assert W.bucket_bits(30000, 1000) == 6  # 60 buckets wanted: 64
    assert W.bucket_bits(1, 1000) == 0 and W.bucket_bits(0, 10) == 0
    assert W.bucket_bits(10 ** 12, 1) == W.MAX_BUCKET_BITS


def test_fetch_tasks_take_contiguous_files_one_group_per_partition(spark):
    from pyspark.sql import functions as F
    values = [0, 1, -1, 7, 2 ** 31 - 1, -(2 ** 31), 123456789]
    got = spark.createDataFrame([(v,) for v in values], "v int").select(F.hash("v").alias("h")).collect()
    assert [r["h"] for r in got] == [W.spark_hash_int(v) for v in values]
    for n in (1, 3, 8):
        keys = W.partition_keys(n)
        rows = (spark.createDataFrame([(k,) for k in keys], "k int").repartition(n, "k")
                .select("k", F.spark_partition_id().alias("p")).collect())
        assert {r["k"]: r["p"] for r in rows} == {k: p for p, k in enumerate(keys)}
    assert W.contiguous_groups(10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert W.contiguous_groups(2, 4).tolist() == [0, 2]
    from spark_jobs.write_shards import passes
    assert passes.spark_file_path("file:///tmp/a%20b.parquet") == "file:/tmp/a%20b.parquet"
    assert passes.spark_file_path("s3a://bucket/x.parquet") == "s3a://bucket/x.parquet"


def test_rerun_and_incomplete_output(spark, resampled, tmp_path, capsys):
    source, sel_dir, _ = resampled
    out = str(tmp_path / "shards")
    job = W.ShardJob(selection=os.path.join(sel_dir, "selection"), index=source.index_path, output=out,
                     samples_per_shard=1000)
    first = W.run(spark, job)
    listing = ["_STAGE", "_SUCCESS", "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(os.listdir(out)) == listing
    capsys.readouterr()
    assert W.run(spark, job) == first  # complete: no work, and the job says so
    assert f"write_shards: {out} is complete (_SUCCESS); nothing to do" in capsys.readouterr().err
    # A run killed mid-build left its temporary beside the output: the next run removes it.
    stale = tmp_path / ".shards.tmp-killed"
    (stale / "_temporary").mkdir(parents=True)
    (stale / "_temporary" / "shard-000000.tar.junk").write_bytes(b"partial")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (stale / "_STAGE").write_text(json.dumps({"stage": "write_shards", "host": os.uname().nodename,
                                              "pid": int(dead)}))
    W.run(spark, dataclasses.replace(job, overwrite=True))
    assert sorted(os.listdir(out)) == listing and not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["shards"]
    assert V.verify(out).ok
    # A file the job did not write, added to its finished output, is never cleared.
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    with pytest.raises(ValueError, match=r"holds notes.txt, which write_shards did not write"):
        W.run(spark, dataclasses.replace(job, overwrite=True))
    assert open(os.path.join(out, "notes.txt")).read() == "mine" and V.verify(out).ok


def test_reuse_follows_the_fingerprint(spark, resampled, tmp_path, capsys):
    from schemas.fingerprint import code_digest
    from schemas.stage_output import fingerprint_of

    source, sel_dir, _ = resampled
    out = str(tmp_path / "shards")
    job = W.ShardJob(selection=sel_dir, index=source.index_path, output=out, samples_per_shard=1000)
    first = W.run(spark, job)
    marker = open(os.path.join(out, "_STAGE")).read()
    # Performance knobs leave the shards byte-identical: the finished result is reused, untouched.
    faster = dataclasses.replace(job, fetch_tasks=1, read_bytes=1 << 20, run_bytes=1 << 20, writer_bytes=1 << 20,
                                 spill_dir=str(tmp_path / "spill"))
    fingerprint = job.fingerprint()
    assert faster.fingerprint() == fingerprint and fingerprint["code"] == code_digest("spark_jobs.write_shards")
    recorded = fingerprint_of(sel_dir)
    assert fingerprint["selection"] == ({"resample": recorded["digest"]} if recorded else
                                        {"listing": sio.listing_fingerprint(os.path.join(sel_dir, "selection"))})
    capsys.readouterr()
    assert W.run(spark, faster) == first and open(os.path.join(out, "_STAGE")).read() == marker
    assert f"write_shards: {out} is complete (_SUCCESS); nothing to do" in capsys.readouterr().err
    # What shapes the shards, or decides whether they are made: refused, naming it; nothing is touched.
    before = {f: sio.file_sha256(os.path.join(out, f)) for f in os.listdir(out)}
    for change, named in ((dict(samples_per_shard=900), "samples_per_shard"), (dict(seed=3), "seed"),
                          (dict(prefix="train"), "prefix"), (dict(max_side=16), "max_side, quality"),
                          (dict(decode_check=True), "decode_check"), (dict(max_bad_fraction=0.5), "max_bad_fraction"),
                          (dict(allow_uri_prefixes=[str(tmp_path)]), "allowed_uri_prefixes")):
        with pytest.raises(ValueError, match=f"made from other {named}; nothing there is deleted"):
            W.run(spark, dataclasses.replace(job, **change))
    assert {f: sio.file_sha256(os.path.join(out, f)) for f in os.listdir(out)} == before
    # The resampler's recorded fingerprint, where it has one, stands for the selection.
    copy = tmp_path / "resampled"
    shutil.copytree(sel_dir, copy)
    stage = json.load(open(copy / "_STAGE"))
    stage["fingerprint"] = {"digest": "d" * 64, "settings": {}}
    (copy / "_STAGE").write_text(json.dumps(stage))
    assert dataclasses.replace(job, selection=str(copy)).fingerprint()["selection"] == {"resample": "d" * 64}
    # --overwrite rebuilds from the new settings, and a rerun of those reuses it.
    rebuilt = W.run(spark, dataclasses.replace(job, samples_per_shard=900, overwrite=True))
    assert rebuilt.extra["samples_per_shard"] == 900 and len(rebuilt.shards) == math.ceil(rebuilt.total_samples / 900)
    assert W.run(spark, dataclasses.replace(job, samples_per_shard=900)) == rebuilt


@pytest.mark.slow
def test_byte_identical_across_parallelism_and_task_failures(resampled, tmp_path):
    source, sel_dir, _ = resampled
    # One task at a time, against three at a time with every first attempt of
    # the fetch and write tasks failing (after writing its spill for a fetch
    # task, mid-write for the shards), and the spill in a --spill-dir of its
    # own in files of ~100 KB (so each fetch task writes many); then two at a
    # time with 1 fetch task, every writer's first attempt failing once its
    # first shard is written and its images released: the retry keeps that
    # shard and never reads a released image.
    runs = {"local[1]": ({}, []), "local[3,4]": ({"ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT": "spill,write"}, []),
            "local[2,4]": ({"ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT": "released"}, ["--fetch-tasks", "1"])}
    digests = {}
    spill = tmp_path / "spill"
    for master, (env, more) in runs.items():
        out = str(tmp_path / master.replace("[", "_").replace("]", "").replace(",", "_"))
        extra = ["--run-bytes", "100K"] + (["--spill-dir", str(spill)] if env else [])
        proc = run_module("spark_jobs.write_shards", "--selection", sel_dir, "--index", source.index_path,
                          "--output", out, "--samples-per-shard", "400", "--master", master,
                          "--driver-memory", "1g", *extra, *more, env=env)
        for stage in env.get("ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT", "").split(","):
            assert not stage or f"injected failure in stage '{stage}'" in proc.stderr
        if env:
            assert os.listdir(spill) == []  # this job's spill, failed attempts' included, is gone
        tasks = json.load(open(os.path.join(out, "manifest.json")))["extra"]["tasks"]
        assert tasks["fetch"] == (1 if more else 2)  # at most one per index file
        # A writer reads its own images and nothing else: less than it writes (tar headers, json).
        assert 0 < tasks["writer_read_per_written_max"] < 1.0
        spilled = json.load(open(os.path.join(out, "manifest.json")))["extra"]["spill"]
        assert spilled["released_while_writing"] > 0  # local mode: images whose copies are all written
        assert (spilled["shards_reused_by_retries"] > 0) == (master == "local[2,4]")
        files = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
        assert sorted(os.listdir(out)) == sorted(files + ["_STAGE", "_SUCCESS", "manifest.json"])  # no partial file
        digests[master] = {f: sio.file_sha256(os.path.join(out, f)) for f in files}
        assert run_module("spark_jobs.verify", out).returncode == 0
    assert digests["local[1]"] == digests["local[3,4]"] == digests["local[2,4]"]


def test_shards_do_not_depend_on_buckets_or_fetch_tasks(spark, resampled, tmp_path, monkeypatch):
    # Buckets (from an estimate of the copies) and the grouping of files into
    # fetch tasks only decide how the work is cut, never where a copy goes.
    source, sel_dir, _ = resampled
    digests = []
    from spark_jobs.write_shards import passes, placement

    # Nor does the join: the small index broadcast (the default here) or both sides shuffled.
    for buckets_per_shard, tasks_per_core, writer_bytes, broadcast in ((2, 2, 1 << 30, 1 << 20), (64, 1, 1, 0),
                                                                       (1, 5, 600_000, 1 << 20)):
        monkeypatch.setattr(placement, "BUCKETS_PER_SHARD", buckets_per_shard)
        monkeypatch.setattr(passes, "FETCH_TASKS_PER_CORE", tasks_per_core)
        monkeypatch.setattr(passes, "BROADCAST_INDEX_ROWS", broadcast)
        # Spark would broadcast so small a side by itself: off, so that the shuffled join runs.
        spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "10485760" if broadcast else "-1")
        out = str(tmp_path / f"b{buckets_per_shard}")
        W.run(spark, W.ShardJob(selection=sel_dir, index=source.index_path, output=out, samples_per_shard=300,
                                writer_bytes=writer_bytes))
        digests.append({f: sio.file_sha256(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".tar")})
    spark.conf.unset("spark.sql.autoBroadcastJoinThreshold")
    assert len(digests[0]) > 1 and digests[0] == digests[1] == digests[2]


def test_verify_names_the_damaged_shard(spark, resampled, tmp_path):
    source, sel_dir, _ = resampled
    out = str(tmp_path / "shards")
    W.run(spark, W.ShardJob(selection=sel_dir, index=source.index_path, output=out, samples_per_shard=900))
    assert V.main([out]) == 0
    good = str(tmp_path / "good")
    shutil.copytree(out, good)
    # Flip one byte inside shard 1.
    path = os.path.join(out, "shard-000001.tar")
    data = bytearray(open(path, "rb").read())
    data[2000] ^= 0xFF
    open(path, "wb").write(bytes(data))
    report = V.verify(out)
    assert not report.ok and all("shard-000001.tar" in p for p in report.problems)
    proc = run_module("spark_jobs.verify", out, check=False)
    assert proc.returncode == 1 and "shard-000001.tar: sha256 mismatch" in proc.stderr
    # A missing shard, a missing _SUCCESS, a truncated shard.
    os.remove(os.path.join(good, "shard-000002.tar"))
    assert "shard-000002.tar: missing" in V.verify(good).problems
    os.remove(os.path.join(good, "_SUCCESS"))
    assert any("no _SUCCESS" in p for p in V.verify(good).problems)
    t = os.path.join(good, "shard-000000.tar")
    open(t, "r+b").truncate(5000)
    assert any(p.startswith("shard-000000.tar") for p in V.verify(good).problems)


def test_unfinished_resampler_output_is_refused(spark, resampled, tmp_path):
    source, sel_dir, _ = resampled
    copy = tmp_path / "unfinished"
    shutil.copytree(sel_dir, copy)
    os.remove(copy / "_SUCCESS")
    with pytest.raises(FileNotFoundError, match="no _SUCCESS; the resampler did not finish"):
        W.run(spark, W.ShardJob(selection=str(copy), index=source.index_path, output=str(tmp_path / "o")))


def test_bad_selection_inputs(spark, source_data, tmp_path):
    from adaptive_transfer.synthetic import encode_image
    pq.write_table(pa.table({"key": ["a", "a"], "copies": pa.array([1, 2], pa.int32())}), tmp_path / "dup.parquet")
    with pytest.raises(SchemaError, match="1 keys appear in more than one row"):
        W.run(spark, W.ShardJob(selection=str(tmp_path / "dup.parquet"), index=source_data.index_path,
                                output=str(tmp_path / "o1")))
    # ... also when the index holds the key (found where its copies meet).
    present = pq.read_table(source_data.index_path, columns=["key"]).column("key")[5].as_py()
    pq.write_table(pa.table({"key": [present, "b", present], "copies": pa.array([2, 1, 1], pa.int32())}),
                   tmp_path / "dup2.parquet")
    with pytest.raises(SchemaError, match=r"1 keys appear in more than one row \(first: \['"):
        W.run(spark, W.ShardJob(selection=str(tmp_path / "dup2.parquet"), index=source_data.index_path,
                                output=str(tmp_path / "o1b")))
    pq.write_table(pa.table({"key": ["a"], "copies": pa.array([0], pa.int32())}), tmp_path / "zero.parquet")
    with pytest.raises(SchemaError, match=r"copies must be > 0 \(found 0\)"):
        W.run(spark, W.ShardJob(selection=str(tmp_path / "zero.parquet"), index=source_data.index_path,
                                output=str(tmp_path / "o2")))
    with pytest.raises(ValueError, match="--samples-per-shard must be >= 1"):
        W.ShardJob(selection="x", index="y", output="z", samples_per_shard=0)
    # A selected key that the index holds twice would give invented samples.
    px = encode_image(np.full((8, 8, 3), 9, np.uint8))
    pq.write_table(pa.table({"key": ["k/1", "k/2", "k/1"], "labels": pa.array([[1]] * 3, LABELS),
                             "image": pa.array([px] * 3, pa.binary())}), tmp_path / "dup-index.parquet")
    pq.write_table(pa.table({"key": ["k/1", "k/2"], "copies": pa.array([1, 1], pa.int32())}),
                   tmp_path / "sel.parquet")
    with pytest.raises(SchemaError, match="key 'k/1' appears more than once in the source index"):
        W.run(spark, W.ShardJob(selection=str(tmp_path / "sel.parquet"), index=str(tmp_path / "dup-index.parquet"),
                                output=str(tmp_path / "o3")))


def _truncated_index(tmp_path):
    """20 JPEGs of which 5 are cut to 40 bytes, one whose header says height 0
    (whole in structure, but it does not decode), and a PNG and a WebP cut short."""
    from PIL import Image
    from adaptive_transfer.synthetic import encode_image

    keys, images = [], []
    for i in range(20):
        data = encode_image(np.full((16, 16, 3), 10 * i, np.uint8))
        keys.append(f"jpg/{i}")
        images.append(data[:40] if i % 4 == 0 else data)
    sof = images[1].index(b"\xff\xc0")
    keys.append("jpg/zero-height")
    images.append(images[1][:sof + 5] + b"\x00\x00" + images[1][sof + 7:])
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(buf, fmt)
        keys.append(f"cut/{fmt}")
        images.append(buf.getvalue()[:-5])
    pq.write_table(pa.table({"key": keys, "labels": pa.array([[1]] * len(keys), LABELS),
                             "image": pa.array(images, pa.binary())}), tmp_path / "index.parquet")
    pq.write_table(pa.table({"key": keys, "copies": pa.array([2] * len(keys), pa.int32()),
                             "weight": [1.0] * len(keys)}), tmp_path / "selection.parquet")
    return str(tmp_path / "selection.parquet"), str(tmp_path / "index.parquet")


def test_truncated_images_are_bad_records_and_verify_decode_finds_the_rest(spark, tmp_path, capsys):
    selection, index = _truncated_index(tmp_path)
    out = str(tmp_path / "out")
    m = W.run(spark, W.ShardJob(selection=selection, index=index, output=out, samples_per_shard=7,
                                max_bad_fraction=0.5))
    reasons = {b["key"]: b["reason"] for b in m.bad_records}
    assert reasons == {**{f"jpg/{i}": "truncated JPEG (a header segment runs past the end)" for i in (0, 4, 8, 12, 16)},
                       "cut/PNG": "truncated PNG (no IEND chunk)",
                       "cut/WEBP": "truncated WebP (RIFF size 44 > 39 bytes)"}
    assert m.total_samples == 2 * 16 and m.extra["image_check"] == "structure"
    # The header that says height 0 is whole in structure: only a decode finds it.
    assert V.main([out, "--workers", "3"]) == 0
    capsys.readouterr()
    assert V.main([out, "--decode", "--workers", "3"]) == 1
    err = capsys.readouterr().err
    assert "sample 'jpg%2Fzero-height_c0' .jpg: does not decode: cannot identify image file" in err
    assert "verify: 5/5 shards, 32 samples" in err  # the last progress line
    report = V.verify(out, decode=True, workers=1)
    assert len(report.problems) == 2 and report.samples == 32
    # --decode-check in the writer: a bad record too, and then verify --decode passes.
    decoded = str(tmp_path / "decoded")
    m2 = W.run(spark, W.ShardJob(selection=selection, index=index, output=decoded, samples_per_shard=7,
                                 max_bad_fraction=0.5, decode_check=True))
    assert {b["key"]: b["reason"] for b in m2.bad_records}["jpg/zero-height"] == (
        "does not decode: cannot identify image file")
    assert m2.total_samples == 2 * 15 and V.main([decoded, "--decode", "--quiet"]) == 0


# -- object storage -------------------------------------------------------------------------

def test_uri_images_and_shards_on_object_storage(spark, tmp_path, s3_server):
    from adaptive_transfer.synthetic import encode_image
    fs = s3_server
    keys, uris = [], []
    for i in range(12):
        data = encode_image(np.full((8, 8, 3), i * 20, np.uint8), "PNG" if i % 3 == 0 else "JPEG")
        fs.pipe(f"bucket/images/{i}.img", data)
        keys.append(f"s3img/{i}.JPEG")
        uris.append(f"s3://bucket/images/{i}.img")
    pq.write_table(pa.table({"key": keys, "labels": pa.array([[i % 4] for i in range(12)], LABELS), "uri": uris}),
                   tmp_path / "index.parquet")
    pq.write_table(pa.table({"key": keys, "copies": pa.array([1 + i % 2 for i in range(12)], pa.int32()),
                             "weight": [1.0] * 12}), tmp_path / "selection.parquet")
    out = "s3://bucket/shards/run1"
    m = W.run(spark, W.ShardJob(selection=str(tmp_path / "selection.parquet"), index=str(tmp_path / "index.parquet"),
                                output=out, samples_per_shard=5, allow_uri_prefixes=["s3://bucket/images/"]))
    assert m.total_samples == 18 and len(m.shards) == 4
    assert m.extra["allowed_uri_prefixes"] == ["s3://bucket/images/"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("bucket/shards/run1")) == [
        "_STAGE", "_SUCCESS", "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    report = V.verify(out)
    assert report.ok, report.problems
    assert report.samples == 18
    # Every copy of image i is in the shards with the extension of its bytes (PNG for i % 3 == 0,
    # JPEG otherwise; the key's ".JPEG" does not count), and its bytes unchanged.
    exts, image_bytes = {}, {}
    for shard in range(4):
        with fs.open(f"bucket/shards/run1/shard-{shard:06d}.tar", "rb") as fh:
            tar = tarfile.open(fileobj=io.BytesIO(fh.read()))
            members = {mem.name: tar.extractfile(mem).read() for mem in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                stem = name[:-len(".json")]
                (image_name,) = [n for n in members if n != name and n.rsplit(".", 1)[0] == stem]
                sample = (meta["key"], meta["copy"])
                assert sample not in exts
                exts[sample] = image_name.rsplit(".", 1)[1]
                image_bytes[sample] = members[image_name]
    assert exts == {(f"s3img/{i}.JPEG", c): "png" if i % 3 == 0 else "jpg"
                    for i in range(12) for c in range(1 + i % 2)}
    uri_of = dict(zip(keys, uris))
    assert all(data == fs.cat(uri_of[key]) for (key, _), data in image_bytes.items())


# -- --max-side: images re-encoded in the fetch pass --------------------------------------------------

def _sized_image(width: int, height: int, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8))
    out = io.BytesIO()
    img.resize((width, height)).convert(mode).save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def sized_index(tmp_path_factory):
    """60 examples of many sizes around --max-side 64 (JPEG, grayscale JPEG,
    PNG), 1 to 3 copies each, in 3 index files, plus a truncated large JPEG
    and bytes that only look like a JPEG."""
    root = tmp_path_factory.mktemp("sized")
    (root / "index").mkdir()
    rng = np.random.default_rng(7)
    keys, images = [], []
    for i in range(60):
        w, h = int(rng.integers(20, 130)), int(rng.integers(20, 130))
        fmt, mode = [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB")][i % 3]
        keys.append(f"n{i:03d}/img.{fmt.lower()}")
        images.append(_sized_image(w, h, i, fmt, mode))
    keys += ["bad/truncated.JPEG", "bad/garbage.JPEG"]
    images += [_sized_image(200, 100, 99)[:400], b"\xff\xd8\xff only looks like a JPEG" * 3]
    for part in range(3):
        table = pa.table({"key": keys[part::3], "labels": pa.array([[1 + part]] * len(keys[part::3]), LABELS),
                          "image": pa.array(images[part::3], pa.binary())})
        pq.write_table(table, root / "index" / f"part-{part}.parquet")
    copies = [1 + i % 3 for i in range(len(keys))]
    pq.write_table(pa.table({"key": keys, "copies": pa.array(copies, pa.int32()), "weight": [1.0] * len(keys)}),
                   root / "selection.parquet")
    return root, dict(zip(keys, images)), dict(zip(keys, copies))


def test_max_side_reencodes_only_larger_images_and_reports_bad_ones(spark, sized_index, tmp_path):
    from PIL import Image

    root, image_of, copies_of = sized_index
    out = str(tmp_path / "shards")
    m = W.run(spark, W.ShardJob(selection=str(root / "selection.parquet"), index=str(root / "index"), output=out,
                                samples_per_shard=20, max_side=64, quality=85, max_bad_fraction=0.1))
    reasons = {b["key"]: b["reason"] for b in m.bad_records}
    assert set(reasons) == {"bad/truncated.JPEG", "bad/garbage.JPEG"}
    assert reasons["bad/truncated.JPEG"].startswith("cannot be re-encoded for --max-side 64: OSError")
    assert reasons["bad/garbage.JPEG"] == ("cannot be re-encoded for --max-side 64: UnidentifiedImageError: "
                                           "cannot identify image file")
    _, samples = read_back(out)
    assert Counter(k for k, _ in samples) == {k: c for k, c in copies_of.items() if not k.startswith("bad/")}
    larger = set()
    for (key, _), (data, _, _) in samples.items():
        source = Image.open(io.BytesIO(image_of[key]))
        if max(source.size) <= 64:
            assert data == image_of[key]  # byte for byte
            continue
        larger.add(key)
        img = Image.open(io.BytesIO(data))
        longer = max(source.size)
        assert img.format == "JPEG" and max(img.size) == 64 and not {"exif", "icc_profile"} & set(img.info)
        assert img.size == tuple(max(1, math.floor(Fraction(v * 64, longer) + Fraction(1, 2))) for v in source.size)
        assert data == reencode.reencode_image(image_of[key], 64, 85)
    assert len(larger) > 10 and len(larger) < 60
    extra = m.extra["reencoded"]
    assert m.extra["max_side"] == 64 and extra["quality"] == 85 and extra["images"] == len(larger)
    assert extra["bytes_before"] == sum(len(image_of[k]) for k in larger)
    assert extra["bytes_after"] == sum(len(reencode.reencode_image(image_of[k], 64, 85)) for k in larger)
    assert V.verify(out).ok
    # Without --max-side nothing is re-encoded, and each image's structure is checked.
    plain = W.run(spark, W.ShardJob(selection=str(root / "selection.parquet"), index=str(root / "index"),
                                    output=str(tmp_path / "plain"), samples_per_shard=20, max_bad_fraction=0.1))
    assert {b["key"]: b["reason"] for b in plain.bad_records} == {
        "bad/truncated.JPEG": "truncated JPEG (a header segment runs past the end)",
        "bad/garbage.JPEG": "truncated JPEG (a header segment runs past the end)"}
    assert plain.extra["reencoded"] is None and plain.extra["max_side"] is None


@pytest.mark.slow
def test_max_side_shards_are_byte_identical_across_parallelism_and_task_failures(spark, sized_index, tmp_path):
    root, _, _ = sized_index
    args = ["--selection", str(root / "selection.parquet"), "--index", str(root / "index"), "--samples-per-shard", "15",
            "--max-side", "64", "--quality", "85", "--max-bad-fraction", "0.1"]
    W.run(spark, W.ShardJob(selection=str(root / "selection.parquet"), index=str(root / "index"),
                            output=str(tmp_path / "a"), samples_per_shard=15, max_side=64, quality=85,
                            max_bad_fraction=0.1))
    # Three at a time, every first attempt of the fetch and write tasks failing, runs of ~10 KB.
    proc = run_module("spark_jobs.write_shards", *args, "--output", str(tmp_path / "b"), "--master", "local[3,4]",
                      "--driver-memory", "1g", "--run-bytes", "10K",
                      env={"ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT": "spill,write"})
    assert "injected failure in stage 'spill'" in proc.stderr and "injected failure in stage 'write'" in proc.stderr
    digests = []
    for out in ("a", "b"):
        names = sorted(f for f in os.listdir(tmp_path / out) if f.endswith(".tar"))
        digests.append({f: sio.file_sha256(str(tmp_path / out / f)) for f in names})
    assert len(digests[0]) > 3 and digests[0] == digests[1]
    a, b = (json.load(open(tmp_path / out / "manifest.json")) for out in ("a", "b"))
    assert a["extra"]["reencoded"] == b["extra"]["reencoded"] and a["bad_records"] == b["bad_records"]


def test_max_side_options_are_checked(tmp_path):
    job = dict(selection="s", index=str(tmp_path), output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--quality .* give --max-side too"):
        W.ShardJob(**job, quality=80)
    with pytest.raises(ValueError, match="--max-side must be >= 1"):
        W.ShardJob(**job, max_side=0)
    with pytest.raises(ValueError, match=r"--quality must be in 1..100"):
        W.ShardJob(**job, max_side=10, quality=101)
    assert W.ShardJob(**job, max_side=10).reencode == (10, reencode.REENCODE_QUALITY)
