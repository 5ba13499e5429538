"""The pre-training shards: which they are, whether they are there, and their
samples, read once from start to end and checked against the manifest as
they stream.

A shard list comes from a ``manifest.json`` (checked to be a finished
``write_shards`` output) or a brace pattern. With a manifest, each shard's
bytes are hashed while they are read (no second read) and, at the shard's
end, its sha256, size and sample count are compared with the manifest's: a
shard replaced, truncated or damaged since it was written fails the run in
one line naming it, instead of training on it. A brace pattern names no
digests, so its shards are read unchecked.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from schemas import Manifest, ShardInfo
from schemas import io as sio
from schemas.fingerprint import digest
from schemas.stage_output import require_complete

__all__ = ["ShardList", "read_shard_list", "shard_urls", "missing_shards", "require_shards", "shard_samples",
           "SHARD_READ_ATTEMPTS", "SHARD_RETRY_SECONDS"]

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
#: Reads of one shard (the first and the retries after an ``OSError``) before
#: :func:`shard_samples` gives up.
SHARD_READ_ATTEMPTS = 5
#: Seconds before the first retry of a shard read; doubled before each next
#: one (1 + 2 + 4 + 8 = 15 s at most for one shard with the defaults).
SHARD_RETRY_SECONDS = 1.0
_DRAIN = 1 << 20  # bytes per read of what follows the tar's last member (its padding)


@dataclass(frozen=True)
class ShardList:
    """The shards ``source`` (a manifest or a brace pattern) names: their
    ``urls`` and, from a manifest, what each must hold (``expected``, aligned
    with ``urls``; ``None`` for a pattern)."""

    source: str
    urls: tuple[str, ...]
    expected: tuple[ShardInfo, ...] | None = None

    def counts(self) -> list[int] | None:
        """Samples per shard (from the manifest), or ``None``."""
        return None if self.expected is None else [s.samples for s in self.expected]

    def digest(self) -> str:
        """What the shards hold, wherever they are: the manifest's names,
        sample counts, sizes and sha256s (a pattern: its file names only)."""
        if self.expected is None:
            return digest({"pattern": [u.rsplit("/", 1)[-1] for u in self.urls]})
        return digest({"shards": [[s.name, s.samples, s.bytes, s.sha256] for s in self.expected]})


def read_shard_list(spec: str) -> ShardList:
    """The shards of a ``manifest.json`` path (its folder a finished
    ``write_shards`` output) or of a brace pattern such as
    ``out/shard-{000000..000099}.tar``."""
    if spec.endswith(".json"):
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
        require_complete(base, "write_shards")
        manifest = Manifest.from_json(sio.read_bytes(spec).decode(), spec)
        return ShardList(spec, tuple(sio.join(base, s.name) for s in manifest.shards), tuple(manifest.shards))
    m = _BRACE.search(spec)
    if not m:
        return ShardList(spec, (spec,))
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    return ShardList(spec, tuple(spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():]
                                 for i in range(int(lo), int(hi) + 1)))


def shard_urls(spec: str) -> list[str]:
    """The shard paths of :func:`read_shard_list`."""
    return list(read_shard_list(spec).urls)


def missing_shards(urls: Sequence[str]) -> list[str]:
    """The ``urls`` that are not there as files, in order: one listing per
    directory (not a request per shard: 8,000 shards on an object store are
    a few list calls); a directory that cannot be listed holds none."""
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(url.rsplit("/", 1)[0] if "/" in url else ".", []).append(url)
    present: set[str] = set()
    for parent, members in by_parent.items():
        fs, p = sio.filesystem(members[0])
        directory = p.rsplit("/", 1)[0] if "/" in p else "."
        try:
            listed = fs.ls(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in listed if e.get("type") == "file"}
        present.update(u for u in members if u.rsplit("/", 1)[-1] in names)
    return [u for u in urls if u not in present]


def require_shards(urls: Sequence[str], source: str) -> None:
    """Raise ``FileNotFoundError`` in one line naming the first of ``urls``
    (the shards ``source``, a manifest or pattern, names) that is missing
    and how many are: before step 1, not hours in from a loader worker."""
    missing = missing_shards(urls)
    if missing:
        more = f" ({len(missing)} of {len(urls)} shards are missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard {missing[0]} named by {source} is missing{more}; every node must see the "
                                "shards (an object store, or a directory mounted at the same path everywhere)")


class _HashingReader:
    """A binary file's ``read`` that hashes (sha256) and counts what passes."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest: the tar's end-of-archive padding."""
        while self.read(_DRAIN):
            pass


def _mismatch(url: str, expect: ShardInfo, what: str) -> ValueError:
    return ValueError(f"shard {url} does not match its manifest: {what} (replaced, truncated or damaged since "
                      "write_shards wrote it); check the folder with `python -m spark_jobs.verify` and write "
                      "the shards again")


def _check_end(url: str, reader: _HashingReader, samples: int, expect: ShardInfo) -> None:
    """Compare a shard read to its end with its manifest entry."""
    reader.drain()
    found = [f"{samples} samples, not {expect.samples}" if samples != expect.samples else "",
             f"{reader.size} bytes, not {expect.bytes}" if reader.size != expect.bytes else "",
             f"sha256 {reader.sha.hexdigest()}, not {expect.sha256}" if reader.sha.hexdigest() != expect.sha256
             else ""]
    if any(found):
        raise _mismatch(url, expect, "; ".join(f for f in found if f))


def _samples_once(url: str, done: int, expect: ShardInfo | None) -> Iterator[dict]:
    """One read of shard ``url`` from its start: its samples after the first
    ``done`` (those passed over undecoded), then, with ``expect``, the
    check of what was read. Raises ``OSError`` for a read that failed."""
    from webdataset import tariterators as T

    fs, p = sio.filesystem(url)
    with fs.open(p, "rb") as fh:
        reader = _HashingReader(fh)
        seen = 0
        try:
            for sample in T.group_by_keys(T.tar_file_expander([{"url": url, "stream": reader}])):
                seen += 1
                if expect is not None and seen > expect.samples:
                    raise _mismatch(url, expect, f"more than its {expect.samples} samples")
                if seen > done:
                    yield sample
        except tarfile.TarError as e:
            if expect is not None:
                raise _mismatch(url, expect, f"not a whole tar after {seen} samples ({e})") from None
            raise ValueError(f"shard {url} is not a readable tar after {seen} samples: {e}") from None
        if expect is not None:
            _check_end(url, reader, seen, expect)


def shard_samples(url: str, attempts: int = SHARD_READ_ATTEMPTS, backoff: float = SHARD_RETRY_SECONDS,
                  sleep=time.sleep, expect: ShardInfo | None = None) -> Iterator[dict]:
    """The WebDataset samples of shard ``url``, in order. A read that fails
    with an ``OSError`` (a dropped connection, a throttled object store, a
    file briefly missing) is retried from where it stopped: the shard is
    opened again and the samples already yielded are passed over
    undecoded. At most ``attempts`` reads (default
    :data:`SHARD_READ_ATTEMPTS`), waiting ``backoff`` seconds, then twice
    that, and so on, before each retry; then an ``OSError`` naming the shard
    and the last error. Other errors (a damaged tar) are not retried.
    ``expect`` (the shard's manifest entry): its bytes are hashed as they
    are read and, at its end, sha256, size and sample count compared: a
    ``ValueError`` naming the shard where they differ."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    done = 0
    for attempt in range(attempts):
        try:
            for sample in _samples_once(url, done, expect):
                done += 1
                yield sample
            return
        except OSError as e:
            if attempt + 1 == attempts:
                raise OSError(f"shard {url} could not be read ({attempts} attempts, the last after {done} "
                              f"samples): {type(e).__name__}: {e}") from e
            sleep(backoff * 2 ** attempt)
