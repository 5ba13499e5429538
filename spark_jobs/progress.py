"""Progress of a Spark job on stderr: a driver thread polls the status tracker.

``with spark_progress(spark, "resample"):`` around a job's work starts a
daemon thread that reads ``sc.statusTracker()`` (the active stages' completed
and total tasks) every ``poll`` seconds and prints one line when
:class:`schemas.progress.Throttle` says one is due (every
``ADAPTIVE_TRANSFER_PROGRESS`` seconds, default 30, or on a change of stage)
for the stages that have run at least a sixth of the interval (5 s by
default: a stage over sooner prints nothing of its own, the closing line
counts it)::

    resample: stage 12 (parquet at job.py:201): 340/1200 tasks (28%), 5.2 tasks/s, ETA 2m45s

and at the end one line of what it saw (stages, tasks, time). Nothing is
printed with the interval 0 (the tests' default). Nothing here changes what
the job computes.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, TextIO

from schemas.progress import Throttle, format_duration, progress_interval, progress_line

__all__ = ["StageProgress", "SparkProgress", "spark_progress"]


@dataclass
class StageProgress:
    """What the poller saw of one stage: when first seen (monotonic s), tasks."""

    stage_id: int
    name: str
    first_seen: float
    done: int = 0
    total: int = 0


@dataclass
class SparkProgress:
    """The polling thread's state (see the module docstring); ``run()`` is
    the thread's body, ``stop()`` ends it and prints the closing line."""

    sc: object
    label: str
    interval: float
    poll: float
    stream: TextIO = sys.stderr
    grace: float | None = None
    stages: dict[int, StageProgress] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _t0: float = field(default_factory=time.monotonic)

    def snapshot(self) -> list[StageProgress]:
        """Poll the status tracker once: the active stages, updated in ``stages``."""
        tracker, now, active = self.sc.statusTracker(), time.monotonic(), []
        for sid in sorted(tracker.getActiveStageIds()):
            info = tracker.getStageInfo(sid)
            if info is None:
                continue
            seen = self.stages.setdefault(sid, StageProgress(sid, info.name, now))
            seen.done, seen.total = info.numCompletedTasks, info.numTasks
            active.append(seen)
        return active

    def line(self, stage: StageProgress, now: float) -> str:
        """The progress line of one active stage."""
        return progress_line(f"{self.label}: stage {stage.stage_id} ({stage.name})", stage.done,
                             stage.total, now - stage.first_seen, "tasks")

    def worth_a_line(self, active: list[StageProgress], now: float, throttle: Throttle) -> list[StageProgress]:
        """The active stages that have run at least ``grace`` seconds (default the
        throttle's gap, a sixth of the interval): a stage that ends sooner gets
        no line of its own."""
        grace = throttle.gap if self.grace is None else self.grace
        return [s for s in active if now - s.first_seen >= grace]

    def run(self) -> None:
        throttle = Throttle(self.interval)
        while not self._stop.wait(self.poll):
            try:
                snapshot = self.snapshot()
            except Exception:  # noqa: BLE001 - the context stopped under us: progress is not the job
                return
            now = time.monotonic()
            active = self.worth_a_line(snapshot, now, throttle)
            if active and throttle.due(now, tuple(s.stage_id for s in active)):
                for stage in active:
                    print(self.line(stage, now), file=self.stream, flush=True)

    def stop(self) -> None:
        """End the polling and print what it saw (nothing where it saw no stage)."""
        self._stop.set()
        if self.stages:
            tasks = sum(s.total for s in self.stages.values())
            print(f"{self.label}: Spark ran {len(self.stages)} stages seen by the progress poller "
                  f"({tasks} tasks) in {format_duration(time.monotonic() - self._t0)}",
                  file=self.stream, flush=True)


@contextlib.contextmanager
def spark_progress(spark, label: str, interval: float | None = None,
                   stream: TextIO | None = None) -> Iterator[SparkProgress | None]:
    """Progress lines of the Spark work inside the block (see the module
    docstring); ``interval`` defaults to ``ADAPTIVE_TRANSFER_PROGRESS``.
    Yields the poller, or ``None`` where the interval is 0 (nothing runs)."""
    seconds = progress_interval() if interval is None else interval
    if seconds <= 0:
        yield None
        return
    poller = SparkProgress(spark.sparkContext, label, seconds, poll=min(1.0, seconds / 4),
                           stream=sys.stderr if stream is None else stream)
    thread = threading.Thread(target=poller.run, name=f"progress {label}", daemon=True)
    thread.start()
    try:
        yield poller
    finally:
        poller._stop.set()
        thread.join(timeout=5)
        poller.stop()
