"""Dice, timing, file size and memory measurements."""

from __future__ import annotations

import numpy as np
import pytest

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.metrics import dice, file_size_mb, mean_dice, peak_rss_mb, time_forward
from SlicerPTQLib.runtimes.base import Runtime


def test_dice_per_label_known_values():
    a = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    b = np.array([[0, 1, 0, 0], [2, 2, 2, 2]])
    # label 1: |A|=3, |B|=1, overlap 1 -> 2/4; label 2: |A|=2, |B|=4, overlap 2 -> 4/6
    scores = dice(a, b)
    assert scores.keys() == {1, 2}
    assert scores[1] == pytest.approx(0.5)
    assert scores[2] == pytest.approx(2 / 3)
    assert mean_dice(a, b) == pytest.approx((0.5 + 2 / 3) / 2)


def test_dice_identical_disjoint_and_empty():
    a = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1
    assert dice(a, a) == {1: 1.0}
    assert dice(a, 1 - a, labels=[1]) == {1: 0.0}
    empty = np.zeros((4, 4, 4), np.uint8)
    assert dice(empty, empty) == {}
    assert mean_dice(empty, empty) == 1.0
    # Asked-for labels absent from both maps agree; absent from one score 0.
    assert dice(empty, empty, labels=[1, 7]) == {1: 1.0, 7: 1.0}
    assert dice(a, empty, labels=[1, 300]) == {1: 0.0, 300: 1.0}


def test_dice_matches_mask_definition_on_random_maps():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(20, 20, 20)).astype(np.uint16)
    b = np.where(rng.random(a.shape) < 0.8, a, rng.integers(0, 5, size=a.shape)).astype(np.uint16)
    for label, score in dice(a, b).items():
        mask_a, mask_b = a == label, b == label
        assert score == pytest.approx(2 * (mask_a & mask_b).sum() / (mask_a.sum() + mask_b.sum()))


def test_dice_rejects_mismatched_or_float_maps():
    with pytest.raises(PTQError, match="shapes"):
        dice(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(PTQError, match="integer label maps"):
        dice(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))


class ShiftSumRuntime(Runtime):
    """A real computation (a sum of shifted copies) with measurable cost."""

    def predict(self, batch):
        out = batch.copy()
        for axis in range(2, batch.ndim):
            out = out + np.roll(batch, 1, axis=axis)
        return out


def test_time_forward_reports_positive_ordered_times():
    timing = time_forward(ShiftSumRuntime(), (1, 1, 32, 32, 32), warmup=1, repeats=4)
    assert timing["runs"] == 4
    assert 0 < timing["median_s"] <= timing["p90_s"]
    assert timing["mean_s"] > 0
    with pytest.raises(PTQError, match="repeats"):
        time_forward(ShiftSumRuntime(), (1, 1, 4, 4, 4), repeats=0)


def test_file_size_mb(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\0" * (3 * 2**19))
    assert file_size_mb(model) == pytest.approx(1.5)
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 2**19)
    assert file_size_mb(model) == pytest.approx(2.0)
    assert file_size_mb(tmp_path) == pytest.approx(2.0)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 2**20)
    assert file_size_mb(model, tmp_path / "weights.bin") == pytest.approx(3.0)
    with pytest.raises(PTQError, match="does not exist"):
        file_size_mb(tmp_path / "missing.onnx")


def test_peak_rss_grows_with_a_large_allocation():
    before = peak_rss_mb()
    block = np.ones(300_000_000 // 8)  # 300 MB, touched
    after = peak_rss_mb()
    assert before > 10
    assert after >= before
    assert after > block.nbytes / 1e6 * 0.9


def test_mean_dice_can_leave_out_classes_too_small_to_measure():
    a = np.zeros((100, 100, 10), np.uint8)
    a[:50] = 1
    b = a.copy()
    a[0, 0, :5] = 2   # 5 voxels of class 2 in one map, 3 in the other, apart
    b[99, 99, :3] = 2
    assert mean_dice(a, b) == pytest.approx((1.0 + 0.0) / 2, abs=1e-3)
    assert mean_dice(a, b, min_fraction=1e-3) == pytest.approx(1.0, abs=1e-3)  # class 2: < 100 voxels in both
    b[60:70] = 2      # now 10% of the voxels in one map: counted again
    assert mean_dice(a, b, min_fraction=1e-3) < 0.95
