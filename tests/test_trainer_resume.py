"""Resuming pre-training on another number of ranks (issue 26) and refusing
a resume with other settings (issue 25).

The stream's sample accounting is checked with the real loaders (a
``ShardStream`` per rank, in a DataLoader with worker processes), stopped
and resumed the way ``trainer.pretrain`` does it (every rank's lane
positions gathered into the checkpoint's record, read back on the new
layout): within the interrupted epoch every sample is seen exactly once,
none twice, none skipped; the resumed run is deterministic. The CLI runs
record the keys each rank trained on (``--log-samples``) across the change.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, free_port, run_module
from tests.trainer_data import all_keys, write_labels, write_shard_dir
from trainer.data import LoaderConfig, LoaderState, ShardStream, collate, read_shard_list
from trainer.lanes import LaneLayout, lane_epoch_start, lane_shards, lane_sizes, reader_lanes
from trainer.resume import differences, layout_change, saved_stream, stream_record
from trainer.transforms import PreprocessSpec

SIZES = [23, 17, 20, 31, 12, 25, 19, 28]  # uneven shards: lanes finish their epochs at different steps


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_shard_dir(tmp_path_factory.mktemp("lanes") / "shards", SIZES, copies=2)


# -- pure parts -------------------------------------------------------------------------------

def test_lanes_of_a_fresh_run_are_todays_rank_and_worker_split():
    # A fresh run on W ranks x w workers: lane l is (rank l % W, worker l // W), which reads
    # every (W*w)-th shard of the epoch's order from position l, as before the lanes.
    for world, workers in [(1, 1), (1, 3), (2, 2), (4, 1), (3, 2)]:
        layout = LaneLayout.fresh(world, workers)
        for rank in range(world):
            for worker in range(workers):
                assert reader_lanes(layout, rank, world, worker, workers) == [rank + world * worker]
                assert layout.key(rank + world * worker) == (rank, worker)
        for epoch in range(3):
            shards = sorted(i for lane in range(layout.lanes) for i in lane_shards(12, 5, epoch, lane, layout.lanes))
            assert shards == list(range(12))  # every shard in exactly one lane


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 4), (2, 1), (2, 2), (3, 1), (4, 2)])
def test_every_lane_has_exactly_one_reader_on_any_layout(world, workers):
    layout = LaneLayout.fresh(4, 2)  # 8 lanes
    read = [lane for r in range(world) for w in range(workers) for lane in reader_lanes(layout, r, world, w, workers)]
    assert sorted(read) == list(range(8))


def test_whole_epochs_are_skipped_from_the_manifest_counts():
    counts = [5, 7, 3, 9]
    sizes = lane_sizes(counts, seed=1, lane=1, lanes=2)
    e0, e1 = sizes(0), sizes(1)
    assert e0 + sizes(0) == 2 * e0 and sum(counts) - e0 == lane_sizes(counts, 1, 0, 2)(0)
    assert lane_epoch_start(0, sizes) == (0, 0)
    assert lane_epoch_start(e0 - 1, sizes) == (0, 0)
    assert lane_epoch_start(e0, sizes) == (1, e0)
    assert lane_epoch_start(e0 + e1 + 2, sizes) == (2, e0 + e1)


def test_the_layout_change_line_and_the_settings_that_differ():
    saved = saved_stream({"stream": {"lanes": 8, "origin_ranks": 4, "positions": [0] * 8, "corrupt": 0,
                                     "world_size": 4, "workers": 2, "batches": 3}})
    assert layout_change(saved, 4, 2, 64) is None
    assert layout_change(saved, 2, 2, 64) == (
        "[resume] world size 4 -> 2, loader workers per rank 2 -> 2, batch per rank 16 -> 32 (global 64); the "
        "stream's 8 lanes continue where they stopped (up to 4 per rank)")
    assert saved.default_workers(4) == 2 and saved.default_workers(8) == 1 and saved.default_workers(1) == 2
    with pytest.raises(ValueError, match=r"the stream has 8 lane\(s\).*2 rank\(s\) x 5 loader worker\(s\) cannot "
                                         r"each read one: use at most 4 worker\(s\) per rank"):
        saved.state_for(0, 2, 5)
    with pytest.raises(ValueError, match="at most 8 ranks"):
        saved.state_for(0, 9, 1)
    assert differences({"lr": 0.1, "batch_size": 32, "code": "a"}, {"lr": 0.2, "batch_size": 32, "code": "b"}) \
        == ["lr 0.1 -> 0.2"]


def test_checkpoints_from_before_the_lanes_are_read_as_their_lanes():
    # The old record: per rank [batches, corrupt, position of worker 0, worker 1].
    saved = saved_stream({"loader": [[6, 1, 40, 44], [6, 2, 41, 45]], "loader_workers": 2})
    assert saved.layout == LaneLayout(4, 2) and saved.positions == (40, 41, 44, 45)
    assert (saved.corrupt, saved.world_size, saved.workers, saved.batches) == (3, 2, 2, 6)


# -- the loaders, stopped and resumed on another layout ----------------------------------------

class Ranks:
    """``world`` ranks' loaders over ``manifest`` (each a DataLoader with ``workers`` processes)."""

    def __init__(self, manifest, world, workers, states, micro):
        config = LoaderConfig.for_shards(read_shard_list(manifest), PreprocessSpec(8), seed=11, shuffle_buffer=7)
        self.states = states
        self.iters = [iter(torch.utils.data.DataLoader(ShardStream(config, r, world, states[r]), batch_size=micro,
                                                       num_workers=workers, collate_fn=collate))
                      for r in range(world)]

    def step(self):
        """One step: a batch from every rank; their (key, epoch) pairs, per rank."""
        out = []
        for state, it in zip(self.states, self.iters):
            batch = next(it)
            state.update(batch)
            out.append(list(zip(batch.keys, batch.epochs)))
        return out

    def checkpoint(self, workers):
        gathered = [[s.batches, s.corrupt, *s.positions] for s in self.states]
        return {"stream": stream_record(gathered, self.states[0].bind(len(gathered)), workers)}


def _run(manifest, before, after, stop, total, global_batch=12):
    """Steps 1..stop on layout ``before`` (ranks, workers), then a resume on
    ``after`` to step ``total``; the (key, epoch) pairs trained on, per step and rank."""
    (w0, n0), (w1, n1) = before, after
    first = Ranks(manifest, w0, n0, [LoaderState(workers=n0) for _ in range(w0)], global_batch // w0)
    seen = [first.step() for _ in range(stop)]
    saved = saved_stream(first.checkpoint(n0))
    second = Ranks(manifest, w1, n1, [saved.state_for(r, w1, n1) for r in range(w1)], global_batch // w1)
    seen += [second.step() for _ in range(total - stop)]
    return seen


@pytest.mark.parametrize("before,after", [((1, 2), (2, 1)), ((2, 1), (1, 2)), ((2, 1), (1, 1)),
                                          ((4, 1), (2, 1)), ((2, 2), (3, 1))])
def test_a_resume_on_another_layout_sees_every_sample_of_the_epoch_exactly_once(manifest, before, after):
    keys = all_keys(manifest)
    assert len(keys) == sum(SIZES) == len(set(keys))  # copies are distinct samples (their keys say the copy)
    total = 2 * sum(SIZES) // 12  # about two epochs
    seen = _run(manifest, before, after, stop=5, total=total)
    epoch0 = collections.Counter(k for step in seen for rank in step for k, e in rank if e == 0)
    epoch1 = collections.Counter(k for step in seen for rank in step for k, e in rank if e == 1)
    assert set(epoch0) == set(keys) and max(epoch0.values()) == 1  # none skipped, none twice
    assert max(epoch1.values()) == 1
    # Ranks read disjoint samples at every step (a lane may already be in the next epoch).
    for step in seen:
        flat = [pair for rank in step for pair in rank]
        assert len(flat) == len(set(flat)) == 12
    # The resumed run is a function of the seed, the checkpoint and the new layout.
    assert _run(manifest, before, after, stop=5, total=total) == seen


def test_a_resume_on_the_same_layout_is_the_uninterrupted_run(manifest):
    straight = _run(manifest, (2, 1), (2, 1), stop=9, total=9)
    assert _run(manifest, (2, 1), (2, 1), stop=4, total=9) == straight
    assert _run(manifest, (1, 2), (1, 2), stop=3, total=7) == _run(manifest, (1, 2), (1, 2), stop=7, total=7)


def test_lanes_deep_in_a_later_epoch_resume_without_reading_the_earlier_ones(manifest, monkeypatch):
    import trainer.data as D

    config = LoaderConfig.for_shards(read_shard_list(manifest), PreprocessSpec(8), seed=11, shuffle_buffer=7)
    state = LoaderState(workers=1)
    straight = ShardStream(config, state=state)
    items = [s for _, s in zip(range(2 * sum(SIZES) + 5), straight)]
    position = items[-6].next_position  # in the third epoch
    opened = []
    real = D.shard_samples
    monkeypatch.setattr(D, "shard_samples", lambda url, **kw: (opened.append(url), real(url, **kw))[1])
    resumed = ShardStream(config, state=LoaderState(workers=1, positions=[position]))
    got = [s for _, s in zip(range(5), resumed)]
    assert [(g.key, g.epoch, g.next_position) for g in got] == [(i.key, i.epoch, i.next_position) for i in items[-5:]]
    assert got[0].epoch == 2 and len(opened) <= len(SIZES)  # the third epoch's shards only


# -- the CLI ---------------------------------------------------------------------------------

def _args(manifest, labels, out, *extra):
    return ["--shards", manifest, "--labels", labels, "--arch", "small", "--steps", "24", "--batch-size", "12",
            "--lr", "0.05", "--seed", "5", "--input-size", "16", "--shuffle-buffer", "7", "--log-every", "4",
            "--save-every", "4", "--log-samples", "--output", str(out), *extra]


def _launch(n, *args):
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(n), "--master_port",
           str(free_port()), "--module", "trainer.pretrain", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _trained_keys(out):
    by_epoch = collections.defaultdict(collections.Counter)
    steps = collections.Counter()
    for name in os.listdir(out / "samples"):
        for line in open(out / "samples" / name):
            record = json.loads(line)
            steps[record["step"]] += 1
            for key, epoch in zip(record["keys"], record["epochs"]):
                by_epoch[epoch][key] += 1
    return by_epoch, steps


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(1, 2), (4, 2)])
def test_pretrain_resumes_on_another_number_of_ranks(tmp_path, manifest, before, after):
    labels = write_labels(tmp_path / "labels.parquet")
    out = tmp_path / "run"
    first = ["--stop-after", "8", "--num-workers", "2" if before == 1 else "1"]
    if before == 1:
        run_module("trainer.pretrain", *_args(manifest, labels, out, *first))
    else:
        _launch(before, *_args(manifest, labels, out, *first))
    proc = _launch(after, *_args(manifest, labels, out, "--resume"))
    assert "[resume] from step000000008 (step 8)" in proc.stdout
    workers, lanes = (2, 2) if before == 1 else (1, 4)
    change = [line for line in proc.stdout.splitlines() if line.startswith("[resume] world size")]
    assert change == [f"[resume] world size {before} -> {after}, loader workers per rank {workers} -> 1, batch per "
                      f"rank {12 // before} -> {12 // after} (global 12); the stream's {lanes} lanes continue where "
                      f"they stopped (up to {lanes // after} per rank)"]
    by_epoch, steps = _trained_keys(out)
    assert sorted(steps) == list(range(1, 25))
    assert all(n == (before if s <= 8 else after) for s, n in steps.items())  # each rank logged each step
    assert sum(sum(c.values()) for c in by_epoch.values()) == 24 * 12
    # The interrupted epoch: every sample the manifest holds exactly once; the later ones so far without repeats.
    assert set(by_epoch[0]) == set(all_keys(manifest)) and max(by_epoch[0].values()) == 1
    assert all(max(c.values()) == 1 for c in by_epoch.values()) and 1 in by_epoch
    reports = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(after)]
    assert len({r["parameters_sha256"] for r in reports}) == 1 and {r["world_size"] for r in reports} == {after}
    assert (out / "_SUCCESS").exists() and (out / "generalist.pt").exists()


def test_pretrain_resume_refuses_other_settings_naming_each(tmp_path, manifest):
    labels = write_labels(tmp_path / "labels.parquet")
    other = write_shard_dir(tmp_path / "other", [9, 9], seed=3)
    out = tmp_path / "run"
    base = ["--shards", manifest, "--labels", labels, "--arch", "small", "--steps", "6", "--batch-size", "8",
            "--lr", "0.05", "--seed", "5", "--input-size", "16", "--num-workers", "2", "--output", str(out)]
    run_module("trainer.pretrain", *base, "--stop-after", "2", "--save-every", "2")
    saved = sorted(os.listdir(out / "checkpoints"))

    def refused(*changes, names):
        args = list(base)
        for flag, value in changes:
            args[args.index(flag) + 1] = value
        proc = run_module("trainer.pretrain", *args, "--resume", check=False)
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
        assert errors[0].startswith("pretrain: error: checkpoint step000000002 was trained with other settings: ")
        for name in names:
            assert f" {name} " in errors[0] or f": {name} " in errors[0], (name, errors[0])
        assert sorted(os.listdir(out / "checkpoints")) == saved and "step 3/" not in proc.stdout

    refused(("--shards", other), names=["shards"])
    refused(("--batch-size", "16"), names=["batch_size"])
    refused(("--lr", "0.1"), names=["lr"])
    refused(("--steps", "8"), names=["steps"])  # the schedule
    refused(("--batch-size", "16"), ("--lr", "0.1"), ("--input-size", "24"), names=["batch_size", "lr", "input_size"])
    # More loader workers than the stream has lanes: refused in one line.
    args = list(base)
    args[args.index("--num-workers") + 1] = "3"
    proc = run_module("trainer.pretrain", *args, "--resume", check=False)
    assert proc.returncode == 1 and "pretrain: error: the stream has 2 lane(s) (fixed when the run started); 1 " \
        "rank(s) x 3 loader worker(s) cannot each read one: use at most 2 worker(s) per rank" in proc.stderr
    # The same settings resume, on fewer loader workers too (one reads both lanes).
    args[args.index("--num-workers") + 1] = "1"
    proc = run_module("trainer.pretrain", *args, "--resume")
    assert "[resume] from step000000002 (step 2)" in proc.stdout and (out / "_SUCCESS").exists()
    assert "[resume] world size 1 -> 1, loader workers per rank 2 -> 1, batch per rank 8 -> 8 (global 8); the " \
        "stream's 2 lanes continue where they stopped (up to 2 per rank)" in proc.stdout
