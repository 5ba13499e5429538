"""Training curves where users look for them, and the progress line.

:class:`TrainingCurves` (rank 0) writes, every ``log_every`` steps and at
the last one, one record to ``OUTPUT/metrics.jsonl`` and the same scalars
to TensorBoard event files in ``OUTPUT/tensorboard/``
(``tensorboard --logdir OUTPUT``):

* ``train/loss``: the mean loss over the steps since the last record;
* ``train/lr``: the learning rate the record's step used;
* ``train/images_per_second``: global images per second over those steps;
* ``train/data_wait_seconds``: the mean time a step waited for its batch
  (the loader not keeping up shows here first);
* ``eval/top1`` and ``eval/mean_per_class_accuracy`` (fine-tuning), at the last step.

A resumed run drops the records after its checkpoint's step (written by the
run that was cut off) and tells TensorBoard to do the same (``purge_step``).

:class:`Progress` prints ``step N/T  loss  lr  img/s  data wait  ETA``
every ``every`` steps on a terminal; in a log file (not a terminal) at most
one line per :data:`LOG_FILE_SECONDS` (and always the last step), so a
two-million-step run does not write two hundred thousand lines.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

from schemas import io as sio

__all__ = ["TrainingCurves", "Progress", "truncate_jsonl", "LOG_FILE_SECONDS", "TENSORBOARD_DIR", "METRICS_JSONL"]

#: Seconds between progress lines when standard output is not a terminal.
LOG_FILE_SECONDS = 30.0
TENSORBOARD_DIR = "tensorboard"
METRICS_JSONL = "metrics.jsonl"


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep the records of ``path`` (JSON lines with a ``step``) up to
    ``last_step``: those after it were written by a run cut off after its
    last checkpoint, and the resumed run writes them again."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = fh.read().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _summary_writer(log_dir: str, purge_step: int | None):
    """TensorBoard's writer, or ``None`` (said once) where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("[curves] tensorboard is not installed (pip install 'adaptive-transfer[trainer]'): "
              f"no event files; the curves are in {METRICS_JSONL}", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


class TrainingCurves:
    """``metrics.jsonl`` and TensorBoard scalars in ``output`` (``enabled``:
    rank 0), one record per ``every`` steps from ``start_step`` (0: a fresh
    run; else a resumed one) on, over global batches of ``images_per_step``."""

    def __init__(self, output: str, enabled: bool, images_per_step: int, every: int = 10, start_step: int = 0,
                 total_steps: int | None = None):
        self.enabled, self.images, self.every, self.total = enabled, images_per_step, max(1, every), total_steps
        self.path = os.path.join(output, METRICS_JSONL)
        self.writer = None
        self._reset()
        if not enabled:
            return
        os.makedirs(output, exist_ok=True)
        if start_step:
            truncate_jsonl(self.path, start_step)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.writer = _summary_writer(os.path.join(output, TENSORBOARD_DIR), start_step + 1 if start_step else None)

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.seconds = 0.0
        self.wait = 0.0

    def step(self, step: int, loss: float, lr: float, seconds: float, wait: float) -> None:
        """Step ``step`` (1-based) is done: its loss, learning rate, wall
        seconds and the seconds of those it waited for its batch."""
        self.losses.append(loss)
        self.seconds += seconds
        self.wait += wait
        if step % self.every and step != self.total:
            return
        n = len(self.losses)
        self.write(step, {"train/loss": sum(self.losses) / n, "train/lr": lr,
                          "train/images_per_second": n * self.images / max(self.seconds, 1e-9),
                          "train/data_wait_seconds": self.wait / n})
        self._reset()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """One record of ``scalars`` (TensorBoard tags) at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **{tag.split("/", 1)[-1]: float(v) for tag, v in scalars.items()}}
        with open(self.path, "a") as fh:
            fh.write(sio.json_text(record) + "\n")
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Progress:
    """One line every ``every`` steps: step, loss, lr, images/s, the share of
    time spent waiting for data, ETA (rank 0: ``enabled``). Where ``stream``
    is not a terminal, at most one line per ``min_seconds`` (default
    :data:`LOG_FILE_SECONDS`; 0 on a terminal), the last step always."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, every: int = 10,
                 enabled: bool = True, stream=None, min_seconds: float | None = None):
        self.total, self.start, self.images = total_steps, start_step, images_per_step
        self.every = max(1, every)
        self.enabled = enabled
        self.stream = sys.stdout if stream is None else stream
        if min_seconds is None:
            interactive = getattr(self.stream, "isatty", lambda: False)()
            min_seconds = 0.0 if interactive else LOG_FILE_SECONDS
        self.min_seconds = min_seconds
        self.t0 = time.perf_counter()
        self.waited = 0.0
        self.last_line: float | None = None

    def update(self, step: int, loss: float, lr: float, wait: float = 0.0) -> None:
        """Step ``step`` (0-based) is done; it waited ``wait`` seconds for its batch."""
        self.waited += wait
        done = step + 1
        if not self.enabled or (done % self.every and done != self.total):
            return
        now = time.perf_counter()
        if done != self.total and self.last_line is not None and now - self.last_line < self.min_seconds:
            return
        self.last_line = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (done - self.start) * self.images / elapsed
        remaining = (self.total - done) * self.images / max(rate, 1e-9)
        print(f"step {done}/{self.total}  loss {loss:.4f}  lr {lr:.5f}  {rate:.0f} img/s  "
              f"data wait {100 * self.waited / elapsed:.0f}%  ETA {datetime.timedelta(seconds=int(remaining))}",
              file=self.stream, flush=True)
