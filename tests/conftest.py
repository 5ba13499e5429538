"""Shared fixtures: small generated data, built once per session."""

from __future__ import annotations

import os
import urllib.request

import pytest

# Progress lines (schemas.progress) are quiet in tests and in the commands they
# run, unless asked: ADAPTIVE_TRANSFER_PROGRESS=5 pytest ... shows them.
os.environ.setdefault("ADAPTIVE_TRANSFER_PROGRESS", "0")

from adaptive_transfer.synthetic import SourceSpec, TargetSpec, generate_source, generate_target
from tests.helpers import free_port


@pytest.fixture(scope="session")
def source_data(tmp_path_factory):
    """A 2,000-example JFT-like source (index in 2 Parquet files + vocabulary)."""
    return generate_source(str(tmp_path_factory.mktemp("source")), SourceSpec(num_examples=2000, seed=0))


@pytest.fixture(scope="session")
def food_target(tmp_path_factory):
    """A Food-101-layout target drawn mostly from the 'food' branch."""
    return generate_target(str(tmp_path_factory.mktemp("food")), TargetSpec(layout="food101", branch="food"))


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test run (few shuffle partitions)."""
    from spark_jobs.session import get_session

    session = get_session("adaptive-transfer tests", "local[2]", driver_memory="2g",
                          shuffle_partitions=4, extra={"spark.ui.enabled": "false",
                                                       "spark.default.parallelism": "4"})
    yield session
    session.stop()


@pytest.fixture
def s3_server(monkeypatch):
    """A local S3-compatible server (moto) on loopback; fsspec's s3:// points at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its state per process, not per server: start from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    import fsspec
    # Options set on the driver travel to the Spark tasks (schemas.io.storage_config).
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    fsspec.config.conf["s3"] = dict(options)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    fs.mkdir("bucket")
    yield fs
    fsspec.config.conf.pop("s3", None)
    server.stop()


@pytest.fixture(scope="session")
def resampled(spark, source_data, tmp_path_factory):
    """A same/multinomial selection (many copies) over the generated source."""
    from spark_jobs import resample as R
    from tests.helpers import reference_weights, write_weights

    root = tmp_path_factory.mktemp("shards")
    weights = write_weights(str(root / "weights.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=2))
    out = str(root / "resampled")
    R.run(spark, R.ResampleJob(index=source_data.index_path, weights=weights, size=2500, seed=1, output=out))
    return source_data, out, root
