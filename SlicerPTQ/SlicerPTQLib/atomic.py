"""Write-then-rename, so no reader ever sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import PTQError


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
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise PTQError(f"Cannot write {path}: {exc}. Check free disk space and permissions.") from exc
    finally:
        tmp.unlink(missing_ok=True)
