"""Pre-train a model on WebDataset shards with DeepSpeed.

::

    python -m trainer.pretrain --shards DIR/manifest.json --labels vocab.parquet \\
      --model small|resnet50|inception_v3 --steps N --batch-size B [--lr ...] \\
      [--warmup-steps ...] [--seed 0] [--num-workers N] [--decode-scaling draft|none] \\
      [--resume | --overwrite] [--deepspeed-config ds.json] --output CKPT_DIR
    deepspeed --num_gpus 8 --module trainer.pretrain ...            # one node
    deepspeed --hostfile hosts --module trainer.pretrain ...        # many nodes

Writes ``CKPT_DIR/checkpoints/step*/`` (DeepSpeed, every ``--save-every``
steps and at the end), ``CKPT_DIR/train_log.jsonl``, ``CKPT_DIR/metrics.json``
and, at the end, ``CKPT_DIR/generalist.pt`` (schemas.checkpoint format) and
``CKPT_DIR/_SUCCESS``. ``CKPT_DIR`` is pretrain's own (``schemas.stage_output``):
a rerun of a finished run does nothing; an unfinished one is continued with
``--resume`` or started again with ``--overwrite``, never mixed with a new run.

``--batch-size`` is the global batch (the paper: 1024), split evenly over ranks.
Targets are the paper's: softmax cross-entropy on the multi-hot label vector
normalised to sum to one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fsspec.core import split_protocol

from schemas import io as sio
from schemas.stage_output import MARKER, StageOutput, require_finished_input

from . import runtime as RT
from .data import (MAX_CONSECUTIVE_CORRUPT, LoaderState, ShardStream, collate, default_num_workers, require_shards,
                   shard_urls, soft_targets)
from .models import DEFAULT_INPUT_SIZE, build_model, save_generalist
from .optim import deepspeed_config, default_lr, default_warmup, make_optimizer, make_scheduler
from .transforms import DECODE_SCALINGS, DEFAULT_DECODE_SCALING, PreprocessSpec, normalise_batch

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="DIR/manifest.json or a brace pattern of .tar files")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet (the output classes)")
    p.add_argument("--model", default="small", help="small, resnet50 or inception_v3 (default small)")
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
    restart.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    restart.add_argument("--overwrite", action="store_true",
                         help="start again: remove what an earlier pretrain run wrote in --output")
    p.add_argument("--stop-after", type=int, help="stop (after checkpointing) at this step; for preemptible runs")
    p.add_argument("--node-local-checkpoints", action="store_true",
                   help="nodes share no disk: each node keeps its own copy of the checkpoints in its own --output "
                        "(DeepSpeed's checkpoint.use_node_local_storage); a resume needs every node's copy. Without "
                        "it --output must be one directory every node mounts (checked before step 1)")
    p.add_argument("--deepspeed-config", help="a DeepSpeed JSON config instead of the generated one")
    p.add_argument("--output", required=True)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p


def _loader(urls, spec, args, info, state, num_workers, decode_scaling):
    stream = ShardStream(urls, spec, seed=args.seed, rank=info.rank, world_size=info.world_size,
                         shuffle_buffer=args.shuffle_buffer, state=state,
                         max_consecutive_corrupt=args.max_consecutive_corrupt, decode_scaling=decode_scaling,
                         normalise=False)  # uint8 batches, normalised on the device
    stream.check_split(num_workers)
    return torch.utils.data.DataLoader(
        stream, batch_size=args.batch_size // info.world_size, num_workers=num_workers,
        collate_fn=collate, persistent_workers=False,
        prefetch_factor=2 if num_workers else None)


def _write_rank_report(args, info, urls, workers, module, state, resumed_from: int) -> None:
    """ranks/rank<r>.json: the shards this rank read in epoch 0, the step it
    resumed from (0: a fresh start) and a digest of its parameters (every
    rank must end with the same parameters)."""
    stream = ShardStream(urls, PreprocessSpec(1), seed=args.seed, rank=info.rank, world_size=info.world_size)
    shards = sorted(u for w in range(workers) for u in stream.shards_for(0, w, workers))
    digest = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        digest.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
    report = {"rank": info.rank, "world_size": info.world_size, "epoch0_shards": shards, "resumed_from": resumed_from,
              "parameters_sha256": digest.hexdigest(), "loader": state.to_dict()}
    sio.write_bytes_atomic(os.path.join(args.output, "ranks", f"rank{info.rank}.json"),
                           json.dumps(report, indent=2) + "\n")


def _prepare_output(args: argparse.Namespace, info, node_local: bool) -> dict | None:
    """The output protocol (``schemas.stage_output``) for a run directory
    whose checkpoints are its resume point: written in place. Call it once
    every input and option is checked. Returns the finished run's metrics
    where there is nothing to do. A new run never mixes with an earlier one's
    checkpoints: ``--resume`` continues it, ``--overwrite`` removes what
    pretrain wrote there, otherwise it is refused. Rank 0 decides and acts;
    every rank follows its answer (no rank waits on a decision it cannot see).
    Then the directory is checked to be what ``node_local`` says (one shared
    by every node, or each node's own); with ``node_local`` each other
    node's local rank 0 applies the same protocol to its node's own copy."""
    output = StageOutput(args.output, "pretrain", in_place=True)

    def decide() -> int:
        if output.check(args.overwrite):
            print(output.skip_line(), file=sys.stderr)
            return RT.SKIP
        earlier = [n for n in (os.listdir(output.path) if os.path.isdir(output.path) else []) if n != MARKER]
        if earlier and not (args.resume or args.overwrite):
            raise ValueError(f"{args.output} holds an earlier pre-training run ({', '.join(sorted(earlier)[:4])}); "
                             "pass --resume to continue it or --overwrite to start again, or give a new --output")
        if args.resume:
            output.resume()
        else:
            output.begin()
        return RT.GO

    if RT.decide_on_rank0(decide, info.device) == RT.SKIP:
        metrics = os.path.join(args.output, "metrics.json")
        return {**(json.loads(sio.read_bytes(metrics)) if info.is_main else {}), "reused": True}
    RT.check_output_sharing(output.path, node_local, info.device)
    if node_local:
        RT.run_on_node_leaders(decide, info.device)
    return None


def run(args: argparse.Namespace) -> dict:
    info = RT.setup_distributed()
    require_finished_input(args.labels, "--labels")
    vocab = sio.read_parquet(args.labels)
    label_ids = sorted(int(i) for i in vocab.column("label_id").to_pylist())
    index_of = {lid: i for i, lid in enumerate(label_ids)}
    urls = shard_urls(args.shards)
    require_shards(urls, args.shards)  # every rank: each node must see them
    protocol, local_path = split_protocol(args.output)
    if protocol not in (None, "file", "local"):  # read as written: no filesystem (gcsfs, s3fs) is loaded
        raise ValueError(f"--output {args.output}: checkpoints and logs are written to a POSIX directory (one "
                         "every node mounts, or with --node-local-checkpoints each node's own), not a URL; copy "
                         "the finished run to object storage afterwards")
    args.output = local_path  # file:///x is /x: DeepSpeed and the logs use os paths
    spec = PreprocessSpec(args.input_size or DEFAULT_INPUT_SIZE.get(args.model, 224))
    lr = args.lr if args.lr is not None else default_lr(args.batch_size, "pretrain")
    warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup(args.steps, "pretrain")
    save_every = args.save_every or max(1, args.steps // 10)
    ckpt_dir = os.path.join(args.output, "checkpoints")

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(args.model, len(label_ids)).to(info.device)
    optimizer = make_optimizer(model, lr, args.momentum, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.steps, warmup)
    if args.deepspeed_config:
        config = json.loads(sio.read_bytes(args.deepspeed_config))
    else:
        config = deepspeed_config(args.batch_size, info.world_size, bf16=info.device.type == "cuda",
                                  log_every=args.log_every)
    if args.node_local_checkpoints:
        config.setdefault("checkpoint", {})["use_node_local_storage"] = True
    node_local = bool(config.get("checkpoint", {}).get("use_node_local_storage"))
    engine, optimizer, scheduler = RT.initialize(model, optimizer, scheduler, config)

    num_workers = args.num_workers
    if num_workers is None:
        num_workers = default_num_workers(cap=max(1, len(urls) // info.world_size))
    workers = max(1, num_workers)
    decode_scaling = args.decode_scaling or DEFAULT_DECODE_SCALING
    state = LoaderState(workers=workers)
    start = 0
    # Marks the checkpoints of this run (drawn by rank 0): a node's copy left by another run is refused.
    run_id = RT.all_gather_longs([int.from_bytes(os.urandom(7), "big")])[0][0]
    log_path = os.path.join(args.output, "train_log.jsonl")
    if args.resume:
        tag = RT.agree_resume_tag(ckpt_dir, info.device)  # rank 0 chooses; every rank can read it, or all fail
        if tag:
            client = RT.load_checkpoint(engine, ckpt_dir, tag)
            start = int(client["step"])
            runs = RT.all_gather_longs([int(client.get("run", 0))])
            run_id = runs[0][0]
            if any(r[0] != run_id for r in runs):
                raise ValueError(f"checkpoint {tag} of rank(s) {[i for i, r in enumerate(runs) if r[0] != run_id]} "
                                 "was written by another run than rank 0's (a node's copy left from an earlier "
                                 "run); restore that node's checkpoints, or start again with --overwrite")
            per_rank = client["loader"]
            if args.num_workers is None:  # the defaults follow the checkpoint
                num_workers = workers = int(client["loader_workers"])
            saved_scaling = client.get("decode_scaling", "none")  # checkpoints before the option: whole
            if args.decode_scaling is None:
                decode_scaling = saved_scaling
            elif args.decode_scaling != saved_scaling:
                raise ValueError(f"checkpoint {tag} decoded its samples with --decode-scaling {saved_scaling}; "
                                 "resume with the same (the rest of the stream would have other pixels)")
            if len(per_rank) != info.world_size or client["loader_workers"] != workers:
                raise ValueError(f"checkpoint {tag} was written by {len(per_rank)} rank(s) with "
                                 f"{client['loader_workers']} loader worker(s); resume with the same")
            mine = per_rank[info.rank]
            state = LoaderState(workers=workers, batches=mine[0], corrupt=mine[1], positions=list(mine[2:]))
            torch.set_rng_state(client["torch_rng"])
            if info.is_main:
                print(f"[resume] from {tag} (step {start})", flush=True)
        elif info.is_main:
            print(f"[resume] no complete checkpoint in {ckpt_dir}; starting from scratch", flush=True)
    resumed_from = start
    end = min(args.steps, args.stop_after) if args.stop_after else args.steps
    loader = _loader(urls, spec, args, info, state, num_workers, decode_scaling)
    finished = _prepare_output(args, info, node_local)  # every input and option is checked by now
    if finished is not None:
        return finished
    if info.is_main and start == 0:
        os.makedirs(args.output, exist_ok=True)
        open(log_path, "w").close()
    progress = RT.Progress(args.steps, start, args.batch_size, args.log_every, info.is_main)
    it = iter(loader)
    engine.train()
    losses = []
    for step in range(start, end):
        x, labels, worker, next_position, corrupt = next(it)
        y = soft_targets(labels, index_of, len(label_ids)).to(info.device)
        logits = engine(normalise_batch(x.to(info.device), spec))
        loss = -(y * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        lr_now = optimizer.param_groups[0]["lr"]  # the rate this step uses
        engine.backward(loss)
        engine.step()
        state.update(worker, next_position, corrupt)
        value = float(loss.detach())
        losses.append(value)
        progress.update(step, value, lr_now)
        if info.is_main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": step + 1, "loss": value, "lr": lr_now}) + "\n")
        if (step + 1) % save_every == 0 or step + 1 == end:
            gathered = RT.all_gather_longs([state.batches, state.corrupt, *state.positions])
            RT.save_checkpoint(engine, ckpt_dir, step + 1, {
                "step": step + 1, "loader": gathered, "loader_workers": workers, "decode_scaling": decode_scaling,
                "torch_rng": torch.get_rng_state(), "seed": args.seed, "run": run_id}, keep=args.keep_checkpoints,
                node_local=node_local)
    del it, loader

    corrupt_total = sum(r[1] for r in RT.all_gather_longs([state.batches, state.corrupt]))
    result = {"steps_done": end, "final_loss": losses[-1] if losses else None,
              "mean_loss_last_10": float(np.mean(losses[-10:])) if losses else None,
              "corrupt_samples_skipped": corrupt_total, "world_size": info.world_size,
              "shards": len(urls), "lr": lr, "warmup_steps": warmup, "batch_size": args.batch_size,
              "loader_workers": num_workers, "decode_scaling": decode_scaling}
    _write_rank_report(args, info, urls, workers, engine.module, state, resumed_from)
    if end == args.steps:
        RT.average_buffers(engine.module)
        if info.is_main:
            save_generalist(os.path.join(args.output, "generalist.pt"), engine.module, args.model, label_ids,
                            spec, vocab, extra={"steps": args.steps, "shards": args.shards, "seed": args.seed})
    RT.write_json_main(os.path.join(args.output, "metrics.json"), result)
    if end == args.steps and info.is_main:
        StageOutput(args.output, "pretrain", in_place=True).commit(args.output)  # _SUCCESS last
    RT.barrier()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return RT.cli_main("pretrain", build_parser(), run,
                       lambda r, a: f"{r['steps_done']} steps, final loss {r['final_loss']:.4f} -> {a.output}",
                       argv)


if __name__ == "__main__":
    raise SystemExit(main())
