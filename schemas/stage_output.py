"""The one output protocol every stage follows (docs/design.md, "Output protocol").

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
   place when there is no finished result there (nothing to lose), and
   beside it, copied in at the commit, when there is one (``--overwrite``);
   ``_SUCCESS`` goes last: a directory without it is never a result. A stage
   whose partial output is its resume point (the trainer's checkpoints)
   writes in place everywhere (``in_place=True``). The stale temporaries of
   this stage's earlier killed runs (their process is gone) are removed.
4. **One reuse rule.** A finished output is reused (the rerun does no work
   and says so in one line, :meth:`StageOutput.skip_line`) when it is
   complete *and* its fingerprint matches: the digest of the stage's
   settings, seed, inputs and code (:mod:`schemas.fingerprint`), kept in its
   marker. A finished output made from anything else is refused, naming what
   differs, unless ``--overwrite`` (then rebuilt aside and committed whole).
   :meth:`StageOutput.run` is the whole protocol in one call.

Readers of a stage's result call :func:`require_complete` (a directory) or
:func:`require_finished_input` (a file inside a stage's output).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from . import io as sio
from .fingerprint import digest
from .output_lock import RUN_ID, OutputLock, still_ours

__all__ = ["MARKER", "SUCCESS", "StageOutput", "is_complete", "require_complete", "require_finished_input",
           "stage_of", "fingerprint_of"]

#: The file that marks a directory as a stage's own (JSON: the stage's name, who made it).
MARKER = "_STAGE"
#: Written last: a directory without it is not a result.
SUCCESS = "_SUCCESS"
_TMP = ".tmp-"
_OLD = ".old-"
#: An object-store commit in progress: names the complete build being copied in.
_COMMITTING = "_COMMITTING"
#: The protocol's own files in an output (never counted as the stage's entries).
_OWN = (MARKER, SUCCESS, _COMMITTING)


def is_complete(path: str) -> bool:
    """Whether ``path`` holds a finished result (its ``_SUCCESS`` is there)."""
    return sio.exists(sio.join(path, SUCCESS))


def require_complete(path: str, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` unless it is a finished result."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: no {SUCCESS}; {what} did not finish, so this is not a result")


def require_finished_input(path: str, what: str) -> None:
    """Refuse an input file or directory that lies directly in a stage's
    output directory (one with a marker) that is not finished: e.g. a
    ``weights.parquet`` or ``generalist.pt`` of a run that was cut off."""
    if any(c in path for c in "*?["):
        return
    parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
    owner = stage_of(parent)
    if owner is not None and not is_complete(parent):
        raise FileNotFoundError(f"{what} {path}: {parent} is an unfinished {owner} output (no {SUCCESS}); "
                                "finish or redo that stage first")


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


def _files_below(fs, root: str) -> list[str]:
    """Paths (relative to ``root``, ``/``-separated) of every file below it."""
    root = root.rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root) if p.startswith(root + "/"))


def _entries(path: str) -> list[str] | None:
    """Names in directory ``path``; ``None`` where nothing is there. Raises
    ``ValueError`` where ``path`` is a file."""
    fs, p = sio.filesystem(path)
    if not fs.exists(p):
        return None
    if not fs.isdir(p):
        raise ValueError(f"{path}: exists and is not a directory; give a directory for --output")
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))


def _read_marker(path: str) -> dict:
    """The marker of directory ``path`` as a dict (``{}``: none, or unreadable)."""
    try:
        marker = json.loads(sio.read_bytes(sio.join(path, MARKER)))
    except (ValueError, OSError):
        return {}
    return marker if isinstance(marker, dict) else {}


def fingerprint_of(path: str) -> dict | None:
    """The fingerprint recorded in the marker of stage output ``path``:
    ``{"digest": ..., "settings": {...}}`` (``None``: none recorded)."""
    recorded = _read_marker(path).get("fingerprint")
    return recorded if isinstance(recorded, dict) and "digest" in recorded else None


def _fingerprint_record(settings: Mapping[str, Any] | None) -> dict | None:
    if settings is None:
        return None
    plain = json.loads(json.dumps(settings, sort_keys=True, default=str))
    return {"digest": digest(plain), "settings": plain}


def _differences(recorded: dict | None, wanted: dict) -> str:
    """What differs between two fingerprint records, for a message."""
    if recorded is None:
        return "no recorded fingerprint (made by an earlier version)"
    old, new = recorded.get("settings") or {}, wanted["settings"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "other " + ", ".join(keys) if keys else "another fingerprint"


def _marker_text(stage: str, entries: list[str] | None = None, fingerprint: dict | None = None) -> str:
    marker = {"stage": stage, "run_id": RUN_ID, "host": socket.gethostname(), "pid": os.getpid(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if entries is not None:
        marker["entries"] = sorted(entries)
    if fingerprint is not None:
        marker["fingerprint"] = fingerprint
    return json.dumps(marker)


def _written(path: str) -> list[str] | None:
    """The top-level entries the stage recorded at its commit (``None``: not
    committed, e.g. an in-place build that was cut off: all of it is the stage's)."""
    try:
        entries = json.loads(sio.read_bytes(sio.join(path, MARKER))).get("entries")
    except (ValueError, AttributeError, OSError):
        return None
    return entries if isinstance(entries, list) else None


@dataclass
class StageOutput:
    """The output directory ``path`` of stage ``stage`` (e.g. ``"resample"``).

    ``in_place``: build in ``path`` itself everywhere (a stage whose partial
    output is meaningful, like checkpoints to resume from). Otherwise a local
    output is built in a temporary sibling and renamed into place; on an
    object store it is built in place when there is no finished result to
    keep, and beside it (then copied in at the commit) when there is.
    A local ``path`` is resolved (``file://`` forms, symlinks) once, here.
    """

    path: str
    stage: str
    in_place: bool = False
    _fingerprint: dict | None = field(default=None, init=False, repr=False)  # what begin() was given
    _lock: OutputLock | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.local = sio.is_local(self.path)
        self.path = os.path.realpath(sio.filesystem(self.path)[1]) if self.local else self.path.rstrip("/")

    # -- read-only ------------------------------------------------------------------
    def is_complete(self) -> bool:
        """A finished result of this stage is there (``_SUCCESS`` and its marker)."""
        return is_complete(self.path) and stage_of(self.path) == self.stage

    def refusal(self) -> str | None:
        """Why this stage may not write ``path`` (``None``: it may): a file, a
        non-empty directory without this stage's marker, another stage's, or
        one of its own that holds entries it did not write."""
        names = _entries(self.path)
        if not names:
            return None
        owner = stage_of(self.path)
        if owner == self.stage:
            written = _written(self.path)
            foreign = sorted(set(names) - set(written or ()) - set(_OWN))
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

    def matches(self, fingerprint: Mapping[str, Any] | None) -> bool:
        """A finished result of this stage is there, made from ``fingerprint``
        (``None``: from anything)."""
        return self.is_complete() and (fingerprint is None or self.made_from(fingerprint))

    def made_from(self, fingerprint: Mapping[str, Any]) -> bool:
        """This stage's output at ``path``, finished or not (e.g. a resumable
        run's checkpoints), records ``fingerprint``."""
        return stage_of(self.path) == self.stage and \
            (fingerprint_of(self.path) or {}).get("digest") == _fingerprint_record(fingerprint)["digest"]

    def check(self, overwrite: bool = False, fingerprint: Mapping[str, Any] | None = None) -> bool:
        """The check before any work: ``True`` when this stage's finished
        result is there, made from ``fingerprint`` (any, where ``None``), and
        not ``overwrite`` (the stage then does nothing but report
        :meth:`skip_line`). Raises ``ValueError`` when the stage may not write
        ``path`` and must: someone else's files, or a finished result made from
        another fingerprint without ``overwrite`` (the message names what
        differs). Changes nothing but removing this stage's dead temporaries
        (:meth:`remove_stale`). Another live run writing ``path`` is refused
        (:class:`schemas.output_lock.OutputBusy`)."""
        with self.lock():
            return self._check(overwrite, fingerprint)

    def _check(self, overwrite: bool, fingerprint: Mapping[str, Any] | None) -> bool:
        self.remove_stale()
        if self.matches(fingerprint) and not overwrite:
            return True
        reason = self.refusal()
        if reason:
            raise ValueError(reason)
        if self.is_complete() and not overwrite:
            wanted = _fingerprint_record(fingerprint)
            raise ValueError(f"{self.path} holds a finished {self.stage} result made from "
                             f"{_differences(fingerprint_of(self.path), wanted)}; nothing there is deleted: "
                             "--overwrite replaces it once the new one is complete, or give another output")
        return False

    def run(self, build: Callable[[str], Any], *, fingerprint: Mapping[str, Any] | None = None,
            overwrite: bool = False, quiet: bool = False) -> bool:
        """The whole protocol: reuse a finished result made from
        ``fingerprint`` (prints :meth:`skip_line` unless ``quiet``; returns
        ``True``), else ``build(work)`` aside and commit it whole, or abort it
        on failure (returns ``False``). Call it once every input is validated.
        The output's lock is held throughout."""
        with self.lock():
            if self.check(overwrite, fingerprint):
                if not quiet:
                    print(self.skip_line(), file=sys.stderr)
                return True
            with self.build(fingerprint) as work:
                build(work)
        return False

    def skip_line(self) -> str:
        return f"{self.stage}: {self.path} is complete ({SUCCESS}); nothing to do (--overwrite to redo)"

    # -- writing --------------------------------------------------------------------
    def lock(self) -> OutputLock:
        """This output's lock (:mod:`schemas.output_lock`): one run at a time."""
        if self._lock is None:
            self._lock = OutputLock(self.path, self.stage)
        return self._lock

    def begin(self, fingerprint: Mapping[str, Any] | None = None) -> str:
        """Start writing, once every input is validated: takes the output's
        lock (held until :meth:`commit` or :meth:`abort`; another live run is
        refused) and returns the directory to build in (a fresh temporary
        sibling, or ``path`` itself, cleared of what this stage wrote before,
        where the build is in place). The marker records this run's id and
        ``fingerprint`` (what the result is made from)."""
        self._fingerprint = _fingerprint_record(fingerprint)
        self.lock().acquire()
        try:
            return self._begin()
        except BaseException:
            self.release()
            raise

    def _begin(self) -> str:
        reason = self.refusal()
        if reason:
            raise ValueError(reason)
        self.remove_stale()
        if self.in_place or not (self.local or self.is_complete()):
            # In place: nothing finished to keep (or a resumable stage's own).
            if is_complete(self.path):
                sio.remove_tree(sio.join(self.path, SUCCESS))  # no longer a result, from now on
            if _entries(self.path):
                self._clear(self.path)
            self._mark(self.path)
            return self.path
        work = self._sibling(_TMP)
        if self.local:
            os.makedirs(os.path.dirname(work), exist_ok=True)
        self._mark(work)
        return work

    def resume(self, fingerprint: Mapping[str, Any] | None = None) -> str:
        """Continue an in-place output this stage started earlier (or start one):
        nothing is removed. Takes the output's lock. Returns ``path``."""
        if not self.in_place:
            raise ValueError(f"{self.stage}: only an in-place output can be resumed")
        self._fingerprint = _fingerprint_record(fingerprint)
        self.lock().acquire()
        try:
            reason = self.refusal()
            if reason:
                raise ValueError(reason)
            self.remove_stale()
            self._mark(self.path)
        except BaseException:
            self.release()
            raise
        return self.path

    def commit(self, work: str) -> None:
        """Finish: ``_SUCCESS`` last, carrying the run id. A temporary sibling
        replaces ``path`` by one atomic exchange (local) or is copied in
        (object store, rolled forward by the next run if cut off); a finished
        result this stage wrote there before is replaced only now. A build
        that is gone, or not this run's, fails and leaves ``path`` as it was."""
        self.lock().acquire()  # held since begin (by this object or, re-entrantly, another of this process)
        try:
            self._check_own_build(work)
            self._mark(work, entries=[n for n in _entries(work) or [] if n not in _OWN])
            if work == self.path:
                self._write_success(work)
                return
            reason = self.refusal()  # checked again: someone may have written there meanwhile
            if reason:
                raise ValueError(f"{reason} (the new result is kept at {work})")
            self._write_success(work)
            (self._swap_in if self.local else self._copy_in)(work)
        finally:
            self.release()  # the commit's own
            self.release()  # begin's: the build is over

    def abort(self, work: str) -> None:
        """Remove a failed build's temporary sibling (in place: leave it; without
        ``_SUCCESS`` it is not a result, and the next run clears it); release the lock."""
        try:
            if work != self.path and _read_marker(work).get("run_id") == RUN_ID:
                self._clear(work)
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the output's lock (after :meth:`commit` or :meth:`abort`,
        which call it; a process that ends releases it too)."""
        if self._lock is not None:
            self._lock.release()

    @contextlib.contextmanager
    def build(self, fingerprint: Mapping[str, Any] | None = None) -> Iterator[str]:
        """``with out.build() as work:`` write into ``work``; committed when the
        block ends, aborted when it raises."""
        work = self.begin(fingerprint)
        try:
            yield work
        except BaseException:
            self.abort(work)
            raise
        self.commit(work)

    def remove_stale(self) -> list[str]:
        """Tidy what this stage's earlier runs, now ended, left beside ``path``
        (called with the lock held, so no live run owns any of it): their
        temporaries (``.NAME.tmp-*``) are removed; a local commit cut off
        between its two renames (the set-aside ``.NAME.old-*`` and the
        finished new build there, ``path`` missing) is finished; an old result
        set aside is never put back (the user may have removed ``path`` on
        purpose); an object-store commit cut off while copying in is finished
        from its complete build. Returns what it removed."""
        if not self.lock().held:
            with self.lock():
                return self.remove_stale()
        removed = []
        if not self.local:
            self._roll_forward_copy_in()
        siblings = self._siblings()
        old = [c for c, kind in siblings if kind == _OLD]
        if self.local and old and not os.path.lexists(self.path):
            finished = [c for c, kind in siblings if kind == _TMP and is_complete(c)]
            if finished:
                os.rename(finished[0], self.path)  # the cut-off commit, finished
                siblings = [(c, k) for c, k in siblings if c != finished[0]]
        for candidate, _ in siblings:
            self._clear(candidate)
            removed.append(candidate)
        return removed

    def _siblings(self) -> list[tuple[str, str]]:
        """This stage's temporaries and set-aside results beside ``path``: (path, kind)."""
        parent, name = (os.path.split(self.path) if self.local else self.path.rsplit("/", 1))
        fs, p = sio.filesystem(parent)
        if not fs.isdir(p):
            return []
        found = []
        for entry in sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)):
            kind = _OLD if entry.startswith(f".{name}{_OLD}") else _TMP if entry.startswith(f".{name}{_TMP}") else None
            candidate = f"{parent}/{entry}"
            if kind and stage_of(candidate) == self.stage:
                found.append((candidate, kind))
        return found

    def _check_own_build(self, work: str) -> None:
        marker = _read_marker(work)
        if not marker or marker.get("run_id") != RUN_ID:
            raise ValueError(f"{self.stage}: the build at {work} is gone or is not this run's; the result at "
                             f"{self.path} is left as it was")
        if not still_ours(self.path):
            raise ValueError(f"{self.stage}: this run no longer holds the lock of {self.path} (its lease "
                             "was not renewed in time and another run may have taken it); the result there "
                             f"is left as it was, the new one stays at {work}")

    def _write_success(self, directory: str) -> None:
        sio.write_bytes_atomic(sio.join(directory, SUCCESS), json.dumps({"stage": self.stage, "run_id": RUN_ID}))

    def _swap_in(self, work: str) -> None:
        """Local commit: ``work`` becomes ``path`` (an atomic exchange where
        the filesystem has one; else two renames, finished by the next run if
        cut off between them)."""
        if os.path.isdir(self.path) and not os.listdir(self.path):
            os.rmdir(self.path)  # an empty directory (adopted): nothing to keep
        if not os.path.lexists(self.path):
            os.rename(work, self.path)
        elif sio.exchange(work, self.path):
            self._clear(work)  # now the old result
        else:
            old = self._sibling(_OLD)
            os.rename(self.path, old)
            os.rename(work, self.path)  # cut off before this: remove_stale finishes it
            self._clear(old)

    def _copy_in(self, work: str) -> None:
        """Object stores: replace the finished result at ``path`` with
        ``work``'s entries (server-side copies). ``_COMMITTING`` names the
        complete build first, so a commit cut off part way is finished by the
        next run from it; ``_SUCCESS`` goes last."""
        sio.write_bytes_atomic(sio.join(self.path, _COMMITTING), json.dumps({"run_id": RUN_ID, "from": work}))
        self._finish_copy_in(work)

    def _finish_copy_in(self, work: str) -> None:
        """Copy every file of ``work`` to the same relative path under
        ``path`` (file by file: a recursive copy onto an existing directory
        would nest it), remove the files the new result does not hold, then
        the marker and ``_SUCCESS``."""
        fs, final = sio.filesystem(self.path)
        sio.remove_tree(sio.join(self.path, SUCCESS))  # no longer a result, from now on
        src = sio.filesystem(work)[1]
        new = {f: f"{src}/{f}" for f in _files_below(fs, src) if f not in (SUCCESS, MARKER)}
        if new:
            names = sorted(new)
            fs.copy([new[f] for f in names], [f"{final}/{f}" for f in names])
        for f in _files_below(fs, final):
            if f not in new and f not in _OWN:
                fs.rm_file(f"{final}/{f}")  # what the new result does not hold
        fs.copy(f"{src}/{MARKER}", f"{final}/{MARKER}")
        fs.copy(f"{src}/{SUCCESS}", f"{final}/{SUCCESS}")
        sio.remove_tree(sio.join(self.path, _COMMITTING))
        sio.remove_tree(work)

    def _roll_forward_copy_in(self) -> None:
        intent = sio.join(self.path, _COMMITTING)
        if not sio.exists(intent):
            return
        try:
            work = json.loads(sio.read_bytes(intent))["from"]
        except (ValueError, KeyError, TypeError, OSError):
            work = None
        if work and is_complete(work) and stage_of(work) == self.stage:
            self._finish_copy_in(work)  # the cut-off commit, finished
        else:
            sio.remove_tree(intent)  # nothing complete to finish from: not a result

    def _sibling(self, kind: str) -> str:
        parent, name = (os.path.split(self.path) if self.local else self.path.rsplit("/", 1))
        return f"{parent}/.{name}{kind}{uuid.uuid4().hex[:12]}"

    def _mark(self, directory: str, entries: list[str] | None = None) -> None:
        """Write the marker (with the fingerprint :meth:`begin` was given); at
        commit, with the top-level ``entries`` written."""
        fingerprint = self._fingerprint
        if fingerprint is None and entries is not None:
            fingerprint = fingerprint_of(directory)  # a build begun elsewhere (e.g. by another rank)
        sio.write_bytes_atomic(sio.join(directory, MARKER), _marker_text(self.stage, entries, fingerprint),
                               durable=False)

    def _clear(self, directory: str) -> None:
        """Remove ``directory``, which carries this stage's marker (checked; one
        already gone, e.g. tidied by a concurrent run, is fine)."""
        if not sio.exists(directory):
            return
        if stage_of(directory) != self.stage:
            raise ValueError(f"internal error: {directory} is not {self.stage}'s; not removing it")
        sio.remove_tree(directory)
