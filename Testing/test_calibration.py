"""Calibration crops and activation range collection."""

import numpy as np
import pytest
import torch

from SlicerPTQLib.calibration import collect_ranges, otsu_threshold, sample_crops
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.export import export_onnx


def volumes():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(1, 40, 36, 30)).astype(np.float32),
            rng.normal(size=(2, 24, 50, 28)).astype(np.float32)[:1]]


def test_same_seed_same_crops_other_seed_other_crops():
    first = sample_crops(volumes(), (16, 16, 16), 6, seed=3)
    again = sample_crops(volumes(), (16, 16, 16), 6, seed=3)
    other = sample_crops(volumes(), (16, 16, 16), 6, seed=4)
    assert all(c.shape == (1, 16, 16, 16) and c.dtype == np.float32 for c in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_crops_visit_images_round_robin():
    images = [np.full((1, 20, 20, 20), value, np.float32) for value in (1.0, 2.0, 3.0)]
    crops = sample_crops(images, (8, 8, 8), 7, seed=0)
    assert [float(c.mean()) for c in crops] == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0]


def test_small_volume_is_padded_with_its_minimum():
    image = np.arange(2 * 6 * 10 * 4, dtype=np.float32).reshape(2, 6, 10, 4) + 5.0
    crop = sample_crops([image], (8, 12, 16), 1, seed=0)[0]
    assert crop.shape == (2, 8, 12, 16)
    assert np.isin(image, crop).all()  # nothing of the image is cut off
    # Every added voxel holds the minimum (which the image holds once).
    assert (crop == image.min()).sum() == crop.size - image.size + 1


def test_foreground_crops_land_on_bright_tissue():
    image = np.zeros((1, 96, 96, 96), np.float32)
    image[0, 70:90, 5:25, 60:80] = 100.0  # a small bright object in a corner
    centred = sample_crops([image], (16, 16, 16), 12, seed=1, foreground_fraction=1.0)
    uniform = sample_crops([image], (16, 16, 16), 12, seed=1, foreground_fraction=0.0)
    assert all(crop.max() == 100.0 for crop in centred)
    assert sum(crop.max() == 100.0 for crop in uniform) < 6
    mixed = sample_crops([image], (16, 16, 16), 12, seed=1, foreground_fraction=0.5)
    assert sum(crop.max() == 100.0 for crop in mixed) >= 6


def test_otsu_splits_two_classes():
    values = np.concatenate([np.full(1000, 10.0), np.full(300, 200.0)])
    assert 10.0 <= otsu_threshold(values) < 200.0


def test_bad_inputs_name_the_fix():
    with pytest.raises(PTQError, match="--calib"):
        sample_crops([], (16, 16, 16), 4, seed=0)
    with pytest.raises(PTQError, match=r"\(C, D, H, W\)"):
        sample_crops([np.zeros((8, 8, 8))], (4, 4, 4), 1, seed=0)
    with pytest.raises(PTQError, match="at least 1"):
        sample_crops(volumes(), (16, 16, 16), 0, seed=0)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_collect_ranges_matches_pytorch_activations(tmp_path):
    net = TinyNet().eval()
    path = export_onnx(net, tmp_path / "tiny.onnx", 1, (1, 1, 16, 16, 16))
    crops = sample_crops(volumes(), (16, 16, 16), 3, seed=0)
    names = ["input", "/conv1/Conv_output_0", "/Relu_output_0", "output"]
    calls = []
    ranges = collect_ranges(path, names, crops, "max",
                            progress_callback=lambda *args: calls.append(args))
    with torch.no_grad():
        batch = torch.from_numpy(np.stack(crops))
        first = net.conv1(batch)
        expected = [batch.abs().max(), first.abs().max(), torch.relu(first).max(),
                    net(batch).abs().max()]
    for name, value in zip(names, expected):
        assert ranges[name] == pytest.approx(float(value), rel=1e-4)
    assert calls == [("calibrate", i, 3) for i in (1, 2, 3)]
    percentile = collect_ranges(path, names, crops, "percentile")
    assert all(0 < percentile[name] <= ranges[name] * (1 + 1e-6) for name in names)


def test_collect_ranges_reports_a_crop_the_model_rejects(tmp_path):
    path = export_onnx(TinyNet(), tmp_path / "tiny.onnx", 1, (1, 1, 16, 16, 16),
                       dynamic_spatial=False)
    crops = sample_crops(volumes(), (8, 8, 8), 1, seed=0)
    with pytest.raises(PTQError, match="crop 0"):
        collect_ranges(path, ["output"], crops, "max")


def test_an_image_the_size_of_the_roi_is_drawn_once():
    image = np.random.default_rng(1).normal(size=(1, 16, 16, 16)).astype(np.float32)
    crops = sample_crops([image, image + 1], (16, 16, 16), num_crops=10, seed=0)
    assert len(crops) == 2
    np.testing.assert_array_equal(crops[0], image)
