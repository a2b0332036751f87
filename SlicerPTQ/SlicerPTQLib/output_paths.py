"""Checks that an output location can be written, made before the work that fills it.

A segmentation or an evaluation runs for minutes; a missing folder, a
read-only location or a file where a folder should be is said at once,
not after the work is done.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import PTQError


def _existing_ancestor(path: Path) -> Path:
    """``path``'s nearest ancestor that exists (``path``'s own parent first)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_writable_folder(folder: Path, option: str, target: Path) -> None:
    if not folder.is_dir():
        raise PTQError(f"Cannot write {option} {target}: {folder} is a file, not a folder. Choose another path.")
    # A real file, not os.access: that says yes to root on a read-only mount.
    try:
        handle, probe = tempfile.mkstemp(prefix=".slicer-ptq-probe-", dir=folder)
    except OSError as exc:
        raise PTQError(f"Cannot write {option} {target}: folder {folder} is not writable ({exc.strerror}). "
                       "Choose a folder you can write to.") from exc
    os.close(handle)
    os.unlink(probe)


def check_output_file(path: Path, option: str = "--out", create_parents: bool = False) -> Path:
    """Refuse an output file path that cannot be written: a folder, a missing or read-only parent.

    With ``create_parents`` the parent may be missing as long as the
    nearest existing ancestor is a writable folder (the writer creates it).
    """
    path = Path(path)
    if path.is_dir():
        raise PTQError(f"{option} {path} is a folder; give a file name (e.g. {path / 'result.json'}).")
    parent = path.parent
    if not parent.exists():
        if not create_parents:
            raise PTQError(f"Cannot write {option} {path}: folder {parent} does not exist. Create it first.")
        parent = _existing_ancestor(path)
    _check_writable_folder(parent, option, path)
    return path


def check_output_folder(path: Path, option: str = "--out") -> Path:
    """Refuse an output folder that is a file or cannot be created or written."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise PTQError(f"{option} {path} is a file. Give a folder path (it is created if missing).")
        _check_writable_folder(path, option, path)
    else:
        _check_writable_folder(_existing_ancestor(path), option, path)
    return path
