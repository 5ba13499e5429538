"""Target layouts (each on a tiny tree in its real layout), the config
registry, ImageNet index building and `make resample`'s orchestration."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from adaptive_transfer import registry
from schemas import SchemaError, validate_index_batch
from schemas import io as sio
from schemas.stage_output import is_complete, stage_of
from schemas.targets import list_target, read_item_bytes
from tests.layouts import LAYOUT_BUILDERS


@pytest.mark.parametrize("layout", sorted(LAYOUT_BUILDERS))
def test_layout_lists_official_splits(layout, tmp_path):
    expected = LAYOUT_BUILDERS[layout](str(tmp_path))
    train = list_target(str(tmp_path), layout, expected["train_split"])
    test = list_target(str(tmp_path), layout, "test")
    assert train.classes == test.classes == expected["classes"]
    assert len(train.items) == expected["train"] and len(test.items) == expected["test"]
    assert not set(train.paths) & set(test.paths)
    for path, label in train.items + test.items:
        assert 0 <= label < len(train.classes)
        img = Image.open(io.BytesIO(read_item_bytes(path)))
        img.load()
        assert img.size[0] > 0


def test_cifar_records_decode_to_their_pixels(tmp_path):
    LAYOUT_BUILDERS["cifar10"](str(tmp_path))
    split = list_target(str(tmp_path), "cifar10", "test")
    path, label = split.items[1]
    assert path.endswith("test_batch.bin#1") and label == 1
    raw = open(path.split("#")[0], "rb").read()[3073:2 * 3073]
    pixels = np.asarray(Image.open(io.BytesIO(read_item_bytes(path))))
    assert (pixels == np.frombuffer(raw[1:], np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)).all()


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown target layout 'voc'"):
        list_target(str(tmp_path), "voc")
    with pytest.raises(FileNotFoundError, match="meta/classes.txt: missing"):
        list_target(str(tmp_path), "food101")
    LAYOUT_BUILDERS["fgvc_aircraft"](str(tmp_path))
    with open(tmp_path / "data" / "images_variant_test.txt", "a") as fh:
        fh.write("999 Concorde\n")
    with pytest.raises(SchemaError, match=r"images_variant_test.txt, row 1: variant 'Concorde' is not in"):
        list_target(str(tmp_path), "fgvc_aircraft", "test")


def test_every_config_loads():
    for name in registry.list_names("targets"):
        t = registry.load_target(name)
        assert t.layout and t.root and t.train_split and t.test_split
    assert registry.load_target("oxford_pets").metric == "mean_per_class"
    assert registry.load_target("oxford_pets").train_split == "trainval"
    assert {"food101", "oxford_pets", "stanford_cars", "fgvc_aircraft", "birdsnap", "cifar10", "flowers102",
            "imagefolder"} <= set(registry.list_names("targets"))
    assert {"jft", "imagenet"} <= set(registry.list_names("sources"))
    with pytest.raises(ValueError, match="no target named 'nope'"):
        registry.load_target("nope")


def test_config_paths_expand_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "gs://bucket/data")
    assert registry.load_target("food101").root == "gs://bucket/data/targets/food-101"
    monkeypatch.delenv("DATA_ROOT")
    assert registry.load_target("food101").root == "data/targets/food-101"
    assert registry.load_target("food101", root="/elsewhere").root == "/elsewhere"


def _imagenet_tree(root):
    train = root / "train"
    for wnid, n in (("n01440764", 3), ("n01443537", 2), ("n02084071", 2)):
        for i in range(n):
            (train / wnid).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(train / wnid / f"{wnid}_{i}.JPEG", format="JPEG")
    (root / "wordnet.is_a.txt").write_text(
        "n01000001 n01440764\nn01000001 n01443537\nn00015388 n01000001\nn00015388 n02084071\n"
        "n09999999 n01440764\n")  # a second parent: WordNet is a DAG; the first one is kept
    (root / "words.txt").write_text("n01440764\ttench, Tinca tinca\nn01443537\tgoldfish\nn02084071\tdog, domestic dog\n"
                                    "n01000001\tfish\nn00015388\tanimal, animate being\n")
    return train


def test_build_index_from_imagenet_folders(spark, tmp_path):
    from spark_jobs import build_index as B
    train = _imagenet_tree(tmp_path)
    summary = B.run(spark, B.BuildIndexJob(str(train), str(tmp_path / "wordnet.is_a.txt"), str(tmp_path / "words.txt"),
                                           str(tmp_path / "out"), inline_images=True, files=2))
    assert summary == {"examples": 7, "classes": 3, "labels": 5, "inline_images": True, "train_root": str(train)}
    vocab = pq.read_table(tmp_path / "out" / "labels.parquet")
    names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
    parent = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("parent_id").to_pylist()))
    by_name = {v: k for k, v in names.items()}
    assert parent[by_name["tench"]] == by_name["fish"] and parent[by_name["fish"]] == by_name["animal"]
    index = sio.read_parquet(str(tmp_path / "out" / "index"))
    validate_index_batch(index, label_ids=vocab.column("label_id").to_numpy())
    row = index.to_pylist()[0]
    assert row["key"] == "n01440764/n01440764_0.JPEG" and row["labels"] == [by_name["tench"]]
    assert row["image"] == (train / "n01440764" / "n01440764_0.JPEG").read_bytes()
    from schemas import Hierarchy
    fish = Hierarchy(vocab).descendants_of_names(["fish"])
    assert {names[i] for i in fish} == {"fish", "tench", "goldfish"}


def test_build_index_rejects_folders_outside_the_hierarchy(spark, tmp_path):
    from spark_jobs import build_index as B
    train = _imagenet_tree(tmp_path)
    (train / "n07777777").mkdir()
    Image.new("RGB", (4, 4)).save(train / "n07777777" / "x.JPEG", format="JPEG")
    with pytest.raises(SchemaError, match=r"training folders \['n07777777'\] are not in the hierarchy"):
        B.run(spark, B.BuildIndexJob(str(train), str(tmp_path / "wordnet.is_a.txt"), str(tmp_path / "words.txt"),
                                     str(tmp_path / "out")))


def test_make_resample_orchestration_reuses_finished_stages(source_data, food_target, tmp_path, monkeypatch):
    """Registry -> weights (Beam) -> resample -> shards -> verify, then a rerun
    that finds everything done, and a new size that reuses the weights."""
    import torch
    from adaptive_transfer import resample as AR
    from adaptive_transfer.stages import Engines
    from trainer.models import build_model, save_generalist
    from trainer.transforms import PreprocessSpec

    vocab = sio.read_parquet(source_data.labels_path)
    model = str(tmp_path / "generalist.pt")
    torch.manual_seed(0)
    save_generalist(model, build_model("small", vocab.num_rows), "small", vocab.column("label_id").to_pylist(),
                    PreprocessSpec(32), vocab)
    configs = tmp_path / "configs"
    (configs / "targets").mkdir(parents=True)
    (configs / "sources").mkdir()
    (configs / "targets" / "mytarget.yaml").write_text(
        f"name: mytarget\nlayout: food101\nroot: {food_target.root}\nsplits: {{train: train, test: test}}\n")
    (configs / "sources" / "mysource.yaml").write_text(
        f"name: mysource\nindex: {source_data.index_path}\nlabels: {source_data.labels_path}\n"
        f"generalist: ${{MODEL_DIR}}/generalist.pt\n")
    monkeypatch.setenv("ADAPTIVE_TRANSFER_CONFIGS", str(configs))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    args = AR.build_parser().parse_args(["--target", "mytarget", "--source", "mysource", "--size", "900",
                                         "--matcher", "elastic", "--output", str(tmp_path / "out"),
                                         "--samples-per-shard", "400", "--master", "local[2]"])
    # The stages' engines use the Spark session already active in this process, if any, and leave it running.
    engines = Engines(master="local[2]", log=lambda line: None)
    first = AR.run(args, engines)
    assert first["samples"] == 900 and first["unique_examples"] == 900 and first["shard_files"] == 3
    assert first["shards"].endswith("/shards/manifest.json") and "/mytarget/900-elastic-" in first["shards"]
    assert json.loads(sio.read_bytes(first["shards"]))["config"]["target"] == "mytarget"
    # The summary's top labels are the weights table's, by weight (ties by label id).
    weights = pq.read_table(sio.join(first["weights"], "weights.parquet"))
    vocab_names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
    by_weight = sorted(zip(weights.column("weight").to_pylist(), weights.column("label_id").to_pylist()),
                       key=lambda wl: (-wl[0], wl[1]))[:10]
    assert [name for name, _ in first["top_labels"]] == [vocab_names[label] for _, label in by_weight]
    # Near-duplicates of the train and test images were found and never drawn.
    assert stage_of(first["dedup"]) == "near_duplicates" and is_complete(first["dedup"])
    dedup = json.loads(sio.read_bytes(sio.join(first["dedup"], "summary.json")))
    assert dedup["target_images"] == {"train": 160, "test": 80} and dedup["embeddings"]["reused"] is False
    excluded = set(pq.read_table(sio.join(first["dedup"], "exclude.parquet")).column("key").to_pylist())
    assert first["excluded"] == len(excluded) == dedup["excluded"]
    stats = json.loads(sio.read_bytes(sio.join(first["resample"], "stats.json")))
    assert stats["job"]["exclude"] == sio.join(first["dedup"], "exclude.parquet")
    assert stats["source_examples"] == source_data.num_examples - len(excluded)
    selected = set(pq.read_table(sio.join(first["resample"], "selection")).column("key").to_pylist())
    assert not selected & excluded

    # A rerun rebuilds nothing: every stage's finished output is the same files.
    stages = {"weights": first["weights"], "dedup": first["dedup"], "resample": first["resample"],
              "shards": first["shards"].rsplit("/", 1)[0]}
    before = _identities(stages.values())
    again = AR.run(args, engines)
    assert again["shards"] == first["shards"] and _identities(stages.values()) == before
    # A new size and matcher: new selection and shards; weights and near-duplicates reused.
    args.size, args.matcher = 1200, "same"
    third = AR.run(args, engines)
    assert third["samples"] == 1200 and third["shards"] != first["shards"] and third["resample"] != first["resample"]
    kept = [stages["weights"], stages["dedup"]]
    assert [third["weights"], third["dedup"]] == kept and _identities(kept) == {k: before[k] for k in kept}
    # DEDUP=0: another pre-training set (its own directory), nothing excluded.
    args.dedup = False
    plain = AR.plan(args, engines)
    assert plain.dedup is None and plain.set.resample.output != third["resample"]

    # TARGET=mytarget,swapped: one pass per stage for both, each target's outputs identical to its own run's.
    (configs / "targets" / "swapped.yaml").write_text(
        f"name: swapped\nlayout: food101\nroot: {food_target.root}\nsplits: {{train: test, test: train}}\n")
    both = AR.build_parser().parse_args(["--target", "mytarget,swapped", "--source", "mysource", "--size", "900",
                                         "--matcher", "elastic", "--output", str(tmp_path / "both"),
                                         "--samples-per-shard", "400", "--master", "local[2]"])
    many = AR.run(both, engines)["targets"]
    assert [m["target"] for m in many] == ["mytarget", "swapped"] and all(m["samples"] == 900 for m in many)
    assert _tar_digests(many[0]["shards"]) == _tar_digests(first["shards"])
    assert _selection(many[0]["resample"]) == _selection(first["resample"])
    own = [pq.read_table(sio.join(m["weights"], "weights.parquet")).column("weight").to_pylist() for m in many]
    assert own[0] == weights.column("weight").to_pylist() and own[1] != own[0]  # each target's own P_t
    assert many[1]["shards"].startswith(str(tmp_path / "both" / "swapped") + "/")
    built = engines.built
    assert [m["shards"] for m in AR.run(both, engines)["targets"]] == [m["shards"] for m in many]
    assert engines.built == built  # the rerun reuses every stage of both targets
    engines.stop()


def _tar_digests(manifest_path: str) -> dict:
    import hashlib

    folder = os.path.dirname(manifest_path)
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if f.endswith(".tar")}


def _selection(resample_dir: str) -> list:
    table = pq.read_table(sio.join(resample_dir, "selection")).sort_by("key")
    return list(zip(table.column("key").to_pylist(), table.column("copies").to_pylist()))


def _identities(paths) -> dict:
    """What changes when a stage output is rebuilt (committed anew): the inode
    and modification time of its directory and of every file in it."""
    out = {}
    for path in paths:
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
        out[path] = [(p, os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in [path, *files]]
    return out
