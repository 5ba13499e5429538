"""adaptive-transfer: domain adaptive transfer learning with specialist models
(Ngiam et al., 2018) as Beam, Spark and DeepSpeed stages."""

from setuptools import find_packages, setup

PACKAGES = ["schemas", "beam_pipelines", "spark_jobs", "trainer", "adaptive_transfer"]

#: What every stage imports (schemas/: Arrow, fsspec paths, image checks).
CORE = ["numpy>=1.24", "pyarrow>=14", "fsspec>=2023.6", "pillow>=10"]

#: One extra per process that runs this project's code; each holds what that
#: process imports beyond CORE (add gcs/s3 for object stores, vision for
#: ResNet-50 / Inception-v3). Launching machines install `driver` with the
#: stages they launch, or `all`.
STAGES = {
    # Spark executors' Python workers (the packed environment of `make spark-env`):
    # spark_jobs' task functions and what they import from schemas/. pyspark comes
    # from the cluster's Spark (SPARK_HOME/python/lib/pyspark.zip), torch is never imported.
    "spark": ["pandas>=2.2,<3"],  # Arrow batches in Python workers (mapInArrow); pyspark warns on 3.x
    # Beam SDK workers (Dataflow's custom container, Dockerfile): label counts,
    # the generalist's inference (torch), the outputs and their plot.
    "beam": ["apache-beam>=2.60", "torch>=2.1", "matplotlib>=3.7",
             "scipy>=1.10"],  # MATLAB .mat annotation files of Stanford Cars and Flowers-102
    # Trainer ranks (pretrain, finetune, evaluate). DeepSpeed >= 0.17.2: the
    # `torch_autocast` config section (trainer.optim); `deepspeed --no_ssh` needs
    # >= 0.14.5. Tested with 0.19.8; the checkpoint engine API moves between minors.
    # tensorboard: the curves' event files (trainer.curves, through torch.utils.tensorboard).
    "trainer": ["torch>=2.1", "deepspeed>=0.17.2,<0.20", "webdataset>=0.2.86", "scipy>=1.10", "tensorboard>=2.14"],
    # The machine that launches the stages: spark-submit's driver (Spark >= 3.4
    # for _metadata.row_index; 3.5 tested), make resample / demo, plots.
    "driver": ["pyspark>=3.5", "pandas>=2.2,<3", "matplotlib>=3.7", "pyyaml>=6"],
}
#: fsspec's filesystems (every stage's own reads and writes); boto3: Beam's S3
#: filesystem (target images on Beam workers). Beam's GCS one: `dataflow`.
#: boto3 must match the botocore that s3fs's aiobotocore pins. Neither s3fs
#: (since 2024) nor aiobotocore 3 offers a `boto3` extra that would say so, and
#: an open boto3 range makes pip backtrack through every newer boto3 and then
#: older moto and s3fs releases (minutes): hence the upper bound, aiobotocore
#: 3.10's botocore range (<1.43.118; raise both together, then `make lock`).
#: `make install` installs the versions of one resolution,
#: requirements/constraints.txt. The lower bounds matter: with boto3 unbounded
#: pip once fell back to s3fs 0.4 (before aiobotocore), whose session refuses
#: fsspec's options.
OBJECT_STORES = {"gcs": ["gcsfs>=2023.6"], "s3": ["s3fs>=2023.6", "boto3>=1.26,<1.43.118"]}
ALL = sorted({r for reqs in (*STAGES.values(), *OBJECT_STORES.values()) for r in reqs})
TEST_TOOLS = ["pytest>=7.4", "pytest-timeout>=2.2", "pytest-benchmark>=4", "moto[server]>=5",
              "venv-pack>=0.2",  # tests/test_cluster.py builds the Spark executors' packed env
              "pytest-xdist>=3.5"]  # pytest -n 2: the suite on both cores

setup(
    name="adaptive-transfer",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]),
    include_package_data=True,
    install_requires=CORE,
    # One command, a subcommand per stage (adaptive_transfer/cli.py); python -m MODULE works as well.
    entry_points={"console_scripts": ["adaptive-transfer=adaptive_transfer.cli:main"]},
    extras_require={
        **STAGES,
        **OBJECT_STORES,
        "all": ALL,
        # The Makefile installs torch first (TORCH=, default torch==2.13.0, a CPU
        # build); any release in the range then satisfies it without a download.
        "test": ALL + TEST_TOOLS,
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "pytest-benchmark>=4", "ruff"],
        "vision": ["torchvision"],
        # Dataflow: Beam's GCP I/O and runner.
        "dataflow": ["apache-beam[gcp]>=2.60"],
        # benchmarks/loader_bench.py's alternative JPEG decoder (scale-on-decode,
        # libjpeg-turbo bundled); the trainer itself decodes with Pillow. Its
        # PyTurboJPEG row also needs the system's libturbojpeg (Debian:
        # libturbojpeg0 with "PyTurboJPEG<2"), so it is not listed here.
        "bench": ["simplejpeg>=1.7"],
    },
)
