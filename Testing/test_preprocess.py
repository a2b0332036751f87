"""preprocess.py: torch/deepbet parity, exact overlay of restored labels, intensity kinds."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from SlicerPTQLib import shipped
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.preprocess import (network_volume, normalize_intensity, plan_grid, prepare, resize, restore,
                                     restore_probabilities, to_network_grid)
from SlicerPTQLib.spec import Intensity, ModelSpec
from SlicerPTQLib.volume import Volume
from SlicerPTQLib.volumes import read_volume

SPEC = shipped.SHIPPED_SPEC


def _rotation(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation


def reoriented_copy(volume: Volume, ornt, extra: np.ndarray = np.eye(4)) -> Volume:
    """The same voxels stored with permuted/flipped axes, the affine adjusted to match.

    ``extra`` (applied in RAS) moves the whole image, e.g. a rotation making
    it oblique; the voxel-to-voxel correspondence is unchanged.
    """
    ornt = np.asarray(ornt, dtype=float)
    array = nib.orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.array.shape)
    return Volume(array=np.ascontiguousarray(array), affine=extra @ affine, name=volume.name + "_reoriented")


def anisotropic(volume: Volume, spacing) -> Volume:
    affine = volume.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag(np.asarray(spacing) / volume.spacing)
    return Volume(volume.array, affine, volume.name)


def draw_labels(volume: Volume) -> np.ndarray:
    """Two labels drawn in RAS around the volume centre (a ball and a slab)."""
    ijk = np.indices(volume.array.shape).reshape(3, -1)
    ras = volume.affine[:3, :3] @ ijk + volume.affine[:3, 3:]
    centre = ras.mean(axis=1, keepdims=True)
    offset = ras - centre
    labels = np.zeros(ijk.shape[1], np.uint8)
    labels[(offset ** 2).sum(axis=0) < 25.0 ** 2] = 1
    labels[(np.abs(offset[0] - 30) < 6) & (np.abs(offset[2]) < 20)] = 2
    return labels.reshape(volume.array.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def ras_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.fixture(scope="module")
def head(evaluation_cases) -> Volume:
    """The first (PyPI-only) evaluation head: MNI152 with skull, LAS, 182x218x182."""
    return read_volume(evaluation_cases[0][1])


# ---- torch parity --------------------------------------------------------------------------------

def test_resize_index_arithmetic_matches_torch():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(0)
    pairs = [(8, 188), (224, 131), (298, 91), (181, 128), (62, 128)]
    pairs += [tuple(int(v) for v in rng.integers(2, 400, 2)) for _ in range(120)]
    for in_size, out_size in pairs:
        line = np.arange(in_size, dtype=np.float32)
        tensor = torch.from_numpy(line)[None, None]
        for mode in ("nearest-exact", "nearest"):
            expected = functional.interpolate(tensor, [out_size], mode=mode)[0, 0].numpy()
            assert np.array_equal(resize(line, (out_size,), mode), expected), (mode, in_size, out_size)


def test_3d_resize_matches_torch():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(1)
    for _ in range(4):
        shape_in = tuple(int(v) for v in rng.integers(5, 90, 3))
        shape_out = tuple(int(v) for v in rng.integers(5, 90, 3))
        array = rng.random(shape_in, dtype=np.float32)
        tensor = torch.from_numpy(array)[None, None]
        for mode in ("nearest-exact", "nearest"):
            expected = functional.interpolate(tensor, shape_out, mode=mode)[0, 0].numpy()
            assert np.array_equal(resize(array, shape_out, mode), expected), (mode, shape_in, shape_out)
        expected = functional.interpolate(tensor, shape_out, mode="trilinear", align_corners=False)[0, 0]
        assert np.allclose(resize(array, shape_out, "trilinear"), expected.numpy(), atol=1e-4)


def deepbet_preprocess(path) -> np.ndarray:
    """deepbet 1.0.2's own lines (bet.py run/run_model, utils.normalize), retyped here."""
    import torch
    import torch.nn.functional as F

    image = nib.load(str(path))
    x = torch.from_numpy(nib.as_closest_canonical(image).get_fdata(dtype=np.float32))
    x = torch.nan_to_num(x)
    x_small = F.interpolate(x[None, None], (128, 128, 128), mode="nearest-exact")[0, 0]
    low, high = x_small.quantile(0.005), x_small.quantile(0.995)
    x = ((x_small - low) / (high - low)).clamp(min=0, max=1)
    x = (x - x.mean()) / x.std()
    return (0.226 * x + 0.449).numpy()


def test_prepare_equals_deepbet_preprocessing(evaluation_cases, calibration_paths):
    pytest.importorskip("torch")
    # Every evaluation head (LAS, RAS, LSA storage) and an abdominal LIP scan.
    paths = [case[1] for case in evaluation_cases] + [path for path in calibration_paths if "renal" in str(path)][:1]
    for path in paths:
        network_input, grid = prepare(read_volume(path), SPEC)
        assert network_input.shape == (1, 128, 128, 128) and network_input.dtype == np.float32
        assert grid.network_shape == (128, 128, 128)
        np.testing.assert_allclose(network_input[0], deepbet_preprocess(path), atol=2e-6, err_msg=str(path))


def test_shipped_model_segments_the_brain_through_prepare_and_restore(shipped_model_path, evaluation_cases):
    """End to end with the real network: the spec really is deepbet's preprocessing."""
    torch = pytest.importorskip("torch")
    model = torch.jit.load(str(shipped_model_path)).eval()
    name, image, mask = evaluation_cases[0]
    volume = read_volume(image)
    network_input, grid = prepare(volume, SPEC)
    with torch.no_grad():
        probabilities = model(torch.from_numpy(network_input)[None])[0].numpy()
    labels = restore((probabilities[1] > 0.5).astype(np.uint8), grid)
    assert labels.array.shape == volume.array.shape and np.allclose(labels.affine, volume.affine)
    # Measured 0.953 (mni152); a wrong orientation or intensity gives far less.
    assert dice(labels.array, shipped.reference_mask(mask).array) > 0.94, name


# ---- geometry: results overlay the input --------------------------------------------------------

def test_reoriented_oblique_copy_gives_the_same_network_input(head):
    ornt = [[2, -1], [0, 1], [1, -1]]  # a permuted, partly flipped storage order
    copy = reoriented_copy(head, ornt, extra=_rotation(12.0))
    assert nib.aff2axcodes(copy.affine) != nib.aff2axcodes(head.affine)
    original, _ = prepare(head, SPEC)
    again, grid = prepare(copy, SPEC)
    assert np.array_equal(original, again)
    assert "".join(nib.aff2axcodes(grid.network_affine)) == "RAS"


@pytest.mark.parametrize("ornt", [[[2, -1], [0, 1], [1, -1]], [[1, 1], [2, -1], [0, -1]], [[0, 1], [1, 1], [2, 1]]])
def test_labels_come_back_on_the_same_voxels(head, ornt):
    # Smaller than 128^3 on every axis (the network grid is finer), anisotropic, oblique, LPS-like.
    cropped = Volume(head.array[20:160:2, 30:200:3, 10:170:2], head.affine, "crop")
    volume = anisotropic(reoriented_copy(cropped, ornt, extra=_rotation(20.0)), (0.9, 2.5, 1.6))
    labels = draw_labels(volume)
    assert {0, 1, 2} <= set(np.unique(labels))
    grid = plan_grid(volume, SPEC)
    network_labels = to_network_grid(labels, grid, "nearest-exact")
    restored = restore(network_labels, grid)
    assert np.array_equal(restored.affine, volume.affine)
    assert restored.array.dtype == labels.dtype
    assert np.array_equal(restored.array, labels)


def test_downsampled_labels_stay_in_place(head):
    volume = reoriented_copy(head, [[1, -1], [0, 1], [2, -1]], extra=_rotation(-15.0))
    labels = draw_labels(volume)
    grid = plan_grid(volume, SPEC)
    network_labels = to_network_grid(labels, grid, "nearest-exact")
    network_voxel = np.sqrt((grid.network_affine[:3, :3] ** 2).sum(axis=0)).max()
    for value in (1, 2):
        shift = ras_centroid(network_labels == value, grid.network_affine) - ras_centroid(labels == value,
                                                                                          volume.affine)
        assert np.linalg.norm(shift) < network_voxel, (value, shift)
    restored = restore(network_labels, grid).array
    assert dice(restored == 1, labels == 1) > 0.97 and dice(restored == 2, labels == 2) > 0.9


def test_network_volume_is_placed_in_ras(head):
    network_input, grid = prepare(head, SPEC)
    placed = network_volume(network_input[0], grid)
    assert placed.array.shape == (128, 128, 128)
    corners = np.array([[0, 0, 0, 1], [127, 127, 127, 1]], dtype=float).T
    inner = grid.network_affine @ corners
    field = head.affine @ np.array([[-0.5, -0.5, -0.5, 1], [s - 0.5 for s in head.array.shape] + [1]]).T
    # The network grid spans the same field of view (voxel edges) as the input, in RAS order.
    half = np.abs(grid.network_affine[:3, :3]).sum(axis=1)[:, None] / 2
    assert np.allclose(np.sort(inner[:3], axis=1) + [[-1, 1]] * half, np.sort(field[:3], axis=1), atol=1e-6)


def test_spacing_resample(head):
    spec = dataclasses.replace(SPEC, resize=None, spacing=(2.0, 2.0, 3.0), orientation="LPS")
    network_input, grid = prepare(head, spec)
    expected = tuple(int(round(size * 1.0 / step)) for size, step in zip(head.array.shape, (2.0, 2.0, 3.0)))
    assert network_input.shape[1:] == expected
    assert "".join(nib.aff2axcodes(grid.network_affine)) == "LPS"
    assert np.allclose(np.sqrt((grid.network_affine[:3, :3] ** 2).sum(axis=0)), (2.0, 2.0, 3.0), atol=0.02)
    labels = draw_labels(head)
    restored = restore(to_network_grid(labels, grid, "nearest-exact"), grid)
    assert dice(restored.array == 1, labels == 1) > 0.95


def test_restore_probabilities_returns_input_grid_channels(head):
    _, grid = prepare(head, SPEC)
    probabilities = np.stack([np.full(grid.network_shape, 0.25, np.float32),
                              np.full(grid.network_shape, 0.75, np.float32)])
    restored = restore_probabilities(probabilities, grid)
    assert restored.shape == (2,) + head.array.shape
    assert np.allclose(restored[1], 0.75)


def test_restore_rejects_padded_or_wrong_arrays(head):
    _, grid = prepare(head, SPEC)
    with pytest.raises(PTQError, match="network grid"):
        restore(np.zeros((130, 128, 128), np.uint8), grid)
    with pytest.raises(PTQError, match="network grid"):
        restore_probabilities(np.zeros((2, 128, 128, 130), np.float32), grid)


# ---- intensity -----------------------------------------------------------------------------------

def _quantile_reference(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """The per-voxel formula: np.quantile, clamp, unbiased standardisation (float64)."""
    x = image.astype(np.float64)
    low, high = np.quantile(x, (intensity.low, intensity.high))
    x = np.clip((x - low) / (high - low), 0, 1)
    return (x - x.mean()) / x.std(ddof=1) * intensity.std + intensity.mean


@pytest.mark.parametrize("dtype, offset, span", [(np.uint8, 0, 255), (np.int16, -1024, 3000),
                                                 (np.int32, 70000, 4000), (np.float32, -3, 900),
                                                 (np.int32, 0, 1 << 17)])
def test_quantile_lookup_table_equals_the_per_voxel_formula(dtype, offset, span):
    """Integer images go through a histogram + lookup table; wide or float ones do not."""
    rng = np.random.default_rng(3)
    image = (rng.gamma(2.0, span / 6, size=(20, 24, 28)).clip(0, span) + offset).round().astype(dtype)
    intensity = Intensity(kind="quantile", low=0.005, high=0.995, mean=0.449, std=0.226)
    out = normalize_intensity(np.asfortranarray(image), intensity)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, _quantile_reference(image, intensity), atol=2e-6)
    fractional = image.astype(np.float32) + np.float32(0.25)  # not integral: the sorting path
    np.testing.assert_allclose(normalize_intensity(fractional, intensity),
                               _quantile_reference(fractional, intensity), atol=2e-6)


def test_clip_scale_window():
    values = np.array([-1000.0, -175.0, 37.5, 250.0, 3000.0], np.float32)
    out = normalize_intensity(values, Intensity(kind="clip_scale", a_min=-175, a_max=250, b_min=0, b_max=1))
    assert np.allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_zscore_nonzero_leaves_background():
    values = np.array([0.0, 0.0, 1.0, 2.0, 3.0], np.float32)
    out = normalize_intensity(values, Intensity(kind="zscore", nonzero=True))
    assert np.allclose(out[:2], 0.0) and np.isclose(out[2:].mean(), 0.0, atol=1e-6)
    assert np.isclose(out[2:].std(), 1.0)
    everywhere = normalize_intensity(values, Intensity(kind="zscore"))
    assert np.isclose(everywhere.mean(), 0.0, atol=1e-6) and np.isclose(everywhere.std(), 1.0)


def test_none_and_unknown_kinds():
    values = np.arange(5, dtype=np.float32)
    assert np.array_equal(normalize_intensity(values, Intensity(kind="none")), values)
    with pytest.raises(PTQError, match="Unknown intensity kind"):
        normalize_intensity(values, Intensity(kind="minmax"))


def test_constant_volume_is_reported(head):
    flat = head.with_array(np.full(head.array.shape, 7, np.int16), name="flat")
    with pytest.raises(PTQError, match="flat has .*constant"):
        prepare(flat, SPEC)


def test_spec_errors_are_reported(head):
    with pytest.raises(PTQError, match="orientation|Orientation"):
        prepare(head, dataclasses.replace(SPEC, orientation="XYZ"))
    with pytest.raises(PTQError, match="resize mode"):
        prepare(head, dataclasses.replace(SPEC, resize_mode="cubic"))
    with pytest.raises(PTQError, match="input channels"):
        prepare(head, ModelSpec(name="two", in_channels=2))
