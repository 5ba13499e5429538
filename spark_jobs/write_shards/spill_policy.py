"""Where the spill goes, and why.

The spill (the selected images, ``spill.py``) goes to ``--spill-dir`` when
given; in local mode to memory (``MEMORY_SPILL_DIR``, a tmpfs) when the
index's files fit in ``MEMORY_SPILL_SHARE`` of the memory this process may
still use (``/proc/meminfo``, its cgroup, the tmpfs's free space); else to
``OUTPUT/_temporary``, which a cluster refuses on an object store past
``OBJECT_STORE_SPILL_LIMIT``. A memory spill is held by a lock
(:class:`MemorySpill`), so a later run removes only the spills of ended runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from schemas import io as sio

from .footers import index_rows, spill_estimate
from .write import TEMPORARY

if TYPE_CHECKING:
    from .context import ShardInputs
    from .job import ShardJob

__all__ = ["SpillChoice", "choose_spill", "spill_location", "spill_directory", "no_space_message", "is_object_store",
           "memory_free",
           "MemorySpill", "MEMORY_SPILL_SHARE", "MEMORY_SPILL_DIR", "OBJECT_STORE_SPILL_LIMIT",
           "OBJECT_STORE_SCHEMES"]

#: Local mode without --spill-dir: the spill goes to memory (``MEMORY_SPILL_DIR``, a tmpfs)
#: when the index's files fit in this share of both the memory available and the tmpfs's free space.
MEMORY_SPILL_SHARE = 0.25
MEMORY_SPILL_DIR = "/dev/shm"
#: On a cluster, a spill estimated above this (bytes) under an object-store --output is refused
#: unless --spill-dir says where it goes (the spill is written once and read once: as many bytes as the shards).
OBJECT_STORE_SPILL_LIMIT = 256 << 30
#: URL schemes of object stores (no rename, per-request cost): where a large spill is refused by default.
OBJECT_STORE_SCHEMES = ("s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2")


def is_object_store(path: str) -> bool:
    """Whether ``path`` is a URL of an object store (``OBJECT_STORE_SCHEMES``),
    not a local or cluster filesystem (``file:``, ``hdfs:``, a mount)."""
    return path.split("://", 1)[0].lower() in OBJECT_STORE_SCHEMES if "://" in path else False


def spill_location(given: str | None, output: str, local_master: bool, estimate: int | None,
                   memory_free: int | None) -> str:
    """Where the spill goes: ``"given"`` (``--spill-dir``), ``"memory"``
    (local mode, when ``estimate``, the spill's bytes at most, fits in
    ``MEMORY_SPILL_SHARE`` of ``memory_free``, the memory this process may
    still use and the tmpfs's free space, the smaller; a tmpfs spill costs no
    filesystem work and no write-back: measured 25% faster in
    ``shards_bench``) or ``"output"`` (``OUTPUT/_temporary``). Raises
    ``ValueError`` on a cluster when the spill is known to put more than
    ``OBJECT_STORE_SPILL_LIMIT`` on an object-store ``output``. Pure."""
    if given:
        return "given"
    if local_master and estimate is not None and memory_free and estimate <= MEMORY_SPILL_SHARE * memory_free:
        return "memory"
    if not local_master and is_object_store(output) and estimate is not None and estimate > OBJECT_STORE_SPILL_LIMIT:
        raise ValueError(
            f"the spill (about {estimate / 2**30:,.0f} GiB of image bytes, written once and read once by the "
            f"shard writers) would go to {sio.join(output, TEMPORARY)} on the object store: give --spill-dir on "
            "the cluster's own filesystem (e.g. hdfs:///tmp/write_shards; every executor must reach it), or "
            f"--spill-dir {sio.join(output, TEMPORARY)} to accept the object store")
    return "output"


def _cgroup_room() -> int | None:
    """What this process's cgroup may still use (``memory.max -
    memory.current``, cgroup v2; a tmpfs's pages are charged to it); None
    where it has no limit or it cannot be read."""
    try:
        with open("/proc/self/cgroup") as fh:
            group = next(line.strip().split("::", 1)[1] for line in fh if line.startswith("0::"))
        base = os.path.join("/sys/fs/cgroup", group.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as fh:
            return int(limit) - int(fh.read())
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def memory_free() -> int | None:
    """Bytes a spill in ``MEMORY_SPILL_DIR`` could take: the smallest of the
    memory available (``/proc/meminfo``), what this process's cgroup may
    still use (:func:`_cgroup_room`) and the tmpfs's free space; None where
    the first or the last is unknown."""
    try:
        with open("/proc/meminfo") as fh:
            room = [next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))]
        st = os.statvfs(MEMORY_SPILL_DIR)
    except (OSError, StopIteration):
        return None
    room.append(st.f_bavail * st.f_frsize)
    cgroup = _cgroup_room()
    if cgroup is not None:
        room.append(cgroup)
    return max(0, min(room))


@dataclass(frozen=True)
class SpillChoice:
    """Where the spill goes (:func:`spill_location`'s ``location``) and a
    ``note`` for the user (printed when the shards are built), if any."""

    location: str
    note: str | None = None


def choose_spill(job: ShardJob, inputs: ShardInputs, local_master: bool) -> SpillChoice:
    """:func:`spill_location` for this job, with the estimate it needs, from
    the index's file sizes and footers (``inputs.index_rows``: its rows where
    it is small, else None): all of it in local mode (an upper bound), the
    share of its rows selected on a cluster."""
    selected = inputs.selected.rows if inputs.selected is not None else None
    estimate = memory = note = None
    if job.spill_dir:
        pass
    elif local_master:
        memory = memory_free()
        if memory and inputs.column == "image":
            estimate = spill_estimate(inputs.files, inputs.column, selected or 0, inputs.index_rows)
    elif is_object_store(job.output) and selected is not None:
        rows = None
        if inputs.column == "image":
            rows = inputs.index_rows if inputs.index_rows is not None else index_rows(inputs.files)
        estimate = spill_estimate(inputs.files, inputs.column, selected, rows)
        if estimate is not None and rows:
            estimate = int(estimate * min(1.0, selected / rows))
        if estimate is None:
            note = (f"write_shards: the spill's size could not be estimated; it goes to "
                    f"{sio.join(job.output, TEMPORARY)} on the object store (give --spill-dir to choose)")
    return SpillChoice(spill_location(job.spill_dir, job.output, local_master, estimate, memory), note)


@contextlib.contextmanager
def spill_directory(location: str, spill_dir: str | None, work: str) -> Iterator[str]:
    """A fresh spill directory at ``location`` (``"memory"``: a
    :class:`MemorySpill`; ``"given"``: under ``spill_dir``; ``"output"``:
    under ``work/_temporary``), removed when the block ends."""
    memory = MemorySpill() if location == "memory" else None
    path = (memory.path if memory else
            sio.join(spill_dir if location == "given" else sio.join(work, TEMPORARY),
                     f"spill-{uuid.uuid4().hex[:12]}"))
    try:
        yield path
    finally:
        if memory:
            memory.close()
        else:
            sio.remove_tree(path)


def no_space_message(report: str, job: ShardJob, place: str) -> str:
    """The one-line error for a write that found no room (``report``:
    ``"PATH: reason"``, ``spill.no_space``), naming the flag that chose the
    ``place``: ``"given"`` (``--spill-dir``), ``"memory"`` (the spill in
    memory) or ``"output"`` (``--output``, the spill's default place too)."""
    if place == "given":
        where, other = f"--spill-dir {job.spill_dir}", "give another --spill-dir"
    elif place == "memory":
        where, other = f"the spill in memory ({MEMORY_SPILL_DIR})", "give --spill-dir on a disk with room"
    else:
        where, other = f"--output {job.output}", "give another --output"
    return f"{where}: cannot write ({report}); nothing this run wrote is kept: free space there or {other}"


class MemorySpill:
    """A spill directory in memory (``MEMORY_SPILL_DIR``), held by this run:
    a lock file inside it stays ``flock``-ed until :meth:`close`, so that a
    later run (in any process or container sharing the tmpfs) removes only
    spills whose lock it can take: those of ended runs (killed ones too)."""

    PREFIX = "adaptive-transfer-spill-"
    LOCK = "_lock"

    def __init__(self) -> None:
        self.remove_stale()
        self.path = os.path.join(MEMORY_SPILL_DIR, f"{self.PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        os.makedirs(self.path)
        self._lock = os.open(os.path.join(self.path, self.LOCK), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    @classmethod
    def remove_stale(cls) -> list[str]:
        """Remove this user's spills that no run holds; returns them. A spill
        without its lock file is left alone (a run may be creating it)."""
        removed = []
        for entry in os.listdir(MEMORY_SPILL_DIR):
            path = os.path.join(MEMORY_SPILL_DIR, entry)
            try:
                if not entry.startswith(cls.PREFIX) or os.stat(path).st_uid != os.getuid():
                    continue
                fd = os.open(os.path.join(path, cls.LOCK), os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: a running job's
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                os.close(fd)
        return removed

    def close(self) -> None:
        """Remove the spill, then let go of it."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)
