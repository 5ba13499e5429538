"""``make resample TARGET=food101 SIZE=80M``: weights, near-duplicates, resample, shards, verify.

::

    python -m adaptive_transfer.resample --target food101 --size 80M [--source jft]
      [--matcher same|elastic] [--draw multinomial|systematic] [--seed 0]
      [--runner DirectRunner] [--spark-master local[*]] [--out out]
      [--target-root PATH] [--model generalist.pt] [--samples-per-shard 10000]
      [--no-dedup] [--dedup-threshold T]

Layout under ``--out`` (a local path or URL)::

    weights/<target>-<fingerprint>/          importance weights (reused while inputs are unchanged)
    embeddings/index-<fp>-model-<fp>/        source embeddings (one per index and generalist, every target)
    dedup/<target>-<fingerprint>/            near-duplicates of the target's train and test images
    label-sets/index-<fingerprint>[-exclude-<fp>].parquet
                                             the index's label-set table (shared by every run over it
                                             and the same exclusions)
    <target>/<size>-<matcher>-<fingerprint>/
        resample/                            selection, stats.json, label_stats.png
        shards/                              shard-*.tar, manifest.json, _SUCCESS

The resampler never draws a near-duplicate of a target image (``--exclude``
with the dedup stage's ``exclude.parquet``); ``--no-dedup`` (``make
resample DEDUP=0``) draws from the whole source.

Fingerprints hash the inputs (listings of the index and target, contents of
the vocabulary, the generalist) and every option, so a rerun finds finished
work and skips it, and any training run can point at ``.../shards/manifest.json``.
``--target demo`` (with ``--source demo``) runs the same path on generated data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Sequence

from schemas import format_size, parse_size
from schemas import io as sio
from schemas.stage_output import is_complete
from schemas.targets import list_target

from .registry import load_source, load_target

__all__ = ["build_parser", "plan", "run", "main"]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adaptive_transfer.resample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="a configs/targets name (food101, ...) or a YAML path")
    p.add_argument("--size", required=True, help="pre-training set size: 80M, 2M, 1.5B, ...")
    p.add_argument("--source", default=None, help="a configs/sources name (default jft; demo for --target demo)")
    p.add_argument("--matcher", choices=["same", "elastic"], default="same")
    p.add_argument("--draw", choices=["multinomial", "systematic"], default="multinomial")
    p.add_argument("--aggregate", choices=["mean", "max", "sum"], default="mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--runner", default="DirectRunner", help="Beam runner for the weights pipeline")
    p.add_argument("--beam-arg", action="append", default=[], help="extra Beam option, repeatable")
    p.add_argument("--spark-master", default=None, help="default local[*]")
    p.add_argument("--out", default="out")
    p.add_argument("--target-root", help="where the target data lives (overrides the config)")
    p.add_argument("--model", help="generalist checkpoint (overrides the source config)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-side", type=int, metavar="N",
                   help="shards: re-encode images whose longer side exceeds N pixels (write_shards --max-side)")
    p.add_argument("--quality", type=int, metavar="Q", help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help="where a uri index's images may be read from, repeatable (default: the source "
                        "config's image_root or train_root, else the index's own storage)")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="keep near-duplicates of the target's train and test images in the source")
    p.add_argument("--dedup-threshold", type=float, default=None,
                   help="near-duplicate similarity threshold (default: beam_pipelines.near_duplicates')")
    return p


def plan(args: argparse.Namespace, log=print) -> dict:
    """Resolve configs and fingerprints into the run's directories (no work)."""
    source_name = args.source or ("demo" if args.target == "demo" else "jft")
    target = load_target(args.target, args.target_root)
    source = load_source(source_name)
    index, labels, model, root = source.index, source.labels, args.model or source.generalist, target.root
    if "generated" in (index, labels, model, root) or target.name == "demo":
        from .demo_data import ensure_demo_data

        data = ensure_demo_data(sio.join(args.out, "demo-data"), spark=_spark(args), log=log)
        index, labels = data.index, data.labels
        model = args.model or data.generalist
        root = args.target_root or data.target
    if not model:
        raise ValueError(f"source {source_name!r} names no generalist; pass --model generalist.pt "
                         "(train one with trainer.pretrain on the entire source)")
    size = parse_size(args.size)
    split = list_target(root, target.layout, target.train_split)
    inputs = {
        "index": sio.listing_fingerprint(index), "labels": sio.fingerprint_paths(labels),
        "model": sio.file_sha256(model),
        "target_images": _hash(split.paths),
    }
    weights_key = _hash({"inputs": inputs, "layout": target.layout, "split": target.train_split,
                         "temperature": args.temperature})
    options = {"size": size, "matcher": args.matcher, "draw": args.draw if args.matcher == "same" else "systematic",
               "aggregate": args.aggregate, "seed": args.seed, "samples_per_shard": args.samples_per_shard,
               **({"max_side": args.max_side, "quality": args.quality} if args.max_side else {})}
    dedup = _plan_dedup(args, target, root, inputs) if getattr(args, "dedup", True) else None
    run_key = _hash({"weights": weights_key, **({"dedup": dedup["key"]} if dedup else {}), **options})
    label = f"{format_size(size)}-{args.matcher}" + (f"-{args.draw}" if args.matcher == "same" else "")
    base = sio.join(args.out, target.name, f"{label}-{run_key[:12]}")
    image_root = source.extra.get("image_root") or source.extra.get("train_root")
    allowed = args.allow_uri_prefix or ([image_root] if image_root else None)
    return {"target": target, "source": source_name, "index": index, "labels": labels, "model": model,
            "allow_uri_prefixes": allowed,
            "root": root, "size": size, "options": options, "inputs": inputs,
            "weights_dir": sio.join(args.out, "weights", f"{target.name}-{weights_key[:12]}"),
            # One per index (less the excluded keys), shared by every size and matcher (spark_jobs.label_sets).
            "label_sets": sio.join(args.out, "label-sets", f"index-{inputs['index'][:12]}"
                                   + (f"-exclude-{dedup['key'][:12]}" if dedup else "") + ".parquet"),
            "dedup": dedup, "resample_dir": sio.join(base, "resample"), "shards_dir": sio.join(base, "shards")}


def _plan_dedup(args: argparse.Namespace, target, root: str, inputs: dict) -> dict:
    """The near-duplicates stage's directories: its output (per target,
    generalist, index and threshold) and the source embeddings (per index and
    generalist: every target reuses them)."""
    from beam_pipelines.near_duplicates import DEFAULT_GRID, DEFAULT_THRESHOLD

    splits = list(dict.fromkeys([target.train_split, target.test_split]))
    listed = [list_target(root, target.layout, s).paths for s in splits]
    threshold = DEFAULT_THRESHOLD if args.dedup_threshold is None else args.dedup_threshold
    key = _hash({"index": inputs["index"], "model": inputs["model"], "layout": target.layout, "splits": splits,
                 "target_images": _hash(listed), "threshold": threshold, "grid": DEFAULT_GRID})
    return {"key": key, "splits": splits, "threshold": threshold,
            "dir": sio.join(args.out, "dedup", f"{target.name}-{key[:12]}"),
            "embeddings": sio.join(args.out, "embeddings",
                                   f"index-{inputs['index'][:12]}-model-{inputs['model'][:12]}")}


_SPARK = {}


def _spark(args):
    if "session" not in _SPARK:
        from spark_jobs.session import get_session

        _SPARK["session"] = get_session("adaptive-transfer resample", args.spark_master)
    return _SPARK["session"]


def run(args: argparse.Namespace, log=print) -> dict:
    """Run every stage not already complete; return the summary."""
    from beam_pipelines import importance_weights as IW
    from beam_pipelines import near_duplicates as ND
    from spark_jobs import resample as R
    from spark_jobs import verify as V
    from spark_jobs import write_shards as W

    t0 = time.time()
    p = plan(args, log)
    target = p["target"]
    if is_complete(p["weights_dir"]):
        log(f"[1/5] weights: reusing {p['weights_dir']}")
    else:
        log(f"[1/5] weights: Beam ({args.runner}) -> {p['weights_dir']}")
        IW.run(IW.WeightsJob(index=p["index"], labels=p["labels"], target_root=p["root"],
                             target_layout=target.layout, target_split=target.train_split, target=target.name,
                             checkpoint=p["model"], temperature=args.temperature, output=p["weights_dir"]),
               ["--runner", args.runner, *args.beam_arg])
    dedup, exclude, excluded = p["dedup"], None, 0
    if dedup is None:
        log("[2/5] near-duplicates: off (--no-dedup): the source may hold copies of target images")
    else:
        if is_complete(dedup["dir"]):
            log(f"[2/5] near-duplicates: reusing {dedup['dir']}")
        else:
            log(f"[2/5] near-duplicates of {'+'.join(dedup['splits'])}: Beam ({args.runner}) -> {dedup['dir']} "
                f"(source embeddings: {dedup['embeddings']})")
            ND.run(ND.NearDuplicatesJob(index=p["index"], labels=p["labels"], target_root=p["root"],
                                        target_layout=target.layout, splits=tuple(dedup["splits"]),
                                        checkpoint=p["model"], threshold=dedup["threshold"],
                                        embeddings=dedup["embeddings"], output=dedup["dir"],
                                        allow_uri_prefixes=tuple(p["allow_uri_prefixes"] or ())),
                   ["--runner", args.runner, *args.beam_arg])
        found = json.loads(sio.read_bytes(sio.join(dedup["dir"], "summary.json")))
        exclude, excluded = sio.join(dedup["dir"], "exclude.parquet"), found["excluded"]
        log(f"      {found['excluded']:,} source examples excluded (by split: "
            + ", ".join(f"{s} {n:,}" for s, n in found["excluded_by_split"].items()) + ")")
    spark = _spark(args)
    o = p["options"]
    log(f"[3/5] resample: {format_size(o['size'])} {args.matcher} -> {p['resample_dir']}")
    stats = R.run(spark, R.ResampleJob(index=p["index"], weights=sio.join(p["weights_dir"], "weights.parquet"),
                                       size=o["size"], matcher=o["matcher"], draw=o["draw"],
                                       aggregate=o["aggregate"], seed=o["seed"], labels=p["labels"],
                                       target=target.name, temperature=args.temperature, exclude=exclude,
                                       output=p["resample_dir"], label_sets=p["label_sets"]))
    log(f"[4/5] shards -> {p['shards_dir']}")
    manifest = W.run(spark, W.ShardJob(selection=p["resample_dir"], index=p["index"], output=p["shards_dir"],
                                       samples_per_shard=o["samples_per_shard"], seed=o["seed"],
                                       allow_uri_prefixes=p["allow_uri_prefixes"], max_side=o.get("max_side"),
                                       quality=o.get("quality")))
    log("[5/5] verify")
    report = V.verify(p["shards_dir"])
    if not report.ok:
        raise ValueError("verify failed: " + "; ".join(report.problems[:5]))
    weights_summary = json.loads(sio.read_bytes(sio.join(p["weights_dir"], "summary.json")))
    summary = {
        "target": target.name, "source": p["source"], "shards": sio.join(p["shards_dir"], "manifest.json"),
        "samples": manifest.total_samples, "unique_examples": manifest.unique_examples,
        "shard_files": len(manifest.shards), "total_variation": stats["total_variation"],
        "top_labels": [(t["name"], round(t["weight"], 4)) for t in weights_summary["top_labels"][:10]],
        "weights": p["weights_dir"], "resample": p["resample_dir"], "seconds": round(time.time() - t0, 1),
        "dedup": dedup and dedup["dir"], "excluded": excluded,
    }
    log("")
    log(f"shards:   {summary['shards']}")
    log(f"samples:  {summary['samples']:,} in {summary['shard_files']} shards, "
        f"{summary['unique_examples']:,} unique examples (total variation {summary['total_variation']:.4f})")
    log("top labels by importance weight: " + ", ".join(f"{n} ({w:g})" for n, w in summary["top_labels"]))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"resample: error: {e}", file=sys.stderr)
        return 1
    finally:
        if "session" in _SPARK:
            _SPARK.pop("session").stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
