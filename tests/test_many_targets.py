"""Several targets in one Beam run (importance_weights, near_duplicates): each
target's outputs byte-identical to its single-target run's, the source read
once whatever the number of targets (the pipelines' counters), one target's
bad images failing that target alone (named) while the others are committed,
and a rerun reusing what is finished."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from adaptive_transfer import stages
from adaptive_transfer.synthetic import TargetSpec, generate_target
from beam_pipelines import importance_weights as IW
from beam_pipelines import near_duplicates as ND
from beam_pipelines.many_targets import target_groups
from schemas.stage_output import SUCCESS
from schemas.targets import list_target
from tests.helpers import random_generalist

BEAM = ["--runner", "DirectRunner"]
#: The files each stage writes whose bytes depend on nothing but the result
#: (the figures are PNGs of the same data; the marker holds a run id).
SAME_BYTES = {"importance_weights": ("label_counts.parquet", "target_histogram.parquet", "weights.parquet",
                                     "summary.json"),
              "near_duplicates": ("exclude.parquet", "summary.json")}


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, source_data):
    """A randomly initialised small generalist over the source vocabulary."""
    return random_generalist(str(tmp_path_factory.mktemp("model") / "generalist.pt"), source_data.labels_path)


def small_target(root, name: str, branch: str, layout: str, seed: int):
    """A small generated target: 4 classes, 20 train and 8 test images."""
    spec = TargetSpec(name=name, layout=layout, branch=branch, num_classes=4, train_per_class=5, test_per_class=2,
                      seed=seed)
    return generate_target(str(root), spec)


@pytest.fixture(scope="module")
def vehicles(tmp_path_factory):
    return small_target(tmp_path_factory.mktemp("vehicles"), "vehicles", "vehicle", "imagefolder", 3)


@pytest.fixture(scope="module")
def food(tmp_path_factory):
    return small_target(tmp_path_factory.mktemp("food"), "food", "food", "food101", 4)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, source_data):
    """120 examples of the generated source, in two row groups of one file."""
    path = str(tmp_path_factory.mktemp("small") / "index.parquet")
    first = sorted(os.listdir(source_data.index_path))[0]
    pq.write_table(pq.read_table(os.path.join(source_data.index_path, first)).slice(0, 120), path,
                   row_group_size=60)
    return path


def same_bytes(stage: str, a, b) -> None:
    for name in SAME_BYTES[stage]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def weights_args(source_data, generalist, targets) -> list[str]:
    """A command line of importance_weights: ``targets`` is (name, root, layout, output) each."""
    args = ["--index", source_data.index_path, "--labels", source_data.labels_path, "--checkpoint", generalist,
            "--batch-size", "16"]
    for name, root, layout, out in targets:
        args += ["--target", name, "--target-root", root, "--target-layout", layout, "--output", str(out)]
    return args


def test_the_command_line_groups_each_targets_flags():
    jobs, rest = IW.job_from_args(["--index", "i", "--labels", "l", "--checkpoint", "c", "--target", "a",
                                   "--target-root", "ra", "--output", "oa", "--target", "b", "--target-root", "rb",
                                   "--target-layout", "food101", "--target-split", "test", "--output", "ob",
                                   "--temperature", "3", "--runner", "DirectRunner"])
    assert isinstance(jobs, IW.MultiWeightsJob) and rest == ["--runner", "DirectRunner"]
    a, b = jobs.jobs()
    assert (a.target, a.target_root, a.target_layout, a.output, a.temperature) == ("a", "ra", "imagefolder", "oa", 3)
    assert (b.target, b.target_root, b.target_layout, b.target_split, b.output) == ("b", "rb", "food101", "test", "ob")
    assert IW.MultiWeightsJob.of([a, b]) == jobs
    nd, _ = ND.job_from_args(["--index", "i", "--labels", "l", "--checkpoint", "c", "--embeddings", "e",
                              "--target", "a", "--target-root", "ra", "--splits", "train", "--output", "oa",
                              "--target", "b", "--target-root", "rb", "--output", "ob"])
    a, b = nd.jobs()
    assert (a.target_name, a.splits, a.output, a.embeddings) == ("a", ("train",), "oa", "e")
    assert (b.target_name, b.splits, b.output, b.embeddings) == ("b", ("train", "test"), "ob", "e")
    # One --target: the single-target command line, flags in any order (as before).
    single, _ = ND.job_from_args(["--output", "o", "--target-root", "r", "--index", "i", "--labels", "l",
                                  "--checkpoint", "c"])
    assert isinstance(single, ND.NearDuplicatesJob) and single.target_name == "r"
    with pytest.raises(ValueError, match="--output oa comes before the first --target"):
        target_groups({"per_target_order": [("output", "oa", "--output"), ("target", "a", "--target"),
                                            ("target", "b", "--target")]})
    with pytest.raises(ValueError, match="--output is given twice for target a"):
        target_groups({"per_target_order": [("target", "a", "--target"), ("output", "1", "--output"),
                                            ("output", "2", "--output"), ("target", "b", "--target")]})
    with pytest.raises(ValueError, match="several targets write"):
        IW.MultiWeightsJob.of([a_w := IW.WeightsJob("i", "l", "o", "r"), a_w]).check()
    with pytest.raises(ValueError, match="the targets of one run share --threshold"):
        ND.MultiNearDuplicatesJob.of([a, ND.NearDuplicatesJob(**{**a.__dict__, "output": "x",
                                                                 "threshold": 0.5})]).check()


def test_weights_of_three_targets_are_their_single_runs_and_the_source_is_read_once(
        source_data, food, vehicles, generalist, tmp_path):
    targets = [("food", food.root, "food101", tmp_path / "many" / "food"),
               ("vehicles", vehicles.root, "imagefolder", tmp_path / "many" / "vehicles"),
               ("food_test", food.root, "food101", tmp_path / "many" / "food_test")]
    job, beam_args = IW.job_from_args(weights_args(source_data, generalist, targets))
    job = IW.MultiWeightsJob.of([j if j.target != "food_test" else IW.WeightsJob(**{**j.__dict__,
                                                                                     "target_split": "test"})
                                 for j in job.jobs()])
    many = IW.run_targets(job, beam_args).check()
    assert [o.name for o in many.outcomes] == ["food", "vehicles", "food_test"]
    # The source's labels are counted once for the three targets; every target image goes through once.
    assert many.counters["label_counts/source_examples"] == source_data.num_examples
    images = sum(len(list_target(j.target_root, j.target_layout, j.target_split).paths) for j in job.jobs())
    assert many.counters["target_histogram/images_read"] == images
    for single in job.jobs():
        out = tmp_path / "single" / single.target
        summary = IW.run(IW.WeightsJob(**{**single.__dict__, "output": str(out)}), BEAM)
        assert summary == next(o.summary for o in many.outcomes if o.name == single.target)
        same_bytes("importance_weights", out, tmp_path / "many" / single.target)
    # Run again as the composed commands do: each target is reused, nothing is built.
    engines = stages.Engines(beam_args=tuple(beam_args), log=lambda line: None)
    again = stages.weights_many(job.jobs(), engines)
    assert [s["reused"] for s in again] == [True] * 3 and (engines.reused, engines.built) == (3, 0)
    assert [s["target"] for s in again] == ["food", "vehicles", "food_test"]


def test_one_targets_bad_images_fail_it_alone_and_a_rerun_builds_only_it(
        source_data, food, vehicles, generalist, tmp_path, capsys):
    bad_root = tmp_path / "vehicles"
    shutil.copytree(vehicles.root, bad_root)
    broken = sorted(list_target(str(bad_root), "imagefolder", "train").paths)[:2]
    for path in broken:
        open(path, "wb").write(b"not an image")
    food_out, bad = tmp_path / "out" / "food", tmp_path / "out" / "vehicles"
    args = weights_args(source_data, generalist, [("food", food.root, "food101", food_out),
                                                  ("vehicles", str(bad_root), "imagefolder", bad)])
    assert IW.main([*args, *BEAM]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("importance_weights: food: ") and len(out.splitlines()) == 1
    assert f"importance_weights: error: target vehicles ({bad}): 2 of 20 target images are unreadable" in err
    assert f"first: {broken[0]} (" in err and len(err.strip().splitlines()) == 1
    assert (food_out / SUCCESS).exists() and not bad.exists()
    assert [n for n in os.listdir(tmp_path / "out") if n.startswith(".")] == []  # no build left behind
    # A target whose listing is bad fails at its check, before any output is touched.
    missing = IW.run_targets(IW.job_from_args([*weights_args(
        source_data, generalist, [("food", food.root, "food101", food_out),
                                  ("gone", str(tmp_path / "gone"), "imagefolder", tmp_path / "out" / "gone")])])[0],
        BEAM, quiet=True)
    assert missing.outcomes[0].reused and "gone" in missing.outcomes[1].error
    assert not (tmp_path / "out" / "gone").exists()
    # Mended: the rerun reuses food and builds vehicles alone.
    before = (food_out / "weights.parquet").stat().st_mtime_ns
    for path, good in zip(broken, sorted(list_target(vehicles.root, "imagefolder", "train").paths)):
        shutil.copyfile(good, path)
    rerun = IW.run_targets(IW.job_from_args(args)[0], BEAM, quiet=True).check()
    assert [o.reused for o in rerun.outcomes] == [True, False] and (bad / SUCCESS).exists()
    assert (food_out / "weights.parquet").stat().st_mtime_ns == before
    assert rerun.counters["target_histogram/images_read"] == 20  # only vehicles' train images


def test_near_duplicates_of_two_targets_are_their_single_runs_from_one_read_of_the_source(
        source_data, small_index, food, vehicles, generalist, tmp_path):
    store = str(tmp_path / "store")
    jobs = [ND.NearDuplicatesJob(small_index, source_data.labels_path, food.root, generalist,
                                 str(tmp_path / "many" / "food"), target_layout="food101", threshold=-1.0,
                                 embeddings=store, batch_size=16, target="food"),
            ND.NearDuplicatesJob(small_index, source_data.labels_path, vehicles.root, generalist,
                                 str(tmp_path / "many" / "vehicles"), threshold=-1.0, embeddings=store,
                                 batch_size=16, target="vehicles")]
    # The first run embeds the source once (and writes the store), for both targets.
    made = ND.run_targets(ND.MultiNearDuplicatesJob.of(jobs), BEAM).check()
    assert made.counters["near_duplicates/source_images_read"] == 120
    assert made.counters["near_duplicates/source_examples_compared"] == 2 * 120
    # Each target's single-target run (reading the store: its rows read once a run) writes
    # the same bytes; the summaries differ only in saying who made the store.
    for job in jobs:
        out, many = tmp_path / "single" / job.target, tmp_path / "many" / job.target
        single = ND.run(ND.NearDuplicatesJob(**{**job.__dict__, "output": str(out)}), BEAM)
        assert single["embeddings"]["reused"] is True
        assert (out / "exclude.parquet").read_bytes() == (many / "exclude.parquet").read_bytes()
        assert pq.read_metadata(out / "exclude.parquet").num_rows == 120  # threshold -1: every best match
        made_here = json.loads((many / "summary.json").read_text())
        assert made_here["embeddings"].pop("reused") is False
        assert {**made_here, "embeddings": {**made_here["embeddings"], "reused": True}} == \
            json.loads((out / "summary.json").read_text())
