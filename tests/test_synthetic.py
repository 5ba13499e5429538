"""The generated data has the properties the tests and the demo rely on."""

import io
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from schemas import Hierarchy, validate_index_batch
from schemas import io as sio
from adaptive_transfer.synthetic import SourceSpec, TargetSpec, generate_source, generate_target, make_vocabulary


def ancestors(h: Hierarchy, label_id: int) -> list[int]:
    """Labels above ``label_id``, nearest first."""
    out, node = [], h.parent_of[label_id]
    while node is not None:
        out.append(node)
        node = h.parent_of[node]
    return out


def leaves(h: Hierarchy) -> set[int]:
    return {lid for lid in h.parent_of if not h.children_of.get(lid)}


def test_vocabulary_has_three_levels():
    h = Hierarchy(make_vocabulary())
    assert {h.name_of[r] for r, p in h.parent_of.items() if p is None} == {"animal", "vehicle", "food", "plant"}
    assert all(len(ancestors(h, l)) == 2 for l in leaves(h))


def test_source_index_is_valid_and_realistic(source_data):
    files = sio.expand_paths(source_data.index_path)
    assert len(files) == 2
    vocab = pq.read_table(source_data.labels_path)
    table = sio.read_parquet(source_data.index_path)
    assert table.num_rows == 2000
    for f in files:
        validate_index_batch(pq.read_table(f), label_ids=vocab.column("label_id").to_numpy(), file=f)
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys)
    assert all(k.count("/") == 1 and k.endswith(".JPEG") and k.split("/")[1].startswith(k.split("/")[0] + "_")
               for k in keys)
    labels = table.column("labels").to_pylist()
    labels_per_image = np.mean([len(l) for l in labels])
    assert 1.2 <= labels_per_image <= 1.3  # JFT: ~1.26
    h = Hierarchy(vocab)
    for lab in labels:
        assert lab[0] in leaves(h)
        if len(lab) == 2:
            assert lab[1] in ancestors(h, lab[0])
    # Zipf-like: the biggest class is many times the median one.
    sizes = sorted(Counter(l[0] for l in labels).values())
    assert sizes[-1] >= 5 * sizes[len(sizes) // 2]
    assert sum(source_data.class_sizes.values()) == 2000


def test_source_images_are_real_and_class_dependent(source_data):
    table = sio.read_parquet(source_data.index_path)
    leaves = np.array([l[0] for l in table.column("labels").to_pylist()])
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32)
                       for b in table.column("image").to_pylist()])
    assert pixels.shape[1:] == (32, 32, 3)
    assert Image.open(io.BytesIO(table.column("image")[0].as_py())).format == "JPEG"
    # A nearest-centroid classifier on pixel colours must beat chance by far:
    # the content depends on the leaf class.
    # Translation-invariant features: mean colour and the low-frequency
    # amplitude spectrum (stripe orientation and frequency).
    spectrum = np.abs(np.fft.fft2(pixels.mean(-1) / 255.0))[:, :6, :6].reshape(len(pixels), -1)
    feats = np.concatenate([pixels.mean(axis=(1, 2)) / 255.0 * 10, spectrum], axis=1)
    train = np.arange(len(leaves)) % 2 == 0
    classes = np.unique(leaves[train])
    centroids = np.stack([feats[train & (leaves == c)].mean(0) for c in classes])
    pred = classes[np.argmin(((feats[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (pred == leaves[~train]).mean()
    assert accuracy > 0.3, accuracy  # chance is 1/44; leaves of a group differ subtly by design


def test_source_is_deterministic_for_a_seed(tmp_path):
    spec = SourceSpec(num_examples=300, seed=5, num_files=1)
    a = generate_source(str(tmp_path / "a"), spec)
    b = generate_source(str(tmp_path / "b"), spec)
    c = generate_source(str(tmp_path / "c"), SourceSpec(num_examples=300, seed=6, num_files=1))
    fa, fb, fc = (sio.fingerprint_paths(d.index_path) for d in (a, b, c))
    assert fa == fb and fa != fc


def test_png_fraction_gives_png_bytes_under_jpeg_keys(tmp_path):
    data = generate_source(str(tmp_path), SourceSpec(num_examples=200, png_fraction=0.5, num_files=1))
    formats = Counter(Image.open(io.BytesIO(b)).format
                      for b in sio.read_parquet(data.index_path).column("image").to_pylist())
    assert set(formats) == {"JPEG", "PNG"}


def test_food101_layout(food_target):
    root = food_target.root
    classes = open(os.path.join(root, "meta", "classes.txt")).read().split()
    assert classes == food_target.classes == sorted(classes)
    train = open(os.path.join(root, "meta", "train.txt")).read().split()
    test = open(os.path.join(root, "meta", "test.txt")).read().split()
    assert len(train) == 8 * 20 and len(test) == 8 * 10 and not set(train) & set(test)
    for line in train + test:
        cls, stem = line.split("/")
        assert cls in classes
        assert Image.open(os.path.join(root, "images", cls, stem + ".jpg")).format == "JPEG"
    assert len(open(os.path.join(root, "meta", "labels.txt")).read().splitlines()) == 8


def test_target_is_mostly_from_its_branch(food_target):
    h = Hierarchy(make_vocabulary())
    food = h.ids_for_name("food")[0]
    roots = [ancestors(h, leaf)[-1] for leaf in food_target.class_to_leaf.values()]
    assert sum(r == food for r in roots) == 6 and len(roots) == 8
    # Target class names are the target's own, not the source's.
    assert not set(food_target.classes) & set(h.name_of.values())


def test_imagefolder_layout(tmp_path):
    data = generate_target(str(tmp_path), TargetSpec(layout="imagefolder", branch="animal",
                                                     num_classes=5, train_per_class=3, test_per_class=2))
    for split, per in (("train", 3), ("test", 2)):
        dirs = sorted(os.listdir(tmp_path / split))
        assert dirs == data.classes
        assert all(len(os.listdir(tmp_path / split / d)) == per for d in dirs)


def test_target_rejects_unknown_branch(tmp_path):
    with pytest.raises(ValueError, match="branch 'mineral' is not a root"):
        generate_target(str(tmp_path), TargetSpec(branch="mineral"))
