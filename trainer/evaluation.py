"""Target metrics: top-1 and mean per-class accuracy (the paper reports the
latter for Oxford Pets and Flowers), computed over ranks without gathering
predictions: per-class correct/total counts are summed with all_reduce."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .transforms import normalise_batch

__all__ = ["accuracy_metrics", "evaluate", "describe"]


def accuracy_metrics(correct: np.ndarray, total: np.ndarray, classes: list[str]) -> dict:
    """Top-1 and mean per-class accuracy (over classes with test examples)."""
    correct = np.asarray(correct, np.int64)
    total = np.asarray(total, np.int64)
    seen = total > 0
    per_class = np.where(seen, correct / np.maximum(total, 1), np.nan)
    return {
        "top1": float(correct.sum() / max(1, total.sum())),
        "mean_per_class_accuracy": float(np.nanmean(per_class[seen])) if seen.any() else 0.0,
        "examples": int(total.sum()),
        "per_class": {c: {"accuracy": None if np.isnan(a) else float(a), "examples": int(t)}
                      for c, a, t in zip(classes, per_class, total)},
    }


def evaluate(model: torch.nn.Module, dataset, classes: list[str], device: torch.device,
             batch_size: int = 256, num_workers: int = 0) -> dict:
    """Evaluate ``dataset`` (items ``(x, class index)``) split over ranks.
    uint8 images (a dataset with ``normalise=False``) are normalised on
    ``device`` with the dataset's ``spec``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    correct = torch.zeros(len(classes), dtype=torch.long)
    total = torch.zeros(len(classes), dtype=torch.long)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = normalise_batch(x, dataset.spec)
            pred = model(x).argmax(dim=1).cpu()
            total += torch.bincount(y, minlength=len(classes))
            correct += torch.bincount(y[pred == y], minlength=len(classes))
    if was_training:
        model.train()
    if world > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    return accuracy_metrics(correct.numpy(), total.numpy(), classes)


def describe(metrics: dict, split: str, output: str) -> str:
    """The one-line summary the fine-tune and evaluate commands print."""
    return (f"top-1 {metrics['top1']:.4f}, mean per-class {metrics['mean_per_class_accuracy']:.4f} on "
            f"{metrics['examples']} {split} images -> {output}")
