"""Target datasets in their real on-disk layouts: list a split's images.

A layout turns ``(root, split)`` into the class names and the list of
``(image path, class index)``. Paths are local paths or URLs (``gs://``,
``s3://``) under ``root``, read through fsspec. The Beam pipeline uses only
the paths (target labels are never used to compute P_t); the trainer uses
both.

Layouts (each reads the dataset's official split files):

================  =============================================================
``imagefolder``   ``<root>/<split>/<class>/<file>``
``food101``       ``images/<class>/<id>.jpg``, ``meta/{classes,train,test}.txt``
``oxford_pets``   ``images/<name>.jpg``, ``annotations/{trainval,test}.txt``
``stanford_cars`` ``cars_{train,test}/<file>``, ``devkit/cars_meta.mat``,
                  ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``
``fgvc_aircraft`` ``data/images/<id>.jpg``, ``data/variants.txt``,
                  ``data/images_variant_{train,val,trainval,test}.txt``
``birdsnap``      ``images/<path>``, ``species.txt``, ``images.txt``, ``test_images.txt``
``flowers102``    ``jpg/image_NNNNN.jpg``, ``imagelabels.mat``, ``setid.mat``
                  (splits train, val, trainval, test)
``cifar10``       the *binary* version: ``cifar-10-batches-bin/data_batch_{1..5}.bin``,
                  ``test_batch.bin``, ``batches.meta.txt`` (never the pickles)
================  =============================================================

An item's locator is a path, or ``<file>.bin#<record>`` for a CIFAR-10
record; :func:`read_item_bytes` returns encoded image bytes for either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import io as sio
from .errors import SchemaError
from .shard_format import IMAGE_SUFFIXES

__all__ = ["TargetSplit", "LAYOUTS", "list_target", "read_item_bytes", "CIFAR_RECORD"]



@dataclass
class TargetSplit:
    """One split of a target dataset: class names and (image path, class index)."""

    layout: str
    root: str
    split: str
    classes: list[str]
    items: list[tuple[str, int]] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.items]

    @property
    def labels(self) -> list[int]:
        return [c for _, c in self.items]


def _read_lines(path: str) -> list[str]:
    try:
        text = sio.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (is the dataset root right?)") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _imagefolder(root: str, split: str) -> TargetSplit:
    base = sio.join(root, split)
    fs, p = sio.filesystem(base)
    if not fs.isdir(p):
        raise FileNotFoundError(f"{base}: no such split directory (imagefolder layout is "
                                "<root>/<split>/<class>/<image>)")
    classes = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(p, detail=False)
                     if fs.isdir(entry))
    if not classes:
        raise SchemaError("no class directories", file=base)
    items = []
    for index, cls in enumerate(classes):
        files = sorted(f for f in fs.find(f"{p}/{cls}") if f.lower().endswith(IMAGE_SUFFIXES))
        items += [(sio.join(base, f[len(p):]) if "://" in base else f, index) for f in files]
    return TargetSplit("imagefolder", root, split, classes, items)


def _food101(root: str, split: str) -> TargetSplit:
    classes = _read_lines(sio.join(root, "meta", "classes.txt"))
    index = {c: i for i, c in enumerate(classes)}
    items = []
    split_file = sio.join(root, "meta", f"{split}.txt")
    for n, line in enumerate(_read_lines(split_file)):
        cls = line.split("/", 1)[0]
        if cls not in index:
            raise SchemaError(f"class {cls!r} of {line!r} is not in meta/classes.txt",
                              file=split_file, row=n)
        items.append((sio.join(root, "images", f"{line}.jpg"), index[cls]))
    return TargetSplit("food101", root, split, classes, items)


def _oxford_pets(root: str, split: str) -> TargetSplit:
    split = {"train": "trainval"}.get(split, split)
    names: dict[int, str] = {}
    rows: dict[str, list[tuple[str, int]]] = {}
    for part in ("trainval", "test"):
        path = sio.join(root, "annotations", f"{part}.txt")
        entries = []
        for n, line in enumerate(_read_lines(path)):
            if line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 2 or not fields[1].isdigit():
                raise SchemaError(f"expected '<image> <class id> <species> <breed id>', got {line!r}",
                                  file=path, row=n)
            cid = int(fields[1]) - 1
            names.setdefault(cid, fields[0].rsplit("_", 1)[0])
            entries.append((fields[0], cid))
        rows[part] = entries
    if split not in rows:
        raise ValueError(f"oxford_pets has splits trainval (alias train) and test, not {split!r}")
    classes = [names[i] for i in sorted(names)]
    if sorted(names) != list(range(len(classes))):
        raise SchemaError("class ids are not contiguous from 1", file=sio.join(root, "annotations"))
    items = [(sio.join(root, "images", f"{name}.jpg"), cid) for name, cid in rows[split]]
    return TargetSplit("oxford_pets", root, split, classes, items)


def _loadmat(path: str):
    import io as _io

    from scipy.io import loadmat

    try:
        return loadmat(_io.BytesIO(sio.read_bytes(path)), squeeze_me=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (is the dataset root right?)") from None


def _stanford_cars(root: str, split: str) -> TargetSplit:
    import numpy as np

    meta = _loadmat(sio.join(root, "devkit", "cars_meta.mat"))
    classes = [str(c) for c in np.atleast_1d(meta["class_names"])]
    if split == "train":
        annos_path, folder = sio.join(root, "devkit", "cars_train_annos.mat"), "cars_train"
    elif split == "test":
        annos_path = sio.join(root, "cars_test_annos_withlabels.mat")
        if not sio.exists(annos_path):
            annos_path = sio.join(root, "devkit", "cars_test_annos_withlabels.mat")
        folder = "cars_test"
    else:
        raise ValueError(f"stanford_cars has splits train and test, not {split!r}")
    annos = np.atleast_1d(_loadmat(annos_path)["annotations"])
    items = []
    for n, (fname, cls) in enumerate(zip(annos["fname"].ravel(), annos["class"].ravel())):
        c = int(cls) - 1
        if not 0 <= c < len(classes):
            raise SchemaError(f"class {int(cls)} is outside 1..{len(classes)}", file=annos_path, row=n)
        items.append((sio.join(root, folder, str(fname)), c))
    return TargetSplit("stanford_cars", root, split, classes, items)


def _fgvc_aircraft(root: str, split: str) -> TargetSplit:
    classes = _read_lines(sio.join(root, "data", "variants.txt"))
    index = {c: i for i, c in enumerate(classes)}
    path = sio.join(root, "data", f"images_variant_{split}.txt")
    items = []
    for n, line in enumerate(_read_lines(path)):
        image, _, variant = line.partition(" ")
        if variant not in index:
            raise SchemaError(f"variant {variant!r} is not in data/variants.txt", file=path, row=n)
        items.append((sio.join(root, "data", "images", f"{image}.jpg"), index[variant]))
    return TargetSplit("fgvc_aircraft", root, split, classes, items)


def _tsv(path: str) -> list[dict[str, str]]:
    lines = _read_lines(path)
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def _birdsnap(root: str, split: str) -> TargetSplit:
    species = sorted(_tsv(sio.join(root, "species.txt")), key=lambda r: int(r["id"]))
    classes = [r["common"] for r in species]
    index = {int(r["id"]): i for i, r in enumerate(species)}
    test = {r["path"] for r in _tsv(sio.join(root, "test_images.txt"))}
    if split not in ("train", "test"):
        raise ValueError(f"birdsnap has splits train and test, not {split!r}")
    base = sio.join(root, "images")
    fs, p = sio.filesystem(base)
    present = {f[len(p):].lstrip("/") for f in fs.find(p)} if fs.exists(p) else set()
    items = []
    for r in _tsv(sio.join(root, "images.txt")):
        if (r["path"] in test) != (split == "test"):
            continue
        if r["path"] in present:  # Birdsnap is fetched from URLs: some never arrive
            items.append((sio.join(base, r["path"]), index[int(r["species_id"])]))
    return TargetSplit("birdsnap", root, split, classes, items)


def _flowers102(root: str, split: str) -> TargetSplit:
    import numpy as np

    labels = np.atleast_1d(_loadmat(sio.join(root, "imagelabels.mat"))["labels"]).ravel().astype(int)
    setid = _loadmat(sio.join(root, "setid.mat"))
    ids = {name: [int(i) for i in np.atleast_1d(setid[key]).ravel()]
           for name, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    ids["trainval"] = ids["train"] + ids["val"]
    if split not in ids:
        raise ValueError(f"flowers102 has splits {sorted(ids)}, not {split!r}")
    names_path = sio.join(root, "classes.txt")
    n_classes = int(labels.max())
    classes = _read_lines(names_path) if sio.exists(names_path) else [f"flower_{k:03d}" for k in range(1, n_classes + 1)]
    items = [(sio.join(root, "jpg", f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1)
             for i in sorted(ids[split])]
    return TargetSplit("flowers102", root, split, classes, items)


#: CIFAR-10 binary record: 1 label byte, then 32x32 R, G and B planes.
CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar10(root: str, split: str) -> TargetSplit:
    base = sio.join(root, "cifar-10-batches-bin") if sio.exists(sio.join(root, "cifar-10-batches-bin")) else root
    classes = _read_lines(sio.join(base, "batches.meta.txt"))
    files = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    if split not in files:
        raise ValueError(f"cifar10 has splits train and test, not {split!r}")
    items = []
    for name in files[split]:
        path = sio.join(base, name)
        data = sio.read_bytes(path)
        if len(data) % CIFAR_RECORD:
            raise SchemaError(f"size {len(data)} is not a multiple of the {CIFAR_RECORD}-byte record",
                              file=path)
        labels = data[::CIFAR_RECORD]
        for i, label in enumerate(labels):
            if label >= len(classes):
                raise SchemaError(f"label {label} is outside the {len(classes)} classes", file=path, row=i)
            items.append((f"{path}#{i}", int(label)))
    return TargetSplit("cifar10", root, split, classes, items)


def read_item_bytes(locator: str, opener: Callable | None = None) -> bytes:
    """Encoded image bytes of a target item: the file's bytes, or a CIFAR-10
    binary record (``<file>.bin#<n>``) encoded losslessly as PNG.
    ``opener(path)`` returns a binary file object (default: fsspec)."""
    def _open(path):
        if opener is not None:
            return opener(path)
        fs, p = sio.filesystem(path)
        return fs.open(p, "rb")

    path, sep, record = locator.rpartition("#")
    if sep and path.endswith(".bin") and record.isdigit():
        with _open(path) as fh:
            fh.seek(int(record) * CIFAR_RECORD)
            raw = fh.read(CIFAR_RECORD)
        if len(raw) != CIFAR_RECORD:
            raise ValueError(f"{locator}: truncated CIFAR-10 record")
        import io as _io

        import numpy as np
        from PIL import Image

        pixels = np.frombuffer(raw[1:], np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
        buf = _io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()
    with _open(locator) as fh:
        return fh.read()


LAYOUTS: dict[str, Callable[[str, str], TargetSplit]] = {
    "imagefolder": _imagefolder,
    "food101": _food101,
    "oxford_pets": _oxford_pets,
    "stanford_cars": _stanford_cars,
    "fgvc_aircraft": _fgvc_aircraft,
    "birdsnap": _birdsnap,
    "flowers102": _flowers102,
    "cifar10": _cifar10,
}


def list_target(root: str, layout: str, split: str = "train") -> TargetSplit:
    """List ``split`` of the dataset at ``root`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown target layout {layout!r}; known: {', '.join(sorted(LAYOUTS))}")
    result = LAYOUTS[layout](root.rstrip("/"), split)
    if not result.items:
        raise SchemaError(f"split {split!r} lists no images", file=root)
    return result
