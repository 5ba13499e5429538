"""adaptive-transfer: domain adaptive transfer learning with specialist models
(Ngiam et al., 2018) as Beam, Spark and DeepSpeed stages."""

from setuptools import find_packages, setup

PACKAGES = ["schemas", "beam_pipelines", "spark_jobs", "trainer", "adaptive_transfer"]

setup(
    name="adaptive-transfer",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]),
    include_package_data=True,
    install_requires=[
        "apache-beam>=2.60",
        "pyspark>=3.5",
        "pandas>=2.2,<3",  # pyspark needs it for mapInArrow; warns on 3.x
        "pyarrow>=14",
        "numpy>=1.24",
        # The Makefile installs torch first (TORCH=, default torch==2.13.0, a CPU
        # build); any release in this range then satisfies it without a download.
        "torch>=2.1",
        "deepspeed>=0.14",
        "webdataset>=0.2.86",
        "pillow>=10",
        "fsspec>=2023.6",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "tqdm>=4.60",
        "scipy>=1.10",  # MATLAB .mat annotation files of Stanford Cars and Flowers-102
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "pytest-benchmark>=4", "moto[server]>=5",
                 "s3fs>=2023.6"],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "pytest-benchmark>=4", "ruff"],
        "vision": ["torchvision"],
        # benchmarks/loader_bench.py's alternative JPEG decoder (scale-on-decode,
        # libjpeg-turbo bundled); the trainer itself decodes with Pillow. Its
        # PyTurboJPEG row also needs the system's libturbojpeg (Debian:
        # libturbojpeg0 with "PyTurboJPEG<2"), so it is not listed here.
        "bench": ["simplejpeg>=1.7"],
        "gcs": ["gcsfs", "apache-beam[gcp]"],
        "s3": ["s3fs"],
    },
)
