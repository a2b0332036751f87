"""Shared fixtures: the shipped model and real volumes, fetched once per session.

Each fixture skips (never fakes) when its files cannot be fetched, e.g.
without access to PyPI, or without apt for the Debian-only volumes.
Builds go to a temporary folder for the session, never to the user's
build cache; fetched files (pinned by SHA-256) stay in the shared cache.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from SlicerPTQLib import shipped
from SlicerPTQLib.errors import PTQError


@pytest.fixture(scope="session", autouse=True)
def temporary_builds_cache(tmp_path_factory) -> Iterator[Path]:
    """``SLICER_PTQ_BUILDS`` at a temporary folder for the whole session (workers inherit it)."""
    folder = tmp_path_factory.mktemp("builds")
    previous = os.environ.get("SLICER_PTQ_BUILDS")
    os.environ["SLICER_PTQ_BUILDS"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SLICER_PTQ_BUILDS", None)
    else:
        os.environ["SLICER_PTQ_BUILDS"] = previous


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


@contextmanager
def _wired_scene() -> Iterator[object]:
    """A vtkMRMLScene wired like the Slicer application does it (slicer-core wheel)."""
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
    mrml_scene = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerSubjectHierarchyModuleLogic()]
    for logic in logics:
        logic.SetMRMLScene(mrml_scene)  # without it segmentations cannot build a binary labelmap
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = mrml_scene  # slicer.util helpers look here
    try:
        yield mrml_scene
    finally:
        for logic in logics:
            logic.SetMRMLScene(None)
        slicer.mrmlScene = previous


@pytest.fixture
def mrml_scene():
    """A fresh wired MRML scene per test."""
    with _wired_scene() as scene:
        yield scene


@pytest.fixture(scope="module")
def module_mrml_scene():
    """One wired MRML scene shared by a test module."""
    with _wired_scene() as scene:
        yield scene
