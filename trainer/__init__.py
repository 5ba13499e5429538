"""DeepSpeed trainer: pre-train on WebDataset shards, fine-tune on the target,
evaluate (DESIGN.md §2)."""
