"""What a model needs around it: preprocessing, patch size, label names.

A model travels with a ``<model>.json`` sidecar holding a :class:`ModelSpec`;
MONAI bundle metadata is translated into one when present.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import PTQError

# Slicer's generic anatomy colours, cycled for labels without a colour.
_DEFAULT_COLORS = [
    (0.5, 0.68, 0.5), (0.94, 0.82, 0.67), (0.69, 0.48, 0.4), (0.44, 0.72, 0.82),
    (0.85, 0.4, 0.33), (0.89, 0.82, 0.46), (0.42, 0.46, 0.78), (0.85, 0.65, 0.85),
]


@dataclass
class Intensity:
    """Intensity normalisation applied to the resampled image.

    kinds:
      - ``"quantile"``: clip to the ``low``/``high`` quantiles, scale to
        [0, 1], standardise, then ``* std + mean`` (deepbet's scheme);
      - ``"clip_scale"``: clip to [``a_min``, ``a_max``] (e.g. CT HU) and
        scale to [``b_min``, ``b_max``];
      - ``"zscore"``: (x - mean) / std over ``nonzero`` voxels or all;
      - ``"none"``.
    """

    kind: str = "zscore"
    low: float = 0.005
    high: float = 0.995
    mean: float = 0.0
    std: float = 1.0
    a_min: float = -175.0
    a_max: float = 250.0
    b_min: float = 0.0
    b_max: float = 1.0
    nonzero: bool = False


@dataclass
class ModelSpec:
    """Everything about a network except its weights.

    ``resize`` (whole volume to a fixed grid, as deepbet does) and
    ``spacing`` (resample to mm spacing) are alternatives; with neither the
    native grid is used. ``roi_size`` is the sliding-window patch in voxels
    (D, H, W order of the network input, which is the RAS-reoriented
    array's axis order). ``output`` tells how channels become labels:
    ``"softmax"`` (logits, argmax), ``"probabilities"`` (already softmax,
    argmax), ``"sigmoid"`` (one channel per label, threshold 0.5).
    """

    name: str
    in_channels: int = 1
    out_channels: int = 2
    roi_size: Tuple[int, int, int] = (96, 96, 96)
    labels: Dict[int, str] = field(default_factory=lambda: {1: "foreground"})
    colors: Dict[int, Tuple[float, float, float]] = field(default_factory=dict)
    modality: str = "MR"
    orientation: Optional[str] = "RAS"
    spacing: Optional[Tuple[float, float, float]] = None
    resize: Optional[Tuple[int, int, int]] = None
    resize_mode: str = "nearest"
    intensity: Intensity = field(default_factory=Intensity)
    output: str = "softmax"
    overlap: float = 0.5
    dynamic_spatial: bool = True
    spatial_multiple: int = 16
    description: str = ""

    def color(self, label: int) -> Tuple[float, float, float]:
        """RGB in [0, 1] for ``label``, from the spec or a default palette."""
        if label in self.colors:
            return tuple(self.colors[label])  # type: ignore[return-value]
        return _DEFAULT_COLORS[(label - 1) % len(_DEFAULT_COLORS)]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["labels"] = {str(k): v for k, v in self.labels.items()}
        data["colors"] = {str(k): list(v) for k, v in self.colors.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PTQError(f"Unknown model metadata field(s) {unknown}; known fields are {sorted(known)}.")
        if "intensity" in data and isinstance(data["intensity"], dict):
            data["intensity"] = Intensity(**data["intensity"])
        data["labels"] = {int(k): v for k, v in data.get("labels", {1: "foreground"}).items()}
        data["colors"] = {int(k): tuple(v) for k, v in data.get("colors", {}).items()}
        for key in ("roi_size", "spacing", "resize"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def save(self, path: Path) -> None:
        """Write the spec as JSON, atomically."""
        from .atomic import replacing

        with replacing(Path(path)) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelSpec":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise PTQError(f"Cannot read model metadata {path}: {exc}. "
                           "Fix the JSON or delete it to use defaults.") from exc


def sidecar_path(model_path: Path) -> Path:
    """The spec beside a model: ``out/model.int8.onnx`` -> ``out/model.json``.

    FP32 and INT8 files of one model share it; a bundle folder keeps it
    inside as ``slicer_ptq.json``.
    """
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path / "slicer_ptq.json"
    return model_path.with_name(model_path.name.split(".")[0] + ".json")


def spec_list(values) -> List[int]:
    """Normalise a scalar or sequence to a 3-list of ints (roi arguments)."""
    if isinstance(values, int):
        return [values] * 3
    values = list(values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise PTQError(f"Expected 1 or 3 sizes, got {values}.")
    return [int(v) for v in values]
