"""Progress lines for long passes over data: rate, ETA, and how often to print.

Pure helpers (no engine imports) shared by the Spark jobs' status poller
(:mod:`spark_jobs.progress`) and the Beam stages' step counts
(:mod:`beam_pipelines.progress`). Lines go to stderr, one per interval at most,
never a bar: a log file of a 300M-record run reads a line per ``interval``.

``ADAPTIVE_TRANSFER_PROGRESS`` sets the interval in seconds (default
:data:`DEFAULT_INTERVAL`); ``0`` (or ``off``) turns the periodic lines off.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["PROGRESS_ENV", "DEFAULT_INTERVAL", "progress_interval", "format_duration", "format_count",
           "format_rate", "eta_seconds", "progress_line", "Throttle"]

#: Environment variable: seconds between progress lines (0 or ``off``: none).
PROGRESS_ENV = "ADAPTIVE_TRANSFER_PROGRESS"
#: Seconds between progress lines by default.
DEFAULT_INTERVAL = 30.0


def progress_interval(environ: dict | None = None) -> float:
    """Seconds between progress lines from :data:`PROGRESS_ENV` (0.0: off).

    Raises ``ValueError`` naming the variable for a value that is neither a
    non-negative number nor ``off``."""
    raw = (os.environ if environ is None else environ).get(PROGRESS_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_INTERVAL
    if raw in ("off", "no", "false"):
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{PROGRESS_ENV}={raw!r}: seconds between progress lines (>= 0) or 'off'")
    return value


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s`` (``?`` for ``None`` or a non-finite value)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_count(n: float) -> str:
    """``950``, ``12.3k``, ``4.56M``, ``1.2G`` (three significant figures)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}" if n != int(n) else str(int(n))


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``count`` per second over ``seconds`` as ``12.3k UNIT/s`` (``12.3k/s`` without a
    unit; ``?`` for the number before any time has passed)."""
    per = f" {unit}/s" if unit else "/s"
    if seconds <= 0:
        return f"?{per}"
    return f"{format_count(count / seconds)}{per}"


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the rate so far (``None`` before anything is done; 0 when done)."""
    if done >= total:
        return 0.0
    if done <= 0 or elapsed <= 0:
        return None
    return (total - done) * elapsed / done


def progress_line(label: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    """``LABEL: 120/400 UNIT (30%), 4.00 UNIT/s, ETA 1m10s`` (no total: count and rate only)."""
    rate = format_rate(done, elapsed, unit)
    if not total:
        return f"{label}: {format_count(done)} {unit}, {rate}"
    share = 100.0 * done / total
    return (f"{label}: {done}/{total} {unit} ({share:.0f}%), {rate}, "
            f"ETA {format_duration(eta_seconds(done, total, elapsed))}")


@dataclass
class Throttle:
    """Decides when a progress line is due: ``interval`` seconds after the last
    one, or once the thing reported changes (``key``) and ``min_gap`` seconds
    have passed (default: a sixth of the interval), so a run of short stages
    does not print a line each. ``interval`` 0: never due."""

    interval: float
    min_gap: float | None = None
    _last: float | None = None
    _key: object = None

    @property
    def gap(self) -> float:
        """Seconds a change must wait after the last line (``min_gap``, or a sixth of the interval)."""
        return self.interval / 6 if self.min_gap is None else self.min_gap

    def due(self, now: float, key: object = None) -> bool:
        """Whether a line is due at ``now`` (seconds, any monotonic clock); a
        ``True`` answer counts as the line printed."""
        if self.interval <= 0:
            return False
        since = None if self._last is None else now - self._last
        if since is None or since >= self.interval or (key != self._key and since >= self.gap):
            self._last, self._key = now, key
            return True
        return False
