"""PySpark jobs: resample the source by importance weights, write WebDataset
shards with a manifest, verify them (DESIGN.md §3-4)."""
