import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import (FORMAT_VERSION, Hierarchy, Manifest, ResampleConfig, SchemaError, ShardInfo,
                     read_metadata, with_metadata)
from schemas import io as sio
from adaptive_transfer.synthetic import make_vocabulary


def manifest(**overrides):
    shards = [ShardInfo("shard-000000.tar", 3, 3072, "a" * 64), ShardInfo("shard-000001.tar", 2, 2048, "b" * 64)]
    fields = dict(config=ResampleConfig(target="food101", size="5", matcher="elastic", seed=3),
                  inputs={"index": "f1", "weights": "f2"}, shards=shards, total_samples=5,
                  unique_examples=4, label_distribution={7: 3, 2: 2})
    fields.update(overrides)
    return Manifest(**fields)


def test_manifest_json_round_trip():
    m = manifest()
    text = m.to_json()
    back = Manifest.from_json(text, file="manifest.json")
    assert back == m
    d = json.loads(text)
    assert d["format_version"] == FORMAT_VERSION
    assert d["config"]["size"] == 5 and d["config"]["temperature"] == 2.0
    assert d["label_distribution"] == {"2": 2, "7": 3}


def test_manifest_rejects_inconsistent_totals():
    with pytest.raises(ValueError, match="manifest shards hold 5 samples but total_samples is 6"):
        manifest(total_samples=6)
    with pytest.raises(ValueError, match="unique_examples 9 exceeds total_samples 5"):
        manifest(unique_examples=9)


def test_manifest_rejects_other_version_and_missing_fields():
    d = json.loads(manifest().to_json())
    d["format_version"] = 99
    with pytest.raises(SchemaError) as err:
        Manifest.from_json(json.dumps(d), file="out/manifest.json")
    assert str(err.value) == "out/manifest.json: manifest format_version is 99; this reader understands 1"
    d = json.loads(manifest().to_json())
    del d["shards"]
    with pytest.raises(SchemaError, match="out/manifest.json: manifest has no 'shards' field"):
        Manifest.from_json(json.dumps(d), file="out/manifest.json")
    with pytest.raises(SchemaError, match="manifest is not valid JSON"):
        Manifest.from_json("{", file="m.json")


def test_resample_config_validation_and_fingerprint():
    a = ResampleConfig(target="pets", size="80M")
    assert a.size == 80_000_000 and a.matcher == "same" and a.draw == "multinomial"
    assert a.fingerprint() == ResampleConfig(target="pets", size=80_000_000).fingerprint()
    assert a.fingerprint() != ResampleConfig(target="pets", size="80M", seed=1).fingerprint()
    assert ResampleConfig.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="matcher must be one of same, elastic; got 'other'"):
        ResampleConfig(target="pets", size=10, matcher="other")
    with pytest.raises(ValueError, match="scheme 'subset' needs at least one subset label name"):
        ResampleConfig(target="pets", size=10, scheme="subset")
    with pytest.raises(ValueError, match="needs top_k >= 1"):
        ResampleConfig(target="pets", size=10, scheme="reversed")
    with pytest.raises(ValueError, match="cannot parse size"):
        ResampleConfig(target="pets", size="lots")
    with pytest.raises(ValueError, match="unknown configuration fields: \\['colour'\\]"):
        ResampleConfig.from_dict({"target": "x", "size": 1, "colour": "red"})


def test_hierarchy_descendants_and_names():
    h = Hierarchy(make_vocabulary(leaves_per_group=2))
    animal = h.ids_for_name("animal")[0]
    bird = h.ids_for_name("bird")[0]
    names = {h.name_of[i] for i in h.descendants_of_names(["bird"])}
    assert names == {"bird", "sparrow", "eagle"}
    animal_names = {h.name_of[i] for i in h.descendants(animal)}
    assert {"animal", "bird", "dog", "cat", "sparrow", "pug"} - animal_names == {"pug"}  # truncated to 2 leaves
    assert len(h.descendants(animal)) == 1 + 3 + 3 * 2
    assert h.parent_of[h.ids_for_name("eagle")[0]] == bird and h.parent_of[bird] == animal
    assert h.parent_of[animal] is None and sorted(h.children_of[animal]) == sorted(
        h.ids_for_name(g)[0] for g in ("bird", "dog", "cat"))
    union = h.descendants_of_names(["bird", "car"])
    assert len(union) == 6
    with pytest.raises(ValueError, match="label name 'birds' is not in the vocabulary; did you mean 'bird'"):
        h.ids_for_name("birds")


def test_expand_paths_file_dir_glob(tmp_path):
    t = pa.table({"x": [1, 2]})
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.parquet", "d/sub/b.parquet", "d/_tmp.parquet", "d/.hidden.parquet"):
        pq.write_table(t, tmp_path / name)
    (tmp_path / "d" / "_SUCCESS").write_text("")
    got = sio.expand_paths(str(tmp_path / "d"))
    assert [os.path.relpath(p, tmp_path) for p in got] == ["d/a.parquet", "d/sub/b.parquet"]
    assert [os.path.basename(p) for p in sio.expand_paths(str(tmp_path / "d" / "*.parquet"))] == ["a.parquet"]
    assert sio.expand_paths(str(tmp_path / "d" / "a.parquet")) == [str(tmp_path / "d" / "a.parquet")]
    assert sio.read_parquet(str(tmp_path / "d")).num_rows == 4
    with pytest.raises(FileNotFoundError, match="no .parquet files found at"):
        sio.expand_paths(str(tmp_path / "missing"))


def test_atomic_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "summary.json"
    sio.write_bytes_atomic(str(target), '{"a": 1}')
    sio.write_bytes_atomic(str(target), '{"a": 2}')
    assert target.read_text() == '{"a": 2}'
    assert os.listdir(tmp_path / "out") == ["summary.json"]


def test_metadata_survives_parquet(tmp_path):
    t = with_metadata(pa.table({"label_id": pa.array([1], pa.int32())}), {"num_examples": 12, "temperature": 2.0})
    sio.write_parquet_atomic(t, str(tmp_path / "x.parquet"))
    assert read_metadata(pq.read_schema(tmp_path / "x.parquet")) == {"num_examples": 12, "temperature": 2.0}


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    f1 = sio.fingerprint_paths(str(tmp_path / "a"))
    assert f1 == sio.fingerprint_paths(str(tmp_path / "a"))
    (tmp_path / "a" / "x.bin").write_bytes(b"2")
    assert sio.fingerprint_paths(str(tmp_path / "a")) != f1
