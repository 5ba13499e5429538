"""Build a source index and label vocabulary from ImageNet's training folders.

::

    python -m spark_jobs.build_index --imagenet-train ROOT/train \\
      --hierarchy wordnet.is_a.txt --words words.txt --output DIR \\
      [--inline-images] [--files 64] [--master local[*]]

* ``ROOT/train/<wnid>/<file>.JPEG`` (the ILSVRC-2012 layout): one example
  per file, key ``<wnid>/<file>`` (the usual ImageNet key), label the wnid;
* ``wordnet.is_a.txt``: ``<parent wnid> <child wnid>`` per line; WordNet is a
  DAG, the vocabulary a tree: a synset keeps the first parent listed;
* ``words.txt``: ``<wnid>\\t<names>``; a label's name is its first name.

The vocabulary holds the training wnids and all their ancestors (ids in
sorted wnid order, so the same inputs give the same ids). Writes
``DIR/index/part-*.parquet`` (key, labels, and ``uri`` or, with
``--inline-images``, ``image``), ``DIR/labels.parquet``, ``DIR/summary.json``
and, last, ``DIR/_SUCCESS``; ``--overwrite`` redoes a finished output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa

from schemas import SchemaError, VOCABULARY_SCHEMA, validate_index_batch, validate_vocabulary
from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.fingerprint import code_digest, digest
from schemas.stage_output import StageOutput
from schemas.shard_format import IMAGE_SUFFIXES

from .progress import spark_progress
from .session import add_spark_arguments, require_reachable_outputs, run_cli

__all__ = ["BuildIndexJob", "read_hierarchy", "build_vocabulary", "list_training_images", "run", "build_parser",
           "job_from_args", "main"]


@dataclass(frozen=True)
class BuildIndexJob:
    """One index build's inputs and options (the command line, typed).

    ``train_root``: ImageNet's ``train/`` folder (``--imagenet-train``);
    ``hierarchy``: ``wordnet.is_a.txt``; ``words``: ``words.txt``;
    ``inline_images``: copy the image bytes into the index; ``files``: the
    index's Parquet files (>= 1); ``shared_output``: a local ``output`` is
    mounted by every executor (``session.require_reachable_outputs``)."""

    train_root: str
    hierarchy: str
    words: str
    output: str
    inline_images: bool = False
    files: int = 64
    overwrite: bool = False
    shared_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.files, int) or self.files < 1:
            raise ValueError(f"--files must be >= 1, got {self.files}")

    def fingerprint(self, images: list[tuple[str, int]]) -> dict[str, Any]:
        """What the index is made from (the one reuse rule): where the images
        are and the listing of ``images`` (key, bytes), the hierarchy and
        words files' content, the layout (inline images, files) and the code."""
        return {"train_root": self.train_root, "images": digest(images), "inline_images": self.inline_images,
                "files": self.files, "hierarchy": sio.file_sha256(self.hierarchy),
                "words": sio.file_sha256(self.words), "code": code_digest("spark_jobs.build_index")}


def read_hierarchy(path: str) -> dict[str, str]:
    """child wnid -> parent wnid (the first parent listed)."""
    parent: dict[str, str] = {}
    for n, line in enumerate(sio.read_bytes(path).decode().splitlines()):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise SchemaError(f"expected '<parent wnid> <child wnid>', got {line!r}", file=path, row=n)
        parent.setdefault(fields[1], fields[0])
    return parent


def read_words(path: str) -> dict[str, str]:
    names = {}
    for line in sio.read_bytes(path).decode().splitlines():
        wnid, _, text = line.partition("\t")
        if wnid:
            names[wnid] = text.split(",")[0].strip() or wnid
    return names


def build_vocabulary(leaves: Sequence[str], parent: dict[str, str], names: dict[str, str]
                     ) -> tuple[pa.Table, dict[str, int]]:
    """Vocabulary table over ``leaves`` and their ancestors; wnid -> label id."""
    keep: set[str] = set()
    for wnid in leaves:
        node, seen = wnid, set()
        while node is not None and node not in keep:
            if node in seen:
                raise ValueError(f"the hierarchy has a cycle through {node}")
            seen.add(node)
            keep.add(node)
            node = parent.get(node)
    ordered = sorted(keep)
    ids = {w: i for i, w in enumerate(ordered)}
    table = pa.table({"label_id": pa.array(range(len(ordered)), pa.int32()),
                      "name": pa.array([names.get(w, w) for w in ordered], pa.string()),
                      "parent_id": pa.array([ids.get(parent.get(w)) for w in ordered], pa.int32()),
                      "wnid": pa.array(ordered, pa.string())})
    validate_vocabulary(table)
    return table, ids


def list_training_images(train_root: str) -> list[tuple[str, str, str]]:
    """``(key, wnid, path)`` for every image under ``<root>/<wnid>/``, sorted by key."""
    return [(key, wnid, path) for key, wnid, path, _ in _find_training_images(train_root)]


def _find_training_images(train_root: str) -> list[tuple[str, str, str, int]]:
    """``(key, wnid, path, bytes)`` for every image under ``<root>/<wnid>/``,
    sorted by key (sizes from the one listing: no request per file)."""
    fs, p = sio.filesystem(train_root)
    if not fs.isdir(p):
        raise FileNotFoundError(f"{train_root}: no such directory")
    out = []
    for f, info in fs.find(p, detail=True).items():
        rel = f[len(p):].lstrip("/")
        if "/" not in rel or not rel.lower().endswith(IMAGE_SUFFIXES):
            continue
        wnid = rel.split("/", 1)[0]
        out.append((rel, wnid, sio.join(train_root, rel) if "://" in train_root else f, int(info.get("size") or 0)))
    if not out:
        raise FileNotFoundError(f"{train_root}: no images in <wnid>/ folders")
    return sorted(out)


def _read_images(storage: dict):
    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sio.apply_storage_config(storage)
        for b in batches:
            images = [sio.read_bytes(u) for u in b.column("uri").to_pylist()]
            yield pa.RecordBatch.from_arrays([b.column("key"), b.column("labels"), pa.array(images, pa.binary())],
                                             names=["key", "labels", "image"])
    return read


def run(spark, job: BuildIndexJob) -> dict:
    """Build the index and vocabulary in ``job.output``; return the summary
    (with ``"reused": True`` where a finished output made from the same
    fingerprint was there). Every input is read and checked first; the
    output is built aside and committed whole (``schemas.stage_output``):
    nothing this stage did not write is deleted."""
    require_reachable_outputs(spark, {"--output": job.output}, job.shared_output)
    out = StageOutput(job.output, "build_index")
    found = _find_training_images(job.train_root)
    entries = [(key, wnid, path) for key, wnid, path, _ in found]
    parent = read_hierarchy(job.hierarchy)
    leaves = sorted({w for _, w, _ in entries})
    unknown = [w for w in leaves if w not in parent]
    if unknown:
        raise SchemaError(f"training folders {unknown[:5]} are not in the hierarchy", file=job.hierarchy)
    vocab, ids = build_vocabulary(leaves, parent, read_words(job.words))
    rows = pa.table({"key": [k for k, _, _ in entries],
                     "labels": pa.array([[ids[w]] for _, w, _ in entries], pa.list_(pa.int32())),
                     "uri": [u for _, _, u in entries]})
    validate_index_batch(rows, label_ids=vocab.column("label_id").to_numpy(), file=job.train_root)
    summary = {"examples": rows.num_rows, "classes": len(leaves), "labels": vocab.num_rows,
               "inline_images": job.inline_images, "train_root": job.train_root}
    fingerprint = job.fingerprint([(key, size) for key, _, _, size in found])
    with spark_progress(spark, "build_index"):
        reused = out.run(lambda work: _write_index(spark, job, rows, vocab, summary, work),
                         fingerprint=fingerprint, overwrite=job.overwrite)
    if reused:
        return {**json.loads(sio.read_bytes(sio.join(job.output, "summary.json"))), "reused": True}
    return summary


def _write_index(spark, job: BuildIndexJob, rows: pa.Table, vocab: pa.Table, summary: dict, work: str) -> None:
    """Write the index (sorted by key, in ``job.files`` files), the vocabulary and the summary into ``work``."""
    df = spark.createDataFrame(rows).repartitionByRange(max(1, min(job.files, rows.num_rows)), "key")
    if job.inline_images:
        df = df.mapInArrow(_read_images(sio.storage_config()), "key string, labels array<int>, image binary")
    df.sortWithinPartitions("key").write.parquet(sio.join(work, "index"))
    sio.write_parquet_atomic(vocab.select(["label_id", "name", "parent_id"]).cast(VOCABULARY_SCHEMA),
                             sio.join(work, "labels.parquet"))
    sio.write_bytes_atomic(sio.join(work, "summary.json"), sio.json_text(summary, indent=2) + "\n")


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m spark_jobs.build_index", description=__doc__)
    ap.add_argument("--imagenet-train", required=True, help="ImageNet's train/ folder (<wnid>/<file>.JPEG)")
    ap.add_argument("--hierarchy", required=True, help="wordnet.is_a.txt: '<parent wnid> <child wnid>' lines")
    ap.add_argument("--words", required=True, help="words.txt: '<wnid>\\t<names>' lines")
    ap.add_argument("--output", required=True)
    ap.add_argument("--inline-images", action="store_true", help="copy image bytes into the index")
    ap.add_argument("--files", type=int, default=64, help="Parquet files to write (default 64)")
    ap.add_argument("--overwrite", action="store_true", help="redo a complete output")
    add_spark_arguments(ap)
    return ap


def job_from_args(args) -> BuildIndexJob:
    return BuildIndexJob(train_root=args.imagenet_train, hierarchy=args.hierarchy, words=args.words,
                         output=args.output, inline_images=args.inline_images, files=args.files,
                         overwrite=args.overwrite, shared_output=args.shared_output)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("build_index", args, lambda: job_from_args(args), run,
                   lambda job, s: f"{s['examples']} examples, {s['classes']} classes, {s['labels']} labels "
                                  f"-> {job.output}")


if __name__ == "__main__":
    raise SystemExit(main())
