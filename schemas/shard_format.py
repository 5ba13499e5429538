"""The shard format: one home for what the writer, the reader and the verifier share.

WebDataset tars (docs/design.md, "Shards"): ``<prefix>-NNNNNN.tar`` named
contiguously; each sample is ``<key>.<ext>`` (the image under the extension
its bytes show) then ``<key>.json`` (:func:`sample_json`). The writer
(``spark_jobs.write_shards``), the trainer's reader (``trainer.data``) and
``spark_jobs.verify`` import it; pure functions, no Spark or torch.

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
* :data:`IMAGE_EXTENSIONS` are the members that count as a sample's image
  (the writer names only the canonical ones :func:`image_extension` returns;
  ``jpeg`` is read too, as WebDataset writers elsewhere use it).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import tarfile
from typing import Iterable, Iterator
from json.encoder import encode_basestring_ascii as _json_string
from urllib.parse import unquote

from .io import write_all

__all__ = ["sample_key", "parse_sample_key", "image_extension", "sample_json", "write_tar",
           "read_tar_samples", "shard_name", "SHARD_NAME_RE", "SHARD_PREFIX", "IMAGE_EXTENSIONS", "IMAGE_SUFFIXES",
           "image_member", "extension_matches",
           "image_problem", "decode_problem"]

#: The image file extensions, the project's one list: a sample's image member
#: is one of these (:func:`image_extension` gives the writer's, the first
#: six; ``jpeg`` and ``tif`` are read from other writers), and a target
#: folder's images end in one of them (``schemas.targets``, ``build_index``).
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "gif", "bmp", "tiff", "jpeg", "tif")
#: :data:`IMAGE_EXTENSIONS` as file name suffixes (``.jpg``, ...), compared in lower case.
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
#: The shard names' default prefix (``write_shards --prefix``).
SHARD_PREFIX = "shard"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
SHARD_NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6,})\.tar$")


#: str.translate table percent-encoding every unsafe ASCII character (the fast
#: path of :func:`sample_key`; non-ASCII keys take the regex).
_ASCII_ENCODE = {c: f"%{c:02X}" for c in range(128) if _UNSAFE.match(chr(c))}


def sample_key(source_key: str, copy: int) -> str:
    """WebDataset-safe, unique key for copy ``copy`` (0-based) of ``source_key``."""
    if source_key.isascii():
        encoded = source_key.translate(_ASCII_ENCODE)
    else:
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


def image_problem(data) -> str | None:
    """Why encoded image bytes are not a whole image of their format, from
    their structure (no decode), or ``None`` when they look whole: JPEG, an
    SOI, marker segments within the bytes up to a scan, then an EOI after it;
    PNG, chunks within the bytes up to ``IEND``; WebP, the RIFF size equal to
    the bytes'; GIF, the trailer byte; BMP, the header's file size within the
    bytes. Bytes of no known format: ``"unrecognised image format"``."""
    data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    ext = image_extension(data)
    if ext is None:
        return "unrecognised image format"
    n = len(data)
    if ext == "jpg":
        pos = 2
        while True:  # marker segments up to the first scan (SOS)
            while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
                pos += 1  # fill bytes
            if pos + 4 > n:
                return "truncated JPEG (ends in its headers)"
            if data[pos] != 0xFF:
                return f"broken JPEG (no marker at byte {pos})"
            marker = data[pos + 1]
            if 0xD0 <= marker <= 0xD7 or marker == 0x01:
                pos += 2
                continue
            if marker == 0xD9:
                return "broken JPEG (EOI before any scan)"
            length = (data[pos + 2] << 8) | data[pos + 3]
            if length < 2 or pos + 2 + length > n:
                return "truncated JPEG (a header segment runs past the end)"
            pos += 2 + length
            if marker == 0xDA:
                break
        # Entropy-coded data stuffs every 0xFF (FF00), so FFD9 after the scan is its end.
        if bytes(data[n - 2:]) == b"\xff\xd9":  # the usual end
            return None
        tail = bytes(data[max(pos, n - 4096):])  # a whole JPEG ends in EOI, maybe with some padding
        if tail.rfind(b"\xff\xd9") < 0 and bytes(data[pos:]).rfind(b"\xff\xd9") < 0:
            return "truncated JPEG (no EOI marker after the scan)"
        return None
    if ext == "png":
        pos = 8
        while pos + 12 <= n:
            length = int.from_bytes(data[pos:pos + 4], "big")
            kind = bytes(data[pos + 4:pos + 8])
            if pos + 12 + length > n:
                return f"truncated PNG (chunk {kind.decode('latin-1')!r} runs past the end)"
            if kind == b"IEND":
                return None
            pos += 12 + length
        return "truncated PNG (no IEND chunk)"
    if ext == "webp":
        size = int.from_bytes(data[4:8], "little")
        if n < 12 or size + 8 > n:
            return f"truncated WebP (RIFF size {size + 8 if n >= 8 else '?'} > {n} bytes)"
        return None
    if ext == "gif":
        return None if bytes(data[-1:]) == b"\x3b" else "truncated GIF (no trailer)"
    if ext == "bmp":
        size = int.from_bytes(data[2:6], "little") if n >= 6 else n + 1
        return None if size <= n else f"truncated BMP (header says {size} bytes, {n} given)"
    return None  # tiff: offsets anywhere in the file, checked only by a decode


def decode_problem(data) -> str | None:
    """Why the image does not decode whole (Pillow's ``load``), or ``None``."""
    from PIL import Image, UnidentifiedImageError

    problem = image_problem(data)
    if problem is not None:
        return problem
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except UnidentifiedImageError:  # its message names the buffer's address: not reproducible
        return "does not decode: cannot identify image file"
    except Exception as e:  # noqa: BLE001 - any decode failure is the answer
        return f"does not decode: {type(e).__name__}: {e}"[:300]
    return None


def sample_json(source_key: str, copy: int, labels: Iterable[int], weight: float) -> bytes:
    """The ``.json`` member: key, copy, labels, weight (canonical JSON).

    Byte-identical to ``json.dumps({...}, sort_keys=True, separators=(",",
    ":"))`` (tested), formatted directly: it runs once per sample.
    """
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"sample {source_key!r}: weight {weight!r} is not a finite number (JSON has none)")
    number = repr(weight)
    return (f'{{"copy":{int(copy)},"key":{_json_string(source_key)},'
            f'"labels":[{",".join([str(int(x)) for x in labels])}],"weight":{number}}}').encode()


def shard_name(prefix: str, index: int) -> str:
    """``<prefix>-NNNNNN.tar`` (6 digits at least, 0-based)."""
    return f"{prefix}-{index:06d}.tar"


def image_member(members) -> str | None:
    """The image member's extension among a sample's ``members`` (names or a
    mapping), in :data:`IMAGE_EXTENSIONS` order; ``None`` when there is none."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


def extension_matches(ext: str, data) -> bool:
    """Whether image member ``.ext`` holds bytes of that format (``jpeg`` is ``jpg``, ``tif`` is ``tiff``)."""
    return image_extension(data) == {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar pads the archive to whole records, as tarfile does
_FLUSH = 4 << 20  # bytes gathered before one write
_ZEROS = memoryview(bytes(_BLOCK))  # padding, sliced without a copy
# The fixed fields of a regular file's ustar header (mode 0644, uid/gid 0,
# mtime 0, no link, no owner names, no device numbers), split around
# name (0..100), size (124..136) and checksum (148..156).
_AFTER_NAME = b"0000644\0" + b"0000000\0" + b"0000000\0"
_AFTER_SIZE = b"00000000000\0"
_AFTER_SUM = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
_FIXED_SUM = sum(_AFTER_NAME) + sum(_AFTER_SIZE) + sum(b" " * 8) + sum(_AFTER_SUM)


def _member(name: str, size: int) -> bytes:
    """The header block(s) of one regular-file member, exactly as
    ``tarfile`` writes them in PAX format with the fixed metadata above:
    a plain ustar block for an ASCII name of at most 100 bytes, tarfile's own
    PAX headers otherwise (long or non-ASCII names, sizes of 8 GiB and more)."""
    if name.isascii() and len(name) <= 100 and size < 8 ** 11:
        raw, size_field = name.encode("ascii"), b"%011o\0" % size
        checksum = _FIXED_SUM + sum(raw) + sum(size_field)  # the header's bytes, chksum as spaces
        return b"".join((raw.ljust(100, b"\0"), _AFTER_NAME, size_field, _AFTER_SIZE,
                         b"%06o\0 " % checksum, _AFTER_SUM))
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar(fileobj, samples: Iterable[tuple[str, str, bytes, bytes]]) -> tuple[int, int, str]:
    """Write ``(sample_key, image_ext, image_bytes, json_bytes)`` samples as a tar.

    Returns ``(samples, bytes, sha256)`` of what was written. Members are
    ``<key>.<ext>`` then ``<key>.json``, in the given order; the bytes equal
    ``tarfile``'s PAX-format output for the same members (tested), built
    without tarfile's per-member objects and written in large blocks. Image
    and json payloads may be any bytes-like objects (e.g. memoryviews of an
    Arrow buffer).
    """
    digest = hashlib.sha256()
    written = n = pending = 0
    parts: list = []
    # An unbuffered local file takes the parts as they are (writev: no joined copy).
    raw = fileobj.fileno() if isinstance(fileobj, io.FileIO) else None

    def flush() -> None:
        nonlocal written, pending
        if raw is None:
            block = b"".join(parts)
            digest.update(block)
            fileobj.write(block)
        else:
            for part in parts:
                digest.update(part)
            write_all(raw, parts)
        written += pending
        parts.clear()
        pending = 0

    for key, ext, image, meta in samples:
        for name, data in ((f"{key}.{ext}", image), (f"{key}.json", meta)):
            size = len(data)
            header = _member(name, size)
            parts.append(header)
            parts.append(data)
            pad = -size % _BLOCK
            if pad:
                parts.append(_ZEROS[:pad])
            pending += len(header) + size + pad
        n += 1
        if pending >= _FLUSH:
            flush()
    end = written + pending + 2 * _BLOCK
    parts.append(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
    pending += len(parts[-1])
    flush()
    return n, written, digest.hexdigest()


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
