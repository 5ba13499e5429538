"""WebDataset shard format: sample keys, image formats, deterministic tars.

Pure functions shared by ``write_shards`` and ``verify`` (no Spark here).

* :func:`sample_key` derives a WebDataset ``__key__`` from a source key and a
  copy number. WebDataset groups tar members by the member name up to the
  first dot of its base name, so the key must contain no dot and, to stay a
  flat name, no slash: every character outside ``[A-Za-z0-9_-]`` is
  percent-encoded (``n01440764/n01440764_10026.JPEG`` copy 2 ->
  ``n01440764%2Fn01440764_10026%2EJPEG_c2``). The encoding is injective,
  so keys stay unique.
* :func:`image_extension` names the format from the bytes, not from the key.
* :func:`write_tar` writes members with fixed metadata (mtime 0, uid/gid 0,
  mode 0644), so equal inputs give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from typing import Iterable, Iterator
from urllib.parse import unquote

__all__ = ["sample_key", "parse_sample_key", "image_extension", "sample_json", "write_tar",
           "read_tar_samples", "shard_name", "SHARD_NAME_RE"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
SHARD_NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6,})\.tar$")


def sample_key(source_key: str, copy: int) -> str:
    """WebDataset-safe, unique key for copy ``copy`` (0-based) of ``source_key``."""
    encoded = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), source_key)
    return f"{encoded}_c{int(copy)}"


def parse_sample_key(key: str) -> tuple[str, int]:
    """Inverse of :func:`sample_key`."""
    encoded, _, copy = key.rpartition("_c")
    if not encoded or not copy.isdigit():
        raise ValueError(f"not a sample key: {key!r}")
    return unquote(encoded), int(copy)


def image_extension(data: bytes) -> str | None:
    """File extension of encoded image bytes by their signature, or ``None``."""
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def sample_json(source_key: str, copy: int, labels: Iterable[int], weight: float) -> bytes:
    """The ``.json`` member: key, copy, labels, weight (canonical JSON)."""
    return json.dumps({"key": source_key, "copy": int(copy), "labels": [int(x) for x in labels],
                       "weight": float(weight)}, sort_keys=True, separators=(",", ":")).encode()


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_tar(fileobj, samples: Iterable[tuple[str, str, bytes, bytes]]) -> tuple[int, int, str]:
    """Write ``(sample_key, image_ext, image_bytes, json_bytes)`` samples as a tar.

    Returns ``(samples, bytes, sha256)`` of what was written. Members are
    ``<key>.<ext>`` then ``<key>.json``, in the given order.
    """
    digest = hashlib.sha256()
    counted = _CountingWriter(fileobj, digest)
    n = 0
    with tarfile.open(fileobj=counted, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, ext, image, meta in samples:
            tar.addfile(*_member(f"{key}.{ext}", image))
            tar.addfile(*_member(f"{key}.json", meta))
            n += 1
    return n, counted.bytes, digest.hexdigest()


class _CountingWriter:
    """File-like wrapper that hashes and counts what passes through."""

    def __init__(self, fileobj, digest):
        self._f = fileobj
        self._digest = digest
        self.bytes = 0

    def write(self, data):
        self._digest.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def flush(self):
        if hasattr(self._f, "flush"):
            self._f.flush()

    def close(self):  # the caller owns the underlying file
        pass


def read_tar_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar's members into samples by WebDataset's rule (key = name up
    to the first dot of the base name); yields ``(key, {ext: bytes})``.
    Raises ``ValueError`` on a member outside that rule or a repeated key."""
    seen: set[str] = set()
    current, members = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            if "." not in base:
                raise ValueError(f"member {info.name!r} has no extension")
            prefix = info.name[: len(info.name) - len(base)]
            key = prefix + base.split(".", 1)[0]
            ext = base.split(".", 1)[1]
            data = tar.extractfile(info).read()
            if key != current:
                if current is not None:
                    yield current, members
                if key in seen:
                    raise ValueError(f"sample {key!r} appears twice")
                seen.add(key)
                current, members = key, {}
            if ext in members:
                raise ValueError(f"sample {key!r} has two {ext!r} members")
            members[ext] = data
    if current is not None:
        yield current, members
