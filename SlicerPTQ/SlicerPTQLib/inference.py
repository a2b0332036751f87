"""Sliding-window segmentation of a whole volume with any runtime.

Windows come from MONAI's ``sliding_window_inference`` (gaussian blending
of overlapping windows); a volume that fits in one window runs without
MONAI, whose import takes seconds. The network itself runs in the runtime,
on numpy patches.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from . import preprocess
from .errors import PTQError
from .progress import ProgressCallback, track
from .runtimes.base import Runtime
from .spec import OUTPUT_KINDS, ModelSpec, spec_list
from .volume import Volume

STAGE = "segmenting"


def window_count(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding window visits for one image.

    Mirrors MONAI's scan interval (a dimension the roi covers whole is
    scanned once) and its window starts (``dense_patch_slices``) over the
    image padded up to the roi, without importing MONAI.
    """
    count = 1
    for size, length in zip(image_size, roi):
        padded = max(size, length)
        interval = length if length == padded else max(int(length * (1 - overlap)), 1)
        starts = math.ceil((padded - length) / interval) + 1
        # dense_patch_slices clamps the last start to padded - length, which may repeat the one before.
        count *= len({min(start * interval, padded - length) for start in range(starts)})
    return count


def sliding_window(runtime: Runtime, image: np.ndarray, roi, overlap: float = 0.5,
                   batch_size: int = 1, mode: str = "gaussian",
                   progress_callback: Optional[ProgressCallback] = None) -> np.ndarray:
    """Run ``runtime`` over ``image`` (C, D, H, W) float32 -> (K, D, H, W) float32.

    ``roi`` is the window (int or 3 ints); images smaller than it are
    zero-padded and the output cropped back. ``progress_callback(stage,
    done, total)`` is called after every batch of ``batch_size`` windows.
    An image exactly the size of the roi is one ``predict`` call, without
    blending.

    Example: ``sliding_window(rt, np.zeros((1, 160, 160, 160), np.float32),
    96)`` -> ``(K, 160, 160, 160)`` from 27 windows of 96^3.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise PTQError(f"sliding_window takes a (C, D, H, W) image, got shape {image.shape}. "
                       "Add the channel axis with image[None].")
    roi = tuple(spec_list(roi))
    if not 0 <= overlap < 1:
        raise PTQError(f"overlap must be in [0, 1), got {overlap}. 0.5 is the usual choice.")
    if batch_size < 1:
        raise PTQError(f"batch_size must be at least 1, got {batch_size}.")
    total = math.ceil(window_count(image.shape[1:], roi, overlap) / batch_size)
    # track() calls back when asked for its next item: prime it once, then
    # advance it after each batch so the callback follows the batches.
    ticks = track(range(total), STAGE, total, progress_callback)
    next(ticks, None)

    if all(size <= length for size, length in zip(image.shape[1:], roi)):
        # One window: MONAI would pad it centred with zeros, run it once and crop back; blending one window
        # with its own weights is the identity. Done here, so a small volume never pays MONAI's import.
        output = runtime.predict(_pad_centred(image, roi)[None])[0]
        next(ticks, None)
        low = [(length - size) // 2 for size, length in zip(image.shape[1:], roi)]
        return output[(slice(None), *(slice(start, start + size) for start, size in zip(low, image.shape[1:])))]

    import torch

    sliding_window_inference = load_blending()

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        # The window is a strided view of the image: one copy makes it contiguous.
        output = runtime.predict(np.ascontiguousarray(windows.numpy()))
        next(ticks, None)
        return torch.from_numpy(output)

    with torch.inference_mode():
        output = sliding_window_inference(torch.from_numpy(image[None]), roi, batch_size, predictor,
                                          overlap=overlap, mode=mode)
    return output[0].numpy()


def _pad_centred(image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """``image`` (C, D, H, W) zero-padded up to ``roi``, half the padding before (as MONAI pads)."""
    pads = [(0, 0)] + [((length - size) // 2, length - size - (length - size) // 2)
                       for size, length in zip(image.shape[1:], roi)]
    return np.pad(image, pads) if any(sum(pad) for pad in pads) else image


def load_blending():
    """MONAI's window blending (``sliding_window_inference``), imported on first use.

    Importing MONAI takes seconds; callers that time volumes call this
    first so the import does not land in the first measured volume.
    """
    from monai.inferers import sliding_window_inference

    return sliding_window_inference


def to_labels(output: np.ndarray, spec_output: str, threshold: float = 0.0,
              direction: str = "above") -> np.ndarray:
    """Network output (K, D, H, W) -> label map (D, H, W), uint8 (uint16 past 255 labels).

    ``"softmax"`` (logits) and ``"probabilities"``: argmax over channels.
    ``"sigmoid"`` (logits, one channel per label): voxels whose
    sigmoid(x) > 0.5, i.e. x > 0, get label channel + 1; a later channel
    wins where they overlap. ``"threshold"``: as sigmoid, where the value
    is above (or, ``direction="below"``, below) ``threshold``, e.g. a
    signed distance below 1.0 mm. ``"regression"`` maps are labelled the
    same way where labels are needed (the self-check's agreement).
    """
    if output.ndim != 4:
        raise PTQError(f"to_labels takes a (K, D, H, W) output, got shape {output.shape}.")
    channels = output.shape[0]
    if spec_output in ("softmax", "probabilities"):
        # A running maximum equals argmax (ties keep the first channel) but
        # skips argmax's int64 index array, which dominated on big volumes.
        labels = np.zeros(output.shape[1:], dtype=_label_dtype(channels - 1))
        best = output[0].copy()
        better = np.empty(output.shape[1:], dtype=bool)
        for channel in range(1, channels):
            np.greater(output[channel], best, out=better)
            _set_where(labels, better, channel)
            np.maximum(best, output[channel], out=best)
        return labels
    if spec_output in ("sigmoid", "threshold", "regression"):
        if spec_output == "sigmoid":
            threshold, direction = 0.0, "above"
        compare = np.greater if direction == "above" else np.less
        labels = np.zeros(output.shape[1:], dtype=_label_dtype(channels))
        positive = np.empty(output.shape[1:], dtype=bool)
        for channel in range(channels):
            _set_where(labels, compare(output[channel], threshold, out=positive), channel + 1)
        return labels
    raise PTQError(f"Unknown model output kind '{spec_output}'. Set 'output' in the model's JSON "
                   f"to one of: {', '.join(OUTPUT_KINDS)}.")


def _set_where(labels: np.ndarray, mask: np.ndarray, label: int) -> None:
    """``labels[mask] = label`` without branching: masked writes (boolean
    indexing, ``copyto(where=)``) ran about 5x slower on a 128^3 map."""
    flags = mask.view(np.uint8)
    labels -= labels * flags
    labels += flags * labels.dtype.type(label)


def _label_dtype(max_label: int):
    return np.uint8 if max_label <= np.iinfo(np.uint8).max else np.uint16


def segment_volume(runtime: Runtime, volume: Volume, spec: ModelSpec, batch_size: int = 1,
                   progress_callback: Optional[ProgressCallback] = None
                   ) -> Tuple[Volume, Dict[str, float]]:
    """Segment ``volume``: preprocess, sliding window, labels back on the input grid.

    Returns the label volume (same shape and affine as ``volume``) and the
    seconds spent: ``preprocess_s``, ``network_s`` (windows and blending),
    ``restore_s`` (labels, post-processing and resampling back), ``total_s``
    (their sum), and ``import_s``, the one-off import of MONAI's blending, kept
    out of the others. A ``"regression"`` model gives its float map instead,
    resampled trilinearly onto the input grid.
    """
    start = time.perf_counter()
    image, grid = preprocess.prepare(volume, spec)
    if image.shape[0] != spec.in_channels:
        raise PTQError(f"Preprocessing gave {image.shape[0]} channels but model '{spec.name}' takes "
                       f"{spec.in_channels}. Fix 'in_channels' in the model's JSON.")
    prepared = time.perf_counter()
    if window_count(image.shape[1:], spec_list(spec.roi_size), spec.overlap) > 1:
        load_blending()  # MONAI's first import takes seconds: not network time
    started = time.perf_counter()
    output = sliding_window(runtime, image, spec.roi_size, overlap=spec.overlap,
                            batch_size=batch_size, progress_callback=progress_callback)
    if output.shape[0] != spec.out_channels:
        raise PTQError(f"Model '{spec.name}' gave {output.shape[0]} output channels but its JSON says "
                       f"{spec.out_channels}. Fix 'out_channels' in the model's JSON.")
    segmented = time.perf_counter()
    if spec.output == "regression":
        restored_map = preprocess.restore_probabilities(output, grid)[0]
        labels = Volume(array=restored_map.astype(np.float32), affine=grid.input_affine.copy(), name=grid.name)
    else:
        from .postprocess import apply_steps

        network_labels = to_labels(output, spec.output, spec.threshold, spec.threshold_direction)
        network_labels = apply_steps(network_labels, spec.postprocess, preprocess.voxel_spacing(grid))
        labels = preprocess.restore(network_labels, grid)
    restored = time.perf_counter()
    imported = started - prepared
    timings = {"preprocess_s": prepared - start, "network_s": segmented - started,
               "restore_s": restored - segmented, "total_s": restored - start - imported, "import_s": imported}
    return labels, timings
