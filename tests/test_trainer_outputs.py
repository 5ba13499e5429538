"""The trainer in the house's shape (issue 24) and its curves (issue 26):
typed jobs behind the CLIs, one name per concept with the old spellings
kept as hidden aliases, the one reuse rule for finetune and evaluate (the
fingerprint in pretrain's marker), TensorBoard event files read back, the
progress line, and the uint8 fine-tuning path equal to the float one."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr

import numpy as np
import pytest
import torch

from schemas.stage_output import fingerprint_of
from tests.helpers import run_module
from tests.trainer_data import write_labels, write_shard_dir
from trainer import evaluate as EV
from trainer import finetune as FT
from trainer import pretrain as PT
from trainer.curves import Progress, truncate_jsonl
from trainer.data import TargetDataset
from trainer.evaluation import evaluate
from trainer.models import SmallCNN
from trainer.transforms import PreprocessSpec, normalise_batch


# -- typed jobs and one name per concept ------------------------------------------------------------

def test_the_clis_build_typed_jobs():
    job = PT.job_from_args(PT.build_parser().parse_args(
        ["--shards", "m.json", "--labels", "l.parquet", "--arch", "small", "--steps", "5", "--batch-size", "8",
         "--output", "o", "--resume"]))
    assert job == PT.PretrainJob(shards="m.json", labels="l.parquet", output="o", steps=5, batch_size=8,
                                 resume=True)
    job = FT.job_from_args(FT.build_parser().parse_args(
        ["--target-layout", "food101", "--target-root", "r", "--init", "none", "--steps", "3", "--output", "o"]))
    assert job == FT.FinetuneJob(target_layout="food101", target_root="r", init="none", output="o", steps=3)
    assert job.init_path is None
    job = EV.job_from_args(EV.build_parser().parse_args(
        ["--target-layout", "food101", "--target-root", "r", "--checkpoint", "m.pt", "--output", "o"]))
    assert job == EV.EvaluateJob(target_layout="food101", target_root="r", checkpoint="m.pt", output="o")
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        PT.PretrainJob(shards="m", labels="l", output="o", steps=1, batch_size=1, resume=True, overwrite=True)


@pytest.mark.parametrize("module,argv,old,new,field,value", [
    (PT, ["--shards", "m", "--labels", "l", "--steps", "1", "--batch-size", "1", "--output", "o"],
     "--model", "--arch", "arch", "small"),
    (FT, ["--target-root", "r", "--init", "none", "--steps", "1", "--output", "o", "--target-layout", "food101"],
     "--model", "--arch", "arch", "small"),
    (FT, ["--target-root", "r", "--init", "none", "--steps", "1", "--output", "o"],
     "--target", "--target-layout", "target_layout", "food101"),
    (EV, ["--target-root", "r", "--checkpoint", "m.pt", "--output", "o"],
     "--target", "--target-layout", "target_layout", "food101"),
])
def test_old_spellings_still_work_say_so_and_are_hidden(module, argv, old, new, field, value):
    parser = module.build_parser()
    err = io.StringIO()
    with redirect_stderr(err):
        args = parser.parse_args([*argv, old, value])
    assert getattr(args, field) == value
    assert err.getvalue() == f"{parser.prog}: {old} is deprecated; use {new}\n"
    help_text = parser.format_help()
    assert f"{new} " in help_text and f"{old} " not in help_text.replace(f"{old}-", "")


def test_help_names_the_new_flags_only():
    for module in ("trainer.pretrain", "trainer.finetune", "trainer.evaluate", "trainer.ops"):
        proc = run_module(module, "--help", timeout=120)
        assert proc.returncode == 0 and "--model" not in proc.stdout and "--target " not in proc.stdout
    assert "--arch" in run_module("trainer.pretrain", "--help").stdout


# -- fine-tuning's uint8 batches -------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from adaptive_transfer.synthetic import TargetSpec, generate_target
    return generate_target(str(tmp_path_factory.mktemp("target")),
                           TargetSpec(layout="imagefolder", branch="animal", num_classes=3, train_per_class=6,
                                      test_per_class=4))


@pytest.mark.parametrize("scaling", ["none", "draft"])
def test_uint8_fine_tuning_batches_equal_the_float_path(target, scaling):
    spec = PreprocessSpec(24)
    for train in (True, False):
        floats = TargetDataset(target.root, "imagefolder", "train", spec, train=train, seed=3, decode_scaling=scaling)
        u8 = TargetDataset(target.root, "imagefolder", "train", spec, train=train, seed=3, decode_scaling=scaling,
                           normalise=False)
        for epoch in (0, 1):
            floats.epoch = u8.epoch = epoch
            for i in range(len(floats)):
                (x, y), (z, w) = floats[i], u8[i]
                assert z.dtype == torch.uint8 and y == w
                assert torch.equal(normalise_batch(z, spec), x)
    torch.manual_seed(0)
    model = SmallCNN(3).eval()
    test_float = TargetDataset(target.root, "imagefolder", "test", spec, train=False)
    test_u8 = TargetDataset(target.root, "imagefolder", "test", spec, train=False, normalise=False)
    assert evaluate(model, test_u8, test_u8.classes, torch.device("cpu"), batch_size=5) == \
        evaluate(model, test_float, test_float.classes, torch.device("cpu"), batch_size=5)


# -- the progress line -------------------------------------------------------------------------------

class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_lines_on_a_terminal_and_in_a_log_file():
    terminal, log = _Stream(True), _Stream(False)
    for stream in (terminal, log):
        progress = Progress(100, 0, 32, every=10, stream=stream)
        for step in range(100):
            progress.update(step, 1.0, 0.1, wait=0.0)
    assert [line.split()[1] for line in terminal.getvalue().splitlines()] == [f"{s}/100" for s in range(10, 101, 10)]
    # A log file: the first line, then at most one per LOG_FILE_SECONDS, and the last step.
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/100", "100/100"]
    assert "img/s" in lines[-1] and "data wait" in lines[-1] and "ETA" in lines[-1]


def test_records_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6, 8)))
    truncate_jsonl(str(path), 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]


# -- curves, reuse and the marker, through the CLIs ----------------------------------------------------

def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def generalist(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    manifest = write_shard_dir(root / "shards", [20, 20, 20, 20])
    labels = write_labels(root / "labels.parquet")
    out = root / "run"
    args = ["--shards", manifest, "--labels", labels, "--arch", "small", "--steps", "12", "--batch-size", "8",
            "--lr", "0.05", "--input-size", "16", "--num-workers", "2", "--log-every", "4", "--save-every", "4",
            "--output", str(out)]
    run_module("trainer.pretrain", *args, "--stop-after", "8")
    run_module("trainer.pretrain", *args, "--resume")
    return out, args


def test_pretrain_writes_tensorboard_curves_and_its_fingerprint(generalist):
    out, args = generalist
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [4, 8, 12]  # one per --log-every, across the resume
    scalars = _scalars(out / "tensorboard")
    assert set(scalars) == {"train/loss", "train/lr", "train/images_per_second", "train/data_wait_seconds"}
    for tag in scalars:
        assert [s for s, _ in scalars[tag]] == [4, 8, 12]
    for (step, loss), record in zip(scalars["train/loss"], records):
        window = [r["loss"] for r in log if step - 4 < r["step"] <= step]
        assert loss == pytest.approx(np.mean(window), rel=1e-6) == pytest.approx(record["loss"], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([log[s - 1]["lr"] for s in (4, 8, 12)], rel=1e-6)
    assert all(v > 0 for _, v in scalars["train/images_per_second"])
    assert all(v >= 0 for _, v in scalars["train/data_wait_seconds"])
    recorded = fingerprint_of(str(out))["settings"]
    assert recorded["lr"] == 0.05 and recorded["batch_size"] == 8 and recorded["code"] and recorded["shards"]
    assert "num_workers" not in recorded and "world_size" not in recorded
    # A finished run is reused with the same settings (other loader workers: the same result) ...
    again = list(args)
    again[again.index("--num-workers") + 1] = "1"
    proc = run_module("trainer.pretrain", *again)
    assert f"pretrain: {out} is complete (_SUCCESS); nothing to do" in proc.stderr
    # ... and refused, naming what differs, with others.
    again[again.index("--lr") + 1] = "0.07"
    proc = run_module("trainer.pretrain", *again, check=False)
    assert proc.returncode == 1 and "made from other lr;" in proc.stderr, proc.stderr[-2000:]


def test_finetune_curves_uint8_and_the_reuse_rule(generalist, target, tmp_path):
    out, _ = generalist
    ft = tmp_path / "ft"
    args = ["--target-layout", "imagefolder", "--target-root", target.root, "--init", str(out / "generalist.pt"),
            "--steps", "6", "--batch-size", "6", "--lr", "0.05", "--log-every", "3", "--num-workers", "1",
            "--output", str(ft)]
    run_module("trainer.finetune", *args)
    metrics = json.loads((ft / "metrics.json").read_text())
    assert sorted(os.listdir(ft)) == ["_STAGE", "_SUCCESS", "metrics.json", "metrics.jsonl", "model.pt",
                                      "tensorboard"]
    scalars = _scalars(ft / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [3, 6]
    assert scalars["train/loss"][1][1] == pytest.approx(np.mean([c["loss"] for c in metrics["curve"][3:]]), rel=1e-6)
    assert scalars["eval/top1"] == [(6, pytest.approx(metrics["top1"]))]
    assert scalars["eval/mean_per_class_accuracy"] == [(6, pytest.approx(metrics["mean_per_class_accuracy"]))]
    settings = fingerprint_of(str(ft))["settings"]
    assert settings["init"] == metrics["init_fingerprint"] and "num_workers" not in settings and settings["code"]
    # Other loader workers: the same result, reused. Another learning rate: refused, naming it.
    workers = list(args)
    workers[workers.index("--num-workers") + 1] = "0"
    assert "nothing to do" in run_module("trainer.finetune", *workers).stderr
    lr = list(args)
    lr[lr.index("--lr") + 1] = "0.02"
    proc = run_module("trainer.finetune", *lr, check=False)
    assert proc.returncode == 1 and "made from other lr;" in proc.stderr and "--overwrite" in proc.stderr
    assert json.loads((ft / "metrics.json").read_text()) == metrics
    run_module("trainer.finetune", *lr, "--overwrite")
    assert json.loads((ft / "metrics.json").read_text())["lr"] == 0.02
    # evaluate: reused across batch sizes, refused for another checkpoint
    ev = tmp_path / "ev"
    base = ["--target-layout", "imagefolder", "--target-root", target.root, "--output", str(ev)]
    run_module("trainer.evaluate", *base, "--checkpoint", str(ft / "model.pt"))
    proc = run_module("trainer.evaluate", *base, "--checkpoint", str(ft / "model.pt"), "--batch-size", "3")
    assert "nothing to do" in proc.stderr
    other = tmp_path / "other.pt"
    other.write_bytes((ft / "model.pt").read_bytes())
    torch.save({**torch.load(str(other), weights_only=True), "extra": {"copy": 1}}, str(other))
    proc = run_module("trainer.evaluate", *base, "--checkpoint", str(other), check=False)
    assert proc.returncode == 1 and "made from other checkpoint;" in proc.stderr
