"""Near-duplicates: embedding and comparison against plain baselines.

::

    .venv/bin/python -m benchmarks.near_duplicates_bench [--images 4000] [--size 64] \\
        [--source-rows 16384] [--target-rows 10000] [--dim 1024]

1. **Embedding** (the cost paid once per source image): ``EmbedSource`` on
   the DirectRunner (in-process, and with the store written as well) against
   a plain batched torch loop over the same generated index (read each row
   group, decode and preprocess with the checkpoint's spec, embed in batches
   of ``--batch-size``, float16). Source images embedded per second.
2. **Comparison** (the cost every target pays): ``similarity.best_matches``
   in blocks of ``--compare-rows`` source rows, and the whole pipeline path
   that reuses stored embeddings (``ReadStore`` -> ``BestMatch``), against a
   bare float32 numpy matrix product of the same shapes. Comparisons
   (source x target pairs) per second.

The sides take turns for ``--repeat`` rounds on warm files and each keeps
its best time; prints the ratios side by side and a JSON line; asserts
nothing. ``--project`` scales
the measured rates to a source and target size (default 300M and 100k).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import torch

from beam_pipelines.execution import new_pipeline
from beam_pipelines.embeddings import (EmbeddedRows, EmbedSource, ReadStore, TargetEmbeddings, WriteStore,
                                       rows_table)
from beam_pipelines.label_counts import match_files
from beam_pipelines.near_duplicates import COMPARE_ROWS, BestMatch
from beam_pipelines.similarity import best_matches, row_norms, unit_rows
from schemas import io as sio
from adaptive_transfer.synthetic import SourceSpec, generate_source
from trainer.models import build_model, embed, embedding_dim, load_generalist, save_generalist
from trainer.transforms import PreprocessSpec

IN_PROCESS = ["--runner", "DirectRunner", "--direct_num_workers", "1"]


def prepare(work: str, images: int, size: int, input_size: int) -> tuple[str, str]:
    src = os.path.join(work, f"source-{images}-{size}")
    if not os.path.exists(os.path.join(src, "labels.parquet")):
        generate_source(src, SourceSpec(num_examples=images, image_size=size, num_files=2, row_group_size=1024))
    model_path = os.path.join(work, "bench-generalist.pt")
    vocab = sio.read_parquet(os.path.join(src, "labels.parquet"))
    torch.manual_seed(0)
    save_generalist(model_path, build_model("small", vocab.num_rows), "small", vocab.column("label_id").to_pylist(),
                    PreprocessSpec(input_size), vocab)
    return os.path.join(src, "index"), model_path


def plain_embedding_loop(index: str, model_path: str, batch_size: int, grid: int) -> float:
    """Read, decode, preprocess and embed every image, batch by batch."""
    start = time.perf_counter()
    model, preprocess = load_generalist(model_path)
    count = 0
    with torch.no_grad():
        for path in match_files(index):
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_size, columns=["key", "image"]):
                x = torch.stack([preprocess(b) for b in batch.column(1).to_pylist()])
                count += len(embed(model, x, grid).numpy().astype(np.float16))
    return time.perf_counter() - start


def embedding_pipeline(index: str, model_path: str, batch_size: int, grid: int, options: list[str],
                       store: str | None = None) -> float:
    spec, dim = _spec(model_path), _dim(model_path, grid)
    start = time.perf_counter()
    with new_pipeline(options) as p:
        embedded = (p | beam.Create(match_files(index))
                      | EmbedSource(model_path, spec, "image", grid, batch_size))["embeddings"]
        if store is not None:
            _ = embedded | WriteStore(sio.join(store, "part"), dim, batch_size)
        _ = embedded | beam.Map(len) | beam.CombineGlobally(sum)
    return time.perf_counter() - start


def _spec(model_path: str) -> dict:
    from trainer.models import preprocess_spec, read_generalist

    return preprocess_spec(read_generalist(model_path)).to_dict()


def _dim(model_path: str, grid: int) -> int:
    from trainer.models import read_generalist

    ckpt = read_generalist(model_path)
    return embedding_dim(build_model(ckpt["architecture"], ckpt["num_classes"]), grid)


def bare_matmul(source: np.ndarray, target: np.ndarray, batch_size: int) -> float:
    """float32 products of the same shapes as the pipeline's, nothing else."""
    t = target.astype(np.float32)
    s = source.astype(np.float32)
    start = time.perf_counter()
    for i in range(0, len(s), batch_size):
        _ = s[i:i + batch_size] @ t.T
    return time.perf_counter() - start


def best_matches_loop(source: np.ndarray, target: np.ndarray, batch_size: int) -> float:
    start = time.perf_counter()
    unit, norms = unit_rows(target), row_norms(target)
    for i in range(0, len(source), batch_size):
        best_matches(source[i:i + batch_size], target, unit, norms)
    return time.perf_counter() - start


def compare_pipeline(store_files: list[str], target_file: str, dim: int, batch_size: int) -> float:
    """Stored embeddings against a target side input, as near_duplicates
    reuses them (the target is read from a file at run time: a Create of it
    would be pickled and bz2-compressed into the pipeline)."""
    def load(path):
        vectors = np.load(path)
        return TargetEmbeddings([f"t{i}" for i in range(len(vectors))], ["train"] * len(vectors), vectors)

    start = time.perf_counter()
    with new_pipeline(IN_PROCESS) as p:
        target_pc = p | "TargetFile" >> beam.Create([target_file]) | "LoadTarget" >> beam.Map(load)
        _ = (p | "StoreFiles" >> beam.Create(store_files) | ReadStore(dim, batch_size)
               | beam.ParDo(BestMatch(), beam.pvalue.AsSingleton(target_pc))
               | beam.Map(lambda m: len(m.keys)) | beam.CombineGlobally(sum))
    return time.perf_counter() - start


def write_store(path: str, source: np.ndarray, rows_per_group: int = 8192) -> list[str]:
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, "part-0.parquet")
    with pq.ParquetWriter(file, rows_table([EmbeddedRows(["k"], ["f"], np.zeros(1, np.int64), source[:1])],
                                           source.shape[1]).schema) as writer:
        for s in range(0, len(source), rows_per_group):
            chunk = source[s:s + rows_per_group]
            writer.write_table(rows_table([EmbeddedRows([f"n{s + i:08d}/x_{s + i}.JPEG" for i in range(len(chunk))],
                                                        ["part-00000.parquet"] * len(chunk),
                                                        np.arange(s, s + len(chunk)), chunk)], source.shape[1]))
    return [file]


def interleaved(sides: dict, repeat: int) -> dict[str, float]:
    """Best time of each side over ``repeat`` rounds, the sides taking turns
    within a round (a busy machine's drift hits every side alike)."""
    best = {name: float("inf") for name in sides}
    for _ in range(repeat):
        for name, run in sides.items():
            best[name] = min(best[name], run())
    return best


def project(images_per_s: float, pairs_per_s: float, dim: int, source: float, target: float, image_dim: int
            ) -> dict:
    """Core-hours for ``source`` images against ``target`` images at the measured rates,
    the comparison scaled by ``image_dim / dim`` (its cost is proportional to D)."""
    embed_h = source / images_per_s / 3600
    compare_h = source * target / (pairs_per_s * dim / image_dim) / 3600
    return {"embed_hours": embed_h, "compare_hours": compare_h, "store_bytes": source * (2 * image_dim + 40)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000, help="generated source images to embed")
    ap.add_argument("--size", type=int, default=64, help="side of the generated JPEGs, pixels")
    ap.add_argument("--input-size", type=int, default=32, help="the small generalist's input side, pixels")
    ap.add_argument("--grid", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--source-rows", type=int, default=16384, help="stored source embeddings compared")
    ap.add_argument("--target-rows", type=int, default=10000, help="target embeddings (the side input)")
    ap.add_argument("--dim", type=int, default=1024, help="embedding length for the comparison (small, grid 2)")
    ap.add_argument("--compare-rows", type=int, default=COMPARE_ROWS,
                    help=f"source rows per matrix product (default the pipeline's, {COMPARE_ROWS})")
    ap.add_argument("--project", default="300e6,1e5", help="source,target sizes to project the cost to")
    ap.add_argument("--project-dim", type=int, default=8192,
                    help="embedding length at that scale (ResNet-50 / Inception-v3 at grid 2: 8192)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each side keeps its best time")
    ap.add_argument("--skip-embedding", action="store_true")
    ap.add_argument("--work", default="/tmp/near-duplicates-bench")
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    results: dict = {"threads": torch.get_num_threads()}

    if not args.skip_embedding:
        index, model_path = prepare(args.work, args.images, args.size, args.input_size)
        for path in match_files(index):  # page cache: every side reads warm files
            open(path, "rb").read()
        plain_embedding_loop(index, model_path, args.batch_size, args.grid)  # warm torch
        store = os.path.join(args.work, "store")

        def with_store():
            shutil.rmtree(store, ignore_errors=True)
            return embedding_pipeline(index, model_path, args.batch_size, args.grid, IN_PROCESS, store)

        sides = {"plain torch loop": lambda: plain_embedding_loop(index, model_path, args.batch_size, args.grid),
                 "pipeline in-process": lambda: embedding_pipeline(index, model_path, args.batch_size, args.grid,
                                                                   IN_PROCESS),
                 "pipeline + store": with_store}
        best = interleaved(sides, args.repeat)
        n = args.images
        t_plain = best["plain torch loop"]
        results.update(images=n, plain_embed_s=t_plain, **{k: v for k, v in best.items() if k != "plain torch loop"})
        for name, t in best.items():
            ratio = "" if name == "plain torch loop" else f"  ({t / t_plain:.2f}x the loop's time)"
            print(f"embedding: {name:23} {t:6.2f}s {n / t:7.0f} images/s{ratio}", flush=True)
        stored = sum(os.path.getsize(f) for f in match_files(store))
        results["store_bytes_per_image"] = stored / n
        print(f"embedding: store {stored / n:.0f} bytes per image (dim {_dim(model_path, args.grid)}, float16 "
              f"{2 * _dim(model_path, args.grid)} B + key, file, row)", flush=True)

    rng = np.random.default_rng(0)
    source = unit_rows(rng.normal(size=(args.source_rows, args.dim))).astype(np.float16)
    target = unit_rows(rng.normal(size=(args.target_rows, args.dim))).astype(np.float16)
    pairs = args.source_rows * args.target_rows
    rows = args.compare_rows
    bare_matmul(source[:rows * 2], target, rows)  # warm BLAS
    files = write_store(os.path.join(args.work, "compare-store"), source)
    target_file = os.path.join(args.work, "compare-target.npy")
    np.save(target_file, target)
    best = interleaved({"bare": lambda: bare_matmul(source, target, rows),
                        "best_matches": lambda: best_matches_loop(source, target, rows),
                        "pipeline": lambda: compare_pipeline(files, target_file, args.dim, rows)}, args.repeat)
    t_bare, t_best, t_pipe = best["bare"], best["best_matches"], best["pipeline"]
    print(f"compare:   bare numpy matmul        {t_bare:6.2f}s {pairs / t_bare:9.3g} pairs/s "
          f"({args.source_rows} x {args.target_rows}, D={args.dim}, {rows} source rows a product)", flush=True)
    print(f"compare:   best_matches             {t_best:6.2f}s {pairs / t_best:9.3g} pairs/s  "
          f"({t_best / t_bare:.2f}x the matmul's time)", flush=True)
    print(f"compare:   store -> BestMatch (Beam) {t_pipe:6.2f}s {pairs / t_pipe:9.3g} pairs/s  "
          f"({t_pipe / t_bare:.2f}x the matmul's time)", flush=True)
    results.update(pairs=pairs, bare_s=t_bare, best_matches_s=t_best, compare_pipeline_s=t_pipe)

    big_source, big_target = (float(x) for x in args.project.split(","))
    if "plain_embed_s" in results:
        cost = project(args.images / results["pipeline in-process"], pairs / t_pipe, args.dim, big_source,
                       big_target, args.project_dim)
        results["projection"] = cost
        print(f"projection ({big_source:.3g} source, {big_target:.3g} target, D={args.project_dim}, these "
              f"{results['threads']} threads): compare {cost['compare_hours']:,.0f} h; embed (small CNN at "
              f"{args.input_size} px) {cost['embed_hours']:,.0f} h; store {cost['store_bytes'] / 1e12:.1f} TB")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
