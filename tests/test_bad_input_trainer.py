"""Bad input to the trainer and the shard verifier, through their CLIs:

* a training stream whose samples all fail to decode fails (exit 1, naming
  the shards) after ``--max-consecutive-corrupt`` bad samples in a row,
  instead of skipping them forever (a hang);
* a manifest whose shard name is a path (``../x.tar``, ``/abs.tar``,
  ``a/b.tar``, ...) is refused, naming the file and the shard, before any
  shard is opened.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas import VOCABULARY_SCHEMA, Manifest, ResampleConfig, SchemaError, ShardInfo
from adaptive_transfer.synthetic import encode_image
from spark_jobs import verify as V
from schemas.shard_format import sample_json, sample_key, shard_name, write_tar
from tests.helpers import run_module
from trainer import runtime as RT
from trainer.data import MAX_CONSECUTIVE_CORRUPT, LoaderConfig, ShardStream, collate, shard_urls
from trainer.transforms import PreprocessSpec

GOOD = encode_image(np.full((8, 8, 3), 120, np.uint8))
GARBAGE = b"\xff\xd8\xff this is not a JPEG " * 4


def _samples(n: int, start: int, bad) -> list[tuple[str, str, bytes, bytes]]:
    """``n`` samples keyed ``k<start>..``; ``bad(i)`` says which hold garbage image bytes
    (their ``.json`` is always valid)."""
    return [(sample_key(f"k{i}", 0), "jpg", GARBAGE if bad(i) else GOOD, sample_json(f"k{i}", 0, [1], 1.0))
            for i in range(start, start + n)]


def _write_shard(path: str, samples) -> ShardInfo:
    buf = io.BytesIO()
    n, size, sha = write_tar(buf, samples)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())
    assert hashlib.sha256(buf.getvalue()).hexdigest() == sha and len(buf.getvalue()) == size
    return ShardInfo(os.path.basename(path), n, size, sha)


def _manifest_dict(shards: list[dict], total: int) -> dict:
    return {"format_version": 1, "config": ResampleConfig(target="t", size=max(1, total)).to_dict(),
            "inputs": {}, "shards": shards, "total_samples": total, "unique_examples": total,
            "label_distribution": {"1": total}, "bad_records": [], "extra": {"prefix": "shard"}}


def _write_dir(directory, shards: list[dict], total: int) -> str:
    """manifest.json (as given, unchecked) and _SUCCESS in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "manifest.json")
    with open(path, "w") as fh:
        json.dump(_manifest_dict(shards, total), fh)
    open(os.path.join(directory, "_SUCCESS"), "w").close()
    return path


def _shard_dir(directory, n_shards: int, per_shard: int, bad) -> str:
    """A finished shard folder written like write_shards' output; returns the manifest path."""
    os.makedirs(directory, exist_ok=True)
    infos = [_write_shard(os.path.join(directory, shard_name("shard", s)), _samples(per_shard, s * per_shard, bad))
             for s in range(n_shards)]
    return _write_dir(directory, [vars(i) for i in infos], n_shards * per_shard)


def _labels(path) -> str:
    table = pa.table({"label_id": pa.array([0, 1], pa.int32()), "name": ["a", "b"],
                      "parent_id": pa.array([None, None], pa.int32())}, schema=VOCABULARY_SCHEMA)
    pq.write_table(table, str(path))
    return str(path)


def _pretrain_args(manifest: str, labels: str, out, *extra: str) -> list[str]:
    return ["--shards", manifest, "--labels", labels, "--arch", "small", "--steps", "3", "--batch-size", "4",
            "--lr", "0.05", "--input-size", "16", "--shuffle-buffer", "4", "--output", str(out), *extra]


# -- the stream ------------------------------------------------------------------------------------

def _take(stream, n):
    out = []
    for item in stream:
        out.append(item)
        if len(out) == n:
            break
    return out


def test_a_few_bad_samples_among_good_ones_are_counted_and_skipped(tmp_path):
    bad = {1, 2, 5, 6, 8}  # runs of at most 2 bad samples in a row
    manifest = _shard_dir(tmp_path / "shards", 1, 12, lambda i: i in bad)
    stream = ShardStream(LoaderConfig(shard_urls(manifest), PreprocessSpec(8), shuffle_buffer=1,
                                      max_consecutive_corrupt=3))
    got = _take(stream, 7)
    assert [g[3] for g in got] == [1, 4, 5, 8, 10, 11, 12]  # next raw positions: the bad ones were skipped
    assert [g[4] for g in got] == [0, 2, 0, 2, 1, 0, 0]  # corrupt samples skipped just before each
    assert sum(g[4] for g in got) == len(bad)


def test_as_many_bad_samples_in_a_row_as_the_limit_raise_naming_the_shard(tmp_path):
    manifest = _shard_dir(tmp_path / "shards", 1, 12, lambda i: 3 <= i < 6)
    url = shard_urls(manifest)[0]
    stream = ShardStream(LoaderConfig([url], PreprocessSpec(8), shuffle_buffer=1, max_consecutive_corrupt=3))
    with pytest.raises(ValueError, match=r"^3 consecutive samples could not be decoded") as e:
        _take(stream, 12)
    assert f"{url} (3)" in str(e.value) and "--max-consecutive-corrupt 3" in str(e.value)
    # one fewer bad in a row is fine
    assert len(_take(ShardStream(LoaderConfig([url], PreprocessSpec(8), shuffle_buffer=1, max_consecutive_corrupt=4)),
                     9)) == 9


def test_max_consecutive_corrupt_default_and_range():
    assert LoaderConfig(["a.tar"], PreprocessSpec(8)).max_consecutive_corrupt == MAX_CONSECUTIVE_CORRUPT == 1000
    for value in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_consecutive_corrupt must be an integer >= 1"):
            LoaderConfig(["a.tar"], PreprocessSpec(8), max_consecutive_corrupt=value)


def test_cli_main_prints_the_original_message_of_an_error_in_a_loader_worker(tmp_path, capsys):
    manifest = _shard_dir(tmp_path / "shards", 2, 10, lambda i: True)
    urls = shard_urls(manifest)
    stream = ShardStream(LoaderConfig(urls, PreprocessSpec(8), shuffle_buffer=2, max_consecutive_corrupt=4))

    def run(args):
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=1, collate_fn=collate)
        return next(iter(loader))

    assert RT.cli_main("prog", argparse.ArgumentParser(), run, lambda r, a: "ok", []) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("prog: error: 4 consecutive samples could not be decoded")
    assert "Traceback" not in err and "Caught" not in err
    assert err.rstrip().endswith("(in DataLoader worker process 0)")
    assert any(u in err for u in urls)

    def schema_error_in_worker(args):
        class Bad(torch.utils.data.IterableDataset):
            def __iter__(self):
                raise SchemaError("two\nlines", file="f.json")
        return next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1)))

    assert RT.cli_main("prog", argparse.ArgumentParser(), schema_error_in_worker, lambda r, a: "ok", []) == 1
    assert capsys.readouterr().err == "prog: error: f.json: two lines (in DataLoader worker process 0)\n"

    def plain(args):
        raise ValueError("plain message")

    assert RT.cli_main("prog", argparse.ArgumentParser(), plain, lambda r, a: "ok", []) == 1
    assert capsys.readouterr().err == "prog: error: plain message\n"


def test_pretrain_on_shards_whose_samples_all_fail_to_decode_exits_1_naming_them(tmp_path):
    manifest = _shard_dir(tmp_path / "shards", 2, 16, lambda i: True)
    urls = shard_urls(manifest)
    # A hang (the bug this guards) ends in run_module's timeout; no wall time is asserted.
    proc = run_module("trainer.pretrain", *_pretrain_args(manifest, _labels(tmp_path / "labels.parquet"),
                                                          tmp_path / "out", "--num-workers", "2",
                                                          "--max-consecutive-corrupt", "5"),
                      check=False, timeout=400)
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert "5 consecutive samples could not be decoded" in errors[0]
    assert any(u in errors[0] for u in urls), errors[0]
    assert "Original Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


# -- shard names in the manifest --------------------------------------------------------------------

BAD_NAMES = ["../x.tar", "/abs/x.tar", "a/b.tar", "a\\b.tar", "", ".", "..", ".hidden.tar", "x\0.tar"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_manifest_refuses_a_shard_name_that_is_not_a_plain_file_name(name):
    good = vars(ShardInfo("shard-000000.tar", 1, 10, "a" * 64))
    text = json.dumps(_manifest_dict([good, {**good, "name": name}], 2))
    with pytest.raises(SchemaError) as e:
        Manifest.from_json(text, "d/manifest.json")
    assert str(e.value).startswith("d/manifest.json: shard 1: shard name ") and repr(name) in str(e.value)
    with pytest.raises(ValueError, match="shard name"):
        ShardInfo(name, 1, 10, "a" * 64)


def test_manifest_refuses_non_string_names_and_a_non_list():
    good = vars(ShardInfo("shard-000000.tar", 1, 10, "a" * 64))
    with pytest.raises(SchemaError, match=r"m.json: shard 0: shard name 7 is not a file name"):
        Manifest.from_json(json.dumps(_manifest_dict([{**good, "name": 7}], 1)), "m.json")
    with pytest.raises(SchemaError, match=r"m.json: manifest 'shards' must be a list"):
        Manifest.from_json(json.dumps({**_manifest_dict([], 0), "shards": {"a": 1}}), "m.json")
    assert Manifest.from_json(json.dumps(_manifest_dict([good], 1))).shards[0].name == "shard-000000.tar"


def _escaping_dir(tmp_path, name: str = "../x.tar") -> str:
    """A finished folder whose manifest names ``../x.tar``: a sound shard of good samples, just
    outside the folder (so reading it would let a run succeed)."""
    outside = _write_shard(str(tmp_path / "x.tar"), _samples(8, 0, lambda i: False))
    return _write_dir(tmp_path / "shards", [{**vars(outside), "name": name}], outside.samples)


def test_pretrain_refuses_a_manifest_naming_a_shard_outside_its_folder(tmp_path):
    manifest = _escaping_dir(tmp_path)
    out = tmp_path / "out"
    proc = run_module("trainer.pretrain", *_pretrain_args(manifest, _labels(tmp_path / "labels.parquet"), out,
                                                          "--num-workers", "0"),
                      check=False, timeout=400)
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert errors == [f"pretrain: error: {manifest}: shard 0: shard name '../x.tar' is not a plain file name "
                      "in the manifest's folder (no '/', '\\' or NUL, not starting with '.')"], proc.stderr[-4000:]
    assert not os.path.exists(out)  # refused before training began


@pytest.mark.parametrize("name", ["../x.tar", str("/") + "x.tar", "sub/x.tar"])
def test_verify_refuses_a_manifest_naming_a_shard_outside_its_folder(tmp_path, capsys, name):
    if name.startswith("/"):
        name = str(tmp_path / "x.tar")  # an absolute path to the same sound shard
    manifest = _escaping_dir(tmp_path, name)
    assert V.main([str(tmp_path / "shards")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"verify: {manifest}: shard 0: shard name {name!r} is not a plain file name in the " \
                       "manifest's folder (no '/', '\\' or NUL, not starting with '.')"
    assert lines[-1].startswith("verify: FAILED: 1 problem(s)")


def test_verify_cli_refuses_it_in_a_fresh_interpreter(tmp_path):
    _escaping_dir(tmp_path)
    proc = run_module("spark_jobs.verify", str(tmp_path / "shards"), check=False, timeout=120)
    assert proc.returncode == 1 and "shard name '../x.tar' is not a plain file name" in proc.stderr
