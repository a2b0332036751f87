"""Finished builds, sealed by a manifest of SHA-256s and published whole.

A build folder (FP32 and quantized ONNX, spec, ``quantization.json``) is
complete only when its manifest, written last, lists every file with its
SHA-256 and every listed file still has it. Reuse checks that
(:func:`verify`), like the fetch cache checks its pinned files, so a
corrupted, truncated or half-published build is rebuilt, never served.
A cache build appears with one rename of its finished folder
(:func:`publish_folder`); into a user's folder that may hold other files,
files move one by one with the old manifest gone first and the new one
moved last (:func:`publish_files`), so an interrupted publish is never
taken for complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from .atomic import make_public, owned_prefix, remove_stale
from .errors import PTQError
from .fetch import cache_dir, sha256_of

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.sha256.json"
#: Records kept in the builds root beside the builds: self-checks per machine (:mod:`selfcheck`) and the
#: Slicer module's index of the build each model last used (:mod:`logic`).
SELFCHECKS_DIR = "selfchecks"
LAST_BUILDS_NAME = "slicer-last-builds.json"


def builds_dir() -> Path:
    """Root of the build cache: ``$SLICER_PTQ_BUILDS``, else ``<cache>/builds`` (:func:`fetch.cache_dir`)."""
    env = os.environ.get("SLICER_PTQ_BUILDS")
    return Path(env).expanduser() if env else cache_dir() / "builds"


def build_entries(root: Optional[Path] = None) -> List[Path]:
    """What the builds root holds besides its records: builds, and partials if any were left."""
    root = builds_dir() if root is None else Path(root)
    return sorted(path for path in root.iterdir() if path.name not in (SELFCHECKS_DIR, LAST_BUILDS_NAME))


def seal(folder: Path) -> Path:
    """Write ``folder``'s manifest: every file under it (the manifest aside) with its SHA-256."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): sha256_of(path)
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_NAME}
    manifest = folder / MANIFEST_NAME
    manifest.write_text(json.dumps({"sha256": files}, indent=2))
    return manifest


def verify(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a complete, unchanged build (None: it is one)."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST_NAME).read_text())["sha256"]
        if not isinstance(listed, dict) or not listed:
            raise ValueError("no files listed")
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME} (unfinished, interrupted or made by an older version)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST_NAME} is unreadable ({exc})"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != expected:
            return f"{name} changed since it was built (SHA-256 mismatch)"
    return None


def reusable(folder: Path) -> bool:
    """True when ``folder`` holds a verified build; says in the log why an existing one is not reused."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    reason = verify(folder)
    if reason is not None:
        log.warning("Not reusing the build in %s: %s; it is built again.", folder, reason)
    return reason is None


def publish_folder(staging: Path, destination: Path) -> None:
    """Rename the sealed folder ``staging`` to ``destination`` in one step.

    A verified build already there (a concurrent run made the same one)
    is kept and ``staging`` dropped; a bad one is moved aside and removed.
    """
    staging, destination = Path(staging), Path(destination)
    make_public(staging)
    remove_stale(destination.parent, ".stale-")
    for _ in range(3):  # another run may publish between our check and our rename
        if destination.exists():
            if verify(destination) is None:
                shutil.rmtree(staging, ignore_errors=True)
                return
            aside = Path(tempfile.mkdtemp(prefix=owned_prefix(f".stale-{destination.name}."),
                                          dir=destination.parent))
            try:
                os.replace(destination, aside / destination.name)
            except FileNotFoundError:
                pass
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(staging, destination)
            return
        except OSError as exc:
            if not destination.exists():
                raise PTQError(f"Cannot publish the build in {destination}: {exc}. Check free disk space and "
                               "permissions of the cache folder (SLICER_PTQ_BUILDS).") from exc
    raise PTQError(f"Cannot publish the build in {destination}: other runs keep replacing it. Try again.")


def publish_files(staging: Path, destination: Path) -> Dict[str, Path]:
    """Move the sealed build in ``staging`` into the existing folder ``destination``, manifest last.

    Returns where each manifest entry went. Other files in ``destination`` stay.
    """
    staging, destination = Path(staging), Path(destination)
    names = json.loads((staging / MANIFEST_NAME).read_text())["sha256"]
    moved = {}
    try:
        (destination / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the folder reads as unfinished
        for name in names:
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target)
            moved[name] = target
        os.replace(staging / MANIFEST_NAME, destination / MANIFEST_NAME)
    except OSError as exc:
        raise PTQError(f"Cannot move the finished build into {destination}: {exc}. Check free disk space and "
                       "permissions.") from exc
    return moved
