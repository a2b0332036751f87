"""FP32 vs quantized model on the same volumes: Dice, time, agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .atomic import replacing
from .errors import PTQError
from .pipeline import VolumeSource, default_backend, model_spec_for, read_any
from .progress import ProgressCallback, track


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
    from .inference import load_blending, segment_volume
    from .runtimes import create_runtime

    if references is not None and len(references) != len(images):
        raise PTQError(f"Got {len(images)} images but {len(references)} label maps; give one label map per image.")
    spec = model_spec_for(quantized_model, spec_file)
    labels = sorted(spec.labels)
    fp32_backend = fp32_runtime or default_backend(fp32_model)
    fp32 = create_runtime(Path(fp32_model), fp32_backend, precision="fp32" if fp32_backend == "openvino" else None)
    quantized = create_runtime(Path(quantized_model), quantized_runtime)
    rows = []
    try:
        for runtime in (fp32, quantized):
            _warm_up(runtime, (1, spec.in_channels, *spec.roi_size))
        load_blending()  # MONAI's import (seconds) is not part of the first timed volume
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
            }
            if references is not None:
                reference = read_any(references[index]).array
                if reference.shape != image.array.shape:
                    raise PTQError(f"Label map {references[index]} has shape {reference.shape} but its image has "
                                   f"{image.array.shape}; give label maps on the image grid.")
                row["dice_fp32_vs_reference"] = _mean_dice(fp32_labels.array, reference, labels)
                row["dice_quantized_vs_reference"] = _mean_dice(q_labels.array, reference, labels)
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
    columns = list(columns or rows[0].keys())
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
