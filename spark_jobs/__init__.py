"""PySpark jobs: resample the source by importance weights, write WebDataset
shards with a manifest, verify them (docs/design.md, "Contracts" and "Sampling")."""
