"""Pre-train a model on WebDataset shards with DeepSpeed.

::

    python -m trainer.pretrain --shards DIR/manifest.json --labels vocab.parquet \\
      --arch small|resnet50|inception_v3 --steps N --batch-size B [--lr ...] \\
      [--warmup-steps ...] [--seed 0] [--num-workers N] [--decode-scaling draft|none] \\
      [--resume | --overwrite] [--deepspeed-config ds.json] --output CKPT_DIR
    deepspeed --num_gpus 8 --module trainer.pretrain ...            # one node
    deepspeed --hostfile hosts --module trainer.pretrain ...        # many nodes
    tensorboard --logdir CKPT_DIR                                   # the curves

Writes ``CKPT_DIR/checkpoints/step*/`` (DeepSpeed, every ``--save-every``
steps and at the end), ``CKPT_DIR/train_log.jsonl`` (every step),
``CKPT_DIR/metrics.jsonl`` and TensorBoard event files in
``CKPT_DIR/tensorboard/`` (loss, learning rate, images/s, time waiting for
data: :mod:`trainer.curves`), ``CKPT_DIR/metrics.json`` and, at the end,
``CKPT_DIR/generalist.pt`` (schemas.checkpoint format) and
``CKPT_DIR/_SUCCESS``. ``CKPT_DIR`` is pretrain's own
(``schemas.stage_output``): a rerun of a finished run made from the same
settings does nothing; an unfinished one is continued with ``--resume`` or
started again with ``--overwrite``, never mixed with a new run.

``--resume`` continues on any number of ranks and loader workers (every
sample of the interrupted epoch is still seen exactly its copies:
:mod:`trainer.lanes`), and refuses other shards, vocabulary, architecture,
batch, schedule, seed or decoding than the checkpoint's, naming each.

``--batch-size`` is the global batch (the paper: 1024), split evenly over ranks.
Targets are the paper's: softmax cross-entropy on the multi-hot label vector
normalised to sum to one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from fsspec.core import split_protocol

from schemas import io as sio
from schemas.checkpoint import vocabulary_fingerprint
from schemas.cli import ArgumentParser
from schemas.fingerprint import code_digest
from schemas.stage_output import MARKER, StageOutput, require_finished_input

from . import runtime as RT
from .curves import Progress, TrainingCurves, truncate_jsonl
from .data import (MAX_CONSECUTIVE_CORRUPT, LoaderConfig, LoaderState, ShardList, ShardStream, collate,
                   default_num_workers, read_shard_list, require_shards, soft_targets)
from .models import DEFAULT_INPUT_SIZE, build_model, save_generalist
from .optim import deepspeed_config, default_lr, default_warmup, make_optimizer, make_scheduler
from .resume import differences, layout_change, saved_stream, stream_record
from .transforms import DECODE_SCALINGS, DEFAULT_DECODE_SCALING, PreprocessSpec, normalise_batch

__all__ = ["PretrainJob", "STAGE", "build_parser", "job_from_args", "settings", "run", "main"]

#: The output protocol's name for this stage (``schemas.stage_output``).
STAGE = "pretrain"


@dataclass
class PretrainJob:
    """One pre-training run (the flags of ``python -m trainer.pretrain``).

    ``batch_size``: the global batch. ``lr`` default 0.1 x batch / 256;
    ``warmup_steps`` default 1% of ``steps``; ``input_size`` default per
    architecture; ``num_workers`` (loader processes per rank) default from
    the cores (on ``resume``: the checkpoint's); ``decode_scaling`` default
    ``transforms.DEFAULT_DECODE_SCALING`` (on ``resume``: the checkpoint's);
    ``save_every`` default ``steps / 10``. ``channels_last`` and ``compile``
    (``torch.compile``) are speed settings for GPUs. ``log_samples``: each
    rank writes the keys it trained on, step by step, to
    ``OUTPUT/samples/rank<R>.jsonl`` (an audit of the stream).
    """

    shards: str
    labels: str
    output: str
    steps: int
    batch_size: int
    arch: str = "small"
    lr: float | None = None
    warmup_steps: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    input_size: int | None = None
    seed: int = 0
    num_workers: int | None = None
    decode_scaling: str | None = None
    shuffle_buffer: int = 2000
    max_consecutive_corrupt: int = MAX_CONSECUTIVE_CORRUPT
    save_every: int | None = None
    keep_checkpoints: int = 3
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    node_local_checkpoints: bool = False
    deepspeed_config: str | None = None
    channels_last: bool = False
    compile: bool = False
    log_samples: bool = False

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.decode_scaling is not None and self.decode_scaling not in DECODE_SCALINGS:
            raise ValueError(f"decode_scaling must be one of {DECODE_SCALINGS}, got {self.decode_scaling!r}")

    def fingerprint(self) -> dict[str, Any]:
        """What determines the result (:func:`settings`) and the code; reads the shard list and vocabulary."""
        plan = _plan(self)
        return {**settings(self, plan, self.decode_scaling or DEFAULT_DECODE_SCALING),
                "code": code_digest("trainer.pretrain")}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m trainer.pretrain", description=__doc__)
    p.add_argument("--shards", required=True, help="DIR/manifest.json or a brace pattern of .tar files")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet (the output classes)")
    p.add_argument("--arch", default="small", help="small, resnet50 or inception_v3 (default small)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True, help="global batch size")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1 x batch / 256)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup (default 1%% of --steps, as the paper)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--input-size", type=int, help="model input side (default per architecture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int,
                   help="loader worker processes per rank (default: the cores this process may use, shared "
                        "by the node's ranks (LOCAL_WORLD_SIZE or LOCAL_SIZE), less one, at least 1 and at "
                        "most the shards per rank; on --resume, the checkpoint's)")
    p.add_argument("--decode-scaling", choices=DECODE_SCALINGS,
                   help="'draft': decode a JPEG at 1/2, 1/4 or 1/8 scale when its random crop still has at "
                        "least the input size in pixels at that scale (faster; a different resampling path, "
                        "so other pixels); 'none': decode every image whole (default "
                        f"{DEFAULT_DECODE_SCALING}; on --resume, the checkpoint's)")
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--max-consecutive-corrupt", type=int, default=MAX_CONSECUTIVE_CORRUPT, metavar="N",
                   help="fail when a loader worker meets N undecodable samples in a row "
                        f"(default {MAX_CONSECUTIVE_CORRUPT}); bad samples are otherwise counted and skipped")
    p.add_argument("--save-every", type=int, help="checkpoint every K steps (default steps/10)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="complete checkpoints kept (default 3)")
    p.add_argument("--log-every", type=int, default=10)
    restart = p.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true",
                         help="continue from the newest complete checkpoint (on any number of ranks)")
    restart.add_argument("--overwrite", action="store_true",
                         help="start again: remove what an earlier pretrain run wrote in --output")
    p.add_argument("--stop-after", type=int, help="stop (after checkpointing) at this step; for preemptible runs")
    p.add_argument("--node-local-checkpoints", action="store_true",
                   help="nodes share no disk: each node keeps its own copy of the checkpoints in its own --output "
                        "(DeepSpeed's checkpoint.use_node_local_storage); a resume needs every node's copy. Without "
                        "it --output must be one directory every node mounts (checked before step 1)")
    p.add_argument("--deepspeed-config", help="a DeepSpeed JSON config instead of the generated one")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (GPUs: faster convs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--log-samples", action="store_true",
                   help="each rank writes the sample keys of each step to OUTPUT/samples/rank<R>.jsonl")
    p.add_argument("--output", required=True)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_alias("--model", "--arch")
    return p


def job_from_args(args: argparse.Namespace) -> PretrainJob:
    """The job the parsed flags describe."""
    names = {f.name for f in dataclasses.fields(PretrainJob)}
    return PretrainJob(**{k: v for k, v in vars(args).items() if k in names})


# -- what the run reads and resolves -----------------------------------------------------

@dataclass
class _Plan:
    """The run's inputs, read and checked, and its resolved settings."""

    shards: ShardList
    vocab: pa.Table
    label_ids: list[int]
    spec: PreprocessSpec
    lr: float
    warmup: int

    @property
    def index_of(self) -> dict[int, int]:
        return {lid: i for i, lid in enumerate(self.label_ids)}


def _local_output(output: str) -> str:
    """``--output`` as an os path (``file:///x`` is ``/x``); a URL is refused."""
    protocol, local_path = split_protocol(output)
    if protocol not in (None, "file", "local"):  # read as written: no filesystem (gcsfs, s3fs) is loaded
        raise ValueError(f"--output {output}: checkpoints and logs are written to a POSIX directory (one "
                         "every node mounts, or with --node-local-checkpoints each node's own), not a URL; copy "
                         "the finished run to object storage afterwards")
    return local_path


def _plan(job: PretrainJob) -> _Plan:
    require_finished_input(job.labels, "--labels")
    vocab = sio.read_parquet(job.labels)
    label_ids = sorted(int(i) for i in vocab.column("label_id").to_pylist())
    shards = read_shard_list(job.shards)
    require_shards(shards.urls, job.shards)  # every rank: each node must see them
    spec = PreprocessSpec(job.input_size or DEFAULT_INPUT_SIZE.get(job.arch, 224))
    lr = job.lr if job.lr is not None else default_lr(job.batch_size, "pretrain")
    warmup = job.warmup_steps if job.warmup_steps is not None else default_warmup(job.steps, "pretrain")
    return _Plan(shards, vocab, label_ids, spec, lr, warmup)


def settings(job: PretrainJob, plan: _Plan, decode_scaling: str) -> dict[str, Any]:
    """What determines a pre-training result: the data (the shards'
    digest, wherever they lie; the vocabulary), the model, the batch and
    schedule, the seed and the stream's decoding. Not the number of ranks or
    loader workers, the checkpoint cadence or the speed settings."""
    ds_config = sio.file_sha256(job.deepspeed_config) if job.deepspeed_config else None
    return {"shards": plan.shards.digest(), "labels": vocabulary_fingerprint(plan.vocab), "arch": job.arch,
            "input_size": plan.spec.input_size, "steps": job.steps, "batch_size": job.batch_size, "lr": plan.lr,
            "warmup_steps": plan.warmup, "momentum": job.momentum, "weight_decay": job.weight_decay,
            "seed": job.seed, "shuffle_buffer": job.shuffle_buffer, "decode_scaling": decode_scaling,
            "deepspeed_config": ds_config}


@dataclass
class _Engine:
    """The DeepSpeed engine, its optimizer, and whether each node keeps its own checkpoints."""

    engine: Any
    optimizer: torch.optim.Optimizer
    node_local: bool


def _engine(job: PretrainJob, plan: _Plan, info: RT.DistInfo) -> _Engine:
    """The model, seeded the same on every rank, in DeepSpeed."""
    torch.manual_seed(job.seed)  # identical initial weights on every rank
    model = build_model(job.arch, len(plan.label_ids)).to(info.device)
    optimizer = make_optimizer(model, plan.lr, job.momentum, job.weight_decay)
    scheduler = make_scheduler(optimizer, job.steps, plan.warmup)
    if job.deepspeed_config:
        config = json.loads(sio.read_bytes(job.deepspeed_config))
    else:
        config = deepspeed_config(job.batch_size, info.world_size, bf16=info.device.type == "cuda",
                                  log_every=job.log_every)
    if job.node_local_checkpoints:
        config.setdefault("checkpoint", {})["use_node_local_storage"] = True
    node_local = bool(config.get("checkpoint", {}).get("use_node_local_storage"))
    engine, optimizer, _ = RT.initialize(model, optimizer, scheduler, config)
    RT.speed_settings(engine, job.channels_last, job.compile)
    return _Engine(engine, optimizer, node_local)


# -- where the run starts -----------------------------------------------------------------

@dataclass
class _Start:
    """Where the run starts: the step, the loader state and its settings, the
    run's id; ``settings``: what determines the result (:func:`settings`)."""

    step: int
    state: LoaderState
    workers: int
    decode_scaling: str
    run_id: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def _fresh_start(job: PretrainJob, plan: _Plan, info: RT.DistInfo, run_id: int) -> _Start:
    workers = job.num_workers
    if workers is None:
        workers = default_num_workers(cap=max(1, len(plan.shards.urls) // info.world_size))
    scaling = job.decode_scaling or DEFAULT_DECODE_SCALING
    return _Start(0, LoaderState(workers=max(1, workers)), workers, scaling, run_id, settings(job, plan, scaling))


def _resume(job: PretrainJob, plan: _Plan, engine, info: RT.DistInfo, tag: str) -> _Start:
    """Load checkpoint ``tag`` and the stream it left; refuse what it cannot honour."""
    client = RT.load_checkpoint(engine, os.path.join(_local_output(job.output), "checkpoints"), tag)
    runs = RT.all_gather_longs([int(client.get("run", 0))])
    run_id = runs[0][0]
    if any(r[0] != run_id for r in runs):
        raise ValueError(f"checkpoint {tag} of rank(s) {[i for i, r in enumerate(runs) if r[0] != run_id]} "
                         "was written by another run than rank 0's (a node's copy left from an earlier "
                         "run); restore that node's checkpoints, or start again with --overwrite")
    saved_scaling = client.get("decode_scaling", "none")  # checkpoints before the option: whole
    if job.decode_scaling is not None and job.decode_scaling != saved_scaling:
        raise ValueError(f"checkpoint {tag} decoded its samples with --decode-scaling {saved_scaling}; "
                         "resume with the same (the rest of the stream would have other pixels)")
    current = settings(job, plan, saved_scaling)
    if "settings" in client:
        changed = differences(client["settings"], current)
        if changed:
            raise ValueError(f"checkpoint {tag} was trained with other settings: {'; '.join(changed)}; resume "
                             "with the checkpoint's, or start again with --overwrite or a new --output")
    elif info.is_main:
        print(f"[resume] checkpoint {tag} records no settings (an earlier version): not compared", flush=True)
    saved = saved_stream(client)
    workers = job.num_workers if job.num_workers is not None else saved.default_workers(info.world_size)
    state = saved.state_for(info.rank, info.world_size, max(1, workers))
    torch.set_rng_state(client["torch_rng"])
    if info.is_main:
        print(f"[resume] from {tag} (step {int(client['step'])})", flush=True)
        change = layout_change(saved, info.world_size, max(1, workers), job.batch_size)
        if change:
            print(change, flush=True)
    return _Start(int(client["step"]), state, workers, saved_scaling, run_id, current)


def _start(job: PretrainJob, plan: _Plan, engine, info: RT.DistInfo) -> _Start:
    # Marks the checkpoints of this run (drawn by rank 0): a node's copy left by another run is refused.
    run_id = RT.all_gather_longs([int.from_bytes(os.urandom(7), "big")])[0][0]
    if job.resume:
        ckpt_dir = os.path.join(_local_output(job.output), "checkpoints")
        tag = RT.agree_resume_tag(ckpt_dir, info.device)  # rank 0 chooses; every rank can read it, or all fail
        if tag:
            return _resume(job, plan, engine, info, tag)
        if info.is_main:
            print(f"[resume] no complete checkpoint in {ckpt_dir}; starting from scratch", flush=True)
    return _fresh_start(job, plan, info, run_id)


def _loader(job: PretrainJob, plan: _Plan, start: _Start, info: RT.DistInfo) -> torch.utils.data.DataLoader:
    config = LoaderConfig.for_shards(plan.shards, plan.spec, seed=job.seed, shuffle_buffer=job.shuffle_buffer,
                                     max_consecutive_corrupt=job.max_consecutive_corrupt,
                                     decode_scaling=start.decode_scaling,
                                     normalise=False)  # uint8 batches, normalised on the device
    stream = ShardStream(config, info.rank, info.world_size, start.state)
    stream.check_split(start.workers)
    return torch.utils.data.DataLoader(
        stream, batch_size=job.batch_size // info.world_size, num_workers=start.workers,
        collate_fn=collate, persistent_workers=False, pin_memory=info.device.type == "cuda",
        prefetch_factor=2 if start.workers else None)


def _prepare_output(job: PretrainJob, info: RT.DistInfo, node_local: bool, fingerprint: dict
                    ) -> tuple[StageOutput, dict | None]:
    """The output protocol (``schemas.stage_output``) for a run directory
    whose checkpoints are its resume point: written in place, its marker
    recording ``fingerprint``. Call it once every input and option is
    checked. Returns the finished run's metrics where there is nothing to do
    (a finished run made from ``fingerprint``; one made from anything else
    is refused, naming what differs, unless ``--overwrite``). A new run never
    mixes with an earlier one's checkpoints: ``--resume`` continues it,
    ``--overwrite`` removes what pretrain wrote there, otherwise it is
    refused. Rank 0 decides and acts; every rank follows its answer. Then the
    directory is checked to be what ``node_local`` says (one shared by every
    node, or each node's own); with ``node_local`` each other node's local
    rank 0 applies the same protocol to its node's own copy."""
    output = StageOutput(job.output, STAGE, in_place=True)

    def decide() -> int:
        if output.check(job.overwrite, fingerprint):
            print(output.skip_line(), file=sys.stderr)
            return RT.SKIP
        earlier = [n for n in (os.listdir(output.path) if os.path.isdir(output.path) else []) if n != MARKER]
        if earlier and not (job.resume or job.overwrite):
            raise ValueError(f"{job.output} holds an earlier pre-training run ({', '.join(sorted(earlier)[:4])}); "
                             "pass --resume to continue it or --overwrite to start again, or give a new --output")
        if job.resume:
            output.resume(fingerprint)
        else:
            output.begin(fingerprint)
        return RT.GO

    if RT.decide_on_rank0(decide, info.device) == RT.SKIP:
        metrics = os.path.join(job.output, "metrics.json")
        return output, {**(json.loads(sio.read_bytes(metrics)) if info.is_main else {}), "reused": True}
    RT.check_output_sharing(output.path, node_local, info.device)
    if node_local:
        RT.run_on_node_leaders(decide, info.device)
    return output, None


# -- the training loop ---------------------------------------------------------------------

class _Logs:
    """The per-step files: ``train_log.jsonl`` and the curves (rank 0), each
    rank's sample keys (``log_samples``)."""

    def __init__(self, job: PretrainJob, info: RT.DistInfo, start: int):
        self.output, self.main = job.output, info.is_main
        self.train_log = os.path.join(job.output, "train_log.jsonl")
        self.samples = os.path.join(job.output, "samples", f"rank{info.rank}.jsonl") if job.log_samples else None
        if self.main:
            os.makedirs(job.output, exist_ok=True)
            if start == 0:
                open(self.train_log, "w").close()
            if job.log_samples:
                self._reset_samples(start)
        if self.samples:
            RT.barrier()  # rank 0 has tidied the sample logs
        self.curves = TrainingCurves(job.output, info.is_main, job.batch_size, job.log_every, start, job.steps)

    def _reset_samples(self, start: int) -> None:
        folder = os.path.join(self.output, "samples")
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if start == 0:
                os.remove(path)
            else:
                truncate_jsonl(path, start)

    def step(self, step: int, loss: float, lr: float, batch, seconds: float, wait: float) -> None:
        if self.main:
            with open(self.train_log, "a") as fh:
                fh.write(sio.json_text({"step": step, "loss": loss, "lr": lr}) + "\n")
        if self.samples:
            with open(self.samples, "a") as fh:
                fh.write(json.dumps({"step": step, "keys": batch.keys, "epochs": batch.epochs}) + "\n")
        self.curves.step(step, loss, lr, seconds, wait)


def _train(job: PretrainJob, plan: _Plan, eng: _Engine, loader, start: _Start, info: RT.DistInfo,
           end: int) -> list[float]:
    """Steps ``start.step + 1 .. end``, checkpointing every ``save_every`` and
    at ``end``; returns the losses."""
    save_every = job.save_every or max(1, job.steps // 10)
    index_of, classes = plan.index_of, len(plan.label_ids)
    logs = _Logs(job, info, start.step)
    progress = Progress(job.steps, start.step, job.batch_size, job.log_every, info.is_main)
    memory_format = torch.channels_last if job.channels_last else torch.contiguous_format
    losses: list[float] = []
    engine, optimizer = eng.engine, eng.optimizer
    it = iter(loader)
    engine.train()
    try:
        for step in range(start.step, end):
            t0 = time.perf_counter()
            batch = next(it)
            waited = time.perf_counter() - t0
            y = soft_targets(batch.labels, index_of, classes).to(info.device, non_blocking=True)
            x = normalise_batch(batch.images.to(info.device, non_blocking=True), plan.spec)
            logits = engine(x.contiguous(memory_format=memory_format))
            loss = -(y * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
            lr_now = optimizer.param_groups[0]["lr"]  # the rate this step uses
            engine.backward(loss)
            engine.step()
            start.state.update(batch)
            losses.append(float(loss.detach()))
            progress.update(step, losses[-1], lr_now, waited)
            logs.step(step + 1, losses[-1], lr_now, batch, time.perf_counter() - t0, waited)
            if (step + 1) % save_every == 0 or step + 1 == end:
                _save(job, eng, start, step + 1)
    finally:
        logs.curves.close()
        del it
    return losses


def _save(job: PretrainJob, eng: _Engine, start: _Start, step: int) -> None:
    """A checkpoint of ``step``: the model and optimizer (DeepSpeed), where
    every lane stands, and the settings a resume must keep."""
    state = start.state
    gathered = RT.all_gather_longs([state.batches, state.corrupt, *state.positions])
    RT.save_checkpoint(eng.engine, os.path.join(job.output, "checkpoints"), step, {
        "step": step, "stream": stream_record(gathered, state.bind(len(gathered)), state.workers),
        "decode_scaling": start.decode_scaling, "settings": start.settings,
        "torch_rng": torch.get_rng_state(), "seed": job.seed, "run": start.run_id},
        keep=job.keep_checkpoints, node_local=eng.node_local)


def _write_rank_report(job: PretrainJob, info: RT.DistInfo, plan: _Plan, start: _Start, module) -> None:
    """ranks/rank<r>.json: the shards this rank read in epoch 0 (its lanes'),
    the step it resumed from (0: a fresh start) and a digest of its
    parameters (every rank must end with the same parameters)."""
    state = start.state
    stream = ShardStream(LoaderConfig(plan.shards.urls, PreprocessSpec(1), seed=job.seed), info.rank,
                         info.world_size, LoaderState(workers=state.workers, lanes=state.lanes,
                                                      origin_ranks=state.origin_ranks))
    shards = sorted(u for w in range(state.workers) for u in stream.shards_for(0, w, state.workers))
    digest = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        digest.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
    report = {"rank": info.rank, "world_size": info.world_size, "epoch0_shards": shards, "resumed_from": start.step,
              "parameters_sha256": digest.hexdigest(), "loader": state.to_dict()}
    sio.write_bytes_atomic(os.path.join(job.output, "ranks", f"rank{info.rank}.json"),
                           sio.json_text(report, indent=2) + "\n")


def _finish(job: PretrainJob, plan: _Plan, engine, start: _Start, end: int, losses: list[float],
            output: StageOutput, info: RT.DistInfo) -> dict:
    """metrics.json, the rank reports and, at the last step, the generalist and ``_SUCCESS``."""
    corrupt_total = sum(r[1] for r in RT.all_gather_longs([start.state.batches, start.state.corrupt]))
    result = {"steps_done": end, "final_loss": losses[-1] if losses else None,
              "mean_loss_last_10": float(np.mean(losses[-10:])) if losses else None,
              "corrupt_samples_skipped": corrupt_total, "world_size": info.world_size,
              "shards": len(plan.shards.urls), "lr": plan.lr, "warmup_steps": plan.warmup,
              "batch_size": job.batch_size, "loader_workers": start.workers, "decode_scaling": start.decode_scaling}
    _write_rank_report(job, info, plan, start, engine.module)
    if end == job.steps:
        RT.average_buffers(engine.module)
        if info.is_main:
            save_generalist(os.path.join(job.output, "generalist.pt"), engine.module, job.arch, plan.label_ids,
                            plan.spec, plan.vocab, extra={"steps": job.steps, "shards": job.shards, "seed": job.seed})
    RT.write_json_main(os.path.join(job.output, "metrics.json"), result)
    if end == job.steps and info.is_main:
        output.commit(output.path)  # _SUCCESS last
    RT.barrier()
    return result


def run(job: PretrainJob) -> dict:
    """Pre-train as ``job`` says (on this process's rank); returns the metrics."""
    info = RT.setup_distributed()
    job = dataclasses.replace(job, output=_local_output(job.output))  # DeepSpeed and the logs use os paths
    plan = _plan(job)
    eng = _engine(job, plan, info)
    start = _start(job, plan, eng.engine, info)
    end = min(job.steps, job.stop_after) if job.stop_after else job.steps
    loader = _loader(job, plan, start, info)
    fingerprint = {**start.settings, "code": code_digest("trainer.pretrain")}
    output, finished = _prepare_output(job, info, eng.node_local, fingerprint)  # every input is checked by now
    if finished is not None:
        return finished
    losses = _train(job, plan, eng, loader, start, info, end)
    del loader
    return _finish(job, plan, eng.engine, start, end, losses, output, info)


def main(argv: Sequence[str] | None = None) -> int:
    return RT.cli_main("pretrain", build_parser(), lambda args: run(job_from_args(args)),
                       lambda r, a: f"{r['steps_done']} steps, final loss {r['final_loss']:.4f} -> {a.output}",
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
