"""trainer: schedule and targets, the resumable shard stream, and real
DeepSpeed runs (one process, two ranks, two nodes on loopback, resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from schemas import io as sio
from schemas.targets import list_target, read_item_bytes
from spark_jobs import resample as R
from spark_jobs import write_shards as W
from tests.helpers import free_port, ROOT, reference_weights, run_module, write_weights
from trainer import runtime as RT
from trainer.data import LoaderConfig, LoaderState, ShardStream, collate, shard_urls, soft_targets
from trainer.finetune import index_batches
from trainer.models import load_finetuned, load_generalist, read_generalist
from trainer.optim import default_lr, default_warmup, warmup_cosine
from trainer.transforms import PreprocessSpec, decode_image, eval_transform


# -- pure parts ------------------------------------------------------------------------------

def test_warmup_then_cosine():
    values = [warmup_cosine(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and values[-1] < 0.01
    assert default_warmup(2_000_000, "pretrain") == 20_000 and default_warmup(20_000, "finetune") == 2_000
    assert default_warmup(300, "pretrain") == 3 and default_lr(1024, "pretrain") == pytest.approx(0.4)


MIXED_PRECISION_STEP = """
import json, torch, torch.nn.functional as F
from trainer import runtime as RT
from trainer.models import SmallCNN
from trainer.optim import deepspeed_config, make_optimizer, make_scheduler
info = RT.setup_distributed()
torch.manual_seed(0)
model = SmallCNN(5)
opt = make_optimizer(model, 0.1)
engine, opt, sched = RT.initialize(model, opt, make_scheduler(opt, 10, 1),
                                   deepspeed_config(8, 1, bf16=True, log_every=1000))
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
before = engine.module.fc.weight.detach().clone()
logits = engine(x)
loss = F.cross_entropy(logits.float(), y)
engine.backward(loss)
engine.step()
bn = engine.module.features[1]
print(json.dumps({"logits": str(logits.dtype), "weight": str(engine.module.fc.weight.dtype),
                  "running_mean": str(bn.running_mean.dtype), "loss": loss.item(),
                  "moved": (engine.module.fc.weight - before).abs().max().item()}))
"""


def test_mixed_precision_is_autocast_with_fp32_weights_and_batch_norm():
    # DeepSpeed's own "bf16" mode casts the weights but keeps fp32 batch-norm
    # buffers, which cuDNN's batch-norm backward rejects (seen on an H100); the
    # trainer asks for autocast instead. Run on CPU here: one real step.
    from trainer.optim import deepspeed_config
    config = deepspeed_config(256, 2, bf16=True, log_every=10)
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in config
    assert "torch_autocast" not in deepspeed_config(256, 2, bf16=False, log_every=10)
    proc = subprocess.run([sys.executable, "-c", MIXED_PRECISION_STEP], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["logits"] == "torch.bfloat16"  # computed in bfloat16 ...
    assert out["weight"] == out["running_mean"] == "torch.float32"  # ... from fp32 weights and statistics
    assert np.isfinite(out["loss"]) and out["moved"] > 0


def test_soft_targets_are_normalised_multi_hot():
    t = soft_targets([[3], [3, 7], [9, 99]], {3: 0, 7: 1, 9: 2}, 3)
    assert t.tolist() == [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]


def test_finetune_index_batches_are_disjoint_across_ranks():
    a = [b for _, b in zip(range(4), index_batches(20, 5, 0, 2, seed=1))]
    b = [b for _, b in zip(range(4), index_batches(20, 5, 1, 2, seed=1))]
    first_epoch_a = {i for batch in a[:2] for i in batch}
    first_epoch_b = {i for batch in b[:2] for i in batch}
    assert not first_epoch_a & first_epoch_b and len(first_epoch_a | first_epoch_b) == 20
    assert a == [b for _, b in zip(range(4), index_batches(20, 5, 0, 2, seed=1))]
    assert all(20 <= i < 40 for batch in a[2:] for i in batch)  # epoch 1 positions


# -- shards for the trainer --------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(spark, source_data, tmp_path_factory):
    """2,000 samples in 8 shards written by the project's own writer."""
    root = tmp_path_factory.mktemp("trainer")
    weights = write_weights(str(root / "weights.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=4))
    R.run(spark, R.ResampleJob(index=source_data.index_path, weights=weights, size=2000, draw="systematic",
                               output=str(root / "resampled")))
    W.run(spark, W.ShardJob(selection=str(root / "resampled"), index=source_data.index_path,
                            output=str(root / "shards"), samples_per_shard=250))
    return str(root / "shards" / "manifest.json"), source_data.labels_path, root


def first_batches(stream: ShardStream, n: int, batch: int, workers: int):
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=collate)
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_stream_resumes_exactly_where_it_stopped(shards):
    urls = shard_urls(shards[0])
    spec = PreprocessSpec(32)
    make = lambda state: ShardStream(LoaderConfig(urls, spec, seed=3, shuffle_buffer=50), state=state)  # noqa: E731
    straight = first_batches(make(LoaderState(workers=2)), 7, 16, workers=2)
    state = LoaderState(workers=2)
    for batch in first_batches(make(state), 3, 16, workers=2):
        state.update(batch)
    resumed = first_batches(make(LoaderState(**state.to_dict())), 4, 16, workers=2)
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_ranks_and_workers_read_disjoint_shards(shards):
    urls = shard_urls(shards[0])
    seen = []
    for rank in range(2):
        stream = ShardStream(LoaderConfig(urls, PreprocessSpec(32), seed=0), rank, 2, LoaderState(workers=2))
        for worker in range(2):
            seen.append(set(stream.shards_for(0, worker, 2)))
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert set().union(*seen) == set(urls)
    with pytest.raises(ValueError, match="8 shards cannot give each of 4 rank"):
        ShardStream(LoaderConfig(urls, PreprocessSpec(32)), world_size=4).check_split(3)


def test_corrupt_samples_are_counted_and_skipped(tmp_path):
    from adaptive_transfer.synthetic import encode_image
    from schemas.shard_format import sample_json, sample_key, write_tar
    good = encode_image(np.zeros((8, 8, 3), np.uint8))
    samples = [(sample_key(f"k{i}", 0), "jpg", good if i != 2 else b"\xff\xd8\xff broken",
                sample_json(f"k{i}", 0, [1], 1.0)) for i in range(6)]
    with open(tmp_path / "s-000000.tar", "wb") as fh:
        write_tar(fh, samples)
    stream = ShardStream(LoaderConfig([str(tmp_path / "s-000000.tar")], PreprocessSpec(8), shuffle_buffer=1))
    got = []
    for item in stream:
        got.append(item)
        if len(got) == 5:
            break
    assert [g[3] for g in got] == [1, 2, 4, 5, 6]  # position 3 (sample k2) skipped
    assert [g[4] for g in got] == [0, 0, 1, 0, 0]


def test_shard_urls(tmp_path, shards):
    assert shard_urls("d/shard-{000000..000002}.tar") == ["d/shard-000000.tar", "d/shard-000001.tar",
                                                           "d/shard-000002.tar"]
    assert len(shard_urls(shards[0])) == 8
    os.makedirs(tmp_path / "unfinished")
    (tmp_path / "unfinished" / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no _SUCCESS"):
        shard_urls(str(tmp_path / "unfinished" / "manifest.json"))


def test_resume_skips_an_incomplete_latest(tmp_path):
    for step in (2, 4):
        folder = tmp_path / RT.tag_for(step)
        folder.mkdir()
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    (tmp_path / RT.tag_for(2) / "COMPLETE").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 2}}))
    (tmp_path / "latest").write_text(RT.tag_for(4))  # step 4 was cut off before its marker
    assert RT.resume_tag(str(tmp_path)) == RT.tag_for(2)
    (tmp_path / RT.tag_for(4) / "COMPLETE").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 9}}))
    assert RT.resume_tag(str(tmp_path)) == RT.tag_for(2)  # sizes disagree: still incomplete
    assert RT.resume_tag(str(tmp_path / "nothing")) is None


# -- DeepSpeed runs ------------------------------------------------------------------------------

def pretrain_args(shards, out, steps, *extra):
    manifest, labels, _ = shards
    return ["--shards", manifest, "--labels", labels, "--arch", "small", "--steps", str(steps),
            "--batch-size", "32", "--lr", "0.05", "--seed", "7", "--log-every", "5", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def pretrained(shards):
    out = shards[2] / "pretrain"
    proc = run_module("trainer.pretrain", *pretrain_args(shards, out, 40, "--num-workers", "2",
                                                         "--warmup-steps", "4"))
    return out, proc


def test_pretrain_one_process(pretrained, shards):
    out, proc = pretrained
    assert "step 40/40" in proc.stdout and "img/s" in proc.stdout and "ETA" in proc.stdout
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < first - 0.3, (first, last)
    lrs = [r["lr"] for r in log]
    assert lrs[0] == pytest.approx(0.05 / 4) and lrs[3] == pytest.approx(0.05)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 1e-3  # then cosine to ~0
    model, preprocess = load_generalist(str(out / "generalist.pt"), shards[1])
    assert model.fc.out_features == sio.read_parquet(shards[1]).num_rows
    assert len([t for t in os.listdir(out / "checkpoints") if t.startswith("step")]) == 3  # --keep-checkpoints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_done"] == 40 and metrics["corrupt_samples_skipped"] == 0


def test_resume_gives_the_same_parameters(shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_module("trainer.pretrain", *pretrain_args(shards, straight, 8, "--num-workers", "2"))
    run_module("trainer.pretrain", *pretrain_args(shards, resumed, 8, "--num-workers", "2", "--stop-after", "4",
                                                  "--save-every", "4"))
    assert not (resumed / "generalist.pt").exists()
    # A new run (no --resume) into the stopped run's directory is refused: runs are never mixed.
    saved = sorted(os.listdir(resumed / "checkpoints"))
    proc = run_module("trainer.pretrain", *pretrain_args(shards, resumed, 8, "--num-workers", "2"), check=False)
    assert proc.returncode == 1
    assert f"{resumed} holds an earlier pre-training run" in proc.stderr and "--resume" in proc.stderr
    assert sorted(os.listdir(resumed / "checkpoints")) == saved
    proc = run_module("trainer.pretrain", *pretrain_args(shards, resumed, 8, "--num-workers", "2", "--resume",
                                                         "--save-every", "4"))
    assert "[resume] from step000000004 (step 4)" in proc.stdout
    assert (resumed / "_SUCCESS").exists() and (resumed / "_STAGE").exists()
    # A rerun of the finished run does nothing and says so.
    proc = run_module("trainer.pretrain", *pretrain_args(shards, straight, 8, "--num-workers", "2"))
    assert f"pretrain: {straight} is complete (_SUCCESS); nothing to do" in proc.stderr
    assert "step 1/8" not in proc.stdout
    # --overwrite with a bad option fails before the finished run is touched.
    before = sorted(os.listdir(straight))
    for bad in (["--arch", "smal"], ["--max-consecutive-corrupt", "0"]):
        proc = run_module("trainer.pretrain", *pretrain_args(shards, straight, 8, "--num-workers", "2", "--overwrite"),
                          *bad, check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert sorted(os.listdir(straight)) == before and (straight / "_SUCCESS").exists()
    a = read_generalist(str(straight / "generalist.pt"))["state_dict"]
    b = read_generalist(str(resumed / "generalist.pt"))["state_dict"]
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-6, rtol=0), k
    la = [json.loads(x)["loss"] for x in open(straight / "train_log.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(resumed / "train_log.jsonl")]
    np.testing.assert_allclose(la, lb, atol=1e-6)


def test_resume_follows_the_checkpoints_loader_settings(shards, tmp_path):
    # Written with 2 loader workers (this machine's default is fewer) and the
    # default --decode-scaling; a resume without either flag takes the
    # checkpoint's, and one that names another decoding is refused.
    out = tmp_path / "run"
    run_module("trainer.pretrain", *pretrain_args(shards, out, 4, "--num-workers", "2", "--stop-after", "2",
                                                  "--save-every", "2"))
    proc = run_module("trainer.pretrain", *pretrain_args(shards, out, 4, "--resume", "--decode-scaling", "none"),
                      check=False)
    assert proc.returncode == 1 and "decoded its samples with --decode-scaling draft; resume with the same" \
        in proc.stderr
    proc = run_module("trainer.pretrain", *pretrain_args(shards, out, 4, "--resume"), env={"LOCAL_SIZE": "2"})
    assert "[resume] from step000000002 (step 2)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loader_workers"] == 2 and metrics["decode_scaling"] == "draft" and metrics["steps_done"] == 4


def _deepspeed(*args, env=None):
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def _check_ranks(out):
    reports = [json.loads(open(out / "ranks" / f"rank{r}.json").read()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    a, b = (set(r["epoch0_shards"]) for r in reports)
    assert a and b and not a & b and len(a | b) == 8
    assert reports[0]["parameters_sha256"] == reports[1]["parameters_sha256"]


@pytest.mark.slow
def test_two_ranks_with_the_deepspeed_launcher(shards, tmp_path):
    out = tmp_path / "two_ranks"
    proc = _deepspeed("--num_gpus", "2", "--master_port", str(free_port()), "--module", "trainer.pretrain",
                      *pretrain_args(shards, out, 6, "--num-workers", "1"))
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    _check_ranks(out)
    model, _ = load_generalist(str(out / "generalist.pt"))


@pytest.mark.slow
def test_two_nodes_on_loopback(shards, tmp_path):
    """Two launcher processes, node ranks 0 and 1, one master address: what
    `deepspeed --hostfile` runs on each node, here without ssh."""
    out = tmp_path / "two_nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs = [_deepspeed("--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr",
                        "127.0.0.1", "--master_port", port, "--module", "trainer.pretrain",
                        *pretrain_args(shards, out, 6, "--num-workers", "1")) for n in (0, 1)]
    for p in procs:
        text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, text[-4000:]
    _check_ranks(out)


def test_finetune_and_evaluate(pretrained, food_target, tmp_path):
    out, _ = pretrained
    ft = tmp_path / "ft"
    proc = run_module("trainer.finetune", "--target-layout", "food101", "--target-root", food_target.root,
                      "--init", str(out / "generalist.pt"), "--steps", "30", "--batch-size", "32",
                      "--lr", "0.05", "--output", str(ft), "--log-every", "10")
    assert "step 30/30" in proc.stdout
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["examples"] == 80
    assert set(metrics["per_class"]) == set(food_target.classes)
    losses = [c["loss"] for c in metrics["curve"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    model, spec, ckpt = load_finetuned(str(ft / "model.pt"), food_target.classes)
    assert model.fc.out_features == 8 and ckpt["extra"]["init"] == str(out / "generalist.pt")
    # The metrics recomputed independently: the saved model's predictions on the test split, counted by hand.
    test_split = list_target(food_target.root, "food101", "test")
    x = torch.stack([torch.from_numpy(eval_transform(decode_image(read_item_bytes(p)), spec))
                     for p in test_split.paths])
    with torch.no_grad():
        pred = model(x).argmax(dim=1).numpy()
    labels = np.array(test_split.labels)
    hits = pred == labels
    assert len(labels) == 80 and metrics["top1"] == hits.sum() / 80
    by_class = {c: hits[labels == k].mean() for k, c in enumerate(test_split.classes)}
    assert {c: m["accuracy"] for c, m in metrics["per_class"].items()} == pytest.approx(by_class, rel=1e-15)
    assert {c: m["examples"] for c, m in metrics["per_class"].items()} == \
        {c: int((labels == k).sum()) for k, c in enumerate(test_split.classes)}
    assert metrics["mean_per_class_accuracy"] == pytest.approx(np.mean(list(by_class.values())), rel=1e-12)
    ev = tmp_path / "ev"
    run_module("trainer.evaluate", "--target-layout", "food101", "--target-root", food_target.root,
               "--checkpoint", str(ft / "model.pt"), "--output", str(ev))
    again = json.loads((ev / "metrics.json").read_text())
    assert again["top1"] == metrics["top1"]
    assert again["mean_per_class_accuracy"] == metrics["mean_per_class_accuracy"]
    assert sorted(os.listdir(ft)) == ["_STAGE", "_SUCCESS", "metrics.json", "metrics.jsonl", "model.pt",
                                      "tensorboard"]
    # A rerun does nothing and says so; someone else's directory is refused, untouched.
    proc = run_module("trainer.evaluate", "--target-layout", "food101", "--target-root", food_target.root,
                      "--checkpoint", str(ft / "model.pt"), "--output", str(ev))
    assert f"evaluate: {ev} is complete (_SUCCESS); nothing to do" in proc.stderr
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.json").write_text("their numbers")
    proc = run_module("trainer.evaluate", "--target-layout", "food101", "--target-root", food_target.root,
                      "--checkpoint", str(ft / "model.pt"), "--output", str(theirs), "--overwrite", check=False)
    assert proc.returncode == 1 and "was not written by evaluate" in proc.stderr
    assert (theirs / "metrics.json").read_text() == "their numbers"


def test_evaluate_rejects_a_model_of_other_classes(pretrained, food_target, tmp_path):
    from adaptive_transfer.synthetic import TargetSpec, generate_target
    other = generate_target(str(tmp_path / "other"), TargetSpec(layout="imagefolder", branch="animal",
                                                                num_classes=3, train_per_class=4,
                                                                test_per_class=2))
    ft = tmp_path / "ft"
    run_module("trainer.finetune", "--target-layout", "imagefolder", "--target-root", other.root, "--init", "none",
               "--steps", "2", "--batch-size", "4", "--output", str(ft), "--num-workers", "0")
    proc = run_module("trainer.evaluate", "--target-layout", "food101", "--target-root", food_target.root,
                      "--checkpoint", str(ft / "model.pt"), "--output", str(tmp_path / "ev"), check=False)
    assert proc.returncode == 1
    assert "the checkpoint was fine-tuned on 3 classes" in proc.stderr
