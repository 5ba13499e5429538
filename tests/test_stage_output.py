"""The one output protocol (schemas.stage_output), on a local disk and on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from schemas import io as sio
from schemas.stage_output import MARKER, SUCCESS, StageOutput, is_complete, stage_of


def _build(out: StageOutput, files: dict[str, str]) -> None:
    with out.build() as work:
        for name, text in files.items():
            sio.write_bytes_atomic(sio.join(work, name), text)


def test_build_commits_whole_with_marker_and_success_last(tmp_path):
    path = str(tmp_path / "out")
    out = StageOutput(path, "stage-a")
    assert out.check() is False
    _build(out, {"result.txt": "one"})
    assert sorted(os.listdir(path)) == sorted([MARKER, SUCCESS, "result.txt"])
    assert stage_of(path) == "stage-a" and is_complete(path)
    assert out.check() is True  # a rerun does no work
    assert out.skip_line() == f"stage-a: {path} is complete (_SUCCESS); nothing to do (--overwrite to redo)"
    assert os.listdir(tmp_path) == ["out"]  # no temporary left beside it


def test_a_failed_build_leaves_the_finished_result_intact(tmp_path):
    path = str(tmp_path / "out")
    out = StageOutput(path, "stage-a")
    _build(out, {"result.txt": "old"})
    with pytest.raises(RuntimeError, match="boom"):
        with out.build() as work:
            sio.write_bytes_atomic(sio.join(work, "result.txt"), "half")
            raise RuntimeError("boom")
    assert open(os.path.join(path, "result.txt")).read() == "old" and is_complete(path)
    assert os.listdir(tmp_path) == ["out"]
    _build(out, {"result.txt": "new"})  # --overwrite: replaced whole
    assert sorted(os.listdir(path)) == sorted([MARKER, SUCCESS, "result.txt"])
    assert open(os.path.join(path, "result.txt")).read() == "new"


@pytest.mark.parametrize("names", [["thesis.tex"], ["shard-000000.tar", "manifest.json"], ["_SUCCESS"],
                                   ["x.tmp-1234"]])
def test_a_directory_without_the_marker_is_refused_whatever_its_names(tmp_path, names):
    path = tmp_path / "out"
    path.mkdir()
    for name in names:
        (path / name).write_text("someone's data")
    out = StageOutput(str(path), "write_shards")
    with pytest.raises(ValueError, match=r"is not empty .* was not written by write_shards .*nothing there is deleted"):
        out.check(overwrite=True)
    with pytest.raises(ValueError, match="was not written by write_shards"):
        out.begin()
    assert sorted(os.listdir(path)) == sorted(names)
    assert all((path / n).read_text() == "someone's data" for n in names)


def test_another_stages_output_and_a_file_are_refused(tmp_path):
    path = str(tmp_path / "out")
    _build(StageOutput(path, "resample"), {"stats.json": "{}"})
    with pytest.raises(ValueError, match="is the output of resample, not write_shards"):
        StageOutput(path, "write_shards").check(overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        StageOutput(str(tmp_path / "file"), "resample").check()


def test_an_empty_directory_is_adopted(tmp_path):
    (tmp_path / "out").mkdir()
    out = StageOutput(str(tmp_path / "out"), "stage-a")
    _build(out, {"r": "1"})
    assert stage_of(str(tmp_path / "out")) == "stage-a"


def test_stale_temporaries_of_killed_runs_are_removed_others_kept(tmp_path):
    path = str(tmp_path / "out")
    out = StageOutput(path, "stage-a")
    # A run killed mid-build: its process is gone (a child that has exited).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / ".out.tmp-dead"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"stage": "stage-a", "host": os.uname().nodename, "pid": int(dead)}))
    (stale / "half.bin").write_text("x")
    running = tmp_path / ".out.tmp-live"  # a concurrent run in this very process
    running.mkdir()
    (running / MARKER).write_text(json.dumps({"stage": "stage-a", "host": os.uname().nodename,
                                              "pid": os.getpid()}))
    foreign = tmp_path / ".out.tmp-notours"  # no marker: not ours
    foreign.mkdir()
    other = tmp_path / ".out.tmp-other"  # another stage's
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"stage": "stage-b", "host": os.uname().nodename, "pid": int(dead)}))
    _build(out, {"r": "1"})
    assert not stale.exists()
    assert running.exists() and foreign.exists() and other.exists()


def test_in_place_output_resumes_and_clears_only_its_own(tmp_path):
    path = str(tmp_path / "ckpt")
    out = StageOutput(path, "pretrain", in_place=True)
    assert out.resume() == path
    sio.write_bytes_atomic(sio.join(path, "step1"), "state")
    assert StageOutput(path, "pretrain", in_place=True).resume() == path
    assert os.path.exists(os.path.join(path, "step1"))  # resume removes nothing
    work = out.begin()  # a fresh start: what this stage wrote goes
    assert work == path and sorted(os.listdir(path)) == [MARKER]
    out.commit(work)
    assert is_complete(path)


def test_object_store_output_is_written_in_place_success_last(s3_server):
    path = "s3://bucket/runs/out"
    out = StageOutput(path, "resample")
    _build(out, {"stats.json": "{\"v\": 1}"})
    assert is_complete(path) and stage_of(path) == "resample"
    with pytest.raises(RuntimeError):
        with out.build() as work:
            assert work == path
            assert not is_complete(path)  # from the first write on it is not a result
            raise RuntimeError("killed")
    assert not is_complete(path)
    _build(out, {"stats.json": "{\"v\": 2}"})
    assert json.loads(sio.read_bytes(sio.join(path, "stats.json"))) == {"v": 2}
    s3_server.pipe("bucket/theirs/data.bin", b"x")
    with pytest.raises(ValueError, match="was not written by resample"):
        StageOutput("s3://bucket/theirs", "resample").begin()
    assert s3_server.cat("bucket/theirs/data.bin") == b"x"


def test_entries_added_to_a_finished_output_are_never_deleted(tmp_path):
    path = tmp_path / "out"
    out = StageOutput(str(path), "stage-a")
    _build(out, {"result.txt": "one", "part-0": "p"})
    assert json.loads((path / MARKER).read_text())["entries"] == ["part-0", "result.txt"]
    (path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds notes.txt, which stage-a did not write"):
        out.check(overwrite=True)
    with pytest.raises(ValueError, match="holds notes.txt"):
        _build(out, {"result.txt": "two"})
    assert (path / "notes.txt").read_text() == "mine" and (path / "result.txt").read_text() == "one"
    assert os.listdir(tmp_path) == ["out"]  # the refused build's temporary is gone too
    assert out.check() is True  # without --overwrite the finished result is still just reused
