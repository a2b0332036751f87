"""Write-then-rename, so no reader ever sees a half-written file.

Temporary names carry the writer's process id (``<prefix><pid>-<random>``)
so that the partials a killed writer leaves can be told from live ones and
removed on a later run (:func:`remove_stale`). Finished files get the mode
a plain ``open()`` would give them (0666 less the umask), not the private
0600 of ``mkstemp``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from .errors import PTQError

#: A partial whose owner process is gone is removed once nothing in it changed for this long: the wait
#: covers owners on another machine or in another PID namespace sharing the folder, whose pid means
#: nothing here.
STALE_AFTER_S = 3600.0
#: Without an owner pid to check (names from older versions, or Windows) only a day of quiet will do.
STALE_UNKNOWN_OWNER_S = 86400.0


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, briefly
    os.umask(mask)
    return mask


def make_public(path: Path) -> None:
    """Give ``path`` the mode ``open()`` / ``mkdir()`` would: 0666 (files) or 0777 (folders) less the umask."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def owned_prefix(prefix: str) -> str:
    """``prefix`` followed by this process's id, for a temporary name :func:`remove_stale` can judge."""
    return f"{prefix}{os.getpid()}-"


def staging_folder(parent: Path, label: str = "") -> Path:
    """A new private folder ``parent/.partial-<label><pid>-<random>``; stale ones from killed runs go first."""
    remove_stale(parent, ".partial-")
    return Path(tempfile.mkdtemp(prefix=owned_prefix(f".partial-{label}"), dir=parent))


@contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    ``suffix`` ends the temporary name (libraries such as nibabel choose the
    format from it). On failure the temporary file is removed and an
    ``OSError`` becomes a PTQError naming ``path``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise PTQError(f"Cannot write {path}: folder {path.parent} does not exist. Create it first.")
    if path.is_dir():
        raise PTQError(f"Cannot write {path}: it is a folder. Give a file name.")
    remove_stale(path.parent, f".{path.name}.", suffix)
    try:
        handle, tmp_name = tempfile.mkstemp(prefix=owned_prefix(f".{path.name}."), suffix=suffix, dir=path.parent)
    except OSError as exc:  # read-only location, no permission, full disk
        raise PTQError(f"Cannot write {path}: {exc.strerror or exc}. Check that {path.parent} is writable "
                       "and has free space.") from exc
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        make_public(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        # The user's path, not the temp file's: that name means nothing to them.
        raise PTQError(f"Cannot write {path}: {exc.strerror or exc}. Check free disk space and "
                       "permissions.") from exc
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale(folder: Path, prefix: str, suffix: str = "") -> List[Path]:
    """Remove partials ``<prefix>...<pid>-<random><suffix>`` in ``folder`` that killed writers left.

    One is stale when its owner process is gone and nothing in it changed
    for :data:`STALE_AFTER_S` (a day when the owner cannot be told). Live
    runs, here or on another machine sharing the folder, keep theirs.
    Returns what was removed; a partial that cannot be removed stays.
    """
    owner_pattern = re.compile(r"(\d+)-[a-z0-9_]+" + re.escape(suffix) + "$")
    now = time.time()
    removed = []
    try:
        candidates = [entry for entry in Path(folder).iterdir()
                      if entry.name.startswith(prefix) and entry.name.endswith(suffix)]
    except OSError:
        return removed
    for entry in candidates:
        match = owner_pattern.search(entry.name[len(prefix):])
        owner = int(match.group(1)) if match and os.name != "nt" else None
        if owner is not None and process_alive(owner):
            continue
        quiet = STALE_AFTER_S if owner is not None else STALE_UNKNOWN_OWNER_S
        if now - _newest_change(entry) < quiet:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists here (POSIX; unknown owners count as alive)."""
    try:
        os.kill(pid, 0)  # POSIX only: signal 0 checks existence (on Windows it would terminate)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else; or cannot tell: keep its files
    return True


def _newest_change(entry: Path) -> float:
    """The latest modification time in ``entry`` (a file, or a folder and everything under it)."""
    try:
        newest = entry.lstat().st_mtime
        if entry.is_dir() and not entry.is_symlink():
            for root, dirs, files in os.walk(entry):
                for name in dirs + files:
                    try:
                        newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                    except OSError:
                        pass
        return newest
    except OSError:
        return time.time()
