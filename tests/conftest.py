"""Shared fixtures: small generated data, built once per session."""

from __future__ import annotations

import pytest

from schemas.synthetic import SourceSpec, TargetSpec, generate_source, generate_target


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
