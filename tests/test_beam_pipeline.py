"""beam_pipelines: transforms with TestPipeline/assert_that, the end-to-end run
against a numpy reference, worker-count invariance, temperature, bad images,
label-space checks."""

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

from beam_pipelines import importance_weights as IW
from beam_pipelines.execution import in_process_runner
from beam_pipelines.label_counts import CountSourceLabels, SumLabelCounts, LabelCounts, match_files
from beam_pipelines.target_histogram import BAD_IMAGES, ReadAndPreprocess, TargetHistogram
from beam_pipelines.weights import (importance_weights, mean_from_fixed_point, quantize_probabilities,
                                    softmax)  # softmax is under test here; the oracle below has its own
from schemas import SchemaError
from schemas import io as sio
from schemas.targets import list_target
from trainer.models import build_model, load_generalist, preprocess_spec, read_generalist, save_generalist
from trainer.transforms import PreprocessSpec

BATCH = 16
PIPELINE_OPTIONS = ["--runner", "DirectRunner"]


def beam_test_pipeline() -> BeamTestPipeline:
    """A TestPipeline on the stages' in-process runner (no Prism download attempt)."""
    options = PipelineOptions(PIPELINE_OPTIONS)
    return BeamTestPipeline(runner=in_process_runner(options), options=options)


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, source_data):
    """A randomly initialised small generalist over the source vocabulary."""
    path = str(tmp_path_factory.mktemp("model") / "generalist.pt")
    vocab = sio.read_parquet(source_data.labels_path)
    torch.manual_seed(0)
    model = build_model("small", vocab.num_rows)
    # Shuffle the output order so that output index != label id.
    label_ids = vocab.column("label_id").to_pylist()[::-1]
    save_generalist(path, model, "small", label_ids, PreprocessSpec(32), vocab)
    return path


def reference_softmax(logits, temperature):
    """softmax(logits / T) over the last axis in float64, written independently of the pipeline."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def reference_p_target(checkpoint, paths, temperature, batch_size=BATCH):
    """P_t the plain way: forward passes in fixed-size padded batches, numpy softmax, mean."""
    model, preprocess = load_generalist(checkpoint)
    ckpt = read_generalist(checkpoint)
    probs = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            chunk = [preprocess(open(p, "rb").read()) for p in paths[start:start + batch_size]]
            x = torch.stack(chunk)
            real = len(chunk)
            if real < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - real, *x.shape[1:]))])
            probs.append(reference_softmax(model(x)[:real].numpy(), temperature))
    mean = np.concatenate(probs).mean(axis=0)
    by_label = dict(zip(ckpt["label_ids"], mean))
    return np.array([by_label[i] for i in sorted(by_label)])


def reference_counts(source_data):
    index = sio.read_parquet(source_data.index_path, columns=["labels"])
    vocab = sio.read_parquet(source_data.labels_path)
    flat = index.column("labels").combine_chunks().flatten().to_numpy()
    return np.bincount(flat, minlength=vocab.num_rows), index.num_rows


# -- pure mathematics ----------------------------------------------------------------

def test_fixed_point_sums_are_exact_and_order_free():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(50), size=300)
    p[0, :3] = [1e-20, 2.0 ** -60, 0.0]
    parts = [quantize_probabilities(p[i:i + 37]) for i in range(0, 300, 37)]
    hi = sum(h.astype(object) for h, _ in parts)
    lo = sum(l.astype(object) for _, l in parts)
    mean = mean_from_fixed_point(hi, lo, 300)
    np.testing.assert_allclose(mean, p.mean(axis=0), rtol=1e-13)
    # All 300 rows in one go, in reverse order: the same limb sums and mean, bit for bit.
    one_hi, one_lo = quantize_probabilities(p[::-1])
    assert one_hi.dtype == np.int64 and one_lo.dtype == np.int64
    assert one_hi.tolist() == hi.tolist() and one_lo.tolist() == lo.tolist()
    assert (mean_from_fixed_point(one_hi, one_lo, 300) == mean).all()
    # Another grouping of the same rows gives bit-identical sums.
    parts2 = [quantize_probabilities(p[i:i + 100]) for i in range(0, 300, 100)]
    assert (mean_from_fixed_point(sum(h.astype(object) for h, _ in parts2),
                                  sum(l.astype(object) for _, l in parts2), 300) == mean).all()


def test_importance_weights_zero_where_no_source_example():
    table, lost = importance_weights(np.array([0, 1, 2]), np.array([5, 0, 15]), 20,
                                     np.array([0.5, 0.2, 0.3]))
    assert table.column("weight").to_pylist() == [0.5 / 0.25, 0.0, 0.3 / 0.75]
    assert lost == pytest.approx(0.2)


def test_softmax_temperature():
    logits = np.array([[2.0, 0.0, -2.0]])
    np.testing.assert_allclose(softmax(logits, 1.0), np.exp(logits) / np.exp(logits).sum())
    np.testing.assert_allclose(softmax(logits, 2.0), np.exp(logits / 2) / np.exp(logits / 2).sum())
    with pytest.raises(ValueError, match="temperature must be positive"):
        softmax(logits, 0.0)


# -- transforms with TestPipeline --------------------------------------------------------

def test_count_source_labels_transform(source_data):
    counts, n = reference_counts(source_data)
    label_ids = np.arange(len(counts))
    with beam_test_pipeline() as p:
        result = (p | beam.Create(match_files(source_data.index_path))
                    | CountSourceLabels(label_ids)
                    | beam.Map(lambda r: (r.counts.tolist(), r.num_examples)))
        assert_that(result, equal_to([(counts.tolist(), n)]))


def test_sum_label_counts_combines_exactly():
    fn = SumLabelCounts(3)
    a = fn.add_input(fn.create_accumulator(), LabelCounts(np.array([1, 2, 3]), 4))
    b = fn.add_input(fn.create_accumulator(), LabelCounts(np.array([10, 0, 1]), 7))
    merged = fn.extract_output(fn.merge_accumulators([a, b, fn.create_accumulator()]))
    assert merged.counts.tolist() == [11, 2, 4] and merged.num_examples == 11


def test_label_outside_vocabulary_names_file_row_and_key(tmp_path):
    t = pa.table({"key": ["a/1", "a/2", "b/3"], "labels": pa.array([[0], [1], [0, 9]], pa.list_(pa.int32())),
                  "image": [b"x", b"y", b"z"]})
    pq.write_table(t, tmp_path / "part-0.parquet", row_group_size=2)
    with pytest.raises(SchemaError, match=r"part-0\.parquet, row 2, key 'b/3': "
                                          r"label 9 is not in the label vocabulary"):
        with beam_test_pipeline() as p:
            _ = p | beam.Create([str(tmp_path / "part-0.parquet")]) | CountSourceLabels(np.array([0, 1]))


def test_target_histogram_transform(generalist, food_target):
    split = list_target(food_target.root, "food101", "train")
    ckpt = read_generalist(generalist)
    expected = reference_p_target(generalist, split.paths, 2.0)
    with beam_test_pipeline() as p:
        out = (p | beam.Create(split.paths)
                 | TargetHistogram(generalist, preprocess_spec(ckpt).to_dict(), 2.0, BATCH))
        order = np.argsort(ckpt["label_ids"])

        def p_target(sums):
            return mean_from_fixed_point(sums.hi, sums.lo, sums.count)[order]

        def close(actual):
            assert len(actual) == 1
            np.testing.assert_allclose(actual[0], expected, rtol=1e-9, atol=0)

        assert_that(out["sums"] | beam.Map(p_target), close)
        assert_that(out["bad"], equal_to([]), label="no bad images")


def test_read_and_preprocess_routes_bad_images(tmp_path):
    good = tmp_path / "good.jpg"
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    spec = PreprocessSpec(32).to_dict()
    with beam_test_pipeline() as p:
        out = (p | beam.Create([str(good), str(tmp_path / "bad.jpg"), str(tmp_path / "missing.jpg")])
                 | beam.ParDo(ReadAndPreprocess(spec)).with_outputs(BAD_IMAGES, main="images"))
        assert_that(out.images | beam.Map(lambda t: tuple(t.shape)), equal_to([(3, 32, 32)]))
        assert_that(out[BAD_IMAGES] | beam.Map(lambda pr: os.path.basename(pr[0])),
                    equal_to(["bad.jpg", "missing.jpg"]), label="bad")


# -- end to end -------------------------------------------------------------------------

def run_weights(source_data, target_root, model, output, *extra):
    """The stage through its command line (own flags and Beam's, as a user gives them)."""
    job, beam_args = IW.job_from_args(["--index", source_data.index_path, "--labels", source_data.labels_path,
                                       "--target-root", target_root, "--target-layout", "food101",
                                       "--checkpoint", model, "--batch-size", str(BATCH), "--output", str(output),
                                       *extra])
    return IW.run(job, beam_args)


def test_end_to_end_matches_numpy_reference(source_data, food_target, generalist, tmp_path):
    summary = run_weights(source_data, food_target.root, generalist, tmp_path / "w")
    assert sorted(os.listdir(tmp_path / "w")) == sorted(IW.OUTPUT_FILES)
    counts, n = reference_counts(source_data)
    paths = list_target(food_target.root, "food101", "train").paths
    p_t = reference_p_target(generalist, paths, 2.0)
    weights = pq.read_table(tmp_path / "w" / "weights.parquet")
    assert weights.num_rows == len(counts)
    expected_w = np.where(counts > 0, p_t / np.maximum(counts / n, 1e-300), 0.0)
    np.testing.assert_allclose(weights.column("weight").to_numpy(), expected_w, rtol=1e-9, atol=0)
    np.testing.assert_array_equal(weights.column("count").to_numpy(), counts)
    hist = pq.read_table(tmp_path / "w" / "target_histogram.parquet")
    assert hist.column("p_target").to_numpy().sum() == pytest.approx(1.0, abs=1e-12)
    assert summary["source_examples"] == n and summary["target_images"] == len(paths)
    assert len(summary["top_labels"]) == 20
    assert summary["top_labels"][0]["weight"] == pytest.approx(expected_w.max(), rel=1e-9)
    assert summary["p_target_perplexity"] == pytest.approx(np.exp(-(p_t * np.log(p_t)).sum()), rel=1e-9)
    assert summary["unreadable_images"] == 0
    assert open(tmp_path / "w" / "weights.png", "rb").read(4) == b"\x89PNG"
    # The weights feed the resampler: their metadata names the target and temperature.
    from schemas import read_metadata
    assert read_metadata(weights.schema)["temperature"] == 2.0


@pytest.mark.slow
def test_one_worker_and_two_processes_give_identical_weights(source_data, food_target, generalist, tmp_path):
    run_weights(source_data, food_target.root, generalist, tmp_path / "one", "--direct_num_workers", "1")
    run_weights(source_data, food_target.root, generalist, tmp_path / "two", "--direct_num_workers", "2",
                "--direct_running_mode", "multi_processing")
    a = pq.read_table(tmp_path / "one" / "weights.parquet")
    b = pq.read_table(tmp_path / "two" / "weights.parquet")
    assert a.column("weight").to_pylist() == b.column("weight").to_pylist()


def test_temperature_changes_the_histogram_as_softmax_should(source_data, food_target, generalist, tmp_path):
    paths = list_target(food_target.root, "food101", "train").paths
    for t in (1.0, 4.0):
        run_weights(source_data, food_target.root, generalist, tmp_path / f"t{t}", "--temperature", str(t))
        got = pq.read_table(tmp_path / f"t{t}" / "target_histogram.parquet").column("p_target").to_numpy()
        np.testing.assert_allclose(got, reference_p_target(generalist, paths, t), rtol=1e-9)
    cold = pq.read_table(tmp_path / "t1.0" / "target_histogram.parquet").column("p_target").to_numpy()
    hot = pq.read_table(tmp_path / "t4.0" / "target_histogram.parquet").column("p_target").to_numpy()
    entropy = lambda p: -(p * np.log(p)).sum()  # noqa: E731
    assert entropy(hot) > entropy(cold)  # a higher temperature smooths P_t


def test_corrupt_images_are_counted_and_too_many_fail(source_data, food_target, generalist, tmp_path):
    root = tmp_path / "target"
    shutil.copytree(food_target.root, root)
    paths = list_target(str(root), "food101", "train").paths
    for p in paths[:3]:
        open(p, "wb").write(b"\xff\xd8 truncated")
    summary = run_weights(source_data, str(root), generalist, tmp_path / "ok", "--max-bad-fraction", "0.05")
    assert summary["unreadable_images"] == 3
    assert summary["target_images"] == len(paths) - 3
    assert summary["unreadable_image_names"] == sorted(paths[:3])
    with pytest.raises(ValueError, match=r"3 of 160 target images are unreadable "
                                         r"\(1\.88% > --max-bad-fraction 1\.00%\)"):
        run_weights(source_data, str(root), generalist, tmp_path / "fail")
    assert not os.path.exists(tmp_path / "fail" / "_SUCCESS")


def test_label_space_mismatch_fails_clearly(source_data, food_target, tmp_path):
    vocab = sio.read_parquet(source_data.labels_path)
    small_vocab = vocab.slice(0, 10)
    path = str(tmp_path / "other.pt")
    save_generalist(path, build_model("small", 10), "small", small_vocab.column("label_id").to_pylist(),
                    PreprocessSpec(32), small_vocab)
    with pytest.raises(SchemaError, match=f"the model has 10 classes but the label vocabulary has "
                                          f"{vocab.num_rows} labels"):
        run_weights(source_data, food_target.root, path, tmp_path / "w")


def test_precomputed_target_histogram(source_data, tmp_path):
    vocab = sio.read_parquet(source_data.labels_path)
    p = np.random.default_rng(3).dirichlet(np.ones(vocab.num_rows))
    pq.write_table(pa.table({"label_id": vocab.column("label_id"), "p_target": p}), tmp_path / "pt.parquet")
    rc = IW.main(["--index", source_data.index_path, "--labels", source_data.labels_path,
                  "--target-histogram", str(tmp_path / "pt.parquet"), "--output", str(tmp_path / "w")])
    assert rc == 0
    counts, n = reference_counts(source_data)
    w = pq.read_table(tmp_path / "w" / "weights.parquet").column("weight").to_numpy()
    np.testing.assert_allclose(w, np.where(counts > 0, p / np.maximum(counts / n, 1e-300), 0), rtol=1e-12)
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["target_mass_without_source_examples"] == pytest.approx(float(p[counts == 0].sum()))
