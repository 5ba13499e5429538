"""Tiny dataset trees in each target's real on-disk layout (for tests)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from schemas.targets import CIFAR_RECORD


def _jpg(path, colour) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 16), colour).save(path, format="JPEG")


def oxford_pets(root: str) -> dict:
    """2 breeds (ids 1, 2), trainval 3 images, test 2."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    trainval = ["Abyssinian_1 1 1 1", "Abyssinian_2 1 1 1", "american_bulldog_10 2 2 1"]
    test = ["Abyssinian_3 1 1 1", "american_bulldog_11 2 2 1"]
    for name, lines in (("trainval", trainval), ("test", test)):
        with open(os.path.join(root, "annotations", f"{name}.txt"), "w") as fh:
            fh.write("".join(f"{l}\n" for l in lines))
        for line in lines:
            _jpg(os.path.join(root, "images", line.split()[0] + ".jpg"), (10, 20, 30))
    return {"classes": ["Abyssinian", "american_bulldog"], "train": 3, "test": 2, "train_split": "trainval"}


def stanford_cars(root: str) -> dict:
    from scipy.io import savemat

    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "BMW M3 Coupe 2012"]
    os.makedirs(os.path.join(root, "devkit"), exist_ok=True)
    savemat(os.path.join(root, "devkit", "cars_meta.mat"), {"class_names": np.array(classes, dtype=object)})

    def annos(fnames, classes_):
        dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
                 ("fname", "O")]
        return np.array([(1, 1, 10, 10, c, f) for f, c in zip(fnames, classes_)], dtype=dtype)

    savemat(os.path.join(root, "devkit", "cars_train_annos.mat"),
            {"annotations": annos(["00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg"], [1, 2, 3, 3])})
    savemat(os.path.join(root, "cars_test_annos_withlabels.mat"),
            {"annotations": annos(["00001.jpg", "00002.jpg"], [3, 1])})
    for f in ("00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg"):
        _jpg(os.path.join(root, "cars_train", f), (200, 0, 0))
    for f in ("00001.jpg", "00002.jpg"):
        _jpg(os.path.join(root, "cars_test", f), (0, 200, 0))
    return {"classes": classes, "train": 4, "test": 2, "train_split": "train"}


def fgvc_aircraft(root: str) -> dict:
    classes = ["707-320", "F-16A/B", "Boeing 737-800"]
    data = os.path.join(root, "data")
    os.makedirs(data, exist_ok=True)
    open(os.path.join(data, "variants.txt"), "w").write("".join(f"{c}\n" for c in classes))
    splits = {"trainval": [("1025794", "707-320"), ("1340192", "F-16A/B"), ("0056978", "Boeing 737-800")],
              "test": [("1514522", "F-16A/B")]}
    for name, rows in splits.items():
        open(os.path.join(data, f"images_variant_{name}.txt"), "w").write("".join(f"{i} {v}\n" for i, v in rows))
        for i, _ in rows:
            _jpg(os.path.join(data, "images", f"{i}.jpg"), (5, 5, 200))
    return {"classes": classes, "train": 3, "test": 1, "train_split": "trainval"}


def birdsnap(root: str) -> dict:
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, "species.txt"), "w").write(
        "id\tcommon\tscientific\tdir\n1\tAcadian Flycatcher\tEmpidonax virescens\tAcadian_Flycatcher\n"
        "2\tAcorn Woodpecker\tMelanerpes formicivorus\tAcorn_Woodpecker\n")
    rows = [("Acadian_Flycatcher/1.jpg", 1), ("Acadian_Flycatcher/2.jpg", 1), ("Acorn_Woodpecker/3.jpg", 2),
            ("Acorn_Woodpecker/4.jpg", 2), ("Acorn_Woodpecker/never_downloaded.jpg", 2)]
    open(os.path.join(root, "images.txt"), "w").write(
        "url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2\n"
        + "".join(f"http://x/{p}\t0\t{p}\t{s}\t0\t0\t1\t1\n" for p, s in rows))
    open(os.path.join(root, "test_images.txt"), "w").write("path\nAcorn_Woodpecker/4.jpg\n")
    for p, _ in rows[:4]:
        _jpg(os.path.join(root, "images", p), (90, 90, 0))
    return {"classes": ["Acadian Flycatcher", "Acorn Woodpecker"], "train": 3, "test": 1, "train_split": "train"}


def flowers102(root: str) -> dict:
    from scipy.io import savemat

    os.makedirs(os.path.join(root, "jpg"), exist_ok=True)
    labels = np.array([1, 2, 2, 1, 3, 3], dtype=np.uint8)
    savemat(os.path.join(root, "imagelabels.mat"), {"labels": labels.reshape(1, -1)})
    savemat(os.path.join(root, "setid.mat"), {"trnid": np.array([[1, 2]]), "valid": np.array([[5]]),
                                              "tstid": np.array([[3, 4, 6]])})
    for i in range(1, 7):
        _jpg(os.path.join(root, "jpg", f"image_{i:05d}.jpg"), (0, 100 + i, 0))
    return {"classes": ["flower_001", "flower_002", "flower_003"], "train": 3, "test": 3,
            "train_split": "trainval"}


def cifar10(root: str) -> dict:
    base = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(base, exist_ok=True)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    open(os.path.join(base, "batches.meta.txt"), "w").write("".join(f"{c}\n" for c in classes) + "\n")
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 2) for i in range(1, 6)] + [("test_batch.bin", 3)]:
        records = bytearray()
        for j in range(n):
            records.append(j % 10)
            records += rng.integers(0, 256, CIFAR_RECORD - 1, dtype=np.uint8).tobytes()
        open(os.path.join(base, name), "wb").write(bytes(records))
    return {"classes": classes, "train": 10, "test": 3, "train_split": "train"}


LAYOUT_BUILDERS = {"oxford_pets": oxford_pets, "stanford_cars": stanford_cars, "fgvc_aircraft": fgvc_aircraft,
                   "birdsnap": birdsnap, "flowers102": flowers102, "cifar10": cifar10}
