"""The one output protocol every stage follows (DESIGN.md §5).

A stage's output is a directory (``--output``) that it owns:

1. **Inputs first.** A stage validates every input before it calls
   :meth:`StageOutput.begin`; nothing here touches the output before that.
   :meth:`StageOutput.check` is read-only.
2. **Only what the stage wrote is ever deleted.** The stage marks a directory
   as its own when it creates it: a small ``_STAGE`` file naming the stage
   (and, once committed, the top-level entries it wrote). An existing
   non-empty directory without *this* stage's marker is refused with a
   message naming the path, whatever the file names inside; so is one of
   its own that has since gained entries it did not write.
3. **Build aside, commit, ``_SUCCESS`` last.** On a local (POSIX) filesystem
   the stage builds in a temporary sibling ``.NAME.tmp-<id>`` and the commit
   renames it into place, so a finished earlier result stays intact until the
   new one is complete. On object stores (no rename) the stage writes in
   place after clearing what it wrote before, and ``_SUCCESS`` goes last: a
   directory without it is never a result. A stage whose partial output is
   its resume point (the trainer's checkpoints) writes in place everywhere
   (``in_place=True``). :meth:`StageOutput.begin` removes the stale
   temporaries of this stage's earlier killed runs (their process is gone).
4. **A rerun over a finished output does no work** and says so in one line
   (:meth:`StageOutput.skip_line`), unless ``--overwrite``.

Readers of a stage's result call :func:`is_complete` (``_SUCCESS``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Iterator

from . import io as sio

__all__ = ["MARKER", "SUCCESS", "StageOutput", "is_complete", "require_complete", "stage_of"]

#: The file that marks a directory as a stage's own (JSON: the stage's name, who made it).
MARKER = "_STAGE"
#: Written last: a directory without it is not a result.
SUCCESS = "_SUCCESS"
_TMP = ".tmp-"
_OLD = ".old-"


def is_complete(path: str) -> bool:
    """Whether ``path`` holds a finished result (its ``_SUCCESS`` is there)."""
    return sio.exists(sio.join(path, SUCCESS))


def require_complete(path: str, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` unless it is a finished result."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: no {SUCCESS}; {what} did not finish, so this is not a result")


def _local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def stage_of(path: str) -> str | None:
    """The stage named by the marker of directory ``path`` (``None``: no marker,
    or one this project did not write)."""
    marker = sio.join(path, MARKER)
    if not sio.exists(marker):
        return None
    try:
        stage = json.loads(sio.read_bytes(marker)).get("stage")
    except (ValueError, AttributeError, OSError):
        return None
    return stage if isinstance(stage, str) else None


def _entries(path: str) -> list[str] | None:
    """Names in directory ``path``; ``None`` where nothing is there. Raises
    ``ValueError`` where ``path`` is a file."""
    fs, p = sio.filesystem(path)
    if not fs.exists(p):
        return None
    if not fs.isdir(p):
        raise ValueError(f"{path}: exists and is not a directory; give a directory for --output")
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))


def _marker_text(stage: str, entries: list[str] | None = None) -> str:
    marker = {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if entries is not None:
        marker["entries"] = sorted(entries)
    return json.dumps(marker)


def _written(path: str) -> list[str] | None:
    """The top-level entries the stage recorded at its commit (``None``: not
    committed, e.g. an in-place build that was cut off: all of it is the stage's)."""
    try:
        entries = json.loads(sio.read_bytes(sio.join(path, MARKER))).get("entries")
    except (ValueError, AttributeError, OSError):
        return None
    return entries if isinstance(entries, list) else None


def _process_gone(marker: dict) -> bool:
    """Whether the process that made a temporary directory has ended (only
    known for this host: a temporary of another host is left alone)."""
    if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return False
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class StageOutput:
    """The output directory ``path`` of stage ``stage`` (e.g. ``"resample"``).

    ``in_place``: build in ``path`` itself everywhere (a stage whose partial
    output is meaningful, like checkpoints to resume from); otherwise local
    outputs are built in a temporary sibling and renamed into place.
    """

    path: str
    stage: str
    in_place: bool = False

    def __post_init__(self) -> None:
        self.path = self.path.rstrip("/") or "/"
        self.local = sio.is_local(self.path)

    # -- read-only ------------------------------------------------------------------
    def is_complete(self) -> bool:
        return is_complete(self.path)

    def refusal(self) -> str | None:
        """Why this stage may not write ``path`` (``None``: it may): a file, a
        non-empty directory without this stage's marker, or another stage's."""
        names = _entries(self.path)
        if not names:
            return None
        owner = stage_of(self.path)
        if owner == self.stage:
            written = _written(self.path)
            foreign = sorted(set(names) - set(written or ()) - {MARKER, SUCCESS})
            if written is not None and foreign:
                return (f"{self.path} holds {', '.join(foreign[:5])}, which {self.stage} did not write; nothing "
                        "there is deleted: move those away or give a new output directory")
            return None
        if owner is None:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            return (f"{self.path} is not empty ({shown}) and was not written by {self.stage} (no {MARKER} "
                    f"marker naming it); nothing there is deleted: give an empty or new output directory")
        return (f"{self.path} is the output of {owner}, not {self.stage}; nothing there is deleted: give "
                "an empty or new output directory")

    def check(self, overwrite: bool = False) -> bool:
        """Read-only check before any work: ``True`` when a finished result is
        there and not ``overwrite`` (the stage then does nothing but report
        :meth:`skip_line`). Raises ``ValueError`` when the stage may not write
        ``path`` and must (``overwrite``, or no finished result)."""
        if self.is_complete() and not overwrite:
            return True
        reason = self.refusal()
        if reason:
            raise ValueError(reason)
        return False

    def skip_line(self) -> str:
        return f"{self.stage}: {self.path} is complete ({SUCCESS}); nothing to do (--overwrite to redo)"

    # -- writing --------------------------------------------------------------------
    def begin(self) -> str:
        """Start writing, once every input is validated: returns the directory
        to build in (a fresh temporary sibling, or ``path`` itself, cleared of
        what this stage wrote before, where the build is in place)."""
        reason = self.refusal()
        if reason:
            raise ValueError(reason)
        self.remove_stale()
        if self.in_place or not self.local:
            if self.is_complete():
                sio.remove_tree(sio.join(self.path, SUCCESS))  # no longer a result, from now on
            if _entries(self.path):
                self._clear(self.path)
            self._mark(self.path)
            return self.path
        final = _local_path(self.path)
        parent, name = os.path.split(os.path.abspath(final))
        os.makedirs(parent, exist_ok=True)
        work = os.path.join(parent, f".{name}{_TMP}{uuid.uuid4().hex[:12]}")
        os.makedirs(work)
        self._mark(work)
        return work

    def resume(self) -> str:
        """Continue an in-place output this stage started earlier (or start one):
        nothing is removed. Returns ``path``."""
        if not self.in_place:
            raise ValueError(f"{self.stage}: only an in-place output can be resumed")
        reason = self.refusal()
        if reason:
            raise ValueError(reason)
        if stage_of(self.path) != self.stage:
            self._mark(self.path)
        return self.path

    def commit(self, work: str) -> None:
        """Finish: ``_SUCCESS`` last, then (temporary sibling) rename into place;
        a finished result this stage wrote there before is replaced."""
        self._mark(work, entries=[n for n in _entries(work) or [] if n not in (MARKER, SUCCESS)])
        sio.write_bytes_atomic(sio.join(work, SUCCESS), "")
        if work == self.path:
            return
        final = os.path.abspath(_local_path(self.path))
        if os.path.isdir(final) and not os.listdir(final):
            os.rmdir(final)  # an empty directory (adopted): nothing to keep
        if os.path.lexists(final):
            reason = self.refusal()  # checked again: someone may have written there meanwhile
            if reason:
                raise ValueError(f"{reason} (the new result is kept at {work})")
            old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}{_OLD}{uuid.uuid4().hex[:12]}")
            os.rename(final, old)
            os.rename(work, final)
            self._clear(old)
        else:
            os.rename(work, final)

    def abort(self, work: str) -> None:
        """Remove a failed build's temporary sibling (in place: leave it; without
        ``_SUCCESS`` it is not a result, and the next run clears it)."""
        if work != self.path:
            self._clear(work)

    @contextlib.contextmanager
    def build(self) -> Iterator[str]:
        """``with out.build() as work:`` write into ``work``; committed when the
        block ends, aborted when it raises."""
        work = self.begin()
        try:
            yield work
        except BaseException:
            self.abort(work)
            raise
        self.commit(work)

    def remove_stale(self) -> list[str]:
        """Remove the temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) of
        this stage's earlier runs whose process has ended; returns them."""
        if not self.local:
            return []
        final = os.path.abspath(_local_path(self.path))
        parent, name = os.path.split(final)
        if not os.path.isdir(parent):
            return []
        removed = []
        for entry in sorted(os.listdir(parent)):
            if not (entry.startswith(f".{name}{_TMP}") or entry.startswith(f".{name}{_OLD}")):
                continue
            candidate = os.path.join(parent, entry)
            try:
                with open(os.path.join(candidate, MARKER)) as fh:
                    marker = json.load(fh)
            except (OSError, ValueError):
                continue  # not ours, or not readable: left alone
            if marker.get("stage") == self.stage and (entry.startswith(f".{name}{_OLD}") or _process_gone(marker)):
                self._clear(candidate)
                removed.append(candidate)
        return removed

    def _mark(self, directory: str, entries: list[str] | None = None) -> None:
        """Write the marker; at commit, with the top-level ``entries`` written."""
        sio.write_bytes_atomic(sio.join(directory, MARKER), _marker_text(self.stage, entries), durable=False)

    def _clear(self, directory: str) -> None:
        """Remove ``directory``, which carries this stage's marker (checked)."""
        if stage_of(directory) != self.stage:
            raise ValueError(f"internal error: {directory} is not {self.stage}'s; not removing it")
        sio.remove_tree(directory)
