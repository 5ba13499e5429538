"""Optimisation as in the paper: SGD with Nesterov momentum, linear warmup
then cosine decay; the DeepSpeed configuration generated from the flags.

Paper (§4): pre-training 2M steps with 20k warmup steps (1%), batch 1024;
fine-tuning 20k steps with 2k warmup (10%), batch 256. Defaults here keep
those proportions for any ``--steps``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["warmup_cosine", "default_warmup", "default_lr", "param_groups", "make_optimizer",
           "make_scheduler", "deepspeed_config"]

PRETRAIN_WARMUP_FRACTION = 20_000 / 2_000_000
FINETUNE_WARMUP_FRACTION = 2_000 / 20_000


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier at ``step`` (0-based): linear ramp to 1 over ``warmup_steps``
    (reaching 1 at step ``warmup_steps``), then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def default_warmup(steps: int, stage: str) -> int:
    """Warmup steps in the paper's proportion: 1% (pretrain) or 10% (finetune)."""
    fraction = PRETRAIN_WARMUP_FRACTION if stage == "pretrain" else FINETUNE_WARMUP_FRACTION
    return max(1, round(steps * fraction)) if steps > 1 else 0


def default_lr(batch_size: int, stage: str) -> float:
    """Linear scaling: 0.1 per 256 images for pre-training, 0.01 for fine-tuning."""
    base = 0.1 if stage == "pretrain" else 0.01
    return base * batch_size / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of conv/linear layers only, not on biases or norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4
                   ) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=True)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps))


def deepspeed_config(global_batch: int, world_size: int, *, bf16: bool, log_every: int) -> dict:
    """DeepSpeed config for data-parallel SGD: ``global_batch`` split evenly
    across ranks, no gradient accumulation, ZeRO stage 0 (plain allreduce);
    ``bf16``: mixed precision on GPUs (autocast to bfloat16)."""
    if global_batch % world_size:
        raise ValueError(f"--batch-size {global_batch} is not divisible by the {world_size} ranks")
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0},
        # bfloat16 compute under torch.autocast, fp32 master weights: batch norm
        # stays fp32. (DeepSpeed's "bf16" mode casts parameters but keeps fp32
        # buffers, which cuDNN's batch-norm backward refuses for CNNs.)
        **({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if bf16 else {}),
        "steps_per_print": max(1, log_every) * 1000,
        "wall_clock_breakdown": False,
    }
