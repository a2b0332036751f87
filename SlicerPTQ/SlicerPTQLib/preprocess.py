"""From a volume to the network input and back, as a ModelSpec says.

Forward (:func:`prepare`): reorient to ``spec.orientation`` (axis
permutation and flips only, like nibabel's ``as_closest_canonical``), then
resize to ``spec.resize`` or resample to ``spec.spacing``, then normalise
intensities. Backward (:func:`restore`): labels on the network grid go back
to the input's own grid and affine, so they overlay the input exactly.

Index mappings follow torch's ``F.interpolate`` (``nearest-exact``,
``nearest``, ``trilinear`` with ``align_corners=False``) so a model trained
with torch resizing sees the same voxels; numpy only, no torch needed.
The network grid may be smaller than ``spec.roi_size``: padding it is the
sliding-window caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .errors import PTQError
from .spec import Intensity, ModelSpec
from .volume import Volume

RESIZE_MODES = ("nearest-exact", "nearest", "trilinear")


@dataclass
class Grid:
    """How a volume was mapped to the network grid, to map results back.

    ``start_ornt``/``target_ornt`` are nibabel orientation arrays of the
    input and of the network axes; ``oriented_shape`` is the input's shape
    after reorientation; ``network_shape`` the (D, H, W) the network sees;
    ``network_affine`` maps network voxel indices to RAS mm (voxel centres,
    half-voxel convention of ``align_corners=False``).
    """

    input_shape: Tuple[int, int, int]
    input_affine: np.ndarray
    start_ornt: np.ndarray
    target_ornt: np.ndarray
    oriented_shape: Tuple[int, int, int]
    network_shape: Tuple[int, int, int]
    network_affine: np.ndarray
    name: str = ""


def plan_grid(volume: Volume, spec: ModelSpec) -> Grid:
    """The network grid ``volume`` maps to under ``spec`` (geometry only)."""
    import nibabel as nib

    shape = tuple(int(size) for size in volume.array.shape)
    if len(shape) != 3:
        raise PTQError(f"Volume {volume.name or ''} has shape {shape}; a 3D volume is needed.")
    affine = np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise PTQError(f"Volume {volume.name or ''} has an invalid affine (singular or not finite); "
                       "fix the image header (spacing/directions) and retry.")
    start = nib.orientations.io_orientation(affine)
    target = _target_ornt(spec, start)
    transform = nib.orientations.ornt_transform(start, target)
    oriented_shape = _oriented_shape(shape, transform)
    oriented_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    network_shape = _network_shape(oriented_shape, oriented_affine, spec)
    scale = np.array(oriented_shape, dtype=np.float64) / np.array(network_shape, dtype=np.float64)
    # Network voxel n sits at oriented index (n + 0.5) * scale - 0.5.
    to_oriented = np.eye(4)
    to_oriented[:3, :3] = np.diag(scale)
    to_oriented[:3, 3] = (scale - 1.0) / 2.0
    return Grid(input_shape=shape, input_affine=affine, start_ornt=start, target_ornt=target,
                oriented_shape=oriented_shape, network_shape=network_shape,
                network_affine=oriented_affine @ to_oriented, name=volume.name)


def prepare(volume: Volume, spec: ModelSpec) -> Tuple[np.ndarray, Grid]:
    """Network input for ``volume``: float32 (C=1, D, H, W), and its :class:`Grid`.

    Images are resized with ``spec.resize_mode`` (``resize``) or trilinearly
    (``spacing``), then normalised by ``spec.intensity``.
    """
    if spec.in_channels != 1:
        raise PTQError(f"Model {spec.name} expects {spec.in_channels} input channels; SlicerPTQ feeds "
                       "one volume (one channel). Use a single-channel model.")
    grid = plan_grid(volume, spec)
    mode = spec.resize_mode if spec.resize is not None else "trilinear"
    # Nearest modes keep the dtype: the (usually much smaller) network grid
    # is converted, and integer images are normalised through a lookup table.
    network = to_network_grid(np.asarray(volume.array), grid, mode)
    if np.issubdtype(network.dtype, np.floating):
        network = np.nan_to_num(network.astype(np.float32, copy=False), copy=False)
    network = normalize_intensity(network, spec.intensity, volume.name)
    return np.ascontiguousarray(network[None], dtype=np.float32), grid


def to_network_grid(array: np.ndarray, grid: Grid, mode: str = "nearest-exact") -> np.ndarray:
    """An (I, J, K) array on the input grid, reoriented and resized to ``grid.network_shape``."""
    import nibabel as nib

    transform = nib.orientations.ornt_transform(grid.start_ornt, grid.target_ornt)
    oriented = nib.orientations.apply_orientation(np.asarray(array), transform)
    return resize(oriented, grid.network_shape, mode)


def restore(labels: np.ndarray, grid: Grid, name: str = "") -> Volume:
    """Labels (D, H, W) on the network grid -> Volume on the input grid and affine.

    Nearest-exact resizing back (as deepbet does), then the inverse
    reorientation; the result overlays the input voxel for voxel.
    """
    labels = np.asarray(labels)
    if labels.shape != tuple(grid.network_shape):
        raise PTQError(f"Labels of shape {labels.shape} do not match the network grid {grid.network_shape}; "
                       "crop the sliding-window padding off before restoring.")
    return Volume(array=_to_input_grid(resize(labels, grid.oriented_shape, "nearest-exact"), grid),
                  affine=grid.input_affine.copy(), name=name or grid.name)


def restore_probabilities(probabilities: np.ndarray, grid: Grid) -> np.ndarray:
    """Channels (K, D, H, W) on the network grid -> (K, I, J, K) on the input grid.

    Trilinear back to the input grid (smoother than nearest when the
    network grid is coarser); argmax or threshold afterwards.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.shape[1:] != tuple(grid.network_shape):
        raise PTQError(f"Probabilities of shape {probabilities.shape} do not match the network grid "
                       f"{grid.network_shape}; crop the sliding-window padding off first.")
    return np.stack([_to_input_grid(resize(channel, grid.oriented_shape, "trilinear"), grid)
                     for channel in probabilities])


def network_volume(array: np.ndarray, grid: Grid, name: Optional[str] = None) -> Volume:
    """A (D, H, W) network-grid array as a Volume placed in RAS (for inspection)."""
    return Volume(array=np.asarray(array), affine=grid.network_affine.copy(), name=name or grid.name)


def normalize_intensity(image: np.ndarray, intensity: Intensity, name: str = "") -> np.ndarray:
    """``image`` normalised as ``intensity`` says (float32, same shape)."""
    kind = intensity.kind
    if kind == "quantile":
        return _quantile_normalize(image, intensity, name)
    if kind == "quantile_scale":
        return _quantile_scale(image, intensity, name)
    image = np.asarray(image, dtype=np.float32)
    if kind == "none":
        return image
    if kind == "clip_scale":
        if not intensity.a_max > intensity.a_min:
            raise PTQError(f"Intensity window a_min={intensity.a_min} >= a_max={intensity.a_max} in the "
                           "model metadata; fix the sidecar JSON.")
        scaled = (np.clip(image, intensity.a_min, intensity.a_max) - intensity.a_min) \
            / (intensity.a_max - intensity.a_min)
        return (scaled * (intensity.b_max - intensity.b_min) + intensity.b_min).astype(np.float32)
    if kind == "zscore":
        # MONAI NormalizeIntensity: population std; with ``nonzero`` only non-zero voxels change.
        selected = image != 0 if intensity.nonzero else np.ones(image.shape, dtype=bool)
        if not selected.any():
            return image
        values = image[selected]
        std = values.std() or 1.0
        out = image.copy()
        out[selected] = (values - values.mean()) / std
        return out
    raise PTQError(f"Unknown intensity kind {kind!r} in the model metadata; use quantile, "
                   "quantile_scale, clip_scale, zscore or none.")


def _quantile_normalize(image: np.ndarray, intensity: Intensity, name: str) -> np.ndarray:
    """deepbet's utils.normalize: quantiles of the (resized) image, clamp to [0, 1],
    standardise with the unbiased std (torch's default), map to the training mean/std.

    Scanner images are mostly integer-valued: then a histogram gives the
    quantiles, mean and std exactly, and the map is applied as a lookup table
    over the image's values, which is several times faster than sorting and
    per-voxel arithmetic. Each value maps to the same float32 either way.
    """
    levels = _integer_levels(image)
    qs = (intensity.low, intensity.high)
    if levels is None:
        values = np.asarray(image, dtype=np.float32)
        low, high = np.quantile(values, qs)
        return _quantile_map(values, None, low, high, intensity, name)
    offset, codes = levels
    counts = np.bincount(codes.ravel(order="K"))
    low, high = _histogram_quantiles(counts, offset, qs)
    table = _quantile_map(np.arange(offset, offset + counts.size, dtype=np.float32), counts, low, high,
                          intensity, name)
    return np.take(table, codes)


def _quantile_scale(image: np.ndarray, intensity: Intensity, name: str) -> np.ndarray:
    """The ``low``/``high`` quantiles of the image mapped to ``b_min``/``b_max``, clipped there."""
    values = np.asarray(image, dtype=np.float32)
    levels = _integer_levels(image)
    if levels is None:
        low, high = np.quantile(values, (intensity.low, intensity.high))
    else:
        offset, codes = levels
        low, high = _histogram_quantiles(np.bincount(codes.ravel(order="K")), offset, (intensity.low, intensity.high))
    if not high > low:
        raise PTQError(f"Volume {name} has (nearly) constant intensity ({low:g}); there is nothing "
                       "to segment. Check that the right image was given.")
    scaled = (values - np.float32(low)) / np.float32(high - low)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    return (scaled * np.float32(intensity.b_max - intensity.b_min) + np.float32(intensity.b_min)).astype(np.float32)


def voxel_spacing(grid: Grid) -> Tuple[float, float, float]:
    """Millimetres between network voxel centres along each array axis."""
    return tuple(float(v) for v in np.sqrt((np.asarray(grid.network_affine)[:3, :3] ** 2).sum(axis=0)))


def _quantile_map(values: np.ndarray, counts: Optional[np.ndarray], low: float, high: float,
                  intensity: Intensity, name: str) -> np.ndarray:
    """``values`` (float32) clamped between the quantiles and standardised; ``counts``
    weights each value (a histogram), None counts each once."""
    if not high > low:
        raise PTQError(f"Volume {name} has (nearly) constant intensity ({low:g}); there is nothing "
                       "to segment. Check that the right image was given.")
    scaled = values - np.float32(low)
    scaled /= np.float32(high - low)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    if counts is None:
        mean = scaled.mean(dtype=np.float64)
        std = scaled.std(ddof=1, dtype=np.float64)
    else:
        total = counts.sum()
        mean = np.dot(counts, scaled.astype(np.float64)) / total
        std = np.sqrt(np.dot(counts, (scaled.astype(np.float64) - mean) ** 2) / (total - 1))
    scaled -= np.float32(mean)
    scaled *= np.float32(intensity.std / std)
    scaled += np.float32(intensity.mean)
    return scaled


def _integer_levels(image: np.ndarray) -> Optional[Tuple[int, np.ndarray]]:
    """``(offset, codes)`` with ``image == codes + offset`` and codes small non-negative
    integers, when the image holds integers spanning fewer than 2**16 values; else None."""
    image = np.asarray(image)
    if image.size == 0:
        return None
    low, high = image.min(), image.max()
    if not (np.isfinite(low) and np.isfinite(high)) or high - low >= 1 << 16:
        return None
    if np.issubdtype(image.dtype, np.integer):
        if low >= 0 and image.dtype.itemsize <= 2:
            return 0, image  # small non-negative integers index the table as they are
        return int(low), np.subtract(image, low, dtype=np.int32)
    flat = image.ravel(order="K")
    if not (np.array_equal(flat[::97], np.round(flat[::97])) and np.array_equal(flat, np.round(flat))):
        return None
    return int(low), np.subtract(image, low).astype(np.int32)


def _histogram_quantiles(counts: np.ndarray, offset: int, qs: Tuple[float, ...]) -> np.ndarray:
    """``np.quantile`` (linear interpolation) of the values a histogram counts."""
    cumulative = np.cumsum(counts)
    size = int(cumulative[-1])
    positions = np.asarray(qs, dtype=np.float64) * (size - 1)
    below = np.floor(positions).astype(np.int64)
    values_below = np.searchsorted(cumulative, below, side="right") + offset
    values_above = np.searchsorted(cumulative, np.minimum(below + 1, size - 1), side="right") + offset
    return values_below + (positions - below) * (values_above - values_below)


def resize(array: np.ndarray, shape: Tuple[int, ...], mode: str) -> np.ndarray:
    """Resize an N-D array to ``shape`` like ``torch.nn.functional.interpolate``.

    ``mode``: ``"nearest-exact"``, ``"nearest"`` (torch's legacy nearest)
    or ``"trilinear"`` (linear per axis, ``align_corners=False``). Nearest
    modes keep the dtype; trilinear returns float32.
    """
    if mode not in RESIZE_MODES:
        raise PTQError(f"Unknown resize mode {mode!r} in the model metadata; use one of {RESIZE_MODES}.")
    out = np.asarray(array)
    if mode == "trilinear":
        out = out.astype(np.float32, copy=False)
        for axis, size in enumerate(shape):
            out = _linear_axis(out, axis, int(size))
        return out
    # One gather per axis is several times faster than a fancy index over np.ix_.
    for axis, size in enumerate(shape):
        out = np.take(out, _nearest_indices(out.shape[axis], int(size), mode == "nearest-exact"), axis=axis)
    return out


def _target_ornt(spec: ModelSpec, start: np.ndarray) -> np.ndarray:
    import nibabel as nib

    if not spec.orientation:
        return start
    codes = tuple(str(spec.orientation).upper())
    try:
        return nib.orientations.axcodes2ornt(codes)
    except ValueError as exc:
        raise PTQError(f"Orientation {spec.orientation!r} in the model metadata is not valid; use three "
                       "letters like RAS or LPS.") from exc


def _oriented_shape(shape: Tuple[int, int, int], transform: np.ndarray) -> Tuple[int, int, int]:
    oriented = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        oriented[int(new_axis)] = shape[axis]
    return tuple(oriented)


def _network_shape(oriented_shape, oriented_affine: np.ndarray, spec: ModelSpec) -> Tuple[int, int, int]:
    if spec.resize is not None:
        if len(spec.resize) != 3 or min(spec.resize) < 1:
            raise PTQError(f"resize {spec.resize} in the model metadata must be three positive sizes.")
        return tuple(int(size) for size in spec.resize)
    if spec.spacing is not None:
        if len(spec.spacing) != 3 or min(spec.spacing) <= 0:
            raise PTQError(f"spacing {spec.spacing} in the model metadata must be three positive values.")
        spacing = np.sqrt((oriented_affine[:3, :3] ** 2).sum(axis=0))
        sizes = np.round(np.array(oriented_shape) * spacing / np.array(spec.spacing, dtype=np.float64))
        return tuple(int(max(1, size)) for size in sizes)
    return tuple(oriented_shape)


def _to_input_grid(oriented: np.ndarray, grid: Grid) -> np.ndarray:
    import nibabel as nib

    back = nib.orientations.ornt_transform(grid.target_ornt, grid.start_ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(oriented, back))


def _nearest_indices(in_size: int, out_size: int, exact: bool) -> np.ndarray:
    """Source index of every output index, as torch's CPU kernel computes it.

    ``nearest-exact``: round((dst + 0.5) * scale - 0.5) with a float32
    scale, where torch's compiled kernel fuses the multiply-add (one
    rounding to float32) before adding 0.5 and flooring; emulated in float64
    (exact for these magnitudes), it matches torch on 5000 random size
    pairs. ``nearest``: floor(dst * scale) in float32.
    """
    dst = np.arange(out_size)
    if in_size == out_size:
        return dst
    scale = np.float32(in_size) / np.float32(out_size)
    if exact:
        centre = ((dst + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
        src = np.floor(np.maximum(centre, np.float32(0.0)) + np.float32(0.5))
    elif out_size == 2 * in_size:
        src = dst // 2
    else:
        src = np.floor(dst.astype(np.float32) * scale)
    return np.minimum(src.astype(np.int64), in_size - 1)


def _linear_axis(array: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """Linear resize of one axis (``align_corners=False``, no antialiasing)."""
    in_size = array.shape[axis]
    if in_size == out_size:
        return array
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = out_size
    weight = (src - lower).astype(np.float32).reshape(weight_shape)
    return np.take(array, lower, axis=axis) * (1 - weight) + np.take(array, upper, axis=axis) * weight
