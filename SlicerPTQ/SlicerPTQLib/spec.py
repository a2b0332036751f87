"""What a model needs around it: preprocessing, patch size, label names.

A model travels with a JSON sidecar holding a :class:`ModelSpec`
(:func:`find_sidecar` says where it is looked for), or the user names one
with ``--spec``; MONAI bundle metadata is translated into one when present.
Every field is described in docs/model-metadata.md; :meth:`ModelSpec.load`
checks a file against the shipped JSON Schema (:mod:`schema`) and the
rules between fields before any work starts.
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
      - ``"quantile_scale"``: scale the ``low``/``high`` quantiles to
        [``b_min``, ``b_max``] and clip there (a common MRI rule);
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
    argmax), ``"sigmoid"`` (one channel per label, threshold 0.5),
    ``"threshold"`` (one channel per label, label where the value is
    ``threshold_direction`` ``threshold``: a signed distance is
    ``"below"`` 1.0), ``"regression"`` (one channel written as a float
    volume). ``intensity_by_modality`` holds other preprocessing per input
    modality (:meth:`for_modality`); ``postprocess`` lists named label
    steps (:mod:`postprocess`); ``expected`` holds the intensity range and
    field of view the plausibility check (:mod:`plausibility`) compares with.
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
    threshold: float = 0.0
    threshold_direction: str = "above"
    intensity_by_modality: Dict[str, Intensity] = field(default_factory=dict)
    postprocess: List[Dict] = field(default_factory=list)
    expected: Dict[str, List[float]] = field(default_factory=dict)
    overlap: float = 0.5
    dynamic_spatial: bool = True
    spatial_multiple: int = 16
    description: str = ""

    def color(self, label: int) -> Tuple[float, float, float]:
        """RGB in [0, 1] for ``label``, from the spec or a default palette."""
        if label in self.colors:
            return tuple(self.colors[label])  # type: ignore[return-value]
        return _DEFAULT_COLORS[(label - 1) % len(_DEFAULT_COLORS)]

    def check(self, where: str = "the model metadata") -> None:
        """Refuse combinations of fields no segmentation can follow (PTQError naming ``where``)."""
        fix = f"fix {where}"
        if self.output not in OUTPUT_KINDS:
            raise PTQError(f"Output kind {self.output!r} in {where} is unknown; use one of {', '.join(OUTPUT_KINDS)}.")
        if self.output in ("softmax", "probabilities") and self.out_channels == 1:
            raise PTQError(f"Model {self.name} has one output channel with output {self.output!r}, which labels "
                           f"nothing (argmax of one channel); one channel: use sigmoid or threshold ({fix}).")
        if self.output == "regression" and self.out_channels != 1:
            raise PTQError(f"Model {self.name} has output 'regression' with {self.out_channels} channels; a "
                           f"regression map is one channel written as a float volume ({fix}).")
        if self.output == "regression" and self.postprocess:
            raise PTQError(f"Model {self.name} has post-processing steps on a regression map; the steps work "
                           f"on labels only ({fix}).")
        for name, intensity in [("intensity", self.intensity)] + [
                (f"intensity_by_modality.{key}", value) for key, value in self.intensity_by_modality.items()]:
            if intensity.kind in ("quantile", "quantile_scale") and not intensity.low < intensity.high:
                raise PTQError(f"Field '{name}' in {where} has low={intensity.low} >= high={intensity.high}; "
                               f"the low quantile must be below the high one ({fix}).")
            if intensity.kind == "clip_scale" and not intensity.a_min < intensity.a_max:
                raise PTQError(f"Field '{name}' in {where} has a_min={intensity.a_min} >= "
                               f"a_max={intensity.a_max} ({fix}).")
        if self.resize is None and self.dynamic_spatial and any(size % self.spatial_multiple for size in self.roi_size):
            raise PTQError(f"roi_size {list(self.roi_size)} in {where} is not a multiple of spatial_multiple "
                           f"{self.spatial_multiple}, so the network cannot take it ({fix}).")
        expected_range = self.expected.get("intensity_range")
        if expected_range is not None and not expected_range[0] < expected_range[1]:
            raise PTQError(f"Field 'expected.intensity_range' in {where} must be [low, high] with low < high ({fix}).")

    def label_rule(self) -> Tuple[str, float, str]:
        """``(output, threshold, threshold_direction)``: how :func:`inference.to_labels` labels outputs."""
        return self.output, self.threshold, self.threshold_direction

    def for_modality(self, modality: Optional[str]) -> "ModelSpec":
        """This spec with the preprocessing for input ``modality`` (None or the spec's own: unchanged)."""
        if modality is None or modality == self.modality:
            return self
        if modality not in self.intensity_by_modality:
            offered = sorted({self.modality, *self.intensity_by_modality})
            raise PTQError(f"Model {self.name} has no preprocessing for modality {modality!r}; it offers "
                           f"{', '.join(offered)} (add one under 'intensity_by_modality' in its metadata).")
        # The spec's own preprocessing stays on offer, so the result can switch back.
        others = {**self.intensity_by_modality, self.modality: self.intensity}
        others.pop(modality)
        return dataclasses.replace(self, modality=modality, intensity=self.intensity_by_modality[modality],
                                   intensity_by_modality=others)

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
        data["intensity_by_modality"] = {str(k): v if isinstance(v, Intensity) else Intensity(**v)
                                         for k, v in data.get("intensity_by_modality", {}).items()}
        data["labels"] = {int(k): v for k, v in data.get("labels", {1: "foreground"}).items()}
        data["colors"] = {int(k): tuple(v) for k, v in data.get("colors", {}).items()}
        data["postprocess"] = [dict(step) for step in data.get("postprocess", [])]
        data["expected"] = {str(k): [float(x) for x in v] for k, v in data.get("expected", {}).items()}
        for key in ("roi_size", "resize"):
            if data.get(key) is not None:
                data[key] = tuple(int(v) for v in data[key])
        if data.get("spacing") is not None:
            data["spacing"] = tuple(float(v) for v in data["spacing"])
        return cls(**data)

    def save(self, path: Path) -> None:
        """Write the spec as JSON, atomically."""
        from .atomic import replacing

        with replacing(Path(path)) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelSpec":
        """Read, check against the schema and the rules between fields, and build the spec."""
        from .schema import check_spec_data

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PTQError(f"Cannot read model metadata {path}: {exc}. Fix the JSON "
                           "(docs/model-metadata.md describes the fields).") from exc
        check_spec_data(data, str(path))
        spec = cls.from_dict(data)
        spec.check(str(path))
        return spec


#: How network outputs become a label map (or a float volume).
OUTPUT_KINDS = ("softmax", "probabilities", "sigmoid", "threshold", "regression")


def sidecar_path(model_path: Path) -> Path:
    """Where quantize writes the spec: ``out/model.int8.onnx`` -> ``out/model.json``.

    FP32 and INT8 files of one model share it; a bundle folder keeps it
    inside as ``slicer_ptq.json``.
    """
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path / "slicer_ptq.json"
    return model_path.with_name(model_path.name.split(".")[0] + ".json")


def sidecar_candidates(model_path: Path) -> List[Path]:
    """Where a model's spec is looked for, most specific first.

    ``net.torchscript.pt`` -> ``net.torchscript.json``, then ``net.json``:
    the full stem lets two formats of one network carry their own
    metadata, the shared name keeps quantize's output (``model.int8.onnx``
    beside ``model.json``) and older layouts working.
    """
    model_path = Path(model_path)
    if model_path.is_dir():
        return [sidecar_path(model_path)]
    full = model_path.with_name(model_path.stem + ".json")
    shared = sidecar_path(model_path)
    return [full] if full == shared else [full, shared]


def find_sidecar(model_path: Path) -> Optional[Path]:
    """The first existing :func:`sidecar_candidates` file, else None."""
    return next((path for path in sidecar_candidates(model_path) if path.is_file()), None)


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
