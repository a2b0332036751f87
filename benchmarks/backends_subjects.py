"""The models the backend benchmark measures, with their volumes and reference labels.

``shipped`` is deepbet's brain extraction on the shipped volumes, each with
its reference brain mask. A registry architecture is its small 6-class
version that ``train_small_models.py`` trained (weights from the cache):
calibrated on MNI152 2009a + MNI152 + the ITK T1, evaluated on the ITK T1
(its k-means labels are the training reference) and Colin27 (Dice vs FP32
only).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
SHIPPED = "shipped"
#: The registry models' volumes (shipped.CATALOG names), as bench_architectures.py uses them.
REGISTRY_CALIBRATION = ("mni2009a", "mni152", "itk_t1")
REGISTRY_EVALUATION = ("itk_t1", "colin27")


@dataclass
class Subject:
    """One model to benchmark, with its volumes.

    ``path`` is a TorchScript file, or a state dict built as ``arch`` with
    ``arch_args``. ``cases`` are ``(volume, image, reference file or None)``;
    ``reference`` reads a reference file into labels. ``folder`` (under the
    results folder's ``models/`` and ``slices/``) keeps models apart; the
    shipped model's is "". ``info`` goes into the JSON section as is.
    """

    name: str
    path: Path
    calibration: List[Path]
    cases: List[Tuple[str, Path, Optional[Path]]]
    reference: Callable[[Path], np.ndarray]
    folder: str = ""
    arch: Optional[str] = None
    arch_args: Optional[Dict] = None
    info: Dict = field(default_factory=dict)


def brain_mask(path: Path) -> np.ndarray:
    """The shipped model's reference: a brain mask, or a brain-extracted image, as 0/1 labels."""
    from SlicerPTQLib.shipped import reference_mask

    return reference_mask(path).array


def tissue_labels(path: Path) -> np.ndarray:
    """The registry models' reference: the ITK T1's k-means classes 1..6 as labels 0..5.

    Mapped as the training maps them (``train_small_models.tissue_classes``),
    but on the volume's own grid, where the benchmark compares label maps.
    """
    from SlicerPTQLib.volumes import read_volume

    return _sibling_scripts()[1].tissue_classes(read_volume(path).array).astype(np.uint8)


def _sibling_scripts():
    """``bench_architectures`` and ``train_small_models`` from this folder, imported when first needed."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import bench_architectures
    import train_small_models

    return bench_architectures, train_small_models


def shipped_subject(max_volumes: Optional[int] = None) -> Subject:
    """deepbet's brain extraction on the shipped volumes, each with its reference brain mask."""
    from SlicerPTQLib import shipped

    return Subject("deepbet brain extraction (LinkNet3d, shipped)", shipped.shipped_model(),
                   shipped.calibration_volumes(), shipped.evaluation_volumes()[:max_volumes], brain_mask)


def write_arch_model(path: Path, module, spec) -> Path:
    """``module``'s state dict at ``path`` and ``spec`` beside it: what ``load_model(path, arch=...)`` reads."""
    import torch

    from SlicerPTQLib.spec import sidecar_path

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    spec.save(sidecar_path(path))
    return path


def registry_subject(name: str, out: Path, max_volumes: Optional[int] = None) -> Subject:
    """The small 6-class ``name`` trained by train_small_models.py, written to ``out/models/<name>/``.

    Raises PTQError when its trained weights are not in the cache.
    """
    from SlicerPTQLib import architectures, shipped
    from SlicerPTQLib.errors import PTQError
    from SlicerPTQLib.fetch import cache_dir, fetch
    from SlicerPTQLib.spec import ModelSpec

    bench_architectures, training = _sibling_scripts()
    entry = architectures.get(name)
    record = bench_architectures.cached_record(entry.name, None)
    if record is None:
        raise PTQError(f"no trained weights of {entry.name} in {cache_dir() / 'trained'}; train them with "
                       f"python benchmarks/train_small_models.py --arch {entry.name}")
    path = write_arch_model(out / "models" / entry.name / f"{entry.name}.pt", training.load_trained(record),
                            ModelSpec.from_dict(record["spec"]))
    images = {volume.name: volume.image for volume in shipped.CATALOG}
    references = {"itk_t1": training.LABELS}  # the labels it was trained on; Colin27 has none
    cases = [(volume, fetch(images[volume]), fetch(references[volume]) if volume in references else None)
             for volume in REGISTRY_EVALUATION]
    info = {"arch": entry.name, "arch_args": record["arch_args"],
            "weights": {key: record.get(key) for key in ("weights", "steps", "seconds", "train_mean_dice")},
            "reference": "itk_t1: its k-means labels (the training volume); colin27: none, Dice vs FP32 only"}
    return Subject(f"{entry.name} (small, 6 tissue classes, trained {record['steps']} steps)", path,
                   [fetch(images[volume]) for volume in REGISTRY_CALIBRATION], cases[:max_volumes], tissue_labels,
                   folder=entry.name, arch=entry.name, arch_args=record["arch_args"], info=info)
