"""Generated data for tests, benchmarks, the demo and the experiment.

* :func:`generate_source` writes a JFT-like source: a 3-level label hierarchy
  (root -> group -> leaf, e.g. ``animal -> bird -> owl``), Zipf-like class
  sizes, about a quarter of the examples also carrying an ancestor label, keys
  shaped like ImageNet paths (``n01440764/n01440764_10026.JPEG``) and real
  JPEG/PNG bytes whose content depends on the leaf class.
* :func:`generate_target` writes a target dataset in a real on-disk layout
  (ImageFolder or Food-101) with its own class names, each class rendered like
  one source leaf, mostly from one branch of the hierarchy.

Everything is a pure function of the spec and its seed. The generator is not a
contract of the pipeline: no stage imports it, and the Spark executors'
``code.zip`` does not ship it.

Command line (``python -m schemas.synthetic ... --out DIR``, the old spelling,
still works and says it is deprecated)::

    python -m adaptive_transfer.synthetic source --output DIR [--examples 2000] [--seed 0]
    python -m adaptive_transfer.synthetic target --output DIR [--layout food101|imagefolder]
        [--branch food] [--classes 8] [--clutter 0] [--seed 0]
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from schemas import io as sio
from schemas.arrow import INDEX_SCHEMA_INLINE, VOCABULARY_SCHEMA
from schemas.cli import ArgumentParser

__all__ = [
    "TAXONOMY",
    "SourceSpec",
    "SourceData",
    "TargetSpec",
    "TargetData",
    "make_vocabulary",
    "leaf_table",
    "leaf_style",
    "render_images",
    "encode_image",
    "generate_source",
    "generate_target",
    "wnid",
    "add_clutter",
    "build_parser",
    "main",
]

#: root -> group -> leaves. Truncated to ``leaves_per_group`` leaves.
TAXONOMY: dict[str, dict[str, list[str]]] = {
    "animal": {
        "bird": ["sparrow", "eagle", "owl", "parrot", "penguin", "flamingo"],
        "dog": ["beagle", "poodle", "husky", "terrier", "collie", "pug"],
        "cat": ["tabby", "siamese", "persian", "sphynx", "bengal", "manx"],
    },
    "vehicle": {
        "car": ["sedan", "suv", "pickup", "convertible", "hatchback", "coupe"],
        "aircraft": ["airliner", "glider", "helicopter", "biplane", "seaplane", "jet"],
        "boat": ["canoe", "yacht", "ferry", "kayak", "tugboat", "gondola"],
    },
    "food": {
        "dessert": ["cake", "ice_cream", "donut", "pie", "tiramisu", "macaron"],
        "dish": ["pizza", "sushi", "ramen", "burger", "paella", "curry"],
        "fruit": ["apple", "banana", "cherry", "mango", "grape", "kiwi"],
    },
    "plant": {
        "flower": ["rose", "tulip", "daisy", "orchid", "lily", "sunflower"],
        "tree": ["oak", "pine", "maple", "birch", "palm", "willow"],
    },
}

_TARGET_ADJECTIVES = ["classic", "homestyle", "rustic", "grand", "tiny", "royal", "wild",
                      "golden", "spicy", "misty", "urban", "alpine"]


def wnid(label_id: int) -> str:
    """A WordNet-style id for a label: ``n`` + 8 digits, unique per label."""
    return f"n{1440764 + 7919 * label_id:08d}"


def make_vocabulary(leaves_per_group: int = 4, roots: Sequence[str] | None = None) -> pa.Table:
    """Label vocabulary: roots first, then groups, then leaves (ids in that order)."""
    if not 1 <= leaves_per_group <= 6:
        raise ValueError(f"leaves_per_group must be in 1..6, got {leaves_per_group}")
    roots = list(roots) if roots is not None else list(TAXONOMY)
    unknown = [r for r in roots if r not in TAXONOMY]
    if unknown:
        raise ValueError(f"unknown roots {unknown}; known: {list(TAXONOMY)}")
    ids, names, parents = [], [], []
    root_id = {}
    for r in roots:
        root_id[r] = len(ids)
        ids.append(len(ids)); names.append(r); parents.append(None)
    group_id = {}
    for r in roots:
        for g in TAXONOMY[r]:
            group_id[g] = len(ids)
            ids.append(len(ids)); names.append(g); parents.append(root_id[r])
    for r in roots:
        for g, leaves in TAXONOMY[r].items():
            for leaf in leaves[:leaves_per_group]:
                ids.append(len(ids)); names.append(leaf); parents.append(group_id[g])
    return pa.table({"label_id": pa.array(ids, pa.int32()), "name": pa.array(names, pa.string()),
                     "parent_id": pa.array(parents, pa.int32())}, schema=VOCABULARY_SCHEMA)


def leaf_table(vocabulary: pa.Table) -> list[dict]:
    """Leaves with their group and root: dicts of label ids and names, by leaf id."""
    ids = vocabulary.column("label_id").to_pylist()
    names = vocabulary.column("name").to_pylist()
    parents = vocabulary.column("parent_id").to_pylist()
    parent_of = dict(zip(ids, parents))
    name_of = dict(zip(ids, names))
    has_child = {p for p in parents if p is not None}
    roots = [i for i in ids if parent_of[i] is None]
    groups = sorted(i for i in ids if i in has_child and parent_of[i] is not None)
    out = []
    for lid in sorted(i for i in ids if i not in has_child):
        g = parent_of[lid]
        r = parent_of[g] if g is not None else None
        siblings = sorted(i for i in ids if parent_of[i] == g and i not in has_child)
        out.append({"leaf": lid, "name": name_of[lid], "group": g, "root": r,
                    "root_name": name_of.get(r), "group_index": groups.index(g) if g in groups else 0,
                    "root_index": roots.index(r) if r in roots else 0,
                    "leaf_in_group": siblings.index(lid), "num_groups": len(groups)})
    return out


def leaf_style(leaf: dict) -> dict:
    """Visual parameters of a leaf (an entry of :func:`leaf_table`), shared
    within its group so that telling leaves apart takes features a model
    learns from that group:

    * root: background colour family and stripe frequency;
    * group: base hue of the object and base stripe angle;
    * leaf: a small hue offset, the object's shape and size, a stripe angle
      offset of 15 degrees per leaf.
    """
    leaf_in_group, group_index = leaf["leaf_in_group"], leaf["group_index"]
    root_index, num_groups = leaf["root_index"], leaf["num_groups"]
    hue = (group_index / max(1, num_groups) + 0.025 * (leaf_in_group - 2.5)) % 1.0
    bg_hue = (root_index * 0.27 + 0.55) % 1.0
    return {
        "rgb": np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9), dtype=np.float32),
        "bg": np.array(colorsys.hsv_to_rgb(bg_hue, 0.45, 0.4), dtype=np.float32),
        "angle": np.pi * ((group_index * 0.29) % 1.0) + leaf_in_group * np.pi / 12,
        "freq": 1.5 + (root_index % 4) * 0.75,
        "blob": leaf_in_group % 3,
        "scale": 1.0 + 0.3 * (leaf_in_group // 3),
    }


def render_images(style: dict, count: int, rng: np.random.Generator, size: int = 32,
                  shift: float = 0.0) -> np.ndarray:
    """Render ``count`` uint8 RGB images (N, size, size, 3) of one class.

    Class identity is carried by colour, stripe orientation/frequency and the
    object's shape and size; each image gets a random phase, position, colour
    jitter, brightness and noise. ``shift`` (0..1) perturbs the style (angle,
    colour, noise) to make a related domain, as a target dataset would be.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = style["angle"] + shift * 0.2
    rgb = np.clip(style["rgb"] * (1 - 0.3 * shift) + 0.3 * shift * style["bg"], 0, 1)
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1)).astype(np.float32)
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * style["freq"] * proj[None] + phase)
    cx = rng.uniform(0.3, 0.7, size=(count, 1, 1)).astype(np.float32)
    cy = rng.uniform(0.3, 0.7, size=(count, 1, 1)).astype(np.float32)
    r = style["scale"] * rng.uniform(0.85, 1.15, size=(count, 1, 1)).astype(np.float32)
    dx, dy = np.abs(xx[None] - cx), np.abs(yy[None] - cy)
    if style["blob"] == 0:
        mask = dx ** 2 + dy ** 2 < (0.17 * r) ** 2
    elif style["blob"] == 1:
        mask = (dx < 0.15 * r) & (dy < 0.15 * r)
    else:
        mask = dx + dy < 0.2 * r
    img = style["bg"][None, None, None, :] * (0.6 + 0.8 * stripes[..., None])
    colour = np.clip(rgb[None, :] * rng.normal(1.0, 0.08, size=(count, 3)), 0, 1).astype(np.float32)
    img = np.where(mask[..., None], colour[:, None, None, :], img)
    bright = rng.uniform(0.8, 1.2, size=(count, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0, 0.06 + 0.1 * shift, size=img.shape).astype(np.float32)
    return (np.clip(img * bright + noise, 0, 1) * 255).astype(np.uint8)


def encode_image(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    """Encode one (H, W, 3) uint8 image as JPEG (quality 90) or PNG bytes."""
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    elif fmt.upper() == "PNG":
        Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    else:
        raise ValueError(f"unsupported image format {fmt!r}; use JPEG or PNG")
    return buf.getvalue()


def _zipf_sizes(num_classes: int, total: int, exponent: float, rng: np.random.Generator,
                minimum: int = 2) -> np.ndarray:
    """Class sizes ∝ 1/rank^exponent (ranks shuffled), summing exactly to ``total``."""
    if total < minimum * num_classes:
        raise ValueError(f"{total} examples cannot give {num_classes} classes {minimum} each")
    ranks = rng.permutation(num_classes) + 1
    share = 1.0 / ranks.astype(np.float64) ** exponent
    share /= share.sum()
    spare = total - minimum * num_classes
    raw = share * spare
    sizes = np.floor(raw).astype(np.int64)
    remainder = spare - sizes.sum()
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return sizes + minimum


@dataclass(frozen=True)
class SourceSpec:
    """Parameters of a generated source. Defaults make ~2k 32-px JPEGs."""

    num_examples: int = 2000
    leaves_per_group: int = 4
    zipf_exponent: float = 1.0
    ancestor_fraction: float = 0.25
    image_size: int = 32
    png_fraction: float = 0.0
    num_files: int = 2
    row_group_size: int = 1024
    seed: int = 0


@dataclass
class SourceData:
    """Paths and facts of a generated source."""

    root: str
    index_path: str
    labels_path: str
    num_examples: int
    class_sizes: dict[int, int]
    spec: SourceSpec


def generate_source(out_dir: str, spec: SourceSpec = SourceSpec()) -> SourceData:
    """Write ``out_dir/index/part-*.parquet`` and ``out_dir/labels.parquet``."""
    rng = np.random.default_rng([spec.seed, 0x50])
    vocab = make_vocabulary(spec.leaves_per_group)
    leaves = leaf_table(vocab)
    sizes = _zipf_sizes(len(leaves), spec.num_examples, spec.zipf_exponent, rng)
    keys, labels, images = [], [], []
    for leaf, n in zip(leaves, sizes):
        style = leaf_style(leaf)
        pixels = render_images(style, int(n), rng, spec.image_size)
        extra = rng.random(int(n)) < spec.ancestor_fraction
        to_root = rng.random(int(n)) < 0.5
        is_png = rng.random(int(n)) < spec.png_fraction
        w = wnid(leaf["leaf"])
        for i in range(int(n)):
            keys.append(f"{w}/{w}_{10000 + i}.JPEG")
            lab = [leaf["leaf"]]
            if extra[i]:
                lab.append(leaf["root"] if to_root[i] else leaf["group"])
            labels.append(lab)
            images.append(encode_image(pixels[i], "PNG" if is_png[i] else "JPEG"))
    order = rng.permutation(len(keys))
    table = pa.table({
        "key": pa.array([keys[i] for i in order], pa.string()),
        "labels": pa.array([labels[i] for i in order], pa.list_(pa.int32())),
        "image": pa.array([images[i] for i in order], pa.binary()),
    }, schema=INDEX_SCHEMA_INLINE)
    index_dir = os.path.join(out_dir, "index")
    os.makedirs(index_dir, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, spec.num_files + 1).astype(int)
    for f in range(spec.num_files):
        part = table.slice(bounds[f], bounds[f + 1] - bounds[f])
        pq.write_table(part, os.path.join(index_dir, f"part-{f:05d}.parquet"),
                       row_group_size=spec.row_group_size)
    labels_path = os.path.join(out_dir, "labels.parquet")
    pq.write_table(vocab, labels_path)
    return SourceData(root=out_dir, index_path=index_dir, labels_path=labels_path,
                      num_examples=table.num_rows,
                      class_sizes={leaf["leaf"]: int(n) for leaf, n in zip(leaves, sizes)},
                      spec=spec)


@dataclass(frozen=True)
class TargetSpec:
    """A generated target: ``num_classes`` classes, ``branch_fraction`` of them
    rendered like leaves of the root ``branch``, the rest like other leaves."""

    name: str = "demo"
    layout: str = "food101"
    branch: str = "food"
    num_classes: int = 8
    branch_fraction: float = 0.75
    train_per_class: int = 20
    test_per_class: int = 10
    image_size: int = 32
    domain_shift: float = 0.15
    leaves_per_group: int = 4
    seed: int = 0
    #: Random soft shapes painted on each image (the other things in a
    #: photograph; :func:`add_clutter`); 0: none. Without them the images of a
    #: class differ only in a handful of scalars (phase, position, colour),
    #: too little for near-duplicate tests (see beam_pipelines.near_duplicates).
    clutter: int = 0


@dataclass
class TargetData:
    """Paths and facts of a generated target dataset."""

    root: str
    layout: str
    classes: list[str]
    class_to_leaf: dict[str, int]
    splits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def generate_target(out_dir: str, spec: TargetSpec = TargetSpec()) -> TargetData:
    """Write a target dataset under ``out_dir`` in ``spec.layout``.

    ``imagefolder``: ``<root>/<split>/<class>/<file>.jpg`` for train and test.
    ``food101``: ``images/<class>/<id>.jpg`` plus ``meta/classes.txt``,
    ``meta/labels.txt``, ``meta/train.txt`` and ``meta/test.txt`` (lines
    ``<class>/<id>``, no extension), as in the real dataset.
    """
    if spec.layout not in ("imagefolder", "food101"):
        raise ValueError(f"layout must be imagefolder or food101, got {spec.layout!r}")
    rng = np.random.default_rng([spec.seed, 0x7A])
    vocab = make_vocabulary(spec.leaves_per_group)
    leaves = leaf_table(vocab)
    in_branch = [l for l in leaves if l["root_name"] == spec.branch]
    if not in_branch:
        raise ValueError(f"branch {spec.branch!r} is not a root of the source hierarchy")
    outside = [l for l in leaves if l["root_name"] != spec.branch]
    n_in = min(len(in_branch), int(round(spec.num_classes * spec.branch_fraction)))
    n_out = spec.num_classes - n_in
    if n_out > len(outside):
        raise ValueError(f"cannot draw {spec.num_classes} classes from this hierarchy")
    chosen = [in_branch[i] for i in sorted(rng.choice(len(in_branch), n_in, replace=False))]
    chosen += [outside[i] for i in sorted(rng.choice(len(outside), n_out, replace=False))]
    classes, class_to_leaf = [], {}
    for leaf in chosen:
        adjective = _TARGET_ADJECTIVES[int(rng.integers(len(_TARGET_ADJECTIVES)))]
        name = f"{adjective}_{leaf['name']}"
        classes.append(name)
        class_to_leaf[name] = leaf["leaf"]
    order = sorted(range(len(classes)), key=lambda i: classes[i])
    classes = [classes[i] for i in order]
    chosen = [chosen[i] for i in order]

    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    per_split = {"train": spec.train_per_class, "test": spec.test_per_class}
    file_id = 0
    clutter_rng = np.random.default_rng([spec.seed, 0xC1])  # its own stream: clutter=0 changes nothing else
    for cls, leaf in zip(classes, chosen):
        style = leaf_style(leaf)
        for split in ("train", "test"):
            pixels = render_images(style, per_split[split], rng, spec.image_size, shift=spec.domain_shift)
            if spec.clutter:
                pixels = add_clutter(pixels, clutter_rng, spec.clutter)
            for px in pixels:
                file_id += 1
                stem = f"{int(hashlib.sha1(f'{spec.seed}-{file_id}'.encode()).hexdigest()[:6], 16)}"
                if spec.layout == "imagefolder":
                    rel = os.path.join(split, cls, f"{stem}.jpg")
                else:
                    rel = os.path.join("images", cls, f"{stem}.jpg")
                path = os.path.join(out_dir, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(encode_image(px, "JPEG"))
                splits[split].append((rel, cls))
    if spec.layout == "food101":
        meta = os.path.join(out_dir, "meta")
        os.makedirs(meta, exist_ok=True)
        with open(os.path.join(meta, "classes.txt"), "w") as fh:
            fh.write("".join(f"{c}\n" for c in classes))
        with open(os.path.join(meta, "labels.txt"), "w") as fh:
            fh.write("".join(f"{c.replace('_', ' ').title()}\n" for c in classes))
        for split in ("train", "test"):
            lines = sorted(f"{cls}/{os.path.splitext(os.path.basename(rel))[0]}"
                           for rel, cls in splits[split])
            with open(os.path.join(meta, f"{split}.txt"), "w") as fh:
                fh.write("".join(f"{line}\n" for line in lines))
    with open(os.path.join(out_dir, "generated.json"), "w") as fh:
        fh.write(sio.json_text({"spec": asdict(spec), "class_to_leaf": class_to_leaf}, indent=2))
    return TargetData(root=out_dir, layout=spec.layout, classes=classes,
                      class_to_leaf=class_to_leaf, splits=splits)


# -- clutter: the other things in a photograph ---------------------------------------------


def add_clutter(pixels: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """Paint ``count`` random soft discs (random colour, centre and radius 6-18 %
    of the side, 80 % opaque at the centre) on each of the (N, H, W, 3) uint8
    images: the unrelated things in a photograph that make two photographs of
    one class different images."""
    out = pixels.astype(np.float32) / 255.0
    n, h, w, _ = out.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    for i in range(n):
        for _ in range(count):
            cx, cy = rng.uniform(0, 1, 2)
            radius = rng.uniform(0.06, 0.18)
            colour = rng.uniform(0, 1, 3).astype(np.float32)
            alpha = 0.8 * np.clip(1.5 - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius, 0, 1)[..., None]
            out[i] = out[i] * (1 - alpha) + alpha * colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


# -- command line ---------------------------------------------------------------------------


def build_parser(prog: str = "python -m adaptive_transfer.synthetic") -> ArgumentParser:
    """``source`` and ``target`` subcommands; ``--out`` is a hidden, deprecated
    spelling of ``--output`` (docs/design.md, "One name per concept")."""
    parser = ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("source", help="generate a source index and vocabulary")
    s.add_argument("--output", required=True, help="directory to write index/ and labels.parquet into")
    s.add_argument("--examples", type=int, default=SourceSpec.num_examples)
    s.add_argument("--leaves-per-group", type=int, default=SourceSpec.leaves_per_group)
    s.add_argument("--image-size", type=int, default=SourceSpec.image_size)
    s.add_argument("--files", type=int, default=SourceSpec.num_files)
    s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("target", help="generate a target dataset")
    t.add_argument("--output", required=True, help="directory to write the target dataset into")
    t.add_argument("--layout", default=TargetSpec.layout, choices=["food101", "imagefolder"])
    t.add_argument("--branch", default=TargetSpec.branch)
    t.add_argument("--classes", type=int, default=TargetSpec.num_classes)
    t.add_argument("--train-per-class", type=int, default=TargetSpec.train_per_class)
    t.add_argument("--test-per-class", type=int, default=TargetSpec.test_per_class)
    t.add_argument("--leaves-per-group", type=int, default=TargetSpec.leaves_per_group)
    t.add_argument("--image-size", type=int, default=TargetSpec.image_size)
    t.add_argument("--clutter", type=int, default=0, help="random shapes painted on each image (default 0)")
    t.add_argument("--seed", type=int, default=0)
    for command in (s, t):
        command.add_alias("--out", "--output")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m adaptive_transfer.synthetic") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.what == "source":
        data = generate_source(args.output, SourceSpec(
            num_examples=args.examples, leaves_per_group=args.leaves_per_group,
            image_size=args.image_size, num_files=args.files, seed=args.seed))
        print(f"wrote {data.num_examples} examples to {data.index_path}, vocabulary {data.labels_path}")
    else:
        data = generate_target(args.output, TargetSpec(
            layout=args.layout, branch=args.branch, num_classes=args.classes,
            train_per_class=args.train_per_class, test_per_class=args.test_per_class,
            leaves_per_group=args.leaves_per_group, image_size=args.image_size, seed=args.seed,
            clutter=args.clutter))
        print(f"wrote {args.layout} target with {len(data.classes)} classes to {data.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
