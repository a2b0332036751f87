"""Sliding-window inference and label conversion."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from SlicerPTQLib.errors import PTQError  # noqa: E402
from SlicerPTQLib.inference import (segment_volume, sliding_window, to_labels,  # noqa: E402
                                    window_count)
from SlicerPTQLib.runtimes.base import Runtime  # noqa: E402
from SlicerPTQLib.runtimes.torch_runtime import TorchRuntime  # noqa: E402


class CountingRuntime(Runtime):
    """A real runtime that also records the batch shapes it was given."""

    def __init__(self, inner: Runtime):
        self.inner = inner
        self.shapes = []

    def predict(self, batch):
        self.shapes.append(batch.shape)
        return self.inner.predict(batch)


def conv_net(kernel: int) -> torch.nn.Module:
    """Fully convolutional: one kxkxk conv (zero padding), ReLU, a pointwise conv to 3 channels."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, kernel, padding=kernel // 2), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 3, 1)).eval()


def full_forward(net, image):
    with torch.no_grad():
        return net(torch.from_numpy(image[None])).numpy()[0]


def random_image(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_windows_stitch_to_the_full_image_forward():
    from monai.inferers import sliding_window_inference

    net = conv_net(3)
    image = random_image((1, 32, 24, 40))
    runtime = CountingRuntime(TorchRuntime.from_module(net))
    output = sliding_window(runtime, image, roi=16, overlap=0.5)
    assert output.shape == (3, 32, 24, 40) and output.dtype == np.float32
    assert len(runtime.shapes) == window_count((32, 24, 40), (16, 16, 16), 0.5) == 3 * 2 * 4
    assert set(runtime.shapes) == {(1, 1, 16, 16, 16)}
    # Same windows and blending as MONAI driving the torch module itself.
    with torch.no_grad():
        reference = sliding_window_inference(torch.from_numpy(image[None]), 16, 1, net,
                                             overlap=0.5, mode="gaussian").numpy()[0]
    np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-6)
    # Against one forward of the whole image, only voxels near window borders
    # differ (zero padding there, blended with small but non-zero gaussian
    # weight); a window misplaced by one voxel would move the median error.
    error = np.abs(output - full_forward(net, image))
    scale = np.abs(output).max()
    assert np.median(error) < 1e-5 * scale
    assert error.mean() < 5e-3 * scale


def test_pointwise_net_stitches_exactly_and_batches_agree():
    net = conv_net(1)
    image = random_image((1, 30, 20, 25), seed=1)
    single = sliding_window(TorchRuntime.from_module(net), image, roi=(12, 16, 10), overlap=0.25)
    counting = CountingRuntime(TorchRuntime.from_module(net))
    batched = sliding_window(counting, image, roi=(12, 16, 10), overlap=0.25, batch_size=4)
    expected = full_forward(net, image)
    np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    windows = window_count((30, 20, 25), (12, 16, 10), 0.25)
    assert len(counting.shapes) == math.ceil(windows / 4)
    assert counting.shapes[0][0] == 4


def test_image_smaller_than_roi_is_padded_and_cropped_back():
    net = conv_net(3)
    image = random_image((1, 10, 12, 14), seed=2)
    runtime = CountingRuntime(TorchRuntime.from_module(net))
    output = sliding_window(runtime, image, roi=16)
    # Zero padding of the input is what the first conv's own padding does,
    # and the rest of the net is pointwise: the result is exact.
    np.testing.assert_allclose(output, full_forward(net, image), rtol=1e-5, atol=1e-5)
    assert runtime.shapes == [(1, 1, 16, 16, 16)]


def test_image_equal_to_roi_is_one_predict_call():
    net = conv_net(3)
    image = random_image((1, 16, 16, 16), seed=3)
    runtime = CountingRuntime(TorchRuntime.from_module(net))
    calls = []
    output = sliding_window(runtime, image, roi=16, progress_callback=lambda *step: calls.append(step))
    assert runtime.shapes == [(1, 1, 16, 16, 16)]
    np.testing.assert_array_equal(output, full_forward(net, image))
    assert calls == [("segmenting", 1, 1)]


def test_progress_callback_follows_each_window_batch():
    image = random_image((1, 24, 24, 24), seed=4)
    runtime = CountingRuntime(TorchRuntime.from_module(conv_net(1)))
    calls = []
    sliding_window(runtime, image, roi=16, overlap=0.5, batch_size=3,
                   progress_callback=lambda *step: calls.append(step))
    total = math.ceil(window_count((24, 24, 24), (16, 16, 16), 0.5) / 3)
    assert len(runtime.shapes) == total == 3
    assert calls == [("segmenting", done, total) for done in range(1, total + 1)]


def test_sliding_window_rejects_bad_arguments():
    runtime = TorchRuntime.from_module(conv_net(1))
    with pytest.raises(PTQError, match="C, D, H, W"):
        sliding_window(runtime, np.zeros((8, 8, 8), np.float32), roi=4)
    with pytest.raises(PTQError, match="overlap"):
        sliding_window(runtime, np.zeros((1, 8, 8, 8), np.float32), roi=4, overlap=1.0)


def test_to_labels_softmax_and_probabilities_take_argmax():
    output = np.zeros((3, 1, 2, 2), np.float32)
    output[0] = [[[5, 0], [0, 0]]]
    output[1] = [[[1, 4], [0, 0]]]
    output[2] = [[[0, 1], [3, -1]]]
    expected = np.array([[[0, 1], [2, 0]]])
    for kind in ("softmax", "probabilities"):
        labels = to_labels(output, kind)
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, expected)


def test_to_labels_sigmoid_thresholds_each_channel_later_wins():
    logits = np.full((2, 1, 2, 2), -3.0, np.float32)
    logits[0, 0, 0, :] = 2.0   # channel 0 on in the first row
    logits[1, 0, :, 1] = 0.5   # channel 1 on in the second column
    labels = to_labels(logits, "sigmoid")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[[1, 2], [0, 2]]])


def test_to_labels_many_channels_use_uint16():
    output = np.zeros((300, 1, 1, 2), np.float32)
    output[299, 0, 0, 1] = 1.0
    labels = to_labels(output, "softmax")
    assert labels.dtype == np.uint16 and labels.tolist() == [[[0, 299]]]


def test_to_labels_equals_argmax_and_later_wins_rule_on_random_maps():
    rng = np.random.default_rng(5)
    for channels in (2, 3, 6):
        output = rng.integers(0, 4, size=(channels, 9, 10, 11)).astype(np.float32)  # many ties
        np.testing.assert_array_equal(to_labels(output, "softmax"), output.argmax(axis=0))
        logits = output - 1.5
        expected = np.zeros(output.shape[1:], np.int64)
        for channel in range(channels):
            expected[logits[channel] > 0] = channel + 1
        np.testing.assert_array_equal(to_labels(logits, "sigmoid"), expected)


def test_to_labels_unknown_kind():
    with pytest.raises(PTQError, match="softmax, probabilities, sigmoid"):
        to_labels(np.zeros((2, 1, 1, 1), np.float32), "tanh")


def test_segment_volume_returns_labels_on_the_input_grid():
    from SlicerPTQLib.spec import Intensity, ModelSpec
    from SlicerPTQLib.volume import Volume

    # Channel 1 is the image itself, channel 0 a constant 0.5: argmax labels
    # every voxel brighter than 0.5, whatever the windows.
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight[:] = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1)
        net.bias[:] = torch.tensor([0.5, 0.0])
    array = random_image((30, 26, 22), seed=5)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    volume = Volume(array=array, affine=affine, name="random")
    spec = ModelSpec(name="threshold", roi_size=(16, 16, 16), intensity=Intensity(kind="none"),
                     output="softmax", orientation="RAS")
    calls = []
    labels, timings = segment_volume(TorchRuntime.from_module(net), volume, spec,
                                     progress_callback=lambda *step: calls.append(step))
    assert labels.array.shape == array.shape
    np.testing.assert_allclose(labels.affine, affine)
    np.testing.assert_array_equal(labels.array, (array > 0.5).astype(labels.array.dtype))
    assert set(timings) == {"preprocess_s", "network_s", "restore_s", "total_s", "import_s"}
    assert all(value >= 0 for value in timings.values())
    assert timings["total_s"] >= timings["network_s"]
    assert calls and calls[-1][1] == calls[-1][2]
