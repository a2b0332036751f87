"""FP32 vs quantized model on the same volumes: Dice, time, agreement."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .atomic import replacing
from .errors import PTQError
from .pipeline import VolumeSource, check_sources, default_backend, model_spec_for, read_any
from .progress import ProgressCallback, track
from .volume import Volume

LOG = logging.getLogger(__name__)
#: Below this Dice against the reference the reference is probably not this image's mask (wrong file,
#: other structure, or an input the model was not trained on, e.g. an already skull-stripped brain).
SUSPICIOUS_DICE = 0.1


def reference_labels(reference: Volume, labels: Sequence[int], source) -> Volume:
    """A reference mask as an integer label map for a model with ``labels``; notes any assumption.

    Integer maps holding only the model's labels are used as they are. A
    one-label model takes any mask, of any type (0/1 float, 0/255 uint8,
    bool): voxels > 0 become its label, and a warning says so. Anything
    else (a multi-label model given floats or unknown labels) is refused
    with the values found.
    """
    array = np.asarray(reference.array)
    values = np.unique(array)
    wanted = {0, *labels}
    if np.issubdtype(array.dtype, np.integer) and set(values.tolist()) <= wanted:
        return reference
    if len(labels) > 1 and np.all(np.mod(values, 1) == 0) and set(values.astype(np.int64).tolist()) <= wanted:
        LOG.warning("Reference %s holds %s values %s; read as the integer labels %s.", source, array.dtype,
                    _few(values), sorted(labels))
        return reference.with_array(array.astype(np.uint16 if max(wanted) > 255 else np.uint8))
    if len(labels) == 1:
        label = int(labels[0])
        LOG.warning("Reference %s holds %s values %s; taken as a binary mask: voxels > 0 are label %d.",
                    source, array.dtype, _few(values), label)
        return reference.with_array((array > 0).astype(np.uint8) * np.uint8(label))
    raise PTQError(f"Reference {source} holds {array.dtype} values {_few(values)} but the model's labels are "
                   f"{sorted(labels)}: give an integer label map using those values (0 = background).")


def _few(values: np.ndarray, shown: int = 6) -> str:
    items = [f"{v:g}" for v in values[:shown].tolist()]
    return "[" + ", ".join(items) + (f", ... ({values.size} distinct)" if values.size > shown else "") + "]"


def _mean_dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    from .metrics import dice

    return float(np.mean(list(dice(a, b, labels).values())))


def evaluate_models(fp32_model: Path, quantized_model: Path, images: Sequence[VolumeSource],
                    references: Optional[Sequence[VolumeSource]] = None, fp32_runtime: Optional[str] = None,
                    quantized_runtime: str = "openvino", names: Optional[Sequence[str]] = None,
                    progress: Optional[ProgressCallback] = None, spec_file: Optional[Path] = None) -> List[Dict]:
    """One row per image: Dice of each model vs the reference and vs each other, and wall times.

    ``references`` are label maps on the images' grids (same order). Both
    runtimes are created once and reused over the volumes. ``spec_file``
    names the metadata (default: beside ``quantized_model``).
    """
    from .inference import segment_volume
    from .runtimes import create_runtime

    if references is not None and len(references) != len(images):
        raise PTQError(f"Got {len(images)} images but {len(references)} label maps; give one label map per image.")
    # Every input is checked before a model is loaded: a bad mask is said in a second, not after the work.
    check_sources(images, "Image")
    spec = model_spec_for(quantized_model, spec_file)
    labels = sorted(spec.labels)
    if references is not None:
        check_sources(references, "Label map")
        reference_names = [str(source.name if isinstance(source, Volume) else source) for source in references]
        references = [reference_labels(read_any(source), labels, name)
                      for source, name in zip(references, reference_names)]
    fp32_backend = fp32_runtime or default_backend(fp32_model)
    fp32 = create_runtime(Path(fp32_model), fp32_backend, precision="fp32" if fp32_backend == "openvino" else None)
    quantized = create_runtime(Path(quantized_model), quantized_runtime)
    rows = []
    try:
        for runtime in (fp32, quantized):
            _warm_up(runtime, (1, spec.in_channels, *spec.roi_size))
        for index in track(range(len(images)), "evaluate", callback=progress):
            image = read_any(images[index])
            fp32_labels, fp32_times = segment_volume(fp32, image, spec)
            q_labels, q_times = segment_volume(quantized, image, spec)
            row = {
                "volume": (names[index] if names else image.name) or f"volume {index + 1}",
                "fp32": f"{fp32.name} {fp32.precision}",
                "quantized": f"{quantized.name} {quantized.precision}",
                "dice_quantized_vs_fp32": _mean_dice(q_labels.array, fp32_labels.array, labels),
                "time_fp32_s": fp32_times["total_s"],
                "time_quantized_s": q_times["total_s"],
                "timings_fp32": fp32_times,
                "timings_quantized": q_times,
            }
            if references is not None:
                reference = references[index].array
                if reference.shape != image.array.shape:
                    raise PTQError(f"Label map {reference_names[index]} has shape {reference.shape} but its image "
                                   f"has {image.array.shape}; give label maps on the image grid.")
                row["dice_fp32_vs_reference"] = _mean_dice(fp32_labels.array, reference, labels)
                row["dice_quantized_vs_reference"] = _mean_dice(q_labels.array, reference, labels)
                if row["dice_fp32_vs_reference"] < SUSPICIOUS_DICE:
                    LOG.warning("FP32 Dice vs the reference is %.4f on %s: check that the reference is this "
                                "image's mask of the structure the model segments, and that the image is the "
                                "kind the model takes (e.g. not already skull-stripped for brain extraction).",
                                row["dice_fp32_vs_reference"], row["volume"])
            rows.append(row)
    finally:
        fp32.close()
        quantized.close()
    return rows


def _warm_up(runtime, shape, calls: int = 3) -> None:
    """Compile and settle the runtime before anything is timed (TorchScript optimises on its third call)."""
    patch = np.zeros(shape, dtype=np.float32)
    for _ in range(calls):
        runtime.predict(patch)


def format_table(rows: List[Dict], columns: Optional[Sequence[str]] = None) -> str:
    """A markdown table of ``rows`` (floats to 4 digits)."""
    if not rows:
        return "(no rows)"
    # Nested values (per-stage timings) are for JSON readers, not table cells.
    columns = list(columns or [key for key, value in rows[0].items() if not isinstance(value, (dict, list))])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(payload, path: Path) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
