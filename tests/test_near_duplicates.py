"""beam_pipelines.near_duplicates: the mathematics against plain oracles, the
embedding transforms with TestPipeline, and end-to-end runs on a generated
source with planted near-duplicates of the target's train and test images
(re-encoded, resized, cropped, shifted, colour-jittered) beside hard
negatives (new images of the target's own classes)."""

from __future__ import annotations

import json
import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import near_duplicates as ND
from beam_pipelines.embeddings import (BAD_IMAGES, EmbeddedRows, EmbedTarget, ReadSourceImages, rows_table,
                                       table_rows)
from beam_pipelines.execution import in_process_runner
from beam_pipelines.label_counts import RowGroup
from beam_pipelines.similarity import best_matches, histogram_edges, near_threshold, similarity_histogram, unit_rows
from schemas import SchemaError
from schemas import io as sio
from adaptive_transfer.synthetic import TargetSpec, generate_target
from tests.near_duplicate_data import NEAR_DUPLICATE_KINDS, near_duplicate, plant_near_duplicates
from schemas.stage_output import MARKER, fingerprint_of
from schemas.targets import list_target
from tests.threshold_calibration import choose_threshold, detection_rates
from trainer.models import build_model, checkpoint_fingerprint, embed, load_generalist, save_generalist
from trainer.transforms import PreprocessSpec, decode_image, eval_transform

PIPELINE_OPTIONS = ["--runner", "DirectRunner"]


def beam_test_pipeline() -> BeamTestPipeline:
    """A TestPipeline on the stages' in-process runner (no Prism download attempt)."""
    options = PipelineOptions(PIPELINE_OPTIONS)
    return BeamTestPipeline(runner=in_process_runner(options), options=options)
#: Steps of the test generalist's training on the generated source (batch 64).
TRAIN_STEPS = 150
#: A cluttered Food-101-layout target: each image carries a few random shapes
#: besides its class's pattern, as photographs carry more than their class.
#: Without them two images of a class differ only in a handful of scalars and a
#: 1-pixel shift moves an image further than its nearest same-class neighbour
#: (docs/near-duplicates.md). Seed 0 is the held-out test; seeds 1-3 measured the default.
CLUTTERED = TargetSpec(layout="food101", branch="food", clutter=4)


# -- shared data ------------------------------------------------------------------------

def train_generalist(path: str, source_data, steps: int = TRAIN_STEPS, seed: int = 0) -> str:
    """A small generalist trained briefly (SGD, batch 64) on the whole source:
    the paper's generalist in miniature. One thread and deterministic
    algorithms (oneDNN's included): the same weights on every run of a
    machine (and far less CPU than two threads on a busy one). Other
    machines (CPU instruction sets, library versions) may still round
    otherwise; the tests assert what holds whatever the rounding."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    mkldnn = torch.backends.mkldnn.deterministic
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.deterministic = True
    try:
        return _train(path, source_data, steps, seed)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.mkldnn.deterministic = mkldnn


def _train(path: str, source_data, steps: int, seed: int) -> str:
    vocab = sio.read_parquet(source_data.labels_path)
    index = sio.read_parquet(source_data.index_path)
    spec = PreprocessSpec(32)
    x = torch.stack([torch.from_numpy(eval_transform(decode_image(b), spec))
                     for b in index.column("image").to_pylist()])
    y = torch.tensor([labels[0] for labels in index.column("labels").to_pylist()])
    torch.manual_seed(seed)
    model = build_model("small", vocab.num_rows)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_generalist(path, model.eval(), "small", vocab.column("label_id").to_pylist(), spec, vocab)
    return path


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, source_data):
    return train_generalist(str(tmp_path_factory.mktemp("gen") / "generalist.pt"), source_data)


def planted_world(root, source_data, seed: int) -> dict:
    """A cluttered target (seed ``seed``) and a source index directory holding
    the generated source's files and one file of planted examples."""
    spec = TargetSpec(**{**CLUTTERED.__dict__, "seed": seed})
    target = generate_target(str(root / "target"), spec)
    index = root / "index"
    index.mkdir()
    for name in os.listdir(source_data.index_path):
        os.symlink(os.path.join(source_data.index_path, name), index / name)
    planted = plant_near_duplicates(str(index / "part-planted.parquet"), target, spec, copies_per_kind=40,
                                    negatives_per_class=50, seed=seed)
    return {"target": target, "index": str(index), "planted": planted}


@pytest.fixture(scope="module")
def world(tmp_path_factory, source_data):
    return planted_world(tmp_path_factory.mktemp("world"), source_data, seed=0)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, world):
    """40 planted examples in one file: a source for the runs that check errors."""
    path = str(tmp_path_factory.mktemp("small") / "small.parquet")
    pq.write_table(pq.read_table(os.path.join(world["index"], "part-planted.parquet")).slice(0, 40), path)
    return path


def run_dedup(world_or_index, source_data, model, output, *extra, target=None):
    """The stage through its command line (own flags and Beam's, as a user gives them)."""
    index = world_or_index["index"] if isinstance(world_or_index, dict) else world_or_index
    root = target or world_or_index["target"].root
    job, beam_args = ND.job_from_args(["--index", index, "--labels", source_data.labels_path, "--target-root", root,
                                       "--target-layout", "food101", "--checkpoint", model, "--batch-size", "32",
                                       "--output", str(output), *extra])
    return ND.run(job, beam_args)


def planted_rates(similarity: dict[str, float], planted, threshold: float) -> dict:
    """Recall per kind of planted copy and the hard negatives' false-positive
    rate at ``threshold`` (written plainly: counts over the truth)."""
    out = {}
    for kind in NEAR_DUPLICATE_KINDS:
        keys = [k for k, (_, _, kd) in planted.copies.items() if kd == kind]
        out[kind] = sum(similarity[k] >= threshold for k in keys) / len(keys)
    copies = list(planted.copies)
    out["all"] = sum(similarity[k] >= threshold for k in copies) / len(copies)
    out["negatives"] = sum(similarity[k] >= threshold for k in planted.negatives) / len(planted.negatives)
    return out


# -- pure mathematics ----------------------------------------------------------------

def test_best_matches_against_brute_force_and_batch_invariant():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(37, 24)).astype(np.float16)
    target[5] = target[9]  # a tie: the first one wins
    source = rng.normal(size=(50, 24)).astype(np.float16)
    source[3] = target[9]
    index, sim = best_matches(source, target)
    for i in range(len(source)):
        a = source[i].astype(np.float64)
        cos = [float(a @ t.astype(np.float64)) / (np.linalg.norm(a) * np.linalg.norm(t.astype(np.float64)))
               for t in target]
        assert index[i] == int(np.argmax(cos))
        assert abs(sim[i] - max(cos)) < 1e-6
    assert index[3] == 5 and sim[3] == pytest.approx(1.0, abs=1e-7)
    # Any grouping of the rows gives the same bits (tiny blocks force many matrix products).
    parts = [best_matches(source[s:s + 7], target, block_bytes=1) for s in range(0, 50, 7)]
    assert np.concatenate([p[1] for p in parts]).tobytes() == sim.tobytes()
    assert np.concatenate([p[0] for p in parts]).tolist() == index.tolist()
    with pytest.raises(ValueError, match="no target embeddings"):
        best_matches(source, target[:0])
    with pytest.raises(ValueError, match="different shapes"):
        best_matches(source, target[:, :10])


def test_unit_rows_and_histogram_against_numpy():
    rows = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]], np.float16))
    assert rows.dtype == np.float32 and rows.tolist() == [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    rng = np.random.default_rng(1)
    s = np.concatenate([rng.uniform(-1, 1, 5000), [-1.0, 1.0, 0.95, 1.0000001]])
    expected, _ = np.histogram(np.clip(s, -1, 1), bins=histogram_edges())
    assert similarity_histogram(s).tolist() == expected.tolist()


def test_near_threshold_picks_the_closest_on_each_side():
    s = np.array([0.2, 0.96, 0.951, 0.9499, 0.99, 0.94, 0.953, 0.95], np.float32)
    above, below = near_threshold(s, 0.95, 2)
    # float32(0.95) is 0.94999999: below a threshold of 0.95 (compared in float64)
    assert above.tolist() == [2, 6] and below.tolist() == [7, 3]


def test_choose_threshold_is_the_lowest_with_few_false_positives():
    neg = np.arange(100, dtype=np.float32) / 100  # 0.00 .. 0.99
    t = choose_threshold(neg, 0.01)  # one negative may pass: just above the second largest, 0.98
    assert np.float32(0.98) < t <= np.nextafter(np.float32(0.98), np.float32(1))
    assert detection_rates([0.99, 0.5], neg, t) == (0.5, 0.01)
    rng = np.random.default_rng(2)
    for rate in (0.0, 0.01, 0.05, 0.2):
        neg = rng.normal(0.8, 0.05, 777).astype(np.float32)
        t = choose_threshold(neg, rate)
        assert (neg >= t).mean() <= rate  # never more than allowed ...
        assert (neg >= np.nextafter(np.float32(t), np.float32(-1)) - 1e-7).mean() > rate  # ... and no lower one
    assert choose_threshold([0.3], 1.0) == -1.0
    with pytest.raises(ValueError, match="no negatives"):
        choose_threshold([], 0.01)


def test_embed_is_the_pooled_power_normalised_feature_map():
    torch.manual_seed(0)
    model = build_model("small", 5).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fmap = model.features[:-2](x)  # (3, 256, 4, 4): the map before the global pool
        got1, got2 = embed(model, x, 1), embed(model, x, 2)
    penultimate = fmap.mean(dim=(2, 3))
    expected1 = penultimate.sqrt() / penultimate.sqrt().norm(dim=1, keepdim=True)  # ReLU output: >= 0
    cells = fmap.reshape(3, 256, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 blocks of the 4x4 map
    expected2 = cells.flatten(1).sqrt() / cells.flatten(1).sqrt().norm(dim=1, keepdim=True)
    torch.testing.assert_close(got1, expected1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got2, expected2, rtol=1e-5, atol=1e-6)
    assert got2.shape == (3, 1024)


def test_store_rows_round_trip_exactly():
    rng = np.random.default_rng(3)
    chunks = [EmbeddedRows([f"k{i}" for i in range(s, s + 4)], ["f.parquet"] * 4, np.arange(s, s + 4),
                           rng.normal(size=(4, 6)).astype(np.float16)) for s in (0, 4)]
    table = rows_table(chunks, 6)
    back = table_rows(table.slice(2, 5), 6)  # a slice: the buffer offset must be honoured
    assert back.keys == [f"k{i}" for i in range(2, 7)] and back.rows.tolist() == list(range(2, 7))
    assert back.vectors.tobytes() == np.concatenate([c.vectors for c in chunks])[2:7].tobytes()
    with pytest.raises(ValueError, match="expected fixed_size_binary"):
        table_rows(table, 8)


def test_near_duplicate_transforms_change_the_bytes_but_keep_an_image():
    from PIL import Image
    import io
    rng = np.random.default_rng(4)
    pixels = (rng.uniform(0, 255, (32, 32, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    sizes = {}
    for kind in NEAR_DUPLICATE_KINDS:
        out = near_duplicate(buf.getvalue(), kind, rng)
        assert out != buf.getvalue()
        sizes[kind] = Image.open(io.BytesIO(out)).size
    assert sizes["jpeg"] == sizes["shift"] == sizes["colour"] == (32, 32)
    assert sizes["resize"] in ((24, 24), (48, 48), (64, 64)) and sizes["crop"] != (32, 32)
    with pytest.raises(ValueError, match="unknown near-duplicate kind 'rotate'"):
        near_duplicate(buf.getvalue(), "rotate", rng)


# -- transforms with TestPipeline ----------------------------------------------------------

def reference_embeddings(checkpoint, images: list[bytes], grid: int, batch: int) -> np.ndarray:
    """Embeddings the plain way: fixed-size padded batches, float16."""
    model, preprocess = load_generalist(checkpoint)
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.stack([preprocess(b) for b in images[s:s + batch]])
            real = len(x)
            x = torch.cat([x, x.new_zeros((batch - real, *x.shape[1:]))])
            out.append(embed(model, x, grid)[:real].numpy().astype(np.float16))
    return np.concatenate(out)


def test_embed_target_transform_matches_reference_and_routes_bad_images(generalist, food_target, tmp_path):
    paths = list_target(food_target.root, "food101", "test").paths[:20]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    items = [(i, "test", p) for i, p in enumerate(paths)] + [(20, "test", str(bad))]
    expected = reference_embeddings(generalist, [open(p, "rb").read() for p in paths], 2, 8)
    spec = PreprocessSpec(32).to_dict()
    with beam_test_pipeline() as p:
        out = p | beam.Create(items) | EmbedTarget(generalist, spec, grid=2, batch_size=8)

        def check(result):
            (target,) = result
            assert target.paths == paths and target.splits == ["test"] * 20
            assert target.vectors.dtype == np.float16 and target.vectors.tobytes() == expected.tobytes()

        assert_that(out["target"], check)
        assert_that(out["bad"] | beam.Map(lambda kr: (os.path.basename(kr[0]), kr[1].split(":")[0])),
                    equal_to([("bad.jpg", "UnidentifiedImageError")]), label="bad")


def test_read_source_images_streams_row_groups_and_names_bad_rows(tmp_path):
    from adaptive_transfer.synthetic import encode_image
    good = encode_image(np.zeros((8, 8, 3), np.uint8))
    table = pa.table({"key": [f"k{i}" for i in range(7)], "labels": pa.array([[0]] * 7, pa.list_(pa.int32())),
                      "image": [good, good, b"junk", good, None, good, good]})
    pq.write_table(table, tmp_path / "i.parquet", row_group_size=4)
    path = str(tmp_path / "i.parquet")
    spec = PreprocessSpec(8).to_dict()
    with beam_test_pipeline() as p:
        out = (p | beam.Create([RowGroup(path, 0, 0, 4), RowGroup(path, 1, 4, 3)])
                 | beam.ParDo(ReadSourceImages(spec, "image", batch_size=3)).with_outputs(BAD_IMAGES, main="images"))
        assert_that(out.images | beam.Map(lambda e: (e[0][1].tolist(), e[0][2], tuple(e[1].shape))),
                    equal_to([([0, 1], ["k0", "k1"], (2, 3, 8, 8)), ([3], ["k3"], (1, 3, 8, 8)),
                              ([5, 6], ["k5", "k6"], (2, 3, 8, 8))]))
        assert_that(out[BAD_IMAGES] | beam.Map(lambda kr: (kr[0], kr[1].split(":")[0])),
                    equal_to([("k2", "UnidentifiedImageError"), ("k4", "no image bytes")]), label="bad")


# -- end to end ----------------------------------------------------------------------------

def test_planted_near_duplicates_are_found_at_the_default_threshold(world, source_data, generalist, tmp_path):
    """Seed 0 (not used to choose the default): every best similarity from a
    run at threshold -1 that writes the embeddings store, then the default
    threshold from the store through main([...])."""
    planted = world["planted"]
    run_dedup(world, source_data, generalist, tmp_path / "all", "--threshold", "-1",
              "--embeddings", str(tmp_path / "emb"))
    every = pq.read_table(tmp_path / "all" / "exclude.parquet")
    similarity = dict(zip(every.column("key").to_pylist(), every.column("similarity").to_pylist()))
    assert len(similarity) == source_data.num_examples + len(planted.copies) + len(planted.negatives)
    rates = planted_rates(similarity, planted, ND.DEFAULT_THRESHOLD)
    generated = [s for k, s in similarity.items() if k not in planted.copies and k not in set(planted.negatives)]
    rates["other_source"] = sum(s >= ND.DEFAULT_THRESHOLD for s in generated) / len(generated)  # reported only
    print("\nat the default threshold", ND.DEFAULT_THRESHOLD, json.dumps({k: round(v, 4) for k, v in rates.items()}))
    assert rates["all"] >= 0.95, rates
    assert rates["negatives"] <= 0.01, rates
    assert min(rates[k] for k in NEAR_DUPLICATE_KINDS) >= 0.85, rates
    # Each copy is matched to the image it was made from (its file and split).
    files = dict(zip(every.column("key").to_pylist(), zip(every.column("target_file").to_pylist(),
                                                          every.column("target_split").to_pylist())))
    right = sum(files[k] == (path, split) for k, (path, split, _) in planted.copies.items())
    assert right / len(planted.copies) >= 0.95

    assert ND.main(["--index", world["index"], "--labels", source_data.labels_path, "--target-root",
                    world["target"].root, "--target-layout", "food101", "--checkpoint", generalist,
                    "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "dedup")]) == 0
    out = tmp_path / "dedup"
    assert sorted(os.listdir(out)) == sorted(ND.OUTPUT_FILES)
    exclude = pq.read_table(out / "exclude.parquet")
    assert exclude.schema.equals(ND.EXCLUDE_SCHEMA)
    expected = {k for k, s in similarity.items() if s >= ND.DEFAULT_THRESHOLD}
    assert set(exclude.column("key").to_pylist()) == expected  # the stored embeddings give the same answer
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embeddings"]["reused"] is True and summary["embeddings"]["bytes_per_example"] == 2048
    assert summary["excluded"] == len(expected)
    by_split = {s: sum(files[k][1] == s for k in expected) for s in ("train", "test")}
    assert summary["excluded_by_split"] == by_split and by_split["test"] > 0
    assert summary["target_images"] == {"train": 160, "test": 80}
    assert summary["source_examples_compared"] == len(similarity)
    above = [p["similarity"] for p in summary["nearest_above_threshold"]]
    below = [p["similarity"] for p in summary["nearest_below_threshold"]]
    assert above == sorted(s for s in similarity.values() if s >= ND.DEFAULT_THRESHOLD)[:8]
    assert below == sorted((s for s in similarity.values() if s < ND.DEFAULT_THRESHOLD), reverse=True)[:8]
    assert sum(summary["similarity_histogram"]["counts"]) == len(similarity)
    for png in ("similarity_histogram.png", "contact_sheet.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # The resampler's form: a 'key' column (spark_jobs.resample --exclude).
    assert "key" in pq.read_schema(out / "exclude.parquet").names
    # A rerun does no work.
    again = run_dedup(world, source_data, generalist, out, "--embeddings", str(tmp_path / "emb"))
    assert again["reused"] is True


def test_store_from_another_model_is_refused_and_unchanged(world, small_index, source_data, generalist, tmp_path):
    vocab = sio.read_parquet(source_data.labels_path)
    other = str(tmp_path / "other.pt")
    torch.manual_seed(1)
    save_generalist(other, build_model("small", vocab.num_rows), "small", vocab.column("label_id").to_pylist(),
                    PreprocessSpec(32), vocab)
    run_dedup(small_index, source_data, other, tmp_path / "a", "--embeddings", str(tmp_path / "emb"),
              target=world["target"].root)
    before = sorted(os.listdir(tmp_path / "emb"))
    with pytest.raises(ValueError, match=r"--embeddings .*emb holds source embeddings made with another model "
                                         r"\(model: stored [0-9a-f]{16}\.\.\., this run [0-9a-f]{16}\.\.\.\)"):
        run_dedup(small_index, source_data, generalist, tmp_path / "b", "--embeddings", str(tmp_path / "emb"),
                  target=world["target"].root)
    assert sorted(os.listdir(tmp_path / "emb")) == before and not os.path.exists(tmp_path / "b")
    with pytest.raises(ValueError, match="other inputs .*grid: stored 2, this run 1"):
        run_dedup(small_index, source_data, other, tmp_path / "b", "--embeddings", str(tmp_path / "emb"),
                  "--grid", "1", target=world["target"].root)
    # The store's fingerprint is the output protocol's (its marker); a store written
    # before the marker held it is judged by its embeddings.json, and still serves.
    recorded = fingerprint_of(str(tmp_path / "emb"))
    described = json.loads((tmp_path / "emb" / "embeddings.json").read_text())["fingerprint"]
    assert recorded["settings"] == described and described["model"] == checkpoint_fingerprint(other)
    marker = json.loads((tmp_path / "emb" / MARKER).read_text())
    del marker["fingerprint"]
    (tmp_path / "emb" / MARKER).write_text(json.dumps(marker))
    summary = run_dedup(small_index, source_data, other, tmp_path / "c", "--embeddings", str(tmp_path / "emb"),
                        target=world["target"].root)
    assert summary["embeddings"]["reused"] is True
    assert summary["excluded"] == json.loads((tmp_path / "a" / "summary.json").read_text())["excluded"]


def test_unreadable_target_images_are_counted_and_named(world, small_index, source_data, generalist, tmp_path):
    root = tmp_path / "target"
    shutil.copytree(world["target"].root, root)
    test_paths = list_target(str(root), "food101", "test").paths
    for p in test_paths[:2]:
        open(p, "wb").write(b"\xff\xd8 truncated")
    summary = run_dedup(small_index, source_data, generalist, tmp_path / "ok", "--max-bad-fraction", "0.01",
                        target=str(root))
    assert summary["target_unreadable_images"] == 2
    assert summary["target_unreadable_image_names"] == sorted(test_paths[:2])
    assert summary["target_images"] == {"train": 160, "test": 78}
    with pytest.raises(ValueError, match=r"2 of 240 target images are unreadable \(0\.83% > --max-bad-fraction "
                                         r"0\.50%\)"):
        run_dedup(small_index, source_data, generalist, tmp_path / "fail", "--max-bad-fraction", "0.005",
                  target=str(root))
    assert not os.path.exists(tmp_path / "fail" / "_SUCCESS")


def test_model_of_another_label_space_is_refused(world, source_data, tmp_path):
    vocab = sio.read_parquet(source_data.labels_path).slice(0, 10)
    path = str(tmp_path / "other.pt")
    save_generalist(path, build_model("small", 10), "small", vocab.column("label_id").to_pylist(),
                    PreprocessSpec(32), vocab)
    n = sio.read_parquet(source_data.labels_path).num_rows
    with pytest.raises(SchemaError, match=f"the model has 10 classes but the label vocabulary has {n} labels"):
        run_dedup(world, source_data, path, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_uri_index_reads_only_allowed_prefixes(world, source_data, generalist, tmp_path):
    images = tmp_path / "src" / "images"
    images.mkdir(parents=True)
    outside = tmp_path / "elsewhere.jpg"
    copies = list(world["planted"].copies.items())[:3]
    planted = pq.read_table(os.path.join(world["index"], "part-planted.parquet")).to_pydict()
    data = dict(zip(planted["key"], planted["image"]))
    uris = []
    for i, (key, _) in enumerate(copies):
        (images / f"{i}.jpg").write_bytes(data[key])
        uris.append(str(images / f"{i}.jpg"))
    outside.write_bytes(data[copies[0][0]])
    uris.append(str(outside))
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "labels": pa.array([[0]] * 4, pa.list_(pa.int32())),
                             "uri": uris}), tmp_path / "src" / "index.parquet")
    # A one-file index allows no uri by default (schemas.uri_policy): its images' root is named.
    refused = run_dedup(str(tmp_path / "src" / "index.parquet"), source_data, generalist, tmp_path / "refused",
                        target=world["target"].root)
    assert refused["source_examples_compared"] == 0 and refused["source_unreadable_images"] == 4
    summary = run_dedup(str(tmp_path / "src" / "index.parquet"), source_data, generalist, tmp_path / "out",
                        "--allow-uri-prefix", str(images), target=world["target"].root)
    assert summary["source_examples_compared"] == 3 and summary["source_unreadable_images"] == 1
    assert summary["source_unreadable_image_names"] == ["d"]
    assert set(pq.read_table(tmp_path / "out" / "exclude.parquet").column("key").to_pylist()) == {"a", "b", "c"}


#: How far the default may lie from this machine's measurement: the measurement
#: moves by a few thousandths between machines (CPU instruction sets and library
#: versions round the generated images and the training otherwise; measured:
#: 0.9635-0.9677 over seeds and machines).
MEASUREMENT_TOLERANCE = 0.005


def measured_threshold(chosen: list[float]) -> float:
    """The rule: the largest of the seeds' chosen thresholds, rounded up to 3 decimals."""
    return float(np.ceil(np.float64(max(chosen)) * 1000 - 1e-9) / 1000)


def test_measured_threshold_rounds_the_largest_up():
    assert measured_threshold([0.9603, 0.9677, 0.9635]) == 0.968
    assert measured_threshold([0.961, 0.964]) == 0.964
    assert measured_threshold([0.96]) == 0.96


@pytest.mark.slow
def test_default_threshold_measurement(source_data, generalist, tmp_path):
    """How the default was chosen: on seeds 1-3 (other targets, copies and
    negatives than seed 0's; the same generalist), the lowest threshold that
    removes at most 1 % of the hard negatives (threshold_calibration.choose_threshold);
    the default is the largest of the three, rounded up to 3 decimals
    (:func:`measured_threshold`). Checks what the rule guarantees on any
    machine: at the measured threshold every seed's hard negatives are at
    most 1 % and its planted copies at least 95 % found; the default is
    within :data:`MEASUREMENT_TOLERANCE` of it and finds at least 95 % of
    every seed's copies. Run with -s to print the figures."""
    chosen, similarities = [], []
    for seed in (1, 2, 3):
        # In process (the pipeline computes the same: test_embed_target_transform..., and seed 0 above).
        world = planted_world(tmp_path / f"seed{seed}", source_data, seed)
        target = [p for split in ("train", "test")
                  for p in list_target(world["target"].root, "food101", split).paths]
        table = pq.read_table(os.path.join(world["index"], "part-planted.parquet"))
        _, sims = best_matches(
            reference_embeddings(generalist, table.column("image").to_pylist(), ND.DEFAULT_GRID, 32),
            reference_embeddings(generalist, [open(p, "rb").read() for p in target], ND.DEFAULT_GRID, 32))
        similarity = dict(zip(table.column("key").to_pylist(), sims.tolist()))
        chosen.append(choose_threshold([similarity[k] for k in world["planted"].negatives], 0.01))
        similarities.append((similarity, world["planted"]))
    measured = measured_threshold(chosen)
    print(f"\nchosen {[round(c, 4) for c in chosen]}: measured {measured}, default {ND.DEFAULT_THRESHOLD}")
    for seed, (similarity, planted) in zip((1, 2, 3), similarities):
        at_measured = planted_rates(similarity, planted, measured)
        at_default = planted_rates(similarity, planted, ND.DEFAULT_THRESHOLD)
        print(f"seed {seed}: at {measured}: {json.dumps({k: round(v, 4) for k, v in at_measured.items()})}; "
              f"at the default: {json.dumps({k: round(v, 4) for k, v in at_default.items()})}")
        assert at_measured["negatives"] <= 0.01 and at_measured["all"] >= 0.95, (seed, at_measured)
        assert at_default["all"] >= 0.95, (seed, at_default)
    assert measured - MEASUREMENT_TOLERANCE - 1e-9 <= ND.DEFAULT_THRESHOLD <= max(chosen) + MEASUREMENT_TOLERANCE, \
        (measured, chosen)
