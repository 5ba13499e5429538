"""spark_jobs.resample, many targets over one index (``run_many`` and the
command line's ``--weights NAME=PATH``): every target's output is the one a
single-target run with its arguments writes, file for file; each target
follows the output protocol on its own."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptive_transfer import stages
from schemas import io as sio
from spark_jobs import resample as R
from tests.helpers import reference_weights, run_module, write_weights

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def targets(tmp_path_factory, source_data):
    """Three targets' weights over the generated source, and an exclusion file for one of them."""
    root = tmp_path_factory.mktemp("many")
    weights = {name: write_weights(str(root / f"{name}.parquet"),
                                   reference_weights(source_data.index_path, source_data.labels_path, seed=i + 5))
               for i, name in enumerate(NAMES)}
    keys = sio.read_parquet(source_data.index_path, columns=["key"]).column("key").to_pylist()
    exclude = str(root / "exclude.parquet")
    pq.write_table(pa.table({"key": keys[::3]}), exclude)
    return source_data, weights, exclude


def _jobs(source, weights, exclude, out, **kw):
    """K=3 targets: a and c differ only in their weights (as the command
    line's targets do), b also in matcher, seed and exclusions."""
    settings = {"a": dict(seed=1), "b": dict(matcher="elastic", seed=2, exclude=exclude), "c": dict(seed=1)}
    return [R.ResampleJob(index=source.index_path, weights=weights[n], size=600, target=n,
                          output=os.path.join(out, n), **settings[n], **kw) for n in NAMES]


@pytest.fixture(scope="module")
def alone(spark, targets, tmp_path_factory):
    """A target's single-target run (made once per module): job -> its output's files."""
    root = tmp_path_factory.mktemp("alone")
    made: dict[tuple, dict[str, bytes]] = {}

    def files_of(job: R.ResampleJob) -> dict[str, bytes]:
        key = (job.target, job.rows_per_partition)
        if key not in made:
            R.run(spark, dataclasses.replace(job, output=str(root / f"{job.target}-{job.rows_per_partition}")))
            made[key] = _files(str(root / f"{job.target}-{job.rows_per_partition}"))
        return made[key]
    return files_of


def _files(output: str) -> dict[str, bytes]:
    """An output's files (relative path -> bytes), less what records how and when it ran."""
    out = {}
    for root, _, names in os.walk(output):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), output)
            if rel in ("_STAGE", "_SUCCESS", "label_stats.png"):
                continue
            data = open(os.path.join(root, name), "rb").read()
            if rel == "stats.json":
                stats = json.loads(data)
                stats.pop("seconds"), stats.pop("timings")
                data = json.dumps(stats, sort_keys=True).encode()
            out[rel] = data
    return out


@pytest.mark.parametrize("draw_tasks", [None, 3])
def test_each_target_equals_its_single_target_run_file_for_file(spark, targets, alone, tmp_path, draw_tasks):
    """Whatever the shared pass's number of tasks (default: one per target's
    drawing task, here 12; or 3, each drawing several targets' groups)."""
    source, weights, exclude = targets
    many = _jobs(source, weights, exclude, str(tmp_path / "many"), rows_per_partition=90)
    results = R.run(spark, R.ManyResampleJob(tuple(many), draw_tasks=draw_tasks))
    assert [r.error for r in results] == [None, None, None]
    for job, result in zip(many, results):
        files, expected = _files(job.output), alone(job)
        assert sorted(files) == sorted(expected)
        assert files == expected, job.target
        parts = [n for n in files if n.startswith("selection/")]
        assert len(parts) > 1 and result.stats["total_copies"] == 600  # several drawing tasks per target
    # A single-target run reuses what the many-target run made (one fingerprint).
    assert R.run(spark, many[1])["reused"] is True


def test_one_targets_bad_weights_leave_the_others_and_a_rerun_reuses_them(spark, targets, tmp_path, capsys):
    source, weights, exclude = targets
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pq.read_table(weights["b"]).drop(["weight"]), bad)
    jobs = _jobs(source, weights, exclude, str(tmp_path / "out"))
    first = R.run_many(spark, jobs)
    assert all(r.ok and not r.reused for r in first)
    b_files = _files(jobs[1].output)
    jobs[1] = dataclasses.replace(jobs[1], weights=bad, overwrite=True)
    jobs[2] = dataclasses.replace(jobs[2], seed=7)  # c changed: rebuilt (overwrite: its old result was finished)
    jobs[2].overwrite = True
    second = R.run_many(spark, jobs)
    assert second[0].reused and second[1].error and not second[2].reused and second[2].ok
    assert "bad.parquet" in second[1].error
    assert _files(jobs[1].output) == b_files  # b's finished result is as it was
    assert "a is complete" in capsys.readouterr().err.replace(os.path.join(str(tmp_path / "out"), ""), "")
    # A rerun with every input good (as the composed commands run it) rebuilds nothing.
    jobs[1] = dataclasses.replace(jobs[1], weights=weights["b"], overwrite=False)
    jobs[2] = dataclasses.replace(jobs[2], overwrite=False)
    engines = stages.Engines(log=(lines := []).append)
    third = stages.resample_many(jobs, engines)
    assert [(r.reused, r.error) for r in third] == [(True, None)] * 3
    assert (engines.reused, engines.built) == (3, 0)
    assert third[1].stats["total_copies"] == 600 and all("reusing" in line for line in lines)
    # Bad weights through the composed call: the others reused, the failure named.
    with pytest.raises(ValueError, match=r"1 of 3 targets failed: b: .*bad.parquet"):
        stages.resample_many([jobs[0], dataclasses.replace(jobs[1], weights=bad), jobs[2]], engines)


def test_targets_that_share_an_output_or_not_an_index_are_refused(spark, targets, tmp_path):
    source, weights, exclude = targets
    jobs = _jobs(source, weights, exclude, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="give each target its own --output"):
        R.run_many(spark, [jobs[0], dataclasses.replace(jobs[1], output=jobs[0].output)])
    with pytest.raises(ValueError, match="must share their index"):
        R.run_many(spark, [jobs[0], dataclasses.replace(jobs[1], index=str(tmp_path / "other"))])
    assert not os.path.exists(tmp_path / "out")


def test_command_line_many_targets_with_task_retries(targets, alone, tmp_path):
    """``--weights NAME=PATH`` repeated, outputs at OUTPUT/NAME; every first
    task attempt fails (retried): each target as its single-target run."""
    source, weights, exclude = targets
    out = str(tmp_path / "out")
    proc = run_module("spark_jobs.resample", "--index", source.index_path, "--size", "600", "--seed", "1",
                      "--weights", f"a={weights['a']}", "--weights", f"c={weights['c']}", "--output", out,
                      "--rows-per-partition", "90", "--master", "local[4,2]", "--driver-memory", "1g",
                      env={"ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT": "draw"})
    assert "injected failure" in proc.stderr
    assert "resample: a: 600 samples" in proc.stdout and "resample: c: 600 samples" in proc.stdout
    assert sorted(os.listdir(out)) == ["a", "c"]
    for job in _jobs(source, weights, exclude, out, rows_per_partition=90):
        if job.target != "b":
            assert _files(job.output) == alone(job)
