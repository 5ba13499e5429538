"""One run at a time per output: the lock a stage holds for its whole build.

Two runs into one ``--output`` must never interleave (docs/design.md,
"Output protocol"): one would judge the other's build dead and delete it, or both
would publish parts of their results. Whether the other run is alive is
never guessed from a process id (a container on the same host has its own
pid namespace); it is held by the run itself:

- **Local and mounted filesystems**: an ``flock`` on ``.NAME.lock`` beside
  the output, held from the check before any work to the commit. The kernel
  releases it when the process ends however it ends, so a lock that can be
  taken belongs to nobody alive. Containers sharing the filesystem share the
  kernel's lock. The lock file is removed at release (a run that opened it
  meanwhile sees it gone once it holds the lock, and takes a new one).
- **Object stores** (no locks): a lease object ``.NAME.lock`` beside the
  output, created only where none exists (S3 ``If-None-Match: *``, GCS
  ``ifGenerationMatch=0``, through fsspec's ``mode="create"``), naming the
  run, renewed every :data:`LEASE_RENEW_SECONDS` by a thread of the run and
  deleted at its end. A lease not renewed for :data:`LEASE_SECONDS` belongs
  to a run that is gone (the age rule): the next run removes it and takes
  its own.

A run that finds the lock held is refused with one line naming the holder.
Locks are re-entrant within a process (one build may open its output more
than once, e.g. the trainer's ranks that share a process).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from . import io as sio

__all__ = ["OutputLock", "OutputBusy", "lock_path", "still_ours", "LEASE_SECONDS", "LEASE_RENEW_SECONDS",
           "RUN_ID"]

#: This process's run id (recorded in markers, leases and ``_SUCCESS``).
RUN_ID = uuid.uuid4().hex[:16]
#: A lease not renewed for this long (seconds) belongs to a run that is gone.
LEASE_SECONDS = 600.0
#: How often a live run renews its lease (seconds).
LEASE_RENEW_SECONDS = 30.0


class OutputBusy(ValueError):
    """Another live run holds the output's lock."""


def lock_path(output: str) -> str:
    """``.NAME.lock`` beside ``output`` (a local path or URL)."""
    output = output.rstrip("/")
    parent, _, name = output.rpartition("/")
    return f"{parent}/.{name}.lock" if parent else f".{name}.lock"


def _now() -> float:
    return time.time()


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Held:
    count: int  # OutputLock objects of this process holding it
    release: Callable[[], None]


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


class OutputLock:
    """The lock of output ``path`` for stage ``stage``: :meth:`acquire` (or
    ``with``) before touching it, :meth:`release` after the commit."""

    def __init__(self, path: str, stage: str):
        self.path, self.stage = path.rstrip("/"), stage
        self.file = lock_path(self.path)
        self.local = sio.is_local(self.path)
        self._depth = 0  # nested acquisitions by this object

    def holder(self) -> dict:
        """What this run records in its lock: run id, stage, host, pid, when."""
        return {"run_id": RUN_ID, "stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(),
                "started": _stamp(_now())}

    @property
    def held(self) -> bool:
        """This object holds the lock."""
        return self._depth > 0

    def acquire(self) -> "OutputLock":
        """Take the lock or raise :class:`OutputBusy` naming who holds it.
        Re-entrant: each acquire needs its release."""
        if self._depth:
            self._depth += 1
            return self
        with _HELD_GUARD:
            held = _HELD.get(self.file)
            if held is not None:
                held.count += 1
            else:
                release = self._flock() if self.local else self._lease()
                _HELD[self.file] = _Held(1, release)
        self._depth = 1
        return self

    def release(self) -> None:
        """Undo one :meth:`acquire` (the last one lets the lock go)."""
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        with _HELD_GUARD:
            held = _HELD[self.file]
            held.count -= 1
            if held.count == 0:
                del _HELD[self.file]
                held.release()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local: flock -------------------------------------------------------------
    def _flock(self):
        path = sio.filesystem(self.file)[1]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    print(f"warning: {self.file}: this filesystem has no locks ({e.strerror}); a concurrent run "
                          "into the same output would not be detected", file=sys.stderr)
                else:
                    holder = _read_holder(fd)
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise OutputBusy(_busy(self.path, holder)) from None
                    raise
            if _same_file(fd, path):
                break
            os.close(fd)  # locked a file its holder removed on release: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder()).encode(), 0)

        def release() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still locked: a run that opened it finds it gone and retries
            os.close(fd)

        return release

    # -- object stores: a lease ---------------------------------------------------
    def _lease(self):
        fs, p = sio.filesystem(self.file)
        body = {**self.holder(), "renewed": _now()}
        for attempt in range(2):
            try:
                fs.pipe_file(p, json.dumps(body).encode(), mode="create")
                break
            except (FileExistsError, OSError) as e:
                if not _exists_error(e):
                    raise
                current = _read_lease(fs, p)
                if attempt == 0 and current is not None and _now() - float(current.get("renewed", 0)) > LEASE_SECONDS:
                    fs.rm(p)  # the age rule: its run is gone (a racing run's create still fails)
                    continue
                raise OutputBusy(_busy(self.path, current or {})) from None
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE_RENEW_SECONDS):
                try:
                    if (_read_lease(fs, p) or {}).get("run_id") != RUN_ID:
                        return  # taken over (we were judged gone): the commit refuses
                    fs.pipe_file(p, json.dumps({**body, "renewed": _now()}).encode())
                except OSError:
                    pass  # a missed renewal is retried; LEASE_SECONDS allows many

        thread = threading.Thread(target=renew, name=f"lease {self.file}", daemon=True)
        thread.start()

        def release() -> None:
            stop.set()
            thread.join(timeout=5)
            if (_read_lease(fs, p) or {}).get("run_id") == RUN_ID:
                fs.rm(p)

        return release


def still_ours(path: str) -> bool:
    """Whether this process still holds the lock of output ``path`` (an
    object-store lease can be lost if it was not renewed in time)."""
    file = lock_path(path.rstrip("/"))
    if file not in _HELD:
        return False
    if sio.is_local(path):
        return True
    fs, p = sio.filesystem(file)
    return (_read_lease(fs, p) or {}).get("run_id") == RUN_ID


def _exists_error(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):
        return True
    text = str(e)
    return "PreconditionFailed" in text or "412" in text or "At least one of the pre-conditions" in text


def _read_lease(fs, p: str) -> dict | None:
    try:
        value = json.loads(fs.cat_file(p))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def _busy(path: str, holder: dict) -> str:
    who = ", ".join(f"{k} {holder[k]}" for k in ("stage", "run_id", "host", "pid", "started") if k in holder)
    renewed = holder.get("renewed")
    until = (f"; its lease expires at {_stamp(float(renewed) + LEASE_SECONDS)} unless renewed"
             if isinstance(renewed, (int, float)) else "")
    return (f"{path} is being written by another run ({who or 'unknown'}){until}; nothing was touched: "
            "wait for it to finish, or give another output")
