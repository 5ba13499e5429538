"""ResNet-50 training images/s on a GPU with the project's DeepSpeed setup.

Prepared for a machine with a GPU and torchvision (``pip install .[vision]``);
never part of the tests. Synthetic 224x224 inputs on the device isolate the
training step (forward, backward, allreduce, SGD) from data loading::

    python -m benchmarks.gpu_resnet50 [--arch resnet50|inception_v3] [--batch-size 256] [--steps 60] [--classes 1000]
    deepspeed --num_gpus 8 --module benchmarks.gpu_resnet50 --batch-size 2048

Prints images/s over the timed steps (after warm-up) and the peak memory.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from schemas.cli import ArgumentParser
from trainer import runtime as RT
from trainer.models import build_model
from trainer.optim import deepspeed_config, make_optimizer, make_scheduler


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.gpu_resnet50", description=__doc__)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--arch", default="resnet50", help="resnet50 or inception_v3")
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_alias("--model", "--arch")
    args = ap.parse_args(argv)
    info = RT.setup_distributed()
    if info.device.type != "cuda":
        print("gpu_resnet50: no GPU here; this benchmark is for GPU machines")
        return 2
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    # Contiguous (NCHW) parameters: DeepSpeed broadcasts them as bytes at
    # initialisation, which a channels_last bf16 parameter cannot be viewed as.
    model = build_model(args.arch, args.classes).to(info.device)
    opt = make_optimizer(model, 0.1 * args.batch_size / 256)
    sched = make_scheduler(opt, args.steps, 1)
    engine, opt, sched = RT.initialize(model, opt, sched, deepspeed_config(
        args.batch_size, info.world_size, bf16=True, log_every=1000))
    micro = args.batch_size // info.world_size
    size = 299 if args.arch == "inception_v3" else 224
    x = torch.randn(micro, 3, size, size, device=info.device)
    y = torch.randint(0, args.classes, (micro,), device=info.device)
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = F.cross_entropy(engine(x).float(), y)  # bf16 compute: autocast (trainer.optim)
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    rate = (args.steps - args.warmup) * args.batch_size / elapsed
    if info.is_main:
        print(json.dumps({"model": args.arch, "gpus": info.world_size, "global_batch": args.batch_size,
                          "images_per_s": rate, "images_per_s_per_gpu": rate / info.world_size,
                          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                          "device": torch.cuda.get_device_name()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
