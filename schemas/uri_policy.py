"""Which image ``uri`` values of a source index may be fetched.

A source index may come from someone else, and its ``uri`` column names what
a stage reads: without a policy, ``/etc/passwd``, ``/dev/zero`` or
``http://internal-host/...`` would be read (or requested) like any image. A
uri is fetched only when it lies under one of the *allowed prefixes*:

* the default (:func:`default_prefixes`) is the index's own directory tree
  and nothing outside it: ``/d/jft/index/`` for a directory index
  ``/d/jft/index`` (or a glob that lists it, ``/d/jft/index/*.parquet``),
  ``s3://bucket/jft/index/`` for ``s3://bucket/jft/index``; a one-file index
  (``/d/jft/index.parquet``) has none: name where its images are;
* given prefixes replace the default (repeat to allow several roots, the
  index's own included). A prefix is a directory: ``/d/jft`` allows
  ``/d/jft/a.jpg``, not ``/d/jftX/a.jpg``; ``s3://bucket`` allows that
  bucket, ``s3://`` every bucket, ``/`` every local file, ``http://host``
  that host (and port) only;
* below a prefix, a hidden path component (``.ssh``, ``.git``) is refused:
  only a prefix that names it allows what is under it.

Both sides are normalised before comparing (:func:`canonical`): a uri with a
``..`` segment (also percent-encoded, at any depth of encoding, or between
backslashes) is refused, never resolved; local paths (plain or ``file:``/``file://``/``local://``)
must be absolute, and are resolved with symlinks (so a link inside an
allowed directory that points outside it is outside); schemes compare in
lower case, with fsspec's aliases (``gcs`` = ``gs``, ``s3a`` = ``s3``).
URLs that fsspec would chain (``::``) or glob (``*``), control characters
and malformed hosts or buckets are refused. The fetch then reads the
canonical form it checked (:func:`read_target`), not the raw string; local
files by a walk that opens each directory without following a link (a
directory swapped for a symlink after the check is refused), and only
regular files (not devices or FIFOs); ``http(s)`` with each redirect's
target checked against the prefixes like the uri itself.

Pure Python, no Spark; the only filesystem access is resolving local
symlinks (``resolve``, replaceable in tests) and :func:`read_target`.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from typing import Callable, NamedTuple, Sequence
from urllib.parse import unquote

__all__ = ["Verdict", "canonical", "canonical_prefix", "default_prefixes", "check_uris", "allowed",
           "read_target", "OUTSIDE"]

#: Start of the reason of a uri outside every allowed prefix.
OUTSIDE = "uri outside the allowed prefixes"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")
#: A bucket or host[:port] (IPv6 literals are refused anyway: fsspec splits on '::').
_NETLOC = re.compile(r"[A-Za-z0-9._~:\[\]-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ALIASES = {"gcs": "gs", "s3a": "s3", "local": "file"}
_GLOB_CHARS = "*?["


class Verdict(NamedTuple):
    """For one uri: ``target``, the canonical form to read, when it is allowed;
    else ``reason``, why not (the bad record's reason)."""

    target: str | None
    reason: str | None


class _Refused(ValueError):
    pass


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def resolve_local(path: str) -> str:
    """``os.path.realpath(path)`` for an absolute, normalised path, with the
    directory's resolution cached (one ``lstat`` per uri after the first of
    its directory)."""
    head, tail = os.path.split(path)
    if not tail:
        return _real_dir(path)
    if os.path.islink(path):
        return os.path.realpath(path)
    real = _real_dir(head)
    return real.rstrip("/") + "/" + tail


#: Percent-decoding is applied until nothing changes, at most this often.
_MAX_DECODES = 8


def _dotdot(path: str) -> bool:
    """A ``..`` segment at any depth of percent-encoding (``%2e%2e``,
    ``%252e%252e``, ...); a uri still changing after :data:`_MAX_DECODES`
    decodings counts as one."""
    text = path
    for _ in range(_MAX_DECODES):
        if ".." in re.split(r"[/\\]", text):
            return True
        decoded = unquote(text)
        if decoded == text:
            return False
        text = decoded
    return True


def canonical(uri: str, resolve: Callable[[str], str] = resolve_local) -> str:
    """The normal form of a uri or prefix: ``/abs/real/path`` for a local one,
    ``scheme://netloc/path`` (scheme lower case, aliases folded) for a URL;
    ``_Refused`` (a ValueError) saying why when it has none."""
    if not isinstance(uri, str) or not uri:
        raise _Refused("no uri")
    if _CONTROL.search(uri):
        raise _Refused("control character in uri")
    if "::" in uri:
        raise _Refused("chained URL ('::')")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if not _SCHEME.match(scheme):
            raise _Refused(f"malformed scheme {scheme[:40]!r}")
        scheme = _ALIASES.get(scheme.lower(), scheme.lower())
        if scheme == "file":
            if rest.startswith("localhost/"):
                rest = rest[len("localhost"):]
            if not rest.startswith("/"):
                raise _Refused("a file:// uri must name an absolute local path")
            return _local(rest, resolve)
        netloc, slash, path = rest.partition("/")
        if not _NETLOC.match(netloc):
            raise _Refused(f"malformed host or bucket {netloc[:60]!r}")
        if _dotdot(path):
            raise _Refused("'..' segment in uri")
        if "*" in rest:
            raise _Refused("glob character '*' in a URL")
        return f"{scheme}://{netloc}{slash}{path}"
    for scheme in ("file:", "local:"):  # fsspec reads 'file:/x' as the local '/x'
        if uri.lower().startswith(scheme):
            return _local(uri[len(scheme):], resolve)
    if uri.lower().startswith("data:"):
        raise _Refused("data: uri")
    return _local(uri, resolve)


def _local(path: str, resolve: Callable[[str], str]) -> str:
    if not path.startswith("/"):
        raise _Refused("not an absolute path or URL")
    if _dotdot(path):
        raise _Refused("'..' segment in uri")
    return resolve(os.path.normpath("/" + path.lstrip("/")))


def canonical_prefix(prefix: str, resolve: Callable[[str], str] = resolve_local) -> str:
    """An allowed prefix in normal form, ending in ``/`` (a directory; a bare
    ``scheme://`` allows the whole scheme). A relative local path is taken from
    the current directory. Raises ``ValueError`` for an unusable prefix."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError("--allow-uri-prefix: empty prefix")
    text = prefix.strip()
    try:
        if "://" in text and text.split("://", 1)[1] == "":  # 's3://': every bucket
            scheme = text.split("://", 1)[0]
            if not _SCHEME.match(scheme):
                raise _Refused(f"malformed scheme {scheme!r}")
            scheme = _ALIASES.get(scheme.lower(), scheme.lower())
            return "/" if scheme == "file" else f"{scheme}://"
        if "://" not in text and not text.lower().startswith(("file:", "local:", "data:")):
            if _dotdot(text):
                raise _Refused("'..' segment in uri")
            text = os.path.abspath(text)
        out = canonical(text, resolve)
    except _Refused as e:
        raise ValueError(f"--allow-uri-prefix {prefix!r}: {e}") from None
    return out if out.endswith("/") else out + "/"  # 's3://bucket' -> 's3://bucket/'


def default_prefixes(index: str, resolve: Callable[[str], str] = resolve_local) -> tuple[str, ...]:
    """The index's own directory tree (see the module docstring): the
    directory an index names or a glob lists; ``()`` for a one-file index."""
    path = index.strip()
    cut = min((path.find(c) for c in _GLOB_CHARS if c in path), default=-1)
    if cut >= 0:  # a glob: the directory it lists is the index
        path = path[:path.rfind("/", 0, cut) + 1] if "/" in path[:cut] else "."
    path = path.rstrip("/") or "/"
    if path.lower().endswith(".parquet"):
        return ()
    if "://" in path and path.split("://", 1)[0].lower() not in ("file", "local"):
        return (canonical_prefix(path + "/", resolve),)
    if "://" in path:
        path = path.split("://", 1)[1]
    elif path.lower().startswith(("file:", "local:")):
        path = path.split(":", 1)[1]
    if path.startswith("localhost/"):
        path = path[len("localhost"):]
    return (canonical_prefix(os.path.abspath(path), resolve),)


def allowed(target: str, prefixes: Sequence[str]) -> bool:
    """Whether a canonical uri lies under one of the canonical ``prefixes`` (on
    path-component boundaries: each prefix ends in ``/``) with no hidden
    component (``.name``) below the prefix."""
    for p in prefixes:
        if target == p.rstrip("/"):
            return True
        if target.startswith(p) and not any(part.startswith(".") for part in target[len(p):].split("/")):
            return True
    return False


def check_uris(prefixes: Sequence[str], uris: Sequence[str | None],
               resolve: Callable[[str], str] = resolve_local) -> list[Verdict]:
    """The verdict on each uri under the allowed ``prefixes`` (normalised here
    with :func:`canonical_prefix`; an empty list allows nothing)."""
    norm = tuple(canonical_prefix(p, resolve) for p in prefixes)
    shown = ", ".join(norm) if norm else "none"
    out = []
    for uri in uris:
        try:
            target = canonical(uri, resolve)
        except _Refused as e:
            out.append(Verdict(None, f"uri {uri!r} refused: {e}"[:300] if uri else "no uri"))
            continue
        if allowed(target, norm):
            out.append(Verdict(target, None))
        else:
            out.append(Verdict(None, f"{OUTSIDE}: {uri!r} (allowed: {shown}; see --allow-uri-prefix)"[:300]))
    return out


#: Redirects followed (each checked against the prefixes) before a read is refused.
MAX_REDIRECTS = 5


def read_target(target: str, prefixes: Sequence[str] = ()) -> bytes:
    """Read an allowed uri's canonical form: a local one by a walk that
    follows no link and reads a regular file only; ``http(s)`` following a
    redirect only to a uri the allowed ``prefixes`` (as given to
    :func:`check_uris`) allow (none: no redirect is followed); other URLs
    through the filesystem layer."""
    if target.startswith(("http://", "https://")):
        return _read_http(target, tuple(canonical_prefix(p) for p in prefixes))
    if "://" in target:
        from . import io as sio

        return sio.read_bytes(target)
    fd = _open_without_links(target)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{target}: not a regular file")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _open_without_links(path: str) -> int:
    """Open absolute ``path`` one component at a time from ``/``, no link
    followed at any step (``openat`` with ``O_NOFOLLOW``): what was checked
    is what is read, even if a directory is swapped for a link meanwhile."""
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or not parts:
        raise ValueError(f"{path}: not an absolute file path")
    cloexec, nofollow = getattr(os, "O_CLOEXEC", 0), getattr(os, "O_NOFOLLOW", 0)
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | cloexec)
    try:
        for part in parts[:-1]:
            try:
                step = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow | cloexec, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ValueError(f"{path}: {part} is not a directory (a link is not followed)") from None
                raise
            os.close(fd)
            fd = step
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | nofollow | cloexec, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{path}: a link (not followed)") from None
            raise
    finally:
        os.close(fd)


def _read_http(url: str, prefixes: Sequence[str]) -> bytes:
    """GET ``url``; a redirect is followed only to a uri the canonical ``prefixes`` allow."""
    import urllib.error
    import urllib.parse
    import urllib.request

    class CheckedRedirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            absolute = urllib.parse.urljoin(req.full_url, newurl)
            try:
                ok = allowed(canonical(absolute), prefixes)
            except _Refused:
                ok = False
            if not ok:
                raise ValueError(f"{url}: redirected ({code}) to {absolute[:200]!r}, outside the allowed prefixes; "
                                 "not followed")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(CheckedRedirects)
    try:
        with opener.open(url, timeout=60) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(url) from None
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
