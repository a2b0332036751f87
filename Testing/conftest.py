"""Shared fixtures: the shipped model and real volumes, fetched once per session.

Each fixture skips (never fakes) when its files cannot be fetched, e.g.
without access to PyPI, or without apt for the Debian-only volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pytest

from SlicerPTQLib import shipped
from SlicerPTQLib.errors import PTQError


@pytest.fixture(scope="session")
def shipped_model_path() -> Path:
    """deepbet's bbox_model.pt (TorchScript) with its ModelSpec sidecar beside it."""
    try:
        return shipped.shipped_model()
    except PTQError as exc:
        pytest.skip(f"shipped model unavailable: {exc}")


@pytest.fixture(scope="session")
def calibration_paths() -> List[Path]:
    """Unlabeled real MR volumes for calibration (PyPI ones first)."""
    try:
        return shipped.calibration_volumes()
    except PTQError as exc:
        pytest.skip(f"calibration volumes unavailable: {exc}")


@pytest.fixture(scope="session")
def evaluation_cases() -> List[Tuple[str, Path, Path]]:
    """``(name, image, reference)`` triples; read the reference with ``shipped.reference_mask``."""
    try:
        return shipped.evaluation_volumes()
    except PTQError as exc:
        pytest.skip(f"evaluation volumes unavailable: {exc}")
