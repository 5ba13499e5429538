"""The trainer where nodes share no disk: every shard checked before step 1,
shard reads retried with a bounded backoff, and two DeepSpeed "nodes" on
loopback with separate output and temporary directories that stop and
resume at the same step (rank 0 chooses the checkpoint, every rank checks
it can read it). The two-node runs are in ``make test-cluster``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from adaptive_transfer.synthetic import encode_image
from schemas.shard_format import sample_json, sample_key, write_tar
from tests.helpers import free_port, ROOT, run_module
from tests.test_cluster import cluster_only
from trainer import data as D
from trainer import runtime as RT


def _write_shards(directory, shards: int = 8, per_shard: int = 40, labels: int = 8) -> str:
    """Small JPEG shards ``shard-00000{0..shards-1}.tar``; returns their brace pattern."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            label = int(rng.integers(labels))
            pixels = np.full((24, 24, 3), 20 * label, np.uint8) + rng.integers(0, 20, (24, 24, 3), dtype=np.uint8)
            key = f"k{s}-{i}"
            samples.append((sample_key(key, 0), "jpg", encode_image(pixels), sample_json(key, 0, [label], 1.0)))
        with open(os.path.join(directory, f"shard-{s:06d}.tar"), "wb") as fh:
            write_tar(fh, samples)
    return os.path.join(directory, f"shard-{{000000..{shards - 1:06d}}}.tar")


# -- shard reads: retried, bounded -----------------------------------------------------------

class _FlakyFS:
    """A local filesystem whose first ``failures`` opened files raise
    ``OSError`` after ``after`` bytes (a connection dropped mid-shard)."""

    def __init__(self, failures: int, after: int):
        self.failures, self.after, self.opened = failures, after, 0

    def open(self, path, mode="rb"):
        self.opened += 1
        data = open(path, "rb").read()
        if self.opened > self.failures:
            return io.BytesIO(data)
        flaky = io.BytesIO(data)
        limit = self.after

        def read(n=-1, _read=flaky.read):
            if flaky.tell() >= limit:
                raise ConnectionResetError("connection reset by peer")
            return _read(n if n is not None and n >= 0 and flaky.tell() + n <= limit else limit - flaky.tell())
        flaky.read = read
        return flaky


@pytest.mark.parametrize("failures", [0, 1, 2])
def test_a_shard_read_that_fails_is_retried_from_where_it_stopped(tmp_path, monkeypatch, failures):
    pattern = _write_shards(str(tmp_path), shards=1, per_shard=12)
    url = D.shard_urls(pattern)[0]
    want = [s["__key__"] for s in D.shard_samples(url)]
    assert len(want) == 12
    fs = _FlakyFS(failures, after=os.path.getsize(url) // 3)
    monkeypatch.setattr(D.sio, "filesystem", lambda u: (fs, u))
    waits = []
    got = [s["__key__"] for s in D.shard_samples(url, attempts=3, backoff=0.5, sleep=waits.append)]
    assert got == want  # each sample once, in order, however often the read was restarted
    assert waits == [0.5, 1.0][:failures] and fs.opened == failures + 1


def test_a_shard_that_cannot_be_read_fails_after_the_attempts(tmp_path, monkeypatch):
    pattern = _write_shards(str(tmp_path), shards=1, per_shard=12)
    url = D.shard_urls(pattern)[0]
    fs = _FlakyFS(failures=10, after=os.path.getsize(url) // 2)
    monkeypatch.setattr(D.sio, "filesystem", lambda u: (fs, u))
    waits, got = [], []
    with pytest.raises(OSError, match=rf"shard {url} could not be read \(3 attempts, the last after \d+ samples\): "
                                      "ConnectionResetError"):
        for sample in D.shard_samples(url, attempts=3, backoff=0.25, sleep=waits.append):
            got.append(sample["__key__"])
    assert waits == [0.25, 0.5] and fs.opened == 3  # bounded: no wait after the last attempt
    assert len(got) == len(set(got)) > 0  # what was read before is not repeated


# -- every shard checked before step 1 -------------------------------------------------------

def test_missing_shards_are_named(tmp_path):
    pattern = _write_shards(str(tmp_path / "s"), shards=4, per_shard=2)
    urls = D.shard_urls(pattern)
    assert D.missing_shards(urls) == []
    os.remove(urls[2])
    os.remove(urls[3])
    assert D.missing_shards(urls) == urls[2:]
    assert D.missing_shards([str(tmp_path / "nowhere" / "shard-000000.tar")]) == \
        [str(tmp_path / "nowhere" / "shard-000000.tar")]
    with pytest.raises(FileNotFoundError,
                       match=rf"shard {urls[2]} named by P is missing \(2 of 4 shards are missing\)"):
        D.require_shards(urls, "P")


def test_pretrain_names_a_missing_shard_before_step_1(tmp_path, source_data):
    pattern = _write_shards(str(tmp_path / "s"), shards=4, per_shard=2)
    missing = D.shard_urls(pattern)[1]
    os.remove(missing)
    proc = run_module("trainer.pretrain", "--shards", pattern, "--labels", source_data.labels_path, "--steps", "2",
                      "--batch-size", "2", "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"pretrain: error: shard {missing} named by {pattern} is missing; every node must see the "
                      "shards (an object store, or a directory mounted at the same path everywhere)"], proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written: inputs are checked first


def test_a_url_output_is_refused_without_a_local_folder(tmp_path, source_data):
    pattern = _write_shards(str(tmp_path / "s"), shards=2, per_shard=2)
    proc = run_module("trainer.pretrain", "--shards", pattern, "--labels", source_data.labels_path, "--steps", "2",
                      "--batch-size", "2", "--output", "gs://bucket/run", check=False)
    assert proc.returncode == 1
    assert "pretrain: error: --output gs://bucket/run: checkpoints and logs are written to a POSIX directory" \
        in proc.stderr
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_one_rank_agrees_with_itself(tmp_path):
    assert RT.agree_resume_tag(str(tmp_path / "none")) is None
    folder = tmp_path / RT.tag_for(3)
    folder.mkdir()
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"xyz")
    (folder / "COMPLETE").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 3}}))
    assert RT.agree_resume_tag(str(tmp_path)) == RT.tag_for(3)


# -- two nodes that share no disk ------------------------------------------------------------

def _two_nodes(pattern, labels, outputs, tmp, *extra, steps=6):
    """Both nodes' launchers (`deepspeed --hostfile --no_ssh --node_rank K`),
    each with its own --output and TMPDIR; returns (returncode, text) per node."""
    hostfile = os.path.join(tmp, "hostfile")
    with open(hostfile, "w") as fh:
        fh.write("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs = []
    for node, out in enumerate(outputs):
        scratch = os.path.join(tmp, f"tmp{node}")
        os.makedirs(scratch, exist_ok=True)
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--hostfile", hostfile, "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
               "--module", "trainer.pretrain", "--shards", pattern, "--labels", labels, "--arch", "small",
               "--steps", str(steps), "--batch-size", "16", "--lr", "0.05", "--seed", "7", "--num-workers", "1",
               "--input-size", "24", "--save-every", "2", "--log-every", "2", "--output", str(out), *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "TMPDIR": scratch}))
    results = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n[test] killed after 600 s"
        results.append((p.returncode, text))
    return results


def _report(out, rank):
    return json.loads((out / "ranks" / f"rank{rank}.json").read_text())


@cluster_only
@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_resume_at_the_same_step(tmp_path, source_data):
    pattern = _write_shards(str(tmp_path / "shards"))
    labels = source_data.labels_path
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]

    # Separate directories taken for a shared one: refused before step 1, on both nodes.
    results = _two_nodes(pattern, labels, outs, str(tmp_path), "--stop-after", "4")
    assert [rc for rc, _ in results] != [0, 0]
    assert f"pretrain: error: --output {outs[0]} is not shared: rank(s) [1] do not see what rank 0 writes" \
        in results[0][1], results[0][1][-3000:]
    assert "step 1/" not in results[0][1]
    shutil.rmtree(tmp_path / "node0")
    shutil.rmtree(tmp_path / "node1", ignore_errors=True)

    # Each node keeps its own copy; stopped at step 4.
    results = _two_nodes(pattern, labels, outs, str(tmp_path), "--node-local-checkpoints", "--stop-after", "4")
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    for out in outs:
        assert sorted(t for t in os.listdir(out / "checkpoints") if t.startswith("step")) == \
            [RT.tag_for(2), RT.tag_for(4)]
        assert (out / "checkpoints" / RT.tag_for(4) / "COMPLETE").exists()

    # Node 1's newest save was cut off: rank 0 chooses step 4, rank 1 cannot read it, both stop and say so
    # (choosing on their own, rank 1 would resume at step 2 and the ranks would disagree).
    marker = outs[1] / "checkpoints" / RT.tag_for(4) / "COMPLETE"
    kept = marker.read_bytes()
    marker.unlink()
    results = _two_nodes(pattern, labels, outs, str(tmp_path), "--node-local-checkpoints", "--resume")
    assert results[0][0] != 0 and results[1][0] != 0
    expected = f"rank 0 resumes from checkpoint {RT.tag_for(4)}, which rank(s) [1] cannot read complete"
    assert expected in results[0][1] and expected in results[1][1], results[1][1][-3000:]
    assert f"{outs[1] / 'checkpoints' / RT.tag_for(4)} is missing or incomplete" in results[1][1]
    marker.write_bytes(kept)

    # With every node's copy, both resume at step 4 and finish with the same parameters.
    results = _two_nodes(pattern, labels, outs, str(tmp_path), "--node-local-checkpoints", "--resume")
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert f"[resume] from {RT.tag_for(4)} (step 4)" in results[0][1]
    reports = [_report(outs[0], 0), _report(outs[1], 1)]
    assert [r["resumed_from"] for r in reports] == [4, 4] and [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["parameters_sha256"] == reports[1]["parameters_sha256"]
    assert (outs[0] / "_SUCCESS").exists() and (outs[0] / "generalist.pt").exists()
    log = [json.loads(line)["step"] for line in open(outs[0] / "train_log.jsonl")]
    assert log == list(range(1, 7))  # steps 5 and 6 after the resume, appended
