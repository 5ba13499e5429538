"""Small generated inputs for the trainer's tests: finished shard folders
(tars and a manifest, as write_shards leaves them) and a vocabulary."""

from __future__ import annotations

import io
import json
import os
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import VOCABULARY_SCHEMA, ResampleConfig
from schemas.shard_format import sample_json, sample_key, shard_name, write_tar
from adaptive_transfer.synthetic import encode_image


def sample_image(label: int, rng: np.random.Generator, side: int = 16) -> bytes:
    """A JPEG whose brightness says its label (so a model can learn it)."""
    pixels = np.full((side, side, 3), 30 * label, np.uint8) + rng.integers(0, 30, (side, side, 3), dtype=np.uint8)
    return encode_image(pixels)


def write_shard_dir(directory, sizes: Sequence[int], labels: int = 4, seed: int = 0, copies: int = 1) -> str:
    """A finished shard folder: shard ``s`` holds ``sizes[s]`` samples keyed
    ``k<s>-<i>`` (each source key ``copies`` times, as the resampler's copies);
    returns its ``manifest.json``."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, total = [], 0
    for s, size in enumerate(sizes):
        samples = []
        for i in range(size):
            label = int(rng.integers(labels))
            source, copy = f"k{s}-{i // copies}", i % copies
            samples.append((sample_key(source, copy), "jpg", sample_image(label, rng),
                            sample_json(source, copy, [label], 1.0)))
        buf = io.BytesIO()
        n, nbytes, sha = write_tar(buf, samples)
        name = shard_name("shard", s)
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(buf.getvalue())
        shards.append({"name": name, "samples": n, "bytes": nbytes, "sha256": sha})
        total += n
    manifest = {"format_version": 1, "config": ResampleConfig(target="t", size=max(1, total)).to_dict(),
                "inputs": {}, "shards": shards, "total_samples": total, "unique_examples": total,
                "label_distribution": {"1": total}, "bad_records": [], "extra": {"prefix": "shard"}}
    path = os.path.join(directory, "manifest.json")
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    open(os.path.join(directory, "_SUCCESS"), "w").close()
    return path


def write_labels(path, n: int = 4) -> str:
    """A vocabulary of ``n`` root labels."""
    table = pa.table({"label_id": pa.array(range(n), pa.int32()), "name": [f"l{i}" for i in range(n)],
                      "parent_id": pa.array([None] * n, pa.int32())}, schema=VOCABULARY_SCHEMA)
    pq.write_table(table, str(path))
    return str(path)


def all_keys(manifest: str) -> list[str]:
    """Every sample key the shards of ``manifest`` hold, in shard order."""
    from trainer.shards import read_shard_list, shard_samples

    return [s["__key__"] for url in read_shard_list(manifest).urls for s in shard_samples(url)]
