"""Progress lines: rate/ETA formatting, throttling, a Spark job's poller, Beam's counts."""

from __future__ import annotations


import pytest

from schemas.progress import (DEFAULT_INTERVAL, PROGRESS_ENV, Throttle, eta_seconds, format_count,
                              format_duration, format_rate, progress_interval, progress_line)


def test_interval_from_the_environment():
    assert progress_interval({}) == DEFAULT_INTERVAL
    assert progress_interval({PROGRESS_ENV: "5"}) == 5.0
    assert progress_interval({PROGRESS_ENV: "0"}) == 0.0
    assert progress_interval({PROGRESS_ENV: "off"}) == 0.0
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(ValueError, match=PROGRESS_ENV):
            progress_interval({PROGRESS_ENV: bad})


def test_durations_counts_and_rates():
    assert [format_duration(s) for s in (0, 12.4, 185, 3720, None, float("inf"))] == \
        ["0s", "12s", "3m05s", "1h02m", "?", "?"]
    assert [format_count(n) for n in (950, 12_345, 4_560_000, 1.2e9, 2.5)] == ["950", "12.3k", "4.56M", "1.2G", "2.5"]
    assert format_rate(300, 60, "tasks") == "5 tasks/s"
    assert format_rate(3000, 2, "") == "1.5k/s"
    assert format_rate(10, 0, "tasks") == "? tasks/s"


def test_eta_at_the_rate_so_far():
    assert eta_seconds(25, 100, 10.0) == 30.0
    assert eta_seconds(100, 100, 10.0) == 0.0
    assert eta_seconds(0, 100, 10.0) is None
    assert progress_line("resample: stage 3 (parquet)", 120, 400, 30.0, "tasks") == \
        "resample: stage 3 (parquet): 120/400 tasks (30%), 4 tasks/s, ETA 1m10s"
    assert progress_line("weights", 2000, None, 4.0, "images") == "weights: 2k images, 500 images/s"


def test_throttle_one_line_per_interval_and_on_a_change_after_the_gap():
    t = Throttle(30.0)
    assert t.due(0.0, "a")          # the first line at once
    assert not t.due(10.0, "a")     # same stage, inside the interval
    assert t.due(30.0, "a")         # the interval has passed
    assert not t.due(33.0, "b")     # a new stage, but within the gap (30/6 = 5 s)
    assert t.due(36.0, "b")         # a new stage after the gap
    assert not t.due(40.0, "b")
    off = Throttle(0.0)
    assert not any(off.due(float(s)) for s in range(100))


def test_a_spark_job_prints_progress_lines(spark, capsys):
    """Spark work inside spark_progress with a short interval (what every Spark
    stage's run() wraps its build in): its stages' lines on stderr, then a closing line."""
    from spark_jobs.progress import spark_progress

    with spark_progress(spark, "demo", interval=0.01) as poller:
        total = spark.sparkContext.parallelize(range(4000), 8).map(lambda x: x * x).sum()
    assert total == sum(x * x for x in range(4000))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    progress = [ln for ln in lines if ln.startswith("demo: stage ")]
    assert progress and poller.stages, captured.err
    assert all("/8 tasks (" in ln and "tasks/s" in ln and "ETA " in ln for ln in progress), progress
    assert lines[-1].startswith("demo: Spark ran ") and "(8 tasks)" in lines[-1], captured.err
    assert captured.out == ""  # stderr only


def test_stages_shorter_than_the_grace_print_only_the_closing_line(spark, capsys):
    """No "0/N tasks, ETA ?" line for each stage that is over in a moment: a
    stage gets a line once it has run a sixth of the interval (here 10 s)."""
    from spark_jobs.progress import spark_progress

    import time

    with spark_progress(spark, "brief", interval=60.0) as poller:  # polls every second
        spark.sparkContext.parallelize(range(2), 2).map(lambda x: time.sleep(2.5) or x).count()
    lines = capsys.readouterr().err.splitlines()
    assert poller.stages and poller.grace is None
    assert not [ln for ln in lines if ln.startswith("brief: stage ")], lines
    assert lines and lines[-1].startswith("brief: Spark ran "), lines


def test_spark_progress_is_silent_with_the_interval_zero(spark, capsys):
    from spark_jobs.progress import spark_progress

    with spark_progress(spark, "quiet", interval=0) as poller:
        spark.range(100).count()
    assert poller is None
    assert capsys.readouterr().err == ""


def test_beam_counts_per_step(tmp_path, monkeypatch):
    """The in-process runner's counters, one line per step and counter, then the duration."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    from beam_pipelines.execution import new_pipeline
    from beam_pipelines.progress import count_lines, step_counts

    class Count(beam.DoFn):
        def __init__(self):
            self.seen = Metrics.counter("test", "items")

        def process(self, x):
            self.seen.inc()
            yield x

    with new_pipeline([]) as p:
        _ = p | "Make" >> beam.Create(list(range(7))) | "Count" >> beam.ParDo(Count())
    counts = step_counts(p.result)
    assert counts == [("Count", "test/items", 7)]
    assert count_lines("demo", counts, 2.0) == ["demo: step 'Count': test/items 7 (3.5/s)",
                                                 "demo: Beam pipeline finished in 2s"]
