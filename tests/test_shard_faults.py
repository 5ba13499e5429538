"""Faults around the shard writer and the verifier, from the command line: a
full filesystem under ``--output`` or ``--spill-dir`` and an unreadable
shard are each one line naming the path (no traceback), and nothing of the
failed run is left behind."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from spark_jobs import write_shards as W
from tests.helpers import ROOT

#: A small tmpfs is mounted in a private mount namespace (``unshare -m``): root only.
needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                 reason="mounts a small tmpfs in its own mount namespace: needs root and unshare")


def _on_a_full_filesystem(small: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m spark_jobs.write_shards args`` with a 1 MiB tmpfs mounted at
    ``small`` (seen by this command only); stdout ends with ``LEFT: `` and the
    files left on the tmpfs afterwards."""
    command = (f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(small)} && "
               f"{shlex.quote(sys.executable)} -m spark_jobs.write_shards {shlex.join(args)}; rc=$?; "
               f"echo LEFT: $(find {shlex.quote(small)} -type f); exit $rc")
    return subprocess.run(["unshare", "-m", "sh", "-c", command], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


def _assert_one_line_error(proc: subprocess.CompletedProcess, starts: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Py4JJavaError" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("write_shards: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"write_shards: error: {starts}: cannot write ("), errors
    assert "No space left on device" in errors[0]
    assert proc.stdout.strip().endswith("LEFT:"), proc.stdout  # nothing of the run is left on the full disk


@pytest.mark.slow
@needs_mount
def test_full_output_filesystem_is_one_line_naming_the_output(resampled, tmp_path):
    source, sel_dir, _ = resampled
    small = tmp_path / "small"
    small.mkdir()
    out = str(small / "shards")
    # The shards (about 4 MB) do not fit in 1 MiB: the writer tasks find no room.
    proc = _on_a_full_filesystem(str(small), "--selection", sel_dir, "--index", source.index_path, "--output", out,
                                 "--samples-per-shard", "300", "--master", "local[2]", "--driver-memory", "1g")
    _assert_one_line_error(proc, f"--output {out}")
    assert os.listdir(small) == []  # the mount was this command's alone


@pytest.mark.slow
@needs_mount
def test_full_spill_filesystem_is_one_line_naming_the_spill_dir(resampled, tmp_path):
    source, sel_dir, _ = resampled
    small = tmp_path / "small"
    small.mkdir()
    spill, out = str(small / "spill"), str(tmp_path / "shards")
    # The spill (every selected image once) does not fit: the fetch tasks find no room.
    proc = _on_a_full_filesystem(str(small), "--selection", sel_dir, "--index", source.index_path, "--output", out,
                                 "--spill-dir", spill, "--samples-per-shard", "300", "--master", "local[2]",
                                 "--driver-memory", "1g")
    _assert_one_line_error(proc, f"--spill-dir {spill}")
    assert not os.path.exists(out) and [p for p in os.listdir(tmp_path) if p != "small"] == []


def _without_root_privileges(command: list[str]) -> list[str]:
    """``command`` run so that file permissions apply to it: as root, without
    the capabilities that bypass them (``setpriv``); else as it is."""
    if os.geteuid() != 0:
        return command
    if not shutil.which("setpriv"):
        pytest.skip("root reads a chmod-000 file: needs setpriv to drop CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]


@pytest.mark.slow
def test_verify_names_an_unreadable_shard_in_one_line(spark, resampled, tmp_path):
    source, sel_dir, _ = resampled
    out = str(tmp_path / "shards")
    W.run(spark, W.ShardJob(selection=sel_dir, index=source.index_path, output=out, samples_per_shard=900))
    shard = os.path.join(out, "shard-000001.tar")
    os.chmod(shard, 0)
    try:
        proc = subprocess.run(_without_root_privileges([sys.executable, "-m", "spark_jobs.verify", "--quiet", out]),
                              cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(shard, 0o644)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"verify: shard-000001.tar: cannot be read: Permission denied ({shard})",
                                        f"verify: FAILED: 1 problem(s) in {out}"]
