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


def test_stale_temporaries_of_ended_runs_are_removed_others_kept(tmp_path):
    """Temporaries of this stage beside the output belong to runs that have
    ended (a live run would hold the output's lock): removed whatever pid
    their marker names; another stage's and unmarked ones are kept."""
    path = str(tmp_path / "out")
    out = StageOutput(path, "stage-a")
    stale = tmp_path / ".out.tmp-dead"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"stage": "stage-a", "host": os.uname().nodename, "pid": os.getpid()}))
    (stale / "half.bin").write_text("x")
    foreign = tmp_path / ".out.tmp-notours"  # no marker: not ours
    foreign.mkdir()
    other = tmp_path / ".out.tmp-other"  # another stage's
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"stage": "stage-b", "host": os.uname().nodename, "pid": 1}))
    _build(out, {"r": "1"})
    assert not stale.exists()
    assert foreign.exists() and other.exists()


_HOLD_BUILD = """
import sys
from schemas import io as sio
from schemas.stage_output import StageOutput
out = StageOutput(sys.argv[1], "stage-a")
work = out.begin()
sio.write_bytes_atomic(sio.join(work, "result.txt"), "first run")
print(work, flush=True)
sys.stdin.readline()          # the test lets it commit
out.commit(work)
print("committed", flush=True)
"""


def _start_holder(path: str, *prefix: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", _HOLD_BUILD, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return proc, proc.stdout.readline().strip()


@pytest.mark.parametrize("namespace", ["same", "own pid namespace"])
def test_a_live_build_is_never_judged_dead_and_a_second_run_is_refused(tmp_path, namespace):
    """Two runs into one output, the first building (in this or in another
    pid namespace, as containers sharing the host are): the second is refused
    with the holder named and touches nothing; the first commits its result."""
    import shutil

    from schemas.output_lock import OutputBusy

    prefix = ()
    if namespace != "same":
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("needs root and unshare for a pid namespace")
        prefix = ("unshare", "--pid", "--fork", "--mount-proc")
    path = str(tmp_path / "out")
    _build(StageOutput(path, "stage-a"), {"result.txt": "earlier"})
    holder, work = _start_holder(path, *prefix)
    try:
        assert os.path.isdir(work)
        for attempt in (lambda o: o.check(overwrite=True), lambda o: o.begin(),
                        lambda o: o.run(lambda w: None, overwrite=True)):
            with pytest.raises(OutputBusy, match=r"is being written by another run \(stage stage-a, run_id"):
                attempt(StageOutput(path, "stage-a"))
        assert os.path.isdir(work) and open(os.path.join(path, "result.txt")).read() == "earlier"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert open(os.path.join(path, "result.txt")).read() == "first run" and is_complete(path)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary, no lock file left
    assert StageOutput(path, "stage-a").check() is True  # the lock went with the run


def test_a_killed_run_leaves_no_lock(tmp_path):
    path = str(tmp_path / "out")
    holder, work = _start_holder(path)
    holder.kill()
    holder.wait(timeout=60)
    out = StageOutput(path, "stage-a")
    assert out.check() is False  # the kernel released its lock; its build is not a result
    _build(out, {"result.txt": "second"})
    assert not os.path.exists(work) and open(os.path.join(path, "result.txt")).read() == "second"


def test_a_commit_whose_build_is_gone_fails_and_leaves_the_result(tmp_path):
    path = str(tmp_path / "out")
    out = StageOutput(path, "stage-a")
    _build(out, {"result.txt": "finished"})
    work = out.begin()
    sio.remove_tree(work)  # e.g. removed by hand
    with pytest.raises(ValueError, match="is gone or is not this run's; the result at .* is left as it was"):
        out.commit(work)
    assert open(os.path.join(path, "result.txt")).read() == "finished" and is_complete(path)
    assert StageOutput(path, "stage-a").check() is True  # and the lock was let go


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


def test_object_store_output_keeps_a_finished_result_until_the_new_one_is_complete(s3_server):
    path = "s3://bucket/runs/out"
    out = StageOutput(path, "resample")
    with out.build() as work:
        assert work == path  # nothing finished there: built in place
        sio.write_bytes_atomic(sio.join(work, "stats.json"), '{"v": 1}')
        sio.write_bytes_atomic(sio.join(work, "old-only.txt"), "x")
        assert not is_complete(path)
    assert out.is_complete() and stage_of(path) == "resample"
    with pytest.raises(RuntimeError):
        with out.build() as work:  # --overwrite of a finished result: built beside it
            assert work.startswith("s3://bucket/runs/.out.tmp-")
            sio.write_bytes_atomic(sio.join(work, "stats.json"), '{"v": 2}')
            assert out.is_complete()  # the old result is still the result
            raise RuntimeError("bad input found mid-job")
    assert json.loads(sio.read_bytes(sio.join(path, "stats.json"))) == {"v": 1} and out.is_complete()
    assert s3_server.ls("bucket/runs") == ["bucket/runs/out"]  # the failed build is gone
    _build(out, {"stats.json": '{"v": 2}'})
    assert json.loads(sio.read_bytes(sio.join(path, "stats.json"))) == {"v": 2}
    assert sorted(p.rsplit("/", 1)[-1] for p in s3_server.ls("bucket/runs/out")) == [MARKER, SUCCESS, "stats.json"]
    assert s3_server.ls("bucket/runs") == ["bucket/runs/out"]
    s3_server.pipe("bucket/theirs/data.bin", b"x")
    with pytest.raises(ValueError, match="was not written by resample"):
        StageOutput("s3://bucket/theirs", "resample").begin()
    assert s3_server.cat("bucket/theirs/data.bin") == b"x"


def test_success_without_this_stages_marker_is_not_its_result(tmp_path):
    spark_output = tmp_path / "parquet"
    spark_output.mkdir()
    (spark_output / "part-0.parquet").write_bytes(b"x")
    (spark_output / SUCCESS).write_text("")
    with pytest.raises(ValueError, match="was not written by resample"):
        StageOutput(str(spark_output), "resample").check()  # not "complete: nothing to do"
    path = str(tmp_path / "weights")
    _build(StageOutput(path, "importance_weights"), {"weights.parquet": "w"})
    with pytest.raises(ValueError, match="is the output of importance_weights, not write_shards"):
        StageOutput(path, "write_shards").check()


def test_a_commit_cut_off_between_its_renames_is_finished_never_resurrected(tmp_path):
    """Two renames (where the filesystem has no atomic exchange) cut off in
    between: the next run finishes the commit with the new, finished build.
    A set-aside old result is never put back: the user may have removed
    the output on purpose."""
    path = tmp_path / "out"
    out = StageOutput(str(path), "stage-a")
    _build(out, {"result.txt": "previous"})
    new = tmp_path / ".out.tmp-newbuild"
    _build(StageOutput(str(new), "stage-a"), {"result.txt": "new"})  # a finished build beside it
    set_aside = tmp_path / ".out.old-cutoff"
    os.rename(path, set_aside)  # what a commit does just before its second rename
    assert out.check() is True  # the new result is in place, and finished
    assert (path / "result.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]
    os.rename(path, set_aside)  # a stale copy, then the user deletes the output on purpose
    assert out.check() is False
    assert not path.exists() and sorted(os.listdir(tmp_path)) == []  # not put back; the stale copy removed


def test_the_commit_exchanges_atomically_where_the_filesystem_can(tmp_path, monkeypatch):
    """With RENAME_EXCHANGE the output is never missing; without it (other
    filesystems) the two renames give the same result."""
    path = tmp_path / "out"
    _build(StageOutput(str(path), "stage-a"), {"result.txt": "one"})
    seen = []
    real = sio.exchange
    monkeypatch.setattr(sio, "exchange", lambda a, b: seen.append(real(a, b)) or seen[-1])
    _build(StageOutput(str(path), "stage-a"), {"result.txt": "two"})
    assert (path / "result.txt").read_text() == "two" and seen
    monkeypatch.setattr(sio, "exchange", lambda a, b: False)
    _build(StageOutput(str(path), "stage-a"), {"result.txt": "three"})
    assert (path / "result.txt").read_text() == "three" and sorted(os.listdir(tmp_path)) == ["out"]


def test_symlinked_and_file_url_outputs_are_the_real_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    _build(StageOutput(str(link), "stage-a"), {"r": "1"})
    assert link.is_symlink() and (real / "r").read_text() == "1" and (real / SUCCESS).exists()
    _build(StageOutput(str(link), "stage-a"), {"r": "2"})  # replaced through the link
    assert link.is_symlink() and (real / "r").read_text() == "2"
    url = StageOutput(f"file://{tmp_path}/viaurl", "stage-a")
    _build(url, {"r": "3"})
    assert (tmp_path / "viaurl" / "r").read_text() == "3" and url.check() is True
    assert sorted(os.listdir(tmp_path)) == ["link", "real", "viaurl"]


def test_a_reader_refuses_a_file_inside_an_unfinished_output(tmp_path):
    from schemas.stage_output import require_finished_input

    out = StageOutput(str(tmp_path / "w"), "importance_weights", in_place=True)
    work = out.begin()
    sio.write_bytes_atomic(sio.join(work, "weights.parquet"), "half")
    with pytest.raises(FileNotFoundError, match="is an unfinished importance_weights output"):
        require_finished_input(str(tmp_path / "w" / "weights.parquet"), "--weights")
    out.commit(work)
    require_finished_input(str(tmp_path / "w" / "weights.parquet"), "--weights")
    require_finished_input(str(tmp_path / "anywhere.parquet"), "--weights")  # not in a stage's output: fine


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


def test_reuse_rule_reuses_only_a_complete_output_made_from_the_same_fingerprint(tmp_path, capsys):
    path = str(tmp_path / "out")
    built = []

    def build(work, text="one"):
        built.append(work)
        sio.write_bytes_atomic(sio.join(work, "result.txt"), text)

    settings = {"size": 10, "seed": 0, "code": "abc"}
    assert StageOutput(path, "stage-a").run(build, fingerprint=settings) is False
    assert len(built) == 1 and is_complete(path)
    assert StageOutput(path, "stage-a").run(build, fingerprint=dict(settings)) is True  # same: no work
    assert len(built) == 1 and "nothing to do" in capsys.readouterr().err
    # another seed or another code: refused without overwrite, naming what differs; nothing deleted
    for changed, name in (({**settings, "seed": 1}, "seed"), ({**settings, "code": "def"}, "code")):
        with pytest.raises(ValueError, match=rf"made from other {name}; nothing there is deleted"):
            StageOutput(path, "stage-a").run(build, fingerprint=changed)
        assert open(os.path.join(path, "result.txt")).read() == "one" and len(built) == 1
    # with overwrite: rebuilt aside, committed whole, the new fingerprint recorded
    new = {**settings, "seed": 1}
    assert StageOutput(path, "stage-a").run(lambda w: build(w, "two"), fingerprint=new, overwrite=True) is False
    assert open(os.path.join(path, "result.txt")).read() == "two"
    assert StageOutput(path, "stage-a").matches(new) and not StageOutput(path, "stage-a").matches(settings)


def test_reuse_rule_refuses_an_output_made_before_fingerprints_and_an_unfinished_one_is_rebuilt(tmp_path):
    path = str(tmp_path / "out")
    _build(StageOutput(path, "stage-a"), {"result.txt": "old"})  # no fingerprint recorded
    with pytest.raises(ValueError, match="no recorded fingerprint"):
        StageOutput(path, "stage-a").run(lambda w: None, fingerprint={"seed": 0})
    assert StageOutput(path, "stage-a").check() is True  # a caller that asks for no fingerprint still reuses it
    os.remove(os.path.join(path, SUCCESS))  # unfinished: not a result, rebuilt without --overwrite
    assert StageOutput(path, "stage-a").run(
        lambda w: sio.write_bytes_atomic(sio.join(w, "result.txt"), "new"), fingerprint={"seed": 0}) is False
    assert open(os.path.join(path, "result.txt")).read() == "new"


def test_code_digest_follows_imports_and_ignores_docstrings(tmp_path, monkeypatch):
    from schemas import fingerprint as fp

    pkg = tmp_path / "schemas"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""package."""\n')
    (pkg / "a.py").write_text('"""A."""\nfrom . import b\n\ndef f():\n    """Doc."""\n    return b.g()\n')
    (pkg / "b.py").write_text("def g():\n    return 1  # one\n")
    (pkg / "c.py").write_text("X = 1\n")
    monkeypatch.setattr(fp, "_package_dir", lambda top: str(pkg) if top == "schemas" else None)
    fp._module_facts.cache_clear()
    assert sorted(fp.project_modules("schemas.a")) == ["schemas", "schemas.a", "schemas.b"]
    before = fp.code_digest("schemas.a")
    (pkg / "a.py").write_text('"""Another docstring."""\nfrom . import b\n\n\ndef f():\n    return b.g()  # hi\n')
    (pkg / "c.py").write_text("X = 2\n")  # not imported by a: does not count
    fp._module_facts.cache_clear()
    assert fp.code_digest("schemas.a") == before
    (pkg / "b.py").write_text("def g():\n    return 2\n")
    fp._module_facts.cache_clear()
    assert fp.code_digest("schemas.a") != before
    fp._module_facts.cache_clear()


def test_code_digest_of_code_run_from_a_zip_equals_the_files(tmp_path):
    # spark-submit --py-files code.zip (the Makefile's spark-env): the driver imports
    # the project from the archive; the digest reads the same code there.
    import pathlib
    import zipfile

    from schemas.fingerprint import code_digest
    from tests.helpers import ROOT

    code = tmp_path / "code.zip"
    with zipfile.ZipFile(code, "w", zipfile.ZIP_DEFLATED) as z:
        for d in ("schemas", "spark_jobs"):
            for f in sorted(pathlib.Path(ROOT, d).rglob("*.py")):
                z.write(f, f.relative_to(ROOT))
    script = ("import importlib.util; from schemas.fingerprint import code_digest; "
              "print(importlib.util.find_spec('spark_jobs').origin); print(code_digest('spark_jobs.write_shards'))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(code)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin, digest = proc.stdout.split()
    assert origin == str(code / "spark_jobs" / "__init__.py")  # the archive's code, not the files'
    assert digest == code_digest("spark_jobs.write_shards")


def test_renamed_flags_keep_their_old_spelling_hidden_with_a_note(capsys):
    from schemas.cli import ArgumentParser

    p = ArgumentParser(prog="stage")
    p.add_argument("--index", required=True)
    p.add_argument("--allow-uri-prefix", action="append", default=[])
    p.add_argument("--grid", type=int, choices=[1, 2])
    p.add_aliases({"--source-index": "--index", "--prefix": "--allow-uri-prefix", "--cells": "--grid"})
    args = p.parse_args(["--source-index", "i", "--prefix", "a", "--allow-uri-prefix", "b", "--cells", "2"])
    assert (args.index, args.allow_uri_prefix, args.grid) == ("i", ["a", "b"], 2)
    err = capsys.readouterr().err
    assert "stage: --source-index is deprecated; use --index" in err and err.count("deprecated") == 3
    assert "--source-index" not in p.format_help() and "--index" in p.format_help()
    for argv, message in ((["--grid", "1"], "required: --index"), (["--index", "i", "--cells", "3"], "invalid choice")):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert message in capsys.readouterr().err


def test_object_store_commit_cut_off_is_finished_from_its_complete_build(s3_server):
    """--overwrite on an object store, killed while copying in: the new build
    is complete beside the output and ``_COMMITTING`` names it; the next run
    finishes the copy (never a mixture marked complete)."""
    from schemas import stage_output as so

    path = "s3://bucket/runs/out"
    _build(StageOutput(path, "resample"), {"stats.json": '{"v": 1}', "old-only.txt": "x"})
    out = StageOutput(path, "resample")
    work = out.begin()
    assert work.startswith("s3://bucket/runs/.out.tmp-")
    sio.write_bytes_atomic(sio.join(work, "stats.json"), '{"v": 2}')
    calls = []
    real_copy = so.StageOutput._finish_copy_in

    def cut_off(self, w):  # the process dies after the intent and a first copy
        fs, final = sio.filesystem(self.path)
        sio.remove_tree(sio.join(self.path, SUCCESS))
        fs.copy(f"{sio.filesystem(w)[1]}/stats.json", f"{final}/stats.json")
        calls.append(w)
        raise KeyboardInterrupt("killed")

    so.StageOutput._finish_copy_in = cut_off
    try:
        with pytest.raises(KeyboardInterrupt):
            out.commit(work)
    finally:
        so.StageOutput._finish_copy_in = real_copy
    assert calls and not is_complete(path)  # a mixture is never a result
    assert StageOutput(path, "resample").check() is True  # finished by the next run
    names = sorted(p.rsplit("/", 1)[-1] for p in s3_server.ls("bucket/runs/out"))
    assert names == [MARKER, SUCCESS, "stats.json"]
    assert json.loads(sio.read_bytes(sio.join(path, "stats.json"))) == {"v": 2}
    assert s3_server.ls("bucket/runs") == ["bucket/runs/out"]
    assert json.loads(sio.read_bytes(sio.join(path, SUCCESS)))["stage"] == "resample"


def test_object_store_two_first_runs_are_one_at_a_time_and_a_dead_lease_expires(s3_server, monkeypatch):
    from schemas import output_lock
    from schemas.output_lock import OutputBusy, lock_path

    path = "s3://bucket/runs/first"
    first = StageOutput(path, "resample")
    work = first.begin()  # a first run: in place, holding the lease
    assert work == path and s3_server.exists(lock_path(path))
    monkeypatch.setattr(output_lock, "RUN_ID", "another-process")  # a second run elsewhere
    monkeypatch.setattr(output_lock, "_HELD", {})
    with pytest.raises(OutputBusy, match="is being written by another run .*its lease expires at"):
        StageOutput(path, "resample").begin()
    # the first run dies without releasing: after LEASE_SECONDS without renewal its lease is taken over
    lease = json.loads(s3_server.cat(lock_path(path)))
    s3_server.pipe(lock_path(path), json.dumps({**lease, "renewed": lease["renewed"] - 2 * output_lock.LEASE_SECONDS})
                   .encode())
    second = StageOutput(path, "resample")
    w2 = second.begin()  # the dead run's partial output is cleared: in place again
    sio.write_bytes_atomic(sio.join(w2, "stats.json"), '{"v": 2}')
    second.commit(w2)
    assert is_complete(path) and not s3_server.exists(lock_path(path))
