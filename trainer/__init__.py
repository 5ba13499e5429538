"""DeepSpeed trainer: pre-train on WebDataset shards, fine-tune on the target,
evaluate (docs/design.md, "Training")."""
