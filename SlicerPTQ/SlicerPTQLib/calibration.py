"""Calibration: patches from unlabeled volumes and activation ranges.

``sample_crops`` turns a few preprocessed volumes into network-sized
patches (no labels needed: half the crops are centred on bright tissue
found by an Otsu threshold); ``collect_ranges`` runs the FP32 ONNX model on
them and lets one observer per tensor choose its INT8 clipping bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import onnx_graph
from .errors import PTQError
from .observers import make_observer
from .progress import ProgressCallback, track

# Foreground search looks at a strided subsample of at most this many voxels.
_FOREGROUND_SAMPLE_VOXELS = 1 << 20


def sample_crops(images: Sequence[np.ndarray], roi: Sequence[int], num_crops: int,
                 seed: int, foreground_fraction: float = 0.5) -> List[np.ndarray]:
    """Draw ``num_crops`` float32 patches ``(C, *roi)`` from ``images`` ``(C, D, H, W)``.

    Images are used round-robin. ``foreground_fraction`` of the crops are
    centred on a random voxel brighter than the image's Otsu threshold
    (channel mean), the rest are placed uniformly at random. Images
    smaller than ``roi`` are padded with their minimum. The same ``seed``
    gives the same crops. A patch already drawn (same image, same place:
    always so for an image no larger than ``roi``) is not repeated, so
    fewer than ``num_crops`` may come back.
    """
    if len(images) == 0:
        raise PTQError("No calibration volumes were given; pass --calib with one or more "
                       "unlabeled volumes of the kind the model segments.")
    roi = tuple(int(v) for v in roi)
    if len(roi) != 3 or min(roi) < 1:
        raise PTQError(f"The crop size must be 3 positive ints, got {roi}.")
    if num_crops < 1:
        raise PTQError(f"The number of calibration crops must be at least 1, got {num_crops}.")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise PTQError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}.")
    for index, image in enumerate(images):
        if np.ndim(image) != 4:
            raise PTQError(f"Calibration volume {index} has shape {np.shape(image)}; "
                           "expected (C, D, H, W) after preprocessing.")

    rng = np.random.default_rng(seed)
    centred = np.zeros(num_crops, dtype=bool)
    centred[:int(round(num_crops * foreground_fraction))] = True
    rng.shuffle(centred)

    padded: Dict[int, np.ndarray] = {}
    foreground: Dict[int, np.ndarray] = {}
    drawn = set()
    crops = []
    for k in range(num_crops):
        index = k % len(images)
        if index not in padded:
            padded[index] = _pad_to(np.asarray(images[index]), roi)
        image = padded[index]
        spatial = np.array(image.shape[1:])
        room = spatial - np.array(roi)
        start = None
        if centred[k]:
            if index not in foreground:
                foreground[index] = _foreground_voxels(image)
            voxels = foreground[index]
            if len(voxels):
                centre = voxels[rng.integers(len(voxels))]
                start = np.clip(centre - np.array(roi) // 2, 0, room)
        if start is None:
            start = np.array([rng.integers(r + 1) for r in room])
        if (index, tuple(int(s) for s in start)) in drawn:
            continue  # the same patch again adds nothing but time
        drawn.add((index, tuple(int(s) for s in start)))
        window = tuple(slice(int(s), int(s) + size) for s, size in zip(start, roi))
        crops.append(np.ascontiguousarray(image[(slice(None),) + window], dtype=np.float32))
    return crops


def _pad_to(image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Pad (C, D, H, W) evenly on both sides to at least ``roi``, with its minimum."""
    short = [max(0, size - dim) for size, dim in zip(roi, image.shape[1:])]
    if not any(short):
        return image
    pads = [(0, 0)] + [(s // 2, s - s // 2) for s in short]
    return np.pad(image, pads, mode="constant", constant_values=float(np.min(image)))


def _foreground_voxels(image: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices above the Otsu threshold, on a strided subsample."""
    intensity = image.mean(axis=0) if image.shape[0] > 1 else image[0]
    stride = max(1, int(np.ceil((intensity.size / _FOREGROUND_SAMPLE_VOXELS) ** (1 / 3))))
    sample = intensity[::stride, ::stride, ::stride]
    threshold = otsu_threshold(sample)
    return np.argwhere(sample > threshold) * stride


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The intensity that best splits ``values`` into two classes (Otsu)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def collect_ranges(fp32_onnx: Path, tensor_names: Sequence[str], crops: Sequence[np.ndarray],
                   method: str = "max",
                   progress_callback: Optional[ProgressCallback] = None) -> Dict[str, float]:
    """Clipping bound ``amax`` of each named float tensor of the FP32 model.

    Runs ``fp32_onnx`` in ONNX Runtime (CPU) on every crop ``(C, D, H, W)``
    (batch of one), with the wanted tensors added as graph outputs of an
    in-memory copy; each output is fed to its ``method`` observer and
    dropped before the next crop.
    """
    if len(crops) == 0:
        raise PTQError("No calibration crops to run; pass --calib with one or more volumes.")
    model = onnx_graph.load_model(fp32_onnx)
    input_name = onnx_graph.image_input_name(model)
    observers = {name: make_observer(method) for name in tensor_names}
    fetched = [name for name in observers if name != input_name]
    session = onnx_graph.cpu_session(onnx_graph.with_extra_outputs(model, fetched))
    del model
    for index, crop in enumerate(track(crops, "calibrate", callback=progress_callback)):
        batch = np.asarray(crop, dtype=np.float32)[None]
        try:
            outputs = session.run(fetched, {input_name: batch})
        except Exception as exc:
            raise PTQError(f"The FP32 model {fp32_onnx} failed on calibration crop {index} of "
                           f"shape {batch.shape}: {exc}. Use a crop size the model accepts "
                           "(its fixed input size, or a multiple of its downsampling).") from exc
        if input_name in observers:
            observers[input_name].update(batch)
        for name, output in zip(fetched, outputs):
            try:
                observers[name].update(output)
            except PTQError as exc:
                raise PTQError(f"Tensor {name!r} on calibration crop {index}: {exc}") from exc
        del outputs
    return {name: observer.amax() for name, observer in observers.items()}
