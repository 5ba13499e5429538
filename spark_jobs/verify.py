"""Check a directory of shards written by ``spark_jobs.write_shards``.

::

    python -m spark_jobs.verify DIR [--decode] [--workers N] [--quiet]

Checks ``_SUCCESS``, ``manifest.json``, that shard names are contiguous from
0, and for every shard its size, sha256, sample count, and that each sample
has exactly one image member of a known format whose structure is whole
(``schemas.shard_format.image_problem``; with ``--decode``, that it decodes) and a
``.json`` whose key and copy match the sample key. Shards are checked
``--workers`` at a time (threads; default: the machine's cores), with a
progress line on stderr about every 10 s. Exits 0 when all is well;
otherwise 1, naming the damaged shard(s).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from schemas import Manifest
from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.progress import eta_seconds, format_duration, format_rate
from schemas.shard_format import (IMAGE_EXTENSIONS, SHARD_NAME_RE, decode_problem, extension_matches, image_problem,
                                  parse_sample_key, read_tar_samples, shard_name)
from schemas.stage_output import is_complete

__all__ = ["VerifyReport", "verify", "main"]


@dataclass
class VerifyReport:
    """What :func:`verify` found: problems (empty when the output is sound)."""

    directory: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader:
    def __init__(self, fh):
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n=-1):
        data = self._fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def _unreadable(what: str, path: str, error: OSError) -> str:
    """A problem line for a file that cannot be opened or listed (e.g. no permission)."""
    return f"{what}: cannot be read: {error.strerror or type(error).__name__} ({path})"


def _sample_problems(name: str, key: str, members: dict, decode: bool) -> list[str]:
    """Problems of one sample of shard ``name``: not exactly one image member
    and a ``.json``, an image whose bytes are not of its extension's format or
    whose structure is cut (with ``decode``: that does not decode), a
    ``.json`` whose key and copy are not the sample key's."""
    images = [e for e in members if e in IMAGE_EXTENSIONS]
    if len(images) != 1 or "json" not in members or len(members) != 2:
        return [f"{name}: sample {key!r} has members {sorted(members)}"]
    problems = []
    data = members[images[0]]
    if not extension_matches(images[0], data):
        problems.append(f"{name}: sample {key!r} .{images[0]} is not a {images[0]} image")
    else:
        problem = decode_problem(data) if decode else image_problem(data)
        if problem:
            problems.append(f"{name}: sample {key!r} .{images[0]}: {problem}")
    meta = json.loads(members["json"])
    source, copy = parse_sample_key(key)
    if meta.get("key") != source or meta.get("copy") != copy:
        problems.append(f"{name}: sample {key!r} json says key {meta.get('key')!r} copy {meta.get('copy')!r}")
    return problems


def _check_shard(path: str, name: str, expected, decode: bool = False) -> tuple[int, list[str]]:
    """``(samples, problems)`` of the shard at ``path`` against its manifest
    entry ``expected``: each sample (:func:`_sample_problems`), then its
    size, sha256 and sample count; a shard that is missing, cannot be opened
    or is not a whole tar is one problem."""
    problems = []
    fs, p = sio.filesystem(path)
    if not fs.exists(p):
        return 0, [f"{name}: missing"]
    n = 0
    try:
        opened = fs.open(p, "rb")
    except OSError as e:
        return 0, [_unreadable(name, path, e)]
    with opened as fh:
        reader = _HashingReader(fh)
        try:
            for key, members in read_tar_samples(reader):
                n += 1
                problems += _sample_problems(name, key, members, decode)
            while reader.read(1 << 20):  # hash the tar's trailing padding too
                pass
        except Exception as e:  # noqa: BLE001 - any unreadable tar is damage to report
            return n, [f"{name}: unreadable tar ({type(e).__name__}: {e})"]
    if reader.size != expected.bytes:
        problems.append(f"{name}: {reader.size} bytes, manifest says {expected.bytes}")
    if reader.sha.hexdigest() != expected.sha256:
        problems.append(f"{name}: sha256 mismatch (damaged or replaced)")
    if n != expected.samples:
        problems.append(f"{name}: {n} samples, manifest says {expected.samples}")
    return n, problems


def _unlisted_shards(directory: str, listed: set[str]) -> list[str]:
    """Problems: shard files in ``directory`` that the manifest does not list
    (or that the directory cannot be listed)."""
    fs, p = sio.filesystem(directory)
    try:
        names = [f.rstrip("/").rsplit("/", 1)[-1] for f in fs.ls(p, detail=False)]
    except OSError as e:
        return [_unreadable("the directory", directory, e)]
    return [f"{base}: a shard not in the manifest" for base in names
            if SHARD_NAME_RE.match(base) and base not in listed]


def verify(directory: str, decode: bool = False, workers: int | None = None, progress=None,
           every: float = 10.0) -> VerifyReport:
    """Verify ``directory``; never raises for damage, reports it. ``decode``:
    decode every image; ``workers``: shards checked at a time (threads;
    default ``os.cpu_count()``); ``progress(done, total, samples)`` is called
    at most every ``every`` seconds and once at the end."""
    report = VerifyReport(directory)
    if not is_complete(directory):
        report.problems.append(f"{directory}: no _SUCCESS (the write did not finish)")
    manifest_path = sio.join(directory, "manifest.json")
    try:
        manifest = Manifest.from_json(sio.read_bytes(manifest_path).decode(), manifest_path)
    except FileNotFoundError:
        report.problems.append(f"{manifest_path}: missing")
        return report
    except OSError as e:
        report.problems.append(_unreadable("manifest.json", manifest_path, e))
        return report
    except ValueError as e:
        report.problems.append(str(e))
        return report
    prefix = manifest.extra.get("prefix", "shard")
    for i, s in enumerate(manifest.shards):
        if s.name != shard_name(prefix, i):
            report.problems.append(f"manifest: shard {i} is named {s.name!r}, expected {shard_name(prefix, i)!r}")
    report.problems += _unlisted_shards(directory, {s.name for s in manifest.shards})
    lock = threading.Lock()
    state = {"done": 0, "samples": 0, "last": time.monotonic()}

    def check(s):
        result = _check_shard(sio.join(directory, s.name), s.name, s, decode)
        with lock:
            state["done"] += 1
            state["samples"] += result[0]
            if progress is not None and time.monotonic() - state["last"] >= every:
                state["last"] = time.monotonic()
                progress(state["done"], len(manifest.shards), state["samples"])
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        results = list(pool.map(check, manifest.shards))  # in shard order
    for n, problems in results:
        report.shards += 1
        report.samples += n
        report.problems += problems
    if progress is not None:
        progress(state["done"], len(manifest.shards), state["samples"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m spark_jobs.verify", description=__doc__)
    ap.add_argument("directory")
    ap.add_argument("--decode", action="store_true", help="decode every image (slower: about 1 ms per image)")
    ap.add_argument("--workers", type=int, help="shards checked at a time (default: the machine's cores)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    start = time.monotonic()

    def progress(done, total, samples):
        elapsed = time.monotonic() - start
        print(f"verify: {done}/{total} shards, {samples} samples, {elapsed:.0f} s, "
              f"{format_rate(samples, elapsed, 'samples')}, ETA {format_duration(eta_seconds(done, total, elapsed))}",
              file=sys.stderr, flush=True)

    report = verify(args.directory, decode=args.decode, workers=args.workers,
                    progress=None if args.quiet else progress)
    if report.ok:
        print(f"verify: ok: {report.shards} shards, {report.samples} samples in {args.directory}"
              + (" (every image decoded)" if args.decode else ""))
        return 0
    for problem in report.problems:
        print(f"verify: {problem}", file=sys.stderr)
    print(f"verify: FAILED: {len(report.problems)} problem(s) in {args.directory}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
